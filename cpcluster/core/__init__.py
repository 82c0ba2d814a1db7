"""The core libraries of cpcluster (DESIGN.md section 2, layer 2): configs and choice lists, a run resolved from its
config, the counting engine and its noise, the shard file and its journal, the fine-tuning losses, the FID network."""
