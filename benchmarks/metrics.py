"""What one policy's epoch costs: steps, padding, how full the budget is, how fast odb plans.

Figures are only comparable if every policy trained on the same samples, so each epoch is
first checked to hold every sample exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .policies import PolicyRun

__all__ = ["CoverageError", "PolicyMetrics", "check_coverage", "measure"]


class CoverageError(RuntimeError):
    """A policy's epoch lost or repeated samples."""


@dataclass(frozen=True)
class PolicyMetrics:
    """Figures of one epoch of one policy under a token budget.

    ``padding_efficiency`` is real tokens over the tokens the batches compute (``n * max_len``
    per padded batch; a packed row computes only its real tokens). ``fill`` is the mean real
    tokens per step over the budget. ``over_budget_steps`` counts batches whose padded tokens
    exceed the budget (only the fixed-size policy can have any). ``plan_samples_per_second``
    is the epoch's samples over the CPU time of odb's planner calls, ``round_samples_per_second``
    over the CPU time of its whole rounds (intake and decision included); None for the offline
    policies.
    """

    policy: str
    samples: int
    steps: int
    real_tokens: int
    padded_tokens: int
    padding_efficiency: float
    fill: float
    peak_padded_tokens: int
    over_budget_steps: int
    mean_batch_size: float
    max_batch_size: int
    plan_samples_per_second: float | None
    round_samples_per_second: float | None


def check_coverage(name: str, batches: list[np.ndarray], n: int) -> None:
    """Raise :class:`CoverageError` unless the batches hold each of ``range(n)`` exactly once."""
    if any(len(b) == 0 for b in batches):
        raise CoverageError(f"{name}: an empty batch")
    flat = np.concatenate(batches).astype(np.int64) if batches else np.zeros(0, np.int64)
    if len(flat) and (flat.min() < 0 or flat.max() >= n):
        raise CoverageError(f"{name}: batches hold indices outside range({n})")
    counts = np.bincount(flat, minlength=n)
    missing = np.flatnonzero(counts == 0)
    repeated = np.flatnonzero(counts > 1)
    if len(missing) or len(repeated):
        raise CoverageError(
            f"{name}: {len(missing)} samples missing (first {missing[:5].tolist()}), "
            f"{len(repeated)} repeated (first {repeated[:5].tolist()})"
        )


def measure(run: PolicyRun, lengths: np.ndarray, budget: float) -> PolicyMetrics:
    """Metrics of ``run`` over samples of these ``lengths``, after checking coverage."""
    lengths = np.asarray(lengths, dtype=np.int64)
    check_coverage(run.name, run.batches, len(lengths))
    sizes = np.array([len(b) for b in run.batches], dtype=np.int64)
    real = np.array([lengths[b].sum() for b in run.batches], dtype=np.int64)
    if run.packed:
        padded = real
    else:
        padded = sizes * np.array([lengths[b].max() for b in run.batches], dtype=np.int64)
    steps = len(run.batches)

    def per_second(seconds: float | None) -> float | None:
        return len(lengths) / seconds if seconds else None

    return PolicyMetrics(
        policy=run.name,
        samples=len(lengths),
        steps=steps,
        real_tokens=int(real.sum()),
        padded_tokens=int(padded.sum()),
        padding_efficiency=float(real.sum() / padded.sum()) if steps else 0.0,
        fill=float(real.sum() / (steps * budget)) if steps else 0.0,
        peak_padded_tokens=int(padded.max(initial=0)),
        over_budget_steps=int(np.count_nonzero(padded > budget)),
        mean_batch_size=float(sizes.mean()) if steps else 0.0,
        max_batch_size=int(sizes.max(initial=0)),
        plan_samples_per_second=per_second(run.plan_seconds),
        round_samples_per_second=per_second(run.round_seconds),
    )
