"""One rank of a multi-process Hugging Face Trainer test (torchrun or accelerate launch).

Reads a JSON config (argv[1]); trains a tiny model with odb enabled; writes what this rank saw
to ``<out>/rank<r>.json`` (and rank 0's first accumulated gradient to ``grads.pt``, or with
DeepSpeed, whose engine keeps the gradients in its own partitions, rank 0's final parameters to
``params-<run>.pt``). Config keys: ``lengths``, ``budget``, ``args`` (``TrainingArguments``,
``deepspeed`` included: a ZeRO config, launched with ``DS_ACCELERATOR=cpu``), ``run``,
``resume``, ``dtype`` (the tiny model's, float64 by default; ZeRO takes float32 at most) and
``params`` (write the final parameters without DeepSpeed too).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for `tiny`

from hf_setup import Recorder, TokenDataset, tiny_model, training_args  # the script's folder
from tiny import leave_distributed

from odb.adapters.hf import enable


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    out = Path(config["out"])
    dataset = TokenDataset(config["lengths"])
    args = training_args(out / config.get("run", "run"), **config["args"])
    dtype = getattr(torch, config.get("dtype", "float64"))
    model = tiny_model(dtype=dtype)
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
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if args.deepspeed or config.get("params"):
        params = _final_parameters(model, bool(args.deepspeed))
        if rank == 0:
            torch.save(params, out / f"params-{config.get('run', 'run')}.pt")
    elif rank == 0 and recorder.first_grads is not None:
        torch.save(recorder.first_grads, out / "grads.pt")
    dist.barrier()
    leave_distributed()


def _final_parameters(model, zero: bool) -> list[torch.Tensor]:
    """Every parameter whole, also under ZeRO-3 (which leaves each rank a partition)."""
    parameters = list(model.parameters())
    if not zero:
        return [p.detach().clone() for p in parameters]
    import deepspeed

    with deepspeed.zero.GatheredParameters(parameters):
        return [p.detach().clone() for p in parameters]


if __name__ == "__main__":
    main()
