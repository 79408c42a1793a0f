"""Running totals of a loader: what it emitted, how well batches were filled, where time went."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

__all__ = ["LoaderStats"]


@dataclass
class LoaderStats:
    """Totals since the loader was built (carried across ``state_dict`` / ``load_state_dict``).

    ``fill`` is real tokens per step over the token budget; ``padding_efficiency`` is real
    tokens over the tokens the batches compute (padding included). ``wait_seconds`` is time
    spent blocked on the user's pipeline (workers), ``plan_seconds`` measuring and planning,
    ``collate_seconds`` collating (wall-clock, so they include waiting for a busy core);
    ``planner_cpu_seconds`` is the CPU time of the iterating thread inside the planner
    (:func:`odb.planner.plan_groups`), which a busy machine does not inflate. ``ghost_steps``
    are steps a rank ran on a copy with loss weight 0 because it had no data left while
    others had; ``shared_groups`` groups it ran that another rank had planned (the end of
    the data is shared out, see ``share_tail``);
    ``dropped_samples`` what non-join mode left out when the first rank ran out;
    ``vision_placeholders`` steps to which it added the placeholder image, because another
    rank's batch had images and its own had none (see ``vision_placeholder``).
    """

    token_budget: float
    samples: int = 0
    steps: int = 0
    rounds: int = 0
    exchanges: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    label_tokens: int = 0
    ghost_steps: int = 0
    stale_groups: int = 0
    pressure_groups: int = 0
    shared_groups: int = 0
    over_budget_solo: int = 0
    over_budget_truncated: int = 0
    dropped_samples: int = 0
    vision_placeholders: int = 0
    wait_seconds: float = 0.0
    plan_seconds: float = 0.0
    collate_seconds: float = 0.0
    planner_cpu_seconds: float = 0.0

    @property
    def fill(self) -> float:
        return self.real_tokens / (self.steps * self.token_budget) if self.steps else 0.0

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["fill"] = self.fill
        out["padding_efficiency"] = self.padding_efficiency
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LoaderStats:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
