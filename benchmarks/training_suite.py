"""Measured training: a tiny Qwen2.5-VL trains one epoch on CPU through three loaders.

The same synthetic LLaVA records (real PNG images, real text, shaped like the long-multimodal
set), the same processor, model initialisation and seed; only the loader differs:

- ``standard``: ``torch.utils.data.DataLoader`` with a fixed batch size, the largest whose
  padded tokens fit the budget in 99% of batches of the epoch (a ``DistributedSampler`` under
  torchrun), collating with ``qwen_vl.collator(model, "padded")``;
- ``odb padded`` / ``odb packed``: ``odb.DataLoader`` under the token budget with
  ``qwen_vl.collator(model, mode)``;
- ``odb compute padded`` / ``odb compute packed`` (on request: ``--train-loader``): the same
  under the tiny model's own compute budget (``qwen_vl.compute_budget``: estimated compute,
  the token budget as ``max_tokens``), what the HF adapter uses for Qwen-VL by default.

Each run is its own process (``python -m odb.benchmarks.training_suite``, or several under
``torch.distributed.run`` with gloo and a DDP-wrapped model), so that its peak memory is its
own: the peak resident set size of the training process (``resource.getrusage``, the
DataLoader workers not included). Samples and real tokens per second count the epoch's
wall time from the first batch asked of the loader (its workers start then) to the last
optimizer step, on the slowest rank. Each
process gets ``cores / (2 * processes)`` torch threads, leaving the rest to the workers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import odb
from odb.adapters import qwen_vl

from .llava_input import SYNTHETIC_LONG_MULTIMODAL, llava_set, write_synthetic_llava
from .policies import epoch_order, standard_batch_size
from .qwen_vl_offline import ImageSettings, small_tokenizer, tiny_model, tiny_processor

__all__ = [
    "COMPUTE_LOADERS",
    "LOADERS",
    "LR_RULES",
    "TrainingConfig",
    "TrainingResult",
    "TrainingRun",
    "run_training",
]

LOADERS = ("standard", "odb-padded", "odb-packed")
COMPUTE_LOADERS = ("odb-compute-padded", "odb-compute-packed")
# How an odb run's learning rate follows its batches: the base rate (Standard's) times the
# ratio of mean samples per step to Standard's batch size, to this power.
LR_RULES = {"same": 0.0, "sqrt": 0.5, "linear": 1.0}


@dataclass(frozen=True)
class TrainingConfig:
    """``samples`` synthetic records, images resized into ``[min_pixels, max_pixels]``,
    records over ``max_length`` tokens left out (the usual maximum-length filter), a token
    ``budget`` per batch (per rank), one epoch per loader and per process count of
    ``worlds``.

    The default budget is four times the maximum length, a common set-up (a per-device batch
    of 4 at the maximum length), which lets Standard run batches of several samples; with
    ``budget == max_length`` Standard runs batch size 1 and only odb's fewer steps differ.
    ``lr_rule`` sets odb's learning rate from ``learning_rate`` (Standard's) and its mean
    samples per step (see ``LR_RULES``); ``"same"`` keeps it equal.
    """

    samples: int = 240
    max_length: int = 2048
    budget: int = 8192
    window: int = 256
    worlds: tuple[int, ...] = (1,)
    loaders: tuple[str, ...] = LOADERS
    num_workers: int = 2
    learning_rate: float = 1e-3
    lr_rule: str = "same"
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 28 * 28 * 256
    seed: int = 0

    def __post_init__(self) -> None:
        if unknown := set(self.loaders) - {*LOADERS, *COMPUTE_LOADERS}:
            raise ValueError(f"unknown loader(s) {sorted(unknown)}")
        if self.lr_rule not in LR_RULES:
            raise ValueError(f"lr_rule must be one of {tuple(LR_RULES)}, got {self.lr_rule!r}")
        if self.budget < self.max_length:
            raise ValueError(
                f"the token budget ({self.budget}) must hold a record of the maximum length "
                f"({self.max_length})"
            )


@dataclass(frozen=True)
class TrainingRun:
    """One loader's epoch at one process count.

    ``losses`` and ``samples_seen`` are per step of rank 0 (samples: rank 0's so far times
    the world size);
    ``missing`` / ``repeated`` count samples the epoch left out / trained more than once.
    """

    loader: str
    world: int
    batch_size: int | None
    learning_rate: float
    steps: int
    seconds: float
    samples_per_second: float
    real_tokens_per_second: float
    computed_tokens: int
    peak_rss_mib: float
    missing: int
    repeated: int
    losses: list[float]
    samples_seen: list[int]

    @property
    def final_loss(self) -> float:
        """Mean loss over the last tenth of the steps (at least one), rank 0."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return float(np.mean(tail)) if tail else float("nan")


