#!/usr/bin/env bash
# One GPU round (issues 55 and 58) as ONE device `run` command, on the GPU machine; writes into $OUT. Prepare the
# tree first with benchmarks/gpu_round_prepare.sh (here, at no device time); docs/benchmarks.md, "One GPU round".
#   bash benchmarks/gpu_round.sh [benchmarks.gpu_round options: --budget S, --only PART, ...]
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/benchmarks/results/round}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed: $(tail -1 "$OUT/nvidia-smi.txt")"
if compgen -G ".whl/*.whl" > /dev/null; then  # what the machine lacks (hydra, omegaconf, antlr4, submitit, torchao)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > "$OUT/pip.txt" 2>&1 || { cat "$OUT/pip.txt"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
set -o pipefail
python3 -m benchmarks.gpu_round --out "$OUT" "$@" 2>&1 | tee "$OUT/console.txt"
