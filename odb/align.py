"""Alignment across ranks: every rank runs the same number of steps, with similar work.

Each round, every rank offers the groups it could emit now and sends ONE fixed-size int64
report to all ranks (``all_gather``); every rank then computes the same :func:`decide` from the
gathered table, so no second collective is ever needed and no rank can skip one::

    rank 0 report: [status, offered=5, buffered, costs(5) ..., label tokens(5) ..., samples(5) ...]
    rank 1 report: [status, offered=3, buffered, costs(3) ..., label tokens(3) ..., samples(3) ...]
                            \\ all_gather: every rank holds the same table /
    decide:  T = min offered over ranks with data = 3
             each rank runs T of its offered groups (those that must go now first, then the
             ones closest in cost to the bottleneck rank's), sorted by cost, so step j pairs
             the j-th costliest group of every rank; the T steps then run in one shared random order
             (seed, epoch, round); a rank with no data left runs ghost steps (weight 0)

One process is the same protocol with a table of one row and no collective. The proof that
steps stay equal, every sample is emitted once and passes end is in docs/protocol.md.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from odb.errors import AlignmentError, ConfigError

__all__ = [
    "FINISHED",
    "EXHAUSTED",
    "FAILED",
    "report_width",
    "encode_report",
    "Decision",
    "decide",
    "LocalExchange",
    "GlooExchange",
]

# status bits of a report
FINISHED = 1  # no data left at all: input exhausted and buffer empty
EXHAUSTED = 2  # no more input (buffered samples may remain)
FAILED = 4  # this rank raised while preparing the round

_HEADER = 3  # status, offered, buffered
_COLUMNS = 4  # per offered group: cost, label tokens, samples, must-go-now flag


def report_width(max_steps: int) -> int:
    """Length of one rank's report: a header and four columns of ``max_steps`` entries."""
    return _HEADER + _COLUMNS * max_steps


def encode_report(
    status: int,
    buffered: int,
    costs: Sequence[float],
    label_tokens: Sequence[int],
    samples: Sequence[int],
    max_steps: int,
    must: Sequence[bool] = (),
) -> np.ndarray:
    """One rank's report for a round; ``costs[i]`` etc. describe its i-th offered group, and
    ``must[i]`` says it has to go this round (a stale or solo group)."""
    offered = len(costs)
    if offered > max_steps:
        raise ValueError(f"{offered} groups offered, at most {max_steps} fit in a report")
    row = np.zeros(report_width(max_steps), dtype=np.int64)
    row[:_HEADER] = (status, offered, buffered)
    columns = row[_HEADER:].reshape(_COLUMNS, max_steps)
    columns[0, :offered] = np.ceil(np.asarray(costs, dtype=np.float64))
    columns[1, :offered] = label_tokens
    columns[2, :offered] = samples
    columns[3, : len(must)] = must
    return row


@dataclass(frozen=True)
class Decision:
    """What every rank does this round; identical on all ranks.

    ``choice[r][j]`` is the position (in rank r's offer) of the group rank r runs at step j, or
    -1 for a ghost step. ``done``: the pass is over: no rank has data left, or (``stopped``)
    non-join mode ends it because some rank ran out while others still had data.
    """

    steps: int
    choice: np.ndarray  # [world, steps]
    global_samples: np.ndarray  # [steps]
    global_label_tokens: np.ndarray  # [steps]
    costs: np.ndarray  # [world, steps], 0 for ghosts
    done: bool
    stopped: bool


def decide(table: np.ndarray, *, max_steps: int, join: bool, rng: np.random.Generator) -> Decision:
    """The round's steps from the gathered reports (one row per rank, see ``encode_report``)."""
    world = table.shape[0]
    status, offered = table[:, 0], table[:, 1]
    failed = np.flatnonzero(status & FAILED)
    if failed.size:
        raise AlignmentError(
            f"rank(s) {failed.tolist()} raised while preparing this round; see their logs "
            f"for the error (the other ranks stop here instead of waiting)"
        )
    columns = table[:, _HEADER:].reshape(world, _COLUMNS, max_steps)
    active = (status & FINISHED) == 0
    empty = np.zeros((world, 0), dtype=np.int64)
    if not active.any():
        return Decision(0, empty, empty[0], empty[0], empty, done=True, stopped=False)
    if not join and not active.all():
        return Decision(0, empty, empty[0], empty[0], empty, done=True, stopped=True)

    steps = int(offered[active].min())
    choice = np.full((world, steps), -1, dtype=np.int64)
    bottleneck = int(np.flatnonzero(active & (offered == steps))[0])
    targets = columns[bottleneck, 0, :steps]
    for rank in np.flatnonzero(active):
        count = int(offered[rank])
        picks = np.arange(steps)
        if count > steps:
            picks = _match(columns[rank, 0, :count], columns[rank, 3, :count] > 0, targets)
        # Pair similar work across ranks: step j gets every rank's j-th costliest group.
        choice[rank] = picks[np.argsort(-columns[rank, 0, picks], kind="stable")]
    order = rng.permutation(steps)
    choice = choice[:, order]

    ranks = np.flatnonzero(active)
    picked = choice[ranks]
    gather = np.take_along_axis
    costs = np.zeros((world, steps), dtype=np.int64)
    costs[ranks] = gather(columns[ranks, 0, :], picked, axis=1)
    label_tokens = gather(columns[ranks, 1, :], picked, axis=1).sum(axis=0)
    samples = gather(columns[ranks, 2, :], picked, axis=1).sum(axis=0)
    return Decision(steps, choice, samples, label_tokens, costs, done=False, stopped=False)


def _match(costs: np.ndarray, must: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Choose ``len(targets)`` of a rank's offered groups to resemble the bottleneck rank's:
    the groups that must go now (stale, solo) first, then, for each remaining target, the
    free group of closest cost."""
    chosen = list(np.flatnonzero(must)[: len(targets)])
    remaining = sorted(targets.tolist(), reverse=True)
    for position in chosen:  # each mandatory group stands in for the target nearest to it
        remaining.pop(int(np.argmin(np.abs(np.asarray(remaining) - costs[position]))))
    free = np.ones(len(costs), dtype=bool)
    free[chosen] = False
    for target in remaining:
        candidates = np.flatnonzero(free)
        best = int(candidates[np.argmin(np.abs(costs[candidates] - target))])
        chosen.append(best)
        free[best] = False
    return np.asarray(chosen, dtype=np.int64)


_GLOO_GROUPS: dict[int, object] = {}  # one alignment group per default process group


class LocalExchange:
    """One process: the table is the report itself."""

    rank = 0
    world_size = 1

    def exchange(self, report: np.ndarray) -> np.ndarray:
        return report[None, :]


class GlooExchange:
    """Reports travel over a dedicated gloo group, created once per process.

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

    def exchange(self, report: np.ndarray) -> np.ndarray:
        import torch.distributed as dist

        local = torch.from_numpy(report)
        table = [torch.empty_like(local) for _ in range(self.world_size)]
        try:
            dist.all_gather(table, local, group=self.group)
        except Exception as error:  # gloo raises RuntimeError subclasses on timeout / lost peer
            raise AlignmentError(
                f"rank {self.rank}: an alignment round failed: a peer rank died, raised outside "
                f"the loader, or did not reach the round within {self.timeout:g} s ({error})"
            ) from error
        return torch.stack(table).numpy()
