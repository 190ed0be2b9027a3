"""scripts/gpu_check.py: its gates fail on figures that must fail, and its CPU rehearsal passes, and fails with the
gate that notices each of three known faults."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.fixtures import REPO

sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402
from gpu_check import (QUICK, Batch, batch_parity, data_wait, data_wait_share, image_blind_gap,  # noqa: E402
                       labels_match_truth, loader_keeps_up, tencrop_order, timed_windows, weights_match)


def batches(n=20, size=4, seed=0, views=None):
    g = torch.Generator().manual_seed(seed)
    shape = (size, views, 3, 8, 8) if views else (size, 3, 8, 8)
    return [Batch(torch.rand(shape, generator=g), torch.eye(5)[torch.arange(size) % 5], [f"{b}_{i}" for i in range(size)])
            for b in range(n)]


def failed(gates):
    return {g.name.split(": ", 1)[-1] for g in gates if not g.passed}


def test_equal_batches_pass_every_parity_gate():
    assert failed(batch_parity("x", batches(), batches(), 0.01, 0.05)) == set()


def test_a_short_batch_list_fails_on_its_count_not_on_its_common_prefix():
    gates = batch_parity("x", batches()[:-1], batches(), 0.01, 0.05)
    assert failed(gates) == {"batches", "images"}
    assert not any("abs diff" in g.name for g in gates)  # no pixel figure from a prefix


def test_one_bad_batch_among_good_ones_fails_though_the_mean_passes():
    device = batches(n=200)
    device[57].images[0, :, :4] += 0.5  # an eighth of one image of one batch in 200
    gates = batch_parity("x", device, batches(n=200), 0.01, 0.05)
    assert [g.passed for g in gates if g.name == "x: mean abs diff"] == [True]
    assert failed(gates) == {"worst batch mean abs diff", "worst batch p99.9 abs diff"}


def test_swapped_ids_or_labels_fail_their_gates():
    device = batches()
    device[3].ids = device[3].ids[::-1]
    device[5].labels = device[5].labels.roll(1, 0)
    assert failed(batch_parity("x", device, batches(), 0.01, 0.05)) == {"ids equal", "labels equal"}


def test_labels_handed_over_with_the_wrong_images_fail_the_truth_gate():
    good = batches()
    truth = {i: torch.nonzero(row).flatten().tolist() for b in good for i, row in zip(b.ids, b.labels)}
    assert labels_match_truth("x", good, truth).passed
    shuffled = batches()
    shuffled[7].labels = shuffled[7].labels.roll(1, 0)
    assert not labels_match_truth("x", shuffled, truth).passed
    assert not labels_match_truth("x", good[:-1], truth).passed  # an image never handed over


def test_the_ten_crop_order_is_checked_on_every_batch():
    tencrop = batches(views=10)
    for b in tencrop:
        b.images[:, 5:] = b.images[:, :5].flip(-1)
    centre = [Batch(b.images[:, 4].clone(), b.labels, b.ids) for b in tencrop]
    assert failed(tencrop_order("x", tencrop, centre)) == set()
    tencrop[11].images[:, [5, 6]] = tencrop[11].images[:, [6, 5]]  # two mirrors swapped in one batch
    assert failed(tencrop_order("x", tencrop, centre)) == {"batches whose views 5-9 mirror 0-4"}
    centre[2].images += 0.1
    assert "view 4 is the centre crop" in failed(tencrop_order("x", tencrop, centre))


def test_a_loader_slower_than_one_and_a_half_model_steps_fails():
    assert loader_keeps_up(151, 100).passed and not loader_keeps_up(149, 100).passed


def test_too_much_waiting_fails_and_negative_noise_is_kept():
    assert not data_wait(90, 100, 0.05).passed  # 10% of the step time waiting
    assert data_wait(96, 100, 0.05).passed
    assert data_wait_share(103, 100) == pytest.approx(-0.03)  # recorded as measured


def test_resumed_weights_within_the_noise_of_a_second_clean_run():
    clean = {"w": torch.ones(100), "n": torch.tensor(3)}
    same = {k: v.clone() for k, v in clean.items()}
    nudged = {"w": clean["w"] + 1e-7, "n": clean["n"]}
    assert weights_match(same, clean, same, 0.0).passed  # bitwise where the device is deterministic
    assert not weights_match(nudged, clean, same, 0.0).passed
    assert weights_match(nudged, clean, nudged, 0.0).passed  # a GPU's second clean run differs as much
    far = {"w": clean["w"] * 1.01, "n": clean["n"]}
    assert not weights_match(far, clean, nudged, 1e-4).passed


def test_timed_windows_last_long_enough_and_report_the_spread():
    def slow():
        while True:
            time.sleep(0.01)
            yield None
    profile = gpu_check.replace(QUICK, window_s=0.2, windows=3)
    r = timed_windows(slow(), 4, profile)
    assert r["windows"] == 3 and r["shortest_window_s"] >= 0.2
    assert r["min"] <= r["images_per_s"] <= r["max"] <= 4 / 0.01


def test_the_gap_floor_comes_from_predictors_that_never_see_the_image():
    # every image holds classes 0 and 2; ranked by frequency (0, 1, 2) the pooled list is 4 hits, 4 misses,
    # 4 hits, whatever the order within a class
    blind = image_blind_gap([[0, 2]] * 4, class_counts=[30, 10, 5], k=3)
    assert blind["class_frequency"] == pytest.approx((4 + 5 / 9 + 6 / 10 + 7 / 11 + 8 / 12) / 8)
    assert 0 < blind["random"] < 1


def rehearse(tmp_path, *args, timeout=900):
    out = tmp_path / "r.json"
    tmp = tmp_path / "tmp"  # the check's temporary folders go here, so that a test can see they are gone
    tmp.mkdir()
    r = subprocess.run([sys.executable, "scripts/gpu_check.py", "--rehearse", "--quick", "--json", str(out), *args],
                       cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "TMPDIR": str(tmp)})
    report = json.loads(out.read_text()) if out.exists() else None
    return r, report


def failing_gates(report) -> dict[str, list[str]]:
    return {name: [g["name"] for g in part["gates"] if not g["passed"]] + ([part["error"]] if "error" in part else [])
            for name, part in report["parts"].items() if not part["passed"]}


def test_the_quick_rehearsal_runs_every_part_and_passes(tmp_path):
    r, report = rehearse(tmp_path)
    assert r.returncode == 0, (failing_gates(report) if report else None, r.stderr[-3000:])
    assert report["passed"] and report["rehearsal"] and set(report["parts"]) == set(gpu_check.PARTS)
    for part in report["parts"].values():
        assert part["passed"] and part["gates"]
    assert report["parts"]["ddp"]["processes"] == 2
    assert not list((tmp_path / "tmp").glob("iic_gpu_check_*"))  # its work folder is removed at the end


@pytest.mark.parametrize("fault, part, gate", [
    ("slow-loader", "throughput", "train loader / model training steps (images/s)"),
    ("ignore-dali-checkpoint", "resume", "weights: resumed vs uninterrupted (relative L2)"),
    ("shuffled-labels", "parity", "eval float32: images whose labels are their shard sample's"),
])
def test_the_rehearsal_fails_on_a_known_fault_with_the_gate_that_noticed(tmp_path, fault, part, gate):
    r, report = rehearse(tmp_path, "--only", part, "--fault", fault)
    assert r.returncode == 1, r.stderr[-2000:]
    assert not report["passed"] and gate in failing_gates(report)[part]
    assert f"{part}: FAILED" in r.stdout


def test_interleaved_windows_give_the_paired_ratio_despite_drift():
    """A is twice as fast as B while the machine keeps slowing down: measured one after the other their medians
    are off by the drift; taken in turn, each round's pair sees nearly the same machine."""
    import timing
    start = time.perf_counter()

    def stream(cost):
        while True:
            time.sleep(cost * (1 + 3 * (time.perf_counter() - start)))  # drift: later batches cost more
            yield None
    r = timing.interleaved({"a": (stream(0.002), None), "b": (stream(0.004), None)}, 1, window_s=0.05, windows=5)
    a_alone = timing.timed_windows(stream(0.002), 1, window_s=0.05, windows=5)
    b_alone = timing.timed_windows(stream(0.004), 1, window_s=0.05, windows=5)
    one_after_the_other = a_alone["images_per_s"] / b_alone["images_per_s"]
    assert r["ratios"]["a"]["b"] == pytest.approx(2, rel=0.15)
    assert abs(r["ratios"]["a"]["b"] - 2) < abs(one_after_the_other - 2)
    assert r["a"]["windows"] == r["b"]["windows"] == 5


