"""The samples measured but not yet emitted, and how many rounds each has waited.

Shared by the loader (whose entries carry the processed samples) and by simulations and
benchmarks (whose entries carry only sizes), so both run the very same planning rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from odb.align import EXHAUSTED, FINISHED, encode_report
from odb.cost import Budget, SampleSize
from odb.errors import ConfigError, positive_int
from odb.planner import Group, Plan, Reason, plan_groups

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
        round_size = positive_int("round_size", round_size or max(1, window // 8))
        if round_size > window:
            raise ConfigError(f"round_size ({round_size}) must be <= window ({window})")
        max_wait = positive_int("max_wait", max_wait or 4 * -(-window // round_size))
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
    """A buffered sample: its dataset index, what it costs, and how long it has waited."""

    index: int
    size: SampleSize
    payload: Any = None
    solo: bool = False
    age: int = 0


class SampleBuffer:
    """A list of :class:`Entry` with one planning round's worth of operations."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: Entry) -> None:
        self.entries.append(entry)

    def plan(self, settings: RoundSettings, final: bool) -> Plan:
        """Plan every buffered entry into a group (see :func:`odb.planner.plan_groups`),
        keeping room in the buffer for the next round's samples."""
        entries = self.entries
        n = len(entries)
        return plan_groups(
            np.fromiter((e.size.length for e in entries), np.int64, n),
            np.fromiter((e.size.vision_patches for e in entries), np.int64, n),
            np.fromiter((e.size.images for e in entries), np.int64, n),
            np.fromiter((e.age for e in entries), np.int64, n),
            np.fromiter((e.solo for e in entries), bool, n),
            settings.budget,
            fill_threshold=settings.fill_threshold,
            max_wait=settings.max_wait,
            keep=settings.window - settings.round_size,
            final=final,
        )

    def label_tokens(self, group: Group) -> int:
        return sum(self.entries[m].size.label_tokens for m in group.members)

    def take(self, groups: list[Group]) -> list[list[Entry]]:
        """Remove the groups' entries (returned in group order); everything left ages a round."""
        entries = self.entries
        taken = [[entries[m] for m in group.members] for group in groups]
        gone = np.zeros(len(entries), dtype=bool)
        for group in groups:
            gone[group.members] = True
        self.entries = [e for e, out in zip(entries, gone, strict=True) if not out]
        for entry in self.entries:
            entry.age += 1
        return taken

    def refill(self, settings: RoundSettings, pull: Callable[[], Entry | None]) -> bool:
        """Add up to ``round_size`` entries from ``pull`` without exceeding the window; return
        whether ``pull`` ran out (returned None)."""
        room = max(0, settings.window - len(self.entries))
        for _ in range(min(settings.round_size, room)):
            entry = pull()
            if entry is None:
                return True
            self.entries.append(entry)
        return False

    def prepare(self, settings: RoundSettings, *, exhausted: bool) -> tuple[Offer, np.ndarray]:
        """What this rank can emit this round, in priority order, and its report.

        Ready groups normally; everything once the input is exhausted (the plan is final) or
        the buffer is full (so a rank that cannot pull more never blocks the others). At most
        ``settings.max_steps`` groups, the size of a report (see docs/protocol.md).
        """
        plan = self.plan(settings, final=exhausted)
        everything = exhausted or len(self.entries) >= settings.window
        count = len(plan.groups) if everything else plan.n_ready
        groups = plan.groups[: min(count, settings.max_steps)]
        offer = Offer(groups, [self.label_tokens(group) for group in groups])
        status = EXHAUSTED * exhausted | FINISHED * (exhausted and not self.entries)
        return offer, offer.report(status, len(self.entries), settings.max_steps)

    def commit(self, offer: Offer, picks: list[int]) -> list[list[Entry]]:
        """Take the offered groups at ``picks`` (in that order) out of the buffer."""
        return self.take([offer.groups[i] for i in picks])


@dataclass(frozen=True)
class Offer:
    """The groups one rank offers in a round, and their label tokens."""

    groups: tuple[Group, ...]
    label_tokens: list[int]

    def report(self, status: int, buffered: int, max_steps: int) -> np.ndarray:
        return encode_report(
            status,
            buffered,
            [g.cost for g in self.groups],
            self.label_tokens,
            [len(g.members) for g in self.groups],
            max_steps,
            [g.reason in (Reason.STALE, Reason.SOLO) for g in self.groups],
        )
