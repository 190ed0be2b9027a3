"""benchmarks.gpu_check: its gates fail on figures that must fail, its CPU rehearsal passes, and a run with a known
bug put in by the test fails with the gate that notices it."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from tests.fixtures import REPO

from benchmarks import gpu_check
from benchmarks.gpu_check import (QUICK, Batch, Tolerance, batch_parity, data_wait, data_wait_share, image_blind_gap,
                                  labels_match_truth, loader_keeps_up, tencrop_order, weights_match)

TOL = Tolerance(0.01, 0.05)


def batches(n=20, size=4, seed=0, views=None):
    g = torch.Generator().manual_seed(seed)
    shape = (size, views, 3, 8, 8) if views else (size, 3, 8, 8)
    return [Batch(torch.rand(shape, generator=g), torch.eye(5)[torch.arange(size) % 5], [f"{b}_{i}" for i in range(size)])
            for b in range(n)]


def failed(gates):
    return {g.name.split(": ", 1)[-1] for g in gates if not g.passed}


def test_equal_batches_pass_every_parity_gate():
    assert failed(batch_parity("x", batches(), batches(), TOL)) == set()


def test_a_short_batch_list_fails_on_its_count_not_on_its_common_prefix():
    gates = batch_parity("x", batches()[:-1], batches(), TOL)
    assert failed(gates) == {"batches", "images"}
    assert not any("abs diff" in g.name for g in gates)  # no pixel figure from a prefix


def test_one_bad_batch_among_good_ones_fails_though_the_mean_passes():
    device = batches(n=200)
    device[57].images[0, :, :4] += 0.5  # an eighth of one image of one batch in 200
    gates = batch_parity("x", device, batches(n=200), TOL)
    assert [g.passed for g in gates if g.name == "x: mean abs diff"] == [True]
    assert failed(gates) == {"worst batch mean abs diff", "worst batch p99.9 abs diff"}


def test_swapped_ids_or_labels_fail_their_gates():
    device = batches()
    device[3].ids = device[3].ids[::-1]
    device[5].labels = device[5].labels.roll(1, 0)
    assert failed(batch_parity("x", device, batches(), TOL)) == {"ids equal", "labels equal"}


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
    centre[2].images[:, :, 0] += 0.3  # one decode's edge column off (a GPU's ROI decode): within the tolerance
    assert failed(tencrop_order("x", tencrop, centre, Tolerance(0.01, 0.5))) == set()
    corner = [Batch(b.images[:, 0].clone(), b.labels, b.ids) for b in tencrop]  # view 0 where the centre should be
    assert failed(tencrop_order("x", tencrop, corner, Tolerance(0.01, 0.5))) == {
        "view 4 against the centre crop (mean abs diff)", "view 4 against the centre crop (p99.9 abs diff)"}
    tencrop[11].images[:, [5, 6]] = tencrop[11].images[:, [6, 5]]  # two mirrors swapped in one batch
    assert "batches whose views 5-9 mirror 0-4" in failed(tencrop_order("x", tencrop, centre, Tolerance(0.01, 0.5)))


def test_a_loader_slower_than_one_and_a_half_model_steps_fails():
    assert loader_keeps_up(151, 100).passed and not loader_keeps_up(149, 100).passed


def test_too_much_waiting_fails_and_negative_noise_is_kept():
    assert not data_wait(90, 100, 0.05).passed  # 10% of the step time waiting
    assert data_wait(96, 100, 0.05).passed
    assert data_wait_share(103, 100) == pytest.approx(-0.03)  # recorded as measured


def test_quick_records_its_speed_gates_without_gating_on_them_and_the_full_rehearsal_gates():
    slow = data_wait(50, 100, 0.15)
    quick, full = gpu_check.speed(slow, QUICK), gpu_check.speed(slow, gpu_check.REHEARSAL)
    assert not quick.passed and quick.value == slow.value and "not gated" in quick.basis  # still reported as it is
    assert gpu_check.part_result([quick])["passed"] and not gpu_check.part_result([full])["passed"]
    assert not gpu_check.part_result([quick, replace(quick, gated=True)])["passed"]


def test_resumed_weights_within_the_noise_of_a_second_clean_run():
    clean = {"w": torch.ones(100), "n": torch.tensor(3)}
    same = {k: v.clone() for k, v in clean.items()}
    nudged = {"w": clean["w"] + 1e-7, "n": clean["n"]}
    assert weights_match(same, clean, same, 0.0).passed  # bitwise where the device is deterministic
    assert not weights_match(nudged, clean, same, 0.0).passed
    assert weights_match(nudged, clean, nudged, 0.0).passed  # a GPU's second clean run differs as much
    far = {"w": clean["w"] * 1.01, "n": clean["n"]}
    assert not weights_match(far, clean, nudged, 1e-4).passed


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
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--rehearse", "--quick", "--json", str(out),
                        *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "TMPDIR": str(tmp)})
    report = json.loads(out.read_text()) if out.exists() else None
    return r, report


def failing_gates(report) -> dict[str, list[str]]:
    return {name: [g["name"] for g in part["gates"] if not g["passed"]] + ([part["error"]] if "error" in part else [])
            for name, part in report["parts"].items() if not part["passed"]}


@pytest.mark.slow
def test_the_quick_rehearsal_runs_every_part_and_passes(tmp_path):
    r, report = rehearse(tmp_path)
    assert r.returncode == 0, (failing_gates(report) if report else None, r.stderr[-3000:])
    assert report["passed"] and report["rehearsal"] and set(report["parts"]) == set(gpu_check.PARTS)
    for part in report["parts"].values():
        assert part["passed"] and part["gates"]
    assert report["parts"]["ddp"]["processes"] == 2
    assert not list((tmp_path / "tmp").glob("iic_gpu_check_*"))  # its work folder is removed at the end
    names = " ".join(g["name"] for part in report["parts"].values() for g in part["gates"])
    for path in ("machine labels", "at 256/224", "at 292/256", "random_resized_crop", "uint8", "ensemble",
                 "px of the 224-px window", "crop sides", "tune: test resolution"):
        assert path in names, path  # every path the project ships has a gate
    assert all(g["basis"].split(":")[0] in ("exact", "measured", "design") for part in report["parts"].values()
               for g in part["gates"])
    assert set(report["gpu_estimate"]["seconds_by_part"]) == set(gpu_check.PARTS)


def test_labels_handed_over_with_the_wrong_images_fail_the_parity_part(tmp_path, monkeypatch):
    import dali_pipes.loader as loader
    multi_hot = loader.multi_hot
    monkeypatch.setattr(loader, "multi_hot", lambda padded, n: multi_hot(padded, n).roll(1, 0))  # a neighbour's
    report = gpu_check.run_check(QUICK, ("parity",), tmp_path / "r.json", tmp_path / "work")
    assert not report["passed"]
    assert "eval float32: images whose labels are their shard sample's" in failing_gates(report)["parity"]


# training programs with a known bug, run by the check in place of python -m training.train
FAULTY_TRAINING = {
    # resume restores everything but the pipeline's position
    "ignore-dali-checkpoint": ("resume", "weights: resumed vs uninterrupted (relative L2)", """
