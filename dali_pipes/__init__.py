"""DALI pipelines over the shards (GPU decode where there is a GPU, the same graphs on the CPU) and the
PyTorch-facing loaders that hand over batches, nothing more; ``dali_pipes.baseline`` is the original PyTorch
DataLoader path, for comparison. May import common only; never runs a model."""
