"""DALI pipelines over the shards (GPU decode where there is a GPU, the same graphs on the CPU) and the
PyTorch-facing loaders that hand over batches, nothing more (the original DataLoader path, for comparison, is
``benchmarks.baseline``). May import common only; never runs a model."""
