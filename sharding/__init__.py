"""Work plans: (image, stream, block) units cut into shards, counter-based noise seeds, array chunking. Installed as ``cpcluster.sharding``.

Pure numpy; no torch import.
"""
from cpcluster.sharding.arrays import DEFAULT_MAX_ARRAY_SIZE, split_array
from cpcluster.sharding.plan import (ESTIMATION, SELECTION, Plan, balanced_ranges, build_units, make_plan,
                                     plan_from_config, select_images)
from cpcluster.sharding.seeds import NOISE_SCHEME, BatchStates, check_batching, unit_batches

__all__ = ["DEFAULT_MAX_ARRAY_SIZE", "ESTIMATION", "NOISE_SCHEME", "SELECTION", "BatchStates", "Plan",
           "balanced_ranges", "build_units", "check_batching", "make_plan", "plan_from_config", "select_images", "split_array",
           "unit_batches"]
