"""One-off studies, run as modules (`python -m pulse_edge.benchmarks.studies.NAME`), not CLI commands."""