import training.train as training
resume_or_init = training.resume_or_init
training.resume_or_init = lambda *a, **kw: (resume_or_init(*a, **kw), None)[1]
"""),
    # ranks that train on their own: no gradient all-reduce, each replica goes its own way
    "no-gradient-all-reduce": ("ddp", "last epoch: val_gap of the ranks' replicas against one process on the saved "
                                      "weights (absolute difference)", """
import training.train as training
training.DistributedDataParallel = lambda net, **kw: net
"""),
    # the tune stage split over every process, as before the stages knew their processes
    "tune-on-every-rank": ("ddp", "tune: processes that trained it", """
import dataclasses
import training.train as training
import training.stages as stages
tune = stages.STAGES["tune"]
stages.STAGES["tune"] = lambda cfg, world, init=None: dataclasses.replace(tune(cfg, world, init), processes=world)
"""),
    # batches of another size every step (a ragged loader): a compiled model recompiles at every new shape
    "ragged-batches": ("compile", "recompilations over two epochs at two crop sides", """
import training.train as training
step, calls = training.training_step, [0]

def ragged(net, optimizer, scaler, loss_fn, inputs, targets, amp_dtype):
    calls[0] += 1
    k = len(inputs) - calls[0] % 3
    return step(net, optimizer, scaler, loss_fn, inputs[:k], targets[:k], amp_dtype)
training.training_step = ragged
"""),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(FAULTY_TRAINING))
def test_the_check_fails_on_a_faulty_training_program_with_the_gate_that_noticed(fault, tmp_path):
    part, gate, bug = FAULTY_TRAINING[fault]
    program = tmp_path / "faulty_training.py"
    program.write_text(bug + "import sys\ntraining.main(sys.argv[1:])\n")
    report = gpu_check.run_check(QUICK, (part,), tmp_path / "r.json", tmp_path / "work", train_program=(str(program),))
    assert not report["passed"] and gate in failing_gates(report)[part], report["parts"][part]


@pytest.mark.slow
def test_machine_labels_lost_on_the_way_fail_the_parity_part(tmp_path, monkeypatch):
    import dali_pipes.loader as loader
    monkeypatch.setattr(loader, "with_machine_labels", lambda targets, classes, confidences: targets)
    report = gpu_check.run_check(QUICK, ("parity",), tmp_path / "r.json", tmp_path / "work")
    assert failing_gates(report)["parity"] == [
        "train with machine labels: a pass's soft targets are the shards' labels and machine labels"]


def test_a_rehearsal_estimates_each_part_s_time_on_a_gpu_and_names_what_the_machine_lacks(monkeypatch):
    parts = {"parity": {"seconds": 40.0}, "throughput": {"seconds": 30.0}}
    estimate = gpu_check.gpu_estimate(parts)
    assert estimate["seconds_by_part"] == {"parity": 148.0, "throughput": 49.8} and estimate["total_seconds"] == 197.8
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)  # no compiler, no nvidia-smi
    monkeypatch.setenv("NVIDIA_DRIVER_CAPABILITIES", "compute,utility")
    lacks = gpu_check.machine_lacks("gpu", quick=False)
    assert [line.split(" ", 2)[:2] for line in lacks][:3] == [["nvidia-smi:", "the"], ["the", "'video'"],
                                                              ["a", "C"]]
    assert gpu_check.machine_lacks("cpu", quick=True) == []
