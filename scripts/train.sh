#!/usr/bin/env bash
# Launch training with torchrun: one GPU, all GPUs of a machine, or several machines.
#
#   scripts/train.sh [torchrun options] -- [training.train options]
#
#   scripts/train.sh -- --config config.yaml --stage train                      # all local GPUs (or 1 CPU process)
#   scripts/train.sh --nproc-per-node 4 -- --config config.yaml --stage train   # 4 processes
#   scripts/train.sh --nnodes 2 --node-rank 0 --rdzv-endpoint host0:29500 --rdzv-id run1 \
#       -- --config config.yaml --stage train                                   # run on each machine
#
# Everything before "--" goes to torchrun (--nproc-per-node, --nnodes, --node-rank,
# --rdzv-endpoint, --rdzv-id, --rdzv-backend, --master-addr, --master-port, ...); everything
# after it to `python -m training.train`. Without --nproc-per-node it starts one process per
# visible GPU, or one on a machine without a GPU. Ranks use NCCL on GPUs and gloo on CPUs.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

torchrun_args=()
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    *) torchrun_args+=("$1"); shift ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "error: separate torchrun options from training options with --  (see $0 --help)" >&2
  exit 2
fi
shift  # the "--"
if ! python -c "import torch" 2>/dev/null; then
  echo "error: the python on PATH ($(command -v python || echo none)) cannot import torch: activate the project's" \
       "environment first (source .venv/bin/activate after make install)" >&2
  exit 2
fi

has_nproc=0
for a in "${torchrun_args[@]+"${torchrun_args[@]}"}"; do
  [[ "$a" == --nproc-per-node* || "$a" == --nproc_per_node* ]] && has_nproc=1
done
if [[ $has_nproc -eq 0 ]]; then
  gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  torchrun_args+=("--nproc-per-node" "$(( gpus > 0 ? gpus : 1 ))")
fi
# with a single node and no rendezvous given, a free local port (several runs can share a machine)
if ! printf '%s\n' "${torchrun_args[@]}" | grep -qE -- '--(rdzv|nnodes|master)'; then
  torchrun_args+=("--standalone")
fi

# no cd: relative paths (--config ../mine.yaml) mean what they mean in the caller's folder
repo="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# training.launch is torchrun that prints a user's error once, not once per rank plus torchrun's traceback
exec python -m training.launch "${torchrun_args[@]}" -m training.train "$@"
