"""Developer scripts: the demo and the benchmarks (run as modules from the repository root)."""
