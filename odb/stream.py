"""Streams as a round engine source: a torch ``IterableDataset`` or a Hugging Face
``datasets.IterableDataset`` read in order, in DataLoader workers when asked.

A stream has no index to read a sample by, so this module gives each sample one: its position
in this rank's merged stream (0, 1, 2, ... per pass). What makes that position reproducible:

- each worker reads its own part of the stream (the dataset's own split across workers:
  Hugging Face gives each worker some of its shards, a torch ``IterableDataset`` uses
  ``get_worker_info()`` as it would under a torch DataLoader) and sends it in chunks of
  ``fetch_size`` samples, numbered per worker, with the dataset's ``state_dict()`` after the
  chunk;
- the iterating process merges the workers' chunks in a fixed order (chunk 0 of every worker
  by worker id, then chunk 1, ...; a worker whose stream ended drops out), whatever order they
  arrive in.

So a position in the merged stream is fixed by each worker's chunk count and stream state.
The source keeps that record for every chunk that still holds a sample the engine may need
again (buffered, decided but not run, the ghost): :meth:`StreamSource.state` is the record
before the oldest such sample, and a restored pass restarts every worker there, reads the
needed samples again and skips those already emitted.

Splitting across ranks (``shard``): a Hugging Face stream through
``datasets.distributed.split_dataset_by_node`` (its shards when they divide evenly, else every
world-th example); any other stream by keeping every world-th sample of each worker's part
(every rank then reads the whole stream). A stream the user split per rank needs
``shard=False``.
"""

from __future__ import annotations

import copy
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from odb.align import UNKNOWN, fingerprint
from odb.errors import ConfigError, StateError
from odb.fetch import decode_value, encode_value
from odb.source import Source
from odb.stats import LoaderStats

__all__ = ["StreamSource", "is_hf_stream", "is_stream", "stream_length"]


def is_hf_stream(dataset: Any) -> bool:
    """A Hugging Face ``datasets.IterableDataset`` (without importing ``datasets``)."""
    return any(
        cls.__name__ == "IterableDataset" and cls.__module__.startswith("datasets.")
        for cls in type(dataset).__mro__
    )


def is_stream(dataset: Any) -> bool:
    return isinstance(dataset, torch.utils.data.IterableDataset) or is_hf_stream(dataset)


def stream_length(dataset: Any) -> int | None:
    """The stream's length when it states one (``len()``), else None."""
    try:
        return len(dataset)
    except (TypeError, NotImplementedError):
        return None


def _why_not_resumable(dataset: Any) -> str | None:
    """Why the position of ``dataset``'s stream cannot be saved exactly, or None if it can."""
    if not (
        callable(getattr(dataset, "state_dict", None))
        and callable(getattr(dataset, "load_state_dict", None))
    ):
        return (
            f"the stream ({type(dataset).__name__}) has no state_dict()/load_state_dict() to "
            f"say where it is; give it those methods (or use a Hugging Face IterableDataset)"
        )
    if is_hf_stream(dataset) and _holds_shuffle_buffer(dataset):
        return (
            "the Hugging Face stream is shuffled with a buffer (IterableDataset.shuffle), whose "
            "content its state_dict() does not save: a resumed run would lose those examples; "
            "shuffle the data before streaming it, or do not resume mid-epoch"
        )
    return None


def _holds_shuffle_buffer(dataset: Any) -> bool:
    """Whether a Hugging Face stream's pipeline holds a shuffle buffer (its examples iterables,
    walked through their ``ex_iterable``/``ex_iterables`` links: ``datasets`` has no public
    way to ask)."""
    pending = [getattr(dataset, "_ex_iterable", None)]
    while pending:
        node = pending.pop()
        if node is None:
            continue
        if type(node).__name__ == "BufferShuffledExamplesIterable":
            return True
        pending.append(getattr(node, "ex_iterable", None))
        pending.extend(getattr(node, "ex_iterables", None) or [])
    return False


@dataclass
class _WorkerPosition:
    """Where one worker's part of the stream is: chunks sent, stream samples read (kept or
    not), the dataset's state after them (None: the start), and whether it ended."""

    chunks: int = 0
    read: int = 0
    state: Any = None
    ended: bool = False


