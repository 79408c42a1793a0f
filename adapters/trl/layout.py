"""Rows of TRL's rollout dicts: where each row's tokens sit, and taking, joining and trimming rows.

The layout layer, between the planning and the trainer: it knows how TRL lays a rollout batch
out (left-padded prompts, right-padded completions, per-image tensors that follow their rows
through ``num_images``), and nothing of budgets or ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid

from odb.errors import OdbError

# Per-token tensors laid out over the prompt (left-padded) or over prompt + completion.
_PROMPT_KEYS = ("prompt_ids", "prompt_mask")
_SEQUENCE_KEYS = ("token_type_ids", "mm_token_type_ids")
# Per-image tensors: they follow their rows (through num_images) but have no token axis.
_IMAGE_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "image_position_ids",
)


class RolloutLayoutError(OdbError, ValueError):
    """A rollout batch is not laid out as TRL lays it out (left-padded prompts, right-padded
    completions), so odb cannot tell its rows' lengths."""


def _concat_rows(chunks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The stock chunks of a window as one dict, with per-image tensors split per row."""
    parts = [split_pixel_values_by_grid(dict(chunk)) for chunk in chunks]
    out: dict[str, Any] = {}
    for key, first in parts[0].items():
        values = [part[key] for part in parts]
        if isinstance(first, torch.Tensor) and first.ndim > 0:
            out[key] = torch.cat(values)
        elif isinstance(first, list):
            out[key] = [item for value in values for item in value]
        else:  # None, a 0-d tensor (num_items_in_batch), a scalar: the same for every chunk
            out[key] = first
    return out


def _take_rows(split: Mapping[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    """Rows of a per-row-split dict (see ``_concat_rows``), images following their rows."""
    rows = [int(r) for r in rows]
    index = torch.tensor(rows, dtype=torch.long)
    out: dict[str, Any] = {}
    for key, value in split.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            out[key] = value[index.to(value.device)]
        elif isinstance(value, list):
            out[key] = [value[r] for r in rows]
        else:
            out[key] = value
    if "num_images" in out and out["num_images"] is not None and not sum(out["num_images"]):
        for key in _IMAGE_KEYS:  # no image in these rows: an empty pixel tensor would break
            out.pop(key, None)
    return unsplit_pixel_values_by_grid(out)


def _trim(batch: dict[str, Any]) -> dict[str, Any]:
    """Drop the padding columns no row of ``batch`` needs (TRL's rollout layout)."""
    prompt_mask, completion_mask = batch["prompt_mask"], batch["completion_mask"]
    rows, prompt_width = prompt_mask.shape
    width = completion_mask.shape[1]
    keep_prompt = int(prompt_mask.sum(1).max())
    keep = max(1, int(completion_mask.sum(1).max()))
    start = prompt_width - keep_prompt
    out = {}
    for key, value in batch.items():
        if key in _IMAGE_KEYS or not isinstance(value, torch.Tensor) or value.ndim < 2:
            out[key] = value
        elif key in _PROMPT_KEYS:
            out[key] = value[:, start:]
        elif key in _SEQUENCE_KEYS:
            out[key] = value[:, start : prompt_width + keep]
        elif value.shape[0] == rows and value.shape[1] == width:
            out[key] = value[:, :keep]  # completion-aligned: ids, masks, log-probs, ratios
        else:
            out[key] = value
    return out


def _loss_tokens(batch: Mapping[str, Any]) -> torch.Tensor:
    mask = batch["completion_mask"]
    if batch.get("tool_mask") is not None:
        mask = mask * batch["tool_mask"]
    return mask.sum(1)


def _row_vision(
    rows: int, image_grid_thw: Any, num_images: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """(patches, images) per row; ``image_grid_thw`` is one tensor or a per-row list."""
    images = np.asarray(num_images if num_images is not None else [0] * rows, dtype=np.int64)
    patches = np.zeros(rows, dtype=np.int64)
    if image_grid_thw is None or num_images is None:
        return patches, images
    if isinstance(image_grid_thw, torch.Tensor):
        image_grid_thw = torch.split(image_grid_thw, list(num_images))
    for row, grid in enumerate(image_grid_thw):
        patches[row] = int(grid.prod(-1).sum()) if len(grid) else 0
    return patches, images


@dataclass(frozen=True)
class _Layout:
    """Where each row's tokens sit in a ``[rows, prompt_width + completion_width]`` batch."""

    prompt: torch.Tensor  # real prompt tokens per row (left-padded)
    completion: torch.Tensor  # real completion tokens per row (right-padded)
    prompt_width: int

    @classmethod
    def of(cls, attention_mask: torch.Tensor, completion_width: int) -> _Layout:
        prompt_width = attention_mask.shape[1] - completion_width
        mask = attention_mask.bool()
        prompt = mask[:, :prompt_width].sum(1)
        completion = mask[:, prompt_width:].sum(1)
        columns = torch.arange(attention_mask.shape[1], device=mask.device)
        expected = (columns >= (prompt_width - prompt)[:, None]) & (
            columns < (prompt_width + completion)[:, None]
        )
        if not torch.equal(mask, expected):
            raise RolloutLayoutError(
                "odb expects TRL's rollout layout: a left-padded prompt then a right-padded "
                "completion, with no gaps in the attention mask; got another layout"
            )
        if int(prompt.min()) < 1:
            raise RolloutLayoutError("every rollout row needs at least one prompt token")
        return cls(prompt, completion, prompt_width)

    @property
    def lengths(self) -> torch.Tensor:
        return self.prompt + self.completion
