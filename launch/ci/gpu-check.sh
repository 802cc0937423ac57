#!/usr/bin/env bash
# The CUDA path, checked on one GPU in under 8 minutes (`make gpu-check` runs it):
#   1. the GPT example (examples/gpt.toml: bf16, gradient clipping) under torchrun at world size 1
#      with NCCL, SIGKILLed mid-run and resumed: its export must equal an uninterrupted run's, byte
#      for byte (deterministic kernels, CUBLAS_WORKSPACE_CONFIG set);
#   2. snapshots moved between devices: one saved on the CPU restored onto CUDA and one saved on
#      CUDA restored onto the CPU, every tensor compared; a run trained CPU -> CUDA -> CPU;
#   3. stall and total of a snapshot of >= 4 GB of GPU state (model and Adam state) beside
#      torch.save and DCP async_save of the same state (bench/gpu_snapshot.py).
# Exit 0 when all pass, 1 on any mismatch (named), 2 when there is no CUDA device.
#
#   launch/ci/gpu-check.sh                      # on a GPU machine
#   launch/ci/gpu-check.sh --device cpu         # the same checks on the CPU: a dry run of the logic
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 launch/ci/gpu-check.sh   # a CUDA build of torch
#
# Environment: GPU_CHECK_DIR (work dir; default tmp/gpu-check-<time>, kept for its logs),
# STATE_GB (default 4), TORCH_INDEX_URL (reinstall torch==2.13.0 from this index first).
set -euo pipefail

cd "$(dirname "$0")/../.."
device=cuda
quick=()
state_gb=${STATE_GB:-4}
while (( $# )); do
  case "$1" in
    --device) device=$2; shift 2 ;;
    *) echo "usage: $0 [--device cuda|cpu]" >&2; exit 2 ;;
  esac
done
if [[ $device == cpu ]]; then
  quick=(--quick)
  state_gb=${STATE_GB:-0.05}
elif [[ $device != cuda ]]; then
  echo "gpu-check: --device $device: use cuda or cpu" >&2
  exit 2
fi

say() { echo "gpu-check: $*"; }
fail() { echo "gpu-check: FAILED: $*" >&2; exit 1; }
started=$SECONDS

if [[ $device == cuda ]] && ! { command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; }; then
  echo "gpu-check: no CUDA device (nvidia-smi lists none); the CUDA path stays untested" >&2
  exit 2
fi

say "installing (make install)"
make install
if [[ -n ${TORCH_INDEX_URL:-} ]]; then
  .venv/bin/pip install --quiet --force-reinstall --no-deps torch==2.13.0 --index-url "$TORCH_INDEX_URL"
fi
py=.venv/bin/python
if [[ $device == cuda ]]; then
  if ! $py -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    build=$($py -c 'import torch; print(torch.__version__)')
    echo "gpu-check: no CUDA device visible to torch $build (a CPU build? rerun with TORCH_INDEX_URL set)" >&2
    exit 2
  fi
  nvidia-smi -L
fi

work=${GPU_CHECK_DIR:-tmp/gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$work"
say "work dir $work (logs of every run are kept there)"

say "[1/2] GPT example: kill and resume, export compared; snapshots between the CPU and $device"
$py launch/ci/gpu_check.py --device "$device" --work "$work/checks" "${quick[@]}" \
  || fail "the GPT or device checks (above); logs in $work/checks"

say "[2/2] a snapshot of ${state_gb} GB of $device state: dtrain vs torch.save vs DCP async_save"
$py bench/gpu_snapshot.py --device "$device" --state-gb "$state_gb" --tmp-dir "$work/bench" \
  --out "$work/gpu_snapshot.json" || fail "the snapshot benchmark (above)"

elapsed=$(( SECONDS - started ))
say "all checks passed on $device in ${elapsed}s; figures in $work/gpu_snapshot.json"
if (( elapsed > 480 )); then
  say "warning: took more than 8 minutes"
fi
