"""TRL's SFTTrainer with odb batches (the real trainer, a tiny Qwen2 model)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import qwen_vl_tiny
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from trl_tiny import TOKEN_RANGE, one_thread, text_model

import odb
from odb.adapters.hf import enable

pytestmark = pytest.mark.slow


def _tokenized(count: int, seed: int = 0) -> Dataset:
    """Already tokenized rows (SFTTrainer then leaves them as they are), of varied lengths."""
    rng = np.random.default_rng(seed)
    rows = [
        {"input_ids": rng.integers(*TOKEN_RANGE, int(n)).tolist()}
        for n in rng.integers(5, 60, count)
    ]
    return Dataset.from_list(rows)


def test_sft_trainer_runs_one_forward_per_micro_batch_and_no_extra_one(tmp_path):
    """odb asks the trainer's loss for the model outputs only when its caller does: TRL's
    SFTTrainer would otherwise recompute the logits its fused LM head skips, with an extra
    forward pass per micro-batch (and say so)."""
    tokenizer = qwen_vl_tiny.small_tokenizer()
    model = text_model(tokenizer)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=1,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=_tokenized(40), processing_class=tokenizer
    )
    enable(trainer, token_budget=256)
    steps = []
    original = trainer.training_step

    def training_step(model, inputs, num_items_in_batch=None):
        steps.append(odb.step_info(inputs))
        return original(model, inputs, num_items_in_batch)

    trainer.training_step = training_step
    with one_thread(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert trainer.state.global_step == 3 and len(steps) == 6
    assert len(forwards) == len(steps)
    extra = [str(w.message) for w in caught if "extra forward" in str(w.message)]
    assert not extra, extra
