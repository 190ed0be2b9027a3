"""The benchmarks package: its harness's arithmetic (on a clock of the test's own, so no figure depends on how
fast this machine is), the figures it writes into the docs, its commands' arguments and their old names."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import harness
from tests.fixtures import REPO


class Clock:
    """``time.perf_counter`` for the harness, moved on only by the streams' batches."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(harness, "time", c)
    return c


def stream(clock, cost):
    """Batches that take ``cost(k)`` seconds of the test's clock, k counting from 0."""
    k = 0
    while True:
        clock.now += cost(k)
        k += 1
        yield None


def test_timed_windows_last_long_enough_and_report_the_spread(clock):
    r = harness.timed_windows(stream(clock, lambda k: 0.01 if k % 2 else 0.03), 4, window_s=0.2, windows=3)
    assert r["windows"] == 3 and r["shortest_window_s"] >= 0.2
    assert r["images_per_s"] == pytest.approx(4 / 0.02, rel=0.1)  # alternating 10 and 30 ms: 20 ms a batch
    assert r["min"] <= r["images_per_s"] <= r["max"]


def test_interleaved_windows_give_the_paired_ratio_despite_drift(clock):
    """A is twice as fast as B while the machine keeps slowing down: measured one after the other their medians
    are off by the drift; taken in turn, each round's pair sees nearly the same machine."""
    def drifting(cost):
        return stream(clock, lambda k: cost * (1 + 3 * clock.now))
    r = harness.interleaved({"a": (drifting(0.002), None), "b": (drifting(0.004), None)}, 1, window_s=0.05,
                            windows=5)
    a_alone = harness.timed_windows(drifting(0.002), 1, window_s=0.05, windows=5)
    b_alone = harness.timed_windows(drifting(0.004), 1, window_s=0.05, windows=5)
    assert r["ratios"]["a"]["b"] == pytest.approx(2, rel=0.15)
    assert abs(r["ratios"]["a"]["b"] - 2) < abs(a_alone["images_per_s"] / b_alone["images_per_s"] - 2)
    assert r["a"]["windows"] == r["b"]["windows"] == 5


def test_a_batch_out_of_the_prefetch_queue_does_not_size_the_windows(clock):
    """The first batches come at once (already prefetched), the rest cost 5 ms each: a window of 0.2 s holds
    about 40 batches, not the thousands that the instant batch alone would suggest."""
    r = harness.interleaved({"a": (stream(clock, lambda k: 0.0 if k < 3 else 0.005), None)}, 1, window_s=0.2,
                            windows=2)
    assert 30 <= r["a"]["batches_per_window"] <= 60, r["a"]


def test_a_stream_given_as_a_factory_runs_each_window_on_a_new_instance(clock):
    """With a factory every window is timed on a new instance (and the old one closed), so one instance's luck
    cannot set a whole stream's figure."""
    events = []

    def factory():
        cost = [0.001, 0.004][events.count("made") % 2]  # alternate fast and slow instances
        events.append("made")

        def batches():
            try:
                yield from stream(clock, lambda k: cost)
            finally:
                events.append("closed")
        return batches()

    r = harness.interleaved({"a": (factory, None)}, 1, window_s=0.05, windows=4)
    assert events == ["made", "closed"] * 4  # each closed before the next is made
    rates = sorted(r["a"]["per_window"])
    assert rates[-1] / rates[0] == pytest.approx(4, rel=0.1)  # the windows saw both kinds of instance


