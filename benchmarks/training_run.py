"""One run of the training benchmark: one loader, one seed, in its own process (or one per rank
under ``torch.distributed.run``), timed step by step.

Each step is timed in four parts, each ending with a device synchronisation: ``data`` (waiting
for the loader's next batch), ``busy`` (this rank's forward and backward), ``wait`` (from the
end of its backward until the slowest rank ends its own: a one-element all-reduce every rank
enters when its backward is done) and ``update`` (averaging the gradients over the ranks, one
all-reduce per dtype, then the optimizer step). Gradients are averaged after the backward, as
``DistributedDataParallel`` does, only not overlapped with it: that is what lets each rank's
compute and its wait for the others be measured apart. The loss of every step is the token
mean over all ranks' batches (the figure a single process would log).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

import odb
from odb.adapters import qwen_vl

from .policies import epoch_order
from .train_models import load_train_model

__all__ = [
    "COMPUTE_LOADERS",
    "LOADERS",
    "MEASURED_LOADERS",
    "LR_RULES",
    "CHECK",
    "NEUTRAL_LOADER",
    "PACKED_LOSS_TOLERANCE",
    "TOKEN_LOSS_TOLERANCE",
    "check_packed_loss",
    "standard_size",
    "train_once",
]

LOADERS = ("standard", "odb-padded", "odb-packed")
"""The default loaders. ``standard-N`` is Standard at batch size N."""
COMPUTE_LOADERS = ("odb-compute-padded", "odb-compute-packed")
"""odb under the model's compute budget: weights from its FLOPs (``qwen_vl.compute_cost``)."""
MEASURED_LOADERS = ("odb-measured-padded", "odb-measured-packed")
"""The same with weights timed on this device at the start of the run
(``qwen_vl.measure_cost``, not counted in the run's time)."""
NEUTRAL_LOADER = "odb-neutral"
"""odb padded with at most Standard's batch size of samples per step: the user keeps the
hyper-parameters tuned for Standard (the same samples per step at most), with less padding."""
CHECK = "check-packed-loss"
"""The run that compares a packed row's loss with a padded batch's (:func:`check_packed_loss`)."""
# How an odb run's learning rate follows its batches: the base rate (Standard's) times the
# ratio of mean samples per step to Standard's batch size, to this power.
LR_RULES = {"same": 0.0, "sqrt": 0.5, "linear": 1.0}


def standard_size(loader_name: str, settings: dict) -> int | None:
    """The batch size of a Standard loader name (``standard``: the suite's; ``standard-N``: N),
    ``None`` for odb's loaders."""
    if not loader_name.startswith("standard"):
        return None
    _, _, size = loader_name.partition("-")
    return int(size) if size else settings["batch_size"]


