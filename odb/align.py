"""Alignment across ranks: every rank runs the same number of steps, with similar work.

Each round, every rank offers the groups it could emit now and sends ONE fixed-size int64
report to all ranks (``all_gather``); every rank then computes the same :func:`decide` from the
gathered table, so no rank can skip a collective::

    rank 0 report: [status, offered=5, buffered, costs(5) ..., label tokens(5) ..., images(5) ...]
    rank 1 report: [status, offered=3, buffered, costs(3) ..., label tokens(3) ..., images(3) ...]
                            \\ all_gather: every rank holds the same table /
    decide:  T = min offered over ranks still reading input = 3 (with many groups offered,
             60% fewer, so that every rank has a choice)
             each rank runs T of its offered groups (those that must go now among them),
             the ones that best fit one profile of T target costs (see _assign), sorted by
             cost, so step j pairs the j-th costliest group of every rank; the T steps then
             run in one shared random order
             (seed, epoch, round); a rank with no data left runs ghost steps (weight 0);
             a step is a vision step when any rank's batch in it holds an image (every rank
             must then run the vision tower: FSDP and ZeRO-3 gather its weights collectively)

Near the end of the data, ranks that will read no more run other ranks' surplus groups
instead of ghost steps (``share_tail``); those rounds add two exchanges, the groups' dataset
indices and the recipients' verdicts (:func:`encode_given`, :func:`encode_verdict`).
One process is the same protocol with a table of one row and no collective. The proof that
steps stay equal, every sample is emitted once and passes end is in docs/protocol.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from odb.errors import AlignmentError, ConfigError, OdbError, SampleError, SampleTypeError

__all__ = [
    "FINISHED",
    "EXHAUSTED",
    "FAILED",
    "NO_GHOST",
    "UNKNOWN",
    "PROTOCOL_VERSION",
    "check_versions",
    "cause_of",
    "report_width",
    "encode_report",
    "failure_report",
    "check_reports",
    "Transfer",
    "Decision",
    "decide",
    "lend_ghost",
    "encode_given",
    "decode_received",
    "encode_verdict",
    "read_verdict",
    "PassIdentity",
    "Agreement",
    "fingerprint",
    "encode_handshake",
    "agree",
]

# status bits of a report
FINISHED = 1  # no data left at all: input exhausted and buffer empty
EXHAUSTED = 2  # no more input (buffered samples may remain)
FAILED = 4  # this rank raised while preparing the round (the header's cause says how)
NO_GHOST = 8  # exhausted without a single sample to copy for a ghost step (empty dataset)

# why a rank failed, sent as a number beside FAILED so every rank can say it
_CAUSES = (
    "",
    "a sample broke the sample contract or the budget",
    "the dataset, its workers or the sampler raised",
    "odb refused its settings or state",
)


def cause_of(error: BaseException) -> int:
    """The cause number a failing rank sends for ``error``."""
    if isinstance(error, SampleError | SampleTypeError):
        return 1
    return 3 if isinstance(error, OdbError) else 2


def _failed(status: np.ndarray, causes: np.ndarray, when: str) -> AlignmentError:
    ranks = np.flatnonzero(status & FAILED)
    why = sorted({_CAUSES[int(c)] for c in causes[ranks] if 0 < int(c) < len(_CAUSES)})
    return AlignmentError(
        f"rank(s) {ranks.tolist()} raised {when}"
        + (f" ({'; '.join(why)})" if why else "")
        + "; see their logs for the error (the other ranks stop here instead of waiting)"
    )


_HEADER = 5  # status, offered, buffered, cause, images of the ghost sample
_GHOST_IMAGES = 4
_COLUMNS = 5  # per offered group: cost, label tokens, samples, must-go-now flag, images


def report_width(max_steps: int) -> int:
    """Length of one rank's report: a header and five columns of ``max_steps`` entries."""
    return _HEADER + _COLUMNS * max_steps


def encode_report(
    status: int,
    buffered: int,
    costs: Sequence[float],
    label_tokens: Sequence[int],
    samples: Sequence[int],
    max_steps: int,
    must: Sequence[bool] = (),
    images: Sequence[int] = (),
    ghost_images: int = 0,
) -> np.ndarray:
    """One rank's report for a round; ``costs[i]`` etc. describe its i-th offered group,
    ``must[i]`` says it has to go this round (a stale or solo group), ``images[i]`` counts its
    images and videos; ``ghost_images`` those of the sample its ghost steps would copy."""
    offered = len(costs)
    if offered > max_steps:
        raise ValueError(f"{offered} groups offered, at most {max_steps} fit in a report")
    row = np.zeros(report_width(max_steps), dtype=np.int64)
    row[:3] = (status, offered, buffered)
    row[_GHOST_IMAGES] = ghost_images
    columns = row[_HEADER:].reshape(_COLUMNS, max_steps)
    columns[0, :offered] = np.ceil(np.asarray(costs, dtype=np.float64))
    columns[1, :offered] = label_tokens
    columns[2, :offered] = samples
    columns[3, : len(must)] = must
    columns[4, : len(images)] = images
    return row


