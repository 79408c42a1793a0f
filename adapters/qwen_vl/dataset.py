"""LLaVA-format records as processed Qwen-VL samples, and their exact sizes before decoding.

The data layer: a record is checked and turned into chat messages (rendered with the
processor's template, or :data:`CHAT_TEMPLATE`), its images are loaded and processed, and its
labels mask all but the assistant replies. :meth:`LlavaDataset.estimate` predicts the same
sample's size from the image headers (:mod:`.geometry`) and the tokenized text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

import odb
from odb.adapters.qwen_vl.errors import (
    ImageCountError,
    MissingImageError,
    NoAssistantTurnError,
    RecordError,
    RecordTooLongError,
    UnreadableImageError,
    _fail,
)
from odb.adapters.qwen_vl.geometry import VisionGeometry
from odb.cost import IGNORE_INDEX
from odb.errors import ConfigError

IMAGE_TAG = "<image>"
"""The LLaVA placeholder for one image in a conversation turn."""

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


def _attempt(function: Any, *args: Any) -> Any:
    """``function(*args)``, or the :class:`RecordError` it raised."""
    try:
        return function(*args)
    except RecordError as error:
        return error


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
            size, merge size and pixel range decide the image sizes. A tokenizer (of a text
            model: Qwen2, Qwen3) makes text-only samples; a record with images is then an
            error of that record.
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
        # A tokenizer alone (a text model) has no image processor: no geometry, no image ids.
        self.tokenizer = getattr(processor, "tokenizer", processor)
        vision = hasattr(processor, "image_processor")
        self.geometry = VisionGeometry.from_processor(processor) if vision else None
        tokenizer = self.tokenizer
        self._header = tuple(tokenizer("<|im_start|>assistant", add_special_tokens=False).input_ids)
        self._end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self._image_token_id = processor.image_token_id if vision else -1
        self._vision_ids = np.array(
            [self._image_token_id, getattr(processor, "video_token_id", -1)]
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
        if images and self.geometry is None:
            raise _fail(RecordError, index, f"{len(images)} image(s) for a text model's tokenizer")
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
        ids = np.asarray(self.tokenizer(self._text(record))["input_ids"])
        if int((ids == self._image_token_id).sum()) != len(grids):
            raise _fail(
                ImageCountError,
                index,
                f"the chat template rendered {int((ids == self._image_token_id).sum())} image "
                f"placeholders for {len(grids)} images",
            )
        patches = [t * h * w for t, h, w in grids]
        expansion = sum(self.geometry.tokens(p) - 1 for p in patches) if grids else 0
        labels = self._checked_labels(index, ids)
        return odb.SampleSize(
            length=len(ids) + expansion,
            label_tokens=int((labels[1:] != IGNORE_INDEX).sum()),
            vision_patches=sum(patches),
            images=len(grids),
            vision_pairs=sum(t * (h * w) ** 2 for t, h, w in grids),
        )

    def estimate_all(self, workers: int = 8) -> list[odb.SampleSize]:
        """:meth:`estimate` of every record; image headers are read on ``workers`` threads
        (worth it on network file systems), the text is tokenized in the calling thread (a
        fast tokenizer shared between threads can fail with "Already borrowed"). Raises the
        first invalid record's :class:`RecordError`."""
        sizes, errors = self.estimate_checked(workers)
        if errors:
            raise errors[0]
        return sizes

    def estimate_checked(
        self, workers: int = 8
    ) -> tuple[list[odb.SampleSize | None], list[RecordError]]:
        """:meth:`estimate_all` without stopping at an invalid record: its size is None, and
        its :class:`RecordError` (whose ``index`` names it) is listed, in record order."""
        records = [_attempt(self._record, index) for index in range(len(self))]
        paths = [[] if isinstance(r, RecordError) else r.image_paths for r in records]
        indices = range(len(self))
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                grids = list(pool.map(partial(_attempt, self._grids), indices, paths))
        else:
            grids = [_attempt(self._grids, i, p) for i, p in zip(indices, paths, strict=True)]
        sizes: list[odb.SampleSize | None] = []
        errors: list[RecordError] = []
        for index, record, grid in zip(indices, records, grids, strict=True):
            failed = next((r for r in (record, grid) if isinstance(r, RecordError)), None)
            size = failed or _attempt(self._size, index, record, grid)
            if isinstance(size, RecordError):
                errors.append(size)
                size = None
            sizes.append(size)
        return sizes, errors

    def select(self, indices: Iterable[int]) -> LlavaDataset:
        """A dataset over the given records only (for example those that fit a budget)."""
        subset = object.__new__(LlavaDataset)
        subset.__dict__.update(self.__dict__)
        subset.records = [self.records[self._check_index(i)] for i in indices]
        return subset

    def sft_rows(self) -> Any:
        """The records as a ``datasets.Dataset`` in TRL's vision format, for ``SFTTrainer``:
        ``messages`` (structured content, an image placeholder where each ``<image>`` was) and
        ``images`` (decoded when a row is read). Records are checked here, as ``dataset[i]``
        would; TRL's collator then does the processing (its own labels: every token unless
        ``assistant_only_loss``). See docs/hf-trainer.md, "TRL's SFTTrainer"."""
        import datasets

        records = [self._record(index) for index in range(len(self))]
        for index, record in enumerate(records):
            for path in record.image_paths:
                if not os.path.isfile(path):
                    raise _fail(MissingImageError, index, f"image file not found: {path}")
        rows = {
            "messages": [record.messages for record in records],
            "images": [record.image_paths for record in records],
        }
        text = datasets.Value("string")
        content = [{"type": text, "text": text}]
        features = datasets.Features(
            {"messages": [{"role": text, "content": content}], "images": [datasets.Image()]}
        )
        return datasets.Dataset.from_dict(rows, features=features)

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
        if self.geometry is None:  # a tokenizer: text only (records with images were refused)
            inputs = self.tokenizer([self._text(record)], return_tensors="pt")
        else:
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
