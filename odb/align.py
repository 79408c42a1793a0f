"""Deciding which planned groups become this round's steps.

In one process every ready group becomes a step. The emission order is a seeded shuffle of
the round's ready groups, so a round does not turn into a length curriculum (all long batches,
then all short). The distributed alignment protocol (equal step counts on every rank) plugs in
here with the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from odb.planner import Plan

__all__ = ["LocalAlignment", "Step"]


@dataclass(frozen=True)
class Step:
    """One step of a round: which planned group this rank runs, and the step's global counts."""

    group: int
    global_samples: int
    global_label_tokens: int


class LocalAlignment:
    """Alignment for a single process: global counts are the local ones."""

    rank = 0
    world_size = 1

    def align(self, plan: Plan, label_tokens: list[int], rng: np.random.Generator) -> list[Step]:
        """Steps of this round in emission order; ``label_tokens[g]`` belongs to group ``g``."""
        order = rng.permutation(plan.n_ready)
        return [Step(int(g), len(plan.groups[g].members), label_tokens[g]) for g in order]
