"""longtrain.checkpoint: sharded checkpoints on DCP. store.py writes, commits, keeps and finds
them; marker.py reads a committed one's marker and verifies its files against it (every rank
hashing its share); state.py says what a checkpoint holds (DTensor views) and copies a loaded one back;
safe_dcp.py reads metadata others wrote without running their code; identity.py records the
model and data a checkpoint belongs to. Imports models/, parallel/ and files/; never training or
launching code."""
