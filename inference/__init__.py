"""Kaggle submissions from a tuned checkpoint through the dali_pipes test-image pipeline, and a scorer."""
