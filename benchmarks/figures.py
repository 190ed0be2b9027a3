"""Writes the throughput figures into README.md and docs/BENCHMARKS.md from the benchmark's JSON, so that the
figures the docs quote are the measured ones, never copied by hand.

    python -m benchmarks.throughput --json run1.json       # as many back-to-back runs as wanted
    python -m benchmarks.figures --runs run1.json run2.json run3.json   # stores them in docs/benchmark_cpu_runs.json
    python -m benchmarks.figures            # (re)writes the docs' figure blocks from docs/benchmark_cpu_runs.json
    python -m benchmarks.figures --check    # exit 1 if a block differs from what the JSON says (the test suite)

A figure block is the text between ``<!-- figures:NAME -->`` and ``<!-- /figures -->``; everything outside the
blocks is left alone. The run shown in full is the one with the median headline ratio (train loader / baseline);
the repeat table gives every run's headline ratio and its distance from their median.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from benchmarks.harness import REPO

RUNS = REPO / "docs" / "benchmark_cpu_runs.json"
DOCS = (REPO / "README.md", REPO / "docs" / "BENCHMARKS.md")
BLOCK = re.compile(r"(<!-- figures:(\w+) -->\n)(.*?)(<!-- /figures -->)", re.DOTALL)
HEADLINE = "dali_train_vs_baseline"
ROWS = (("decode_ceiling", "(1) decode-only ceiling (DALI read + full decode)"),
        ("dali_train_pipeline", "DALI train graph alone (`pipe.run()`: crops and flip coins, no hand-over)"),
        ("dali_train", "(2) DALI train loader, as training receives it (mirrored uint8 crops)"),
        ("dali_train_float32", "DALI train loader with float32 normalised (and flipped) in DALI"),
        ("baseline", "(3) baseline: DataLoader + PIL + torchvision, as many workers as DALI threads"),
        ("dali_eval", "(4) DALI eval loader (centre crop)"),
        ("train_steps_dali", "(5) training steps fed by DALI"),
        ("train_steps_baseline", "(5) training steps fed by the baseline"))


def rate(r: dict) -> str:
    return f"{r['images_per_s']:,.0f} ({r['min']:,.0f} to {r['max']:,.0f})"


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["ratios"][HEADLINE])[(len(runs) - 1) // 2]


def throughput_table(runs: list[dict]) -> str:
    run = median_run(runs)
    ratios, setup = run["ratios"], run["setup"]
    notes = {"dali_train_pipeline": f" ({ratios['dali_train_pipeline_vs_decode_ceiling']:.2f} of ceiling)",
             "dali_train": f" ({ratios['dali_train_vs_pipeline']:.2f} of the graph, "
                           f"{ratios['dali_train_vs_decode_ceiling']:.2f} of ceiling, "
                           f"**{ratios[HEADLINE]:.2f}x** baseline"
                           + (f": the pair measured on its own, loader {run['headline_dali_train']['images_per_s']:,.0f} "
                              f"against {run['baseline']['images_per_s']:,.0f}, the median of the paired windows' ratios"
                              if "headline_dali_train" in run else "") + ")"}
    lines = [f"Run shown: the median of {len(runs)} back-to-back runs by the headline ratio; batch "
             f"{setup['batch_size']}, {setup['threads']} DALI threads = {setup['threads']} baseline workers, "
             f"{setup['images']:,} images, {setup['windows']} windows of at least {setup['window_s']:g} s per figure"
             + (f" ({setup['headline_windows']} for the headline pair, the train loader and the baseline, measured "
                "on their own)" if "headline_windows" in setup else "") + ".",
             "", "| measure | images/s: median (min to max of the windows) |", "| --- | --- |"]
    lines += [f"| {label} | {rate(run[key])}{notes.get(key, '')} |" for key, label in ROWS if key in run]
    headline = [r["ratios"][HEADLINE] for r in runs]
    middle = statistics.median(headline)
    lines += ["", "| run | train loader / baseline | from the median | loader / ceiling | loader / graph |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {i} | {r['ratios'][HEADLINE]:.2f}x | {100 * (r['ratios'][HEADLINE] / middle - 1):+.1f}% | "
              f"{r['ratios']['dali_train_vs_decode_ceiling']:.2f} | {r['ratios']['dali_train_vs_pipeline']:.2f} |"
              for i, r in enumerate(runs, 1)]
    worst = max(abs(h / middle - 1) for h in headline)
    lines += ["", f"Every run within {100 * worst:.1f}% of the median headline ratio ({middle:.2f}x)."]
    return "\n".join(lines) + "\n"


def readme_summary(runs: list[dict]) -> str:
    run = median_run(runs)
    ratios = run["ratios"]
    headline = [r["ratios"][HEADLINE] for r in runs]
    loader = run.get("headline_dali_train", run["dali_train"])  # the rate the headline ratio was measured with
    return (f"On the 2-core CPU box, the DALI train loader delivers {loader['images_per_s']:,.0f} "
            f"images/s, {ratios[HEADLINE]:.2f}x the original DataLoader ({run['baseline']['images_per_s']:,.0f} "
            f"images/s, measured as a pair), {ratios['dali_train_vs_pipeline']:.2f} of the bare train graph and "
            f"{ratios['dali_train_vs_decode_ceiling']:.2f} of the decode-only ceiling "
            f"({run['decode_ceiling']['images_per_s']:,.0f} images/s): the median of {len(runs)} back-to-back "
            f"runs, whose headline ratios were {', '.join(f'{h:.2f}x' for h in headline)}"
            + " (docs/BENCHMARKS.md; written by python -m benchmarks.figures).\n")


# block name -> (the JSON it is written from, its renderer)
RENDERERS = {"throughput_cpu": throughput_table, "throughput_summary": readme_summary}


def rewrite(text: str, runs: list[dict]) -> str:
    def block(m: re.Match) -> str:
        if m.group(2) not in RENDERERS:
            raise SystemExit(f"error: unknown figure block '{m.group(2)}' (known: {', '.join(RENDERERS)})")
        return m.group(1) + RENDERERS[m.group(2)](runs) + m.group(4)
    return BLOCK.sub(block, text)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.figures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=Path, help="benchmarks.throughput JSON files to store first")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is out of date")
    parser.add_argument("--store", type=Path, default=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--docs", nargs="+", type=Path, default=DOCS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        if args.runs:
            runs = [json.loads(p.read_text()) for p in args.runs]
            args.store.write_text(json.dumps(runs, indent=1) + "\n")
        runs = json.loads(args.store.read_text())
        stale = []
        for doc in args.docs:
            text = doc.read_text()
            new = rewrite(text, runs)
            if new != text:
                stale.append(str(doc))
                if not args.check:
                    doc.write_text(new)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check and stale:
        print(f"error: figures out of date in {', '.join(stale)}: run python -m benchmarks.figures",
              file=sys.stderr)
        return 1
    print("figures " + ("checked" if args.check else "written") + f" from {args.store}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
