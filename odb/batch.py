"""What every emitted batch carries: the collated mapping plus odb's :class:`StepInfo`.

The step info rides on the batch object as an attribute, never as a key, so ``model(**batch)``
sees exactly the keys the collator produced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from odb.errors import BatchTypeError

__all__ = ["Batch", "StepInfo", "attach_step_info", "step_info"]

_ATTRIBUTE = "_odb_step_info"


@dataclass(frozen=True)
class StepInfo:
    """Facts about one emitted batch, for loss scaling and accounting.

    ``global_*`` fields sum over all ranks for this step (equal to ``local_*`` in one process).
    ``real_tokens`` are the samples' own tokens; ``padded_tokens`` what the batch computes
    (``n * max_len`` padded, the row length packed). A ``ghost`` batch has ``loss_weight`` 0.
    ``reason`` says why the group was emitted:

    - ``fill``: good enough (padded: maximal and efficient; packed: full enough);
    - ``flush``: the end of the data;
    - ``stale``: it holds a sample that waited ``max_wait`` rounds;
    - ``pressure``: released to make room for the next round's samples;
    - ``solo``: one over-budget sample, under ``over_budget="solo"``;
    - ``held``: not good enough yet, but this rank's buffer was full (``window`` samples), so
      it offered every group it planned;
    - ``shared``: planned by another rank, run here to even out the end of the data;
    - ``ghost``: a step of weight 0 on a rank with nothing left to run.

    ``vision``: some rank's batch at this step holds an image or video, so every rank runs
    the vision tower (FSDP and DeepSpeed ZeRO-3 gather its weights collectively: a rank that
    skipped it would leave the others waiting); ``vision_placeholder``: this rank's batch had
    none, and odb added the collator's placeholder image (no real token attends to it, its
    labels are -100).
    """

    sample_indices: tuple[int, ...]
    local_samples: int
    global_samples: int
    local_label_tokens: int
    global_label_tokens: int
    real_tokens: int
    padded_tokens: int
    step: int
    round: int
    epoch: int
    reason: str
    ghost: bool = False
    loss_weight: float = 1.0
    rank: int = 0
    world_size: int = 1
    cost: float = 0.0
    vision: bool = False
    vision_placeholder: bool = False

    @property
    def token_loss_scale(self) -> float:
        """Multiply this rank's token-loss SUM by this: under DDP's gradient averaging the
        step then trains on the exact mean over every rank's label tokens."""
        if not self.global_label_tokens:
            return 0.0
        return self.loss_weight * self.world_size / self.global_label_tokens

    @property
    def sample_loss_scale(self) -> float:
        """Like ``token_loss_scale``, for a sum of per-sample mean losses."""
        if not self.global_samples:
            return 0.0
        return self.loss_weight * self.world_size / self.global_samples


class Batch(dict):
    """A collated batch: a plain ``dict`` for ``model(**batch)``, with step info attached."""

    @property
    def step_info(self) -> StepInfo:
        return step_info(self)


def attach_step_info(batch: Any, info: StepInfo) -> Any:
    """Return ``batch`` carrying ``info``; a plain dict becomes a :class:`Batch`.

    Other mappings (for example a Hugging Face ``BatchFeature``) keep their type and get the
    attribute set on them.
    """
    if type(batch) is dict:
        batch = Batch(batch)
    elif not isinstance(batch, Mapping):
        raise BatchTypeError(
            f"odb batches must be mappings (for model(**batch)); the collate_fn returned "
            f"{type(batch).__name__}"
        )
    try:
        setattr(batch, _ATTRIBUTE, info)
    except AttributeError:
        batch = Batch(batch)
        setattr(batch, _ATTRIBUTE, info)
    return batch


def find_step_info(batch: Any) -> StepInfo | None:
    """The step info of ``batch``, or None for a batch that did not come from odb."""
    return getattr(batch, _ATTRIBUTE, None)


def step_info(batch: Any) -> StepInfo:
    """The :class:`StepInfo` of a batch emitted by an odb loader."""
    info = find_step_info(batch)
    if info is None:
        raise BatchTypeError(
            f"this {type(batch).__name__} carries no odb step info: it was not emitted by an "
            f"odb loader, or was rebuilt since (read step_info(batch) before moving the batch "
            f"to a device with a helper that copies the mapping)"
        )
    return info
