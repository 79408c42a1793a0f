"""TRL's SFTTrainer with odb batches (the real trainer, a tiny Qwen2 model)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import qwen_vl_tiny
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from trl_tiny import TOKEN_RANGE, one_thread, text_model

import odb
from odb.adapters import qwen_vl
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


def _config(tmp_path, **overrides) -> SFTConfig:
    options = dict(
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
    options.update(overrides)
    return SFTConfig(**options)


class _Run:
    """An SFTTrainer with odb: the step info of every micro-batch it trained on, the batches'
    shapes, the model forwards and the warnings."""

    def __init__(self, trainer, budget, **options):
        self.trainer = enable(trainer, token_budget=budget, **options)
        self.steps, self.shapes, self.forwards = [], [], []
        trainer.model.register_forward_pre_hook(lambda module, args: self.forwards.append(1))
        original = trainer.training_step

        def training_step(model, inputs, num_items_in_batch=None):
            self.steps.append(odb.step_info(inputs))
            shapes = {k: tuple(v.shape) for k, v in inputs.items() if hasattr(v, "shape")}
            self.shapes.append(shapes)
            return original(model, inputs, num_items_in_batch)

        trainer.training_step = training_step

    def train(self):
        with one_thread(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.trainer.train()
        extra = [str(w.message) for w in caught if "extra forward" in str(w.message)]
        assert not extra, extra
        assert len(self.forwards) == len(self.steps)  # one forward per micro-batch
        return self

    @property
    def first_loss(self) -> float:
        return next(e["loss"] for e in self.trainer.state.log_history if "loss" in e)


def _text_run(tmp_path, budget=256, rows=40, **config) -> _Run:
    tokenizer = qwen_vl_tiny.small_tokenizer()
    trainer = SFTTrainer(
        model=text_model(tokenizer),
        args=_config(tmp_path, **config),
        train_dataset=_tokenized(rows),
        processing_class=tokenizer,
    )
    return _Run(trainer, budget)


@pytest.mark.parametrize("padding_free", [False, True])
def test_sft_trainer_runs_one_forward_per_micro_batch_and_no_extra_one(tmp_path, padding_free):
    """odb asks the trainer's loss for the model outputs only when its caller does: TRL's
    SFTTrainer would otherwise recompute the logits its fused LM head skips, with an extra
    forward pass per micro-batch (and say so). TRL's padding-free collator makes odb budget
    packed rows: one row per micro-batch, no longer than the budget."""
    extra = {"padding_free": True, "max_length": None} if padding_free else {}
    run = _text_run(tmp_path, **extra).train()
    assert run.trainer.state.global_step == 3 and len(run.steps) == 6
    assert run.trainer.get_train_dataloader().mode == ("packed" if padding_free else "padded")
    for info, shape in zip(run.steps, run.shapes, strict=True):
        rows, width = shape["input_ids"]
        if padding_free:
            assert rows == 1 and width == info.real_tokens == info.padded_tokens <= 256
        else:
            assert rows == info.local_samples and rows * width == info.padded_tokens <= 256


def test_padding_free_sft_trains_on_the_same_loss_as_the_padded_run(tmp_path):
    """All rows in one micro-batch, once padded and once padding-free: the same loss."""
    common = dict(budget=20_000, rows=16, max_steps=1, gradient_accumulation_steps=1)
    padded = _text_run(tmp_path / "padded", **common).train()
    free = _text_run(tmp_path / "free", padding_free=True, max_length=None, **common).train()
    assert padded.steps[0].local_samples == free.steps[0].local_samples == 16
    assert free.shapes[0]["input_ids"][0] == 1 and padded.shapes[0]["input_ids"][0] == 16
    assert free.first_loss == pytest.approx(padded.first_loss, rel=1e-6)


def test_a_mode_the_collator_contradicts_is_refused_before_the_first_step(tmp_path):
    tokenizer = qwen_vl_tiny.small_tokenizer()
    trainer = SFTTrainer(
        model=text_model(tokenizer),
        args=_config(tmp_path, padding_free=True, max_length=None),
        train_dataset=_tokenized(20),
        processing_class=tokenizer,
    )
    run = _Run(trainer, 256, mode="padded")
    with pytest.raises(odb.ConfigError, match="mode='padded' but the collate_fn"):
        run.trainer.train()
    assert not run.steps


def test_trl_offline_packing_is_refused_with_what_to_set_instead(tmp_path):
    tokenizer = qwen_vl_tiny.small_tokenizer()
    trainer = SFTTrainer(
        model=text_model(tokenizer),
        args=_config(tmp_path, packing=True, max_length=64),
        train_dataset=_tokenized(20),
        processing_class=tokenizer,
    )
    with pytest.raises(odb.ConfigError, match="packing=False and padding_free=True"):
        enable(trainer, 256)


def _vision_run(tmp_path, mode, budget=40_000, **config) -> _Run:
    """A tiny Qwen2.5-VL SFTTrainer on LLaVA records with 0 to 3 images each, in TRL's vision
    format (``LlavaDataset.sft_rows``)."""
    tokenizer = qwen_vl_tiny.small_tokenizer()
    processor = qwen_vl_tiny.make_processor(
        "qwen2_5_vl", tokenizer, min_pixels=4 * 28 * 28, max_pixels=96 * 96
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = qwen_vl_tiny.write_llava_dataset(tmp_path)
    rows = qwen_vl.LlavaDataset(source, tmp_path / "images", processor).sft_rows()
    model = qwen_vl_tiny.tiny_model("qwen2_5_vl", tokenizer)
    options = dict(max_steps=1, gradient_accumulation_steps=1, learning_rate=0.0)
    trainer = SFTTrainer(
        model=model,
        args=_config(tmp_path / "out", **{**options, **config}),
        train_dataset=rows,
        processing_class=processor,
    )
    return _Run(trainer, budget, mode=mode)


def test_vision_sft_runs_padding_free_in_odb_packed_mode_with_the_padded_loss(tmp_path):
    """TRL refuses padding-free training for vision datasets; with odb a Qwen-VL SFTTrainer
    trains on packed rows with 3-D rotary positions, and the loss is the padded one."""
    padded = _vision_run(tmp_path / "padded", "padded").train()
    packed = _vision_run(tmp_path / "packed", "packed").train()
    assert padded.steps[0].local_samples == packed.steps[0].local_samples == 24
    assert padded.shapes[0]["input_ids"][0] == 24
    images = sum([0, 1, 1, 2, 3][i % 5] for i in range(24))  # write_llava_dataset's rows
    assert packed.shapes[0]["image_grid_thw"][0] == padded.shapes[0]["image_grid_thw"][0] == images
    assert packed.shapes[0]["input_ids"] == (1, packed.steps[0].real_tokens)
    assert packed.shapes[0]["position_ids"] == (4, 1, packed.steps[0].real_tokens)
    assert packed.first_loss == pytest.approx(padded.first_loss, rel=1e-6)


def test_vision_sft_in_packed_mode_trains_under_the_budget(tmp_path):
    run = _vision_run(tmp_path, "packed", budget=300, max_steps=4, learning_rate=1e-3).train()
    assert len(run.steps) == 4
    assert all(info.real_tokens <= 300 for info in run.steps)
    assert all(math.isfinite(e["loss"]) for e in run.trainer.state.log_history if "loss" in e)
