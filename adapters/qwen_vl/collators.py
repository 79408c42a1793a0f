"""Batches for a model: padded, or padding-free packed rows with Qwen-VL's 3-D positions.

The batch layer, after the dataset: it sees processed samples only, and asks the model itself
(its ``get_rope_index``) for each packed sample's rotary positions.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

import odb
from odb.adapters.qwen_vl.attention import PACKED_ATTENTION, builds_dense_mask
from odb.adapters.qwen_vl.config import _config_of, _text_config
from odb.collate import split_placeholder
from odb.errors import ConfigError

VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
"""Model types whose packed rows need the per-sample 3-D rotary positions of this module."""


def _warn_dense_packing(config: Any) -> None:
    """Packed rows pay off with a varlen attention kernel; without one, transformers turns the
    row's restarting positions into a dense block-diagonal mask over the whole row, so memory
    and time grow with the square of the row length."""
    attention = getattr(_text_config(config), "_attn_implementation", None)
    if builds_dense_mask(attention):
        warnings.warn(
            f"packed rows with attn_implementation={attention!r}: transformers builds a dense "
            f"row-by-row mask, so attention costs the square of the row length; call "
            f"qwen_vl.use_packed_attention(model) (attn_implementation={PACKED_ATTENTION!r}, "
            f"no extra package), use flash_attention_2 / flash_attention_3, or mode='padded'",
            stacklevel=3,
        )


class _RopeIndex:
    """A model's own ``get_rope_index`` (3-D rotary positions of one sequence).

    Given a model, its module that defines the function is used; given a config, the base
    model class is instantiated on the meta device (no memory, no weights) just to host the
    function, and rebuilt after unpickling.
    """

    def __init__(self, model_or_config: Any):
        self._host = None
        self.config = _config_of(model_or_config)
        if isinstance(model_or_config, torch.nn.Module):
            self._host = next(
                (m for m in model_or_config.modules() if hasattr(m, "get_rope_index")), None
            )
            if self._host is None:
                raise ConfigError(f"{type(model_or_config).__name__} has no get_rope_index")
        self._built = self._host is None

    def _model(self) -> Any:
        if self._host is None:
            from transformers import AutoModel

            with torch.device("meta"):
                self._host = AutoModel.from_config(self.config)
        return self._host

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self._built:
            state["_host"] = None
        return state

    def __call__(self, sample: Mapping) -> torch.Tensor:
        """``[3, len]`` positions of one sample, as the model computes them for it alone."""
        ids = torch.as_tensor(sample["input_ids"]).reshape(1, -1)
        types = torch.as_tensor(sample["mm_token_type_ids"]).reshape(1, -1)
        grids = {
            key: torch.as_tensor(sample[key])
            for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
            if sample.get(key) is not None
        }
        positions, _ = self._model().get_rope_index(ids, mm_token_type_ids=types, **grids)
        return positions[:, 0]


def pixel_features(vision_config: Any) -> int:
    """Values per row of ``pixel_values``: one patch, ``channels x temporal patch x patch**2``."""
    channels = getattr(vision_config, "in_channels", None) or getattr(vision_config, "in_chans", 3)
    return channels * vision_config.temporal_patch_size * vision_config.patch_size**2


def vision_placeholder(model_or_config: Any) -> dict[str, torch.Tensor]:
    """The smallest image a Qwen-VL model takes, as a processed sample whose labels are all
    -100: one ``merge x merge`` grid of blank patches, i.e. one ``<|image_pad|>`` token.

    odb's loader adds it to a batch without images at a step where another rank's batch has
    some, so that every rank runs the vision tower (FSDP and ZeRO-3 gather its weights
    collectively); the collators lay it out where no real token attends to it. It costs the
    vision tower's pass over 4 patches and one token of the language model."""
    config = _config_of(model_or_config)
    vision = getattr(config, "vision_config", None)
    if vision is None or getattr(config, "image_token_id", None) is None:
        raise ConfigError(f"{type(config).__name__} has no vision tower to keep in step")
    merge = vision.spatial_merge_size
    features = pixel_features(vision)
    return {
        "input_ids": torch.tensor([config.image_token_id]),
        "labels": torch.tensor([-100]),
        "attention_mask": torch.tensor([1]),
        "mm_token_type_ids": torch.tensor([1]),
        "pixel_values": torch.zeros(merge * merge, features),
        "image_grid_thw": torch.tensor([[1, merge, merge]]),
    }


