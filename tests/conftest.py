import shutil

import pytest

from common.config import load_config
from preprocessing.build_shards import build_shards
from tests.fixtures import SMALL_SHARDS, make_kaggle_fixture, write_config


@pytest.fixture(scope="session")
def kaggle(tmp_path_factory):
    """(layout, expected skips): the Kaggle-layout fixture with every bad case."""
    return make_kaggle_fixture(tmp_path_factory.mktemp("kaggle"))


@pytest.fixture(scope="session")
def built(kaggle, tmp_path_factory):
    """Shards built once from the fixture (small shards, 2 workers); returns (cfg, manifest)."""
    layout, _ = kaggle
    root = tmp_path_factory.mktemp("built")
    cfg_path = write_config(root / "config.yaml", layout, root / "shards", SMALL_SHARDS)
    cfg = load_config(cfg_path)
    manifest = build_shards(cfg, workers=2)
    return cfg, manifest


@pytest.fixture
def built_copy(built, tmp_path):
    """A private copy of the built shards that a test may damage."""
    cfg, manifest = built
    shutil.copytree(cfg.paths.shards, tmp_path / "shards")
    return tmp_path / "shards", manifest
