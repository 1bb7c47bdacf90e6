#!/usr/bin/env bash
# Run here, in the checkout a session's device calls send, before the GPU call of benchmarks/gpu_round.sh: the wheels
# the GPU machine lacks (.whl/), a nanoGPT checkout (.peers/nanoGPT) and the corpus (data/tinyshakespeare), each
# ignored by git (.gitignore) and named in the run's `carry`. Costs no device time; about 4 MiB.
# Without access to github.com, NANOGPT_REPO names another copy of it (a local clone, a mirror).
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  hydra-core==1.3.8 omegaconf==2.3.1 submitit==1.5.4 "torchao==${TORCHAO:-0.18.0}"
ls .whl/antlr4_python3_runtime-4.9.3-*.whl > /dev/null 2>&1 || \
  $PY -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # no wheel on the index: a pure-Python one
[ -f .peers/nanoGPT/model.py ] || git clone -q --depth 1 "${NANOGPT_REPO:-https://github.com/karpathy/nanoGPT}" .peers/nanoGPT \
  || echo "no nanoGPT checkout: put one in .peers/nanoGPT (its model.py is read) or the gpt2 pair runs ours alone"
mkdir -p data/tinyshakespeare
[ -f data/tinyshakespeare/input.txt ] || cp ../shared/data/tinyshakespeare/input.txt data/tinyshakespeare/
du -sh .whl .peers data/tinyshakespeare 2>/dev/null
