"""Alignment across ranks: every rank runs the same number of steps, with similar work.

Each round, every rank offers the groups it could emit now and sends ONE fixed-size int64
report to all ranks (``all_gather``); every rank then computes the same :func:`decide` from the
gathered table, so no rank can skip a collective::

    rank 0 report: [status, offered=5, buffered, costs(5) ..., label tokens(5) ..., images(5) ...]
    rank 1 report: [status, offered=3, buffered, costs(3) ..., label tokens(3) ..., images(3) ...]
                            \\ all_gather: every rank holds the same table /
    decide:  T = min offered over ranks still reading input = 3 (with many groups offered,
             30% fewer, so that every rank has a choice)
             each rank runs T of its offered groups (those that must go now first, then the
             ones closest in cost to T targets spread over all offered costs), sorted by
             cost, so step j pairs
             the j-th costliest group of every rank; the T steps then run in one shared random order
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
import heapq
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
    over all ranks and they finish together.

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
        else:  # no ghost steps in non-join mode: the remainder is what it drops
            steps = total // world
            if steps == 0:
                return _ended(table, stopped=True, padding=-steps_so_far % steps_multiple_of)
    runs = _matched_runs(columns, offered, active, pace, steps)
    if sharing:
        runs = _hand_over_surplus(runs, offered, steps)
    owner = np.repeat(np.arange(world)[:, None], steps, axis=1)
    choice = np.full((world, steps), -1, dtype=np.int64)
    for rank, (owners, positions) in enumerate(runs):
        # Pair similar work across ranks: step j gets every rank's j-th costliest group.
        order = np.argsort(-columns[owners, 0, positions], kind="stable")
        owner[rank, : len(order)] = owners[order]
        choice[rank, : len(order)] = positions[order]
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


_CHOICE = 0.3
"""While every rank still reads input, a round runs this share fewer steps than the fewest
groups a rank offered, so that every rank, that one included, chooses which of its groups to
run: ranks whose offers differ in shape (more heavy groups on one, more light ones on another)
then run groups that match in cost, and keep the others for the next round."""


def _matched_runs(
    columns: np.ndarray, offered: np.ndarray, active: np.ndarray, pace: np.ndarray, steps: int
) -> _Runs:
    """Every active rank runs ``steps`` of its own groups, or all it offered if fewer: those
    that must go now, then those closest in cost to ``steps`` targets spread evenly over the
    costs all ranks offered (in priority order when no rank sets the pace).

    The targets are the pooled offered costs at evenly spaced ranks (integers taken from the
    table, so every rank computes them exactly alike); since step ``j`` then pairs the
    ``j``-th costliest group of every rank, ranks that pick groups near the same targets run
    steps of near-equal cost."""
    targets = None
    if pace.any() and steps > 0:
        pooled = np.sort(
            np.concatenate([columns[r, 0, : int(offered[r])] for r in np.flatnonzero(active)])
        )
        targets = pooled[((2 * np.arange(steps) + 1) * len(pooled)) // (2 * steps)]
    runs: _Runs = []
    for rank in range(len(offered)):
        count = int(offered[rank]) if active[rank] else 0
        picks = np.arange(min(steps, count))
        if count > steps and targets is not None:
            picks = _match(columns[rank, 0, :count], columns[rank, 3, :count] > 0, targets)
        runs.append((np.full(len(picks), rank), picks))
    return runs


def _hand_over_surplus(runs: _Runs, offered: np.ndarray, steps: int) -> _Runs:
    """Fill the steps a rank has no group of its own for with groups other ranks offered but
    do not run this round (lowest donor rank and earliest offer position first), instead of
    ghosts: each goes to the rank missing the most steps (lowest rank on ties), so the
    ghosts that remain are spread as evenly as they can be. Once every rank is exhausted
    this is the whole of what is left."""
    missing = [steps - len(owners) for owners, _ in runs]
    if not any(missing):  # every rank has its steps (the usual round): nothing to hand over
        return runs
    unused = np.arange(int(offered.max()))[None, :] < offered[:, None]
    for donor, (_, positions) in enumerate(runs):
        unused[donor, positions] = False
    donors, places = np.nonzero(unused)  # lowest donor rank, then earliest position, first
    # The rank missing the most steps, lowest rank on ties, takes the next group: a heap
    # keeps this O(groups * log ranks) where a scan over the ranks per group is O(groups *
    # ranks), seconds per round at 1024 ranks (docs/benchmarks.md, the alignment's cost).
    wanting = [(-need, rank) for rank, need in enumerate(missing) if need > 0]
    heapq.heapify(wanting)
    received: list[list[tuple[int, int]]] = [[] for _ in runs]
    for group in zip(donors.tolist(), places.tolist(), strict=True):
        if not wanting:
            break
        need, rank = heapq.heappop(wanting)
        received[rank].append(group)
        if need < -1:
            heapq.heappush(wanting, (need + 1, rank))
    topped: _Runs = []
    for (owners, positions), taken in zip(runs, received, strict=True):
        if taken:
            owners = np.concatenate([owners, [d for d, _ in taken]]).astype(np.int64)
            positions = np.concatenate([positions, [p for _, p in taken]]).astype(np.int64)
        topped.append((owners, positions))
    return topped


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
