"""Steps per epoch, estimated before the epoch runs (for progress bars and LR schedules).

odb only knows a sample's length once the user's pipeline has produced it, so the number of
batches of an epoch is not known in advance. The estimate measures a seeded probe of the
dataset (through ``dataset.estimate(index)`` when the dataset offers a cheap length estimate,
otherwise by processing the probed samples in the loader's workers), resamples those sizes to
the dataset's size, and runs the loader's own round engine on them for every rank
(odb/simulate.py).

A stream (a torch or Hugging Face IterableDataset) has no index to probe at random: its first
samples are measured instead, read in this process from a fresh iteration of the stream, and
its length must be known (the loader's ``num_samples``, or the stream's ``len()``).

When every sample's size is known without processing (``LlavaDataset.estimate_all()``),
:func:`count_steps` gives the exact count instead, for the epoch's real order.

Neither decides what is trained: batches are always built from measured lengths.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from odb.cost import SampleSize, measure_sample
from odb.errors import ConfigError
from odb.simulate import simulate

__all__ = ["estimate_steps", "count_steps", "probe_sizes"]

_SIMULATED_SAMPLES = 20_000  # beyond this, simulate a part and scale: steps grow linearly


def probe_sizes(dataset, count: int, seed: int, measure=None) -> list[SampleSize]:
    """Sizes of ``count`` seeded random samples: ``dataset.estimate(i)`` when available, else
    ``measure(indices)`` (an odb loader's ``measure``, which processes them in its workers),
    else processed and measured in this process."""
    n = len(dataset)
    indices = np.random.default_rng([seed, 0x0DB]).choice(n, size=min(count, n), replace=False)
    if hasattr(dataset, "estimate"):
        return [dataset.estimate(int(i)) for i in indices]
    if measure is not None:
        return measure(indices)
    return [measure_sample(dataset[int(i)], int(i)) for i in indices]


def estimate_steps(loader, probe: int = 256) -> int:
    """Expected number of batches of one epoch on each rank of ``loader`` (an odb.DataLoader).

    Every rank computes the same value when the dataset is deterministic. A probed sample
    over the budget counts as a batch of its own (under ``over_budget="error"`` the real pass
    would stop on it).

    A stream: its length over all ranks is ``loader.epoch_samples()`` (a collective when each
    rank holds its own stream of stated length: call it on every rank), spread evenly over the
    ranks; raises :class:`ConfigError` when that length is unknown.
    """
    n, world = _epoch_extent(loader)
    if n == 0:
        return 0
    sizes = _probe(loader, probe)
    if not sizes:
        raise ConfigError(f"the stream yielded no sample to measure, yet its length is {n}")
    simulated = min(n, _SIMULATED_SAMPLES)
    picks = np.random.default_rng([loader.seed, 0x0DB, 1]).integers(0, len(sizes), simulated)
    shards = [
        [(int(i), sizes[picks[i]]) for i in range(rank, simulated, world)] for rank in range(world)
    ]
    policy = "solo" if loader.over_budget == "error" else loader.over_budget
    steps = _replay(loader, shards, over_budget=policy, steps_multiple_of=1) * n / simulated
    multiple = loader.steps_multiple_of
    return max(1, math.ceil(steps / multiple)) * multiple


def _probe(loader, count: int) -> list[SampleSize]:
    """Sizes to resample: seeded random samples of a dataset (``dataset.estimate(i)`` when it
    has one, else processed and measured in the loader's workers), or the first ``count``
    samples of a fresh iteration of a stream (it cannot be read at random), read here."""
    if not loader.streaming:
        return probe_sizes(loader.dataset, count, loader.seed, measure=loader.measure)
    first = itertools.islice(iter(loader.dataset), count)
    return [measure_sample(sample, i) for i, sample in enumerate(first)]


def _epoch_extent(loader) -> tuple[int, int]:
    """The samples one epoch simulates, and over how many ranks they are spread."""
    if not loader.streaming:
        return len(loader.dataset), len(loader.shard_orders(0))
    try:
        n = loader.epoch_samples()
    except ConfigError as error:
        raise ConfigError(
            f"odb cannot estimate the steps of a stream of unknown length: {error}"
        ) from None
    return n, loader._world().world_size


def count_steps(loader, sizes: list[SampleSize], epoch: int = 0) -> int:
    """The exact number of batches ``loader`` yields in ``epoch`` on each rank, given the size
    of every sample of its dataset (``sizes[i]`` for index ``i``), as long as the dataset's
    lengths are deterministic. Runs the loader's round engine on the epoch's real order and
    shards, with its over-budget policy; reads no sample. Not for streams (no index order)."""
    if loader.streaming:
        raise ConfigError(
            "count_steps replays an epoch's index order, which a stream does not have; use "
            "estimate_steps (with the stream's num_samples) instead"
        )
    if len(sizes) != len(loader.dataset):
        raise ConfigError(f"{len(sizes)} sizes given for a dataset of {len(loader.dataset)}")
    shards = [[(int(i), sizes[i]) for i in order] for order in loader.shard_orders(epoch)]
    return _replay(loader, shards, epoch=epoch)


def _replay(loader, shards, *, epoch: int = 0, **overrides) -> int:
    """Steps per rank of one pass of ``loader``'s round engine over ``shards`` of sizes, with
    the loader's settings (``overrides`` replace ``over_budget`` or ``steps_multiple_of``)."""
    options = {
        "over_budget": loader.over_budget,
        "steps_multiple_of": loader.steps_multiple_of,
        **overrides,
    }
    result = simulate(
        shards,
        loader.settings,
        join=loader.join,
        share_tail=loader.share_tail,
        seed=loader.seed,
        epoch=epoch,
        **options,
    )
    return len(result.steps[0])
