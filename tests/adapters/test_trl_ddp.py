"""Two real processes (torchrun, gloo) training GRPO with odb on skewed rollouts.

Rank 0's completions are long and rank 1's short, so alone they would cut their rows into
different numbers of passes; DDP's gradient all-reduce and TRL's per-pass metric gathers
need the same passes, with the same row counts, on both. The worker also trains the stock
trainer on the same rollouts and compares the all-reduced gradients.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
from tiny import torchrun

pytestmark = pytest.mark.slow

BUDGET = 96
WORKER = Path(__file__).with_name("trl_ddp_worker.py")


def test_two_ranks_run_equal_passes_within_budget(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = torchrun(2, str(WORKER), str(tmp_path), str(BUDGET))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    assert all(
        r["world_size"] == 2 and r["global_step"] == r["optimizer_steps"] == 3 for r in ranks
    )
    long, short = ranks
    assert long["window_passes"] == short["window_passes"]  # equal passes every step
    assert sum(short["window_fewest"]) < sum(long["window_fewest"])  # the skew was real
    for rank in ranks:  # nobody runs fewer passes than it needs alone
        assert all(
            p >= f for p, f in zip(rank["window_passes"], rank["window_fewest"], strict=True)
        )
    for rank in ranks:
        assert 0 < rank["max_forward_tokens"] <= BUDGET
        assert rank["max_scoring_tokens"] <= BUDGET
        assert rank["ghost_rows"] == 0
        assert rank["difference"] <= 1e-4 * rank["scale"], rank
    assert long["max_stock_tokens"] > BUDGET  # the stock trainer's forwards would not fit
