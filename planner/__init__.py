"""Know before you launch: per-rank memory, bytes per collective kind, FLOPs and a step-time bound."""
