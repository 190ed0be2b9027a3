"""The train and tune stages: loss, loop, checkpoint saver, DDP, the tune stage's data.
May import common, dali_pipes and model."""
