"""Know before you launch: per-rank memory, bytes per collective kind, FLOPs and a step-time bound
(`longtrain plan`). Imports config/, models/ (a model laid out on the meta device, for its
parameter counts), parallel/, data/ and files/; never training, checkpoint or launching code."""
