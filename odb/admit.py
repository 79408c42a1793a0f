"""How a measured sample enters the buffer: the one place the over-budget policy lives.

A sample whose own cost exceeds the budget (or a per-batch cap) is a policy decision, never
silent: ``"error"`` names it, ``"solo"`` marks it to run alone, ``"truncate"`` cuts a text-only
sample's per-token fields to the longest length that fits. The loader's rounds, the
simulations that estimate steps, and the GRPO adapter's rollout rows all ask
:class:`Admission`, so they cannot disagree about a sample.

A "sample" here is a processed sample dict, or, in simulations, just its
:class:`~odb.cost.SampleSize`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from odb.buffer import Entry
from odb.collate import is_per_token
from odb.cost import Budget, SampleSize, measure_sample
from odb.errors import ConfigError, OverBudgetError

__all__ = ["OVER_BUDGET_POLICIES", "Admission"]

OVER_BUDGET_POLICIES = ("error", "solo", "truncate")

SOLO, TRUNCATE = "solo", "truncate"


@dataclass(frozen=True)
class Admission:
    """The budget and what to do with a sample that alone does not fit it."""

    budget: Budget
    over_budget: str = "error"

    def __post_init__(self) -> None:
        if self.over_budget not in OVER_BUDGET_POLICIES:
            raise ConfigError(
                f"over_budget must be one of {OVER_BUDGET_POLICIES}, got {self.over_budget!r}"
            )

    def verdict(
        self, size: SampleSize, index: int, *, subject: str = "", hint: str = ""
    ) -> str | None:
        """None when the sample fits; ``"solo"`` or ``"truncate"`` as the policy says for one
        that does not; an :class:`OverBudgetError` naming ``index`` otherwise (``subject``
        says what the sample is, ``hint`` how to raise the budget, where the caller knows)."""
        why = self.budget.why_over(size)
        if why is None:
            return None
        if subject:
            why = f"{subject}: {why}"
        if self.over_budget == SOLO:
            return SOLO
        if self.over_budget == TRUNCATE and size.images == 0:
            return TRUNCATE
        if self.over_budget == TRUNCATE:
            raise OverBudgetError(
                index,
                f"{why}; over_budget='truncate' cannot cut a sample with images (use 'solo', "
                f"or a larger budget)",
            )
        raise OverBudgetError(
            index,
            f"{why} (over_budget='error'); {hint or 'raise the budget, filter the sample out'}, "
            f"or pass over_budget='solo' to run it alone"
            + (" or 'truncate' to cut it" if not hint else ""),
        )

    def admit(self, index: int, sample: Any) -> tuple[Entry, str | None]:
        """Measure ``sample`` (dataset index ``index``) and apply the policy: the entry to
        buffer, and the verdict (to count solo and truncated samples)."""
        sizes_only = isinstance(sample, SampleSize)
        size = sample if sizes_only else measure_sample(sample, index)
        verdict = self.verdict(size, index)
        if verdict == TRUNCATE:
            keep = min(self.budget.longest_text(), size.length)
            if keep < 1:
                raise OverBudgetError(index, "the budget is too small for even one token")
            if sizes_only:
                size = replace(size, length=keep, label_tokens=min(size.label_tokens, keep - 1))
            else:
                sample = _cut(sample, size.length, keep)
                size = measure_sample(sample, index)
        payload = None if sizes_only else sample
        return Entry(index, size, payload, solo=verdict == SOLO), verdict


def _cut(sample: Mapping, length: int, keep: int) -> dict:
    """The sample with every per-token field cut to its first ``keep`` tokens."""
    return {
        key: value[:keep] if is_per_token(value, length) else value for key, value in sample.items()
    }
