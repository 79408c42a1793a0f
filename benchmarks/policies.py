"""Batching policies compared on the same samples: each turns one epoch into batches.

A batch is an array of sample indices. The policies:

- ``standard``: what most trainers do: a shuffled epoch cut into fixed-size batches.
- ``sorted``: the whole epoch sorted by length and cut into max-token batches; it needs every
  length before training starts, so it is the offline best case for padding, not something
  a trainer reading processed samples online can do.
- ``gmt`` / ``bmt`` oracles: offline max-token batching from an exact length cache, the way
  length-grouped samplers do it: the shuffled epoch (GMT, global max-tokens) or each
  mega-bucket of 4096 consecutive samples of it (BMT, bucketed max-tokens) planned whole, then
  its batches shuffled, so training sees no length curriculum.
- ``odb padded`` / ``odb packed``: the very round code ``odb.DataLoader`` runs (buffer, planner,
  alignment decision), fed sizes instead of samples, so the figures are odb's, not a model of
  it.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from odb.buffer import RoundSettings
from odb.cost import Budget, PackedCost, PaddedCost, SampleSize
from odb.planner import plan_groups
from odb.simulate import Simulation, simulate

__all__ = [
    "BMT_BUCKET",
    "PolicyRun",
    "epoch_order",
    "odb_batches",
    "odb_simulation",
    "oracle_batches",
    "sorted_batches",
    "standard_batch_size",
    "standard_batches",
    "text_sizes",
]

STANDARD = "standard"
SORTED = "sorted"
BMT_BUCKET = 4096
"""Samples per mega-bucket of the BMT oracle."""


@dataclass(frozen=True)
class PolicyRun:
    """One epoch of one policy: its batches, whether they are packed rows (no padding), and,
    for odb, CPU seconds: ``plan_seconds`` inside the planner, ``round_seconds`` in the whole
    rounds (see :func:`odb_simulation`)."""

    name: str
    batches: list[np.ndarray]
    packed: bool = False
    plan_seconds: float | None = None
    round_seconds: float | None = None


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


def oracle_batches(
    lengths: np.ndarray, budget: int, seed: int, packed: bool, bucket: int | None = None
) -> PolicyRun:
    """Max-token batches planned offline from exact lengths: GMT (``bucket=None``) or BMT.

    The shuffled epoch (:func:`epoch_order`) is cut into mega-buckets of ``bucket`` consecutive
    samples (one bucket holding the whole epoch for GMT); each bucket is planned whole by odb's
    planner with every sample known: padded, sorted by length and cut greedily longest first
    with ``n * max_len <= budget``; packed, best-fit decreasing into rows of ``sum(len) <=
    budget``. The batches of each bucket are then shuffled; buckets stay in epoch order.
    A sample over the budget goes alone.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = epoch_order(len(lengths), seed)
    limit = Budget(budget, PackedCost() if packed else PaddedCost())
    step = bucket or max(1, len(order))
    rng = np.random.default_rng([seed, 1])
    batches: list[np.ndarray] = []
    for start in range(0, len(order), step):
        members = order[start : start + step]
        zeros = np.zeros(len(members), dtype=np.int64)
        plan = plan_groups(
            lengths[members],
            zeros,
            zeros,
            zeros,
            lengths[members] > budget,
            limit,
            fill_threshold=1.0,
            max_wait=1,
            keep=len(members),
            final=True,
        )
        groups = [members[group.members] for group in plan.groups]
        batches.extend(groups[i] for i in rng.permutation(len(groups)))
    kind = "gmt" if bucket is None else "bmt"
    return PolicyRun(f"{kind} {'packed' if packed else 'padded'}", batches, packed=packed)


def text_sizes(lengths: np.ndarray, label_tokens: np.ndarray | None = None) -> list[SampleSize]:
    """Sizes of text-only samples; without ``label_tokens`` every next token is a target
    (label counts only matter for loss scaling, not for planning)."""
    labels = np.asarray(lengths) - 1 if label_tokens is None else np.asarray(label_tokens)
    return [SampleSize(int(n), int(k)) for n, k in zip(lengths, labels, strict=True)]


def odb_name(budget: Budget) -> str:
    mode = "padded" if budget.cost.padded else "packed"
    return f"odb compute {mode}" if budget.cost.prices_compute else f"odb {mode}"


def odb_simulation(
    sizes: Sequence[SampleSize],
    budget: Budget,
    seed: int,
    world: int = 1,
    window: int = 1024,
    round_size: int | None = None,
    epoch: int = 0,
) -> tuple[Simulation, float]:
    """One epoch of ``world`` ranks through the loader's own round engine
    (:func:`odb.simulate.simulate`), each rank reading every ``world``-th index of the order
    ``odb.DataLoader`` reads with ``shuffle=True``; and the process CPU seconds it took.

    The clock (``time.process_time``: CPU time, which a busy machine does not inflate as it
    does wall time) covers the rounds of every simulated rank (intake, plan, exchange, decide,
    take), i.e. the loader's own work, without the user's pipeline or collation. Objects that
    exist before the run are frozen out of the garbage collector meanwhile: otherwise a full
    collection over everything a benchmark has kept so far (earlier runs' batches) lands in
    some run's rounds, which then measure up to 5x slower than in a fresh process.
    """
    settings = RoundSettings.create(budget, window=window, round_size=round_size)
    order = epoch_order(len(sizes), seed, epoch)
    shards = [[(int(i), sizes[i]) for i in order[rank::world]] for rank in range(world)]
    gc.collect()
    gc.freeze()
    try:
        start = time.process_time()
        simulation = simulate(shards, settings, seed=seed, epoch=epoch)
        seconds = time.process_time() - start
    finally:
        gc.unfreeze()
    return simulation, seconds


def odb_batches(
    sizes: Sequence[SampleSize],
    budget: Budget,
    seed: int,
    window: int = 1024,
    round_size: int | None = None,
    epoch: int = 0,
) -> PolicyRun:
    """One epoch of one process through odb's rounds (see :func:`odb_simulation`), with the
    CPU time of its planner calls (``LoaderStats.planner_cpu_seconds``) and of its rounds."""
    simulation, seconds = odb_simulation(sizes, budget, seed, 1, window, round_size, epoch)
    batches = [
        np.array(s.sample_indices, dtype=np.int64) for s in simulation.steps[0] if not s.ghost
    ]
    return PolicyRun(
        odb_name(budget),
        batches,
        packed=not budget.cost.padded,
        plan_seconds=simulation.stats[0].planner_cpu_seconds,
        round_seconds=seconds,
    )
