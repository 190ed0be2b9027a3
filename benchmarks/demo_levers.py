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
import time
from pathlib import Path

from benchmarks.harness import (DEMO_CONFIG, demo_settings as settings, fresh_scratch, parser, run, scratch_folder,
                                stage2_f2, write_json)
from common.cli import command
from common.config import load_config
from common.errors import UserError

CONFIG = DEMO_CONFIG
RESOLUTIONS = [[64, 56], [73, 64], [82, 72]]
MARKER = ".made_by_benchmarks.demo_levers"


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
    p.add_argument("--work", type=scratch_folder(MARKER), default=Path("/tmp/iic_demo_levers"),
                   help="scratch folder: new, empty, or one this benchmark made (it is emptied first)")
    p.add_argument("--resolutions", type=resolutions, default=RESOLUTIONS,
                   help=f"the test resolutions to choose among, as JSON (default {json.dumps(RESOLUTIONS)})")
    args = p.parse_args(argv)
    started = time.time()
    fresh_scratch(args.work, MARKER)
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
            plain = json.loads((tuned / "tune" / "report.json").read_text())
            # run again with candidates: the finished stage only chooses its test resolution (on best.pt)
            run("training.train", *settings(args.work, tuned, *tune, f"tune.test_resolutions={json.dumps(args.resolutions)}"),
                "--stage", "tune")
            chosen = json.loads((tuned / "tune" / "report.json").read_text())
            for resolution in (False, True):
                checkpoint = best if resolution else as_trained
                report = chosen if resolution else plain  # the rule its checkpoint holds, and its figures
                rule = report["rule"]
                holdout = report["f2_cross_fitted"]  # not the F2 of the images that chose
                rows.append({"machine_labels": machine, "unseen_class_threshold": unseen,
                             "test_resolution": resolution, "holdout_f2": round(holdout, 4),
                             "stage2_f2": round(stage2_f2(args.work, tuned, checkpoint,
                                                          f"data.machine_labels={str(machine).lower()}"), 4),
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
