"""One rank of the 2-process GRPO test (started by test_trl_ddp.py through torchrun).

Rank 0's rollouts are much longer than rank 1's, so alone they would need different numbers
of passes. The rank trains a stock GRPOTrainer, then an odb one, on the same fixed rollouts
(KL term on, dapo loss, gloo DDP), and writes what the test checks to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import trl_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for `tiny`

OUT = sys.argv[1]
BUDGET = int(sys.argv[2])


def main() -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    tokenizer = trl_tiny.write_tokenizer(os.path.join(OUT, f"tokenizer{rank}"))
    rollouts = trl_tiny.FixedRollouts(48, median=16.0 if rank == 0 else 2.0, sigma=0.8)
    # Both policies (and their references) are saved before any trainer exists: once the
    # process group is up, save_pretrained writes on rank 0 only.
    models = {
        name: trl_tiny.with_reference(
            trl_tiny.text_model(tokenizer), os.path.join(OUT, f"reference{rank}-{name}")
        )
        for name in ("stock", "odb")
    }
    runs = {}
    for name, budget in (("stock", None), ("odb", BUDGET)):
        args = trl_tiny.grpo_config(
            os.path.join(OUT, f"run{rank}-{name}"), beta=0.05, max_steps=3, ddp_timeout=120
        )
        runs[name] = trl_tiny.run(
            models[name],
            trl_tiny.text_prompts(32, longest=8),
            tokenizer,
            args,
            rollouts,
            budget,
            align_timeout=60.0,
        )
    trainer, grads = runs["odb"]
    difference, scale = trl_tiny.max_difference(runs["stock"][1], grads)
    stats = trainer.odb_stats
    record = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "global_step": trainer.state.global_step,
        "optimizer_steps": len(grads),
        "difference": difference,
        "scale": scale,
        "window_passes": stats.window_passes,
        "window_fewest": stats.window_fewest,
        "max_forward_tokens": stats.max_forward_tokens,
        "max_scoring_tokens": stats.max_scoring_tokens,
        "max_stock_tokens": stats.max_stock_tokens,
        "ghost_rows": stats.ghost_rows,
    }
    trl_tiny.finish_rank(OUT, record)


if __name__ == "__main__":
    main()
