"""Default collators for text causal language models: right-padded rows or one packed row.

A per-token field is a 1-D field as long as ``input_ids`` (``labels``, ``attention_mask``,
``mm_token_type_ids``, ...). Other tensors (``pixel_values`` with one row per patch,
``image_grid_thw`` with one row per image) are concatenated along dim 0 in sample order, the
way Hugging Face vision-language processors batch them; numbers and numeric lists become
tensors first, 0-d ones are stacked. A field that is not numeric (a dataset's ``text`` column,
``None``) is left out of the batch, which goes to ``model(**batch)``, and odb logs its name
once; pass your own ``collate_fn`` to keep such fields.

Model-specific packing (Qwen-VL's 3-D rotary positions) lives in ``odb.adapters``.

The batch layout (padded rows or one packed row) must agree with the loader's ``mode``, which
prices batches by it: :func:`collator_layout` reads it from a collator that states it, and
:func:`check_layout` checks every batch, so a collator and a mode that disagree fail before
the first step instead of training on batches over the budget.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from odb.cost import IGNORE_INDEX
from odb.errors import ConfigError

__all__ = [
    "PackedCollator",
    "PaddedCollator",
    "check_layout",
    "collator_layout",
    "collator_placeholder",
    "split_placeholder",
]

LAYOUTS = ("padded", "packed")

logger = logging.getLogger("odb")
_DROPPED: set[str] = set()  # fields already reported as left out


def _per_token_keys(samples: Sequence[Mapping]) -> tuple[list[torch.Tensor], list[str]]:
    """``input_ids`` of each sample as tensors, and the keys that are per-token in all."""
    ids = [torch.as_tensor(s["input_ids"]) for s in samples]
    keys = []
    for key in samples[0]:
        if all(is_per_token(s.get(key), len(t)) for s, t in zip(samples, ids, strict=True)):
            keys.append(key)
    return ids, keys


def is_per_token(value: Any, length: int) -> bool:
    """Whether ``value`` is a 1-D field with one entry per token of a ``length``-token sample."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 1 and value.shape[0] == length
    if isinstance(value, list | tuple):
        return len(value) == length and not (value and isinstance(value[0], list | tuple))
    return hasattr(value, "ndim") and value.ndim == 1 and value.shape[0] == length


def _as_tensors(values: list) -> list[torch.Tensor] | None:
    """The values as tensors (numbers and numeric lists converted), or None if one is not
    numeric."""
    try:
        return [torch.as_tensor(v) for v in values]
    except (TypeError, ValueError, RuntimeError):
        return None


def _gather_rest(samples: Sequence[Mapping], skip: set[str]) -> dict[str, Any]:
    """Non-per-token fields: tensors concatenated on dim 0 (0-d ones stacked); what cannot be
    a tensor of the batch is left out (see the module docstring).

    A tensor field missing from some samples (``pixel_values`` of a text-only sample) is
    concatenated over the samples that have it: those are the rows the model will match
    with the batch's image tokens, in order.
    """
    keys = dict.fromkeys(key for sample in samples for key in sample if key not in skip)
    out, dropped = {}, []
    for key in keys:
        tensors = _as_tensors([s[key] for s in samples if key in s])
        if tensors is not None and all(t.ndim > 0 for t in tensors):
            out[key] = torch.cat(tensors)
        elif tensors is not None and len(tensors) == len(samples):
            out[key] = torch.stack(tensors)
        else:
            dropped.append(key)
    if new := [key for key in dropped if key not in _DROPPED]:
        _DROPPED.update(new)
        logger.warning(
            "odb: the collator leaves field(s) %s out of the batch: they are not numbers or "
            "tensors (or not in every sample), and model(**batch) takes tensors; pass your own "
            "collate_fn to keep them",
            new,
        )
    return out


