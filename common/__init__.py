"""Pieces every stage shares: the config loader, the label vocabulary, the CLI frame."""
