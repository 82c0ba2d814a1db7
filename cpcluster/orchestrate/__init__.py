"""Running and submitting work and watching it (DESIGN.md section 2, layer 4): certify runs and their folders,
executors and SLURM, shard states, fine-tuning and quality submission, inspect, grids and the demo. The command line
calls these functions; they call the jobs and the libraries below."""
