"""How an image of a given size becomes Qwen-VL patches and ``<|image_pad|>`` tokens.

The layer the dataset's exact estimate stands on: it reads a processor's settings and an
image's size, never its pixels (see the package docstring for the two resize rules it follows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from odb.errors import ConfigError


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