@dataclass(frozen=True)
class TrainingResult:
    """The settings, the data's shape and every run."""

    config: TrainingConfig
    data: dict
    runs: list[TrainingRun]

    def speedup(self, run: TrainingRun) -> float | None:
        """``run``'s samples/s over the standard loader's at the same process count."""
        base = next((r for r in self.runs if r.loader == "standard" and r.world == run.world), None)
        return run.samples_per_second / base.samples_per_second if base else None


# -- one run, in its own process -------------------------------------------------------------------
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


def _loader(loader_name: str, dataset: Any, model: Any, settings: dict, world: int) -> Any:
    """The named loader over ``dataset``."""
    mode = "packed" if loader_name.endswith("-packed") else "padded"
    collate = qwen_vl.collator(model, mode)
    workers, seed = settings["num_workers"], settings["seed"]
    if loader_name == "standard":
        if world > 1:
            sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=seed)
        else:
            sampler = epoch_order(len(dataset), seed).tolist()  # odb's shuffled order
        return torch.utils.data.DataLoader(
            _Indexed(dataset),
            batch_size=settings["batch_size"],
            sampler=sampler,
            collate_fn=_IndexedCollate(collate),
            num_workers=workers,
        )
    limit, priced = settings["budget"], {}
    if loader_name in COMPUTE_LOADERS:
        budget = qwen_vl.compute_budget(model, settings["budget"], mode)
        limit, priced = budget.limit, {"cost": budget.cost, "max_tokens": budget.caps.max_tokens}
    return odb.DataLoader(
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


def _batches(loader: Any):
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


def train_once(folder: Path, loader_name: str) -> dict:
    """One epoch of ``loader_name`` on the data in ``folder``; this rank's record."""
    settings = json.loads((folder / "settings.json").read_text())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    images = ImageSettings(settings["min_pixels"], settings["max_pixels"])
    dataset = qwen_vl.LlavaDataset(
        folder / "train.json", folder / "images", tiny_processor(tokenizer, images)
    )
    model = tiny_model(tokenizer, settings["seed"]).train()
    trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    loader = _loader(loader_name, dataset, model, settings, world)
    learning_rate = _learning_rate(loader, dataset, settings, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    steps: list[dict] = []
    start = time.perf_counter()
    for indices, weight, batch in _batches(loader):
        loss = trained(**batch).loss
        (loss * weight).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append(
            {"indices": indices, "loss": loss.item(), "computed": batch["input_ids"].numel()}
        )
    seconds = time.perf_counter() - start
    if world > 1:
        torch.distributed.destroy_process_group()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": seconds,
        "peak_rss_mib": peak_kib / 1024,
        "learning_rate": learning_rate,
        "steps": steps,
    }


# -- the suite ----------------------------------------------------------------------------------
def _prepare(config: TrainingConfig, folder: Path) -> tuple[dict, np.ndarray]:
    """Write the records, images, small tokenizer and settings; the data's shape and its
    exact sample lengths (as the training processor makes them)."""
    source = write_synthetic_llava(folder, config.samples, config.seed, SYNTHETIC_LONG_MULTIMODAL)
    tokenizer = small_tokenizer(folder / "tokenizer")
    images = ImageSettings(config.min_pixels, config.max_pixels)
    processor = tiny_processor(tokenizer, images)
    # Records over the maximum length are left out, as a pipeline's length filter would.
    dataset = qwen_vl.LlavaDataset(source, folder / "images", processor)
    fits = [size.length <= config.max_length for size in dataset.estimate_all()]
    kept = [record for record, fit in zip(dataset.records, fits, strict=True) if fit]
    source.write_text(json.dumps(kept))
    data = llava_set(source, folder / "images", processor, config.max_length)
    order = epoch_order(len(data), config.seed)
    batch_size = standard_batch_size(data.lengths, config.budget, order)
    settings = {**asdict(config), "batch_size": batch_size}
    (folder / "settings.json").write_text(json.dumps(settings))
    summary = {**data.summary(), "filtered": fits.count(False)}
    return {"standard_batch_size": batch_size, **summary}, data.lengths


def _launch(folder: Path, loader: str, world: int) -> list[dict]:
    """Run one epoch in fresh processes (under torchrun when ``world > 1``); each rank's
    record."""
    out = folder / f"{loader}-{world}"
    command = [sys.executable, "-m", "odb.benchmarks.training_suite", str(folder), loader, str(out)]
    if world > 1:
        runner = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*runner, f"--nproc_per_node={world}", *command[1:]]
    # Half the cores go to the loader workers, the rest are split over the ranks: more
    # threads than cores made the 1-process epoch times swing 3-15x under load from others.
    threads = str(max(1, (os.cpu_count() or 1) // (2 * world)))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(world)]


def _summarise(
    loader: str, world: int, ranks: list[dict], lengths: np.ndarray, batch_size: int
) -> TrainingRun:
    """One run's figures from its ranks' records (the epoch lasts as long as the slowest)."""
    seen = np.array(
        [i for rank in ranks for step in rank["steps"] for i in step["indices"]], dtype=np.int64
    )
    counts = np.bincount(seen, minlength=len(lengths))
    seconds = max(rank["seconds"] for rank in ranks)
    first = ranks[0]["steps"]
    per_step = np.array([len(step["indices"]) for step in first]) * world
    return TrainingRun(
        loader=loader.replace("-", " "),
        world=world,
        batch_size=batch_size if loader == "standard" else None,
        learning_rate=ranks[0]["learning_rate"],
        steps=len(first),
        seconds=seconds,
        samples_per_second=len(seen) / seconds,
        real_tokens_per_second=float(lengths[seen].sum()) / seconds,
        computed_tokens=sum(step["computed"] for rank in ranks for step in rank["steps"]),
        peak_rss_mib=max(rank["peak_rss_mib"] for rank in ranks),
        missing=int(np.count_nonzero(counts == 0)),
        repeated=int((counts[counts > 1] - 1).sum()),
        losses=[step["loss"] for step in first],
        samples_seen=np.cumsum(per_step).tolist(),
    )


def run_training(
    config: TrainingConfig,
    folder: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> TrainingResult:
    """Every loader of ``config`` for one epoch at every process count; the data is written
    to ``folder`` (a temporary folder by default)."""
    with tempfile.TemporaryDirectory(prefix="odb-train-") as scratch:
        folder = folder or Path(scratch)
        data, lengths = _prepare(config, folder)
        runs = []
        for world in config.worlds:
            for loader in config.loaders:
                ranks = _launch(folder, loader, world)
                runs.append(_summarise(loader, world, ranks, lengths, data["standard_batch_size"]))
                if progress:
                    progress(f"training: {loader}, {world} process(es)")
    return TrainingResult(config, data, runs)


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one epoch of one loader (a run of the suite)")
    parser.add_argument("folder", type=Path)
    parser.add_argument("loader", choices=(*LOADERS, *COMPUTE_LOADERS))
    parser.add_argument("out", help="records go to OUT.RANK.json")
    args = parser.parse_args(argv)
    record = train_once(args.folder, args.loader)
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{args.out}.{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    _main()
