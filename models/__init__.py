"""longtrain.models."""
