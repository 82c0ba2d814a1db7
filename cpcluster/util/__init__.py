"""Small utilities every layer may use (DESIGN.md section 2, layer 1): errors, file reading and writing, progress
bars, the distributed-training helpers and SIGTERM handling. Nothing here imports from the rest of cpcluster."""
