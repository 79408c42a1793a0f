"""LLaVA-format data as benchmark input: a user's JSON and image folder measured exactly, and
synthetic LLaVA data written on the fly (real PNG images, real text) for measured training.

A user's records are sized with :meth:`odb.adapters.qwen_vl.LlavaDataset.estimate_all`: the
chat template and tokenizer of the processor, and each image's patch grid from its file header
(no pixel decoded). Those are the exact lengths the processor will produce, so the simulated
comparison on them is the comparison on the user's data.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from odb.adapters.qwen_vl import LlavaDataset, RecordError

from .lengths import lognormal_lengths
from .multimodal_sets import Component, MultimodalSet, VisionSettings

__all__ = ["SYNTHETIC_LONG_MULTIMODAL", "llava_set", "write_synthetic_llava"]

_PHOTO = {"pixels_mean": 200 * 150, "pixels_cv": 0.8, "max_aspect": 2.0}
SYNTHETIC_LONG_MULTIMODAL = (
    Component(0.6, 40, 0.8, 0.5, 1, 0.5, **_PHOTO),
    Component(0.4, 350, 1.0, 0.5, 2, 3.0, **_PHOTO),
)
"""The built-in long-multimodal set's shape (60% short turns with 1-2 photos, 40% long chats
with 2 + Poisson(3) photos; length CV about 1) at a tenth of its text and smaller photos, so
that a tiny model trains an epoch on CPU in seconds."""

_WORDS = [
    "the",
    "a",
    "image",
    "shows",
    "photo",
    "left",
    "right",
    "color",
    "small",
    "large",
    "person",
    "table",
    "sky",
    "why",
    "how",
]


def llava_set(
    source: str | os.PathLike,
    image_folder: str | os.PathLike | None,
    processor: Any,
    budget: int,
    *,
    strict: bool = False,
    errors: list[RecordError] | None = None,
) -> MultimodalSet:
    """The records of ``source`` as a set of exact sizes; records over ``budget`` tokens are
    left out and counted as filtered (a sample with images cannot be truncated).

    Every record is checked first. One that cannot become a sample (a missing or unreadable
    image, ``<image>`` tags that do not match its images, no assistant turn, ...) is left out
    and counted by kind in ``invalid``, and its error appended to ``errors`` when given; with
    ``strict`` the first one raises instead."""
    dataset = LlavaDataset(source, image_folder, processor)
    checked, failures = dataset.estimate_checked()
    if failures and strict:
        raise failures[0]
    if errors is not None:
        errors.extend(failures)
    sizes = [size for size in checked if size is not None]
    geometry = dataset.geometry
    lengths = np.array([s.length for s in sizes], dtype=np.int64)
    fits = lengths <= budget
    if not fits.any():
        raise ValueError(f"no valid record of {source} fits the token budget {budget}")

    def column(values: Sequence[float]) -> np.ndarray:
        return np.asarray(values, dtype=np.int64)[fits]

    return MultimodalSet(
        name=Path(source).stem,
        description=f"{source} ({len(checked)} records"
        + (f", {len(failures)} invalid" if failures else "")
        + "), sizes from LlavaDataset.estimate",
        lengths=lengths[fits],
        label_tokens=column([s.label_tokens for s in sizes]),
        patches=column([s.vision_patches for s in sizes]),
        images=column([s.images for s in sizes]),
        vision_pairs=column([s.vision_pairs for s in sizes]),
        filtered=int(np.count_nonzero(~fits)),
        vision=VisionSettings(
            geometry.patch_size, geometry.merge_size, geometry.min_pixels, geometry.max_pixels
        ),
        invalid=dict(Counter(type(error).__name__ for error in failures)),
    )


def _write_photo(path: Path, width: int, height: int, rng: np.random.Generator) -> None:
    """A blocky noise picture (compresses and decodes fast, yet is a real image file)."""
    small = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    Image.fromarray(small).resize((width, height), Image.Resampling.NEAREST).save(path)


def _words(count: int, rng: np.random.Generator) -> str:
    return " ".join(rng.choice(_WORDS, max(1, count)))


def write_synthetic_llava(
    folder: Path, samples: int, seed: int, components: Sequence[Component]
) -> Path:
    """``samples`` LLaVA records drawn from ``components`` into ``folder/train.json``, their
    PNG images into ``folder/images``; the JSON path.

    Each record has the component's number of images (sizes from its area and aspect
    distribution) and about its text tokens in words, split over a few turns: the question
    carries the ``<image>`` tags and a third of the words, the answers the rest.
    """
    rng = np.random.default_rng([seed, 11])
    (folder / "images").mkdir(parents=True, exist_ok=True)
    weights = np.array([c.weight for c in components])
    kinds = rng.choice(len(components), samples, p=weights / weights.sum())
    # One column per component, drawn up front: sample i reads row i of its component's.
    texts = [
        lognormal_lengths(c.text_mean, c.text_cv, samples, seed + k)
        for k, c in enumerate(components)
    ]
    areas = [
        lognormal_lengths(c.pixels_mean, c.pixels_cv, samples * 8, seed + k)
        if c.pixels_mean
        else None
        for k, c in enumerate(components)
    ]
    records = []
    for index, kind in enumerate(kinds):
        component, text = components[kind], int(texts[kind][index])
        names = []
        for number in range(
            min(8, component.min_images + int(rng.poisson(component.extra_images)))
        ):
            aspect = math.exp(rng.uniform(-1, 1) * math.log(component.max_aspect))
            area = float(areas[kind][8 * index + number])
            name = f"{index}_{number}.png"
            size = max(8, round(math.sqrt(area * aspect))), max(8, round(math.sqrt(area / aspect)))
            _write_photo(folder / "images" / name, *size, rng)
            names.append(name)
        turns = 1 + text // 150
        conversation = []
        for turn in range(turns):
            question = _words(text // (3 * turns), rng) + "?"
            if turn == 0:
                question = "<image>" * len(names) + question
            conversation.append({"from": "human", "value": question})
            conversation.append({"from": "gpt", "value": _words(2 * text // (3 * turns), rng)})
        record: dict[str, Any] = {"id": index, "conversations": conversation}
        if names:
            record["image"] = names
        records.append(record)
    path = folder / "train.json"
    path.write_text(json.dumps(records))
    return path
