"""One rank of a multi-process Hugging Face Trainer test (torchrun or accelerate launch).

Reads a JSON config (argv[1]); trains a tiny model with odb enabled; writes what this rank saw
to ``<out>/rank<r>.json`` (and rank 0's first accumulated gradient, where the Trainer's model
holds it, to ``grads.pt``). Config
keys: ``lengths``, ``budget``, ``args`` (``TrainingArguments``, ``deepspeed`` included: a ZeRO
config, launched with ``DS_ACCELERATOR=cpu``), ``run``, ``resume``, ``dtype`` (the tiny
model's, float64 by default; ZeRO takes float32 at most), ``params`` (rank 0 writes the final
parameters, whole, to ``params-<run>.pt``; always under DeepSpeed, whose engine keeps the
gradients in its own partitions) and ``sharded_from`` (a saved tiny model, loaded sharded by
FSDP2 over all ranks by transformers itself,
``from_pretrained(distributed_config=DistributedConfig(fsdp_size=world))``, instead of being
wrapped in DDP by the Trainer).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for `tiny`

from hf_setup import Recorder, TokenDataset, tiny_model, training_args, whole  # script's folder
from tiny import leave_distributed

from odb.adapters.hf import enable


def make_model(config: dict) -> torch.nn.Module:
    dtype = getattr(torch, config.get("dtype", "float64"))
    if config.get("sharded_from") is None:
        return tiny_model(dtype=dtype)
    from transformers.distributed import DistributedConfig

    sharding = DistributedConfig(fsdp_size=int(os.environ["WORLD_SIZE"]))
    return transformers.Qwen2ForCausalLM.from_pretrained(
        config["sharded_from"], distributed_config=sharding, dtype=dtype
    )


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    out = Path(config["out"])
    dataset = TokenDataset(config["lengths"])
    # A model sharded at load time starts the process group itself, before the Trainer's
    # arguments; under ZeRO-3 the arguments (its config) come first.
    model = make_model(config) if config.get("sharded_from") else None
    args = training_args(out / config.get("run", "run"), **config["args"])
    model = model or make_model(config)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    enable(trainer, config["budget"])
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=config.get("resume"))
    rank, world = dist.get_rank(), dist.get_world_size()
    windows = [
        [
            {
                "indices": list(i.sample_indices),
                "ghost": i.ghost,
                "epoch": i.epoch,
                "global_label_tokens": i.global_label_tokens,
                "padded_tokens": i.padded_tokens,
                "real_tokens": i.real_tokens,
                "global_samples": i.global_samples,
            }
            for i in window
        ]
        for window in recorder.windows
        if window
    ]
    record = {
        "rank": rank,
        "world": world,
        "windows": windows,
        "lrs": recorder.lrs,
        "global_step": trainer.state.global_step,
        "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
        "final": trainer.state.log_history[-1],
        "sharded": recorder.sharded,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if args.deepspeed or config.get("params"):
        params = _final_parameters(model, bool(args.deepspeed))
        if rank == 0:
            torch.save(params, out / f"params-{config.get('run', 'run')}.pt")
    if rank == 0 and recorder.first_grads is not None:
        torch.save(recorder.first_grads, out / "grads.pt")
    dist.barrier()
    leave_distributed()


def _final_parameters(model, zero: bool) -> dict[str, torch.Tensor]:
    """Every parameter whole, by name: also under ZeRO-3 (which leaves each rank a partition)
    and FSDP2 (sharded DTensors; gathering them is a collective, so every rank calls this)."""
    named = list(model.named_parameters())
    if not zero:
        return {name: whole(p.detach()).clone() for name, p in named}
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {name: p.detach().clone() for name, p in named}


if __name__ == "__main__":
    main()
