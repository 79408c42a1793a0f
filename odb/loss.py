"""Exact loss scaling across ranks (and gradient-accumulation micro-steps).

DDP averages gradients over ``world_size`` ranks. For the gradient of the exact token mean
over every rank's batch, each rank's loss must be its token-loss SUM times
``world_size / global_label_tokens``; the global count arrives with the batch (the same
round's alignment table), so no extra collective is needed. Ghost batches have loss weight 0.
"""

from __future__ import annotations

from typing import Any

from odb.batch import StepInfo, step_info
from odb.errors import ConfigError

__all__ = ["scale_loss"]


def scale_loss(loss: Any, batch: Any, *, reduction: str = "token", reduced: str = "sum") -> Any:
    """This rank's share of the exact global mean loss of the step.

    ``loss`` is this rank's loss over its batch: a sum (``reduced="sum"``: the sum of
    per-token losses, or of per-sample mean losses for ``reduction="sample"``) or a mean
    (``reduced="mean"``: what Hugging Face models return as ``outputs.loss``, the mean over
    the batch's label tokens). ``reduction`` picks the global mean: over label tokens
    (``"token"``) or over samples (``"sample"``). ``batch`` is an odb batch or its StepInfo.

    This makes each batch its own global mean; for the exact mean over the tokens of k
    gradient-accumulation micro-batches, scale each micro-batch's token-loss sum by
    ``world_size / sum(global_label_tokens of the k batches)`` instead.
    """
    info = batch if isinstance(batch, StepInfo) else step_info(batch)
    if reduction == "token":
        local, scale = info.local_label_tokens, info.token_loss_scale
    elif reduction == "sample":
        local, scale = info.local_samples, info.sample_loss_scale
    else:
        raise ConfigError(f"reduction must be 'token' or 'sample', got {reduction!r}")
    if reduced == "mean":
        return loss * (local * scale)
    if reduced == "sum":
        return loss * scale
    raise ConfigError(f"reduced must be 'sum' or 'mean', got {reduced!r}")
