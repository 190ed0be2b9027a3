"""What a new user hit (issue 16): settings the data cannot satisfy, damaged shards DALI does not name, threads
that fight, paths that cannot be used, many processes; each is one line and exit code 2, before any long work."""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from common.config import OLD_KEYS, load_config
import common.threads as threads
from common.threads import apply_thread_budget, thread_budget, usable_cores
from inference.score import main as score_main
from inference.submit import main as submit_main
from model.checkpoint import save_checkpoint
from model.network import create_model
from preprocessing.build_shards import main as build_main
from preprocessing.verify import main as verify_main
from tests.fixtures import REPO, SMALL_SHARDS, run_main, write_config
from training.train import main as train_main

FAST = "train:\n  batch_size: 8\n  epochs: 1\n"


@pytest.fixture
def cfg_path(built, kaggle, tmp_path):
    cfg, _ = built
    return write_config(tmp_path / "c.yaml", kaggle[0], cfg.paths.shards, FAST, artifacts=tmp_path / "artifacts",
                        output=tmp_path / "out")


def one_error(code, err) -> str:
    errors = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: "), (code, err[-2000:])
    assert "Traceback" not in err
    return errors[0]


@pytest.mark.parametrize("sets, words", [
    (["pipeline.crop_size=72"], "pipeline.crop_size=72 does not fit in the images, whose short side is 64"),
    (["data.shortest_side=48"], "were built with data.shortest_side=64, the config says 48"),
    (["data.shortest_side=96", "pipeline.crop_size=80"], "were built with data.shortest_side=64, the config says 96"),
])
def test_settings_the_shards_cannot_satisfy_stop_training_before_any_work(cfg_path, capsys, sets, words):
    args = ["--config", str(cfg_path), "--stage", "train"] + [a for s in sets for a in ("--set", s)]
    line = one_error(*run_main(train_main, args, capsys)[::2])
    assert words in line
    assert not (cfg_path.parent / "artifacts" / "train" / "checkpoints").exists()


def test_a_crop_larger_than_the_test_images_stops_submit_before_screening(cfg_path, built, capsys, tmp_path):
    cfg, _ = built
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, {"model": create_model("test_resnet", 3).state_dict(), "model_name": "test_resnet",
                           "classes": ["a", "b", "c"]})
    code, out, err = run_main(submit_main, ["--config", str(cfg_path), "--stage", "2", "--checkpoint", str(ckpt),
                                            "--set", "pipeline.crop_size=72"], capsys)
    assert "does not fit in the test images" in one_error(code, err)
    assert "checking images" not in out + err


def damage_jpeg_header(tar_path: Path) -> None:
    """200 random bytes over the start of the 3rd image: DALI's error then names no sample."""
    with tarfile.open(tar_path) as tar:
        images = [m for m in tar if m.name.endswith(".jpg")]
        member = images[min(2, len(images) - 1)]
    with open(tar_path, "r+b") as f:
        f.seek(member.offset_data)
        f.write(os.urandom(200))


def test_a_damage_dali_does_not_locate_still_names_the_shards_and_the_cure(built, built_copy, kaggle, tmp_path,
                                                                            capsys):
    shards, manifest = built_copy
    # the config names the good shards; the damaged copy comes in by --set, which the repair command must repeat
    cfg_path = write_config(tmp_path / "c.yaml", kaggle[0], built[0].paths.shards, FAST + SMALL_SHARDS,
                            artifacts=tmp_path / "artifacts")
    copy = ["--set", f"paths.shards={shards}"]
    assert run_main(train_main, ["--config", str(cfg_path), "--stage", "train", *copy], capsys)[0] == 0
    last = tmp_path / "artifacts" / "train" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    for tar in sorted(shards.glob("train-*.tar")):
        damage_jpeg_header(tar)
    code, _, err = run_main(train_main, ["--config", str(cfg_path), "--stage", "train", *copy,
                                         "--set", "train.epochs=2"], capsys)
    line = one_error(code, err)
    assert line.startswith("error: DALI could not read the shards (") and f"in {shards}" in line
    repair = f"python -m preprocessing.verify --config {cfg_path} --set paths.shards={shards} --set train.epochs=2 --repair"
    assert repair in line
    assert last.read_bytes() == before  # the last good checkpoint as it was
    assert run_main(verify_main, repair.split()[3:], capsys)[0] == 0  # the command as given repairs the copy
    assert run_main(train_main, ["--config", str(cfg_path), "--stage", "train", *copy,
                                 "--set", "train.epochs=2"], capsys)[0] == 0


