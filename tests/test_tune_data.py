import webdataset as wds

from common.shard_format import split_shards
from common.tune_split import split_tune_shards


def keys(shards) -> list[str]:
    return [s["__key__"] for tar in shards.tars for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False)]


def test_fit_and_holdout_are_disjoint_complete_and_deterministic(built, tmp_path):
    cfg, _ = built
    tune = sorted(keys(split_shards(cfg.paths.shards, "tune")))
    fit, holdout = split_tune_shards(cfg.paths.shards, tmp_path / "a", 0.3, cfg.data.seed)
    fit_keys, hold_keys = keys(fit), keys(holdout)
    assert set(fit_keys).isdisjoint(hold_keys)
    assert sorted(fit_keys + hold_keys) == tune
    assert len(hold_keys) == round(0.3 * len(tune)) and fit.samples == len(fit_keys) and holdout.samples == len(hold_keys)
    again = split_tune_shards(cfg.paths.shards, tmp_path / "b", 0.3, cfg.data.seed)
    for first, second in zip((fit, holdout), again):
        assert first.tars[0].read_bytes() == second.tars[0].read_bytes()
    other_fit, _ = split_tune_shards(cfg.paths.shards, tmp_path / "c", 0.3, cfg.data.seed + 1)
    assert sorted(keys(other_fit)) != sorted(fit_keys)  # the seed decides which images are held out
