#!/usr/bin/env bash
# The GPU check: Standard against odb padded and odb packed (and odb packed under the compute
# budget with weights timed on the GPU: qwen_vl.measure_cost), measured side by side on one GPU
# with a Qwen2.5-VL-3B-sized model (random weights, bfloat16) on the built-in mixed set with
# real images, plus the check that a packed row and a padded batch of the same samples give
# the same loss. Writes report.md, results.json and training_loss.png to the folder given as
# its argument (default gpu-check-out/); exits non-zero when a run or the loss check fails.
#
# On a machine without network (torch and transformers preinstalled), odb and the packages
# it needs travel as wheels in .whl/ (benchmarks/gpu_wheels.sh fills it); they are installed
# into a private folder with pip --no-index --no-deps. Without .whl/, the odb importable by
# $PYTHON is used. Every setting can be overridden from the environment (the CPU test runs the
# same script with the tiny preset).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check-out}
python=${PYTHON:-python3}
mkdir -p "$out" && out=$(cd "$out" && pwd)
if [ -d .whl ] && [ "${ODB_GPU_CHECK_INSTALL:-1}" = 1 ]; then
    site=$(mktemp -d)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# Python runs outside the checkout, whose odb/ folder would hide the installed odb.benchmarks.
cd "$out"
"$python" - <<'EOF' | tee environment.txt
import platform, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"python {platform.python_version()}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, {gpu}")
EOF
# 16384 tokens per step with gradient checkpointing keeps a 3B model's activations, its
# logits and AdamW's states well inside one H200; 2 warm-up steps, then 12 timed steps.
PYTHONUNBUFFERED=1 "$python" -m odb.benchmarks.cli --train --train-only \
    --model "${ODB_GPU_CHECK_MODEL:-Qwen2.5-VL-3B}" \
    --set "${ODB_GPU_CHECK_SET:-mixed}" \
    --train-samples "${ODB_GPU_CHECK_SAMPLES:-400}" \
    --train-budget "${ODB_GPU_CHECK_BUDGET:-16384}" \
    --train-max-length "${ODB_GPU_CHECK_MAX_LENGTH:-8192}" \
    --device "${ODB_GPU_CHECK_DEVICE:-cuda}" \
    --dtype "${ODB_GPU_CHECK_DTYPE:-bfloat16}" \
    --attn "${ODB_GPU_CHECK_ATTN:-odb_packed}" \
    --gradient-checkpointing \
    --warmup-steps "${ODB_GPU_CHECK_WARMUP:-2}" \
    --steps "${ODB_GPU_CHECK_STEPS:-12}" \
    --train-loader standard --train-loader odb-padded --train-loader odb-packed \
    --train-loader odb-measured-packed \
    --out "$out"
