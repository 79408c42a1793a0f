"""One rank of the vision-alignment test, started by torchrun: a tiny Qwen2.5-VL sharded by
FSDP2 (``fully_shard`` per vision block, per decoder layer, then the model) trains on a mix of
LLaVA records where some ranks' steps hold images and others' do not.

Under FSDP a module's weights are gathered collectively when it runs, so a rank whose batch
holds no image (the vision tower is skipped) and a rank whose batch does must not meet in one
step: odb's loader adds its placeholder image to the rank without one. ``placeholder: false``
hides the collator's placeholder from the loader, to show what happens without it.

Each step, rank 0 also computes the gradient of one unsharded copy over every rank's samples
of the step (the exact global token mean) and records the largest difference. Reads a JSON
config (argv[1]); writes ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import copy
import datetime
import json
import sys
import traceback
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for its helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))

import qwen_vl_tiny
from tiny import leave_distributed, token_loss_sum

import odb
from odb.adapters import qwen_vl


def shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in model.model.visual.blocks:
        fully_shard(block)
    for layer in model.model.language_model.layers:
        fully_shard(layer)
    fully_shard(model)


def train(config: dict, rank: int, result: dict) -> None:
    tokenizer = qwen_vl_tiny.small_tokenizer()
    factor = 28
    processor = qwen_vl_tiny.make_processor(
        "qwen2_5_vl", tokenizer, min_pixels=4 * factor * factor, max_pixels=16 * factor * factor
    )
    records = json.loads(Path(config["records"]).read_text())
    dataset = qwen_vl.LlavaDataset(records, config["images"], processor)
    model = qwen_vl_tiny.tiny_model("qwen2_5_vl", tokenizer)
    reference = copy.deepcopy(model) if rank == 0 else None
    shard(model)
    collate = qwen_vl.collator(model, config["mode"])
    padded = qwen_vl.collator(reference or model, "padded")
    loader = odb.DataLoader(
        dataset,
        config["budget"],
        mode=config["mode"],
        collate_fn=collate if config["placeholder"] else (lambda samples: collate(samples)),
        sampler=config["per_rank_indices"][rank],
        shard=False,
    )
    steps, worst = [], 0.0
    result.update(steps=steps, worst_grad_error=worst)
    world = dist.get_world_size()
    for batch in loader:
        info = odb.step_info(batch)
        steps.append(
            {
                "vision": info.vision,
                "placeholder": info.vision_placeholder,
                "images": 0 if "image_grid_thw" not in batch else len(batch["image_grid_thw"]),
                "ghost": info.ghost,
            }
        )
        model.zero_grad()
        odb.scale_loss(token_loss_sum(model, batch), batch, reduction="token").backward()
        everyone = [None] * world
        dist.all_gather_object(everyone, [] if info.ghost else list(info.sample_indices))
        grads = {
            name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None
        }
        if rank == 0:
            reference.zero_grad()
            groups = [[dataset[i] for i in indices] for indices in everyone if indices]
            loss = sum(token_loss_sum(reference, padded(group)) for group in groups)
            (loss * world / info.global_label_tokens).backward()
            for name, ref in reference.named_parameters():
                if ref.grad is not None:
                    worst = max(worst, float((grads[name] - ref.grad / world).abs().max()))
        result["worst_grad_error"] = worst
    result["vision_placeholders"] = loader.stats().vision_placeholders


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    timeout = datetime.timedelta(seconds=config.get("pg_timeout", 60))
    dist.init_process_group("gloo", timeout=timeout)
    rank = dist.get_rank()
    result = {"rank": rank}
    try:
        train(config, rank, result)
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {error}"
        result["traceback"] = traceback.format_exc()
    (Path(config["out"]) / f"rank{rank}.json").write_text(json.dumps(result))
    leave_distributed()


if __name__ == "__main__":
    main()
