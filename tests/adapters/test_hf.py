"""The Hugging Face Trainer adapter with the real Trainer, in one process."""

from __future__ import annotations

import logging
import math
import os
import re

import pytest
import torch
import transformers
from hf_setup import (
    Recorder,
    TokenDataset,
    grads,
    lengths,
    tiny_model,
    token_loss_sum,
    training_args,
)

import odb
from odb.adapters.hf import OdbTrainer, OdbTrainerMixin, enable

BUDGET = 256


def _train(
    tmp_path, dataset, *, kind="qwen2", budget=BUDGET, eval_dataset=None, resume=None, **args
):
    model = tiny_model(kind)
    trainer = transformers.Trainer(
        model=model,
        args=training_args(tmp_path, **args),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
    )
    enable(trainer, budget)
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=resume)
    recorder.windows = [w for w in recorder.windows if w]
    return trainer, recorder


def _epochs(recorder):
    """Step infos per epoch (odb's epoch number)."""
    out: dict[int, list] = {}
    for window in recorder.windows:
        for info in window:
            out.setdefault(info.epoch, []).append(info)
    return [out[e] for e in sorted(out)]


@pytest.mark.slow
def test_every_sample_once_per_epoch_and_full_accumulation_windows(tmp_path):
    dataset = TokenDataset(lengths(90))
    trainer, recorder = _train(tmp_path, dataset, num_train_epochs=2, gradient_accumulation_steps=3)
    epochs = _epochs(recorder)
    assert len(epochs) == 2
    for infos in epochs:
        seen = [i for info in infos if not info.ghost for i in info.sample_indices]
        assert sorted(seen) == list(range(len(dataset)))
        assert all(info.padded_tokens <= BUDGET for info in infos)
    assert all(len(window) == 3 for window in recorder.windows)
    assert trainer.state.global_step == len(recorder.windows)