class QwenVLPackedCollator:
    """One padding-free row for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense or MoE).

    Per-token fields are concatenated and the first label of every sample is -100 (by
    ``odb.PackedCollator``); ``pixel_values`` and ``image_grid_thw`` are concatenated in sample
    order. ``position_ids`` has shape ``[4, 1, L]``: row 0 holds the text positions, restarting
    at 0 per sample, from which transformers derives the block-diagonal causal mask; rows 1-3
    hold each sample's 3-D rotary positions, computed by the model's own ``get_rope_index``
    on that sample alone::

        sample a: 3 text tokens + a 2x2 image (4 tokens) + 1 text token; sample b: 2 tokens
        input_ids       a0 a1 a2 [i  i  i  i] a7 | b0 b1
        row 0 (text)     0  1  2  3  4  5  6  7 |  0  1     <- restarts: a new sequence
        row 1 (time)     0  1  2  3  3  3  3  5 |  0  1
        row 2 (height)   0  1  2  3  3  4  4  5 |  0  1
        row 3 (width)    0  1  2  3  4  3  4  5 |  0  1
        labels        -100 ..                    |-100 b1

    No ``attention_mask`` is returned, and the batch carries ``use_cache=False``: in
    transformers 5.x the packed mask is derived from row 0 only when there is no attention
    mask *and no cache*; with a cache (``use_cache`` defaults to the config's ``True``, also in
    training) or with only 3 position rows, every token attends to all earlier tokens of the
    row, across samples, silently. Pass ``disable_cache=False`` if your loop already calls
    ``model(**batch, use_cache=False)``.

    Flash-attention (not runnable on this project's CPU machines): the models hand row 0 to
    their attention layers as ``position_ids``, from which transformers' flash path derives the
    varlen sequence boundaries. No ``cu_seq_lens_*`` are added: Qwen-VL models forward extra
    keyword arguments to their vision tower too, whose own flash call sets them. The same row 0
    is how ``attn_implementation="odb_packed"`` (:func:`use_packed_attention`) finds the
    samples, without flash-attention installed.

    ``vision_placeholder`` (:func:`vision_placeholder`), when the loader appends it, is the
    row's last sequence.
    """

    layout = "packed"

    def __init__(self, model_or_config: Any, *, disable_cache: bool = True):
        self._rope = _RopeIndex(model_or_config)
        self._pack = odb.PackedCollator()
        self.disable_cache = disable_cache
        self.vision_placeholder = vision_placeholder(model_or_config)
        config = self._rope.config
        self._vision_ids = {
            getattr(config, "image_token_id", None): 1,
            getattr(config, "video_token_id", None): 2,
        }
        self._vision_ids.pop(None, None)

    def _with_token_types(self, sample: Mapping) -> Mapping:
        """Samples from a processor carry ``mm_token_type_ids``; build them if one does not."""
        if sample.get("mm_token_type_ids") is not None:
            return sample
        ids = torch.as_tensor(sample["input_ids"])
        types = torch.zeros_like(ids)
        for token_id, kind in self._vision_ids.items():
            types[ids == token_id] = kind
        return {**sample, "mm_token_type_ids": types}

    def __call__(self, samples: Sequence[Mapping]) -> dict[str, Any]:
        samples, placeholder = split_placeholder(samples, self.vision_placeholder)
        if placeholder is not None:  # the row's last sequence
            samples = [*samples, placeholder]
        samples = [self._with_token_types(sample) for sample in samples]
        batch = self._pack(samples)
        rope = torch.cat([self._rope(sample) for sample in samples], dim=1)
        batch["position_ids"] = torch.cat([batch["position_ids"][None], rope[:, None, :]], dim=0)
        if self.disable_cache:
            batch["use_cache"] = False
        return batch


def collator(
    model_or_config: Any,
    mode: str = "padded",
    *,
    pad_token_id: int | None = None,
    pad_to_multiple_of: int | None = None,
    flash_attn_kwargs: bool = False,
) -> Callable[[list], Mapping]:
    """The collator for a model (or its config) in odb's ``mode``.

    ``"padded"``: ``odb.PaddedCollator`` (right padding, ``attention_mask``; pads
    ``mm_token_type_ids`` with 0 and concatenates the vision fields), for any model; for a
    Qwen-VL model it carries :func:`vision_placeholder`.
    ``"packed"``: :class:`QwenVLPackedCollator` for Qwen2-VL / Qwen2.5-VL / Qwen3-VL(-MoE), and
    ``odb.PackedCollator`` for text causal LMs (Qwen2, Qwen3: their 1-D positions restarting
    at 0 are all the model needs; call the model with ``use_cache=False`` there too, and
    ``flash_attn_kwargs`` adds flash-attention's varlen arguments).
    """
    config = _config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    is_vl = getattr(config, "vision_config", None) is not None
    if mode == "padded":
        if pad_token_id is None:
            pad_token_id = getattr(_text_config(config), "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = getattr(config, "pad_token_id", None) or 0
        return odb.PaddedCollator(
            pad_token_id=pad_token_id,
            pad_to_multiple_of=pad_to_multiple_of,
            vision_placeholder=vision_placeholder(config) if model_type in VL_MODEL_TYPES else None,
        )
    if mode != "packed":
        raise ConfigError(f"mode must be 'padded' or 'packed', got {mode!r}")
    if pad_to_multiple_of is not None:
        raise ConfigError("pad_to_multiple_of applies to padded batches only")
    _warn_dense_packing(config)
    if not is_vl:
        return odb.PackedCollator(flash_attn_kwargs=flash_attn_kwargs)
    if model_type not in VL_MODEL_TYPES:
        raise ConfigError(
            f"packed rows for vision-language model type {model_type!r} are not supported "
            f"(supported: {', '.join(VL_MODEL_TYPES)}); use mode='padded'"
        )
    if flash_attn_kwargs:
        raise ConfigError(
            "flash_attn_kwargs is for text models: Qwen-VL models would pass cu_seq_lens_* on "
            "to their vision tower; their flash path takes the boundaries from position_ids"
        )
    return QwenVLPackedCollator(model_or_config)
