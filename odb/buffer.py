"""The samples measured but not yet emitted, and how many rounds each has waited.

Shared by the loader (whose entries carry the processed samples) and by simulations and
benchmarks (whose entries carry only sizes), so both run the very same planning rounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from odb.align import EXHAUSTED, FINISHED, Decision, encode_report
from odb.cost import Budget, SampleSize
from odb.errors import ConfigError, positive_int
from odb.planner import Group, Plan, Reason, plan_groups
from odb.stats import LoaderStats

__all__ = ["Entry", "Offer", "RoundSettings", "SampleBuffer"]

_DEFAULT_FILL = {True: 0.98, False: 0.97}  # by budget.cost.padded


@dataclass(frozen=True)
class RoundSettings:
    """How planning rounds run: the budget, how many samples are planned together
    (``window``), how many arrive per round, when a group is good enough, how long a sample
    may wait."""

    budget: Budget
    window: int
    round_size: int
    fill_threshold: float
    max_wait: int

    @classmethod
    def create(
        cls,
        budget: Budget,
        window: int = 1024,
        round_size: int | None = None,
        fill_threshold: float | None = None,
        max_wait: int | None = None,
    ) -> RoundSettings:
        """Settings with defaults filled in: ``round_size = window // 8``, ``max_wait`` = four
        times the rounds a full window takes to arrive, ``fill_threshold`` 0.98 padded and 0.97
        packed."""
        window = positive_int("window", window)
        if round_size is None:
            round_size = max(1, window // 8)
        round_size = positive_int("round_size", round_size)
        if round_size > window:
            raise ConfigError(f"round_size ({round_size}) must be <= window ({window})")
        if max_wait is None:
            max_wait = 4 * -(-window // round_size)
        max_wait = positive_int("max_wait", max_wait)
        if fill_threshold is None:
            fill_threshold = _DEFAULT_FILL[budget.cost.padded]
        if not 0 <= fill_threshold <= 1:
            raise ConfigError(f"fill_threshold must be in [0, 1], got {fill_threshold}")
        return cls(budget, window, round_size, float(fill_threshold), max_wait)

    @property
    def max_steps(self) -> int:
        """The most steps one round can emit: the width of a rank's report."""
        return max(64, 2 * self.round_size)


@dataclass
class Entry:
    """A buffered sample: its dataset index, what it costs, and the sample itself (or None in
    simulations)."""

    index: int
    size: SampleSize
    payload: Any = None
    solo: bool = False


# Columns of the buffer's numbers, one row per entry (kept as one int64 array so a round's
# planning reads them without touching the entries).
_LENGTH, _PATCHES, _IMAGES, _AGE, _SOLO, _LABELS, _PAIRS = range(7)
_COLUMNS = 7


