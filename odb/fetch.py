"""Getting processed samples out of the user's Dataset, in worker processes when asked.

The user's ``Dataset.__getitem__`` (template, tokenizer, image processor, augmentation) runs
in a plain ``torch.utils.data.DataLoader`` whose "batches" are chunks of dataset indices; odb
never touches the samples' contents there. Two things keep the trip from the workers cheap:

- samples travel in chunks of ``fetch_size`` indices, one message per chunk;
- small tensors travel by value (as bytes) instead of through one shared-memory segment per
  tensor, which costs far more than the copy for the few kilobytes of ``input_ids`` a sample
  has. Tensors above ``SHARED_MEMORY_BYTES`` (image patches) still use shared memory.

Sending by value fills the workers' result pipe, which needs :class:`WorkerInit` to end the
workers when the training process dies.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from odb.cost import SampleSize, measure_sample
from odb.errors import positive_int

__all__ = [
    "SHARED_MEMORY_BYTES",
    "ChunkSampler",
    "IndexedDataset",
    "MeasuredDataset",
    "WorkerInit",
    "decode_chunk",
    "decode_value",
    "encode_chunk",
    "encode_value",
    "keep_chunk",
]

SHARED_MEMORY_BYTES = 1 << 20
_ORPHAN_POLL_SECONDS = 0.5


class IndexedDataset(torch.utils.data.Dataset):
    """``dataset[i]`` paired with ``i``, so the iterating process knows what it received."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)


class MeasuredDataset(torch.utils.data.Dataset):
    """``dataset[i]``'s size: a worker processes and measures the sample and sends only its
    :class:`~odb.SampleSize` back (probes for step estimates)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __getitem__(self, index: int) -> SampleSize:
        return measure_sample(self.dataset[index], index)

    def __len__(self) -> int:
        return len(self.dataset)


class ChunkSampler:
    """Batch sampler over the index stream the loader sets before each pass."""

    def __init__(self, fetch_size: int):
        self.fetch_size = positive_int("fetch_size", fetch_size)
        self.indices: Iterable[int] = ()

    def __iter__(self) -> Iterator[list[int]]:
        chunk = []
        for index in self.indices:
            chunk.append(int(index))
            if len(chunk) == self.fetch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


class WorkerInit:
    """The inner DataLoader's ``worker_init_fn``: end the worker when the process that
    iterates the loader dies, and run the user's ``worker_init_fn``.

    A worker whose loader process dies without shutting it down (SIGKILL, ``os._exit``) leaves
    torch's worker loop within seconds, but then waits forever at exit for its result queue's
    feeder thread: with chunks sent by value the result pipe is full, and its read end stays
    open in the sibling workers, so the feeder never finishes writing (torch skips that wait
    only on a clean shutdown). A daemon thread ends the worker with ``os._exit`` instead.
    """

    def __init__(self, user_fn: Callable[[int], None] | None = None):
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        # The loader process created the worker: it is the parent under fork and spawn, while
        # under forkserver the parent is the fork server, which stays up while its workers do.
        owner = multiprocessing.parent_process()
        watch = (os.getppid(), owner.pid if owner is not None else os.getppid())
        threading.Thread(
            target=_exit_when_orphaned, args=watch, name="odb-orphan-watch", daemon=True
        ).start()
        if self.user_fn is not None:
            self.user_fn(worker_id)


def _exit_when_orphaned(parent: int, owner: int) -> None:
    while os.getppid() == parent and _running(owner):
        time.sleep(_ORPHAN_POLL_SECONDS)
    os._exit(1)


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs; one that exited but awaits its parent's wait() does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: the pid was reused, ours is gone
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):  # no /proc (macOS): kill() is all there is
        return True


class _TensorBytes:
    """A small tensor as raw bytes plus dtype and shape (pickles by value, no shared memory)."""

    __slots__ = ("data", "dtype", "shape")

    def __init__(self, tensor: torch.Tensor):
        tensor = tensor.detach().contiguous()
        self.data = tensor.reshape(-1).view(torch.uint8).numpy()
        self.dtype = tensor.dtype
        self.shape = tuple(tensor.shape)

    def __getstate__(self):
        return self.data, self.dtype, self.shape

    def __setstate__(self, state):
        self.data, self.dtype, self.shape = state

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.data).view(self.dtype).reshape(self.shape)


def encode_value(value: Any) -> Any:
    """A sample (or any nesting of tensors) made cheap to send from a worker."""
    if isinstance(value, torch.Tensor):
        if (
            value.device.type == "cpu"
            and value.layout == torch.strided
            and value.nbytes <= SHARED_MEMORY_BYTES
        ):
            return _TensorBytes(value)
        return value
    if isinstance(value, Mapping):
        return {key: encode_value(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(encode_value(item) for item in value)
    return value


def decode_value(value: Any) -> Any:
    """What :func:`encode_value` made of a value, back as the worker had it."""
    if isinstance(value, _TensorBytes):
        return value.tensor()
    if type(value) is dict:
        return {key: decode_value(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(decode_value(item) for item in value)
    return value


def encode_chunk(pairs: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """Worker side (the inner DataLoader's collate_fn): make a chunk cheap to send."""
    return [(index, encode_value(sample)) for index, sample in pairs]


def keep_chunk(pairs: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """In-process collate_fn (no workers): nothing to send, nothing to encode."""
    return pairs


def decode_chunk(pairs: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """Iterating side: turn the chunk back into the samples the dataset returned."""
    return [(index, decode_value(sample)) for index, sample in pairs]
