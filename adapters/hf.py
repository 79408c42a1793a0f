"""Hugging Face ``Trainer`` with odb batches: one line to turn it on.

    trainer = Trainer(model=model, args=args, train_dataset=dataset, ...)
    odb.adapters.hf.enable(trainer, token_budget=16384)      # or OdbTrainer(..., token_budget=)
    trainer.train()

Only this trainer instance changes (its methods are rebound on the instance; no class or
library is patched, so evaluation loaders and every other DataLoader behave as before):

- the train dataloader is an ``odb.DataLoader`` over ``train_dataset`` with the trainer's
  collator and dataloader arguments, sharded by odb itself (never passed through
  ``accelerator.prepare``, which would shard it a second time);
- the loss of every micro-batch is rescaled so the optimizer step trains on the exact mean over
  all label tokens of all ranks and accumulation micro-steps, whatever the model (with or
  without ``num_items_in_batch`` support), from counts odb already has: no extra collective;
- with ``num_train_epochs``, every sample is seen once per epoch, ``max_steps`` (progress bar)
  is an estimate, and the LR schedule follows the data actually consumed, so it ends exactly
  when training does; with ``max_steps``, exactly that many optimizer steps run;
- odb's state goes into every checkpoint and ``train(resume_from_checkpoint=...)`` continues
  from it without replaying batches;
- ``train_dataset`` may be a stream (a torch or Hugging Face ``IterableDataset``): trained for
  ``max_steps``, or for epochs when its length is known; a stream that cannot save its position
  gets checkpoints that refuse to resume (see docs/hf-trainer.md);
- odb's figures join the training logs.

Relies on ``Trainer`` internals of transformers 5.x (``_init_training_state``,
``_save_checkpoint``, ``_prepare_inputs``, ``set_initial_training_values``,
``get_batch_samples``); the tests run the real Trainer to catch changes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.data.data_collator import DataCollatorWithPadding, default_data_collator
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, seed_worker

import odb
from odb.batch import attach_step_info, find_step_info
from odb.errors import ConfigError, StateError
from odb.estimate import estimate_steps
from odb.stream import is_stream

__all__ = ["OdbTrainer", "enable"]

_STATE_FILE = "odb_state_rank{rank}.json"


@dataclass
class _Run:
    """What the adapter keeps on a trainer between the Trainer's calls."""

    token_budget: float
    options: dict
    original: dict[str, Any] = field(default_factory=dict)
    loader: odb.DataLoader | None = None
    epochs_mode: bool = False
    samples_target: float = 0.0  # samples to consume in the whole training (epochs mode)
    samples_done: int = 0  # global samples of the windows fetched so far
    steps_per_sample: float = 0.0  # the estimate's optimizer steps per sample
    window_label_tokens: int = 0  # global label tokens of the current accumulation window
    last_log: tuple[float, int, int] | None = None  # time, real tokens, samples
    resumed_pass: bool = False  # a pass restored from a checkpoint that has yielded nothing yet


