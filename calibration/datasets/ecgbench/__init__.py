"""ECGBench: its subsets and their two on-disk layouts (parquet, JSON + images)."""
