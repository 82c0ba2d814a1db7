"""Model, purifier and dataset adapters (torch)."""
