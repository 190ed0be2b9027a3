"""The top teams' three levers on the demo data: stage-2 F2 of the tuned model with each off and on.

    python -m benchmarks.demo_levers [--work DIR] [--json PATH]

Generates the demo data (``demo.data``, machine labels included), builds its shards once with the machine
labels (a run without them reads the same shards without them), and runs the demo's own commands with
``demo/config.yaml``: the train stage without and with machine labels (``data.machine_labels``, soft
targets); from each, the tune stage without and with the threshold for the classes the tuning labels never
show (``tune.unseen_class_threshold``); each tuned ``best.pt`` is then submitted as it is and again after the
tune stage chose a test resolution among ``--resolutions`` on the hold-out's full-size originals
(``tune.test_resolutions``, the demo's 64/56 scaled as 256/224, 292/256 and 329/288 are). Every choice is made
on the tune stage's hold-out; stage 2 only scores. Eight rows, each with its hold-out F2 and its stage-2 F2.
One training seed: on the demo's 500 stage-2 images, differences of a point or two are within noise.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import parser, write_json
from common.cli import command
from common.config import load_config
from common.errors import UserError
from model.checkpoint import load_checkpoint

CONFIG = Path(__file__).resolve().parent.parent / "demo" / "config.yaml"
RESOLUTIONS = [[64, 56], [73, 64], [82, 72]]


def run(module: str, *args: str) -> str:
    """One of the project's commands, as the demo runs it; its stdout."""
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"python -m {module} {' '.join(args)} failed: {out.stderr.strip().splitlines()[-1:]}")
    return out.stdout


def settings(work: Path, artifacts: Path, *extra: str) -> list[str]:
    paths = {"original_images": work / "data" / "original_images", "competition_data": work / "data" / "inclusive",
             "shards": work / "shards", "artifacts": artifacts, "output": artifacts / "output"}
    return ["--config", str(CONFIG), *[a for k, v in paths.items() for a in ("--set", f"paths.{k}={v}")],
            *[a for e in extra for a in ("--set", e)]]


def stage2_f2(work: Path, artifacts: Path, checkpoint: Path, machine: bool) -> float:
    run("inference.submit", *settings(work, artifacts, f"data.machine_labels={str(machine).lower()}"), "--stage", "2",
        "--checkpoint", str(checkpoint))
    out = run("inference.score", str(artifacts / "output" / "submission_stage2.csv"),
              str(work / "data" / "inclusive" / "stage_2_solution.csv"))
    return float(out.split()[2])


MARKER = ".made_by_benchmarks.demo_levers"


def scratch_folder(text: str) -> Path:
    """A folder this benchmark may empty: never one that holds anything else."""
    path = Path(text)
    if path.exists() and any(path.iterdir()) and not (path / MARKER).exists():
        raise argparse.ArgumentTypeError(f"{path} holds files this benchmark did not make; it would empty it: "
                                         "name a new or empty folder")
    return path


def resolutions(text: str) -> list:
    try:
        value = json.loads(text)
        load_config(CONFIG, [f"tune.test_resolutions={json.dumps(value)}"])
    except (ValueError, UserError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return value


@command
def main(argv=None):
    p = parser("benchmarks.demo_levers", __doc__)
    p.add_argument("--work", type=scratch_folder, default=Path("/tmp/iic_demo_levers"),
                   help="scratch folder: new, empty, or one this benchmark made (it is emptied first)")
    p.add_argument("--resolutions", type=resolutions, default=RESOLUTIONS,
                   help=f"the test resolutions to choose among, as JSON (default {json.dumps(RESOLUTIONS)})")
    args = p.parse_args(argv)
    started = time.time()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    (args.work / MARKER).touch()
    print("demo data and shards (with machine labels) ...", flush=True)
    run("demo.data", str(args.work / "data"))
    run("preprocessing.build_shards", *settings(args.work, args.work / "m1", "data.machine_labels=true"))
    rows = []
    for machine in (False, True):
        m = f"machine_labels={str(machine).lower()}"
        train_dir = args.work / f"m{int(machine)}"
        print(f"train stage, {m} ...", flush=True)
        run("training.train", *settings(args.work, train_dir, f"data.{m}"), "--stage", "train")
        for unseen in (False, True):
            tuned = args.work / f"m{int(machine)}u{int(unseen)}"
            tune = [f"data.{m}", f"tune.unseen_class_threshold={str(unseen).lower()}"]
            print(f"tune stage, {m}, unseen_class_threshold={unseen} ...", flush=True)
            run("training.train", *settings(args.work, tuned, *tune), "--stage", "tune",
                "--init", str(train_dir / "train" / "checkpoints" / "best.pt"))
            best = tuned / "tune" / "checkpoints" / "best.pt"
            as_trained = best.with_name("best_training_resolution.pt")
            shutil.copy(best, as_trained)
            # run again with candidates: the finished stage only chooses its test resolution (on best.pt)
            run("training.train", *settings(args.work, tuned, *tune, f"tune.test_resolutions={json.dumps(args.resolutions)}"),
                "--stage", "tune")
            chosen = json.loads((tuned / "tune" / "test_resolutions.json").read_text())
            for resolution in (False, True):
                checkpoint = best if resolution else as_trained
                state = load_checkpoint(checkpoint)
                rule = state["decision_rule"]
                holdout = (max(c["f2"] for c in chosen["candidates"]) if resolution else state["metric"])
                rows.append({"machine_labels": machine, "unseen_class_threshold": unseen,
                             "test_resolution": resolution, "holdout_f2": round(holdout, 4),
                             "stage2_f2": round(stage2_f2(args.work, tuned, checkpoint, machine), 4),
                             "chosen_resolution": rule.get("test_resolution"),
                             "unseen_threshold": rule.get("unseen_threshold"),
                             "candidates": chosen["candidates"] if resolution else None})
                print(rows[-1], flush=True)
    print("\n| machine labels | unseen-class threshold | test resolution | hold-out F2 | stage-2 F2 |")
    print("|---|---|---|---|---|")
    for r in rows:
        res = f"on ({r['chosen_resolution'][0]}/{r['chosen_resolution'][1]})" if r["test_resolution"] else "off"
        unseen = f"on ({r['unseen_threshold']})" if r["unseen_threshold"] is not None else (
            "on (none chosen)" if r["unseen_class_threshold"] else "off")
        print(f"| {'on' if r['machine_labels'] else 'off'} | {unseen} | {res} | {r['holdout_f2']:.3f} | "
              f"{r['stage2_f2']:.3f} |")
    print(f"took {time.time() - started:.0f} s")
    write_json(args.json, {"rows": rows, "resolutions": args.resolutions, "seconds": round(time.time() - started)})


if __name__ == "__main__":
    main()
