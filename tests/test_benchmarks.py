import json
import os
import subprocess
import sys

from tests.fixtures import REPO


def test_throughput_benchmark_runs_end_to_end_and_writes_its_json(tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "scripts/benchmark_throughput.py", "--images", "80", "--batch-size", "8",
                        "--window-s", "0.1", "--windows", "2",
                        "--json", str(out), "--plot", str(tmp_path / "b.png"),
                        "--set", "pipeline.crop_size=64", "--set", "data.shortest_side=72"],
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(tmp_path.glob("iic_bench_*"))  # its generated shards are removed
    result = json.loads(out.read_text())
    for key in ("decode_ceiling", "dali_train", "baseline", "dali_eval", "train_steps_dali", "train_steps_baseline"):
        assert result[key]["images_per_s"] > 0
    assert result["ratios"]["dali_train_vs_baseline"] > 0
    for key in ("decode_ceiling", "dali_train", "baseline"):
        r = result[key]
        assert r["windows"] == 2 and r["shortest_window_s"] >= 0.1 and r["min"] <= r["images_per_s"] <= r["max"]
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_gpu_check_stops_at_once_without_a_gpu(tmp_path):
    import torch
    if torch.cuda.is_available():
        import pytest
        pytest.skip("this machine has a GPU: run scripts/gpu_check.py itself")
    r = subprocess.run([sys.executable, "scripts/gpu_check.py", "--json", str(tmp_path / "g.json")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: gpu_check needs a CUDA GPU")
    assert not (tmp_path / "g.json").exists()
