"""The embedded demo: a small learnable dataset in the exact Kaggle layout, and its config.
May import common only."""
