"""Qwen-VL glue: LLaVA-format data, exact lengths before decoding, compute costs, packed rows.

Four pieces, for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (transformers 5.x processors and models):

- :class:`LlavaDataset` turns LLaVA-format records plus an image folder into processed single
  samples (chat template applied, visual tokens expanded, prompt masked in ``labels``), the
  sample contract odb batches.
- :meth:`LlavaDataset.estimate` predicts a sample's exact length and vision patches from the
  image *headers* and the tokenized text, without decoding a pixel: a cheap over-budget check
  before the expensive processing, and exact steps per epoch upfront (with
  ``odb.estimate.count_steps``). It is optional: odb batches from the lengths it measures after
  processing, so augmentation that changes lengths never makes a batch wrong.
- :func:`compute_cost` builds an :class:`odb.ComputeCost` whose attention and vision-tower
  terms come from a model config (:func:`model_flops` documents the count).
- :func:`collator` returns the padded or the padding-free packed collator for a model; the
  packed Qwen-VL row carries ``[4, 1, L]`` position ids (see :class:`QwenVLPackedCollator`).

Geometry of one image (what :class:`VisionGeometry` reproduces): ``qwen_vl_utils.fetch_image``
resizes it with qwen-vl-utils' ``smart_resize`` (sides multiples of ``patch * merge``, pixel
count within the processor's ``[min_pixels, max_pixels]``), then the image processor applies
transformers' ``smart_resize`` with the same settings (a no-op on an already conforming size,
kept so that the estimate follows both rules exactly). The image becomes a grid of
``(1, H / patch, W / patch)`` patches, and ``patches / merge**2`` ``<|image_pad|>`` tokens in the
text.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import odb
from odb.cost import IGNORE_INDEX
from odb.errors import ConfigError, OdbError

__all__ = [
    "CHAT_TEMPLATE",
    "ImageCountError",
    "LlavaDataset",
    "MissingImageError",
    "ModelFlops",
    "NoAssistantTurnError",
    "QwenVLPackedCollator",
    "RecordError",
    "RecordTooLongError",
    "UnreadableImageError",
    "VisionGeometry",
    "collator",
    "compute_cost",
    "model_flops",
]

IMAGE_TAG = "<image>"
"""The LLaVA placeholder for one image in a conversation turn."""

VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
"""Model types whose packed rows need the per-sample 3-D rotary positions of this module."""

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- else %}"
    "{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' %}"
    "{{- item['text'] }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)
"""The Qwen (ChatML) conversation format with Qwen-VL's vision markers, for processors built
offline without a template. Hub processors carry their own (Qwen2-VL's adds a default system
prompt, "You are a helpful assistant."); :class:`LlavaDataset` uses the processor's template
unless given ``chat_template``."""

_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


# -- errors -------------------------------------------------------------------------------------
class RecordError(OdbError, ValueError):
    """A LLaVA record cannot become a sample; the message names the record index.

    Built from one message string (``index`` is an attribute) so that the type survives being
    re-raised by ``torch.utils.data.DataLoader`` workers, which rebuild exceptions from their
    message.
    """

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class MissingImageError(RecordError):
    """An image file named by a record does not exist."""


class UnreadableImageError(RecordError):
    """An image file exists but cannot be decoded (or has a shape Qwen-VL cannot take)."""


class ImageCountError(RecordError):
    """The ``<image>`` tags of a conversation and its images do not match."""


class NoAssistantTurnError(RecordError):
    """A conversation has no assistant (``gpt``) turn, so no token would carry loss."""


class RecordTooLongError(RecordError):
    """The estimated sample exceeds the dataset's budget; raised before any image is decoded."""


def _fail(kind: type[RecordError], index: int, problem: str) -> RecordError:
    return kind(f"record {index}: {problem}", index)


