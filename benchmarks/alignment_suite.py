"""The alignment suite: odb's multi-rank rounds simulated for many ranks in one process.

Runs the loader's own round code (``odb.simulate``: the same refill, plan, report, ``decide``
and commit as every real rank) on a length set split across ``world`` ranks (a lognormal one by
default, or given sets such as a ``--llava`` file's exact lengths), and measures
what DDP cares about: equal steps (by construction), how close the ranks' work is per step
(a step lasts as long as its slowest rank), ghost steps, and collectives per emitted step.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from odb.buffer import RoundSettings
from odb.cost import Budget, PackedCost, PaddedCost, SampleSize
from odb.simulate import simulate

from .planner_suite import LengthSet, PlannerConfig, lognormal_sets

__all__ = ["AlignmentConfig", "AlignmentResult", "alignment_table", "default_sets", "run_alignment"]


@dataclass(frozen=True)
class AlignmentConfig:
    """The ranks, budget and window of the suite, and its default set: ``samples`` lognormal
    lengths of this ``mean`` and ``cv`` (not used when :func:`run_alignment` is given sets)."""

    mean: float = 1500.0
    cv: float = 1.0
    samples: int = 40_000
    budget: int = 16_384
    window: int = 1024
    worlds: tuple[int, ...] = (8, 16)
    seed: int = 0


@dataclass(frozen=True)
class AlignmentResult:
    """One (length set, world size, mode) run; ``samples``: the set's, over all ranks.

    ``balance``: mean over steps of mean/max cost across ranks (ghost steps count as 0 work);
    ``aggregate_balance``: total work over ``world * sum of per-step maxima`` (the share of
    the ranks' step time spent on real work); the ``steady_`` figure leaves out steps that
    hold a ghost (the tail of the epoch). ``share_tail``: whether the end of the data was
    shared between ranks (the loader's default) or every sample stayed on its rank.
    """

    set: str
    samples: int
    world: int
    mode: str
    share_tail: bool
    steps: int
    rounds: int
    collectives_per_step: float
    balance: float
    aggregate_balance: float
    steady_balance: float
    ghost_share: float


def default_sets(config: AlignmentConfig) -> list[LengthSet]:
    """The suite's lognormal set, named and clipped to the budget as the planner's are."""
    planner = PlannerConfig(
        mean=config.mean,
        cvs=(config.cv,),
        samples=config.samples,
        budget=config.budget,
        seed=config.seed,
    )
    return lognormal_sets(planner)


def run_alignment(
    config: AlignmentConfig, sets: list[LengthSet] | None = None
) -> list[AlignmentResult]:
    """Every world size and mode of ``config`` on every set (the lognormal set of ``config``
    unless ``sets`` is given)."""
    results = []
    for length_set in sets if sets is not None else default_sets(config):
        results += _run_set(config, length_set)
    return results


def _run_set(config: AlignmentConfig, length_set: LengthSet) -> list[AlignmentResult]:
    lengths = length_set.lengths
    order = np.random.default_rng([config.seed, 1]).permutation(len(lengths))
    results = []
    for world in config.worlds:
        shards = [
            [(int(i), SampleSize(int(lengths[i]), int(lengths[i]) - 1)) for i in order[r::world]]
            for r in range(world)
        ]
        for (mode, cost), share_tail in itertools.product(
            (("padded", PaddedCost()), ("packed", PackedCost())), (True, False)
        ):
            settings = RoundSettings.create(Budget(config.budget, cost), window=config.window)
            run = simulate(shards, settings, seed=config.seed, share_tail=share_tail)
            costs = np.array([[step.cost for step in steps] for steps in run.steps])
            ghosts = np.array([[step.ghost for step in steps] for steps in run.steps])
            peak = costs.max(axis=0)
            ratio = costs.mean(axis=0) / np.maximum(peak, 1e-9)
            steady = ~ghosts.any(axis=0)
            steps = costs.shape[1]
            results.append(
                AlignmentResult(
                    set=length_set.name,
                    samples=len(lengths),
                    world=world,
                    mode=mode,
                    share_tail=share_tail,
                    steps=steps,
                    rounds=run.rounds,
                    collectives_per_step=run.collectives / max(steps, 1),
                    balance=float(ratio.mean()),
                    aggregate_balance=float(costs.sum() / (world * peak.sum())),
                    steady_balance=float(ratio[steady].mean()) if steady.any() else 0.0,
                    ghost_share=float(ghosts.mean()),
                )
            )
    return results


def alignment_table(
    config: AlignmentConfig,
    results: list[AlignmentResult],
    origins: dict[str, str] | None = None,
) -> str:
    """One table per length set, headed by the set, where its lengths come from (``origins``,
    by set name) and its size."""
    lines = []
    for name in dict.fromkeys(r.set for r in results):
        rows = [r for r in results if r.set == name]
        origin = f" ({origins[name]})" if origins and name in origins else ""
        if lines:
            lines.append("")
        lines += [
            f"{name}{origin}: {rows[0].samples} samples split over the ranks, budget "
            f"{config.budget}, window {config.window}.",
            "",
            "| ranks | mode | end of data | steps | collectives / step "
            "| balance (mean of mean/max) | aggregate balance | balance without ghost steps "
            "| ghost steps |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r.world} | {r.mode} | {'shared' if r.share_tail else 'kept per rank'} "
                f"| {r.steps} | {r.collectives_per_step:.3f} "
                f"| {r.balance:.4f} | {r.aggregate_balance:.4f} | {r.steady_balance:.4f} "
                f"| {r.ghost_share:.2%} |"
            )
    return "\n".join(lines)