class _Indexed(torch.utils.data.Dataset):
    """A dataset yielding ``(index, sample)`` so the standard loader's batches name their
    samples, as odb's do through their step info."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class _IndexedCollate:
    def __init__(self, collate: Callable[[list], Any]):
        self.collate = collate

    def __call__(self, items: list[tuple[int, Any]]) -> tuple[list[int], Any]:
        return [i for i, _ in items], self.collate([sample for _, sample in items])


def _loader(
    loader_name: str, dataset: Any, model: Any, settings: dict, seed: int
) -> tuple[Any, dict | None]:
    """The named loader over ``dataset``, and for a compute loader the weights it prices
    batches with (for a measured one, with the fit and the seconds the timing took)."""
    mode = "packed" if loader_name.endswith("-packed") else "padded"
    collate = qwen_vl.collator(model, mode)
    workers = settings["num_workers"]
    if (batch_size := standard_size(loader_name, settings)) is not None:
        if torch.distributed.is_initialized():
            sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=seed)
        else:
            sampler = epoch_order(len(dataset), seed).tolist()  # odb's shuffled order
        return torch.utils.data.DataLoader(
            _Indexed(dataset),
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=_IndexedCollate(collate),
            num_workers=workers,
        ), None
    limit, priced, weights = settings["budget"], {}, None
    if loader_name in COMPUTE_LOADERS or loader_name in MEASURED_LOADERS:
        cost, weights = None, {}
        if loader_name in MEASURED_LOADERS:
            start = time.perf_counter()
            measured = qwen_vl.measure_cost(
                model, mode, max_tokens=settings["budget"], longest=settings["max_length"]
            )
            cost = measured.cost
            weights = {
                "fit": measured.fit,
                "sample_tokens": measured.sample_tokens,
                "seconds": time.perf_counter() - start,
            }
        budget = qwen_vl.compute_budget(model, settings["budget"], mode, cost=cost)
        limit, priced = budget.limit, {"cost": budget.cost, "max_tokens": budget.caps.max_tokens}
        weights = {
            "attention_weight": budget.cost.attention_weight,
            "vision_weight": budget.cost.vision_weight,
            "vision_attention_weight": budget.cost.vision_attention_weight,
            **weights,
        }
    elif loader_name == NEUTRAL_LOADER:
        priced = {"max_samples": settings["batch_size"]}
    loader = odb.DataLoader(
        dataset,
        limit,
        mode=mode,
        collate_fn=collate,
        shuffle=True,
        seed=seed,
        window=settings["window"],
        num_workers=workers,
        **priced,
    )
    return loader, weights


def _batches(loader: Any) -> Iterator[tuple[list[int], float, dict]]:
    """``(indices, loss weight, batch)`` per step of a loader made by :func:`_loader`."""
    if not isinstance(loader, odb.DataLoader):
        for indices, batch in loader:
            yield indices, 1.0, batch
        return
    for batch in loader:
        info = odb.step_info(batch)
        yield ([] if info.ghost else list(info.sample_indices)), info.loss_weight, batch


def _learning_rate(loader: Any, dataset: Any, settings: dict, world: int) -> float:
    """Standard's rate, scaled for an odb loader by ``lr_rule`` from its mean samples per step
    (counted exactly from the records' sizes before the epoch)."""
    base, power = settings["learning_rate"], LR_RULES[settings["lr_rule"]]
    if not isinstance(loader, odb.DataLoader) or power == 0:
        return base
    steps = odb.estimate.count_steps(loader, dataset.estimate_all())
    per_step = len(dataset) / world / steps
    return base * (per_step / settings["batch_size"]) ** power


def _device(choice: str) -> torch.device:
    """``auto``: this rank's GPU when there is one, else the CPU."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(choice)


class _Clock:
    """Seconds between marks, each taken after the device finished its queued work."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = self.now()

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        now = self.now()
        seconds, self.last = now - self.last, now
        return seconds


class _Ranks:
    """The collectives of a step across ranks (all no-ops in one process)."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.device = device
        self.params = [p for p in model.parameters() if p.requires_grad]
        if self.world > 1:  # the same initial weights everywhere, as DDP ensures
            for param in model.parameters():
                torch.distributed.broadcast(param.data, src=0)

    def arrive(self) -> None:
        """Return once every rank has ended its backward."""
        if self.world > 1:
            torch.distributed.all_reduce(torch.zeros(1, device=self.device))

    def average_gradients(self) -> None:
        """Every rank's gradients become their mean over the ranks (one all-reduce per dtype)."""
        if self.world == 1:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= self.world
            offset = 0
            for grad in grads:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()

    def token_mean(self, loss_sum: float, tokens: int) -> float:
        """The loss over all ranks' label tokens."""
        totals = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64)
        if self.world > 1:
            totals = totals.to(self.device)
            torch.distributed.all_reduce(totals)
        loss_sum, tokens = totals.tolist()
        return loss_sum / tokens if tokens else float("nan")


def _to(batch: dict, device: torch.device) -> dict:
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def _label_tokens(batch: dict) -> int:
    """Tokens that carry loss after the causal shift."""
    return int((batch["labels"][..., 1:] != -100).sum())


@torch.no_grad()
def _heldout_losses(model: Any, dataset: Any, device: torch.device) -> dict[str, float]:
    """The held-out records' loss, one record at a time (no padding): the mean over all their
    label tokens (long records weigh more) and the mean over records of each one's own."""
    model.eval()
    collate = qwen_vl.collator(model, "padded")
    losses, tokens = [], []
    for index in range(len(dataset)):
        batch = _to(collate([dataset[index]]), device)
        tokens.append(_label_tokens(batch))
        losses.append(float(model(**batch).loss))
    model.train()
    return {
        "heldout_loss": sum(x * n for x, n in zip(losses, tokens, strict=True)) / sum(tokens),
        "heldout_record_loss": sum(losses) / len(losses),
    }


def _peak_memory_mib(device: torch.device) -> float:
    """The device's peak allocated memory (CUDA), or this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(folder: Path, seed: int) -> tuple[dict, torch.device, Any]:
    """This process's settings, device (and process group under torchrun) and model."""
    settings = json.loads((folder / "settings.json").read_text())
    device = _device(settings["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype = settings["dtype"]
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    settings["dtype"] = dtype
    trained = load_train_model(
        settings["model"],
        folder,
        device=device,
        dtype=dtype,
        attn=settings["attn"],
        seed=seed,
        min_pixels=settings["min_pixels"],
        max_pixels=settings["max_pixels"],
    )
    return settings, device, trained


PACKED_LOSS_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 1e-2}
"""Relative difference allowed between a packed row's loss and the padded batch's: float32
sums in another order; half precision rounds each kernel's output differently."""
TOKEN_LOSS_TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 5e-3}
"""Mean absolute difference allowed between the two layouts' per-token losses. The mean loss
alone barely moves when samples leak into each other (random weights: 5e-4 relative, under
half precision's rounding), each token's loss does (2e-2 here, against 1e-7 when correct)."""


