"""The recipe at several process counts, on the demo data: does N processes give what one process gives?

    python -m benchmarks.process_counts [--processes 1,4] [--resume 4,2] [--work DIR] [--json PATH]

Generates the demo data (default sizes) and builds its shards once, then for each count in ``--processes`` runs the
README's commands with ``demo/config.yaml`` under ``scripts/train.sh --nproc-per-node N``: the train stage, the
tune stage from its ``best.pt``, a stage-2 submission (one process) and its score; for every count after the first,
also the tune stage from the first count's train ``best.pt``, which compares the tune stages from the same start.
Each row: the train stage's last epoch (val GAP, loss, global batch, learning rate, wall time), the tune stage's
steps an epoch, its hold-out figures (the rule's F2 on the images that chose it, and cross-fitted) and the tuned
model's stage-2 F2. ``--resume A,B``: also a train run stopped after ``--resume-after`` epochs on A processes and
resumed on B, beside a run on B throughout: the epoch at which each first decays its learning rate (they must
agree). On a CPU the processes are gloo ranks sharing its cores: the figures are about the recipe, not about speed.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.harness import (demo_settings, fresh_scratch, metrics_epochs, parser, run, scratch_folder,
                                tune_figures, write_json)
from common.cli import command

MARKER = ".made_by_benchmarks.process_counts"


def counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give process counts of at least 1, separated by commas")
    return values


def first_decay(records: list[dict]) -> int | None:
    """The first epoch whose learning rate per image of the global batch is below the epoch before's (None: it
    never falls): a resumed run's change of global batch moves the rate, not this."""
    rates = [(r["epoch"], r["lr"] / r["global_batch"]) for r in records]
    return next((b for (_, x), (b, y) in zip(rates, rates[1:]) if y < x * 0.99), None)


def tuned(work: Path, out: Path, processes: int, init: Path | None = None) -> dict:
    """The tune stage under ``processes`` processes (from ``init``, else its own train stage's best.pt)."""
    run("training.train", *demo_settings(work, out), "--stage", "tune", *(["--init", str(init)] if init else []),
        processes=processes)
    tune, report = metrics_epochs(out / "tune"), json.loads((out / "tune" / "report.json").read_text())
    return {"tune_steps_per_epoch": sorted({r["steps"] for r in tune}),
            "tune_processes": len(tune[0]["samples_per_rank"]), "tune_best_epoch": report["best_epoch"],
            **tune_figures(work, out)}


def one_count(work: Path, processes: int, first: Path | None) -> dict:
    """Both stages under ``processes`` processes; and, with ``first`` (the first count's train best.pt), the tune
    stage again from it: the same start, so the two tune stages' figures compare the tune stage alone."""
    out = work / f"n{processes}"
    started = time.time()
    run("training.train", *demo_settings(work, out), "--stage", "train", processes=processes)
    train_seconds = time.time() - started
    records = metrics_epochs(out / "train")
    last = records[-1]
    row = {"processes": processes, "train_seconds": round(train_seconds), "train_val_gap": round(last["val_gap"], 4),
           "train_loss": round(last["loss"], 4), "train_global_batch": last["global_batch"],
           "train_lr_last_epoch": last["lr"], "train_first_decay_epoch": first_decay(records),
           **tuned(work, out, processes)}
    if first is not None:
        row["tune_from_first_count_train_checkpoint"] = tuned(work, work / f"n{processes}_same_start", processes,
                                                             first)
    return row


def resumed(work: Path, first: int, then: int, after: int) -> dict:
    """A train run stopped after ``after`` epochs on ``first`` processes and resumed on ``then``, and a run on
    ``then`` throughout."""
    out, alone = work / f"resume_{first}_{then}", work / f"throughout_{then}"
    run("training.train", *demo_settings(work, out, f"train.epochs={after}"), "--stage", "train", processes=first)
    run("training.train", *demo_settings(work, out), "--stage", "train", processes=then)
    run("training.train", *demo_settings(work, alone), "--stage", "train", processes=then)
    a, b = metrics_epochs(out / "train"), metrics_epochs(alone / "train")
    return {"stopped_after": after, "first": first, "then": then,
            "first_decay_epoch": {"resumed": first_decay(a), "throughout": first_decay(b)},
            "lr_by_epoch": {"resumed": [r["lr"] for r in a], "throughout": [r["lr"] for r in b]}}


@command
def main(argv=None):
    p = parser("benchmarks.process_counts", __doc__)
    p.add_argument("--processes", type=counts, default=[1, 4], help="process counts to compare (default 1,4)")
    p.add_argument("--resume", type=counts, default=None, metavar="A,B",
                   help="also stop a train run on A processes and resume it on B (e.g. 4,2)")
    p.add_argument("--resume-after", type=int, default=4, help="epochs before the stop (default 4)")
    p.add_argument("--work", type=scratch_folder(MARKER), default=Path("/tmp/iic_process_counts"),
                   help="scratch folder: new, empty, or one this benchmark made (it is emptied first)")
    args = p.parse_args(argv)
    if args.resume is not None and len(args.resume) != 2:
        p.error("--resume takes two counts, A,B")
    started = time.time()
    work = fresh_scratch(args.work, MARKER)
    print("demo data and shards ...", flush=True)
    run("demo.data", str(work / "data"))
    run("preprocessing.build_shards", *demo_settings(work, work))
    result = {"rows": []}
    for k, n in enumerate(args.processes):
        print(f"{n} process(es): train, tune, submit ...", flush=True)
        first = work / f"n{args.processes[0]}" / "train" / "checkpoints" / "best.pt" if k else None
        result["rows"].append(one_count(work, n, first))
        print(result["rows"][-1], flush=True)
        write_json(args.json, result)
    if args.resume:
        print(f"train on {args.resume[0]}, resumed on {args.resume[1]} ...", flush=True)
        result["resume"] = resumed(work, *args.resume, args.resume_after)
        print(result["resume"], flush=True)
    result["seconds"] = round(time.time() - started)
    print("\n| processes | train global batch | train val GAP | tune steps/epoch | tune hold-out F2 "
          "(in-sample / cross-fitted) | stage-2 F2 | stage-2 F2, tuned from the first count's train checkpoint |\n"
          "|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        same = r.get("tune_from_first_count_train_checkpoint")
        last = f"{same['stage2_f2']:.3f}" if same else "(the start)"
        print(f"| {r['processes']} | {r['train_global_batch']} | {r['train_val_gap']:.3f} | "
              f"{r['tune_steps_per_epoch']} | {r['tune_holdout_f2_in_sample']:.3f} / "
              f"{r['tune_holdout_f2_cross_fitted']:.3f} | {r['stage2_f2']:.3f} | {last} |")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
