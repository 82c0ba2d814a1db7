"""Frozen dataclass configs, one per job kind. They are what gets pickled, hashed and written beside results."""
from __future__ import annotations
