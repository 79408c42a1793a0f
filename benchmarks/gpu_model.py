"""Estimated training-step time of a Qwen3-VL model on a GPU, from what a batch computes.

No GPU runs here, so step time is modelled. One rank's step, forward and backward (backward
costs twice the forward: ``x3``; a multiply-add is 2 FLOPs)::

    flops = 6 * P_lm * T                      linear layers and LM head, per computed token
          + 12 * N * h * e * A                causal attention, per (query, key) pair
          + 6 * P_vis * V                     vision tower linear layers, per patch
          + 12 * c * D * S                    vision attention, per (patch, patch) pair
    time  = overhead + flops / (peak * u(T)),     u(T) = u_max * T / (T + T_half)

``T`` is the tokens the language model computes (a padded batch of ``n`` rows computes
``n * max_len``, padding included; a packed row only its real tokens), ``A`` the causal pairs
(``L * (L + 1) / 2`` per row of length ``L``: the padded length for padded rows, each sample's
own length when packed), ``V`` the vision patches (the tower runs on the batch's patches
without padding in both modes), ``S`` the sum over images of ``patches**2`` (Qwen3-VL's vision
tower attends within each image, in every layer). ``P_lm`` counts the language model's matrix
weights used per token; ``P_vis`` the vision tower's per patch (blocks, patch embedding, the
merger and the deepstack mergers). ``u`` is the achieved fraction of peak: small batches launch
small kernels, so utilisation rises with ``T`` and saturates at ``u_max``. ``overhead`` is what
a step costs whatever its size: the AdamW update reading and writing ~32 bytes per parameter
at HBM bandwidth (DDP: every rank updates every parameter), plus a fixed launch and
synchronisation cost. A DDP step lasts as long as its slowest rank.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from odb.adapters.qwen_vl import ModelFlops, model_flops

__all__ = [
    "H100",
    "MODELS",
    "QWEN3_VL_2B",
    "QWEN3_VL_8B",
    "BatchShape",
    "GpuSpec",
    "ModelSpec",
    "StepCostModel",
    "computed_tokens",
]


@dataclass(frozen=True)
class ModelSpec:
    """The sizes of a Qwen3-VL checkpoint that decide its FLOPs (from its ``config.json``).

    Language model: ``hidden`` d, ``layers`` N, ``heads`` h and ``kv_heads`` k of size
    ``head_dim`` e, gated MLP ``intermediate`` f, ``vocab`` V. Vision tower: ``vision_hidden``
    c, ``vision_depth`` D, MLP ``vision_intermediate`` g (not gated), ``patch`` p,
    ``temporal_patch`` t, ``merge`` m, output ``hidden``; one merger plus one per
    ``deepstack`` layer. The counting itself is :func:`odb.adapters.qwen_vl.model_flops` on
    :meth:`config`, the same that prices batches for training.
    """

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    vision_hidden: int
    vision_depth: int
    vision_intermediate: int
    deepstack: int
    patch: int = 16
    temporal_patch: int = 2
    merge: int = 2
    position_embeddings: int = 2304
    vision_heads: int = 16

    def config(self) -> Any:
        """The model's transformers ``Qwen3VLConfig``."""
        import transformers

        text = {
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate,
            "vocab_size": self.vocab,
        }
        vision = {
            "hidden_size": self.vision_hidden,
            "depth": self.vision_depth,
            "num_heads": self.vision_heads,
            "intermediate_size": self.vision_intermediate,
            "out_hidden_size": self.hidden,
            "deepstack_visual_indexes": list(range(self.deepstack)),
            "patch_size": self.patch,
            "temporal_patch_size": self.temporal_patch,
            "spatial_merge_size": self.merge,
            "num_position_embeddings": self.position_embeddings,
        }
        return transformers.Qwen3VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=self.tied_embeddings
        )

    @functools.cached_property
    def flops(self) -> ModelFlops:
        """Forward FLOPs per token, attention pair, patch and image patch pair."""
        return model_flops(self.config())

    @functools.cached_property
    def params(self) -> int:
        """All weights, counted on the model built on the meta device (no memory used)."""
        import torch
        import transformers

        with torch.device("meta"):
            model = transformers.AutoModelForImageTextToText.from_config(self.config())
        return sum(p.numel() for p in model.parameters())


