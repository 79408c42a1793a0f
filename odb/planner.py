"""Rank-local planning: cut the buffered samples into groups under the budget.

A pure function of the buffer (no torch.distributed, no I/O, no randomness): the same buffer
gives the same plan. The loader calls it once per round on everything it holds.

Padded mode sorts the buffer by length and cuts it, longest first, into runs of adjacent
samples, each as long as the budget allows; on a sorted sequence this greedy cut gives the
fewest groups, and neighbours in sorted order have nearly equal lengths, so padding is small::

    sorted lengths   900 880 870 | 610 600 600 590 | 300 290 ...
    groups           [  n=3    ] | [     n=4     ] | [ tail, held back ]
    cost             3*900=2700    4*610=2440        budget 2800

Packed mode is best-fit decreasing: each sample, longest first, goes into the open bin whose
free room is smallest among those that can take it.

What is not good enough yet is held back to merge with samples still to come: a padded group is
ready when it is maximal (the next sample of the sorted buffer would not fit) and its padding
efficiency reaches ``fill_threshold``; a packed bin when its fill reaches ``fill_threshold``.
A group holding a sample that waited ``max_wait`` rounds is forced out (bounded staleness),
and when more than ``keep`` samples would stay buffered, the best held-back groups go too, so
the buffer never stalls. At the end of the data (``final``) everything is ready.

The planner runs every round on the whole buffer, so it is kept fast: each mode loops in
Python only where a step depends on the one before (the next cut point; the next sample's
bin), and computes everything else for all samples or groups at once with numpy.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from odb.cost import Budget, SampleSize

__all__ = ["Group", "Plan", "Reason", "plan_groups", "shared_group"]


class Reason(str, Enum):
    """Why a group is emitted now (or ``HELD`` when it is not)."""

    SOLO = "solo"  # an over-budget sample under over_budget="solo"
    STALE = "stale"  # holds a sample that waited max_wait rounds
    FILL = "fill"  # good enough: maximal and efficient (padded) / full enough (packed)
    FLUSH = "flush"  # end of the data
    PRESSURE = "pressure"  # the buffer must make room for the next round
    SHARED = "shared"  # planned on another rank, run here to even out the end of the data
    HELD = "held"


@dataclass(frozen=True)
class Group:
    """One planned batch: positions in the buffer, longest sample first."""

    members: np.ndarray
    real_tokens: int
    padded_tokens: int
    cost: float
    quality: float
    reason: Reason

    @property
    def ready(self) -> bool:
        return self.reason is not Reason.HELD


@dataclass(frozen=True)
class Plan:
    """Groups in priority order: ready ones first (stale and solo leading), then held ones,
    best first. Every buffer position is in exactly one group."""

    groups: tuple[Group, ...]
    n_ready: int

    @property
    def ready(self) -> tuple[Group, ...]:
        return self.groups[: self.n_ready]


_PRIORITY = {
    Reason.SOLO: 0,
    Reason.STALE: 1,
    Reason.FILL: 2,
    Reason.FLUSH: 2,
    Reason.PRESSURE: 3,
    Reason.HELD: 4,
}


def plan_groups(
    lengths: np.ndarray,
    patches: np.ndarray,
    images: np.ndarray,
    ages: np.ndarray,
    solo: np.ndarray,
    budget: Budget,
    *,
    fill_threshold: float,
    max_wait: int,
    keep: int,
    final: bool,
    vision_pairs: np.ndarray | None = None,
) -> Plan:
    """Plan every buffered sample into a group.

    ``lengths``, ``patches``, ``images``, ``ages`` (rounds waited) and ``vision_pairs`` (sum
    over a sample's images of ``patches**2``; zeros if None) are per buffer position; ``solo``
    marks over-budget samples that form a group alone. ``keep`` is how many samples may stay
    buffered after this round.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    patches = np.asarray(patches, dtype=np.int64)
    pairs = (
        np.zeros_like(lengths) if vision_pairs is None else np.asarray(vision_pairs, dtype=np.int64)
    )
    images = np.asarray(images, dtype=np.int64)
    ages = np.asarray(ages, dtype=np.int64)
    solo = np.asarray(solo, dtype=bool)

    groups: list[Group] = []
    for position in np.flatnonzero(solo):
        members = np.array([position])
        groups.append(_make_group(members, lengths, patches, pairs, budget, 1.0, Reason.SOLO))

    regular = np.flatnonzero(~solo)
    # Longest first; ties keep buffer (arrival) order, so plans are deterministic.
    order = regular[np.argsort(-lengths[regular], kind="stable")]
    vision = (patches, pairs, images)
    if budget.cost.padded:
        cuts = _cut_padded(order, lengths, vision, budget, fill_threshold, final)
    else:
        cuts = _pack_best_fit(order, lengths, vision, budget, fill_threshold, final)
    groups.extend(cuts)

    stale = ages >= max_wait
    if stale.any():
        groups = [
            _with_reason(g, Reason.STALE)
            if g.reason is Reason.HELD and stale[g.members].any()
            else g
            for g in groups
        ]
    # Held groups, best first (a stable sort: ties keep plan order).
    held = sorted(
        (i for i, g in enumerate(groups) if g.reason is Reason.HELD),
        key=lambda i: -groups[i].real_tokens,
    )
    held_samples = sum(len(groups[i].members) for i in held)
    released = 0
    while released < len(held) and held_samples > keep:
        # Make room: release the held groups that fill the budget best.
        held_samples -= len(groups[held[released]].members)
        groups[held[released]] = _with_reason(groups[held[released]], Reason.PRESSURE)
        released += 1

    # Ready groups by priority, each level in plan order (a stable bucket sort).
    by_priority: list[list[Group]] = [[] for _ in range(_PRIORITY[Reason.HELD])]
    for g in groups:
        if g.reason is not Reason.HELD:
            by_priority[_PRIORITY[g.reason]].append(g)
    ready = [g for level in by_priority for g in level]
    return Plan(tuple(ready + [groups[i] for i in held[released:]]), len(ready))


def _with_reason(group: Group, reason: Reason) -> Group:
    return Group(
        group.members, group.real_tokens, group.padded_tokens, group.cost, group.quality, reason
    )


def shared_group(sizes: Sequence[SampleSize], budget: Budget) -> Group:
    """A group another rank planned and handed over, rebuilt from its samples' sizes by the
    rank that runs it."""
    lengths = np.array([size.length for size in sizes], dtype=np.int64)
    patches = np.array([size.vision_patches for size in sizes], dtype=np.int64)
    pairs = np.array([size.vision_pairs for size in sizes], dtype=np.int64)
    members = np.arange(len(sizes))
    return _make_group(members, lengths, patches, pairs, budget, 1.0, Reason.SHARED)


def _make_group(members, lengths, patches, pairs, budget, quality, reason) -> Group:
    member_lengths = lengths[members]
    real = int(member_lengths.sum())
    padded = int(len(members) * member_lengths.max()) if budget.cost.padded else real
    cost = float(
        budget.cost.group_cost(
            len(members),
            member_lengths.max(),
            real,
            int((member_lengths * member_lengths).sum()),
            int(patches[members].sum()),
            int(pairs[members].sum()),
        )
    )
    return Group(members, real, padded, cost, quality, reason)


def _cut_padded(order, lengths, vision, budget, fill_threshold, final) -> list[Group]:
    """Greedy cut of the length-sorted buffer into maximal runs of adjacent samples.

    Only the walk from one cut to the next is a loop (a run starts where the previous one
    ended); how many rows fit behind each possible leader, and what every run holds, costs and
    whether it is ready, are computed for all samples and runs at once with numpy, so planning
    a window of a thousand samples takes a fraction of a millisecond."""
    cost_model, caps, limit = budget.cost, budget.caps, budget.limit
    patches, pairs, images = vision
    total = len(order)
    if total == 0:
        return []
    sorted_len = lengths[order]
    max_samples, max_tokens = caps.max_samples, caps.max_tokens
    # Rows that fit behind each sample as the longest of its run, by tokens and caps alone.
    row_cost = sorted_len * (1.0 + cost_model.attention_weight * sorted_len)
    room = (limit // row_cost).astype(np.int64)
    if max_tokens is not None:
        room = np.minimum(room, max_tokens // sorted_len)
    room = np.minimum(room, np.arange(total, 0, -1))  # the samples left from here
    if max_samples is not None:
        room = np.minimum(room, max_samples)
    room = np.maximum(room, 1).tolist()
    # With vision terms the patches of the run matter too, so each run is fitted in turn.
    vision_bound = (
        cost_model.prices_vision
        or caps.max_images is not None
        or caps.max_vision_patches is not None
    )
    group_patches = group_pairs = 0
    starts = []
    start = 0
    if vision_bound:
        cum = {
            "patches": np.concatenate(([0], np.cumsum(patches[order]))),
            "pairs": np.concatenate(([0], np.cumsum(pairs[order]))),
            "images": np.concatenate(([0], np.cumsum(images[order]))),
        }
        row_costs = row_cost.tolist()
        while start < total:
            starts.append(start)
            size = room[start]
            start += _fit_vision(start, size, row_costs[start], cum, budget) if size > 1 else 1
    else:
        while start < total:
            starts.append(start)
            start += room[start]
    begin = np.array(starts, dtype=np.int64)
    end = np.append(begin[1:], total)
    size = end - begin
    longest = sorted_len[begin]
    cum_len = np.concatenate(([0], np.cumsum(sorted_len)))
    real = cum_len[end] - cum_len[begin]
    if vision_bound:
        group_patches = cum["patches"][end] - cum["patches"][begin]
        group_pairs = cum["pairs"][end] - cum["pairs"][begin]
    padded = size * longest
    # what one more sample would cost at the least (it adds at least no vision work)
    can_grow = cost_model.group_cost(size + 1, longest, 0, 0, group_patches, group_pairs) <= limit
    if max_samples is not None:
        can_grow &= size < max_samples
    if max_tokens is not None:
        can_grow &= (size + 1) * longest <= max_tokens
    maximal = (end < total) | ~can_grow  # the next sample would not fit, or none could
    quality = real / padded
    ready = np.ones(len(size), dtype=bool) if final else maximal & (quality >= fill_threshold)
    cost = cost_model.group_cost(size, longest, real, 0, group_patches, group_pairs)
    fit = Reason.FLUSH if final else Reason.FILL
    return [
        Group(order[b:e], r, p, c, q, fit if ok else Reason.HELD)
        for b, e, r, p, c, q, ok in zip(
            starts,
            end.tolist(),
            real.tolist(),
            padded.tolist(),
            cost.tolist(),
            quality.tolist(),
            ready.tolist(),
            strict=True,
        )
    ]


def _fit_vision(start, most, row_cost, cum, budget) -> int:
    """Largest group size <= ``most`` from ``start`` within the vision cost and caps.

    A run's cost and vision totals only grow with its size, so the sizes that fit are a
    prefix: when the largest fits (most runs) the smaller ones need not be priced."""
    caps, cost = budget.caps, budget.cost
    end = start + most
    largest_patches = int(cum["patches"][end] - cum["patches"][start])
    largest_cost = (
        most * row_cost
        + cost.vision_weight * largest_patches
        + cost.vision_attention_weight * int(cum["pairs"][end] - cum["pairs"][start])
    )
    if (
        largest_cost <= budget.limit
        and (caps.max_vision_patches is None or largest_patches <= caps.max_vision_patches)
        and (
            caps.max_images is None or cum["images"][end] - cum["images"][start] <= caps.max_images
        )
    ):
        return most
    window = slice(start + 1, start + most + 1)
    group_patches = cum["patches"][window] - cum["patches"][start]
    group_pairs = cum["pairs"][window] - cum["pairs"][start]
    fits = (
        np.arange(1, most + 1) * row_cost
        + cost.vision_weight * group_patches
        + cost.vision_attention_weight * group_pairs
    )
    fits = fits <= budget.limit
    if caps.max_vision_patches is not None:
        fits &= group_patches <= caps.max_vision_patches
    if caps.max_images is not None:
        fits &= cum["images"][window] - cum["images"][start] <= caps.max_images
    fits[0] = True  # a sample that fits alone was admitted; over-budget ones are solo
    return most if fits.all() else int(np.argmin(fits))


def _pack_best_fit(order, lengths, vision, budget, fill_threshold, final) -> list[Group]:
    """Best-fit decreasing of the length-sorted buffer into bins of ``budget.limit``.

    Placing the samples is a loop (each goes to the open bin with the least free room that can
    take it, found by bisection in the bins' free room, kept sorted); it tracks the bins'
    contents only where caps or a dense mask's pricing need them, and each bin's members and
    totals are then gathered for all bins at once with numpy."""
    cost_model, caps, limit = budget.cost, budget.caps, budget.limit
    joining = cost_model.joining_cost
    dense = cost_model.dense_mask  # a sample then costs more in a fuller row: check each bin
    patches, pairs, images = vision
    item_cost = cost_model.sample_cost(lengths[order], patches[order], pairs[order]).tolist()
    tracked = caps.any or dense
    max_samples, max_images = caps.max_samples, caps.max_images
    max_patches, max_tokens = caps.max_vision_patches, caps.max_tokens
    if tracked:
        item_patches = patches[order].tolist()
        item_images = images[order].tolist()
        item_tokens = lengths[order].tolist()
        bin_samples: list[int] = []
        bin_patches: list[int] = []
        bin_images: list[int] = []
        bin_tokens: list[int] = []
    bin_of: list[int] = []  # the bin of each item rank
    room_keys: list[float] = []  # free room of each open bin, sorted ascending
    room_bins: list[int] = []  # bin id for each entry of room_keys
    for rank, cost in enumerate(item_cost):
        slot = bisect.bisect_left(room_keys, cost)  # its cost alone: the least it can add
        while tracked and slot < len(room_keys):
            b = room_bins[slot]
            if (
                (not dense or room_keys[slot] >= cost + joining(bin_tokens[b], item_tokens[rank]))
                and (max_samples is None or bin_samples[b] < max_samples)
                and (max_images is None or bin_images[b] + item_images[rank] <= max_images)
                and (max_patches is None or bin_patches[b] + item_patches[rank] <= max_patches)
                and (max_tokens is None or bin_tokens[b] + item_tokens[rank] <= max_tokens)
            ):
                break
            slot += 1
        if slot < len(room_keys):
            b = room_bins.pop(slot)
            room = room_keys.pop(slot) - cost
            if dense:
                room -= joining(bin_tokens[b], item_tokens[rank])
        else:
            b = len(room_keys)  # a new bin (every bin has one entry there)
            room = limit - cost
            if tracked:
                for column in (bin_samples, bin_patches, bin_images, bin_tokens):
                    column.append(0)
        bin_of.append(b)
        if tracked:
            bin_samples[b] += 1
            bin_patches[b] += item_patches[rank]
            bin_images[b] += item_images[rank]
            bin_tokens[b] += item_tokens[rank]
        slot = bisect.bisect_left(room_keys, room)
        room_keys.insert(slot, room)
        room_bins.insert(slot, b)
    if not room_keys:
        return []

    bins = np.array(bin_of, dtype=np.int64)
    members = order[np.argsort(bins, kind="stable")]  # bin by bin, in placement order
    bounds = np.concatenate(([0], np.cumsum(np.bincount(bins)))).tolist()
    real = np.add.reduceat(lengths[members], bounds[:-1])
    room = np.empty(len(room_keys))
    room[room_bins] = room_keys
    cost = limit - room
    quality = cost / limit
    if max_tokens is not None:  # a row full of tokens is full, whatever it costs
        quality = np.maximum(quality, real / max_tokens)
    ready = np.ones(len(cost), dtype=bool) if final else quality >= fill_threshold
    fit = Reason.FLUSH if final else Reason.FILL
    return [
        Group(members[b:e], r, r, c, q, fit if ok else Reason.HELD)
        for b, e, r, c, q, ok in zip(
            bounds[:-1],
            bounds[1:],
            real.tolist(),
            cost.tolist(),
            quality.tolist(),
            ready.tolist(),
            strict=True,
        )
    ]
