"""How one rank talks to the others: an all_gather of equal-width int64 rows.

The round engine (odb/engine.py) only ever calls :meth:`Exchange.gather`; which transport
carries the rows is this module's business, so the loader, the simulator and the tests run
the very same protocol code:

- :class:`LocalExchange`: one process; the table is the row itself.
- :class:`GlooExchange`: torch.distributed, on a dedicated gloo group (works whatever backend
  trains), with a timeout.
- :class:`InProcessGroup`: N ranks as N threads of one process (simulations, property tests,
  several real loaders in one test), rows meeting at a barrier.

:func:`world_exchange` picks a process's own (gloo or local), for the loader and the GRPO
adapter alike.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from odb.errors import AlignmentError, ConfigError

__all__ = [
    "Exchange",
    "LocalExchange",
    "GlooExchange",
    "InProcessGroup",
    "run_ranks",
    "world_exchange",
]


class Exchange(Protocol):
    """What a rank needs to take part in the alignment protocol."""

    rank: int
    world_size: int

    def gather(self, row: np.ndarray) -> np.ndarray:
        """Every rank's ``row`` (int64, the same width on every rank), stacked by rank."""
        ...


class LocalExchange:
    """One process: the table is the row itself."""

    rank = 0
    world_size = 1

    def gather(self, row: np.ndarray) -> np.ndarray:
        return row[None, :]


_GLOO_GROUPS: dict[int, object] = {}  # one alignment group per default process group


def _round_failed(rank: int, timeout: float, error: BaseException) -> AlignmentError:
    return AlignmentError(
        f"rank {rank}: an alignment round failed: a peer rank died, raised outside the loader, "
        f"or did not reach the round within {timeout:g} s ({error})"
    )


class GlooExchange:
    """Rows travel over a dedicated gloo group, created once per process.

    A dedicated group keeps odb's collectives apart from the training's own (NCCL, or DDP's
    gradient all-reduce running on another thread), and gloo works on CPU tensors whatever
    backend trains. Every collective has a timeout; a peer that died or stopped answering
    becomes an :class:`AlignmentError` rather than a hang.
    """

    def __init__(self, timeout: float):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("GlooExchange needs an initialised torch.distributed process group")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.timeout = timeout
        key = id(dist.group.WORLD)
        if key not in _GLOO_GROUPS:
            _GLOO_GROUPS[key] = dist.new_group(
                backend="gloo", timeout=datetime.timedelta(seconds=timeout)
            )
        self.group = _GLOO_GROUPS[key]

    def gather(self, row: np.ndarray) -> np.ndarray:
        import torch.distributed as dist

        local = torch.from_numpy(np.ascontiguousarray(row, dtype=np.int64))
        table = [torch.empty_like(local) for _ in range(self.world_size)]
        try:
            dist.all_gather(table, local, group=self.group)
        except Exception as error:  # gloo raises RuntimeError subclasses on timeout / lost peer
            raise _round_failed(self.rank, self.timeout, error) from error
        return torch.stack(table).numpy()


def world_exchange(timeout: float) -> Exchange:
    """This process's exchange: a :class:`GlooExchange` with ``timeout`` when
    torch.distributed runs more than one rank, else a :class:`LocalExchange`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return GlooExchange(timeout)
    return LocalExchange()


class InProcessGroup:
    """``world`` ranks in one process, one thread each: ``group.exchange(r)`` is rank r's
    :class:`Exchange`. A gather completes when every rank's row is in; a rank that stops
    taking part (its work returned or raised) is announced with :meth:`leave`, and then every
    rank waiting in, or later entering, a gather that cannot complete fails as a gloo peer
    would. A gather that completed stays complete for every rank, whatever happens after it."""

    def __init__(self, world: int, timeout: float = 120.0):
        if world < 1:
            raise ConfigError(f"an in-process group needs at least one rank, got {world}")
        self.world = world
        self.timeout = timeout
        self._cond = threading.Condition()
        self._rows: list[np.ndarray | None] = [None] * world
        self._arrived = 0
        self._generation = 0  # gathers completed
        self._result: np.ndarray | AlignmentError | None = None  # the last completed gather's
        self._gone: set[int] = set()
        self._timed_out = False

    def exchange(self, rank: int) -> _InProcessExchange:
        return _InProcessExchange(self, rank)

    def leave(self, rank: int) -> None:
        """Rank ``rank`` takes part in no further gather."""
        with self._cond:
            self._gone.add(rank)
            self._cond.notify_all()

    def _broken(self) -> str | None:
        if self._timed_out:
            return "an earlier gather timed out"
        if self._gone:
            return f"rank(s) {sorted(self._gone)} stopped taking part"
        return None

    def _gather(self, rank: int, row: np.ndarray) -> np.ndarray:
        row = np.asarray(row, dtype=np.int64).copy()
        with self._cond:
            generation = self._generation
            why = self._broken()
            if why is None:
                self._rows[rank] = row
                self._arrived += 1
                if self._arrived == self.world:  # every row is in: complete this gather
                    widths = {len(r) for r in self._rows}  # type: ignore[arg-type]
                    self._result = (
                        AlignmentError(f"ranks sent rows of different widths {sorted(widths)}")
                        if len(widths) != 1
                        else np.stack(self._rows)  # type: ignore[arg-type]
                    )
                    self._rows = [None] * self.world
                    self._arrived = 0
                    self._generation += 1
                    self._cond.notify_all()
                else:
                    self._cond.wait_for(
                        lambda: self._generation != generation or self._broken() is not None,
                        self.timeout,
                    )
            # A completed gather's result stays until every rank has read it: the next one
            # needs every rank's row, and each rank sends it only after reading this one.
            if self._generation != generation:
                result = self._result
                if isinstance(result, AlignmentError):
                    raise result
                return result  # type: ignore[return-value]
            why = self._broken()
            if why is None:  # timed out: this gather can no longer complete for anyone
                why = f"not every rank reached the exchange within {self.timeout:g} s"
                self._timed_out = True
                self._cond.notify_all()
        raise _round_failed(rank, self.timeout, RuntimeError(why))


class _InProcessExchange:
    def __init__(self, group: InProcessGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world

    def gather(self, row: np.ndarray) -> np.ndarray:
        return self.group._gather(self.rank, row)


def run_ranks(world: int, work: Callable[[Exchange], Any], *, timeout: float = 120.0) -> list[Any]:
    """Run ``work(exchange)`` for ``world`` ranks of one :class:`InProcessGroup`, one thread
    each (the calling thread alone for one rank), and return every rank's result.

    A rank whose work returns or raises leaves the group, so no rank waits for it in a
    gather it will never join, and the first error is raised once every thread has stopped:
    the error of the rank that failed first in its own right, rather than a peer's
    :class:`AlignmentError` about it.
    """
    if world == 1:
        return [work(LocalExchange())]
    group = InProcessGroup(world, timeout)
    results: list[Any] = [None] * world
    errors: list[BaseException | None] = [None] * world

    def one(rank: int) -> None:
        try:
            results[rank] = work(group.exchange(rank))
        except BaseException as error:
            errors[rank] = error
        finally:  # no further gather can complete: ranks waiting in one fail at once
            group.leave(rank)

    threads = [threading.Thread(target=one, args=(r,), daemon=True) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    raised = [e for e in errors if e is not None]
    if raised:
        root = [e for e in raised if not isinstance(e, AlignmentError)]
        raise (root or raised)[0]
    return results