def _token_losses(model: Any, batch: dict) -> torch.Tensor:
    """The cross-entropy of every label token of ``batch``, in order (samples one after
    another in both layouts)."""
    logits = model(**batch).logits.float()
    labels = batch["labels"][:, 1:].reshape(-1)
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(labels.numel(), -1), labels, reduction="none", ignore_index=-100
    )
    return losses[labels != -100]


@torch.no_grad()
def check_packed_loss(folder: Path, samples: int = 4) -> dict:
    """The loss of the first ``samples`` training records as one padded batch and as one
    packed row, on this process's device and dtype: the same token mean and the same loss at
    every token, up to rounding."""
    settings, device, trained = _setup(folder, 0)
    model = trained.model.eval()
    dataset = qwen_vl.LlavaDataset(folder / "train.json", settings["images"], trained.processor)
    chosen = [dataset[i] for i in range(min(samples, len(dataset)))]
    padded, packed = (
        _token_losses(model, _to(qwen_vl.collator(model, mode)(chosen), device))
        for mode in ("padded", "packed")
    )
    loss = {"padded": float(padded.mean()), "packed": float(packed.mean())}
    difference = abs(loss["packed"] - loss["padded"]) / abs(loss["padded"])
    per_token = float((packed - padded).abs().mean())
    dtype = settings["dtype"]
    return {
        "samples": len(chosen),
        "tokens": sum(len(sample["input_ids"]) for sample in chosen),
        "dtype": dtype,
        "attn": settings["attn"],
        **loss,
        "relative_difference": difference,
        "tolerance": PACKED_LOSS_TOLERANCE[dtype],
        "token_difference": per_token,
        "token_tolerance": TOKEN_LOSS_TOLERANCE[dtype],
        "passed": difference <= PACKED_LOSS_TOLERANCE[dtype]
        and per_token <= TOKEN_LOSS_TOLERANCE[dtype],
    }


def train_once(folder: Path, loader_name: str, seed: int) -> dict:
    """Warm-up steps and then the timed steps (or the rest of the epoch) of ``loader_name``
    on the data in ``folder``; this rank's record."""
    settings, device, trained = _setup(folder, seed)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = trained.model.train()
    if settings["gradient_checkpointing"]:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    dataset = qwen_vl.LlavaDataset(folder / "train.json", settings["images"], trained.processor)
    loader, cost_weights = _loader(loader_name, dataset, model, settings, seed)
    learning_rate = _learning_rate(loader, dataset, settings, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    ranks = _Ranks(model, device)
    limit = settings["warmup_steps"] + (settings["steps"] or 10**9)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    records: list[dict] = []
    clock = _Clock(device)
    for indices, weight, batch in _batches(loader):
        data = clock.lap()
        batch = _to(batch, device)
        loss = model(**batch).loss
        (loss * weight).backward()
        busy = clock.lap()
        ranks.arrive()
        wait = clock.lap()
        tokens = _label_tokens(batch) if weight else 0
        global_loss = ranks.token_mean(float(loss.detach()) * tokens, tokens)
        ranks.average_gradients()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        records.append(
            {
                "indices": indices,
                "loss": global_loss,
                "computed": int(batch["input_ids"].numel()),
                "data": data,
                "busy": busy,
                "wait": wait,
                "update": clock.lap(),
            }
        )
        if len(records) == limit:
            break
    peak = _peak_memory_mib(device)
    heldout = {"heldout_loss": None, "heldout_record_loss": None}
    if int(os.environ.get("RANK", "0")) == 0 and (folder / "heldout.json").exists():
        held = qwen_vl.LlavaDataset(folder / "heldout.json", settings["images"], trained.processor)
        heldout = _heldout_losses(model, held, device)
    if world > 1:
        torch.distributed.destroy_process_group()
    return {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "dtype": settings["dtype"],
        "peak_memory_mib": peak,
        "learning_rate": learning_rate,
        **heldout,
        "weights": float(sum(p.detach().double().sum() for p in model.parameters())),
        "cost_weights": cost_weights,
        "steps": records,
    }


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one run of the training benchmark")
    parser.add_argument("folder", type=Path)
    parser.add_argument("loader", help="a loader, or 'check-packed-loss'")
    parser.add_argument("seed", type=int)
    parser.add_argument("out", help="records go to OUT.RANK.json")
    args = parser.parse_args(argv)
    if args.loader == CHECK:
        record = check_packed_loss(args.folder)
    else:
        record = train_once(args.folder, args.loader, args.seed)
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{args.out}.{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    _main()
