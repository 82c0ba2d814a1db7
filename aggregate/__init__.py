"""Pure numpy/scipy aggregation of shard files: bounds, radii, tables, curves. Never imports torch. Installed as ``cpcluster.aggregate``."""
