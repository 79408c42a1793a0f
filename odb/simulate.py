"""Many ranks in one process, running the loader's own round code on sizes only.

Each simulated rank has a :class:`~odb.buffer.SampleBuffer` fed from its list of samples; a
round stacks the ranks' reports into the table that ``all_gather`` would produce and applies
:func:`odb.align.decide` exactly as every real rank does. Used by tests (properties of the
protocol for any number of ranks) and by benchmarks (balance and fill at 8 or 16 ranks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from odb.align import decide, decode_received, encode_given
from odb.buffer import Entry, RoundSettings, SampleBuffer
from odb.cost import SampleSize
from odb.planner import shared_group

__all__ = ["SimulatedStep", "Simulation", "simulate"]


@dataclass(frozen=True)
class SimulatedStep:
    """What one rank ran at one step: the samples' indices (empty for a ghost step)."""

    indices: tuple[int, ...]
    cost: float
    real_tokens: int
    padded_tokens: int
    label_tokens: int
    global_label_tokens: int
    reason: str
    round: int

    @property
    def ghost(self) -> bool:
        return not self.indices


@dataclass(frozen=True)
class Simulation:
    """``steps[r]`` is rank r's sequence of steps; ``rounds`` the report exchanges it took,
    ``transfer_rounds`` those that also handed groups between ranks (two more exchanges:
    the indices, then the recipients' verdicts, which simulated ranks need not send)."""

    steps: list[list[SimulatedStep]]
    rounds: int
    dropped: list[int]
    transfer_rounds: int = 0

    @property
    def collectives(self) -> int:
        return self.rounds + 2 * self.transfer_rounds


def simulate(
    shards: Sequence[Sequence[tuple[int, SampleSize] | Entry]],
    settings: RoundSettings,
    *,
    join: bool = True,
    share_tail: bool = True,
    seed: int = 0,
    epoch: int = 0,
    max_rounds: int | None = None,
) -> Simulation:
    """Run one pass for ``len(shards)`` ranks; ``shards[r]`` is rank r's order of (index,
    size) pairs, or of entries (to mark over-budget samples ``solo`` as the loader does).

    ``max_rounds`` guards tests against a protocol that would not terminate.
    """
    world = len(shards)
    buffers = [SampleBuffer() for _ in range(world)]
    sources = [iter(shard) for shard in shards]
    exhausted = [False] * world
    steps: list[list[SimulatedStep]] = [[] for _ in range(world)]
    dropped = [0] * world
    round_ = transfer_rounds = 0
    while True:
        if max_rounds is not None and round_ >= max_rounds:
            raise RuntimeError(f"the simulation did not end within {max_rounds} rounds")
        offers, reports = [], []
        for rank in range(world):
            if not exhausted[rank]:
                exhausted[rank] = buffers[rank].refill(settings, _puller(sources[rank]))
            offer, report = buffers[rank].prepare(settings, exhausted=exhausted[rank])
            offers.append(offer)
            reports.append(report)
        rng = np.random.default_rng([seed, epoch, round_])
        decision = decide(
            np.stack(reports),
            max_steps=settings.max_steps,
            join=join,
            rng=rng,
            share_tail=share_tail,
        )
        if decision.done:
            if decision.stopped:
                dropped = [
                    len(b) + sum(1 for _ in s) for b, s in zip(buffers, sources, strict=True)
                ]
            return Simulation(steps, round_ + 1, dropped, transfer_rounds)
        committed = [buffers[r].commit(offers[r], decision, r) for r in range(world)]
        handed = {e.index: e for _, given in committed for group in given for e in group}
        gathered = None
        if decision.transfers:
            rows = [
                encode_given(decision, r, [[e.index for e in g] for g in committed[r][1]])
                for r in range(world)
            ]
            gathered = np.stack(rows)
            transfer_rounds += 1
        for rank in range(world):
            own = iter(committed[rank][0])
            shared = decode_received(decision, gathered, rank) if gathered is not None else {}
            for j, pick in enumerate(decision.choice[rank].tolist()):
                total_labels = int(decision.global_label_tokens[j])
                if pick < 0:
                    steps[rank].append(
                        SimulatedStep((), 0.0, 0, 0, 0, total_labels, "ghost", round_)
                    )
                    continue
                if j in shared:
                    entries = [handed[i] for i in shared[j]]
                    group = shared_group([e.size for e in entries], settings.budget)
                else:
                    entries, group = next(own), offers[rank].groups[pick]
                steps[rank].append(
                    SimulatedStep(
                        tuple(e.index for e in entries),
                        group.cost,
                        group.real_tokens,
                        group.padded_tokens,
                        sum(e.size.label_tokens for e in entries),
                        total_labels,
                        group.reason.value,
                        round_,
                    )
                )
        round_ += 1


def _puller(source):
    def pull() -> Entry | None:
        item = next(source, None)
        if item is None or isinstance(item, Entry):
            return item
        return Entry(item[0], item[1])

    return pull