def failure_report(error: BaseException, max_steps: int) -> np.ndarray:
    """The report of a rank that raised while preparing a round: it still takes part in the
    round's exchange, so its peers learn of the failure at once instead of timing out."""
    row = encode_report(FAILED, 0, [], [], [], max_steps)
    row[3] = cause_of(error)
    return row


def check_reports(
    table: np.ndarray, when: str = "while restoring the pass", *, cause: int = 3
) -> None:
    """Raise :class:`AlignmentError` on every rank alike when a gathered report is ``FAILED``
    (``when`` says in which exchange: a round's, or the one a restored pass runs before the
    steps its state had decided). ``cause``: the column where a failed rank's row holds its
    :func:`cause_of` number (3 in a round's report, 1 in rows that start ``FAILED, cause``)."""
    status = table[:, 0]
    if (status & FAILED).any():
        raise _failed(status, table[:, cause], when)


@dataclass(frozen=True)
class Transfer:
    """A group planned on ``donor`` (at ``position`` of its offer) that ``recipient`` runs at
    step ``step`` of the round, to even out the ranks' remaining work at the end of the data."""

    recipient: int
    step: int
    donor: int
    position: int
    samples: int
    label_tokens: int


@dataclass(frozen=True)
class Decision:
    """What every rank does this round; identical on all ranks.

    ``choice[r][j]`` is the position of the group rank r runs at step j in the offer of rank
    ``owner[r][j]`` (r itself, except for transfers), or -1 for a ghost step. ``done``: the
    pass is over: no rank has data left, or (``stopped``) non-join mode ends it because some
    rank ran out while others still had data; every rank then runs ``padding`` ghost steps
    so the pass ends on a multiple of ``steps_multiple_of``.

    ``vision[j]``: some rank's batch at step j holds an image or video (a group, or the sample a
    ghost step copies), so every rank must run the vision tower there; ``padding_vision`` the
    same for the ``padding`` ghost steps.
    """

    steps: int
    owner: np.ndarray  # [world, steps]
    choice: np.ndarray  # [world, steps]
    global_samples: np.ndarray  # [steps]
    global_label_tokens: np.ndarray  # [steps]
    costs: np.ndarray  # [world, steps], 0 for ghosts
    done: bool
    stopped: bool
    transfers: tuple[Transfer, ...] = ()
    padding: int = 0
    vision: np.ndarray | None = None  # [steps]
    padding_vision: bool = False

    def own_picks(self, rank: int) -> list[int]:
        """Positions in ``rank``'s own offer that it runs, in step order."""
        mine = (self.owner[rank] == rank) & (self.choice[rank] >= 0)
        return self.choice[rank][mine].tolist()

    def given(self, rank: int) -> list[int]:
        """Positions in ``rank``'s offer that other ranks run, in transfer order."""
        return [t.position for t in self.transfers if t.donor == rank]


