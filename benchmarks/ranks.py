"""Policies across data-parallel ranks: which batch each rank runs at each DDP step.

A DDP step runs one batch on every rank and lasts as long as the slowest. An offline policy's
batches are dealt round-robin (batch ``k`` to rank ``k % world`` at step ``k // world``, what
a distributed sampler over a batch list does); the last step may leave ranks idle. odb is
simulated with its own alignment rounds, each rank reading its stride of the epoch as
``odb.DataLoader`` does; a rank with no data left at the tail runs ghost steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from odb.cost import Budget, SampleSize

from .policies import PolicyRun, odb_name, odb_simulation

__all__ = ["RankedRun", "odb_ranked", "round_robin"]

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class RankedRun:
    """``steps[s][r]``: the sample indices rank ``r`` runs at step ``s`` (empty when it is
    idle or runs a ghost batch, which carries no sample of the epoch)."""

    name: str
    steps: list[list[np.ndarray]]
    packed: bool = False

    @property
    def world(self) -> int:
        return len(self.steps[0]) if self.steps else 0

    def flat(self) -> PolicyRun:
        """Every non-empty batch of every rank, as one epoch (for coverage and token counts)."""
        batches = [batch for step in self.steps for batch in step if len(batch)]
        return PolicyRun(self.name, batches, packed=self.packed)


def round_robin(run: PolicyRun, world: int) -> RankedRun:
    """Deal ``run``'s batches to ``world`` ranks in turn, one per rank per step."""
    steps = []
    for start in range(0, len(run.batches), world):
        step = list(run.batches[start : start + world])
        steps.append(step + [_EMPTY] * (world - len(step)))
    return RankedRun(run.name, steps, run.packed)


def odb_ranked(
    sizes: Sequence[SampleSize], budget: Budget, seed: int, world: int, window: int = 1024
) -> RankedRun:
    """odb's epoch on ``world`` simulated ranks (see :func:`~.policies.odb_simulation`)."""
    simulation, _ = odb_simulation(sizes, budget, seed, world, window)
    per_rank = simulation.steps
    steps = [
        [_samples(per_rank[rank][s]) for rank in range(world)] for s in range(len(per_rank[0]))
    ]
    return RankedRun(odb_name(budget), steps, packed=not budget.cost.padded)


def _samples(step) -> np.ndarray:
    """The epoch's samples a step runs: none for a ghost step (it copies a sample, weight 0)."""
    return _EMPTY if step.ghost else np.array(step.sample_indices, dtype=np.int64)
