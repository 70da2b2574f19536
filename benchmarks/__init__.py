"""longtrain.benchmarks: the `longtrain bench ...` commands; each prints a table and rewrites
its own section of docs/benchmarks.md with the command that produced it. An entry point like
cli/: may import every other room."""