# -- image geometry -----------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionGeometry:
    """How an image of a given size becomes patches and tokens, with a processor's settings."""

    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int

    @classmethod
    def from_processor(cls, processor: Any) -> VisionGeometry:
        """Read patch size, merge size and the pixel range from the processor's image processor
        (never from library defaults: checkpoints differ, e.g. Qwen3-VL's patch 16)."""
        image_processor = getattr(processor, "image_processor", processor)
        size = getattr(image_processor, "size", None) or {}
        min_pixels = size.get("shortest_edge") or getattr(image_processor, "min_pixels", None)
        max_pixels = size.get("longest_edge") or getattr(image_processor, "max_pixels", None)
        if not (min_pixels and max_pixels):
            raise ConfigError(
                f"{type(image_processor).__name__} has no pixel range: expected "
                f"size={{'shortest_edge': min_pixels, 'longest_edge': max_pixels}}"
            )
        geometry = cls(
            int(image_processor.patch_size),
            int(image_processor.merge_size),
            int(min_pixels),
            int(max_pixels),
        )
        if geometry.merge_size != 2:
            raise ConfigError(
                f"merge_size={geometry.merge_size}: qwen-vl-utils resizes images for merge size "
                f"2, the size of every Qwen-VL checkpoint"
            )
        return geometry

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the image processor patchifies; ``ValueError`` if none exists."""
        from qwen_vl_utils import smart_resize as fetch_resize
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import (
            smart_resize as processor_resize,
        )

        factor = self.factor
        height, width = fetch_resize(height, width, factor, self.min_pixels, self.max_pixels)
        if height < factor or width < factor:
            raise ValueError(
                f"resizing it under max_pixels={self.max_pixels} leaves a side under {factor} "
                f"pixels (too elongated)"
            )
        return processor_resize(height, width, factor, self.min_pixels, self.max_pixels)

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """``image_grid_thw`` of one image: one temporal patch, then the patch rows and columns."""
        height, width = self.resized(height, width)
        return 1, height // self.patch_size, width // self.patch_size

    def tokens(self, patches: int) -> int:
        """``<|image_pad|>`` tokens for an image of ``patches`` patches."""
        return patches // self.merge_size**2


# -- the dataset --------------------------------------------------------------------------------
def _load_records(source: str | os.PathLike | Sequence[Mapping]) -> list:
    if not isinstance(source, str | os.PathLike):
        if isinstance(source, Mapping) or not isinstance(source, Sequence):
            raise ConfigError(
                "source must be a path to a JSON or JSONL file, or a list of records; got "
                + type(source).__name__
            )
        return list(source)
    path = os.fspath(source)
    with open(path, encoding="utf-8") as file:
        if path.endswith((".jsonl", ".ndjson")):
            records = []
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ConfigError(f"{path}, line {number}: not JSON ({error})") from None
            return records
        data = json.load(file)
    if not isinstance(data, list):
        raise ConfigError(f"{path} must hold a JSON list of records, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class _Record:
    """A validated record: chat messages (images as placeholders) and resolved image paths."""

    messages: list[dict]
    image_paths: list[str]


class LlavaDataset(torch.utils.data.Dataset):
    """LLaVA-format records as processed Qwen-VL samples, one per index.

    A record is ``{"image": "a.jpg" | ["a.jpg", "b.png"] (optional), "conversations": [{"from":
    "human" | "gpt" | "system", "value": "..."}]}``; each ``<image>`` in a value marks where the
    next image goes. A record with images and no tag gets them at the start of its first human
    turn (LLaVA's convention). ``dataset[i]`` returns, without a batch dimension: ``input_ids``,
    ``labels`` (-100 except the assistant replies and their ``<|im_end|>``),
    ``attention_mask``, ``mm_token_type_ids``, and for records with images ``pixel_values``
    (one row per patch) and ``image_grid_thw`` (one row per image).

    Args:
        source: a JSON file holding a list of records, a JSONL file (one record per line), or
            a list of records.
        image_folder: image paths in records are relative to it (absolute paths are kept).
        processor: a Qwen2-VL, Qwen2.5-VL or Qwen3-VL processor; its image processor's patch
            size, merge size and pixel range decide the image sizes.
        chat_template: a Jinja template replacing the processor's (see :data:`CHAT_TEMPLATE`).
        budget: an ``odb.Budget`` (or a token count) that every sample must fit; checked on the
            estimate before any image is decoded, raising :class:`RecordTooLongError`.

    Images are loaded with ``qwen_vl_utils.fetch_image`` (RGBA on white, then resized within the
    processor's pixel range) and processed by the processor, in the calling process (in
    DataLoader workers under odb). Labels mask everything but the assistant turns, found as the
    tokens after each ``<|im_start|>assistant`` header line up to and including the next
    ``<|im_end|>``; that is the ChatML format of every Qwen chat template.
    """

    def __init__(
        self,
        source: str | os.PathLike | Sequence[Mapping],
        image_folder: str | os.PathLike | None,
        processor: Any,
        *,
        chat_template: str | None = None,
        budget: odb.Budget | float | None = None,
    ):
        self.records = _load_records(source)
        self.image_folder = os.fspath(image_folder) if image_folder is not None else None
        self.processor = processor
        self.chat_template = chat_template or getattr(processor, "chat_template", None)
        if not self.chat_template:
            raise ConfigError(
                "the processor has no chat template; pass chat_template= (for the Qwen format: "
                "odb.adapters.qwen_vl.CHAT_TEMPLATE)"
            )
        if budget is not None and not isinstance(budget, odb.Budget):
            budget = odb.Budget(budget)
        self.budget = budget
        self.geometry = VisionGeometry.from_processor(processor)
        tokenizer = processor.tokenizer
        self._header = tuple(tokenizer("<|im_start|>assistant", add_special_tokens=False).input_ids)
        self._end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self._image_token_id = processor.image_token_id
        self._vision_ids = np.array(
            [processor.image_token_id, getattr(processor, "video_token_id", -1)]
        )

    def __len__(self) -> int:
        return len(self.records)

    # -- records ---------------------------------------------------------------------------
    def _record(self, index: int) -> _Record:
        """Check one record and turn it into chat messages; no file is touched."""
        record = self.records[index]
        if not isinstance(record, Mapping):
            raise _fail(RecordError, index, f"expected a dict, got {type(record).__name__}")
        if record.get("video") is not None:
            raise _fail(RecordError, index, "videos are not supported by LlavaDataset")
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise _fail(RecordError, index, "missing or empty 'conversations' list")
        images = record.get("image") or []
        images = [images] if isinstance(images, str) else list(images)
        if not all(isinstance(name, str) for name in images):
            raise _fail(RecordError, index, f"'image' must be a path or a list of paths: {images}")
        roles, texts = [], []
        for number, turn in enumerate(turns):
            role = _ROLES.get(turn.get("from")) if isinstance(turn, Mapping) else None
            value = turn.get("value") if isinstance(turn, Mapping) else None
            if role is None or not isinstance(value, str):
                raise _fail(
                    RecordError,
                    index,
                    f"turn {number} must be {{'from': 'human' | 'gpt' | 'system', 'value': str}}, "
                    f"got {turn!r}",
                )
            roles.append(role)
            texts.append(value)
        if "assistant" not in roles:
            raise _fail(
                NoAssistantTurnError, index, "the conversation has no 'gpt' (assistant) turn"
            )
        tags = sum(text.count(IMAGE_TAG) for text in texts)
        if tags == 0 and images:
            first_user = roles.index("user") if "user" in roles else 0
            texts[first_user] = IMAGE_TAG * len(images) + texts[first_user]
        elif tags > len(images):
            raise _fail(
                ImageCountError,
                index,
                f"{tags} <image> tags but {len(images)} image(s) ({images})",
            )
        elif tags < len(images):
            raise _fail(
                ImageCountError,
                index,
                f"{len(images)} images but only {tags} <image> tag(s); place one tag per image",
            )
        messages = []
        for role, text in zip(roles, texts, strict=True):
            content: list[dict] = []
            for number, part in enumerate(text.split(IMAGE_TAG)):
                if number:
                    content.append({"type": "image"})
                if part:
                    content.append({"type": "text", "text": part})
            messages.append({"role": role, "content": content})
        folder = self.image_folder
        paths = [os.path.join(folder, name) if folder else name for name in images]
        return _Record(messages, paths)

    def _text(self, record: _Record) -> str:
        return self.processor.apply_chat_template(
            record.messages, chat_template=self.chat_template, tokenize=False
        )

    def _grids(self, index: int, paths: Sequence[str]) -> list[tuple[int, int, int]]:
        """Each image's patch grid from its header alone (PIL reads no pixels for ``.size``)."""
        from PIL import Image

        grids = []
        for path in paths:
            if not os.path.isfile(path):
                raise _fail(MissingImageError, index, f"image file not found: {path}")
            try:
                with Image.open(path) as image:
                    width, height = image.size
            except (OSError, ValueError) as error:
                raise _fail(UnreadableImageError, index, f"cannot read {path}: {error}") from None
            try:
                grids.append(self.geometry.grid(height, width))
            except ValueError as error:
                raise _fail(
                    UnreadableImageError, index, f"image {path} ({width}x{height}): {error}"
                ) from None
        return grids

    def _labels(self, ids: np.ndarray) -> np.ndarray:
        """Assistant replies (and their ``<|im_end|>``) keep their ids; all else is -100.

        A reply starts one token after its ``<|im_start|>assistant`` header: that token carries
        the header's newline (in the rare reply that itself starts with a newline, the tokenizer
        merges both, and that first newline is not trained).
        """
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        size = len(self._header)
        header = np.array(self._header)
        ends = np.flatnonzero(ids == self._end_id)
        for start in np.flatnonzero(ids == header[0]):
            if not np.array_equal(ids[start : start + size], header):
                continue
            first = start + size + 1
            after = ends[np.searchsorted(ends, first) :]
            stop = int(after[0]) + 1 if len(after) else len(ids)
            labels[first:stop] = ids[first:stop]
        labels[np.isin(ids, self._vision_ids)] = IGNORE_INDEX
        return labels

    def _checked_labels(self, index: int, ids: np.ndarray) -> np.ndarray:
        labels = self._labels(ids)
        if not (labels[1:] != IGNORE_INDEX).any():
            raise _fail(
                NoAssistantTurnError,
                index,
                "no token carries loss: the chat template did not produce the "
                "'<|im_start|>assistant' header this dataset masks by",
            )
        return labels

    # -- estimate ---------------------------------------------------------------------------
    def estimate(self, index: int) -> odb.SampleSize:
        """The exact size ``dataset[index]`` will have, from image headers and the text alone.

        Every ``<|image_pad|>`` of the rendered text becomes ``patches / merge**2`` tokens, with
        the patch grid computed as the processor will (see :class:`VisionGeometry`); the text
        is tokenized without its images. Costs a template render, a tokenization and one header
        read per image: no decoding, no resizing.
        """
        index = self._check_index(index)
        record = self._record(index)
        return self._size(index, record, self._grids(index, record.image_paths))

    def _size(
        self, index: int, record: _Record, grids: Sequence[tuple[int, int, int]]
    ) -> odb.SampleSize:
        ids = np.asarray(self.processor.tokenizer(self._text(record))["input_ids"])
        if int((ids == self._image_token_id).sum()) != len(grids):
            raise _fail(
                ImageCountError,
                index,
                f"the chat template rendered {int((ids == self._image_token_id).sum())} image "
                f"placeholders for {len(grids)} images",
            )
        patches = [t * h * w for t, h, w in grids]
        expansion = sum(self.geometry.tokens(p) - 1 for p in patches)
        labels = self._checked_labels(index, ids)
        return odb.SampleSize(
            length=len(ids) + expansion,
            label_tokens=int((labels[1:] != IGNORE_INDEX).sum()),
            vision_patches=sum(patches),
            images=len(grids),
        )

    def estimate_all(self, workers: int = 8) -> list[odb.SampleSize]:
        """:meth:`estimate` of every record; image headers are read on ``workers`` threads
        (worth it on network file systems), the text is tokenized in the calling thread (a
        fast tokenizer shared between threads can fail with "Already borrowed")."""
        indices = range(len(self))
        records = [self._record(index) for index in indices]
        paths = [record.image_paths for record in records]
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                grids = list(pool.map(self._grids, indices, paths))
        else:
            grids = list(map(self._grids, indices, paths))
        return [self._size(i, r, g) for i, r, g in zip(indices, records, grids, strict=True)]

    def select(self, indices: Iterable[int]) -> LlavaDataset:
        """A dataset over the given records only (for example those that fit a budget)."""
        subset = object.__new__(LlavaDataset)
        subset.__dict__.update(self.__dict__)
        subset.records = [self.records[self._check_index(i)] for i in indices]
        return subset

    # -- processing -------------------------------------------------------------------------
    def _check_index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        return index % len(self)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = self._check_index(index)
        if self.budget is not None:
            why = self.budget.why_over(self.estimate(index))
            if why is not None:
                raise _fail(RecordTooLongError, index, f"{why} (estimated before decoding)")
        record = self._record(index)
        self._grids(index, record.image_paths)  # missing files, shapes: before decoding
        images = [self._load_image(index, path) for path in record.image_paths]
        inputs = self.processor(
            text=[self._text(record)], images=images or None, return_tensors="pt"
        )
        ids = inputs["input_ids"][0]
        sample = {
            "input_ids": ids,
            "labels": torch.from_numpy(self._checked_labels(index, ids.numpy())),
            "attention_mask": inputs["attention_mask"][0],
        }
        if "mm_token_type_ids" in inputs:
            sample["mm_token_type_ids"] = inputs["mm_token_type_ids"][0]
        if images:
            sample["pixel_values"] = inputs["pixel_values"]
            sample["image_grid_thw"] = inputs["image_grid_thw"]
        return sample

    def _load_image(self, index: int, path: str):
        from PIL import Image
        from qwen_vl_utils import fetch_image

        geometry = self.geometry
        try:
            with Image.open(path) as image:
                return fetch_image(
                    {
                        "image": image,
                        "min_pixels": geometry.min_pixels,
                        "max_pixels": geometry.max_pixels,
                    },
                    image_patch_size=geometry.patch_size,
                )
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise _fail(UnreadableImageError, index, f"cannot decode {path}: {error}") from None


# -- compute cost -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFlops:
    """Forward FLOPs of a model's matrix products, by what they scale with.

    ``token``: per language-model token through the linear layers and the LM head;
    ``attention``: per (query, key) pair of language-model attention, all layers;
    ``patch``: per vision patch through the vision tower's linear layers, patch embedding and
    merger(s); :meth:`patch_attention`: per patch of an image, for the vision tower's attention
    (``vision_attention_pair`` per pair of patches in each of ``vision_full_layers`` layers over
    the whole image, and of ``vision_window_layers`` layers over windows of
    ``vision_window_patches`` patches, Qwen2.5-VL's).
    """

    token: float
    attention: float
    patch: float = 0.0
    vision_attention_pair: float = 0.0
    vision_full_layers: int = 0
    vision_window_layers: int = 0
    vision_window_patches: int = 0

    def patch_attention(self, patches: int) -> float:
        """Vision attention FLOPs per patch of a ``patches``-patch image."""
        full = self.vision_full_layers * patches
        window = self.vision_window_layers * min(patches, self.vision_window_patches)
        return self.vision_attention_pair * (full + window)


_DENSE_ATTENTION = ("sdpa", "eager", None)


def _warn_dense_packing(config: Any) -> None:
    """Packed rows pay off with a varlen attention kernel; without one, transformers turns the
    row's restarting positions into a dense block-diagonal mask over the whole row, so memory
    and time grow with the square of the row length (the budget prices them linearly)."""
    attention = getattr(_text_config(config), "_attn_implementation", None)
    if attention in _DENSE_ATTENTION:
        warnings.warn(
            f"packed rows with attn_implementation={attention!r}: transformers builds a dense "
            f"row-by-row mask, so attention costs the square of the row length; use "
            f"flash_attention_2 / flash_attention_3 for packing, or mode='padded'",
            stacklevel=3,
        )


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def _config_of(model_or_config: Any) -> Any:
    """The config of a model (unwrapping DDP-style ``.module`` wrappers), or the config given."""
    found = model_or_config
    while isinstance(found, torch.nn.Module) and not hasattr(found, "config"):
        if not hasattr(found, "module"):
            break
        found = found.module
    config = getattr(found, "config", found)
    if not hasattr(config, "model_type"):
        raise ConfigError(
            f"expected a transformers model or config, got {type(model_or_config).__name__}"
        )
    return config


def model_flops(config: Any) -> ModelFlops:
    """Count the matrix-product FLOPs of a Qwen2/Qwen3 text or Qwen-VL model from its config.

    With ``d`` the hidden size, ``f`` the MLP size, ``N`` layers, ``h``/``k`` query/key-value
    heads of size ``e`` and vocabulary ``V`` (a multiply-add is 2 FLOPs):

    - ``token = 2 * (N * (d*e*(2h + 2k) + 3*d*f) + d*V)`` (q, k, v, o projections, gated MLP,
      LM head);
    - ``attention = 4 * N * h * e`` per (query, key) pair (scores and weighted values).

    Vision tower (hidden ``c``, MLP ``g``, depth ``D``, patch ``p``, temporal patch ``t``, merge
    ``m``, output ``d``): per patch ``2 * (D * (4*c*c + u*c*g) + 3*t*p*p*c + M * (c*c*m*m +
    c*d))`` with ``u = 3`` for Qwen2.5-VL's gated MLP and 2 otherwise, and ``M`` mergers
    (1, plus Qwen3-VL's deepstack mergers); vision attention is ``4 * c`` per (patch, patch)
    pair in each layer, over the whole image (or Qwen2.5-VL's windows in its window layers).
    Norms, activations, rotary and embedding lookups are left out: they are not matrix products.
    """
    text = _text_config(config)
    if getattr(text, "num_experts", None) or getattr(text, "num_experts_per_tok", None):
        raise ConfigError("model_flops counts dense models only; this config is mixture-of-experts")
    d, f, n = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or d // heads
    token = 2.0 * (
        n * (d * head_dim * (2 * heads + 2 * kv_heads) + 3 * d * f) + d * text.vocab_size
    )
    attention = 4.0 * n * heads * head_dim
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return ModelFlops(token, attention)
    model_type = getattr(config, "model_type", "")
    if model_type == "qwen2_vl":
        c, mlp, gated = vision.embed_dim, int(vision.embed_dim * vision.mlp_ratio), False
        out = vision.hidden_size
    else:
        c, mlp, out = vision.hidden_size, vision.intermediate_size, vision.out_hidden_size
        gated = model_type == "qwen2_5_vl"
    m, p, t = vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size
    mergers = 1 + len(getattr(vision, "deepstack_visual_indexes", None) or ())
    depth = vision.depth
    block = 4 * c * c + (3 if gated else 2) * c * mlp
    merger = c * c * m * m + c * out
    patch = 2.0 * (depth * block + vision.in_channels * t * p * p * c + mergers * merger)
    full_layers, window_layers, window_patches = depth, 0, 0
    if model_type == "qwen2_5_vl":
        full_layers = len(vision.fullatt_block_indexes)
        window_layers = depth - full_layers
        window_patches = (vision.window_size // p) ** 2
    return ModelFlops(token, attention, patch, 4.0 * c, full_layers, window_layers, window_patches)


def compute_cost(
    model_or_config: Any,
    mode: str = "padded",
    *,
    causal: bool = True,
    reference_patches: int = 1024,
) -> odb.ComputeCost:
    """An ``odb.ComputeCost`` in language-model token units from :func:`model_flops`.

    ``attention_weight = attention / token`` (halved when ``causal``: causal kernels skip the
    upper triangle) multiplies ``sum(len**2)`` (``n * max_len**2`` padded);
    ``vision_weight = (patch + patch_attention(reference_patches)) / token`` multiplies the
    batch's vision patches. The vision tower's attention grows with each image's own patch
    count, which a per-patch weight cannot follow: it is priced at ``reference_patches`` per
    image (1024 patches is about a 448x448 image with patch 14).
    """
    config = _config_of(model_or_config)
    if mode not in ("padded", "packed"):
        raise ConfigError(f"mode must be 'padded' or 'packed', got {mode!r}")
    flops = model_flops(config)
    attention = flops.attention * (0.5 if causal else 1.0)
    vision = flops.patch + flops.patch_attention(reference_patches)
    return odb.ComputeCost(
        padded=mode == "padded",
        attention_weight=attention / flops.token,
        vision_weight=vision / flops.token,
    )


# -- collators ----------------------------------------------------------------------------------
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


class QwenVLPackedCollator:
    """One padding-free row for Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

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
    keyword arguments to their vision tower too, whose own flash call sets them.
    """

    def __init__(self, model_or_config: Any, *, disable_cache: bool = True):
        self._rope = _RopeIndex(model_or_config)
        self._pack = odb.PackedCollator()
        self.disable_cache = disable_cache
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
    ``mm_token_type_ids`` with 0 and concatenates the vision fields), for any model.
    ``"packed"``: :class:`QwenVLPackedCollator` for Qwen2-VL / Qwen2.5-VL / Qwen3-VL, and
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
        return odb.PaddedCollator(pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
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
