"""Qwen-VL glue: LLaVA-format data, exact lengths before decoding, compute costs, packed rows.

Five pieces, for Qwen2-VL, Qwen2.5-VL and Qwen3-VL, dense or mixture-of-experts (transformers
5.x processors and models):

- :class:`LlavaDataset` turns LLaVA-format records plus an image folder into processed single
  samples (chat template applied, visual tokens expanded, prompt masked in ``labels``), the
  sample contract odb batches.
- :meth:`LlavaDataset.estimate` predicts a sample's exact length and vision patches from the
  image *headers* and the tokenized text, without decoding a pixel: a cheap over-budget check
  before the expensive processing, and exact steps per epoch upfront (with
  ``odb.estimate.count_steps``). It is optional: odb batches from the lengths it measures after
  processing, so augmentation that changes lengths never makes a batch wrong.
- :func:`compute_cost` builds an :class:`odb.ComputeCost` whose attention and vision-tower
  terms come from a model config (:func:`model_flops` documents the count);
  :func:`measure_cost` fits the same weights to the model's timed steps on this device.
- :func:`collator` returns the padded or the padding-free packed collator for a model; the
  packed Qwen-VL row carries ``[4, 1, L]`` position ids (see :class:`QwenVLPackedCollator`).
- :func:`use_packed_attention` selects ``attn_implementation="odb_packed"`` for the language
  model: packed rows attend within each sample without the dense row-by-row mask sdpa builds,
  and without flash-attention installed.

Geometry of one image (what :class:`VisionGeometry` reproduces): ``qwen_vl_utils.fetch_image``
resizes it with qwen-vl-utils' ``smart_resize`` (sides multiples of ``patch * merge``, pixel
count within the processor's ``[min_pixels, max_pixels]``), then the image processor applies
transformers' ``smart_resize`` with the same settings (a no-op on an already conforming size,
kept so that the estimate follows both rules exactly). The image becomes a grid of
``(1, H / patch, W / patch)`` patches, and ``patches / merge**2`` ``<|image_pad|>`` tokens in the
text.
"""

from odb.adapters.qwen_vl.attention import (
    PACKED_ATTENTION,
    builds_dense_mask,
    packed_attention_forward,
    packed_attention_mask,
    register,
    use_packed_attention,
)
from odb.adapters.qwen_vl.collators import QwenVLPackedCollator, collator, vision_placeholder
from odb.adapters.qwen_vl.dataset import CHAT_TEMPLATE, LlavaDataset
from odb.adapters.qwen_vl.errors import (
    ImageCountError,
    MissingImageError,
    NoAssistantTurnError,
    RecordError,
    RecordTooLongError,
    UnreadableImageError,
)
from odb.adapters.qwen_vl.flops import (
    COMPUTE_HEADROOM,
    ModelFlops,
    compute_budget,
    compute_cost,
    model_flops,
)
from odb.adapters.qwen_vl.geometry import VisionGeometry
from odb.adapters.qwen_vl.measure import MeasuredCost, measure_cost

__all__ = [
    "CHAT_TEMPLATE",
    "COMPUTE_HEADROOM",
    "ImageCountError",
    "LlavaDataset",
    "MeasuredCost",
    "MissingImageError",
    "ModelFlops",
    "PACKED_ATTENTION",
    "NoAssistantTurnError",
    "QwenVLPackedCollator",
    "RecordError",
    "RecordTooLongError",
    "UnreadableImageError",
    "VisionGeometry",
    "builds_dense_mask",
    "collator",
    "compute_budget",
    "compute_cost",
    "measure_cost",
    "model_flops",
    "packed_attention_forward",
    "packed_attention_mask",
    "register",
    "use_packed_attention",
    "vision_placeholder",
]
