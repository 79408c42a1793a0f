"""TRL ``SFTTrainer`` specifics of the Hugging Face adapter (odb.adapters.hf).

TRL is never imported here: its trainer and collators are recognised by their settings and
class names, so the HF adapter works without TRL installed.

- **Offline packing** (``packing=True``) concatenates the dataset into rows of ``max_length``
  when the trainer is built; odb would then batch those rows as if they were samples. odb's
  packed mode is the online version of that packing, so ``enable`` refuses it and says what
  to set instead.
- **Padding-free** (``padding_free=True``): TRL's collator says so with its ``padding_free``
  flag, from which ``odb.DataLoader`` takes the packed layout (odb.collate.collator_layout).
- **Vision datasets** (rows of ``messages`` and ``images``): TRL processes them in its collator,
  a batch at a time, so a row's length is only known once processed. odb runs the trainer's
  own collator on each row alone (in the loader's workers), measures the processed sample and
  batches samples with the collator of the mode: odb's padded collator, or for Qwen-VL models
  the packed one with 3-D rotary positions (padding-free VLM training, which TRL refuses).
"""

from __future__ import annotations

from typing import Any

import torch

from odb.errors import ConfigError

__all__ = ["VisionSamples", "check_trainer", "is_vision_collator", "vision_samples"]


def check_trainer(trainer: Any) -> None:
    """Refuse what odb cannot batch meaningfully: TRL's offline packing."""
    args = trainer.args
    if getattr(args, "packing", False):
        raise ConfigError(
            "TRL's packing=True packed train_dataset into rows of max_length when the trainer "
            "was built, and odb would batch those rows as samples. odb packs online: build the "
            "SFTTrainer with packing=False and padding_free=True (and max_length=None, as TRL "
            "asks then), and odb runs in packed mode under its token budget"
        )


def is_vision_collator(collator: Any) -> bool:
    """Whether ``collator`` is TRL's vision collator, which processes raw rows."""
    kind = type(collator)
    return kind.__name__ == "DataCollatorForVisionLanguageModeling" and kind.__module__.startswith(
        "trl."
    )


def vision_samples(trainer: Any, dataset: Any, collator: Any, mode: str | None):
    """The dataset as processed samples (each row through ``collator`` alone) and the
    collator that batches them in ``mode`` (padded by default, as TRL's own; see
    ``odb.adapters.qwen_vl.collator``)."""
    from odb.adapters import qwen_vl

    if mode == "packed":
        batcher = qwen_vl.collator(trainer.model, "packed")
    else:  # for a Qwen-VL model, with its vision placeholder (FSDP / ZeRO-3 need it)
        pad = collator.processor.tokenizer.pad_token_id
        batcher = qwen_vl.collator(trainer.model, "padded", pad_token_id=pad)
    return VisionSamples(dataset, collator), batcher


class VisionSamples(torch.utils.data.Dataset):
    """Rows of a raw dataset processed one at a time by a collator that processes lists of rows
    (TRL's vision collator): sample ``i`` is ``process([dataset[i]])`` without its batch
    dimension, the one-sample form odb measures and batches."""

    def __init__(self, dataset: Any, process: Any):
        self.dataset, self.process = dataset, process

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        batch = self.process([self.dataset[index]])
        width = batch["input_ids"].shape[-1]
        return {key: _one_row(value, width) for key, value in batch.items()}


def _one_row(value: Any, width: int) -> Any:
    """A per-token field of one row, ``[1, width]``, becomes ``[width]``; the rest (pixel
    rows, image grids) is already per sample."""
    if isinstance(value, torch.Tensor) and value.ndim == 2 and value.shape == (1, width):
        return value[0]
    return value