def split_placeholder(
    samples: Sequence[Mapping], placeholder: Mapping | None
) -> tuple[Sequence[Mapping], dict[str, Any] | None]:
    """The real samples, and the vision ``placeholder`` when the loader appended it (it is
    the last sample, recognised by its very ``input_ids`` object, which the Trainer's
    column-removing wrapper keeps), with the per-token fields of the real samples: its own
    where it has them, else ``labels`` -100, ``attention_mask`` 1, ``position_ids`` counting,
    other fields 0. Its other fields (``pixel_values``, ``image_grid_thw``) are kept."""
    if (
        placeholder is None
        or len(samples) < 2
        or samples[-1].get("input_ids") is not placeholder["input_ids"]
    ):
        return samples, None
    real = samples[:-1]
    _, keys = _per_token_keys(real)
    length = len(torch.as_tensor(placeholder["input_ids"]))
    fill = {"labels": IGNORE_INDEX, "attention_mask": 1}
    conformed = {  # its fields that are not per-token (the image's)
        key: value
        for key, value in placeholder.items()
        if key not in keys and not is_per_token(value, length)
    }
    for key in keys:
        own = placeholder.get(key)
        dtype = torch.as_tensor(real[0][key]).dtype
        if is_per_token(own, length):
            conformed[key] = torch.as_tensor(own).to(dtype)
        elif key == "position_ids":
            conformed[key] = torch.arange(length, dtype=dtype)
        else:
            conformed[key] = torch.full((length,), fill.get(key, 0), dtype=dtype)
    return real, conformed


class PaddedCollator:
    """Right-pad every per-token field to the longest sample of the group.

    ``input_ids`` are padded with ``pad_token_id``, ``labels`` with -100, every other per-token
    field with 0; ``attention_mask`` is added when the samples have none. ``pad_to_multiple_of``
    rounds the row length up (tensor-core friendly shapes on GPUs).

    ``vision_placeholder``: a processed sample holding the smallest image, all labels -100,
    which the loader appends to a batch without images at a step where another rank's batch
    has some (see ``odb.DataLoader``). It goes right after the last row's real tokens, where
    no real token attends to it (causal attention) and no padding column is added unless
    that row is already the widest; its image comes last, as its tokens do.
    """

    layout = "padded"

    def __init__(
        self,
        pad_token_id: int = 0,
        pad_to_multiple_of: int | None = None,
        vision_placeholder: Mapping | None = None,
    ):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ConfigError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.vision_placeholder = vision_placeholder

    def __call__(self, samples: Sequence[Mapping]) -> dict[str, Any]:
        samples, placeholder = split_placeholder(samples, self.vision_placeholder)
        ids, keys = _per_token_keys(samples)
        ends = [len(t) for t in ids]  # where each row's tokens end
        tail = slice(ends[-1], ends[-1])  # the placeholder's place in the last row
        if placeholder is not None:
            tail = slice(ends[-1], ends[-1] + len(torch.as_tensor(placeholder["input_ids"])))
            ends[-1] = tail.stop
        width = max(ends)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        fill = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
        out = {}
        for key in keys:
            rows = torch.full(
                (len(samples), width),
                fill.get(key, 0),
                dtype=torch.as_tensor(samples[0][key]).dtype,
            )
            for row, sample in enumerate(samples):
                value = torch.as_tensor(sample[key])
                rows[row, : len(value)] = value
            if placeholder is not None:
                rows[-1, tail] = placeholder[key]
            out[key] = rows
        if "attention_mask" not in out:
            mask = torch.zeros((len(samples), width), dtype=torch.long)
            for row, end in enumerate(ends):
                mask[row, :end] = 1
            out["attention_mask"] = mask
        out.update(_gather_rest([*samples, *([placeholder] if placeholder else [])], set(keys)))
        return out


