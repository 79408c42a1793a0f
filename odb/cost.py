"""Measure one processed sample, and price groups of samples against a budget.

The measure stage reads what a sample will really cost *after* the user's pipeline ran: its
sequence length (visual tokens are already expanded into ``input_ids``), the tokens that carry
loss, and its vision patches and images. Cost models turn those numbers into the price of a
group; the planner keeps every group's price within a :class:`Budget`.

Cost models are small frozen objects with one vectorised method, :meth:`ComputeCost.group_cost`,
evaluated over many candidate groups at once; a new cost model therefore never touches the
planner's loops.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from odb.errors import ConfigError, SampleError, SampleTypeError

__all__ = [
    "IGNORE_INDEX",
    "Budget",
    "Caps",
    "ComputeCost",
    "PackedCost",
    "PaddedCost",
    "SampleSize",
    "measure_sample",
]

IGNORE_INDEX = -100
"""Label value that carries no loss (the Hugging Face convention)."""

_VISION_GRID_KEYS = ("image_grid_thw", "video_grid_thw")


@dataclass(frozen=True)
class SampleSize:
    """What one processed sample costs.

    ``label_tokens`` counts the labels that carry loss after the causal shift a language model
    applies (``labels[1:] != -100``); without a ``labels`` key every next token is a target, so
    it is ``length - 1``. ``vision_pairs`` is the sum over its images (and video frames) of
    ``patches**2``: a Qwen-VL vision tower attends within each image, so its attention work
    grows with each image's own patch count, which the total ``vision_patches`` cannot tell.
    """

    length: int
    label_tokens: int
    vision_patches: int = 0
    images: int = 0
    vision_pairs: int = 0


def _sequence_length(value: Any, key: str, index: int) -> int:
    """Length of a per-token field, refusing anything that is not one 1-D sequence."""
    if isinstance(value, torch.Tensor | np.ndarray):
        if value.ndim == 2 and value.shape[0] == 1:
            raise SampleError(
                index,
                f"{key!r} has shape {tuple(value.shape)}: the dataset returned a batch of one "
                f"instead of a sample; drop the batch dimension (for example "
                f"inputs[{key!r}][0]) in __getitem__",
            )
        if value.ndim != 1:
            raise SampleError(
                index, f"{key!r} must be 1-D (one sample), got shape {tuple(value.shape)}"
            )
        return int(value.shape[0])
    if isinstance(value, list | tuple):
        if value and isinstance(value[0], list | tuple | torch.Tensor | np.ndarray):
            raise SampleError(
                index, f"{key!r} is a nested sequence: the dataset returned a batch, not a sample"
            )
        return len(value)
    raise SampleError(
        index, f"{key!r} must be a 1-D tensor, array or list, got {type(value).__name__}"
    )


def _check_integers(value: Any, key: str, index: int) -> None:
    """Refuse token ids or labels that are not integers, which otherwise fail only inside the
    model, far from the sample that caused them (or are silently truncated by a cast)."""
    if isinstance(value, torch.Tensor):
        dtype = value.dtype
        bad = dtype.is_floating_point or dtype.is_complex or dtype == torch.bool
        kind = str(dtype).removeprefix("torch.")
    elif isinstance(value, np.ndarray):
        bad = not np.issubdtype(value.dtype, np.integer)
        kind = str(value.dtype)
    else:
        types = set(map(type, value))
        odd = {t for t in types if t is bool or not issubclass(t, int | np.integer)}
        bad = bool(odd)
        kind = ", ".join(sorted(t.__name__ for t in odd))
    if bad:
        raise SampleError(
            index,
            f"{key!r} holds {kind} values, but token ids and labels must be integers; convert "
            f"them in __getitem__ (for example torch.tensor({key}, dtype=torch.long))",
        )


def _count_label_tokens(labels: Any) -> int:
    if isinstance(labels, torch.Tensor):
        if labels.device.type != "cpu" or labels.requires_grad:
            return int((labels[1:] != IGNORE_INDEX).sum())
        labels = labels.numpy()  # numpy counts a short vector a few times faster
    if isinstance(labels, np.ndarray):
        return int(np.count_nonzero(labels[1:] != IGNORE_INDEX))
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def _vision(sample: Mapping, index: int) -> tuple[int, int, int]:
    """(patches, images, pairs) from the Qwen-VL style ``*_grid_thw`` rows, one row per image or
    video; ``pairs`` sums ``t * (h * w)**2``: the tower attends within each frame."""
    patches = images = pairs = 0
    for key in _VISION_GRID_KEYS:
        grid = sample.get(key)
        if grid is None:
            continue
        grid = torch.as_tensor(grid)
        if grid.ndim != 2 or grid.shape[-1] != 3:
            raise SampleError(
                index, f"{key!r} must have shape [images, 3], got {tuple(grid.shape)}"
            )
        grid = grid.to(torch.int64)
        frame = grid[:, 1] * grid[:, 2]
        patches += int((grid[:, 0] * frame).sum())
        pairs += int((grid[:, 0] * frame * frame).sum())
        images += int(grid.shape[0])
    return patches, images, pairs


def measure_sample(sample: Any, index: int) -> SampleSize:
    """Validate one processed sample against the sample contract and measure it."""
    if not isinstance(sample, Mapping):
        raise SampleTypeError(
            index,
            f"the dataset returned {type(sample).__name__}; odb expects one sample dict per "
            f"index, with at least 'input_ids'",
        )
    if "input_ids" not in sample:
        raise SampleError(index, f"missing key 'input_ids' (keys: {sorted(sample)})")
    length = _sequence_length(sample["input_ids"], "input_ids", index)
    if length == 0:
        raise SampleError(index, "'input_ids' is empty")
    _check_integers(sample["input_ids"], "input_ids", index)
    for key in ("labels", "attention_mask"):
        if key in sample and sample[key] is not None:
            other = _sequence_length(sample[key], key, index)
            if other != length:
                raise SampleError(
                    index, f"{key!r} has length {other} but 'input_ids' has length {length}"
                )
    labels = sample.get("labels")
    if labels is not None:
        _check_integers(labels, "labels", index)
    label_tokens = length - 1 if labels is None else _count_label_tokens(labels)
    patches, images, pairs = _vision(sample, index)
    return SampleSize(length, label_tokens, patches, images, pairs)


@dataclass(frozen=True)
class ComputeCost:
    """Price of a group: ``tokens + attention_weight * attention + vision_weight * patches +
    vision_attention_weight * vision_pairs``.

    With ``padded=True`` the group is priced as a right-padded batch computes it: ``tokens =
    n * max_len`` and ``attention = n * max_len**2``. With ``padded=False`` (padding-free rows)
    ``tokens = sum(len)``, and ``attention`` is what the attention kernel computes for the row:
    ``sum(len**2)`` for a varlen kernel, which attends within each sample (flash-attention,
    flex, ``odb_packed``), and ``sum(len)**2`` with ``dense_mask=True``, for kernels that get
    the row's samples as a dense block-diagonal mask over the whole row (transformers' sdpa
    and eager): they compute every (query, key) pair of the row, masked or not. The vision
    tower runs on the images' patches without padding in both modes: ``patches`` is their
    sum and ``vision_pairs`` the sum over images of ``patches**2`` (its attention within each
    image). The weights are in
    token units, so the budget stays "tokens" while approximating step time: for a transformer
    with hidden size ``d``, attention costs about ``1 / (6 * d)`` of a linear-layer token per
    key, hence ``attention_weight ~ 1 / (6 * d)``; ``vision_weight`` is the ratio of one
    vision-tower patch to one language-model token. ``odb.adapters.qwen_vl.compute_cost``
    derives all three from a model's configuration.
    """

    padded: bool = True
    attention_weight: float = 0.0
    vision_weight: float = 0.0
    vision_attention_weight: float = 0.0
    dense_mask: bool = False

    def __post_init__(self) -> None:
        if self.dense_mask and self.padded:
            raise ConfigError(
                "dense_mask prices packed rows (padded=False); a padded batch's attention is "
                "already n * max_len**2"
            )
        for name in ("attention_weight", "vision_weight", "vision_attention_weight"):
            weight = getattr(self, name)
            if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {weight!r}")

    @property
    def prices_compute(self) -> bool:
        """Whether any term beyond the tokens is priced (the budget then approximates step
        time rather than counting tokens)."""
        return bool(self.attention_weight or self.vision_weight or self.vision_attention_weight)

    @property
    def prices_vision(self) -> bool:
        return bool(self.vision_weight or self.vision_attention_weight)

    def group_cost(self, n, max_len, sum_len, sum_sq, patches, pairs=0):
        """Cost of groups from their aggregates; numpy arrays in, float array out."""
        if self.padded:
            tokens = np.multiply(n, max_len, dtype=np.float64)
            attention = tokens * max_len
        else:
            tokens = np.asarray(sum_len, dtype=np.float64)
            attention = tokens * tokens if self.dense_mask else np.asarray(sum_sq, np.float64)
        cost = tokens
        if self.attention_weight:
            cost = cost + self.attention_weight * attention
        if self.vision_weight:
            cost = cost + self.vision_weight * np.asarray(patches, dtype=np.float64)
        if self.vision_attention_weight:
            cost = cost + self.vision_attention_weight * np.asarray(pairs, dtype=np.float64)
        return cost

    def sample_cost(self, lengths, patches, pairs=0):
        """Cost of each sample alone."""
        lengths = np.asarray(lengths, dtype=np.float64)
        return self.group_cost(1, lengths, lengths, lengths * lengths, patches, pairs)

    def joining_cost(self, row_tokens: int, length: int) -> float:
        """What a sample of ``length`` tokens adds to a packed row of ``row_tokens`` tokens on
        top of its own cost (:meth:`one_sample_cost`): under a dense mask its queries meet the
        row's keys and the row's queries its keys, ``2 * row_tokens * length`` more pairs
        (``(a + b)**2 = a**2 + b**2 + 2ab``); nothing for a varlen kernel."""
        if not self.dense_mask:
            return 0.0
        return 2.0 * self.attention_weight * row_tokens * length

    def one_sample_cost(self, length: int, patches: int, pairs: int = 0) -> float:
        """:meth:`sample_cost` of one sample, in plain Python (checked for every sample the
        loader admits, where numpy's per-call overhead would dominate)."""
        tokens = float(length)
        cost = tokens
        if self.attention_weight:
            cost = cost + self.attention_weight * (tokens * length)
        if self.vision_weight:
            cost = cost + self.vision_weight * float(patches)
        if self.vision_attention_weight:
            cost = cost + self.vision_attention_weight * float(pairs)
        return cost

    def longest_within(self, limit: float, patches: int = 0, pairs: int = 0) -> int:
        """The longest sample (with ``patches`` and ``pairs``) whose cost alone stays within
        ``limit``."""
        rest = limit - self.vision_weight * patches - self.vision_attention_weight * pairs
        a = self.attention_weight
        if rest < 1:
            return 0
        if a == 0:
            return math.floor(rest)
        return math.floor((-1 + math.sqrt(1 + 4 * a * rest)) / (2 * a))


class PaddedCost(ComputeCost):
    """``n * max_len``: the tokens a right-padded batch computes, padding included."""

    def __init__(self) -> None:
        super().__init__(padded=True)


class PackedCost(ComputeCost):
    """``sum(len)``: the tokens of a padding-free packed row."""

    def __init__(self) -> None:
        super().__init__(padded=False)


@dataclass(frozen=True)
class Caps:
    """Hard per-batch limits that guard memory whatever the cost model says. ``max_tokens``
    bounds the tokens a batch computes (``n * max_len`` padded, ``sum(len)`` packed): with a
    :class:`ComputeCost` that prices step time, it keeps the activations' memory bounded too."""

    max_samples: int | None = None
    max_images: int | None = None
    max_vision_patches: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_samples", "max_images", "max_vision_patches", "max_tokens"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")

    @property
    def any(self) -> bool:
        return any(
            v is not None
            for v in (self.max_samples, self.max_images, self.max_vision_patches, self.max_tokens)
        )


