import json
import os
import subprocess
import sys

import pytest

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


def test_handover_benchmark_puts_every_thread_in_a_group_and_notices_other_processes(tmp_path):
    out = tmp_path / "h.json"
    # another process keeping a core busy the whole time: its CPU must show up as others', with a warning
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        r = subprocess.run([sys.executable, "scripts/benchmark_handover.py", "--images", "80", "--batch-size", "8",
                            "--threads", "2", "--window-s", "0.2", "--windows", "2", "--json", str(out),
                            "--set", "pipeline.crop_size=64", "--set", "data.shortest_side=72"],
                           cwd=REPO, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "TMPDIR": str(tmp_path)})
    finally:
        burner.kill()
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning: other processes took up to" in r.stderr
    assert not list(tmp_path.glob("iic_handover_*"))  # its generated shards are removed
    streams = json.loads(out.read_text())["streams"]
    names = ["dali_train_pipeline", "dali_train_pipeline_held", "dali_train"]
    assert list(streams) == names + [n + "_spare_core" for n in names]
    for name, s in streams.items():
        cpu = s["cpu_ms_per_batch"]
        assert s["dali_threads"] == (1 if name.endswith("_spare_core") else 2) and s["windows"] == 2
        # DALI's decoding lands in its own groups (with one thread, on its executor), not in "other"
        dali = cpu["dali_workers"] + cpu["dali_executor"]
        assert dali > 2 * cpu["other"] and dali > cpu["consumer"] > 0
        assert 0.05 < s["dali_busy"] <= 1.05
        assert s["other_processes_cores"] >= 0.3  # the burner's core, not this process's own threads
        assert abs(cpu["dali"] - dali) < 0.01
    assert streams["dali_train_pipeline"]["cpu_ms_per_batch"]["dali_workers"] > 0
    assert streams["dali_train_pipeline_spare_core"]["cpu_ms_per_batch"]["dali_executor"] > 0


def test_a_thread_that_ends_or_starts_between_snapshots_counts_only_its_share():
    sys.path.insert(0, str(REPO / "scripts"))
    from benchmark_handover import cpu_by_group
    pid = os.getpid()
    before = {pid: ("python", 1.0), 11: ("[DALI][TP0]Exec", 5.0), 12: ("gone", 3.0)}
    after = {pid: ("python", 1.5), 11: ("[DALI][TP0]Exec", 7.0), 13: ("[DALI] Executor", 0.25),
             14: ("PrefetchWorker ", 0.5)}
    assert cpu_by_group(before, after) == {"dali_workers": 2.0, "dali_executor": 0.25, "reader_prefetch": 0.5,
                                           "consumer": 0.5, "other": 0.0}


def test_the_per_thread_figures_are_written_from_their_own_json(tmp_path):
    handover = json.loads((REPO / "docs" / "benchmark_handover.json").read_text())
    handover["streams"]["dali_train_spare_core"]["dali_busy"] = 0.421
    store = tmp_path / "handover.json"
    store.write_text(json.dumps(handover))
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text((REPO / "docs" / "BENCHMARKS.md").read_text())
    r = figures("--check", "--handover", str(store), "--docs", str(doc))
    assert r.returncode == 1 and "out of date" in r.stderr
    assert figures("--handover", str(store), "--docs", str(doc)).returncode == 0
    row = next(line for line in doc.read_text().splitlines() if line.startswith("| 1 (a core for the consumer) | train loader"))
    assert row.endswith("| 0.42 |")


BENCHMARKS = sorted(p.name for p in (REPO / "scripts").glob("benchmark_*.py") if p.name != "benchmark_args.py")


@pytest.mark.parametrize("script", BENCHMARKS)
def test_every_benchmark_refuses_bad_arguments_before_measuring(script, tmp_path):
    count = {"benchmark_scale.py": "--workers", "benchmark_labels.py": "--repeats",
             "benchmark_threads.py": "--repeats"}.get(script, "--windows")
    cases = [([count, "0"], f"argument {count}: 0 is too small"), (["--json", str(tmp_path)], "argument --json: the path")]
    if script in ("benchmark_throughput.py", "benchmark_handover.py"):
        cases.append((["--shards", str(tmp_path)], "error: no manifest at"))
    for args, words in cases:
        r = subprocess.run([sys.executable, f"scripts/{script}", *args], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-500:])


def test_other_processes_cpu_counts_a_stranger_and_not_our_own_children():
    import signal
    import time
    sys.path.insert(0, str(REPO / "scripts"))
    import timing
    watch = timing.OtherProcesses()
    # our own child burning a core is the benchmark's own work (the baseline's DataLoader workers)
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.2: pass"])
    watch.start()
    child.wait()
    ours = watch.stop()
    # a process that is not ours (its parent shell exits, so it is nobody's child here)
    pid = int(subprocess.run(["sh", "-c", f"'{sys.executable}' -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True).stdout)
    try:
        time.sleep(0.2)
        watch.start()
        time.sleep(1.2)
        stranger = watch.stop()
    finally:
        os.kill(pid, signal.SIGKILL)
    assert ours < 0.3 and stranger > 0.6, (ours, stranger)
    assert timing.busy_machine({"a": {"other_processes_cores": 0.05}, "ratios": {}}) is None
    warning = timing.busy_machine({"a": {"other_processes_cores": 0.05}, "b": {"other_processes_cores": stranger}})
    assert warning.startswith("warning: other processes took up to") and "(b)" in warning
