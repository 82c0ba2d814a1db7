"""cpcluster: Consistency Purification (randomized smoothing with a one-step consistency purifier) on clusters.

Importing this package has no side effects and imports neither torch nor submitit.
"""
__version__ = "0.1.0"
