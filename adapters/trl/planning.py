"""Which rollout rows share a forward: pure functions of the rows' sizes.

The planning layer: no trainer, no TRL, no torch.distributed. One rank's rows are cut into
groups under the budget by the core planner; ranks agree through one fixed-width report per
rank (:func:`encode_rows`), the envelope of the gathered reports (:func:`envelope_groups`) and
each rank's share of it (:func:`own_groups`). Tests and benchmarks run N ranks in one process
through the very functions the trainer runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from odb.admit import Admission
from odb.cost import Budget, SampleSize
from odb.errors import AlignmentError
from odb.planner import plan_groups


@dataclass(frozen=True)
class RowSizes:
    """Per rollout row: ``lengths`` (prompt + completion tokens), vision ``patches``,
    ``images``."""

    lengths: np.ndarray
    patches: np.ndarray
    images: np.ndarray

    @classmethod
    def text(cls, lengths: Sequence[int]) -> RowSizes:
        lengths = np.asarray(lengths, dtype=np.int64)
        zeros = np.zeros_like(lengths)
        return cls(lengths, zeros, zeros)

    def __len__(self) -> int:
        return len(self.lengths)

    def cost(self, rows: np.ndarray, budget: Budget) -> float:
        """What a padded forward of ``rows`` costs under ``budget``'s cost model."""
        lengths = self.lengths[rows]
        return float(
            budget.cost.group_cost(
                len(rows),
                lengths.max(),
                lengths.sum(),
                (lengths * lengths).sum(),
                self.patches[rows].sum(),
            )
        )


def _solo_rows(sizes: RowSizes, budget: Budget, over_budget: str) -> np.ndarray:
    """Rows that cannot share a forward (over the budget alone); an error unless ``solo``."""
    admission = Admission(budget, over_budget)
    hint = "raise token_budget to at least the longest prompt plus max_completion_length"
    return np.array(
        [
            admission.verdict(
                SampleSize(int(n), 0, int(p), int(i)),
                row,
                subject=f"rollout row {row} of this rank (prompt + completion)",
                hint=hint,
            )
            is not None
            for row, (n, p, i) in enumerate(
                zip(sizes.lengths, sizes.patches, sizes.images, strict=True)
            )
        ],
        dtype=bool,
    )


def _segments(n: int, segments: Sequence[np.ndarray] | None) -> list[np.ndarray]:
    if segments is None:
        return [np.arange(n)]
    return [np.asarray(s, dtype=np.int64) for s in segments if len(s)]


def _plan(rows: np.ndarray, sizes: RowSizes, solo: np.ndarray, budget: Budget) -> list:
    """The core planner's fewest groups of ``rows`` (greedy cut of the length-sorted rows)."""
    plan = plan_groups(
        sizes.lengths[rows],
        sizes.patches[rows],
        sizes.images[rows],
        np.zeros(len(rows), dtype=np.int64),
        solo[rows],
        budget,
        fill_threshold=0.0,
        max_wait=1,
        keep=0,
        final=True,
    )
    return [rows[group.members] for group in plan.groups]


