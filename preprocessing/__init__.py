"""Kaggle CSVs + images -> globally shuffled WebDataset shards with DALI indexes, a manifest and a skip report.
May import common only; nothing imports preprocessing."""
