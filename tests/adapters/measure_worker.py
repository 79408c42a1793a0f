"""One rank of the measure_cost tests, started by torchrun over gloo: times a tiny Qwen2.5-VL
with ``qwen_vl.measure_cost`` and writes what it fitted, or the error it raised, to
``<argv[1]>.<rank>.json``. With ``fail`` as argv[2], rank 1's model raises in its forward.

The passes run for real, but their seconds come from a clock of each rank's own (see
``_rank_clock``): two ranks timing a tiny model on two busy cores measure mostly noise, and
the test is about how the ranks agree, not about the timings (tests/adapters/
test_qwen_vl_measure.py times the model itself in one process)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for its helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))

import qwen_vl_tiny
from tiny import leave_distributed

from odb.adapters import qwen_vl
from odb.adapters.qwen_vl import measure

_real_time = measure._time


def _rank_clock(model, batches, repeats):
    """Run the passes, then report seconds that grow with each batch's tokens, rank 1's 10%
    slower than rank 0's: without the all-reduce the ranks would fit different weights."""
    _real_time(model, batches, repeats)
    scale = 1.0 + 0.1 * dist.get_rank()
    return np.array([scale * (1e-3 + 1e-6 * b["input_ids"].numel()) for b in batches])


def _broken_forward(*args, **kwargs):
    raise RuntimeError("this rank's device failed")


def main(out: str, fail: bool) -> None:
    dist.init_process_group("gloo")
    try:
        torch.set_num_threads(1)
        model = qwen_vl_tiny.tiny_model(
            "qwen2_5_vl", qwen_vl_tiny.small_tokenizer(), dtype=torch.float32
        )
        if fail and dist.get_rank() == 1:
            model.forward = _broken_forward
        measure._time = _rank_clock
        try:
            measured = qwen_vl.measure_cost(model, "packed", max_tokens=1024, repeats=1)
        except Exception as error:
            record = {"error": f"{type(error).__name__}: {error}"}
        else:
            record = {
                "cost": dataclasses.asdict(measured.cost),
                "token_seconds": measured.token_seconds,
                "fixed_seconds": measured.fixed_seconds,
                "sample_tokens": measured.sample_tokens,
                "seconds": [row["seconds"] for row in measured.batches],
            }
        Path(f"{out}.{dist.get_rank()}.json").write_text(json.dumps(record))
    finally:
        leave_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] == ["fail"])
