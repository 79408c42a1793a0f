"""The planner suite: every policy on the same length sets, odb's planning rounds included.

It measures batching quality and planning speed from lengths alone (no tokenizer, no model),
so it runs in seconds and isolates the planner from the input pipeline. The sets: lognormal
lengths at several spreads, the lengths of the built-in multimodal sets (real-shaped data,
visual tokens included), and any named lengths the caller adds (a user's data).

Planning speed is counted in CPU time, which a busy machine does not inflate as it does wall
time: samples per CPU second inside the planner (``LoaderStats.planner_cpu_seconds``: every
call of :func:`odb.planner.plan_groups` in the epoch's rounds), and per CPU second of the whole
rounds (intake, planning, decision; see :func:`~.policies.odb_simulation`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from odb.cost import Budget, PackedCost, PaddedCost
from odb.errors import ConfigError

from .lengths import clip_to_budget, lognormal_lengths
from .metrics import PolicyMetrics, measure
from .multimodal_sets import BUILTIN_SETS, builtin_sets
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
    "real_length_sets",
    "run_planner",
]

POLICY_COUNT = 4
"""Policy runs per length set (for progress bars)."""


@dataclass(frozen=True)
class PlannerConfig:
    """What the planner suite runs: the lognormal sets (``mean``, one per ``cvs`` entry) and
    the lengths of the built-in multimodal sets named in ``real_sets``, ``samples`` each,
    under a ``budget`` with odb's planning ``window``."""

    mean: float = 1500.0
    cvs: tuple[float, ...] = (0.3, 0.5, 1.0, 2.5)
    samples: int = 20_000
    budget: int = 16_384
    window: int = 1024
    seed: int = 0
    real_sets: tuple[str, ...] = tuple(BUILTIN_SETS)

    @property
    def set_count(self) -> int:
        """The built-in sets the suite runs (for progress bars)."""
        return len(self.cvs) + len(self.real_sets)


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


def real_length_sets(config: PlannerConfig) -> list[LengthSet]:
    """The lengths of the built-in multimodal sets (:mod:`.multimodal_sets`), drawn within the
    budget (``filtered``: drawn samples over it, drawn again): real-shaped spreads, with the
    visual tokens of each sample's images."""
    sets = []
    for data in builtin_sets(config.real_sets, config.samples, config.budget, config.seed):
        summary = data.summary()
        params = {
            "distribution": "multimodal set",
            "mean": round(summary["mean_length"], 1),
            "cv": round(summary["length_cv"], 3),
            "filtered": data.filtered,
        }
        sets.append(LengthSet(data.name, data.lengths, 0, params))
    return sets


def _named_set(name: str, lengths: np.ndarray, budget: int) -> LengthSet:
    """A caller's lengths (a user's data), clipped to the budget."""
    lengths, clipped = clip_to_budget(lengths, budget)
    if len(lengths) == 0:
        raise ConfigError(f"length set {name!r} is empty: give at least one sample length")
    return LengthSet(name, lengths, clipped, {"distribution": "given"})


def _runs(lengths: np.ndarray, batch_size: int, config: PlannerConfig) -> Iterator[PolicyRun]:
    """Each policy's epoch, one at a time (so progress can be shown between them)."""
    yield standard_batches(lengths, config.budget, config.seed, batch_size)
    yield sorted_batches(lengths, config.budget)
    sizes = text_sizes(lengths)
    for cost in (PaddedCost(), PackedCost()):
        yield odb_batches(sizes, Budget(config.budget, cost), config.seed, config.window)


def run_planner(
    config: PlannerConfig,
    extra_sets: Mapping[str, np.ndarray] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[SetResult]:
    """Run every policy on every built-in set and on ``extra_sets`` (name -> sample lengths,
    for example a ``--llava`` input's; clipped to the budget); ``progress`` is called after
    each policy run."""
    sets = lognormal_sets(config) + real_length_sets(config)
    sets += [
        _named_set(name, np.asarray(lengths), config.budget)
        for name, lengths in (extra_sets or {}).items()
    ]
    results = []
    for length_set in sets:
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
