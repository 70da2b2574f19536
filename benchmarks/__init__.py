"""longtrain.benchmarks."""