@dataclass
class _Position:
    """A point of the merged stream: the sequence number of the next sample, and every
    worker's position there."""

    seq: int
    workers: list[_WorkerPosition] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "seq": self.seq,
            "workers": [
                {"chunks": w.chunks, "read": w.read, "state": w.state, "ended": w.ended}
                for w in self.workers
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> _Position:
        return cls(int(data["seq"]), [_WorkerPosition(**w) for w in data["workers"]])


class _Chunks(torch.utils.data.IterableDataset):
    """What each worker runs: its part of the user's stream (from its saved position), in
    chunks ``(worker, chunk number, samples, the worker's position after them)``."""

    def __init__(
        self,
        dataset: Any,
        fetch_size: int,
        every: tuple[int, int] | None,
        starts: list[_WorkerPosition] | None,
        save_state: bool,
    ):
        self.dataset, self.fetch_size, self.every = dataset, fetch_size, every
        self.starts, self.save_state = starts, save_state

    def __iter__(self) -> Iterator[tuple]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        start = self.starts[worker] if self.starts else _WorkerPosition()
        if start.ended:
            return
        dataset = self.dataset
        if start.state is not None:
            dataset = copy.copy(dataset)  # never move the user's own object
            dataset.load_state_dict(start.state)
        chunk, read, samples = start.chunks, start.read, []
        for sample in dataset:
            read += 1
            if self.every is not None and (read - 1) % self.every[1] != self.every[0]:
                continue
            samples.append(sample)
            if len(samples) == self.fetch_size:
                yield worker, chunk, samples, self._after(dataset, chunk, read, False)
                chunk, samples = chunk + 1, []
        yield worker, chunk, samples, self._after(dataset, chunk, read, True)

    def _after(self, dataset: Any, chunk: int, read: int, ended: bool) -> _WorkerPosition:
        state = copy.deepcopy(dataset.state_dict()) if self.save_state else None
        return _WorkerPosition(chunk + 1, read, state, ended)


def _encode(item: tuple) -> tuple:
    worker, chunk, samples, after = item
    return worker, chunk, encode_value(samples), after


def _decode(item: tuple) -> tuple:
    worker, chunk, samples, after = item
    return worker, chunk, decode_value(samples), after


def _keep(item: tuple) -> tuple:
    return item


class StreamSource(Source):
    """One rank's stream for one pass (see the module docstring).

    ``loader_options``: the inner ``torch.utils.data.DataLoader``'s worker settings
    (``num_workers``, ``prefetch_factor``, ``timeout``, ``worker_init_fn``, ...)."""

    rereadable = False

    def __init__(
        self,
        dataset: Any,
        *,
        fetch_size: int,
        loader_options: dict,
        stats: LoaderStats,
    ):
        self.dataset = dataset
        self._fetch_size = fetch_size
        self._options = loader_options
        self._workers = max(1, loader_options.get("num_workers", 0))
        self._stats = stats
        self._why_not = _why_not_resumable(dataset)
        self._restored: _Position | None = None
        self._stream: Iterator | None = None
        self._held: dict[tuple[int, int], tuple] = {}  # chunks received ahead of their turn
        self._samples: deque[tuple[int, Any]] = deque()
        self._position = _Position(0, [_WorkerPosition() for _ in range(self._workers)])
        self._records: deque[_Position] = deque()  # before each merged chunk still needed
        self._turn = (0, 0)  # (chunk, worker) expected next
        self._prefix: deque[int] = deque()
        self._wanted: Counter[int] = Counter()  # prefix indices not yet served, and how often
        self._kept: dict[int, Any] = {}
        self._skip = 0
        self._pulled = 0
        self._decode = False
        self._first_tokens: dict[int, int] = {}  # first sample of each worker -> worker

    # -- the handshake -------------------------------------------------------------------------
    def describe(self, *, compare_dataset: bool) -> tuple[int, int, int, int]:
        """The stream's identity: its stated length, and a fingerprint of what it is (type,
        shards, features, a split per rank already made, and for streams odb splits by sample,
        the worker count each rank's split depends on); no sample is read."""
        dataset = self.dataset
        if is_hf_stream(dataset):
            split = getattr(dataset, "_distributed", None)
            text = (
                f"hf|{dataset.num_shards}|{dataset.features}|"
                f"{None if split is None else (split.rank, split.world_size)}"
            )
        else:
            text = f"torch|{type(dataset).__module__}.{type(dataset).__qualname__}|{self._workers}"
        length = stream_length(dataset)
        return (
            UNKNOWN if length is None else length,
            fingerprint(text.encode()),
            UNKNOWN,
            UNKNOWN,
        )

    # -- reading -------------------------------------------------------------------------------
    def restore(self, state: dict) -> None:
        if state["workers"] != self._workers:
            raise StateError(
                f"the stream's position was saved with {state['workers']} DataLoader worker(s); "
                f"each worker reads its own part of the stream, so resume with the same number "
                f"(now {self._workers})"
            )
        self._restored = _Position.from_dict(state["position"])

    def open(self, shard: tuple[int, int] | None, skip: int, prefix: Sequence[int]) -> None:
        dataset, every = self.dataset, None
        if shard is not None:
            if is_hf_stream(dataset):
                from datasets.distributed import split_dataset_by_node

                dataset = split_dataset_by_node(dataset, rank=shard[0], world_size=shard[1])
                dataset.set_epoch(self.dataset.epoch)  # the split starts at epoch 0
            else:
                every = shard
        start = self._restored
        if start is not None:
            self._position = start
        self._turn = self._first_turn()
        self._prefix, self._wanted = deque(prefix), Counter(prefix)
        self._skip = skip
        options = dict(self._options)
        workers = options.get("num_workers", 0)
        chunks = _Chunks(
            dataset,
            self._fetch_size,
            every,
            None if start is None else start.workers,
            self._why_not is None,
        )
        self._stream = iter(
            torch.utils.data.DataLoader(
                chunks, batch_size=None, collate_fn=_encode if workers else _keep, **options
            )
        )
        self._decode = bool(workers)

    def _first_turn(self) -> tuple[int, int] | None:
        """The (chunk, worker) the merge takes next from the current position."""
        live = [(w.chunks, i) for i, w in enumerate(self._position.workers) if not w.ended]
        return min(live) if live else None

    def _next_chunk(self) -> bool:
        """Merge the next chunk in turn into the samples; False at the end of the stream."""
        if self._turn is None:
            return False
        while self._turn not in self._held:
            start = time.perf_counter()
            try:
                item = next(self._stream)
            except StopIteration:
                raise StateError(
                    f"the stream's workers stopped before worker {self._turn[1]} sent its chunk "
                    f"{self._turn[0]}"
                ) from None
            finally:
                self._stats.wait_seconds += time.perf_counter() - start
            worker, chunk, samples, after = _decode(item) if self._decode else item
            if chunk == 0 and samples:
                self._check_split(worker, samples[0])
            self._held[(chunk, worker)] = (samples, after)
        samples, after = self._held.pop(self._turn)
        position = self._position
        if self._why_not is None:
            self._records.append(position)  # never changed: each chunk makes a new one
        workers = list(position.workers)
        workers[self._turn[1]] = after
        first = position.seq
        self._position = _Position(first + len(samples), workers)
        self._samples.extend(zip(range(first, first + len(samples)), samples, strict=True))
        self._turn = self._first_turn()
        return True

    def _check_split(self, worker: int, sample: Any) -> None:
        """Refuse a torch stream that every worker reads whole (it does not split itself with
        ``get_worker_info()``): each sample would be trained once per worker. Seen when two
        workers start with the same tokens; a stream whose parts really start alike is
        refused too, and can be read with ``num_workers <= 1``."""
        if self._workers < 2 or is_hf_stream(self.dataset):
            return  # Hugging Face gives each worker its own shards
        try:
            tokens = np.asarray(torch.as_tensor(sample["input_ids"])).tobytes()
        except Exception:
            return  # not a sample: measuring it names the problem
        other = self._first_tokens.setdefault(fingerprint(tokens), worker)
        if other != worker:
            raise ConfigError(
                f"DataLoader workers {other} and {worker} read the same stream: their first "
                f"samples are equal. A torch IterableDataset read by several workers must give "
                f"each worker its own part (torch.utils.data.get_worker_info()), or every "
                f"sample is trained once per worker; or use num_workers=0 or 1"
            )

    def _next_sample(self) -> tuple[int, Any] | None:
        while not self._samples:
            if not self._next_chunk():
                return None
        return self._samples.popleft()

    def pull(self) -> tuple[int, Any] | None:
        if self._prefix:  # a restored pass: the samples its state names, in its order
            index = self._prefix.popleft()
            while index not in self._kept:
                pair = self._next_sample()
                if pair is None:
                    raise StateError(
                        f"the stream ended before sample {index} of the saved pass: it does "
                        f"not yield what it yielded when the state was saved"
                    )
                if pair[0] in self._wanted:
                    self._kept[pair[0]] = pair[1]
            self._wanted[index] -= 1  # a ghost may also be in a pending step: served twice
            sample = self._kept[index] if self._wanted[index] else self._kept.pop(index)
            return index, sample
        while True:
            pair = self._next_sample()
            if pair is None:
                return None
            if pair[0] >= self._skip:  # below: emitted before the state was saved
                self._pulled += 1
                return pair

    def read(self, index: int) -> Any:
        raise StateError(f"a stream cannot read sample {index} again by index")

    def borrow(self, rank: int, attempt: int = 0) -> None:
        return None  # nothing to read by index: the engine gets a ghost from another rank

    @property
    def size(self) -> int:
        """Samples read so far (a stream's length is unknown until it ends)."""
        return self._skip + self._pulled

    def close(self) -> None:
        self._stream = None
        self._held.clear()

    # -- resume --------------------------------------------------------------------------------
    def mark(self, oldest: int) -> None:
        """Samples before ``oldest`` will not be read again: forget positions before them."""
        records = self._records
        while len(records) > 1 and records[1].seq <= oldest:
            records.popleft()

    def state(self, oldest: int) -> dict:
        """The position from which a restored pass reads again every sample from ``oldest``
        on; raises :class:`StateError` when the stream cannot save its position."""
        if self._why_not is not None:
            raise StateError(f"odb cannot save this stream's position: {self._why_not}")
        self.mark(oldest)
        if self._records and self._records[0].seq <= oldest:
            position = self._records[0]
        else:
            position = self._position
        return {"workers": self._workers, "position": position.as_dict()}