@pytest.mark.slow
def test_max_steps_runs_exactly_that_many_optimizer_steps(tmp_path):
    trainer, recorder = _train(
        tmp_path, TokenDataset(lengths(30)), max_steps=23, gradient_accumulation_steps=2
    )
    assert trainer.state.global_step == 23
    assert len(recorder.windows) == 23
    assert len({info.epoch for w in recorder.windows for info in w}) > 1  # ran past one epoch


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen2", "qwen2_5_vl"])
def test_gradient_is_the_exact_token_mean_of_the_window(tmp_path, kind):
    """Qwen2 accepts num_items_in_batch, Qwen2.5-VL does not: both get the exact mean."""
    dataset = TokenDataset(lengths(40, seed=1))
    assert getattr(tiny_model(kind), "accepts_loss_kwargs", True) is (kind == "qwen2")
    _, recorder = _train(
        tmp_path,
        dataset,
        kind=kind,
        max_steps=1,
        gradient_accumulation_steps=3,
        learning_rate=0.0,
    )
    window = recorder.windows[0]
    samples = [dataset[i] for info in window if not info.ghost for i in info.sample_indices]
    tokens = sum(int((s["labels"][1:] != -100).sum()) for s in samples)
    assert tokens == sum(info.global_label_tokens for info in window)
    reference = tiny_model(kind)
    (sum(token_loss_sum(reference, s) for s in samples) / tokens).backward()
    for got, want in zip(recorder.first_grads, grads(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


class _PromptOnlyLong(TokenDataset):
    """Samples 0-5 are long and all prompt (no label token): each fills a batch alone."""

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        if index < 6:
            sample["labels"] = torch.full_like(sample["labels"], -100)
        return sample


@pytest.mark.slow
def test_micro_batches_without_label_tokens_add_exactly_nothing(tmp_path):
    """Their mean loss is NaN (0/0); the window's gradient is still the exact token mean of
    the others, finite, and no extra model output is needed to get there."""
    dataset = _PromptOnlyLong([150] * 6 + lengths(12, seed=2, mean=25))
    trainer, recorder = _train(
        tmp_path,
        dataset,
        max_steps=1,
        gradient_accumulation_steps=12,
        learning_rate=0.0,
        logging_nan_inf_filter=False,  # a NaN loss must not be hidden from the logs
    )
    window = recorder.windows[0]
    assert any(info.local_label_tokens == 0 and not info.ghost for info in window)
    samples = [dataset[i] for info in window if not info.ghost for i in info.sample_indices]
    assert len(samples) == len(dataset)
    tokens = sum(int((s["labels"][1:] != -100).sum()) for s in samples)
    reference = tiny_model()
    (sum(token_loss_sum(reference, s) for s in samples) / tokens).backward()
    for got, want in zip(recorder.first_grads, grads(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    assert math.isfinite(trainer.state.log_history[0]["loss"])  # what the logs show too


@pytest.mark.slow
def test_linear_schedule_ends_with_the_data(tmp_path):
    dataset = TokenDataset(lengths(400, seed=2))
    trainer, recorder = _train(
        tmp_path,
        dataset,
        num_train_epochs=1,
        gradient_accumulation_steps=1,
        warmup_steps=0.2,
        learning_rate=1e-3,
    )
    lrs = recorder.lrs
    steps = len(lrs)
    assert steps == trainer.state.global_step and steps > 40
    assert all(lr > 0 for lr in lrs)
    assert lrs[-1] <= 0.05 * max(lrs)  # at the last step the schedule is all but over
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    peak = max(range(steps), key=lambda k: lrs[k])
    assert abs(peak / steps - 0.2) < 0.05  # warmup lasts its fraction of the training
    # the progress bar used an estimate of the steps; the end is the real one
    assert trainer.state.max_steps == steps


@pytest.mark.slow
def test_resume_continues_with_the_same_batches_without_replay(tmp_path):
    dataset = TokenDataset(lengths(120, seed=3))
    common = dict(num_train_epochs=2, gradient_accumulation_steps=2)
    _, full = _train(tmp_path / "full", dataset, **common)
    _train(tmp_path / "run", dataset, save_strategy="steps", save_steps=7, **common)
    checkpoint = tmp_path / "run" / "checkpoint-7"
    assert (checkpoint / "odb_state_rank0.json").exists()
    _, resumed = _train(tmp_path / "run", dataset, resume=str(checkpoint), **common)
    rest = [[i.sample_indices for i in w] for w in resumed.windows]
    assert rest == [[i.sample_indices for i in w] for w in full.windows[7:]]


@pytest.mark.slow
def test_resume_from_a_checkpoint_without_odb_state_is_refused(tmp_path):
    dataset = TokenDataset(lengths(20))
    plain = transformers.Trainer(
        model=tiny_model(),
        train_dataset=dataset,
        args=training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
        data_collator=odb.PaddedCollator(),
    )
    plain.train()
    with pytest.raises(odb.StateError, match=r"odb_state_rank0\.json is missing"):
        _train(tmp_path, dataset, max_steps=4, resume=str(tmp_path / "checkpoint-2"))


@pytest.mark.slow
def test_evaluation_during_training_uses_the_plain_eval_loader(tmp_path):
    train, held_out = TokenDataset(lengths(60)), TokenDataset([16] * 12)
    trainer, _ = _train(
        tmp_path,
        train,
        max_steps=6,
        eval_strategy="steps",
        eval_steps=3,
        per_device_eval_batch_size=4,
        eval_dataset=held_out,
    )
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evals) == 2 and all(math.isfinite(e["eval_loss"]) for e in evals)
    eval_loader = trainer.get_eval_dataloader()
    assert not isinstance(eval_loader, odb.DataLoader) and len(eval_loader) == 3


@pytest.mark.slow
def test_other_dataloaders_keep_their_length(tmp_path):
    _train(tmp_path, TokenDataset(lengths(30)), max_steps=2)
    plain = torch.utils.data.DataLoader(TokenDataset([5] * 10), batch_size=4)
    assert len(plain) == 3


def _training_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.slow
def test_logged_figures_count_the_samples_and_tokens_of_each_optimizer_step(tmp_path):
    """Per optimizer step, not per micro-batch: with accumulation 3 a step holds three
    batches' samples. Checked against the step infos of the batches the trainer ran."""
    trainer, recorder = _train(
        tmp_path, TokenDataset(lengths(60)), max_steps=5, gradient_accumulation_steps=3
    )
    logged = _training_logs(trainer)
    assert len(logged) == len(recorder.windows) == 5
    for entry, window in zip(logged, recorder.windows, strict=True):
        real = [info for info in window if not info.ghost]
        assert entry["odb_samples_per_step"] == sum(info.global_samples for info in window)
        assert entry["odb_tokens_per_step"] == sum(info.real_tokens for info in real)
        assert entry["odb_label_tokens_per_step"] == sum(
            info.global_label_tokens for info in window
        )
        padded = sum(info.padded_tokens for info in real)
        assert entry["odb_padding_efficiency"] == round(entry["odb_tokens_per_step"] / padded, 4)
        assert entry["odb_samples_per_second"] > 0 and "odb_ghost_steps" in entry
    samples = sum(info.global_samples for window in recorder.windows for info in window)
    final = trainer.state.log_history[-1]
    assert final["odb_train_samples"] == samples  # the Trainer's own figure assumed 5 * 3 * 1
    assert final["train_samples_per_second"] * final["train_runtime"] == pytest.approx(
        samples, rel=0.01
    )
    tokens = sum(i.real_tokens for w in recorder.windows for i in w if not i.ghost)
    assert final["odb_train_tokens"] == tokens
    # max_steps mode over a dataset of known size: epochs counted in samples
    assert final["epoch"] == pytest.approx(samples / 60)


@pytest.mark.slow
def test_a_second_train_call_reports_its_own_samples(tmp_path):
    trainer, recorder = _train(tmp_path, TokenDataset(lengths(40)), max_steps=2)
    first = len(recorder.windows)
    recorder.windows.append([])  # _train dropped the empty window its last step opened
    trainer.train()
    second = [w for w in recorder.windows[first:] if w]
    assert len(second) == 2
    samples = sum(info.global_samples for window in second for info in window)
    assert trainer.state.log_history[-1]["odb_train_samples"] == samples


class _Underestimated(TokenDataset):
    """A dataset whose cheap length estimate is a third of the truth: the step estimate,
    and so the progress bar's first total, falls far short."""

    def estimate(self, index: int) -> odb.SampleSize:
        n = self.lengths[index]
        return odb.SampleSize(max(1, n // 3), label_tokens=max(0, n // 3 - 1))


class _BarWatcher(transformers.TrainerCallback):
    """The progress bar's total and position after every step."""

    def __init__(self, trainer):
        self.trainer, self.seen = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, transformers.ProgressCallback):
                self.seen.append((callback.training_bar.n, callback.training_bar.total))


@pytest.mark.slow
def test_progress_bar_keeps_a_total_and_epoch_ends_at_the_epochs_asked_for(tmp_path):
    trainer = transformers.Trainer(
        model=tiny_model(),
        args=training_args(tmp_path, num_train_epochs=1, disable_tqdm=False),
        train_dataset=_Underestimated(lengths(90, seed=4)),
    )
    enable(trainer, BUDGET)
    watcher = _BarWatcher(trainer)
    trainer.add_callback(watcher)
    trainer.train()
    steps = trainer.state.global_step
    first_total = watcher.seen[0][1]
    assert first_total < 0.7 * steps  # the estimate was short, as intended
    assert [n for n, _ in watcher.seen] == list(range(1, steps + 1))
    assert all(total > n for n, total in watcher.seen[:-1])  # never "16it" past a total
    assert watcher.seen[-1] == (steps, steps)
    assert trainer.state.log_history[-1]["epoch"] == 1.0
    assert _training_logs(trainer)[-1]["epoch"] == 1.0


@pytest.mark.slow
def test_odb_trainer_class_is_the_same_as_enable(tmp_path):
    dataset = TokenDataset(lengths(30))
    trainer = OdbTrainer(
        model=tiny_model(),
        args=training_args(tmp_path, max_steps=3),
        train_dataset=dataset,
        token_budget=BUDGET,
    )
    trainer.train()
    assert trainer.state.global_step == 3
    assert isinstance(trainer.get_train_dataloader(), odb.DataLoader)


def _trainer(tmp_path, cls=transformers.Trainer, dataset=None, **args):
    return cls(
        model=tiny_model(),
        args=training_args(tmp_path, **({"max_steps": 1} | args)),
        train_dataset=dataset if dataset is not None else TokenDataset([5]),
    )


def test_enable_moves_only_that_trainer_to_an_odb_subclass_of_its_class(tmp_path):
    class MyTrainer(transformers.Trainer):
        pass

    trainer, other = _trainer(tmp_path, MyTrainer), _trainer(tmp_path, MyTrainer)
    assert enable(trainer, BUDGET) is trainer
    assert type(trainer).__name__ == "OdbMyTrainer" and isinstance(trainer, MyTrainer)
    assert isinstance(trainer, OdbTrainerMixin) and type(other) is MyTrainer
    assert type(enable(_trainer(tmp_path), BUDGET)) is OdbTrainer  # a plain Trainer


def test_a_trainer_without_the_internals_odb_uses_is_refused_naming_the_version(tmp_path):
    class Reworked(transformers.Trainer):
        def get_batch_samples(self, epoch_iterator, device):  # a changed signature
            raise AssertionError("not reached")

    trainer = _trainer(tmp_path, Reworked)
    with pytest.raises(odb.ConfigError, match=rf"get_batch_samples.*{transformers.__version__}"):
        enable(trainer, BUDGET)
    assert type(trainer) is Reworked and not hasattr(trainer, "_odb")


class _WhereProcessed(TokenDataset):
    """Writes the process id of every __getitem__ call into ``folder``."""

    def __init__(self, lengths, folder):
        super().__init__(lengths)
        self.folder = folder

    def __getitem__(self, index: int) -> dict:
        with open(self.folder / f"{os.getpid()}.txt", "a") as handle:
            handle.write(f"{index}\n")
        return super().__getitem__(index)

    def calls(self) -> dict[int, int]:
        return {int(path.stem): len(path.read_text().split()) for path in self.folder.glob("*.txt")}


@pytest.mark.slow
def test_start_up_line_and_a_probe_of_the_size_asked_run_in_the_loaders_workers(tmp_path, caplog):
    (tmp_path / "calls").mkdir()
    dataset = _WhereProcessed(lengths(60), tmp_path / "calls")
    trainer = _trainer(
        tmp_path, dataset=dataset, max_steps=-1, num_train_epochs=1, dataloader_num_workers=2
    )
    enable(trainer, BUDGET, probe_samples=20)
    with caplog.at_level(logging.INFO, logger="odb"):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("odb: ")]
    assert len(lines) == 1, lines
    assert lines[0].startswith("odb: 1 rank(s), padded mode, token budget 256 (PaddedCost)")
    assert re.search(r"estimated \d+ optimizer steps per epoch .* from 20 probed samples", lines[0])
    calls = dataset.calls()
    assert os.getpid() not in calls  # neither the probe nor the epoch ran in this process
    assert sum(calls.values()) == 20 + 60


def test_enable_refuses_twice_and_reserved_options(tmp_path):
    trainer = transformers.Trainer(
        model=tiny_model(),
        args=training_args(tmp_path, max_steps=1),
        train_dataset=TokenDataset([5]),
    )
    with pytest.raises(odb.ConfigError, match="'shuffle' is set by the Trainer adapter"):
        enable(trainer, BUDGET, shuffle=False)
    enable(trainer, BUDGET)
    with pytest.raises(odb.ConfigError, match="already enabled"):
        enable(trainer, BUDGET)


@pytest.mark.slow
def test_trainer_trains_a_tiny_qwen_vl_on_llava_data_with_images(tmp_path):
    """LLaVA JSON + images -> LlavaDataset -> Trainer with odb (2 workers) -> falling loss."""
    import qwen_vl_tiny

    from odb.adapters import qwen_vl

    tokenizer = qwen_vl_tiny.small_tokenizer()
    processor = qwen_vl_tiny.make_processor(
        "qwen2_5_vl", tokenizer, min_pixels=4 * 28 * 28, max_pixels=160 * 160
    )
    source = qwen_vl_tiny.write_llava_dataset(tmp_path)
    dataset = qwen_vl.LlavaDataset(source, tmp_path / "images", processor)
    model = qwen_vl_tiny.tiny_model("qwen2_5_vl", tokenizer, dtype=torch.float32)
    args = training_args(
        tmp_path / "out",
        num_train_epochs=6,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        dataloader_num_workers=2,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=qwen_vl.collator(model, "padded"),
    )
    enable(trainer, 400)
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    for infos in _epochs(recorder):
        seen = [i for info in infos if not info.ghost for i in info.sample_indices]
        assert sorted(seen) == list(range(len(dataset)))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) >= 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize(
    "family, compute", [("qwen3_vl", True), ("qwen3_vl", False), ("qwen3_vl_moe", True)]
)
def test_a_qwen_vl_model_is_budgeted_by_compute_unless_turned_off(
    tmp_path, family, compute, caplog
):
    import qwen_vl_tiny

    from odb.adapters import qwen_vl
    from odb.adapters.hf import _announce

    tokenizer = qwen_vl_tiny.small_tokenizer()
    model = qwen_vl_tiny.tiny_model(family, tokenizer)
    samples = [{"input_ids": torch.arange(n), "labels": torch.arange(n)} for n in lengths(20)]
    trainer = transformers.Trainer(
        model=model, args=training_args(tmp_path, max_steps=1), train_dataset=samples
    )
    enable(trainer, BUDGET, compute=compute)
    loader = trainer.get_train_dataloader()
    with caplog.at_level(logging.INFO, logger="odb"):
        _announce(trainer, loader, "plan")
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("odb: ")]
    if compute:
        expected = qwen_vl.compute_budget(model, BUDGET, "padded")
        assert loader.budget == expected
        assert loader.budget.limit == qwen_vl.COMPUTE_HEADROOM * BUDGET
        assert loader.budget.caps.max_tokens == BUDGET
        assert "estimated compute of this many text tokens" in line
        assert "compute=False" in line and f"max_tokens={BUDGET}" in line
    else:
        assert loader.budget == odb.Budget(BUDGET)
        assert line.startswith(f"odb: 1 rank(s), padded mode, token budget {BUDGET} (PaddedCost)")


def test_a_compute_cost_given_to_the_adapter_prices_the_compute_budget(tmp_path):
    import dataclasses

    import qwen_vl_tiny

    from odb.adapters import qwen_vl

    model = qwen_vl_tiny.tiny_model("qwen3_vl", qwen_vl_tiny.small_tokenizer())
    samples = [{"input_ids": torch.arange(n), "labels": torch.arange(n)} for n in lengths(20)]
    timed = dataclasses.replace(qwen_vl.compute_cost(model, "padded"), vision_weight=3.0)

    def trainer():
        args = training_args(tmp_path, max_steps=1)
        return transformers.Trainer(model=model, args=args, train_dataset=samples)

    loader = enable(trainer(), BUDGET, compute=timed).get_train_dataloader()
    assert loader.budget == qwen_vl.compute_budget(model, BUDGET, "padded", cost=timed)
    assert loader.budget.cost.vision_weight == 3.0
    with pytest.raises(odb.ConfigError, match="compute must be"):
        enable(trainer(), BUDGET, compute="measured")