@dataclass(frozen=True)
class Budget:
    """The limit every batch must respect: ``cost.group_cost(...) <= limit``, plus the caps."""

    limit: float
    cost: ComputeCost = field(default_factory=PaddedCost)
    caps: Caps = field(default_factory=Caps)

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int | float):
            raise ConfigError(f"token_budget must be a number, got {self.limit!r}")
        if not (math.isfinite(self.limit) and self.limit > 0):
            raise ConfigError(f"token_budget must be > 0, got {self.limit!r}")
        object.__setattr__(self, "limit", float(self.limit))  # 16384 and 16384.0 are one budget
        if not isinstance(self.cost, ComputeCost):
            raise ConfigError(f"cost must be a ComputeCost, got {type(self.cost).__name__}")

    def longest_text(self) -> int:
        """The longest sample without images that forms a batch alone (what truncation keeps)."""
        longest = self.cost.longest_within(self.limit)
        if self.caps.max_tokens is not None:
            longest = min(longest, self.caps.max_tokens)
        return longest

    def why_over(self, size: SampleSize) -> str | None:
        """Why one sample alone cannot form a batch, or None if it can.

        Where the cost prices compute and ``max_tokens`` caps memory, a sample within the cap
        whose compute alone exceeds the limit is not over budget: it forms a batch by itself
        (compute shapes batches; the token cap is what a batch cannot exceed)."""
        caps = self.caps
        cost = self.cost.one_sample_cost(size.length, size.vision_patches, size.vision_pairs)
        soft = self.cost.prices_compute and caps.max_tokens is not None
        if cost > self.limit and not (soft and size.length <= caps.max_tokens):
            return f"length {size.length} (cost {cost:g}) exceeds the token budget {self.limit:g}"
        if caps.max_tokens is not None and size.length > caps.max_tokens:
            return f"length {size.length} exceeds max_tokens={caps.max_tokens}"
        if caps.max_images is not None and size.images > caps.max_images:
            return f"{size.images} images exceed max_images={caps.max_images}"
        if caps.max_vision_patches is not None and size.vision_patches > caps.max_vision_patches:
            return (
                f"{size.vision_patches} vision patches exceed "
                f"max_vision_patches={caps.max_vision_patches}"
            )
        return None
