"""Packed rows through sdpa's dense mask or through ``odb_packed``, against padded batches.

One process, one tiny Qwen2.5-VL (``qwen_vl_offline.tiny_model``), the same batches of the same
synthetic LLaVA samples (shaped like long-multimodal, as the training suite's), forward and
backward three ways, interleaved batch by batch so that load from other processes falls on all
three alike:

- ``padded sdpa``: ``qwen_vl.collator(model, "padded")``, attention ``sdpa``;
- ``packed sdpa``: one packed row, attention ``sdpa``: transformers builds a dense
  block-diagonal ``row x row`` mask;
- ``packed odb_packed``: the same row, ``qwen_vl.use_packed_attention`` (attention within each
  sample).

The batches are odb's groups under ``budget`` tokens (``odb.DataLoader``): its padded groups for
the padded variant, its packed groups, run through both kernels, for the packed ones; all three
go through the same samples. Run with
``python -m odb.benchmarks.attention_kernels [--samples N] [--budget T] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import odb
from odb.adapters import qwen_vl

from .llava_input import SYNTHETIC_LONG_MULTIMODAL, write_synthetic_llava
from .qwen_vl_offline import ImageSettings, small_tokenizer, tiny_model, tiny_processor

__all__ = ["VARIANTS", "KernelConfig", "KernelRun", "measure_kernels"]

VARIANTS = ("padded sdpa", "packed sdpa", "packed odb_packed")


@dataclass(frozen=True)
class KernelConfig:
    """``samples`` synthetic records (over ``max_length`` tokens left out), grouped under a
    token ``budget`` per batch; every batch runs ``repeats`` times per variant on ``threads``
    torch threads."""

    samples: int = 48
    max_length: int = 2048
    budget: int = 8192
    repeats: int = 2
    threads: int = 1
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 28 * 28 * 256
    seed: int = 0


@dataclass(frozen=True)
class KernelRun:
    """One variant over all its batches: computed tokens and attention pairs (what the kernel
    visits: ``n * max_len**2`` padded, ``row**2`` through a dense mask, ``sum(len**2)``
    per sample), and seconds of forward + backward (per batch the best of the repeats,
    summed)."""

    variant: str
    batches: int
    samples: int
    tokens: int
    attention_pairs: int
    seconds: float


def _groups(dataset: Any, budget: int, seed: int, mode: str) -> list[list[int]]:
    """odb's groups (sample indices) under ``budget`` tokens in ``mode``; collated later."""
    loader = odb.DataLoader(dataset, budget, mode=mode, collate_fn=lambda _: {}, seed=seed)
    return [list(odb.step_info(batch).sample_indices) for batch in loader]


def _step(model: Any, batch: dict) -> tuple[float, float]:
    """Seconds of one forward + backward, and its loss."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    return time.perf_counter() - start, loss.item()


def _pairs(variant: str, lengths: list[int]) -> int:
    if variant.startswith("padded"):
        return len(lengths) * max(lengths) ** 2
    if variant == "packed sdpa":
        return sum(lengths) ** 2
    return sum(n * n for n in lengths)


def measure_kernels(config: KernelConfig, folder: Path) -> tuple[list[KernelRun], float]:
    """Write the data to ``folder`` and run the three variants side by side; the runs and the
    largest difference between the two packed variants' losses (the same rows)."""
    torch.set_num_threads(config.threads)
    source = write_synthetic_llava(folder, config.samples, config.seed, SYNTHETIC_LONG_MULTIMODAL)
    tokenizer = small_tokenizer(folder / "tokenizer")
    images = ImageSettings(config.min_pixels, config.max_pixels)
    dataset = qwen_vl.LlavaDataset(source, folder / "images", tiny_processor(tokenizer, images))
    keep = [i for i, size in enumerate(dataset.estimate_all()) if size.length <= config.max_length]
    kept = torch.utils.data.Subset(dataset, keep)
    sdpa = tiny_model(tokenizer, config.seed).train()
    packed = qwen_vl.use_packed_attention(copy.deepcopy(sdpa))
    models = {"padded sdpa": sdpa, "packed sdpa": sdpa, "packed odb_packed": packed}
    padded_collate = qwen_vl.collator(sdpa, "padded")
    packed_collate = qwen_vl.collator(packed, "packed")  # the same rows for both kernels
    plans = {mode: _groups(kept, config.budget, config.seed, mode) for mode in ("padded", "packed")}
    totals = {v: {"seconds": 0.0, "tokens": 0, "pairs": 0, "batches": 0} for v in VARIANTS}
    loss_gap = 0.0
    for number in range(max(map(len, plans.values()))):
        batches, lengths = {}, {}
        for mode, groups in plans.items():
            if number < len(groups):
                samples = [kept[i] for i in groups[number]]
                collate = padded_collate if mode == "padded" else packed_collate
                batches[mode] = collate(samples)
                lengths[mode] = [len(sample["input_ids"]) for sample in samples]
        variants = [v for v in VARIANTS if v.split()[0] in batches]
        best, loss = dict.fromkeys(variants, float("inf")), {}
        for repeat in range(config.repeats):
            shift = (number + repeat) % len(variants)  # rotate which variant runs first
            for variant in variants[shift:] + variants[:shift]:
                mode = variant.split()[0]
                seconds, loss[variant] = _step(models[variant], batches[mode])
                best[variant] = min(best[variant], seconds)
        for variant in variants:
            mode = variant.split()[0]
            total = totals[variant]
            total["seconds"] += best[variant]
            total["tokens"] += batches[mode]["input_ids"].numel()
            total["pairs"] += _pairs(variant, lengths[mode])
            total["batches"] += 1
        if "packed" in batches:
            loss_gap = max(loss_gap, abs(loss["packed sdpa"] - loss["packed odb_packed"]))
    runs = [
        KernelRun(variant, t["batches"], len(keep), t["tokens"], t["pairs"], t["seconds"])
        for variant, t in totals.items()
    ]
    return runs, loss_gap


def table(runs: list[KernelRun]) -> str:
    """A Markdown table, times relative to padded sdpa."""
    base = runs[0].seconds
    lines = [
        "| variant | batches | computed tokens | attention pairs | seconds (fwd+bwd) "
        "| vs padded sdpa |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {run.variant} | {run.batches} | {run.tokens:,} | {run.attention_pairs:,} | "
            f"{run.seconds:.2f} | {base / run.seconds:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = KernelConfig()
    for name in ("samples", "max_length", "budget", "repeats", "threads", "seed"):
        option = f"--{name.replace('_', '-')}"
        parser.add_argument(option, type=int, default=getattr(defaults, name))
    args = parser.parse_args(argv)
    config = KernelConfig(**vars(args))
    with tempfile.TemporaryDirectory(prefix="odb-kernels-") as folder:
        runs, loss_gap = measure_kernels(config, Path(folder))
    print(f"{runs[0].samples} samples, budget {config.budget}, threads {config.threads}")
    print(table(runs))
    print(f"largest loss difference, packed sdpa vs odb_packed (same rows): {loss_gap:.2e}")


if __name__ == "__main__":
    main()
