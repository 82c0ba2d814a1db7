"""Work plans: (image, stream, block) units cut into shards, counter-based noise seeds, array chunking. Installed as ``cpcluster.sharding``."""