def test_a_batch_out_of_the_prefetch_queue_does_not_size_the_windows():
    """The first batches come at once (already prefetched), the rest cost 5 ms each: a window of 0.2 s holds
    about 40 batches, not the thousands that the instant batch alone would suggest."""
    import timing
    calls = []

    def stream():
        while True:
            calls.append(1)
            if len(calls) > 3:  # 2 for the warm-up, then one prefetched batch
                time.sleep(0.005)
            yield None
    r = timing.interleaved({"a": (stream(), None)}, 1, window_s=0.2, windows=2)
    assert 30 <= r["a"]["batches_per_window"] <= 60, r["a"]


def test_a_stream_given_as_a_factory_runs_each_window_on_a_new_instance():
    """Identical loaders differ by up to 18% per instance on a small shared CPU: with a factory, every window is
    timed on a new one (and the old one closed), so an instance's luck cannot set a whole stream's figure."""
    import timing
    events = []

    def factory():
        speed = [0.001, 0.004][events.count("made") % 2]  # alternate fast and slow instances
        events.append("made")

        def batches():
            try:
                while True:
                    time.sleep(speed)
                    yield None
            finally:
                events.append("closed")
        return batches()

    r = timing.interleaved({"a": (factory, None)}, 1, window_s=0.05, windows=4)
    # one instance per window, each closed before the next is made (a baseline's workers would compete)
    assert events == ["made", "closed"] * 4
    rates = sorted(r["a"]["per_window"])
    assert rates[-1] / rates[0] > 2  # the windows saw both kinds of instance
