"""The CPUs this process may use: affinity and a container's CPU quota, behind every default pool size and the
thread budget."""
import logging
import os
from pathlib import Path

import pytest

import common.threads as threads
import preprocessing.build_shards as build_module
from common.config import load_config
from preprocessing.build_shards import build_shards
from tests.fixtures import SMALL_SHARDS, write_config


def cgroup(tmp_path: Path, own: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake cgroup tree and /proc/self/cgroup."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    (tmp_path / "self_cgroup").write_text(own)
    return root, tmp_path / "self_cgroup"


@pytest.mark.parametrize("own, files, expected", [
    ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2, as a container sees its own
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),
    # v2 on a host: the process's cgroup and those above it; the tightest one counts
    ("0::/jobs/a\n", {"jobs/a/cpu.max": "max 100000", "jobs/cpu.max": "300000 100000", "cpu.max": "800000 100000"}, 3.0),
    ("0::/jobs/a\n", {"jobs/a/cpu.max": "50000 100000", "jobs/cpu.max": "300000 100000"}, 0.5),
    # cgroup v1
    ("4:cpu,cpuacct:/\n", {"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
    ("4:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
    ("", {}, None),
])
def test_the_cgroup_quota_is_read_from_v2_or_v1(tmp_path, own, files, expected):
    root, own_file = cgroup(tmp_path, own, files)
    assert threads.cgroup_quota(root, own_file) == expected


@pytest.mark.parametrize("affinity, quota, expected", [(8, None, 8), (8, 2.5, 2), (8, 0.5, 1), (2, 16.0, 2)])
def test_the_cpu_limit_is_the_affinity_or_the_quota_rounded_down_and_at_least_one(monkeypatch, affinity, quota,
                                                                                  expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    monkeypatch.setattr(threads, "cgroup_quota", lambda: quota)
    assert threads.cpu_limit() == expected
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.usable_cores() == max(1, expected // 2)
    assert threads.thread_budget(4, on_gpu=False).dali + threads.thread_budget(4, on_gpu=False).torch == \
        max(2, max(1, expected // 2))


def test_the_builder_s_default_workers_follow_a_cpu_quota_and_more_warns(built, kaggle, tmp_path, monkeypatch,
                                                                         caplog):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 1.0)  # a container given one CPU on a 4-core host
    pools = []
    run_jobs = build_module.run_jobs
    monkeypatch.setattr(build_module, "run_jobs", lambda jobs, workers, bar: pools.append(workers) or
                        run_jobs(jobs, workers, bar))
    cfg = load_config(write_config(tmp_path / "c.yaml", kaggle[0], tmp_path / "shards", SMALL_SHARDS))
    build_shards(cfg)
    assert pools == [1]
    with caplog.at_level(logging.WARNING):
        assert threads.worker_count(3) == 3
    assert "--workers 3 is more than the 1 CPU(s) this process may use" in caplog.text