def run_module(module, *args, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_throughput_benchmark_runs_end_to_end_and_writes_its_json(tmp_path):
    out = tmp_path / "b.json"
    r = run_module("benchmarks.throughput", "--images", "80", "--batch-size", "8", "--window-s", "0.1",
                   "--windows", "2", "--headline-windows", "3", "--json", str(out), "--plot", str(tmp_path / "b.png"),
                   "--set", "pipeline.crop_size=64", "--set", "data.shortest_side=72", timeout=600,
                   env={**os.environ, "TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(tmp_path.glob("iic_bench_*"))  # its generated shards are removed
    result = json.loads(out.read_text())
    for key in ("decode_ceiling", "dali_train", "baseline", "dali_eval", "train_steps_dali", "train_steps_baseline"):
        assert result[key]["images_per_s"] > 0
    for key, windows in (("decode_ceiling", 2), ("dali_train", 2), ("baseline", 3), ("headline_dali_train", 3)):
        assert result[key]["windows"] == windows and result[key]["shortest_window_s"] >= 0.1
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_gpu_check_stops_at_once_without_a_gpu(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: run python -m benchmarks.gpu_check itself")
    r = run_module("benchmarks.gpu_check", "--json", str(tmp_path / "g.json"))
    assert r.returncode == 2 and r.stderr.startswith("error: gpu_check needs a CUDA GPU")
    assert not (tmp_path / "g.json").exists()


def figures(*args):
    return run_module("benchmarks.figures", *args, timeout=60)


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


BAD_ARGUMENTS = {
    "benchmarks.throughput": [(["--windows", "0"], "argument --windows: 0 is too small"),
                              (["--shards", "{tmp}"], "error: no manifest at")],
    "benchmarks.shard_builder": [(["--workers", "0"], "argument --workers: 0 is too small"),
                                 (["--parts", "image_step,nope"], "argument --parts: 'image_step,nope'")],
    "benchmarks.ensemble_cost": [(["--members", "0"], "argument --members: 0 is too small")],
    "benchmarks.label_files": [(["--repeats", "0"], "argument --repeats: 0 is too small"),
                               (["--scale", "2"], "argument --scale: 2 is not in (0, 1]")],
    "benchmarks.demo_levers": [(["--resolutions", "[[64, 80]]"], "argument --resolutions: '[[64, 80]]'"),
                               (["--work", str(REPO)], "holds files this benchmark did not make")],
}


@pytest.mark.parametrize("module", sorted(BAD_ARGUMENTS))
def test_every_benchmark_refuses_bad_arguments_before_measuring(module, tmp_path, capsys, monkeypatch):
    import importlib
    monkeypatch.setenv("IIC_THREAD_BUDGET", "on")  # the throughput benchmark turns it off for its run
    main = importlib.import_module(module).main
    for args, words in BAD_ARGUMENTS[module] + [(["--json", "{tmp}"], "argument --json: the path")]:
        with pytest.raises(SystemExit) as exit_:
            main([a.format(tmp=tmp_path) for a in args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and words in err and "Traceback" not in err, (args, err[-500:])


OLD_NAMES = {"benchmark_throughput.py": "benchmarks.throughput", "benchmark_prepare.py": "benchmarks.shard_builder",
             "benchmark_scale.py": "benchmarks.shard_builder --parts scale", "benchmark_ensemble.py": "benchmarks.ensemble_cost",
             "gpu_check.py": "benchmarks.gpu_check", "write_figures.py": "benchmarks.figures"}


@pytest.mark.parametrize("script", sorted(OLD_NAMES))
def test_a_benchmark_s_old_name_still_runs_it_with_a_one_line_warning(script):
    r = subprocess.run([sys.executable, f"scripts/{script}", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-1000:]
    assert r.stderr.strip() == f"warning: scripts/{script} is now python -m {OLD_NAMES[script]}; the old name " \
                               "still works but will go"
    assert f"usage: python -m {OLD_NAMES[script].split()[0]}" in r.stdout


def test_the_label_file_benchmark_runs_end_to_end_and_writes_its_json(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.label_files", "--scale", "0.0005", "--repeats", "1",
                        "--work", str(tmp_path), "--json", str(tmp_path / "labels.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "labels.json").read_text())
    assert result["human_and_machine"]["machine_pairs"] > 0 and result["rows_ratio"] > 2.5
    assert result["human"]["rows"] == round(8_040_000 * 0.0005)


@pytest.mark.slow
def test_the_time_to_accuracy_benchmark_writes_its_json_and_plot(tmp_path):
    out, plot = tmp_path / "t.json", tmp_path / "t.png"
    r = run_module("benchmarks.time_to_accuracy", "--quick", "--recipes", "original,fast", "--json", str(out),
                   "--plot", str(plot), "--work", str(tmp_path / "work"), timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["recipes"]) == {"original", "fast"} and plot.stat().st_size > 0
    original, fast = result["recipes"]["original"], result["recipes"]["fast"]
    assert set(original["images_per_s_by_side"]) == {"56"} and set(fast["images_per_s_by_side"]) == {"40", "48", "56"}
    assert len(fast["gap_by_epoch"]) == 3 and all(0 < s for s, _ in fast["gap_by_epoch"])
    assert fast["test_resolution"] in ([64, 56], [73, 64]) and 0 <= fast["stage2_f2"] <= 1
    assert result["ratios"]["fast"]["train_seconds_vs_original"] > 0


def test_the_time_to_accuracy_benchmark_refuses_an_unknown_recipe_in_one_line(tmp_path):
    r = run_module("benchmarks.time_to_accuracy", "--recipes", "orignal", "--json", str(tmp_path / "t.json"))
    assert r.returncode == 2 and "the recipes are original, progressive, fast" in r.stderr
    assert not (tmp_path / "t.json").exists()
