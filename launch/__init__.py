"""longtrain.launch."""
