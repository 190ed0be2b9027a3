"""Kaggle submissions through the dali_pipes test-image pipeline, and a scorer.
May import common, dali_pipes and model."""
