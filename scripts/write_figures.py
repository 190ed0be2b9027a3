#!/usr/bin/env python3
"""Writes the throughput figures into README.md and docs/BENCHMARKS.md from the benchmarks' JSON, so that the
figures the docs quote are the measured ones, never copied by hand.

    python scripts/benchmark_throughput.py --json run1.json   # as many back-to-back runs as wanted
    python scripts/write_figures.py --runs run1.json run2.json run3.json   # stores them in docs/benchmark_cpu_runs.json
    python scripts/write_figures.py            # (re)writes the docs' figure blocks from docs/benchmark_cpu_runs.json
    python scripts/write_figures.py --check    # exit 1 if a block differs from what the JSON says (the test suite)
    python scripts/benchmark_handover.py --json docs/benchmark_handover.json   # then write_figures.py again

A figure block is the text between ``<!-- figures:NAME -->`` and ``<!-- /figures -->``; everything outside the
blocks is left alone. The run shown in full is the one with the median headline ratio (train loader / baseline);
the repeat table gives every run's headline ratio and its distance from their median (issue 17: within +-10%).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNS = REPO / "docs" / "benchmark_cpu_runs.json"
HANDOVER = REPO / "docs" / "benchmark_handover.json"
DOCS = (REPO / "README.md", REPO / "docs" / "BENCHMARKS.md")
BLOCK = re.compile(r"(<!-- figures:(\w+) -->\n)(.*?)(<!-- /figures -->)", re.DOTALL)
HEADLINE = "dali_train_vs_baseline"
ROWS = (("decode_ceiling", "(1) decode-only ceiling (DALI read + full decode)"),
        ("dali_train_pipeline", "DALI train graph alone (`pipe.run()`: crops and flip coins, no hand-over)"),
        ("dali_train", "(2) DALI train loader, as training receives it (mirrored uint8 crops)"),
        ("dali_train_float32", "DALI train loader with float32 normalised (and flipped) in DALI"),
        ("baseline", "(3) baseline: DataLoader + PIL + torchvision, as many workers as DALI threads"),
        ("dali_eval", "(4) DALI eval loader (centre crop)"),
        ("decode_ceiling_spare_core", "(1') decode-only ceiling with one DALI thread fewer (a core for the consumer)"),
        ("dali_train_pipeline_spare_core", "DALI train graph alone, one DALI thread fewer"),
        ("dali_train_spare_core", "(2') DALI train loader, one DALI thread fewer: the hand-over with a core of its own"),
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
    if "dali_train_vs_pipeline_spare_core" in ratios:
        notes["dali_train_spare_core"] = (f" ({ratios['dali_train_vs_pipeline_spare_core']:.2f} of the graph, "
                                          f"{ratios['dali_train_vs_decode_ceiling_spare_core']:.2f} of ceiling)")
    lines = [f"Run shown: the median of {len(runs)} back-to-back runs by the headline ratio; batch "
             f"{setup['batch_size']}, {setup['threads']} DALI threads = {setup['threads']} baseline workers, "
             f"{setup['images']:,} images, {setup['windows']} windows of at least {setup['window_s']:g} s per figure"
             + (f" ({setup['headline_windows']} for the headline pair, the train loader and the baseline, measured "
                "on their own)" if "headline_windows" in setup else "") + ".",
             "", "| measure | images/s: median (min to max of the windows) |", "| --- | --- |"]
    lines += [f"| {label} | {rate(run[key])}{notes.get(key, '')} |" for key, label in ROWS if key in run]
    headline = [r["ratios"][HEADLINE] for r in runs]
    middle = statistics.median(headline)
    def spare(r: dict, key: str) -> str:
        value = r["ratios"].get(f"{key}_spare_core")
        return "-" if value is None else f"{value:.2f}"
    def others(r: dict) -> str:  # the worst window of any figure (scripts/timing.py), where recorded
        cores = [v["other_processes_cores"] for v in r.values() if isinstance(v, dict) and "other_processes_cores" in v]
        return f"{max(cores):.2f}" if cores else "-"
    lines += ["", "| run | train loader / baseline | from the median | loader / ceiling | loader / graph | "
              "with a core for the consumer: loader / ceiling | loader / graph | other processes (cores, worst window) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {i} | {r['ratios'][HEADLINE]:.2f}x | {100 * (r['ratios'][HEADLINE] / middle - 1):+.1f}% | "
              f"{r['ratios']['dali_train_vs_decode_ceiling']:.2f} | {r['ratios']['dali_train_vs_pipeline']:.2f} | "
              f"{spare(r, 'dali_train_vs_decode_ceiling')} | {spare(r, 'dali_train_vs_pipeline')} | {others(r)} |"
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
            + (f". With one DALI thread fewer, so that the consumer has a core of its own as in training, the "
               f"loader keeps {ratios['dali_train_vs_pipeline_spare_core']:.2f} of its graph's rate and "
               f"{ratios['dali_train_vs_decode_ceiling_spare_core']:.2f} of the ceiling"
               if "dali_train_vs_pipeline_spare_core" in ratios else "")
            + " (docs/BENCHMARKS.md; written by scripts/write_figures.py).\n")


HANDOVER_ROWS = (("dali_train_pipeline", "train graph alone (`pipe.run()`, outputs dropped)"),
                 ("dali_train_pipeline_held", "the graph, each batch held as torch tensors until the next"),
                 ("dali_train", "train loader (iterator, mirror, multi-hot targets)"))


def handover_table(result: dict) -> str:
    """Per-thread CPU of graph, held graph and loader, with DALI on every core and with a core to spare."""
    setup, streams = result["setup"], result["streams"]
    lines = [f"Batch {setup['batch_size']}, {setup['images']:,} train images, medians of {setup['windows']} windows "
             f"of at least {setup['window_s']:g} s, streams in turn, a new instance each window; CPU in ms per batch; "
             "\"of the graph\": the ratio of the medians"
             + (f"; other processes took at most {max(v['other_processes_cores'] for v in streams.values()):.2f} of "
                "a core in any window" if all("other_processes_cores" in v for v in streams.values()) else "")
             + ".",
             "", "| DALI threads | stream | images/s | of the graph | wall | DALI's CPU (workers + executor) | "
             "consumer's CPU | DALI busy |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for suffix in ("", "_spare_core"):
        graph = streams.get("dali_train_pipeline" + suffix)
        for key, label in HANDOVER_ROWS:
            s = streams.get(key + suffix)
            if s is None or graph is None:
                continue
            cpu = s["cpu_ms_per_batch"]
            threads = f"{s['dali_threads']}" + (" (a core for the consumer)" if suffix else "")
            lines.append(f"| {threads} | {label} | {s['images_per_s']:,.0f} | "
                         f"{s['images_per_s'] / graph['images_per_s']:.2f} | {s['wall_ms_per_batch']:.2f} | "
                         f"{cpu.get('dali', cpu['dali_workers'] + cpu['dali_executor']):.2f} | {cpu['consumer']:.2f} | "
                         f"{s['dali_busy']:.2f} |")
    return "\n".join(lines) + "\n"


# block name -> (the JSON it is written from, its renderer)
RENDERERS = {"throughput_cpu": ("runs", throughput_table), "throughput_summary": ("runs", readme_summary),
             "handover_cpu": ("handover", handover_table)}


def rewrite(text: str, sources: dict) -> str:
    def block(m: re.Match) -> str:
        if m.group(2) not in RENDERERS:
            raise SystemExit(f"error: unknown figure block '{m.group(2)}' (known: {', '.join(RENDERERS)})")
        source, render = RENDERERS[m.group(2)]
        return m.group(1) + render(sources[source]) + m.group(4)
    return BLOCK.sub(block, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=Path, help="benchmark_throughput.py JSON files to store first")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is out of date")
    parser.add_argument("--store", type=Path, default=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--handover", type=Path, default=HANDOVER, help=argparse.SUPPRESS)
    parser.add_argument("--docs", nargs="+", type=Path, default=DOCS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        if args.runs:
            runs = [json.loads(p.read_text()) for p in args.runs]
            args.store.write_text(json.dumps(runs, indent=1) + "\n")
        sources = {"runs": json.loads(args.store.read_text()), "handover": json.loads(args.handover.read_text())}
        stale = []
        for doc in args.docs:
            text = doc.read_text()
            new = rewrite(text, sources)
            if new != text:
                stale.append(str(doc))
                if not args.check:
                    doc.write_text(new)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check and stale:
        print(f"error: figures out of date in {', '.join(stale)}: run python scripts/write_figures.py",
              file=sys.stderr)
        return 1
    print("figures " + ("checked" if args.check else "written") + f" from {args.store} and {args.handover}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
