"""The planner as it was before it was made faster (odb 0.x, commit b9a0e20), kept verbatim as
the oracle that tests/test_planner_equivalence.py compares the optimised planner against: the
optimisation must not change a single decision."""

import bisect

import numpy as np

from odb.cost import Budget
from odb.planner import Group, Plan, Reason

_PRIORITY = {
    Reason.SOLO: 0,
    Reason.STALE: 1,
    Reason.FILL: 2,
    Reason.FLUSH: 2,
    Reason.PRESSURE: 3,
    Reason.HELD: 4,
}


def reference_plan(
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
    order = regular[np.lexsort((regular, -lengths[regular]))]
    vision = (patches, pairs, images)
    if budget.cost.padded:
        cuts = _cut_padded(order, lengths, vision, budget, fill_threshold, final)
    else:
        cuts = _pack_best_fit(order, lengths, vision, budget, fill_threshold, final)
    groups.extend(cuts)

    groups = [
        _with_reason(g, Reason.STALE)
        if g.reason is Reason.HELD and ages[g.members].max() >= max_wait
        else g
        for g in groups
    ]
    held_samples = sum(len(g.members) for g in groups if not g.ready)
    if held_samples > keep:
        # Make room: release the held groups that fill the budget best.
        held = sorted((g for g in groups if not g.ready), key=lambda g: -g.real_tokens)
        released = set()
        for g in held:
            if held_samples <= keep:
                break
            released.add(id(g))
            held_samples -= len(g.members)
        groups = [_with_reason(g, Reason.PRESSURE) if id(g) in released else g for g in groups]

    held_order = sorted((g for g in groups if not g.ready), key=lambda g: -g.real_tokens)
    ready = sorted((g for g in groups if g.ready), key=lambda g: _PRIORITY[g.reason])
    return Plan(tuple(ready + held_order), len(ready))


def _with_reason(group: Group, reason: Reason) -> Group:
    return Group(
        group.members, group.real_tokens, group.padded_tokens, group.cost, group.quality, reason
    )


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
    """Greedy cut of the length-sorted buffer into maximal runs of adjacent samples."""
    cost_model, caps, limit = budget.cost, budget.caps, budget.limit
    patches, pairs, images = vision
    sorted_len = lengths[order]
    cum_len = np.concatenate(([0], np.cumsum(sorted_len))).tolist()
    cum = {
        "patches": np.concatenate(([0], np.cumsum(patches[order]))),
        "pairs": np.concatenate(([0], np.cumsum(pairs[order]))),
        "images": np.concatenate(([0], np.cumsum(images[order]))),
    }
    # Without vision terms a group's cost is n * row_cost(longest): plain scalar arithmetic.
    vision_bound = (
        cost_model.prices_vision
        or caps.max_images is not None
        or (caps.max_vision_patches is not None)
    )
    max_samples, max_tokens = caps.max_samples, caps.max_tokens
    attention = cost_model.attention_weight
    total = len(order)
    groups = []
    start = 0
    sorted_list = sorted_len.tolist()
    while start < total:
        longest = sorted_list[start]
        row_cost = longest * (1.0 + attention * longest)
        room = int(limit // row_cost)  # rows that fit by tokens alone
        if max_tokens is not None:
            room = min(room, max_tokens // longest)
        size = max(1, min(total - start, room, max_samples or total))
        if vision_bound and size > 1:
            size = _fit_vision(start, size, row_cost, cum, budget)
        end = start + size
        group_patches = int(cum["patches"][end] - cum["patches"][start])
        group_pairs = int(cum["pairs"][end] - cum["pairs"][start])
        real = cum_len[end] - cum_len[start]
        padded = size * longest
        # what one more sample would cost at the least (it adds at least no vision work)
        grow_cost = float(
            cost_model.group_cost(size + 1, longest, 0, 0, group_patches, group_pairs)
        )
        can_grow = (
            (max_samples is None or size < max_samples)
            and (max_tokens is None or (size + 1) * longest <= max_tokens)
            and grow_cost <= limit
        )
        maximal = end < total or not can_grow  # the next sample would not fit, or none could
        quality = real / padded
        ready = final or (maximal and quality >= fill_threshold)
        reason = (Reason.FLUSH if final else Reason.FILL) if ready else Reason.HELD
        cost = float(cost_model.group_cost(size, longest, real, 0, group_patches, group_pairs))
        groups.append(Group(order[start:end], real, padded, cost, quality, reason))
        start = end
    return groups


def _fit_vision(start, most, row_cost, cum, budget) -> int:
    """Largest group size <= ``most`` from ``start`` within the vision cost and caps."""
    caps, cost = budget.caps, budget.cost
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
    """Best-fit decreasing of the length-sorted buffer into bins of ``budget.limit``."""
    cost_model, caps, limit = budget.cost, budget.caps, budget.limit
    patches, pairs, images = vision
    item_cost = cost_model.sample_cost(lengths[order], patches[order], pairs[order]).tolist()
    item_patches = patches[order].tolist()
    item_images = images[order].tolist()
    item_tokens = lengths[order].tolist()
    bins: list[list[int]] = []  # item ranks per bin
    bin_patches: list[int] = []
    bin_images: list[int] = []
    bin_tokens: list[int] = []
    room_keys: list[float] = []  # free room of each open bin, sorted ascending
    room_bins: list[int] = []  # bin id for each entry of room_keys
    max_samples, max_images = caps.max_samples, caps.max_images
    max_patches, max_tokens = caps.max_vision_patches, caps.max_tokens
    for rank, cost in enumerate(item_cost):
        slot = bisect.bisect_left(room_keys, cost)
        while slot < len(room_keys):
            b = room_bins[slot]
            if (
                (max_samples is None or len(bins[b]) < max_samples)
                and (max_images is None or bin_images[b] + item_images[rank] <= max_images)
                and (max_patches is None or bin_patches[b] + item_patches[rank] <= max_patches)
                and (max_tokens is None or bin_tokens[b] + item_tokens[rank] <= max_tokens)
            ):
                break
            slot += 1
        if slot < len(room_keys):
            b = room_bins.pop(slot)
            room = room_keys.pop(slot) - cost
        else:
            b = len(bins)
            bins.append([])
            bin_patches.append(0)
            bin_images.append(0)
            bin_tokens.append(0)
            room = limit - cost
        bins[b].append(rank)
        bin_patches[b] += item_patches[rank]
        bin_images[b] += item_images[rank]
        bin_tokens[b] += item_tokens[rank]
        slot = bisect.bisect_left(room_keys, room)
        room_keys.insert(slot, room)
        room_bins.insert(slot, b)

    room_of = dict(zip(room_bins, room_keys, strict=True))
    groups = []
    for b, ranks in enumerate(bins):
        members = order[ranks]
        real = int(lengths[members].sum())
        cost = limit - room_of[b]
        quality = cost / limit
        if max_tokens is not None:  # a row full of tokens is full, whatever it costs
            quality = max(quality, real / max_tokens)
        ready = final or quality >= fill_threshold
        reason = (Reason.FLUSH if final else Reason.FILL) if ready else Reason.HELD
        groups.append(Group(members, real, real, float(cost), quality, reason))
    return groups
