"""Submitit job callables (picklable, resumable). Installed as ``cpcluster.jobs``."""
