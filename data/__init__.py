"""longtrain.data."""