def decide(
    table: np.ndarray,
    *,
    max_steps: int,
    join: bool,
    rng: np.random.Generator,
    share_tail: bool = True,
    steps_so_far: int = 0,
    steps_multiple_of: int = 1,
) -> Decision:
    """The round's steps from the gathered reports (one row per rank, see ``encode_report``).

    Steps = the fewest groups offered by a rank that will read more input, less a share
    (``_CHOICE``) while every rank reads input, though never fewer than the groups one rank
    must send now (stale, solo), so that every rank chooses which groups to run. With
    ``share_tail`` (join mode; non-join once every rank is exhausted), a rank that will read
    no more and has fewer groups than that runs groups other ranks offered but do not run this
    round (see :class:`Transfer`) instead of ghost steps, and a round takes no more steps than
    ``ceil(offered groups / world)`` (non-join: ``floor``), so the end of the data is spread
    over all ranks and they finish together; the last of them also tries the ranks' numbers of
    groups evened out (:func:`_even_quota`), so that its ghost steps fall in one step.

    Raises :class:`AlignmentError` on every rank alike when a rank failed to prepare the
    round, or would have to run a ghost step without a sample to copy (``NO_GHOST``).
    """
    world = table.shape[0]
    status, offered = table[:, 0], table[:, 1]
    check_reports(table, "while preparing this round")
    columns = table[:, _HEADER:].reshape(world, _COLUMNS, max_steps)
    active = (status & FINISHED) == 0
    if not active.any() or (not join and not active.all()):
        padding = -steps_so_far % steps_multiple_of
        _check_ghosts(status, np.full(world, padding > 0))
        return _ended(table, stopped=bool(active.any()), padding=padding)

    exhausted = (status & EXHAUSTED) != 0
    # a non-join pass has no ghost steps for sharing to replace until every rank is exhausted
    sharing = share_tail and world > 1 and (join or exhausted.all())
    pace = active & ~exhausted if sharing else active  # ranks that will read more set the pace
    even = None  # in the last shared round: the ranks' numbers of groups evened out
    steps = int(offered[pace].min()) if pace.any() else max_steps
    if world > 1 and pace.any() and not exhausted.any():  # every rank chooses (_CHOICE)
        must = int(columns[:, 3].sum(axis=1).max())  # those still go this round
        steps = max(steps - int(steps * _CHOICE), min(steps, must))
    if sharing:  # no more steps than it takes to spread the offered groups over the ranks
        total = int(offered.sum())
        if not exhausted.all():  # the remainder waits for the next round, not a ghost step
            steps = min(steps, max(1, total // world))
        elif join:  # the last groups: all of them now
            steps = -(-total // world)
            even = _even_quota(np.where(active, offered, 0), steps, total)
        else:  # no ghost steps in non-join mode: the remainder is what it drops
            steps = total // world
            if steps == 0:
                return _ended(table, stopped=True, padding=-steps_so_far % steps_multiple_of)
    quotas = [np.full(world, steps, dtype=np.int64)]  # every rank may run every step
    if even is not None and (even < steps).any():
        quotas.append(even)
    runs = _assign(columns, offered, active, quotas, sharing)
    owner = np.repeat(np.arange(world)[:, None], steps, axis=1)
    choice = np.full((world, steps), -1, dtype=np.int64)
    for rank, (owners, positions) in enumerate(runs):
        # Pair similar work across ranks: each run comes costliest first, so step j gets
        # every rank's j-th costliest group.
        owner[rank, : len(owners)] = owners
        choice[rank, : len(owners)] = positions
    order = rng.permutation(steps)
    owner, choice = owner[:, order], choice[:, order]

    real = choice >= 0
    _check_ghosts(status, ~real.all(axis=1))
    picked = columns[owner, :, np.maximum(choice, 0)]  # [world, steps, column]
    costs = np.where(real, picked[..., 0], 0)
    label_tokens = np.where(real, picked[..., 1], 0).sum(axis=0)
    samples = np.where(real, picked[..., 2], 0).sum(axis=0)
    images = np.where(real, picked[..., 4], table[:, _GHOST_IMAGES, None])
    recipients, steps_at = np.nonzero(real & (owner != np.arange(world)[:, None]))
    transfers = tuple(
        Transfer(
            recipient=int(r),
            step=int(j),
            donor=int(owner[r, j]),
            position=int(choice[r, j]),
            samples=int(picked[r, j, 2]),
            label_tokens=int(picked[r, j, 1]),
        )
        for r, j in zip(recipients, steps_at, strict=True)
    )
    return Decision(
        steps,
        owner,
        choice,
        samples,
        label_tokens,
        costs,
        False,
        False,
        transfers,
        vision=(images > 0).any(axis=0),
    )


def encode_given(decision: Decision, rank: int, indices: Sequence[Sequence[int]]) -> np.ndarray:
    """``rank``'s row of a round's transfer exchange: the dataset indices of the groups it hands
    over (``indices[k]`` for ``decision.given(rank)[k]``). Every rank sends a row of the same
    width, known to all from the decision, so the exchange is one ``all_gather``."""
    width = max(
        sum(t.samples for t in decision.transfers if t.donor == donor)
        for donor in {t.donor for t in decision.transfers}
    )
    row = np.full(width, -1, dtype=np.int64)
    flat = [int(i) for group in indices for i in group]
    row[: len(flat)] = flat
    return row


def decode_received(decision: Decision, table: np.ndarray, rank: int) -> dict[int, list[int]]:
    """The dataset indices ``rank`` runs at each step it received a group for, read from the
    gathered rows of :func:`encode_given`."""
    offsets = dict.fromkeys(range(table.shape[0]), 0)
    received = {}
    for t in decision.transfers:
        start = offsets[t.donor]
        offsets[t.donor] = start + t.samples
        if t.recipient == rank:
            received[t.step] = table[t.donor, start : start + t.samples].tolist()
    return received


def encode_verdict(
    decision: Decision,
    rank: int,
    failure: BaseException | None,
    label_tokens: Mapping[int, int] = MappingProxyType({}),
) -> np.ndarray:
    """``rank``'s row of a transfer round's last exchange, after it read the groups it
    received: whether that failed, and for each step the label tokens it found minus those the
    donor reported (``label_tokens[step]`` for its received groups; a dataset whose samples
    vary between reads, e.g. random augmentation, changes them), so every rank can correct the
    step's global count before training on it. Only transfers addressed to ``rank`` count:
    other ranks may receive groups at the same steps, and correct them in their own rows."""
    row = np.zeros(2 + decision.steps, dtype=np.int64)
    if failure is not None:
        row[:2] = FAILED, cause_of(failure)
    for t in decision.transfers:
        if t.recipient == rank and t.step in label_tokens:
            row[2 + t.step] = label_tokens[t.step] - t.label_tokens
    return row


def read_verdict(table: np.ndarray) -> np.ndarray:
    """The per-step corrections of the global label tokens, from the gathered verdicts; raises
    :class:`AlignmentError` on every rank when any rank could not read what it received."""
    if (table[:, 0] & FAILED).any():
        error = _failed(table[:, 0], table[:, 1], "reading the samples handed over to them")
        raise AlignmentError(f"{error} (share_tail=False keeps every sample on its own rank)")
    return table[:, 2:].sum(axis=0)


def lend_ghost(table: np.ndarray, donor: int) -> np.ndarray:
    """The round's reports once the ranks that reported ``NO_GHOST`` took a copy of
    ``donor``'s ghost sample: their bit cleared, the donor's ghost images as theirs."""
    table = table.copy()
    lacking = (table[:, 0] & NO_GHOST) != 0
    table[lacking, _GHOST_IMAGES] = table[donor, _GHOST_IMAGES]
    table[:, 0] &= ~NO_GHOST
    return table


def _check_ghosts(status: np.ndarray, runs_ghosts: np.ndarray) -> None:
    """A rank that must run a ghost step needs a sample to copy; one whose dataset is empty
    has none, and all ranks stop together rather than leave the others waiting for it."""
    lacking = np.flatnonzero((status & NO_GHOST).astype(bool) & runs_ghosts)
    if lacking.size:
        raise AlignmentError(
            f"rank(s) {lacking.tolist()} must run ghost steps (loss weight 0) while other ranks "
            f"still train, but have no sample to copy: their dataset is empty; give every rank "
            f"a non-empty dataset, or one dataset that odb shards across the ranks"
        )


def _ended(table: np.ndarray, stopped: bool, padding: int = 0) -> Decision:
    """The decision that ends the pass; every rank runs ``padding`` ghost steps first."""
    empty = np.zeros((table.shape[0], 0), dtype=np.int64)
    vision = padding > 0 and bool((table[:, _GHOST_IMAGES] > 0).any())
    return Decision(
        0, empty, empty, empty[0], empty[0], empty, True, stopped, (), padding, empty[0] > 0, vision
    )


_Runs = list[tuple[np.ndarray, np.ndarray]]  # per rank: (owner ranks, offer positions)


_CHOICE = 0.6
"""While every rank still reads input, a round runs this share fewer steps than the fewest
groups a rank offered, so that every rank, that one included, chooses which of its groups to
run: ranks whose offers differ in shape (more heavy groups on one, more light ones on another)
then run groups that match in cost, and keep the others for the next round. Rounds still come
once per ``round_size`` samples read, so more choice does not add rounds: the buffers hold
more groups (up to the window) and samples wait longer within ``max_wait``. 0.6 against 0.3:
balance 0.966 -> 0.971 on the hardest case of docs/benchmarks.md (mixed, padded, 16 ranks,
Qwen3-VL-2B; estimated), the median wait unchanged, the 95th percentile 6 -> 9 rounds on
long-multimodal."""

_REFINE = 2
"""Rounds of refinement of the common cost profile (see :func:`_assign`)."""

_SKIP_MUST = 1 << 44
"""What leaving out a group that must go now costs a rank's fit: more than any mismatch (costs
are below 2**31 and ranks and steps below 2**12 each), so it is left out only when the round has
fewer steps than such groups."""

_INFEASIBLE = 1 << 60


def _assign(
    columns: np.ndarray,
    offered: np.ndarray,
    active: np.ndarray,
    quotas: Sequence[np.ndarray],
    sharing: bool,
) -> _Runs:
    """Which groups each rank runs this round, costliest first, so that step ``j``, which
    pairs the ``j``-th costliest group of every rank, has groups of near-equal cost on all
    ranks.

    The ranks fit their offers to one common profile of ``steps`` target costs, the pooled
    offered costs at evenly spaced ranks. Each of ``quotas`` caps how many groups each rank
    runs (``quota[r]``, at most ``steps``, which some rank's quota is) and is tried in turn:
    ``steps`` for every rank, and in the last round of a pass also :func:`_even_quota`.
    A rank that offered more groups than its quota chooses that many, one per target from the
    costliest, those that must go now included; a rank that offered fewer runs them all. Each
    fit is optimal for its targets (:func:`_fit_in_order`); a group above its target costs
    ``world - 1`` times what one below does, since every other rank waits for it. With
    ``sharing``, a rank with fewer groups places them at the targets they fit best, the
    targets within its quota it leaves free are its holes, and the groups the choosing ranks
    leave fill them, matched by cost (they are handed over, see :class:`Transfer`); a hole
    left empty, or a step past a rank's quota, is a ghost step. The profile then becomes the
    costliest group at each step, and the fits are made again (``_REFINE`` times, or until
    the profile repeats); the round keeps the assignment, under any quota, that wastes the
    least share of its steps' time (the first of equals).

    Costs are the table's integers and every operation is exact integer arithmetic, so every
    rank computes the same assignment."""
    world, steps = len(offered), int(quotas[0].max(initial=0))
    counts = np.where(active, offered, 0).astype(np.int64)
    width = int(counts.max(initial=0))
    nothing = np.zeros(0, dtype=np.int64)
    if steps <= 0 or width == 0:
        return [(nothing, nothing)] * world
    offers = np.arange(width)[None, :] < counts[:, None]
    cost = columns[:, 0, :width].astype(np.int64)
    # each rank's offers, costliest first (positions past its count sort last)
    order = np.argsort(np.where(offers, -cost, np.iinfo(np.int64).max), axis=1, kind="stable")
    cost = np.take_along_axis(cost, order, axis=1)
    must = np.take_along_axis((columns[:, 3, :width] > 0) & offers, order, axis=1)
    pooled = np.sort(cost[offers])  # sorting kept each rank's offers first
    profile = pooled[((2 * np.arange(steps) + 1) * len(pooled)) // (2 * steps)][::-1].copy()
    over = max(world - 1, 1)
    best = None
    for quota in quotas:
        best = _assign_within(quota, profile, cost, counts, offers, must, over, sharing, best)
    _, _, where, bounds = best
    runs: _Runs = []
    for rank in range(world):
        donors, places = np.divmod(where[bounds[rank] : bounds[rank + 1]], width)
        runs.append((donors, order[donors, places]))
    return runs


def _assign_within(quota, targets, cost, counts, offers, must, over, sharing, best):
    """:func:`_assign`'s fits and refinements under one ``quota``, on the ranks' offers sorted
    costliest first; returns ``best`` or a better assignment (``waste``, ``busy``, then
    :func:`_by_runner`'s flat indices and bounds)."""
    world, steps = len(counts), len(targets)
    nothing = np.zeros(0, dtype=np.int64)
    choosing = np.flatnonzero(counts > quota)
    holders = np.flatnonzero(counts < quota) if sharing else nothing  # ranks with holes
    placing = holders[counts[holders] > 0]
    for _ in range(_REFINE + 1 if len(choosing) else 1):
        # who runs each offer: a rank that offered at most its quota runs them all
        owner = np.where(offers & (counts <= quota)[:, None], np.arange(world)[:, None], -1)
        # the targets none of a rank's groups fit, within its quota (the costliest targets)
        free = np.arange(steps)[None, :] < quota[:, None]
        if len(placing):  # only where the holes are filled does it matter which they are
            fit = _fit_in_order(
                cost[placing],
                counts[placing],
                np.broadcast_to(targets, (len(placing), steps)),
                quota[placing],
                np.zeros((len(placing), steps), dtype=np.int64),
                over,
                targets_first=False,
            )
            rows, places = np.nonzero(fit >= 0)
            free[placing[rows], fit[rows, places]] = False
        if len(choosing):
            fit = _fit_in_order(
                np.broadcast_to(targets, (len(choosing), steps)),
                quota[choosing],
                cost[choosing],
                counts[choosing],
                np.where(must[choosing], _SKIP_MUST, 0),
                over,
                targets_first=True,
            )
            rows, places = np.nonzero(fit >= 0)
            owner[choosing[rows], fit[rows, places]] = choosing[rows]
        if len(holders):
            _fill_holes(owner, cost, counts, targets, holders, free[holders], over)
        picked, where, bounds = _by_runner(owner, cost, steps)
        slowest = picked.max(axis=0)
        waste, busy = int(world * slowest.sum() - picked.sum()), int(world * slowest.sum())
        if best is None or waste * best[1] < best[0] * busy:
            best = (waste, busy, where, bounds)
        if np.array_equal(slowest, targets):  # the same fits again: nothing to refine
            break
        targets = slowest
    return best


def _even_quota(counts: np.ndarray, steps: int, total: int) -> np.ndarray:
    """How many of the last ``total`` groups each rank runs in ``steps`` steps, evened out:
    ``steps`` for the ranks that offered the most, ``steps - 1`` for the rest (ties go to the
    lower rank, as on every rank). The ghost steps left over (``world * steps - total``) then
    all fall in the last step, beside the round's lightest groups, instead of beside full
    groups on the ranks that offered more; it costs transfers, and where the groups' costs
    make that no better, the round keeps every rank free to run every step."""
    quota = np.full(len(counts), steps - 1, dtype=np.int64)
    quota[np.argsort(-counts, kind="stable")[: total - len(counts) * (steps - 1)]] = steps
    return quota


def _by_runner(owner: np.ndarray, cost: np.ndarray, steps: int):
    """``[world, steps]``: the costs each rank runs, costliest first (0 for none); with the
    flat index into ``owner`` of every group run, by runner and costliest first, and where
    each runner's share starts in it (``world + 1`` bounds)."""
    where = np.flatnonzero(owner >= 0)
    runner, runs_cost = owner.ravel()[where], cost.ravel()[where]
    by = np.lexsort((-runs_cost, runner))
    where, runner, runs_cost = where[by], runner[by], runs_cost[by]
    bounds = np.searchsorted(runner, np.arange(owner.shape[0] + 1))
    picked = np.zeros((owner.shape[0], steps), dtype=np.int64)
    picked[runner, np.arange(len(runner)) - bounds[runner]] = runs_cost
    return picked, where, bounds.tolist()


def _fill_holes(
    owner: np.ndarray,
    cost: np.ndarray,
    counts: np.ndarray,
    targets: np.ndarray,
    holders: np.ndarray,
    free: np.ndarray,
    over: int,
) -> None:
    """Hand the groups no rank runs to the ``holders``' holes (their ``free`` targets), in
    place in ``owner``: groups and holes sorted costliest first and matched in order
    (:func:`_match_in_order`; the shorter list is all matched: holes left empty are ghost
    steps, groups left wait for the next round). A rank with holes runs all its own groups,
    so donors and recipients are always different ranks."""
    donor, place = np.nonzero((owner < 0) & (np.arange(owner.shape[1]) < counts[:, None]))
    holder, level = np.nonzero(free)
    if not len(donor) or not len(level):
        return
    group_cost, hole_cost = cost[donor, place], targets[level]
    by_group = np.argsort(-group_cost, kind="stable")
    by_hole = np.argsort(-hole_cost, kind="stable")
    groups, holes = group_cost[by_group], hole_cost[by_hole]
    if len(groups) <= len(holes):
        hole, group = by_hole[_match_in_order(groups, holes, over, targets_first=False)], by_group
    else:
        hole, group = by_hole, by_group[_match_in_order(holes, groups, over, targets_first=True)]
    owner[donor[group], place[group]] = holders[holder[hole]]


def _match_in_order(
    left: np.ndarray, right: np.ndarray, over: int, *, targets_first: bool
) -> np.ndarray:
    """Match each of ``left`` to a distinct entry of the longer ``right`` (both sorted
    costliest first), in order, greedily: each takes the entry it mismatches least (as in
    :func:`_fit_in_order`) among those after the previous one's that leave enough for the
    entries after it. The mismatch falls, then rises along ``right``, so each entry's choice
    is one of the two around where ``right`` crosses its value, found for all at once, or the
    nearest end of its range: linear time after the search, where the tail of a round at
    many ranks matches thousands of holes."""
    crossing = np.searchsorted(-right, -left)  # the first entry not above each one
    above, below = np.maximum(crossing - 1, 0), np.minimum(crossing, len(right) - 1)

    def mismatch(at: np.ndarray) -> np.ndarray:
        return _mismatch(right[at] - left if targets_first else left - right[at], over)

    preferred = np.where(mismatch(above) <= mismatch(below), above, below).tolist()
    spare, start, fit = len(right) - len(left), 0, []
    for i, choice in enumerate(preferred):
        start = min(max(choice, start), i + spare) + 1
        fit.append(start - 1)
    return np.asarray(fit, dtype=np.int64)


def _mismatch(gap: np.ndarray, over: int) -> np.ndarray:
    """What a group ``gap`` above its target costs a step, ``over * gap`` (the other ranks
    wait for it), or ``-gap`` below it (this rank waits)."""
    return np.maximum(over * gap, -gap)


def _fit_in_order(
    left: np.ndarray,
    left_count: np.ndarray,
    right: np.ndarray,
    right_count: np.ndarray,
    skip: np.ndarray,
    over: int,
    *,
    targets_first: bool,
) -> np.ndarray:
    """For each row ``r``, match each of its first ``left_count[r]`` entries of ``left`` to a
    distinct one of its first ``right_count[r]`` entries of ``right`` (both sorted costliest
    first), keeping their order, at the least total mismatch plus ``skip`` for each ``right``
    entry left out. Returns, per row and ``left`` entry, the matched ``right`` position (-1
    past ``left_count``).

    Targets are on the left when ``targets_first``, groups otherwise. A group ``gap`` above
    its target mismatches ``over * gap`` (the other ranks wait), ``gap`` below it ``gap``
    (this rank waits). That cost is convex in the gap, so some order-keeping matching is
    optimal among all matchings. Left entry ``k`` then goes to right entry ``k + d_k`` with
    ``d_k`` never falling, at most the surplus ``right_count - left_count``; and the skips
    cost all of ``skip`` less that of the entries matched. So dynamic programming over the
    left entries, keeping the best cost for each ``d`` (a running minimum over smaller ones),
    finds it in ``O(left x surplus)`` integer steps vectorised over the rows."""
    rows = left.shape[0]
    count = left_count.astype(np.int64)
    spare = int((right_count - count).max(initial=0))
    match = np.full(left.shape, -1, dtype=np.int64)
    longest = int(count.max(initial=0))
    if longest == 0:
        return match
    shifts = np.arange(spare + 1)
    # right entries and skips at k + d, for every left entry k and shift d: [rows, k, d]
    position = np.arange(longest)[:, None] + shifts[None, :]
    padded = np.zeros((rows, longest + spare), dtype=np.int64)
    padded[:, : right.shape[1]] = right[:, : longest + spare]
    skipped = np.zeros_like(padded)
    skipped[:, : skip.shape[1]] = skip[:, : longest + spare]
    allowed = (position[None] < right_count[:, None, None]) & (
        shifts[None, None, :] <= (right_count - count)[:, None, None]
    )
    best = np.zeros((longest, rows, spare + 1), dtype=np.int64)  # best cost to k at shift d
    reach = np.zeros((rows, spare + 1), dtype=np.int64)
    for k in range(longest):
        entries = padded[:, position[k]]
        gap = (entries - left[:, k, None]) if targets_first else (left[:, k, None] - entries)
        cost = _mismatch(gap, over) - skipped[:, position[k]]
        cost = np.where(allowed[:, k], reach + cost, _INFEASIBLE)
        best[k] = cost
        reach = np.minimum.accumulate(cost, axis=1)
    # back from each row's last entry: the cheapest shift, then the cheapest not above it
    every = np.arange(rows)
    shift = np.full(rows, spare, dtype=np.int64)
    for k in range(longest - 1, -1, -1):
        active = k < count
        ceiling = np.where(k == count - 1, spare, shift)
        cost = np.where(shifts[None, :] <= ceiling[:, None], best[k], _INFEASIBLE + 1)
        shift = np.where(active, np.argmin(cost, axis=1), shift)
        match[every[active], k] = k + shift[active]
    return match


UNKNOWN = -1
"""A fingerprint a rank did not or could not take."""

PROTOCOL_VERSION = 4
"""The layout of every row below; ranks first exchange it alone, in a row whose width never
changes, so that ranks running different odb versions fail instead of gathering rows of
different widths (which gloo does not survive)."""


def check_versions(table: np.ndarray) -> None:
    """Raise :class:`ConfigError` on every rank when the ranks' protocol versions differ."""
    versions = table[:, 0]
    if (versions != versions[0]).any():
        raise ConfigError(
            f"the ranks run different odb versions (protocol versions by rank: "
            f"{versions.tolist()}); install the same odb on every node"
        )


def fingerprint(data: bytes) -> int:
    """A 63-bit hash of ``data``, the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass(frozen=True)
class PassIdentity:
    """What one rank brings to a pass, sent in the pass's first exchange so that every rank
    checks what it assumes of the others before any sample moves: the settings that decide
    the protocol (``config``, a fingerprint), its epoch order before sharding, and its
    dataset (length, and a fingerprint of a few samples' tokens, or ``UNKNOWN``)."""

    config: int
    order_length: int
    order_hash: int
    dataset_length: int
    dataset_hash: int = UNKNOWN
    epoch: int = 0  # where the pass starts: its epoch, and round and step of a restored pass
    round: int = 0
    step: int = 0


_IDENTITY = 8  # the fields of PassIdentity, after status and cause


def encode_handshake(
    identity: PassIdentity | None, error: BaseException | None = None
) -> np.ndarray:
    """A rank's row of the first exchange of a pass (``error``: it could not describe itself,
    and still takes part so the others fail at once)."""
    row = np.zeros(2 + _IDENTITY, dtype=np.int64)
    if error is not None or identity is None:
        row[:2] = FAILED, cause_of(error) if error is not None else 3
        return row
    row[2:] = (
        identity.config,
        identity.order_length,
        identity.order_hash,
        identity.dataset_length,
        identity.dataset_hash,
        identity.epoch,
        identity.round,
        identity.step,
    )
    return row


@dataclass(frozen=True)
class Agreement:
    """What the ranks settled in a pass's first exchange, identically on every rank.

    ``shard``: odb splits the one epoch order every rank holds into per-rank parts.
    ``hand_over``: groups may move between ranks as dataset indices at the end of the data,
    because every rank reads the same dataset; ``note`` says why not when they may not.
    """

    shard: bool
    hand_over: bool
    note: str = ""


def agree(table: np.ndarray, *, shard: bool) -> Agreement:
    """Check the gathered identities (rows of :func:`encode_handshake`) and settle the pass.

    Raises :class:`AlignmentError` if a rank failed to describe itself, and
    :class:`ConfigError` if the ranks' settings differ, or if odb is to ``shard`` orders that
    are not identical (each rank would train on a part of a part: a sampler that already
    gives each rank its own indices needs ``shard=False``).
    """
    world = table.shape[0]
    check_reports(table, "before the pass started", cause=1)
    config, order_length, order_hash, dataset_length, dataset_hash = table[:, 2:7].T
    if (config != config[0]).any():
        raise ConfigError(
            f"rank(s) {np.flatnonzero(config != config[0]).tolist()} built their odb loader "
            f"with other settings than rank 0 (budget, mode, caps, window, round_size, "
            f"max_wait, fill_threshold, over_budget, join, share_tail, shard, "
            f"steps_multiple_of or seed); every rank must use the same settings"
        )
    position = table[:, 7:10]
    if (position != position[0]).any():
        raise ConfigError(
            f"the ranks start this pass at different points (epoch, round, step: "
            f"{[tuple(p) for p in position.tolist()]}); every decision of a round is seeded by "
            f"them, so ranks must call set_epoch with the same epoch and restore states saved "
            f"at the same step (load_state_dict)"
        )
    if (
        shard
        and world > 1
        and ((order_length != order_length[0]).any() or (order_hash != order_hash[0]).any())
    ):
        raise ConfigError(
            f"odb splits one epoch order (or stream) across the {world} ranks (shard=True, "
            f"the default under torch.distributed), but the ranks' orders or streams differ "
            f"(lengths {order_length.tolist()}): a sampler or stream that already gives each "
            f"rank its own samples would be split again and each rank would train on a part "
            f"of its part; pass shard=False to use every rank's order or stream as it is"
        )
    if world == 1:
        return Agreement(shard=False, hand_over=False)
    if (dataset_length == UNKNOWN).any():
        note = "the data is streamed (a stream cannot read a sample again by index)"
    elif (dataset_length != dataset_length[0]).any():
        note = f"the ranks' datasets have different lengths ({dataset_length.tolist()})"
    elif (dataset_hash == UNKNOWN).any():
        note = "the ranks' datasets could not be compared (a sample could not be read here)"
    elif (dataset_hash != dataset_hash[0]).any():
        note = "the ranks' datasets hold different samples"
    else:
        return Agreement(shard=bool(shard), hand_over=True)
    return Agreement(shard=bool(shard), hand_over=False, note=note)
