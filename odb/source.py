"""Where one rank's samples come from during a pass: the round engine's source seam.

A source describes itself for the pass's first exchange (its epoch order before sharding and
its dataset, so the ranks can check what they assume of each other), then, once the ranks
agreed whether odb shards the order, yields ``(index, sample)`` pairs in this rank's order,
and reads a sample again by index on request (groups handed over at the end of the data,
the sample a ghost step copies).

- :class:`IndexSource`: a map-style dataset read by index, in DataLoader workers when asked
  (the loader's source).
- :class:`SizeSource`: a list of sample sizes (simulations, step estimates, benchmarks).
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from odb.align import UNKNOWN, fingerprint
from odb.cost import SampleSize
from odb.errors import StateError
from odb.fetch import ChunkSampler, decode_chunk
from odb.stats import LoaderStats

__all__ = ["Source", "IndexSource", "SizeSource", "index_array", "order_fingerprint", "rank_part"]

_PROBES = 3  # samples whose tokens fingerprint a dataset


class Source(ABC):
    """One rank's samples for one pass (see the module docstring)."""

    rereadable = True
    """Whether :meth:`read` works: samples can be read again by index (then groups may be
    handed over between ranks, and a restored pass reads its samples again by index)."""

    @abstractmethod
    def describe(self, *, compare_dataset: bool) -> tuple[int, int, int, int]:
        """(order length, order fingerprint, dataset length, dataset fingerprint or
        ``UNKNOWN``); the dataset's samples are only fingerprinted when ``compare_dataset``."""

    @abstractmethod
    def open(self, shard: tuple[int, int] | None, skip: int, prefix: Sequence[int]) -> None:
        """Start reading: ``prefix`` first (indices a restored pass reads again), then this
        rank's order (its ``shard = (rank, world)`` part when odb shards) from ``skip`` on."""

    @abstractmethod
    def pull(self) -> tuple[int, Any] | None:
        """The next ``(index, sample)``, or None at the end of this rank's order."""

    @abstractmethod
    def read(self, index: int) -> Any:
        """Sample ``index`` read again, in this process."""

    @property
    @abstractmethod
    def size(self) -> int:
        """Samples in this rank's order once opened (0 when unknown)."""

    @abstractmethod
    def borrow(self, rank: int, attempt: int = 0) -> tuple[int, Any] | None:
        """A sample of the dataset for the ghost steps of a rank whose own order is empty
        (another one for each ``attempt``, when one does not fit the budget), or None when the
        dataset is empty."""

    @abstractmethod
    def close(self) -> None:
        """Stop reading (lets DataLoader workers shut down)."""

    def mark(self, oldest: int) -> None:  # noqa: B027 (optional hook)
        """Samples before index ``oldest`` will not be read again (a stream forgets where
        they were)."""

    def state(self, oldest: int) -> dict | None:
        """What a restored pass needs, besides indices, to read every sample from ``oldest``
        on again (a stream's position); None when indices suffice."""
        return None

    def restore(self, state: dict | None) -> None:  # noqa: B027 (optional hook)
        """Take :meth:`state`'s result back before :meth:`open`."""


def order_fingerprint(order: np.ndarray) -> int:
    return fingerprint(np.ascontiguousarray(order, dtype=np.int64).tobytes())


