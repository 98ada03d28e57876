"""Task heads that turn a model and images into a Parquet pool (one module per task)."""
