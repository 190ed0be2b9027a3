"""DALI pipelines over the shards (GPU decode where there is a GPU, the same graphs on the CPU) and the
PyTorch-facing loaders; ``dali_pipes.baseline`` is the original PyTorch DataLoader path, for comparison."""
