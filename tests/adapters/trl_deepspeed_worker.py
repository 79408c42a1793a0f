"""One rank of the 2-process GRPO + DeepSpeed ZeRO test (started by test_trl_deepspeed.py
through torchrun, with ``DS_ACCELERATOR=cpu``).

Trains the stock GRPOTrainer, then an odb one, on the same fixed rollouts (rank 0's much longer
than rank 1's, KL term on, dapo loss, SGD) under ZeRO stage ``argv[2]``, and writes to
``<out>/rank<r>.json`` each run's final parameters' distance from the start and from each other,
the logged losses and odb's passes per window. The engine keeps the gradients in its own
partitions, so the parameters (gathered under ZeRO-3) are what is compared.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import trl_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for `tiny`

OUT = sys.argv[1]
STAGE = int(sys.argv[2])
BUDGET = int(sys.argv[3])


def _parameters(model) -> torch.Tensor:
    parameters = list(model.parameters())
    with deepspeed.zero.GatheredParameters(parameters):
        return torch.cat([p.detach().flatten().clone() for p in parameters])


def main() -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    tokenizer = trl_tiny.write_tokenizer(os.path.join(OUT, f"tokenizer{rank}"))
    rollouts = trl_tiny.FixedRollouts(48, median=16.0 if rank == 0 else 2.0, sigma=0.8)
    models = {  # ZeRO takes float32 at most
        name: trl_tiny.with_reference(
            trl_tiny.text_model(tokenizer, dtype=torch.float32),
            os.path.join(OUT, f"reference{rank}-{name}"),
        )
        for name in ("stock", "odb")
    }
    # Under ZeRO-3, GRPOTrainer builds the reference model inside zero.Init before the Trainer
    # starts the process group; DeepSpeed then takes the world size for 1 and refuses the batch
    # sizes ("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step *
    # world_size"). A stock TRL matter: start the group first (after
    # the models are saved: with the group up, save_pretrained writes on rank 0 only).
    deepspeed.init_distributed(dist_backend="gloo")
    start = torch.cat([p.detach().flatten().clone() for p in models["stock"].parameters()])
    zero = {
        "zero_optimization": {"stage": STAGE},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
    final, logs = {}, {}
    trainer = None
    for name, budget in (("stock", None), ("odb", BUDGET)):
        args = trl_tiny.grpo_config(
            os.path.join(OUT, f"run{rank}-{name}"),
            beta=0.05,
            max_steps=3,
            ddp_timeout=120,
            deepspeed=zero,
        )
        trainer, _ = trl_tiny.run(
            models[name],
            trl_tiny.text_prompts(32, longest=8),
            tokenizer,
            args,
            rollouts,
            budget,
            align_timeout=60.0,
        )
        final[name] = _parameters(models[name])
        logs[name] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    stats = trainer.odb_stats
    record = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "global_step": trainer.state.global_step,
        "moved": float((final["stock"] - start).norm()),
        "difference": float((final["odb"] - final["stock"]).norm()),
        "losses": logs,
        "window_passes": stats.window_passes,
        "max_forward_tokens": stats.max_forward_tokens,
        "max_stock_tokens": stats.max_stock_tokens,
    }
    trl_tiny.finish_rank(OUT, record)


if __name__ == "__main__":
    main()