def test_the_thread_budget_never_gives_the_libraries_more_threads_than_cores(monkeypatch):
    assert thread_budget(4, on_gpu=False, cores=2) == thread_budget(1, on_gpu=False, cores=2)
    for cores in (1, 2, 3, 8, 16):
        b = thread_budget(4, on_gpu=False, cores=cores)
        assert b.dali + b.torch == max(2, cores) and b.dali <= 4 and b.opencv == 1
        g = thread_budget(4, on_gpu=True, cores=cores)  # DALI's pipeline pool and its mixed decoder's pool
        assert g.dali == max(1, min(4, (cores - 1) // 2)) and 2 * g.dali + g.torch <= max(3, cores)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})  # taskset / a container's limit
    monkeypatch.setattr(threads, "cgroup_quota", lambda: None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this machine share its cores
    assert usable_cores() == 3
    torch_threads = torch.get_num_threads()
    try:
        assert apply_thread_budget(4, on_gpu=False).torch == torch.get_num_threads() == 2
        monkeypatch.setenv("IIC_THREAD_BUDGET", "off")
        assert apply_thread_budget(4, on_gpu=False) is None
    finally:
        torch.set_num_threads(torch_threads)


def test_an_output_folder_that_cannot_be_used_stops_submit_in_one_line(cfg_path, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, {"model": create_model("test_resnet", 3).state_dict(), "model_name": "test_resnet",
                           "classes": ["a", "b", "c"]})
    base = ["--config", str(cfg_path), "--stage", "2", "--checkpoint", str(ckpt)]
    line = one_error(*run_main(submit_main, base + ["--set", f"paths.output={blocker}"], capsys)[::2])
    assert line == f"error: paths.output {blocker} is a file; it must be a folder"
    line = one_error(*run_main(submit_main, base + ["--set", f"paths.output={blocker}/sub"], capsys)[::2])
    assert line == f"error: paths.output {blocker}/sub cannot be made: {blocker} is a file; it must be a folder"
    line = one_error(*run_main(submit_main, ["--config", str(cfg_path), "--stage", "2", "--checkpoint",
                                             str(tmp_path)], capsys)[::2])
    assert line == f"error: --checkpoint {tmp_path} is a folder; it must be a file"
    line = one_error(*run_main(submit_main, base + ["--save-scores", str(tmp_path)], capsys)[::2])
    assert line == f"error: --save-scores {tmp_path} is a folder; it must be a file"


def test_folders_that_cannot_be_used_stop_training_build_and_verify(cfg_path, tmp_path, tmpfs, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = one_error(*run_main(train_main, ["--config", str(cfg_path), "--stage", "train",
                                            "--set", f"paths.artifacts={blocker}/run"], capsys)[::2])
    assert line == f"error: paths.artifacts {blocker}/run cannot be made: {blocker} is a file; it must be a folder"
    line = one_error(*run_main(train_main, ["--config", str(cfg_path), "--stage", "train",
                                            "--set", f"paths.shards={blocker}"], capsys)[::2])
    assert line == f"error: paths.shards {blocker} is a file; it must be a folder"
    line = one_error(*run_main(verify_main, ["--config", str(cfg_path), "--set", f"paths.shards={tmp_path}/none"],
                               capsys)[::2])
    assert line == f"error: paths.shards {tmp_path}/none does not exist"
    read_only = tmpfs("1M", read_only=True)
    line = one_error(*run_main(build_main, ["--config", str(cfg_path), "--set", f"paths.shards={read_only}/s"],
                               capsys)[::2])
    assert line == f"error: paths.shards {read_only}/s cannot be created: the file system is read-only"
    line = one_error(*run_main(train_main, ["--config", str(cfg_path), "--stage", "tune", "--init",
                                            str(tmp_path / "missing.pt")], capsys)[::2])
    assert line == f"error: --init {tmp_path / 'missing.pt'} does not exist"


@pytest.mark.slow
def test_under_train_sh_an_error_is_one_line_once_and_relative_paths_are_the_callers(cfg_path, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run(["bash", str(REPO / "scripts" / "train.sh"), "--nproc-per-node", "2", "--",
                        "--config", os.path.relpath(cfg_path, elsewhere), "--stage", "train",
                        "--set", "train.epocs=1"], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown config key 'train.epocs' in --set"  # found the config, one line


def test_scoring_with_the_files_swapped_is_refused(tmp_path, capsys):
    submission = tmp_path / "submission.csv"
    submission.write_text("image_id,labels\n" + "".join(f"img{i},/m/a /m/b\n" for i in range(10)))
    holdout = tmp_path / "holdout.csv"
    holdout.write_text("img1,/m/a\nimg2,/m/b\n")
    assert run_main(score_main, [str(submission), str(holdout)], capsys)[0] == 0
    line = one_error(*run_main(score_main, [str(holdout), str(submission)], capsys)[::2])
    assert "look swapped" in line and "python -m inference.score SUBMISSION SOLUTION" in line
    tuning = tmp_path / "tuning_labels.csv"  # 8 of the 10 images, headerless as Kaggle's file
    tuning.write_text("".join(f"img{i},/m/a\n" for i in range(8)))
    assert run_main(score_main, [str(submission), str(tuning)], capsys)[0] == 0
    assert "look swapped" in one_error(*run_main(score_main, [str(tuning), str(submission)], capsys)[::2])
    other_stage = tmp_path / "stage_2_solution.csv"
    other_stage.write_text("image_id,labels\n" + "".join(f"other{i},/m/a\n" for i in range(10)))
    assert "same stage" in one_error(*run_main(score_main, [str(submission), str(other_stage)], capsys)[::2])


def test_the_tune_stage_writes_its_hold_out_labels_to_score_on(built, kaggle, tmp_path):
    from common.shard_format import decode_meta, iter_samples
    from training.train import train
    cfg, _ = built
    path = write_config(tmp_path / "c.yaml", kaggle[0], cfg.paths.shards, FAST + "tune:\n  epochs: 1\n  batch_size: 4\n",
                        artifacts=tmp_path / "a")
    train(load_config(path), "train")
    train(load_config(path), "tune")
    data = tmp_path / "a" / "tune" / "data"
    rows = [line.split(",") for line in (data / "holdout_labels.csv").read_text().splitlines()]
    held = {decode_meta(f["json"])["image_id"] for _, f in iter_samples(data / "holdout-000000.tar")}
    fit = {decode_meta(f["json"])["image_id"] for _, f in iter_samples(data / "fit-000000.tar")}
    assert {r[0] for r in rows} == held and not held & fit and all(r[1].strip() for r in rows)


@pytest.mark.parametrize("module", ["training.train", "inference.submit", "inference.score", "preprocessing.verify",
                                    "preprocessing.build_shards", "demo.data"])
def test_no_help_text_names_a_moved_key(module, capsys):
    main = __import__(module, fromlist=["main"]).main
    code, out, _ = run_main(main, ["--help"], capsys)
    assert code == 0 and out
    assert not [old for old in OLD_KEYS if old in out]


def test_train_sh_keeps_torchrun_s_restart_lines_and_a_rank_s_error_is_one_line(tmp_path):
    r = subprocess.run(["bash", "scripts/train.sh", "--nproc-per-node", "1", "--max-restarts", "1", "--",
                        "--config", str(tmp_path / "missing.yaml"), "--stage", "train"], cwd=REPO,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[-1] == f"error: config file not found: {tmp_path / 'missing.yaml'}", r.stderr
    assert len([line for line in lines if "error:" in line]) == 1 and "Traceback" not in r.stderr
    assert any("attempts left; will restart worker group" in line for line in lines), r.stderr  # torchrun's own
    assert not any("failed (exitcode" in line for line in lines)  # said better by the rank's one line


def processes_with(text: str) -> list[int]:
    """The pids of the processes whose command line holds ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


@pytest.mark.slow
def test_the_ranks_stop_with_their_launcher_interrupted_or_killed(built, kaggle, tmp_path):
    """Ctrl-C: one line, exit 130. kill -9 of the launcher alone: its ranks end too, rather than go on writing the
    run's folder beside the next run."""
    import signal
    import time
    cfg, _ = built
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for how in ("interrupt", "kill"):
        path = write_config(tmp_path / f"{how}.yaml", kaggle[0], cfg.paths.shards,
                            "train:\n  epochs: 500\n  batch_size: 8\n", artifacts=tmp_path / how)
        launcher = subprocess.Popen(["bash", "scripts/train.sh", "--nproc-per-node", "2", "--", "--config", str(path),
                                     "--stage", "train"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        metrics = tmp_path / how / "train" / "metrics.jsonl"
        deadline = time.time() + 120
        while not metrics.exists() and launcher.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert launcher.poll() is None and len(processes_with(str(path))) >= 3  # the launcher and two ranks
        launcher.send_signal(signal.SIGINT if how == "interrupt" else signal.SIGKILL)
        _, err = launcher.communicate(timeout=120)
        if how == "interrupt":
            assert launcher.returncode == 130, err[-2000:]
            assert [line for line in err.splitlines() if "error:" in line] == ["error: interrupted"], err[-2000:]
            assert "Traceback" not in err
        deadline = time.time() + 60
        while processes_with(str(path)) and time.time() < deadline:
            time.sleep(0.2)
        assert processes_with(str(path)) == [], how