class SampleBuffer:
    """The buffered entries, with their sizes and ages as numpy columns, and one planning
    round's worth of operations; planning's CPU time goes into ``stats`` when given."""

    def __init__(self, stats: LoaderStats | None = None) -> None:
        self.stats = stats
        self.entries: list[Entry] = []
        self._columns = np.zeros((0, _COLUMNS), dtype=np.int64)
        self._new_rows: list[tuple[int, ...]] = []  # added since the columns were last built

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: Entry, age: int = 0) -> None:
        size = entry.size
        self.entries.append(entry)
        self._new_rows.append(
            (
                size.length,
                size.vision_patches,
                size.images,
                age,
                entry.solo,
                size.label_tokens,
                size.vision_pairs,
            )
        )

    def _table(self) -> np.ndarray:
        if self._new_rows:
            rows = np.array(self._new_rows, dtype=np.int64).reshape(-1, _COLUMNS)
            self._columns = np.concatenate([self._columns, rows])
            self._new_rows = []
        return self._columns

    def ages(self) -> list[int]:
        """Rounds each entry has waited, in entry order."""
        return self._table()[:, _AGE].tolist()

    def plan(self, settings: RoundSettings, final: bool) -> Plan:
        """Plan every buffered entry into a group (see :func:`odb.planner.plan_groups`),
        keeping room in the buffer for the next round's samples."""
        table = self._table()
        start = time.thread_time()
        plan = plan_groups(
            table[:, _LENGTH],
            table[:, _PATCHES],
            table[:, _IMAGES],
            table[:, _AGE],
            table[:, _SOLO].astype(bool),
            settings.budget,
            fill_threshold=settings.fill_threshold,
            max_wait=settings.max_wait,
            keep=settings.window - settings.round_size,
            final=final,
            vision_pairs=table[:, _PAIRS],
        )
        if self.stats is not None:
            self.stats.planner_cpu_seconds += time.thread_time() - start
        return plan

    def label_tokens(self, group: Group) -> int:
        return int(self._table()[group.members, _LABELS].sum())

    def images(self, group: Group) -> int:
        return int(self._table()[group.members, _IMAGES].sum())

    def take(self, groups: list[Group]) -> list[list[Entry]]:
        """Remove the groups' entries (returned in group order); everything left ages a round."""
        entries = self.entries
        taken = [[entries[m] for m in group.members] for group in groups]
        keep = np.ones(len(entries), dtype=bool)
        for group in groups:
            keep[group.members] = False
        self.entries = [e for e, kept in zip(entries, keep.tolist(), strict=True) if kept]
        self._columns = self._table()[keep]
        self._columns[:, _AGE] += 1
        return taken

    def refill(self, settings: RoundSettings, pull: Callable[[], Entry | None]) -> bool:
        """Add up to ``round_size`` entries from ``pull`` without exceeding the window; return
        whether ``pull`` ran out (returned None)."""
        room = max(0, settings.window - len(self.entries))
        for _ in range(min(settings.round_size, room)):
            entry = pull()
            if entry is None:
                return True
            self.add(entry)
        return False

    def prepare(
        self, settings: RoundSettings, *, exhausted: bool, ghost_images: int = 0
    ) -> tuple[Offer, np.ndarray]:
        """What this rank can emit this round, in priority order, and its report
        (``ghost_images``: the images of the sample its ghost steps copy).

        Ready groups normally; everything once the input is exhausted (the plan is final) or
        the buffer is full (so a rank that cannot pull more never blocks the others). At most
        ``settings.max_steps`` groups, the size of a report (see docs/protocol.md).
        """
        plan = self.plan(settings, final=exhausted)
        everything = exhausted or len(self.entries) >= settings.window
        count = len(plan.groups) if everything else plan.n_ready
        groups = plan.groups[: min(count, settings.max_steps)]
        offer = Offer(
            groups,
            [self.label_tokens(group) for group in groups],
            [self.images(group) for group in groups],
        )
        status = EXHAUSTED * exhausted | FINISHED * (exhausted and not self.entries)
        return offer, offer.report(status, len(self.entries), settings.max_steps, ghost_images)

    def commit(
        self, offer: Offer, decision: Decision, rank: int
    ) -> tuple[list[list[Entry]], list[list[Entry]]]:
        """Take out of the buffer the offered groups this rank runs (in step order) and those it
        hands to other ranks (in ``decision.given`` order)."""
        own, given = decision.own_picks(rank), decision.given(rank)
        taken = self.take([offer.groups[i] for i in own + given])
        return taken[: len(own)], taken[len(own) :]


@dataclass(frozen=True)
class Offer:
    """The groups one rank offers in a round, their label tokens and images."""

    groups: tuple[Group, ...]
    label_tokens: list[int]
    images: list[int]

    def report(self, status: int, buffered: int, max_steps: int, ghost_images: int) -> np.ndarray:
        return encode_report(
            status,
            buffered,
            [g.cost for g in self.groups],
            self.label_tokens,
            [len(g.members) for g in self.groups],
            max_steps,
            [g.reason in (Reason.STALE, Reason.SOLO) for g in self.groups],
            self.images,
            ghost_images,
        )
