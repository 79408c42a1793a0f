"""Built-in multimodal length sets: what Qwen-VL samples cost, without pixels or a tokenizer.

A Qwen-VL sample's sequence length is its text tokens (chat template included) plus, for every
image, ``patches / merge**2`` visual tokens. An image's patches follow from its size alone:
``smart_resize`` scales it so that both sides are multiples of ``patch * merge`` and its area
lies within ``[min_pixels, max_pixels]``; it then holds ``(H / patch) * (W / patch)`` patches.
So a set of (text tokens, image sizes) per sample gives exact lengths and vision patches, which
is all batching and the GPU cost model need.

The four sets are shaped like the public data people fine-tune on; each is a mixture of
*components* (a kind of sample: lognormal text tokens, a number of images, lognormal image
areas at varied aspect ratios)::

    text-chat         multi-turn text only                          length CV ~0.5
    single-image-vqa  one photo, short question and answer          length CV ~0.3
    long-multimodal   short image turns and long multi-image chats  length CV ~1.0
    mixed             chat, VQA, multi-image and documents          length CV ~0.8
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from odb.cost import SampleSize

from .lengths import lognormal_lengths

__all__ = [
    "BUILTIN_SETS",
    "Component",
    "MultimodalSet",
    "SetSpec",
    "VisionSettings",
    "builtin_sets",
    "image_patches",
    "make_set",
]


@dataclass(frozen=True)
class VisionSettings:
    """How the processor sizes images: Qwen3-VL's patch 16 and merge 2, and a pixel range.

    ``min_pixels`` is the Qwen3-VL image processor's default (256 x 256); ``max_pixels``
    caps an image at 1024 visual tokens (1024 * 32 * 32), a common fine-tuning setting (the
    processor's own default, 16.7 M pixels, lets one image take 16384 tokens).
    """

    patch: int = 16
    merge: int = 2
    min_pixels: int = 256 * 256
    max_pixels: int = 1024 * 32 * 32

    @property
    def factor(self) -> int:
        return self.patch * self.merge


def image_patches(heights: np.ndarray, widths: np.ndarray, vision: VisionSettings) -> np.ndarray:
    """Vision patches of images of these sizes, after ``smart_resize`` (qwen-vl-utils' rule).

    Each side is rounded to a multiple of ``factor``; if the area is then above
    ``max_pixels`` (below ``min_pixels``), both sides are scaled by ``sqrt`` of the ratio and
    floored (ceiled) to a multiple of ``factor``.
    """
    h = np.asarray(heights, dtype=np.float64)
    w = np.asarray(widths, dtype=np.float64)
    f = vision.factor
    h_bar = np.maximum(f, np.round(h / f) * f)
    w_bar = np.maximum(f, np.round(w / f) * f)
    area = h * w
    over = h_bar * w_bar > vision.max_pixels
    under = ~over & (h_bar * w_bar < vision.min_pixels)
    shrink = np.sqrt(area / vision.max_pixels)
    h_bar = np.where(over, np.floor(h / shrink / f) * f, h_bar)
    w_bar = np.where(over, np.floor(w / shrink / f) * f, w_bar)
    grow = np.sqrt(vision.min_pixels / area)
    h_bar = np.where(under, np.ceil(h * grow / f) * f, h_bar)
    w_bar = np.where(under, np.ceil(w * grow / f) * f, w_bar)
    return ((h_bar // vision.patch) * (w_bar // vision.patch)).astype(np.int64)


@dataclass(frozen=True)
class Component:
    """One kind of sample: its share of the set, its text, its images.

    Text tokens are lognormal (``text_mean``, ``text_cv``) and include the chat template and
    the two vision delimiters of each image; ``answer_share`` of them carry loss. A sample has
    ``min_images + Poisson(extra_images)`` images, each of a lognormal area (``pixels_mean``,
    ``pixels_cv``) and an aspect ratio log-uniform in ``[1 / max_aspect, max_aspect]``.
    """

    weight: float
    text_mean: float
    text_cv: float
    answer_share: float = 0.4
    min_images: int = 0
    extra_images: float = 0.0
    pixels_mean: float = 0.0
    pixels_cv: float = 0.0
    max_aspect: float = 1.0


@dataclass(frozen=True)
class SetSpec:
    """A built-in set: what public data it imitates, and its components."""

    name: str
    description: str
    components: tuple[Component, ...]


_VQA = Component(1.0, 140, 0.7, 0.3, 1, 0.0, 640 * 480, 0.3, 1.5)
_PHOTO = {"pixels_mean": 800 * 600, "pixels_cv": 0.8, "max_aspect": 2.0}

BUILTIN_SETS: dict[str, SetSpec] = {
    spec.name: spec
    for spec in (
        SetSpec(
            "text-chat",
            "multi-turn text-only chat (ShareGPT / UltraChat-like)",
            (Component(1.0, 1200, 0.5, answer_share=0.6),),
        ),
        SetSpec(
            "single-image-vqa",
            "one COCO-sized photo per sample, a short question and answer "
            "(LLaVA-Instruct / VQAv2-like)",
            (_VQA,),
        ),
        SetSpec(
            "long-multimodal",
            "multi-turn conversations over photos: 60% short (1 + Poisson(0.5) images), 40% "
            "long (2 + Poisson(3) images, many turns) (LLaVA-OneVision / MMDU-like)",
            (
                Component(0.6, 400, 0.8, 0.5, 1, 0.5, **_PHOTO),
                Component(0.4, 3500, 1.0, 0.5, 2, 3.0, **_PHOTO),
            ),
        ),
        SetSpec(
            "mixed",
            "a production-like mix: 40% text chat, 30% single-image VQA, 20% multi-image "
            "chat, 10% multi-page documents (large scans)",
            (
                Component(0.4, 1000, 0.5, 0.6),
                replace(_VQA, weight=0.3),
                Component(0.2, 800, 0.7, 0.5, 2, 1.0, **_PHOTO),
                Component(0.1, 1000, 0.5, 0.3, 1, 1.0, 1400 * 1000, 0.3, 1.5),
            ),
        ),
    )
}


@dataclass(frozen=True)
class MultimodalSet:
    """Sizes of one set's samples, as columns (one entry per sample).

    ``vision_pairs`` is the sum over a sample's images of ``patches**2``: the vision tower
    attends within each image, so its attention cost grows with each image's own patch count.
    ``filtered`` counts drawn samples longer than ``max_length``, left out as a pipeline
    filtering at the model's maximum length would. ``invalid``: records of a user's data that
    cannot become a sample, left out, counted by kind (the error's class name).
    """

    name: str
    description: str
    lengths: np.ndarray
    label_tokens: np.ndarray
    patches: np.ndarray
    images: np.ndarray
    vision_pairs: np.ndarray
    filtered: int
    vision: VisionSettings
    invalid: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.lengths)

    def sizes(self) -> list[SampleSize]:
        """The samples as odb measures them."""
        columns = (self.lengths, self.label_tokens, self.patches, self.images, self.vision_pairs)
        return [SampleSize(*map(int, row)) for row in zip(*columns, strict=True)]

    def summary(self) -> dict[str, float]:
        """Mean and CV of the length, images per sample, and the visual share of tokens."""
        lengths = self.lengths.astype(np.float64)
        visual = self.patches.sum() / self.vision.merge**2
        return {
            "samples": len(self),
            "mean_length": float(lengths.mean()),
            "length_cv": float(lengths.std() / lengths.mean()),
            "max_length": int(lengths.max()),
            "images_per_sample": float(self.images.mean()),
            "patches_per_image": float(self.patches.sum() / max(1, self.images.sum())),
            "visual_token_share": float(visual / lengths.sum()),
            "filtered": self.filtered,
        }


def _draw(
    component: Component, n: int, vision: VisionSettings, rng: np.random.Generator
) -> tuple[np.ndarray, ...]:
    """``n`` samples of one component: text tokens, label tokens, patches, images, pairs."""
    text = lognormal_lengths(component.text_mean, component.text_cv, n, int(rng.integers(2**63)))
    labels = np.maximum(1, np.rint(text * component.answer_share)).astype(np.int64)
    images = component.min_images + rng.poisson(component.extra_images, n)
    owner = np.repeat(np.arange(n), images)
    if len(owner):
        area = lognormal_lengths(
            component.pixels_mean, component.pixels_cv, len(owner), int(rng.integers(2**63))
        )
        aspect = np.exp(rng.uniform(-1, 1, len(owner)) * math.log(component.max_aspect))
        per_image = image_patches(np.sqrt(area / aspect), np.sqrt(area * aspect), vision)
    else:
        per_image = np.zeros(0, dtype=np.int64)
    patches = np.bincount(owner, weights=per_image, minlength=n).astype(np.int64)
    pairs = np.bincount(owner, weights=per_image.astype(np.float64) ** 2, minlength=n)
    return text, labels, patches, images.astype(np.int64), pairs.astype(np.int64)


def make_set(
    spec: SetSpec,
    samples: int,
    max_length: int,
    seed: int,
    vision: VisionSettings | None = None,
) -> MultimodalSet:
    """``samples`` samples of ``spec`` no longer than ``max_length`` tokens, seeded.

    Components are drawn in proportion to their weights and interleaved at random; samples over
    ``max_length`` are redrawn (and counted), since a sample with images cannot be truncated.
    """
    if samples < 1:
        raise ValueError(f"a set needs at least one sample, got samples={samples}")
    vision = vision or VisionSettings()
    rng = np.random.default_rng([seed, 7])
    weights = np.array([c.weight for c in spec.components], dtype=np.float64)
    kept: list[tuple[np.ndarray, ...]] = []
    have = filtered = 0
    while have < samples:
        need = samples - have
        kinds = rng.choice(len(weights), need, p=weights / weights.sum())
        parts = [
            _draw(component, int(np.count_nonzero(kinds == k)), vision, rng)
            for k, component in enumerate(spec.components)
        ]
        columns = [np.concatenate(column) for column in zip(*parts, strict=True)]
        mixed = rng.permutation(need)
        text, labels, patches, images, pairs = (column[mixed] for column in columns)
        lengths = text + patches // vision.merge**2
        fits = lengths <= max_length
        filtered += int(np.count_nonzero(~fits))
        kept.append((lengths[fits], labels[fits], patches[fits], images[fits], pairs[fits]))
        have += int(np.count_nonzero(fits))
    lengths, labels, patches, images, pairs = (np.concatenate(c) for c in zip(*kept, strict=True))
    return MultimodalSet(
        spec.name,
        spec.description,
        lengths,
        np.minimum(labels, lengths - 1),
        patches,
        images,
        pairs,
        filtered,
        vision,
    )


def builtin_sets(
    names: Sequence[str], samples: int, max_length: int, seed: int
) -> list[MultimodalSet]:
    """The named built-in sets (see :data:`BUILTIN_SETS`)."""
    unknown = [name for name in names if name not in BUILTIN_SETS]
    if unknown:
        raise ValueError(f"unknown multimodal set(s) {unknown}; choose from {list(BUILTIN_SETS)}")
    return [make_set(BUILTIN_SETS[name], samples, max_length, seed) for name in names]
