"""The embedded demo: a small learnable dataset in the exact Kaggle layout."""