class OdbTrainer(Trainer):
    """A ``transformers.Trainer`` whose training batches come from odb.

    Takes the Trainer's arguments plus ``token_budget`` and ``odb_options`` (any
    ``odb.DataLoader`` option: ``mode``, ``window``, ``max_images``, ...).
    """

    def __init__(
        self, *args: Any, token_budget: float, odb_options: dict | None = None, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        enable(self, token_budget, **(odb_options or {}))


def enable(trainer: Trainer, token_budget: float, **options: Any) -> Trainer:
    """Make ``trainer`` (a ``Trainer`` or subclass, e.g. TRL's ``SFTTrainer``) batch its
    training data with odb; returns the same trainer."""
    if not isinstance(trainer, Trainer):
        raise ConfigError(f"enable expects a transformers.Trainer, got {type(trainer).__name__}")
    if getattr(trainer, "_odb", None) is not None:
        raise ConfigError("odb is already enabled on this trainer")
    for reserved in ("shuffle", "sampler", "steps_multiple_of"):
        if reserved in options:
            raise ConfigError(f"{reserved!r} is set by the Trainer adapter, not by options")
    odb.Budget(token_budget)  # validate early, before training starts
    run = _Run(token_budget, options)
    for name, method in _METHODS.items():
        run.original[name] = getattr(trainer, name)
        setattr(trainer, name, types.MethodType(method, trainer))
    trainer._odb = run
    trainer.loss_is_scaled_for_ga = True  # compute_loss below already divides by the window
    trainer.callback_handler.callbacks.insert(0, _OdbFlowCallback(run))
    return trainer


# -- the dataloader ------------------------------------------------------------------------------
def _get_train_dataloader(self: Trainer) -> odb.DataLoader:
    run: _Run = self._odb
    if self.train_dataset is None:
        raise ValueError("Trainer: training requires a train_dataset.")
    args = self.args
    dataset, collator = self.train_dataset, self.data_collator
    streaming = is_stream(dataset)
    if _is_hf_dataset(dataset) and not streaming:
        dataset = self._remove_unused_columns(dataset, description="training")
    if collator is default_data_collator or isinstance(collator, DataCollatorWithPadding):
        # The Trainer's defaults cannot pad labels of varying length: use odb's collator.
        collator = None
    collate_fn = collator or _default_collator(self, run.options.get("mode", "padded"))
    if streaming or (collator is not None and not _is_hf_dataset(dataset)):
        # The Trainer's rule for iterable datasets too: their columns may be unknown before
        # they are read, so the collator drops what the model does not take.
        collate_fn = self._get_collator_with_removed_columns(collate_fn, description="training")
    options = dict(
        collate_fn=collate_fn,
        seed=args.data_seed if args.data_seed is not None else args.seed,
        num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory,
        prefetch_factor=args.dataloader_prefetch_factor,
        multiprocessing_context=args.dataloader_multiprocessing_context,
        worker_init_fn=partial(
            seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index
        ),
        steps_multiple_of=args.gradient_accumulation_steps,
    )
    if not streaming:  # a stream is read in its own order, its workers restarted every pass
        options.update(shuffle=True, persistent_workers=args.dataloader_persistent_workers)
    options.update(run.options)
    run.loader = odb.DataLoader(dataset, run.token_budget, **options)
    return run.loader


def _default_collator(trainer: Trainer, mode: str):
    if mode == "packed":
        return odb.PackedCollator()
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    pad = getattr(tokenizer, "pad_token_id", None)
    return odb.PaddedCollator(pad_token_id=pad if pad is not None else 0)


def _is_hf_dataset(dataset: Any) -> bool:
    return type(dataset).__module__.startswith("datasets.")


# -- steps and the LR schedule --------------------------------------------------------------------
def _set_initial_training_values(self: Trainer, args, dataloader):
    """The Trainer's step bookkeeping for a loader whose length is only estimated.

    The epoch loop gets an upper bound of update steps (it ends when odb's epoch ends, see
    ``_get_batch_samples``), ``steps_in_epoch`` and the progress bar the estimate.

    A stream trained for ``max_steps`` needs no estimate: as the Trainer does for iterable
    datasets, each pass is bounded by ``max_steps`` only (it ends when the stream does) and the
    progress bar shows ``max_steps``. Trained for epochs, a stream needs a known length (the
    loader's ``num_samples`` or the stream's ``len()``; ``epoch_samples`` raises otherwise).
    """
    run: _Run = self._odb
    loader = run.loader
    accumulation = args.gradient_accumulation_steps
    total_batch_size = self.get_total_train_batch_size(args)
    run.epochs_mode = args.max_steps <= 0
    if loader.streaming and not run.epochs_mode:
        steps = args.max_steps
        trained_samples = steps * total_batch_size
        return (
            sys.maxsize,
            steps,
            trained_samples,
            trained_samples,
            total_batch_size,
            steps * accumulation,
            steps,
        )
    samples = loader.epoch_samples()  # all ranks' (per-rank samplers need not cover the data)
    estimate = estimate_steps(loader)  # batches per epoch, a multiple of `accumulation`
    per_epoch = max(1, estimate // accumulation)
    upper = math.ceil(samples / accumulation) + 2  # every batch holds at least one sample
    if not run.epochs_mode:
        max_steps, epochs = args.max_steps, sys.maxsize
        trained_samples = max_steps * total_batch_size
    else:
        run.samples_target = samples * args.num_train_epochs
        max_steps = math.ceil(args.num_train_epochs * per_epoch)
        run.steps_per_sample = max_steps / run.samples_target
        epochs = math.ceil(args.num_train_epochs)
        trained_samples = run.samples_target
    return (
        epochs,
        upper,
        samples,
        trained_samples,
        total_batch_size,
        per_epoch * accumulation,
        max_steps,
    )


def _create_scheduler(self: Trainer, num_training_steps: int, optimizer=None):
    run: _Run = self._odb
    scheduler = run.original["create_scheduler"](num_training_steps, optimizer)
    if run.epochs_mode and isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        # scheduler.step() runs after the optimizer step, before global_step counts it
        progress = partial(_step_end_progress, self, run)
        self.lr_scheduler = scheduler = _ProgressSchedule(scheduler, num_training_steps, progress)
    return scheduler


def _data_left(run: _Run) -> bool:
    return run.samples_done < run.samples_target


def _progress(run: _Run, steps: float, samples: float) -> float:
    """Fraction of the training done after ``steps`` optimizer steps that consumed
    ``samples``: steps over the predicted total, which is the steps so far plus the remaining
    samples at the estimate's steps per sample. It follows steps as a step-based schedule does
    (warmup lasts its fraction of the steps) and is exactly 1 when the data is used up."""
    remaining = max(0.0, run.samples_target - samples)
    predicted = steps + remaining * run.steps_per_sample
    return 1.0 if predicted <= 0 else min(1.0, steps / predicted)


def _step_end_progress(trainer: Trainer, run: _Run) -> float:
    return _progress(run, trainer.state.global_step + 1, run.samples_done)


class _ProgressSchedule:
    """An LR schedule driven by the fraction of the training data consumed, not by steps.

    With ``num_train_epochs`` the number of optimizer steps is only estimated; a schedule laid
    over the estimate would end early or late. Instead the wrapped closed-form schedule
    (``LambdaLR``, as every Hugging Face schedule is) is evaluated at ``progress * total``
    steps (see ``_progress``): each accumulation window trains at the progress of its middle
    (set when the window is fetched), and ``step()`` after the last window lands on the
    schedule's end, exactly when the data is used up.
    """

    def __init__(self, scheduler, total_steps: int, progress):
        self.scheduler, self.total_steps, self.progress = scheduler, total_steps, progress

    def step(self) -> None:
        self.jump(self.progress())

    def jump(self, progress: float) -> None:
        """Set the learning rates to the schedule's value at ``progress`` (0 to 1)."""
        scheduler = self.scheduler
        scheduler.last_epoch = progress * self.total_steps
        groups = scheduler.optimizer.param_groups
        for group, base, factor in zip(
            groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(scheduler.last_epoch)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.scheduler.optimizer.param_groups]

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheduler, name)


class _OdbFlowCallback(TrainerCallback):
    """In epochs mode ``state.max_steps`` is an estimate: keep the Trainer's default flow from
    stopping on it while data remains (the end comes from ``_get_batch_samples``).

    A pass restored from a checkpoint saved after its last step yields no batch (whether a
    stream had more is only known by reading it). The Trainer ends the whole training on an
    epoch without a batch; here it goes on with the next pass while training remains."""

    def __init__(self, run: _Run):
        self.run = run

    def on_step_end(self, args, state, control, **kwargs):
        if self.run.epochs_mode and _data_left(self.run):
            state.max_steps = max(state.max_steps, state.global_step + 1)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        run = self.run
        if run.resumed_pass:
            run.resumed_pass = False
            if _data_left(run) if run.epochs_mode else state.global_step < state.max_steps:
                control.should_training_stop = False
        return control


def _get_batch_samples(self: Trainer, epoch_iterator, num_batches: int, device):
    """One accumulation window of odb batches, and its global label-token count."""
    run: _Run = self._odb
    batches = []
    if not run.epochs_mode or _data_left(run):
        for batch in epoch_iterator:
            batches.append(batch)
            if len(batches) == num_batches:
                break
    if not batches:
        self.control.should_epoch_stop = True
        if run.epochs_mode and not _data_left(run):
            _end_training(self)
        return [], None
    run.resumed_pass = False
    if run.last_log is None:  # throughput in the logs counts from the first window
        run.last_log = (time.perf_counter(), 0, 0)
    infos = [odb.step_info(batch) for batch in batches]
    run.window_label_tokens = sum(info.global_label_tokens for info in infos)
    window_samples = sum(info.global_samples for info in infos)
    if isinstance(self.lr_scheduler, _ProgressSchedule):  # train this window at its middle
        middle = _progress(run, self.state.global_step + 0.5, run.samples_done + window_samples / 2)
        self.lr_scheduler.jump(middle)
    run.samples_done += window_samples
    return batches, None


def _end_training(trainer: Trainer) -> None:
    """The data of the last epoch is used up: stop as the default flow does at max_steps."""
    state, control, args = trainer.state, trainer.control, trainer.args
    state.max_steps = state.global_step
    control.should_training_stop = True
    if args.save_strategy == SaveStrategy.STEPS:
        control.should_save = True


# -- the loss -------------------------------------------------------------------------------------
def _prepare_inputs(self: Trainer, inputs):
    """Keep odb's step info on the batch the Trainer copies to the device."""
    prepared = self._odb.original["_prepare_inputs"](inputs)
    info = find_step_info(inputs)
    return prepared if info is None else attach_step_info(prepared, info)


def _compute_loss(self: Trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
    """This micro-batch's share of the exact mean over the window's label tokens.

    The model (or the trainer subclass) computes its usual mean over this batch's label tokens;
    times the batch's label tokens that is its token-loss sum, and times ``world_size /
    window_label_tokens`` it becomes the share that DDP's averaging and the accumulation sum
    turn into the exact global mean. Evaluation batches (no step info) pass through.
    """
    run: _Run = self._odb
    info = find_step_info(inputs)
    original = run.original["compute_loss"]
    if info is None or not model.training:
        return original(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
    # Outputs only when the caller asks: TRL's SFTTrainer recomputes the logits, which its fused
    # LM head never builds, with an extra forward pass to return them.
    result = original(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)
    loss, outputs = result if return_outputs else (result, None)
    if info.local_label_tokens == 0 or not run.window_label_tokens:
        # No target here (a mean over nothing is NaN): a zero that stays in the graph, so every
        # parameter the forward used gets a zero gradient and DDP's all-reduce stays matched.
        loss = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * 0.0
    else:
        weight = info.loss_weight * info.local_label_tokens * info.world_size
        loss = loss * (weight / run.window_label_tokens)
    return (loss, outputs) if return_outputs else loss


# -- checkpoints and resume -----------------------------------------------------------------------
def _save_checkpoint(self: Trainer, model, trial) -> None:
    """The Trainer's checkpoint, plus this rank's odb state (json). A stream that cannot save
    its position exactly gets the reason written instead and a warning; resuming from that
    checkpoint is then refused (see ``_init_training_state``), never silently inexact."""
    run: _Run = self._odb
    run.original["_save_checkpoint"](model, trial)
    folder = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
    os.makedirs(folder, exist_ok=True)
    record = {"samples_done": run.samples_done}
    try:
        record["loader"] = _json_state(run.loader)
    except StateError as error:
        record["unsaved"] = str(error)
        warnings.warn(
            f"{folder} cannot resume the training data exactly, so resuming from it will be "
            f"refused: {error}",
            stacklevel=2,
        )
    path = os.path.join(folder, _STATE_FILE.format(rank=self.args.process_index))
    with open(path, "w") as handle:
        json.dump(record, handle)


def _json_state(loader: odb.DataLoader) -> dict:
    """``loader.state_dict()``, checked to come back unchanged from json: a stream's position
    holds the user's ``state_dict()`` of the stream, whose tuples, integer keys or tensors json
    would change or refuse."""
    state = loader.state_dict()
    source = (state["position"] or {}).get("source")
    try:
        unchanged = source is None or json.loads(json.dumps(source)) == source
    except (TypeError, ValueError) as error:
        raise StateError(f"the stream's state_dict() cannot be saved as json: {error}") from None
    if not unchanged:
        raise StateError(
            "the stream's state_dict() does not come back unchanged from json (tuples, "
            "integer keys, ...): give it plain json data (dicts with string keys, lists, "
            "numbers, strings)"
        )
    return state


def _init_training_state(
    self: Trainer,
    max_steps,
    num_update_steps_per_epoch,
    num_train_epochs,
    resume_from_checkpoint,
    trial,
):
    """On resume, restore odb's position instead of replaying batches."""
    run: _Run = self._odb
    epochs, steps = run.original["_init_training_state"](
        max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    )
    if resume_from_checkpoint is None:
        return epochs, steps
    path = os.path.join(resume_from_checkpoint, _STATE_FILE.format(rank=self.args.process_index))
    if not os.path.isfile(path):
        raise StateError(
            f"{path} is missing: this checkpoint was not written by an odb-enabled trainer "
            f"(or by another world size), so the data position cannot be restored exactly"
        )
    with open(path) as handle:
        state = json.load(handle)
    if "unsaved" in state:
        raise StateError(
            f"{resume_from_checkpoint} holds no data position to resume from exactly: "
            f"{state['unsaved']}"
        )
    run.loader.load_state_dict(state["loader"])
    run.samples_done = state["samples_done"]
    run.resumed_pass = True
    return run.loader.epoch, 0


# -- logs -----------------------------------------------------------------------------------------
def _log(self: Trainer, logs: dict, start_time: float | None = None) -> None:
    run: _Run = self._odb
    if run.loader is not None and "loss" in logs:
        stats = run.loader.stats()
        now = time.perf_counter()
        last = run.last_log or (now, 0, 0)
        elapsed = max(now - last[0], 1e-6)
        logs = {
            **logs,
            "odb_padding_efficiency": round(stats.padding_efficiency, 4),
            "odb_fill": round(stats.fill, 4),
            "odb_real_tokens_per_second": round((stats.real_tokens - last[1]) / elapsed, 1),
            "odb_samples_per_second": round((stats.samples - last[2]) / elapsed, 3),
            "odb_samples_per_step": round(stats.samples / max(stats.steps, 1), 2),
            "odb_ghost_steps": stats.ghost_steps,
            "odb_shared_groups": stats.shared_groups,
            "odb_stale_groups": stats.stale_groups,
            "odb_over_budget": stats.over_budget_solo + stats.over_budget_truncated,
        }
        run.last_log = (now, stats.real_tokens, stats.samples)
    run.original["log"](logs, start_time)


_METHODS = {
    "get_train_dataloader": _get_train_dataloader,
    "set_initial_training_values": _set_initial_training_values,
    "create_scheduler": _create_scheduler,
    "get_batch_samples": _get_batch_samples,
    "_prepare_inputs": _prepare_inputs,
    "compute_loss": _compute_loss,
    "_save_checkpoint": _save_checkpoint,
    "_init_training_state": _init_training_state,
    "log": _log,
}
