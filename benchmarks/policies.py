"""Batching policies compared on the same samples: each turns one epoch into batches.

A batch is an array of sample indices. The policies:

- ``standard``: what most trainers do: a shuffled epoch cut into fixed-size batches.
- ``sorted``: the whole epoch sorted by length and cut into max-token batches; it needs every
  length before training starts, so it is the offline best case for padding, not something
  a trainer reading processed samples online can do.
- ``odb padded`` / ``odb packed``: the very round code ``odb.DataLoader`` runs (buffer, planner,
  alignment decision), fed sizes instead of samples, so the figures are odb's, not a model of
  it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from odb.buffer import RoundSettings
from odb.cost import Budget, SampleSize
from odb.simulate import simulate

__all__ = [
    "PolicyRun",
    "epoch_order",
    "odb_batches",
    "sorted_batches",
    "standard_batch_size",
    "standard_batches",
    "text_sizes",
]

STANDARD = "standard"
SORTED = "sorted"


@dataclass(frozen=True)
class PolicyRun:
    """One epoch of one policy: its batches, whether they are packed rows (no padding), and,
    for odb, the seconds spent planning."""

    name: str
    batches: list[np.ndarray]
    packed: bool = False
    plan_seconds: float | None = None


def epoch_order(n: int, seed: int, epoch: int = 0) -> np.ndarray:
    """The shuffled index order of an epoch, the same permutation ``odb.DataLoader`` uses with
    ``shuffle=True``, so every online policy sees the samples in the same order."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _fixed_size(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _padded_per_batch(lengths: np.ndarray, order: np.ndarray, batch_size: int) -> np.ndarray:
    """``n * max_len`` of every fixed-size batch of ``order`` (the last one may be short)."""
    starts = np.arange(0, len(order), batch_size)
    longest = np.maximum.reduceat(lengths[order], starts)
    sizes = np.diff(np.append(starts, len(order)))
    return sizes * longest


def standard_batch_size(
    lengths: np.ndarray, budget: int, order: np.ndarray, percent: int = 99
) -> int:
    """The largest fixed batch size whose batches of ``order`` stay within ``budget`` padded
    tokens in at least ``percent``% of cases (at least 1).

    This matches the memory envelope of the token-budget policies: a user picks the batch size
    that does not run out of memory on nearly every step. The search grows the batch size until
    it first fails.
    """
    lengths = np.asarray(lengths)
    # Beyond budget // shortest even the batch of the shortest samples is over budget.
    largest = min(len(order), budget // max(1, int(lengths.min(initial=budget))))
    size = 1
    while size < largest:
        padded = _padded_per_batch(lengths, order, size + 1)
        if 100 * np.count_nonzero(padded <= budget) < percent * len(padded):
            break
        size += 1
    return size


def standard_batches(
    lengths: np.ndarray, budget: int, seed: int, batch_size: int | None = None
) -> PolicyRun:
    """A shuffled epoch in fixed-size batches (``batch_size``, or the headline size from
    :func:`standard_batch_size`)."""
    order = epoch_order(len(lengths), seed)
    size = batch_size or standard_batch_size(lengths, budget, order)
    return PolicyRun(STANDARD, _fixed_size(order, size))


def sorted_batches(lengths: np.ndarray, budget: int) -> PolicyRun:
    """The epoch sorted by length, longest first, cut greedily into batches with
    ``n * max_len <= budget`` (a sample longer than the budget goes alone)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    batches = []
    start = 0
    while start < len(order):
        size = max(1, budget // int(lengths[order[start]]))
        batches.append(order[start : start + size])
        start += size
    return PolicyRun(SORTED, batches)


def text_sizes(lengths: np.ndarray, label_tokens: np.ndarray | None = None) -> list[SampleSize]:
    """Sizes of text-only samples; without ``label_tokens`` every next token is a target
    (label counts only matter for loss scaling, not for planning)."""
    labels = np.asarray(lengths) - 1 if label_tokens is None else np.asarray(label_tokens)
    return [SampleSize(int(n), int(k)) for n, k in zip(lengths, labels, strict=True)]


def odb_batches(
    sizes: Sequence[SampleSize],
    budget: Budget,
    seed: int,
    window: int = 1024,
    round_size: int | None = None,
    epoch: int = 0,
) -> PolicyRun:
    """One epoch of one process through the loader's own round code
    (:func:`odb.simulate.simulate`), in the order ``odb.DataLoader`` reads with
    ``shuffle=True``.

    The clock covers the rounds (refill, plan, decide, take), i.e. the planner's share of a
    real loader, without the user's pipeline or collation.
    """
    settings = RoundSettings.create(budget, window=window, round_size=round_size)
    shard = [(int(i), sizes[i]) for i in epoch_order(len(sizes), seed, epoch)]
    start = time.perf_counter()
    simulation = simulate([shard], settings, seed=seed, epoch=epoch)
    seconds = time.perf_counter() - start
    batches = [np.array(step.indices, dtype=np.int64) for step in simulation.steps[0]]
    padded = budget.cost.padded
    name = "odb padded" if padded else "odb packed"
    return PolicyRun(name, batches, packed=not padded, plan_seconds=seconds)
