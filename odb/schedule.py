"""Learning-rate schedules that follow the data consumed, for trainings whose step count is
only estimated.

Trained for a number of epochs, an odb run's optimizer steps are only known at the end (a
step holds as many samples as fit the budget). A schedule laid over the estimated step count
would end early or late. :class:`DataProgress` turns (steps done, samples consumed) into the
training's progress, and :class:`ProgressSchedule` evaluates a closed-form schedule (a
``LambdaLR``, as every Hugging Face schedule is) at that progress, so it ends exactly when the
data is used up. Trainer adapters drive it: odb.adapters.hf does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DataProgress", "ProgressSchedule"]


@dataclass(frozen=True)
class DataProgress:
    """A training of ``total_samples`` samples that the estimate puts at ``steps_per_sample``
    optimizer steps per sample."""

    total_samples: float
    steps_per_sample: float

    def predicted_steps(self, steps: float, samples: float) -> float:
        """The training's steps as predicted after ``steps`` steps consumed ``samples``: the
        steps so far plus the remaining samples at the estimate's rate."""
        return steps + max(0.0, self.total_samples - samples) * self.steps_per_sample

    def at(self, steps: float, samples: float) -> float:
        """The fraction of the training done: ``steps`` over the predicted total. It follows
        steps as a step-based schedule does (a warmup lasts its fraction of the steps) and is
        exactly 1 when the data is used up."""
        predicted = self.predicted_steps(steps, samples)
        return 1.0 if predicted <= 0 else min(1.0, steps / predicted)

    def remaining(self, samples: float) -> bool:
        """Whether samples remain after ``samples`` were consumed."""
        return samples < self.total_samples

    def total_steps(self, steps: int, samples: float) -> int:
        """The step count to show for the whole training: the prediction, at least one step
        more than done while samples remain, exactly ``steps`` when none do."""
        if not self.remaining(samples):
            return steps
        return max(math.ceil(self.predicted_steps(steps, samples)), steps + 1)


class ProgressSchedule:
    """A ``LambdaLR`` evaluated at ``progress() * total_steps`` instead of at its step count.

    ``step()`` (called after each optimizer step, as any scheduler) jumps to the progress
    ``progress()`` reports then; :meth:`jump` sets any progress, e.g. the middle of the
    accumulation window about to run, so each window trains at its own progress and the last
    ``step()`` lands on the schedule's end. Everything else is the wrapped scheduler's.
    """

    def __init__(
        self,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        total_steps: int,
        progress: Callable[[], float],
    ):
        self.scheduler, self.total_steps, self.progress = scheduler, total_steps, progress

    def step(self) -> None:
        self.jump(self.progress())

    def jump(self, progress: float) -> None:
        """Set the learning rates to the schedule's value at ``progress`` (0 to 1)."""
        scheduler = self.scheduler
        scheduler.last_epoch = progress * self.total_steps
        groups = scheduler.optimizer.param_groups
        for group, base, factor in zip(
            groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(scheduler.last_epoch)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.scheduler.optimizer.param_groups]

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheduler, name)
