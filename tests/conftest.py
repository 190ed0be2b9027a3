import shutil
import subprocess
from pathlib import Path

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


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size, read_only=False) -> folder``: a small tmpfs of our own, so a test can fill a real disk
    (remount it larger to free space). Skips where this machine lets no test mount one."""
    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); the injected-fault tests cover this")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
