"""Benchmarks, each ``python -m scripts.bench.<name>`` printing one JSON document (``make bench``)."""
