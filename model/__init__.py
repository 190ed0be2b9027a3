"""What training and inference share about the classifier: creating it, autocast, checkpoints, rescoring and
metrics, the decision rule, and top-k prediction over a loader. May import common only (batches come in as tensors)."""
