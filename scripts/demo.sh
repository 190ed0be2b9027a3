#!/usr/bin/env bash
# The whole path on a small generated dataset, on the CPU, in minutes: the same commands as
# the real-data workflow in the README, with demo/config.yaml (small images, a small model).
#   make demo            (or: bash scripts/demo.sh, with the project's Python on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
CFG=demo/config.yaml
RUN=demo_run
start=$(date +%s)

rm -rf "$RUN"
echo "== 1/6 generating the demo data (Kaggle layout) in $RUN/data"
python -m demo.data "$RUN/data"
echo "== 2/6 building shards"
python -m preprocessing.build_shards --config "$CFG"
python -m preprocessing.verify --config "$CFG"
echo "== 3/6 training"
python -m training.train --config "$CFG" --stage train
echo "== 4/6 tuning on the stage-1 tuning labels"
python -m training.train --config "$CFG" --stage tune
echo "== 5/6 stage-2 submissions, untuned and tuned"
python -m inference.submit --config "$CFG" --stage 2 --checkpoint "$RUN/artifacts/train/checkpoints/best.pt"
mv "$RUN/output/submission_stage2.csv" "$RUN/output/submission_stage2_untuned.csv"
python -m inference.submit --config "$CFG" --stage 2
echo "== 6/6 scoring against the stage-2 solution"
untuned=$(python -m inference.score "$RUN/output/submission_stage2_untuned.csv" "$RUN/data/inclusive/stage_2_solution.csv" | awk '{print $3}')
tuned=$(python -m inference.score "$RUN/output/submission_stage2.csv" "$RUN/data/inclusive/stage_2_solution.csv" | awk '{print $3}')
echo "demo took $(( $(date +%s) - start )) s"
printf 'stage-2 F2: untuned %.3f, tuned %.3f\n' "$untuned" "$tuned"
