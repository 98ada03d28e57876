"""uwe: hybrid active learning with uncertainty-weighted embeddings."""

__version__ = "0.1.0"
