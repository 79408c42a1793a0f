"""Exact loss scaling across ranks (and gradient-accumulation micro-steps).

DDP averages gradients over ``world_size`` ranks. For the gradient of the exact token mean
over every rank's batch, each rank's loss must be its token-loss SUM times
``world_size / global_label_tokens``; the global count arrives with the batch (the same
round's alignment table), so no extra collective is needed. Ghost batches have loss weight 0.
"""

from __future__ import annotations

from typing import Any

import torch

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

    A batch that adds nothing to the mean (no label tokens here, weight 0 as a ghost, or no
    label tokens on any rank) gives exactly 0, even when ``loss`` is NaN (the mean over no
    tokens is 0/0), and stays in the graph, so every parameter gets a zero gradient and DDP's
    all-reduce stays matched. Those gradients are zero when ``loss``'s own backward stays
    finite: torch's cross-entropy (and so a Hugging Face model's loss) gives ignored positions
    zero gradients, but a mean computed as ``sum / count`` divides by zero in backward too:
    pass that loss's sum with ``reduced="sum"`` instead.
    """
    info = batch if isinstance(batch, StepInfo) else step_info(batch)
    if reduction == "token":
        local, scale = info.local_label_tokens, info.token_loss_scale
    elif reduction == "sample":
        local, scale = info.local_samples, info.sample_loss_scale
    else:
        raise ConfigError(f"reduction must be 'token' or 'sample', got {reduction!r}")
    if reduced not in ("sum", "mean"):
        raise ConfigError(f"reduced must be 'sum' or 'mean', got {reduced!r}")
    if local == 0 or scale == 0:
        if not isinstance(loss, torch.Tensor):
            return 0.0
        # NaN * 0 and inf * 0 are NaN: zero them first (torch.where(isnan) would miss inf).
        return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * 0.0
    return loss * (local * scale) if reduced == "mean" else loss * scale