def rank_part(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s part of an epoch order odb shards: every ``world``-th index from its
    rank (parts differ by at most one sample; alignment absorbs the difference)."""
    return order[rank::world]


def index_array(order: Iterable[int]) -> np.ndarray:
    """An epoch order as an index array, iterating a sampler once (a random sampler gives a
    new order at each iteration: the one that is checked must be the one that is read)."""
    if isinstance(order, np.ndarray):
        return order.astype(np.int64, copy=False)
    if isinstance(order, range):
        return np.arange(order.start, order.stop, order.step, dtype=np.int64)
    return np.fromiter((int(i) for i in order), dtype=np.int64)


class IndexSource(Source):
    """A map-style dataset in a given epoch order, fetched by ``fetcher`` (a torch DataLoader
    over :class:`~odb.fetch.IndexedDataset` whose batch sampler is ``chunks``).

    ``fingerprints`` caches the dataset fingerprint across passes (the loader's dict)."""

    def __init__(
        self,
        dataset: Any,
        order: Iterable[int],
        fetcher: torch.utils.data.DataLoader,
        chunks: ChunkSampler,
        *,
        decode: bool,
        stats: LoaderStats,
        fingerprints: dict,
    ):
        self.dataset = dataset
        self._order_source = order
        self._order: np.ndarray | None = None
        self._fetcher, self._chunks, self._decode = fetcher, chunks, decode
        self._stats = stats
        self._fingerprints = fingerprints
        self._stream: Iterator | None = None
        self._received: deque[tuple[int, Any]] = deque()
        self._size = 0

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            self._order = index_array(self._order_source)
        return self._order

    def describe(self, *, compare_dataset: bool) -> tuple[int, int, int, int]:
        order = self._epoch_order()
        dataset_hash = self._dataset_fingerprint() if compare_dataset else UNKNOWN
        return len(order), order_fingerprint(order), len(self.dataset), dataset_hash

    def _dataset_fingerprint(self) -> int:
        """The tokens of a few samples at fixed positions: equal on ranks that read the same
        dataset, different (with near certainty) on ranks that each loaded their own. A
        dataset that cannot be read here, or whose tokens change between reads, gets
        ``UNKNOWN`` or a differing value: then groups are not handed over, which is safe."""
        n = len(self.dataset)
        if n not in self._fingerprints:
            probes = sorted({0, n // 2, n - 1})[:_PROBES] if n else []
            try:
                parts = [
                    np.asarray(torch.as_tensor(self.dataset[i]["input_ids"])).tobytes()
                    for i in probes
                ]
                self._fingerprints[n] = fingerprint(b"|".join(parts))
            except Exception:
                self._fingerprints[n] = UNKNOWN
        return self._fingerprints[n]

    def open(self, shard: tuple[int, int] | None, skip: int, prefix: Sequence[int]) -> None:
        order = self._epoch_order()
        if shard is not None:
            order = rank_part(order, *shard)
        self._size = len(order)
        self._chunks.indices = itertools.chain(prefix, order[skip:])  # lazily: no list of n
        self._stream = iter(self._fetcher)

    def pull(self) -> tuple[int, Any] | None:
        if not self._received:
            if self._stream is None:
                return None
            start = time.perf_counter()
            try:
                chunk = next(self._stream)
            except StopIteration:
                return None
            finally:
                self._stats.wait_seconds += time.perf_counter() - start
            self._received.extend(decode_chunk(chunk) if self._decode else chunk)
        return self._received.popleft()

    def read(self, index: int) -> Any:
        return self.dataset[index]

    def borrow(self, rank: int, attempt: int = 0) -> tuple[int, Any] | None:
        n = len(self.dataset)
        return ((rank + attempt) % n, self.dataset[(rank + attempt) % n]) if n else None

    @property
    def size(self) -> int:
        return self._size

    def close(self) -> None:
        self._stream = None


class SizeSource(Source):
    """A rank's order of ``(index, size)`` pairs over one table of sizes shared by all ranks
    (``sizes[index]``), for simulations: every rank reads "the same dataset"."""

    def __init__(self, order: Sequence[tuple[int, SampleSize]], sizes: Mapping[int, SampleSize]):
        self._pairs = list(order)
        self._sizes = sizes
        self._queue: Iterator[tuple[int, SampleSize]] = iter(())

    def describe(self, *, compare_dataset: bool) -> tuple[int, int, int, int]:
        order = np.array([index for index, _ in self._pairs], dtype=np.int64)
        return len(order), order_fingerprint(order), len(self._sizes), 0

    def open(self, shard: tuple[int, int] | None, skip: int, prefix: Sequence[int]) -> None:
        if shard is not None:
            raise StateError("a simulated rank's order is already its own part")
        again = [(int(i), self._sizes[int(i)]) for i in prefix]
        self._queue = itertools.chain(again, self._pairs[skip:])

    def pull(self) -> tuple[int, SampleSize] | None:
        return next(self._queue, None)

    def read(self, index: int) -> SampleSize:
        return self._sizes[index]

    def borrow(self, rank: int, attempt: int = 0) -> tuple[int, SampleSize] | None:
        if not self._sizes:
            return None
        index = sorted(self._sizes)[(rank + attempt) % len(self._sizes)]
        return index, self._sizes[index]

    @property
    def size(self) -> int:
        return len(self._pairs)

    def close(self) -> None:
        self._queue = iter(())
