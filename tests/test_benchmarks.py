import json
import os
import subprocess
import sys

from tests.fixtures import REPO


def test_throughput_benchmark_runs_end_to_end_and_writes_its_json(tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "scripts/benchmark_throughput.py", "--images", "80", "--batch-size", "8",
                        "--window-s", "0.1", "--windows", "2", "--headline-windows", "3",
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
    for key, windows in (("decode_ceiling", 2), ("dali_train", 2), ("baseline", 3), ("headline_dali_train", 3)):
        r = result[key]
        assert r["windows"] == windows and r["shortest_window_s"] >= 0.1 and r["min"] <= r["images_per_s"] <= r["max"]
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


def figures(*args, cwd=REPO):
    return subprocess.run([sys.executable, "scripts/write_figures.py", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_the_docs_quote_the_benchmark_json():
    r = figures("--check")
    assert r.returncode == 0, r.stderr


def test_a_changed_figure_makes_the_docs_stale_and_a_rewrite_quotes_it(tmp_path):
    runs = json.loads((REPO / "docs" / "benchmark_cpu_runs.json").read_text())
    for run in runs:
        run["ratios"]["dali_train_vs_baseline"] = 9.87
    store = tmp_path / "runs.json"
    store.write_text(json.dumps(runs))
    docs = [tmp_path / "README.md", tmp_path / "BENCHMARKS.md"]
    for doc in docs:
        doc.write_text((REPO / ("docs" if doc.name == "BENCHMARKS.md" else "") / doc.name).read_text())
    before = docs[1].read_text()
    r = figures("--check", "--store", str(store), "--docs", *map(str, docs))
    assert r.returncode == 1 and "out of date" in r.stderr
    assert docs[1].read_text() == before  # --check changes nothing
    assert figures("--store", str(store), "--docs", *map(str, docs)).returncode == 0
    assert "9.87x" in docs[0].read_text() and "**9.87x** baseline" in docs[1].read_text()
    assert figures("--check", "--store", str(store), "--docs", *map(str, docs)).returncode == 0
