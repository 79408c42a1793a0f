"""The planner suite: every policy on the same length sets, odb's planning rounds included.

It measures batching quality and planning speed from lengths alone (no tokenizer, no model),
so it runs in seconds and isolates the planner from the input pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from odb.cost import Budget, PackedCost, PaddedCost

from .lengths import clip_to_budget, lognormal_lengths
from .metrics import PolicyMetrics, measure
from .policies import (
    PolicyRun,
    epoch_order,
    odb_batches,
    sorted_batches,
    standard_batch_size,
    standard_batches,
    text_sizes,
)

__all__ = [
    "POLICY_COUNT",
    "LengthSet",
    "PlannerConfig",
    "SetResult",
    "lognormal_sets",
    "run_planner",
]

POLICY_COUNT = 4
"""Policy runs per length set (for progress bars)."""


@dataclass(frozen=True)
class PlannerConfig:
    """What the planner suite runs: the lognormal sets (``mean``, one per ``cvs`` entry, of
    ``samples`` each) under a ``budget`` with odb's planning ``window``."""

    mean: float = 1500.0
    cvs: tuple[float, ...] = (0.3, 0.5, 1.0, 2.5)
    samples: int = 20_000
    budget: int = 16_384
    window: int = 1024
    seed: int = 0


@dataclass(frozen=True)
class LengthSet:
    """Named sample lengths, already within the budget; ``clipped`` were cut down to it."""

    name: str
    lengths: np.ndarray
    clipped: int
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SetResult:
    """Every policy's metrics on one length set, and each policy's batch sizes (for plots)."""

    name: str
    params: dict
    clipped: int
    standard_batch_size: int
    metrics: list[PolicyMetrics]
    batch_sizes: dict[str, np.ndarray]


def lognormal_sets(config: PlannerConfig) -> list[LengthSet]:
    """The built-in sets: one lognormal per CV, clipped to the budget."""
    sets = []
    for cv in config.cvs:
        raw = lognormal_lengths(config.mean, cv, config.samples, config.seed)
        lengths, clipped = clip_to_budget(raw, config.budget)
        params = {"distribution": "lognormal", "mean": config.mean, "cv": cv}
        sets.append(LengthSet(f"lognormal cv={cv:g}", lengths, clipped, params))
    return sets


def _runs(lengths: np.ndarray, batch_size: int, config: PlannerConfig) -> Iterator[PolicyRun]:
    """Each policy's epoch, one at a time (so progress can be shown between them)."""
    yield standard_batches(lengths, config.budget, config.seed, batch_size)
    yield sorted_batches(lengths, config.budget)
    sizes = text_sizes(lengths)
    for cost in (PaddedCost(), PackedCost()):
        yield odb_batches(sizes, Budget(config.budget, cost), config.seed, config.window)


def run_planner(
    config: PlannerConfig,
    sets: list[LengthSet] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[SetResult]:
    """Run every policy on every set (the built-in lognormal sets unless ``sets`` is given);
    ``progress`` is called after each policy run."""
    results = []
    for length_set in sets if sets is not None else lognormal_sets(config):
        lengths = length_set.lengths
        batch_size = standard_batch_size(
            lengths, config.budget, epoch_order(len(lengths), config.seed)
        )
        metrics, batch_sizes = [], {}
        for run in _runs(lengths, batch_size, config):
            metrics.append(measure(run, lengths, config.budget))
            batch_sizes[run.name] = np.array([len(b) for b in run.batches])
            if progress:
                progress(f"{length_set.name}: {run.name}")
        results.append(
            SetResult(
                name=length_set.name,
                params=length_set.params,
                clipped=length_set.clipped,
                standard_batch_size=batch_size,
                metrics=metrics,
                batch_sizes=batch_sizes,
            )
        )
    return results