# Qwen/Qwen3-VL-2B-Instruct and Qwen/Qwen3-VL-8B-Instruct config.json on the Hugging Face hub
# (text_config / vision_config); transformers' Qwen3VLVisionConfig defaults are the 8B tower.
# Both have 8 KV heads of 128, a 151936 vocabulary, patch 16, temporal patch 2, merge 2.
QWEN3_VL_2B = ModelSpec(
    "Qwen3-VL-2B",
    hidden=2048,
    layers=28,
    heads=16,
    kv_heads=8,
    head_dim=128,
    intermediate=6144,
    vocab=151936,
    tied_embeddings=True,
    vision_hidden=1024,
    vision_depth=24,
    vision_intermediate=4096,
    deepstack=3,  # deepstack_visual_indexes [5, 11, 17]
)
QWEN3_VL_8B = ModelSpec(
    "Qwen3-VL-8B",
    hidden=4096,
    layers=36,
    heads=32,
    kv_heads=8,
    head_dim=128,
    intermediate=12288,
    vocab=151936,
    tied_embeddings=False,
    vision_hidden=1152,
    vision_depth=27,
    vision_intermediate=4304,
    deepstack=3,  # deepstack_visual_indexes [8, 16, 24]
)
MODELS = {model.name: model for model in (QWEN3_VL_2B, QWEN3_VL_8B)}


@dataclass(frozen=True)
class GpuSpec:
    """A GPU's dense bf16 peak and memory bandwidth, and how well training uses them.

    ``max_utilisation`` is the best fraction of peak a training step reaches on large batches
    (model FLOPs utilisation; 40-55% is what well-tuned dense training reports on H100);
    ``half_tokens`` the tokens per step at which half of it is reached; ``fixed_overhead``
    seconds per step for launches, the loss and gradient synchronisation backward cannot hide.
    """

    name: str
    peak_flops: float
    memory_bandwidth: float
    max_utilisation: float = 0.5
    half_tokens: float = 1024.0
    fixed_overhead: float = 0.005


# NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense BF16 tensor core, 3.35 TB/s HBM3.
H100 = GpuSpec("H100", peak_flops=989e12, memory_bandwidth=3.35e12)

OPTIMIZER_BYTES_PER_PARAM = 32
"""AdamW in mixed precision reads the fp32 weight, gradient and two moments and writes the
weight, the moments and the bf16 copy: about 32 bytes per parameter and step."""


@dataclass(frozen=True)
class BatchShape:
    """What one rank's batch holds, as arrays over many batches (zeros for an idle rank).

    ``samples``: rows of a padded batch (samples packed into one row); ``longest`` and
    ``tokens`` the longest sample and the real tokens; ``square_tokens`` the sum of squared
    sample lengths; ``patches`` the vision patches; ``image_pairs`` the sum over images of
    ``patches**2``.
    """

    samples: np.ndarray
    longest: np.ndarray
    tokens: np.ndarray
    square_tokens: np.ndarray
    patches: np.ndarray
    image_pairs: np.ndarray


def computed_tokens(shape: BatchShape, packed: bool) -> np.ndarray:
    """Tokens the language model computes: padding included unless packed."""
    if packed:
        return shape.tokens.astype(np.float64)
    return shape.samples.astype(np.float64) * shape.longest


@dataclass(frozen=True)
class StepCostModel:
    """The formula of the module docstring for one model on one GPU."""

    model: ModelSpec
    gpu: GpuSpec = H100

    @property
    def token_flops(self) -> float:
        return 3.0 * self.model.flops.token

    @property
    def pair_flops(self) -> float:
        return 3.0 * self.model.flops.attention

    @property
    def patch_flops(self) -> float:
        return 3.0 * self.model.flops.patch

    @property
    def image_pair_flops(self) -> float:
        flops = self.model.flops
        return 3.0 * flops.vision_attention_pair * flops.vision_full_layers

    @property
    def overhead(self) -> float:
        optimizer = OPTIMIZER_BYTES_PER_PARAM * self.model.params / self.gpu.memory_bandwidth
        return self.gpu.fixed_overhead + optimizer

    def flops(self, shape: BatchShape, packed: bool) -> np.ndarray:
        """Forward and backward FLOPs of each batch."""
        tokens = computed_tokens(shape, packed)
        if packed:
            pairs = (shape.square_tokens + shape.tokens) / 2.0
        else:
            longest = shape.longest.astype(np.float64)
            pairs = shape.samples * longest * (longest + 1) / 2.0
        return (
            self.token_flops * tokens
            + self.pair_flops * pairs
            + self.patch_flops * shape.patches
            + self.image_pair_flops * shape.image_pairs
        )

    def utilisation(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.float64)
        return self.gpu.max_utilisation * tokens / (tokens + self.gpu.half_tokens)

    def compute_seconds(self, shape: BatchShape, packed: bool) -> np.ndarray:
        """Seconds of each batch's forward and backward, without the per-step overhead (0 for
        an empty batch)."""
        tokens = computed_tokens(shape, packed)
        rate = self.gpu.peak_flops * self.utilisation(tokens)
        flops = self.flops(shape, packed)
        return np.divide(flops, rate, out=np.zeros_like(flops), where=tokens > 0)
