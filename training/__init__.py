"""Model, loss, metrics, the train/tune loop and checkpoints."""