class PackedCollator:
    """Concatenate the group into one row of shape ``[1, sum(len)]`` with no padding.

    ``position_ids`` restart at 0 for every sample; that is how attention kernels (Hugging
    Face's sdpa/eager masks and flash-attention's varlen path) keep samples from attending to
    each other, so no ``attention_mask`` is returned (nor a sample's own ``position_ids``).
    Samples should carry ``labels``: labels derived later from the packed ``input_ids`` would
    train across sample boundaries. The first label of every sample becomes
    -100, so the last token of one sample is never trained to predict the first of the next::

        input_ids     a1 a2 a3 | b1 b2 | c1 c2 c3 c4
        position_ids   0  1  2 |  0  1 |  0  1  2  3
        labels       -100 a2 a3|-100 b2|-100 c2 c3 c4

    With ``flash_attn_kwargs=True`` the row also carries ``cu_seq_lens_q/k`` and
    ``max_length_q/k``, which Hugging Face models pass to flash-attention's varlen kernel.

    The row also carries ``use_cache=False`` (``disable_cache=False`` leaves it out): Hugging
    Face models build a KV cache by default, even in training, and with a cache their masks do
    not look for packed sequences, so samples would silently attend to each other.

    ``vision_placeholder`` (see :class:`PaddedCollator`) becomes the row's last sequence.
    """

    layout = "packed"

    def __init__(
        self,
        flash_attn_kwargs: bool = False,
        disable_cache: bool = True,
        vision_placeholder: Mapping | None = None,
    ):
        self.flash_attn_kwargs = flash_attn_kwargs
        self.disable_cache = disable_cache
        self.vision_placeholder = vision_placeholder

    def __call__(self, samples: Sequence[Mapping]) -> dict[str, Any]:
        samples, placeholder = split_placeholder(samples, self.vision_placeholder)
        if placeholder is not None:
            samples = [*samples, placeholder]
        ids, keys = _per_token_keys(samples)
        lengths = [len(t) for t in ids]
        out = {}
        for key in keys:
            if key in ("attention_mask", "position_ids"):
                continue
            parts = [torch.as_tensor(s[key]) for s in samples]
            if key == "labels":
                parts = [p.clone() for p in parts]
                for part in parts:
                    part[0] = IGNORE_INDEX
            out[key] = torch.cat(parts).unsqueeze(0)
        out["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
        if self.flash_attn_kwargs:
            cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu
            out["max_length_q"] = out["max_length_k"] = max(lengths)
        out.update(_gather_rest(samples, set(keys)))
        if self.disable_cache:
            out["use_cache"] = False
        return out


def collator_layout(collate_fn: Any) -> str | None:
    """The layout ``collate_fn`` produces, ``"padded"`` or ``"packed"``, when it says so; None
    when it cannot be told without a batch.

    Read from a ``layout`` attribute (odb's collators and its adapters'), a ``padding_free``
    flag (TRL's ``DataCollatorForLanguageModeling``), Hugging Face's
    ``DataCollatorWithFlattening`` (packed), through wrappers that keep the wrapped collator as
    ``data_collator`` (the Trainer's column-removing wrapper) or ``func`` (``functools.partial``).
    """
    for collator in _unwrapped(collate_fn):
        layout = getattr(collator, "layout", None)
        if layout in LAYOUTS:
            return layout
        padding_free = getattr(collator, "padding_free", None)
        if isinstance(padding_free, bool):
            return "packed" if padding_free else "padded"
        kind = type(collator)
        if kind.__name__ == "DataCollatorWithFlattening" and kind.__module__.startswith(
            "transformers"
        ):
            return "packed"
    return None


def collator_placeholder(collate_fn: Any) -> Mapping | None:
    """The ``vision_placeholder`` sample ``collate_fn`` (or a collator it wraps, as
    :func:`collator_layout` looks through them) lays out, or None."""
    for collator in _unwrapped(collate_fn):
        placeholder = getattr(collator, "vision_placeholder", None)
        if placeholder is not None:
            return placeholder
    return None


def _unwrapped(collate_fn: Any) -> Iterator[Any]:
    """``collate_fn``, then the collators it wraps as ``data_collator`` (the Trainer's
    column-removing wrapper) or ``func`` (``functools.partial``)."""
    seen = set()
    while collate_fn is not None and id(collate_fn) not in seen:
        seen.add(id(collate_fn))
        yield collate_fn
        collate_fn = getattr(collate_fn, "data_collator", None) or getattr(collate_fn, "func", None)


def check_layout(batch: Mapping, mode: str, lengths: Sequence[int]) -> None:
    """Raise :class:`ConfigError` when ``batch`` (the collated group of samples of
    ``lengths``) is not laid out as ``mode`` prices it: ``padded``, one row per sample;
    ``packed``, one row holding them all. A single sample looks the same either way, and a
    batch without a tensor ``input_ids`` is not checked."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if len(lengths) < 2 or not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        return
    rows, width = ids.shape
    if (rows == 1) == (mode == "packed"):
        return
    layout = "one packed row" if rows == 1 else f"{rows} padded rows"
    raise ConfigError(
        f"mode={mode!r} but the collate_fn laid {len(lengths)} samples out as {layout} "
        f"(input_ids {tuple(ids.shape)}): odb prices batches by the mode "
        f"({'sum of lengths' if mode == 'packed' else 'rows x longest'}, "
        f"{sum(lengths) if mode == 'packed' else len(lengths) * max(lengths)} tokens here) and "
        f"this batch computes {rows * width}. Use mode={'padded' if rows > 1 else 'packed'!r} "
        f"or a collate_fn of the {mode} layout"
    )
