"""Built-in demo data and models (no downloads)."""