def fewest_groups(
    sizes: RowSizes,
    budget: Budget,
    *,
    over_budget: str = "error",
    segments: Sequence[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """The fewest groups of rows whose padded forwards fit ``budget``; a group never spans two
    ``segments`` (bnpo's stock chunks). Each group lists its rows longest first."""
    solo = _solo_rows(sizes, budget, over_budget)
    return [g for rows in _segments(len(sizes), segments) for g in _plan(rows, sizes, solo, budget)]


def split_groups(
    sizes: RowSizes,
    budget: Budget,
    count: int,
    *,
    over_budget: str = "error",
    segments: Sequence[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Exactly ``min(count, rows)`` groups under ``budget``, with the costliest one as cheap as
    the greedy search finds; groups never span two ``segments``.

    Every rank runs the same number of passes, so a rank that needs fewer than ``count``
    spreads its rows over ``count`` lighter passes instead of idling: per segment, the smallest
    budget whose fewest groups are at most its share (bisection over the core planner), then
    the costliest groups are halved; extra passes go to the segment whose costliest group is
    the most expensive. Returns groups costliest first.
    """
    solo = _solo_rows(sizes, budget, over_budget)
    segments = _segments(len(sizes), segments)
    target = min(count, len(sizes))
    parts = [_plan(rows, sizes, solo, budget) for rows in segments]
    if sum(len(p) for p in parts) > target:
        raise ValueError(
            f"{sum(len(p) for p in parts)} groups are needed under the budget, more than "
            f"the {count} passes asked for"
        )
    shares = [len(p) for p in parts]
    while sum(shares) < target:
        open_ = [i for i, rows in enumerate(segments) if shares[i] < len(rows)]
        worst = max(open_, key=lambda i: max(sizes.cost(g, budget) for g in parts[i]))
        shares[worst] += 1
        parts[worst] = _at_most(segments[worst], sizes, solo, budget, shares[worst])
    groups = [g for part in parts for g in part]
    return sorted(groups, key=lambda g: -sizes.cost(g, budget))


def _at_most(rows, sizes, solo, budget, count) -> list[np.ndarray]:
    """Exactly ``count`` (<= len(rows)) groups of ``rows`` with a small costliest group."""
    free = rows[~solo[rows]]
    low = max((sizes.cost(np.array([r]), budget) for r in free), default=budget.limit)
    high = budget.limit
    best = _plan(rows, sizes, solo, budget)
    while high - low > max(0.5, 1e-9 * high):
        mid = (low + high) / 2
        groups = _plan(rows, sizes, solo, Budget(mid, budget.cost, budget.caps))
        if len(groups) <= count:
            high, best = mid, groups
        else:
            low = mid
    best = list(best)
    while len(best) < count:
        splittable = [g for g in best if len(g) > 1]
        worst = max(splittable, key=lambda g: sizes.cost(g, budget))
        best = [g for g in best if g is not worst] + list(_halve(worst, sizes, budget))
    return best


def _halve(group: np.ndarray, sizes: RowSizes, budget: Budget) -> tuple[np.ndarray, np.ndarray]:
    """Split a longest-first group at the point that makes its costlier half cheapest."""
    splits = range(1, len(group))
    best = min(
        splits,
        key=lambda s: max(sizes.cost(group[:s], budget), sizes.cost(group[s:], budget)),
    )
    return group[:best], group[best:]


def encode_rows(
    sizes: RowSizes, ordered: Sequence[np.ndarray], capacity: int, status: int = 0
) -> np.ndarray:
    """One rank's report: ``[status, rows, lengths, patches, images]``, the three columns
    ``capacity * len(ordered)`` wide; segment k's rows (longest first) fill the slots from
    ``k * capacity``. Every rank must use the same ``capacity`` and number of segments."""
    width = capacity * len(ordered)
    report = np.zeros(2 + 3 * width, dtype=np.int64)
    report[0], report[1] = status, sum(len(rows) for rows in ordered)
    columns = report[2:].reshape(3, width)
    for k, rows in enumerate(ordered):
        if len(rows) > capacity:
            raise ValueError(f"segment {k} has {len(rows)} rows, more than its {capacity} slots")
        slots = k * capacity + np.arange(len(rows))
        columns[0, slots] = sizes.lengths[rows]
        columns[1, slots] = sizes.patches[rows]
        columns[2, slots] = sizes.images[rows]
    return report


def envelope_groups(
    table: np.ndarray, capacity: int, budget: Budget, count: int = 1
) -> list[np.ndarray]:
    """The passes every rank runs, as arrays of report slots; the same on every rank.

    ``table`` stacks the ranks' :func:`encode_rows` reports. Slot by slot, the envelope takes
    the largest length, patches and images over the ranks (each rank's rows are sorted, so a
    slot holds every rank's i-th longest row of a segment); a rank with no row in a slot that
    another rank fills counts with its ghost row there (see :func:`ghost_slot`). Groups planned
    on the envelope fit the budget on every rank, ghosts included, and every rank puts the
    same number of rows in pass j; at least ``count`` passes.
    """
    world = len(table)
    width = (table.shape[1] - 2) // 3
    columns = table[:, 2:].reshape(world, 3, width)
    filled = columns[:, 0, :] > 0
    ghosts = np.zeros((world, 3, 1), dtype=np.int64)
    for rank in np.flatnonzero(filled.any(axis=1)):
        ghosts[rank, :, 0] = columns[rank, :, ghost_slot(columns[rank, 0])]
    envelope = np.where(filled[:, None, :], columns, ghosts).max(axis=0)
    present = filled.any(axis=0)
    sizes = RowSizes(envelope[0] * present, envelope[1] * present, envelope[2] * present)
    segments = [
        k * capacity + np.flatnonzero(present[k * capacity : (k + 1) * capacity])
        for k in range(width // capacity)
    ]
    fewest = fewest_groups(sizes, budget, over_budget="solo", segments=segments)
    return split_groups(
        sizes, budget, max(len(fewest), count), over_budget="solo", segments=segments
    )


def ghost_slot(lengths: np.ndarray) -> int:
    """The report slot of the row a rank copies for its ghost rows: its shortest (the first
    such slot), so a ghost costs the least."""
    filled = np.flatnonzero(lengths > 0)
    return int(filled[np.argmin(lengths[filled])])


def sorted_segments(sizes: RowSizes, segments: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each segment's rows, longest first (ties by row): the order of a rank's report slots."""
    return [rows[np.lexsort((rows, -sizes.lengths[rows]))] for rows in segments]


def own_groups(
    sizes: RowSizes, ordered: Sequence[np.ndarray], passes: Sequence[np.ndarray], capacity: int
) -> list[tuple[int, np.ndarray, int]]:
    """This rank's share of the agreed ``passes`` (from :func:`envelope_groups`): per pass,
    ``(segment, rows, ghosts)``; the last ``ghosts`` rows are copies of the rank's ghost row.
    ``ordered`` is what :func:`sorted_segments` gave for this rank's report."""
    slots = np.full(capacity * len(ordered), -1, dtype=np.int64)
    for k, rows in enumerate(ordered):
        slots[k * capacity : k * capacity + len(rows)] = rows
    filled = slots >= 0
    lengths = np.zeros(len(slots), dtype=np.int64)
    lengths[filled] = sizes.lengths[slots[filled]]
    ghost = slots[ghost_slot(lengths)] if filled.any() else -1
    groups = []
    for group in passes:
        own = slots[group]
        real = own[own >= 0]
        ghosts = len(own) - len(real)
        if ghosts and ghost < 0:
            raise AlignmentError("a rank without rollout rows cannot fill its share of a pass")
        rows = np.concatenate([real, np.full(ghosts, ghost, dtype=np.int64)])
        groups.append((int(group[0]) // capacity, rows, ghosts))
    return groups
