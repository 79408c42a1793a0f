"""Exact loss scaling across ranks (and gradient-accumulation micro-steps).

DDP averages gradients over ``world_size`` ranks. For the gradient of the exact token mean
over every rank's batch, each rank's loss must be its token-loss SUM times
``world_size / global_label_tokens``; the global count arrives with the batch (the same
round's alignment table), so no extra collective is needed. Ghost batches have loss weight 0.

:func:`scale_loss` makes one batch its own global mean; :func:`window_loss_share` makes the
micro-batches of a gradient-accumulation window one exact global mean, which is what a trainer
adapter needs (odb.adapters.hf uses it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from odb.batch import StepInfo, step_info
from odb.errors import ConfigError

__all__ = ["scale_loss", "window_label_tokens", "window_loss_share"]


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
        return _exact_zero(loss)
    return loss * (local * scale) if reduced == "mean" else loss * scale


def window_label_tokens(infos: Sequence[StepInfo]) -> int:
    """The label tokens of an accumulation window: every rank's, of every micro-batch."""
    return sum(info.global_label_tokens for info in infos)


def window_loss_share(mean_loss: Any, info: StepInfo, window_tokens: int) -> Any:
    """One micro-batch's share of the exact token mean over its accumulation window.

    ``mean_loss`` is the mean over this micro-batch's label tokens (what a Hugging Face model
    returns); times its label tokens it is the micro-batch's token-loss sum, and times
    ``world_size / window_tokens`` (``window_tokens`` from :func:`window_label_tokens`) the
    share that DDP's averaging and the sum over the window's micro-batches turn into the exact
    global mean. The model's own normalisation is used as is, so this holds alike for models
    that take ``num_items_in_batch`` and those that do not. A micro-batch without label tokens,
    or a ghost, gives an exact 0 in the graph (see :func:`scale_loss`).
    """
    if info.local_label_tokens == 0 or info.loss_weight == 0 or not window_tokens:
        return _exact_zero(mean_loss)
    weight = info.loss_weight * info.local_label_tokens * info.world_size
    return mean_loss * (weight / window_tokens)


def _exact_zero(loss: Any) -> Any:
    """0, kept in the graph of a tensor ``loss`` (even a NaN or infinite one)."""
    if not isinstance(loss, torch.Tensor):
        return 0.0
    # NaN * 0 and inf * 0 are NaN: zero them first (torch.where(isnan) would miss inf).
    return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * 0.0
