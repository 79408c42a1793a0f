"""Hugging Face ``Trainer`` (and TRL ``SFTTrainer``) with odb batches: one line to turn it on.

    trainer = Trainer(model=model, args=args, train_dataset=dataset, ...)
    odb.adapters.hf.enable(trainer, token_budget=16384)      # or OdbTrainer(..., token_budget=)
    trainer.train()

``OdbTrainer`` is a ``Trainer`` subclass; ``enable`` gives an existing trainer the same
methods by moving that one instance to a subclass of its own class (``SFTTrainer`` becomes
``OdbSFTTrainer``): no class or library is patched, evaluation loaders and every other
DataLoader behave as before.

- the train dataloader is an ``odb.DataLoader`` over ``train_dataset`` with the trainer's
  collator and dataloader arguments, sharded by odb itself (never passed through
  ``accelerator.prepare``, which would shard it a second time); its layout (padded rows or
  packed) follows the collator, so TRL's ``padding_free`` makes odb budget packed rows;
- the loss of every micro-batch is rescaled so the optimizer step trains on the exact mean over
  all label tokens of all ranks and accumulation micro-steps (``odb.loss.window_loss_share``),
  from counts odb already has: no extra collective, and one forward per micro-batch;
- with ``num_train_epochs``, every sample is seen once per epoch, ``max_steps`` (progress bar)
  is an estimate kept up to date, and the LR schedule follows the data actually consumed
  (``odb.schedule``), so it ends exactly when training does; with ``max_steps``, exactly that
  many optimizer steps run;
- odb's state goes into every checkpoint (a callback's ``on_save``) and
  ``train(resume_from_checkpoint=...)`` continues from it without replaying batches;
- logs and the final metrics count real samples and tokens, per optimizer step, over all ranks.

Public extension points do most of it (``get_train_dataloader``, ``training_step``,
``compute_loss``, ``create_scheduler``, ``log``, callbacks). What needs Trainer internals is
named in ``_TRAINER_INTERNALS`` and checked when odb is enabled, naming the transformers version
if one is missing. TRL specifics (offline packing, vision datasets) are in
odb.adapters.sft.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import transformers
from transformers import ProgressCallback, Trainer, TrainerCallback
from transformers.data.data_collator import DataCollatorWithPadding, default_data_collator
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, seed_worker

import odb
from odb.adapters import qwen_vl, sft
from odb.adapters.qwen_vl.collators import VL_MODEL_TYPES
from odb.batch import StepInfo, find_step_info
from odb.collate import collator_layout
from odb.errors import ConfigError, StateError, positive_int
from odb.estimate import estimate_steps
from odb.loss import window_label_tokens, window_loss_share
from odb.schedule import DataProgress, ProgressSchedule
from odb.stream import is_stream

__all__ = ["OdbTrainer", "OdbTrainerMixin", "enable"]

logger = logging.getLogger("odb")

_STATE_FILE = "odb_state_rank{rank}.json"
_PROBE_SAMPLES = 256

# Trainer methods odb overrides or calls that are not documented extension points, with the
# parameters odb relies on; checked by ``enable`` (transformers 5.x).
_TRAINER_INTERNALS = {
    "set_initial_training_values": ("args", "dataloader"),
    "get_batch_samples": ("epoch_iterator", "num_batches", "device"),
    "_init_training_state": (
        "max_steps",
        "num_update_steps_per_epoch",
        "num_train_epochs",
        "resume_from_checkpoint",
        "trial",
    ),
    "_remove_unused_columns": ("dataset", "description"),
    "_get_collator_with_removed_columns": ("data_collator", "description"),
}


@dataclass
class _Counts:
    """What the windows of a stretch of training held: optimizer steps, micro-batches per
    rank, samples over all ranks, and this rank's real and computed tokens."""

    steps: int = 0
    batches: int = 0
    samples: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    label_tokens: int = 0  # over all ranks
    since: float = field(default_factory=time.perf_counter)

    def add(self, infos: list[StepInfo]) -> None:
        self.steps += 1
        self.batches += len(infos)
        self.samples += sum(info.global_samples for info in infos)
        self.label_tokens += window_label_tokens(infos)
        for info in infos:
            if not info.ghost:
                self.real_tokens += info.real_tokens
                self.padded_tokens += info.padded_tokens


@dataclass
class _Run:
    """What the adapter keeps on a trainer between the Trainer's calls."""

    token_budget: float
    options: dict
    probe_samples: int
    # a Qwen-VL model is budgeted by compute unless this is False; a ComputeCost replaces the
    # FLOPs-derived weights (e.g. qwen_vl.measure_cost's)
    compute: bool | odb.ComputeCost = True
    loader: odb.DataLoader | None = None
    progress: DataProgress | None = None  # epochs mode: the whole training's samples and rate
    epoch_samples: int | None = None  # one epoch's samples over all ranks (None: not known)
    samples_done: int = 0  # global samples of the windows fetched so far
    window_tokens: int = 0  # global label tokens of the current accumulation window
    micro_batch: StepInfo | None = None  # the micro-batch training_step is running
    resumed_pass: bool = False  # a pass restored from a checkpoint that has yielded nothing yet
    interval: _Counts | None = None  # since the last log
    session: _Counts | None = None  # since this train() call began

    @property
    def epochs_mode(self) -> bool:
        """Trained for ``num_train_epochs`` (not ``max_steps``): the data decides the end."""
        return self.progress is not None

    def data_left(self) -> bool:
        return self.progress.remaining(self.samples_done)


class OdbTrainerMixin:
    """The Trainer methods odb changes; ``super()`` is the trainer's own class (``Trainer``,
    ``SFTTrainer``, a user's subclass), whose behaviour odb wraps."""

    _odb: _Run

    # -- the dataloader ---------------------------------------------------------------------
    def get_train_dataloader(self) -> odb.DataLoader:
        run = self._odb
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        args = self.args
        dataset, collator = self.train_dataset, self.data_collator
        streaming = is_stream(dataset)
        if _is_hf_dataset(dataset) and not streaming:
            dataset = self._remove_unused_columns(dataset, description="training")
        mode = run.options.get("mode")
        if sft.is_vision_collator(collator):
            # Rows processed one at a time by the trainer's own collator: their keys are
            # what the model takes.
            dataset, collate_fn = sft.vision_samples(self, dataset, collator, mode)
        else:
            if collator is default_data_collator or isinstance(collator, DataCollatorWithPadding):
                collator = None  # the Trainer's defaults cannot pad labels: odb's collator
            collate_fn = collator or _default_collator(self, mode or "padded")
            if streaming or (collator is not None and not _is_hf_dataset(dataset)):
                # The Trainer's rule for iterable datasets too: their columns may be unknown
                # before they are read, so the collator drops what the model does not take.
                collate_fn = self._get_collator_with_removed_columns(
                    collate_fn, description="training"
                )
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
        if not streaming:  # a stream is read in its own order, its workers restarted each pass
            options.update(shuffle=True, persistent_workers=args.dataloader_persistent_workers)
        options.update(run.options)
        limit = run.token_budget
        given = isinstance(run.compute, odb.ComputeCost)
        if given or (run.compute and "cost" not in options and _is_qwen_vl(self.model)):
            # compute shapes the batches, token_budget stays the memory cap (docs/planning.md)
            layout = options.get("mode") or collator_layout(collate_fn) or "padded"
            cost = run.compute if given else None
            budget = qwen_vl.compute_budget(self.model, run.token_budget, layout, cost=cost)
            limit = budget.limit
            options.update(cost=budget.cost, mode=layout)
            options.setdefault("max_tokens", budget.caps.max_tokens)
        run.loader = odb.DataLoader(dataset, limit, **options)
        return run.loader

    # -- steps and the LR schedule ----------------------------------------------------------
    def set_initial_training_values(self, args, dataloader):
        """The Trainer's step bookkeeping for a loader whose length is only estimated.

        The epoch loop gets an upper bound of update steps (it ends when odb's epoch ends, see
        ``get_batch_samples``), ``steps_in_epoch`` and the progress bar the estimate.

        A stream trained for ``max_steps`` needs no estimate: as the Trainer does for iterable
        datasets, each pass is bounded by ``max_steps`` only (it ends when the stream does).
        Trained for epochs, a stream needs a known length (the loader's ``num_samples`` or the
        stream's ``len()``; ``epoch_samples`` raises otherwise).
        """
        run = self._odb
        loader = run.loader
        accumulation = args.gradient_accumulation_steps
        total_batch_size = self.get_total_train_batch_size(args)
        run.progress = None  # set below in epochs mode
        run.session = run.interval = None  # this train() call's figures start at its first window
        if loader.streaming and args.max_steps > 0:
            run.epoch_samples = _stream_length(loader)
            steps = args.max_steps
            _announce(self, loader, f"{steps} optimizer steps (max_steps); no estimate")
            trained = steps * total_batch_size  # the Trainer's figure; logs count real samples
            batches = steps * accumulation
            return sys.maxsize, steps, trained, trained, total_batch_size, batches, steps
        samples = loader.epoch_samples()  # all ranks' (per-rank samplers need not cover them)
        run.epoch_samples = samples
        start = time.perf_counter()
        estimate = estimate_steps(loader, probe=run.probe_samples)  # a multiple of accumulation
        seconds = time.perf_counter() - start
        per_epoch = max(1, estimate // accumulation)
        upper = math.ceil(samples / accumulation) + 2  # every batch holds at least one sample
        if args.max_steps > 0:
            max_steps, epochs = args.max_steps, sys.maxsize
            trained = max_steps * total_batch_size
            plan = f"{max_steps} optimizer steps (max_steps)"
        else:
            total = samples * args.num_train_epochs
            max_steps = math.ceil(args.num_train_epochs * per_epoch)
            run.progress = DataProgress(total, max_steps / total if total else 0.0)
            epochs = math.ceil(args.num_train_epochs)
            trained = total
            plan = f"{args.num_train_epochs:g} epoch(s) of {samples} samples"
        _announce(
            self,
            loader,
            f"{plan}; estimated {per_epoch} optimizer steps per epoch "
            f"({samples / per_epoch:.1f} samples each) from {run.probe_samples} probed "
            f"samples in {seconds:.1f} s",
        )
        batches = per_epoch * accumulation
        return epochs, upper, samples, trained, total_batch_size, batches, max_steps

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        run = self._odb
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if run.epochs_mode and isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            # step() runs after the optimizer step, before global_step counts it
            def after_this_step() -> float:
                return run.progress.at(self.state.global_step + 1, run.samples_done)

            scheduler = ProgressSchedule(scheduler, num_training_steps, after_this_step)
            self.lr_scheduler = scheduler
        elif run.epochs_mode and _progress_schedule(scheduler) is None:
            _warn_deepspeed_scheduler(self, num_training_steps)
        return scheduler

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """One accumulation window of odb batches (the loss scaling needs no item count)."""
        run = self._odb
        batches = []
        if not run.epochs_mode or run.data_left():
            for batch in epoch_iterator:
                batches.append(batch)
                if len(batches) == num_batches:
                    break
        if not batches:
            self.control.should_epoch_stop = True
            if run.epochs_mode and not run.data_left():
                _end_training(self)
            return [], None
        run.resumed_pass = False
        infos = [odb.step_info(batch) for batch in batches]
        run.window_tokens = window_label_tokens(infos)
        if run.session is None:  # figures count from the first window, not from set-up
            run.session, run.interval = _Counts(), _Counts()
        run.session.add(infos)
        run.interval.add(infos)
        window_samples = sum(info.global_samples for info in infos)
        schedule = _progress_schedule(self.lr_scheduler)
        if schedule is not None:  # train this window at its middle
            step, done = self.state.global_step + 0.5, run.samples_done + window_samples / 2
            schedule.jump(run.progress.at(step, done))
        run.samples_done += window_samples
        return batches, None

    # -- the loss ---------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        """Remember the micro-batch's step info for ``compute_loss`` (the Trainer copies the
        batch to the device without it)."""
        run = self._odb
        run.micro_batch = find_step_info(inputs)
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            run.micro_batch = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """This micro-batch's share of the exact mean over the window's label tokens
        (``odb.loss.window_loss_share`` of the trainer's own mean loss). Outputs are asked for
        only when the caller asks: TRL's SFTTrainer would recompute the logits its fused LM
        head never builds, in an extra forward pass. Evaluation batches pass through."""
        info = self._odb.micro_batch
        if info is None or not model.training:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        result = super().compute_loss(model, inputs, return_outputs=return_outputs)
        loss, outputs = result if return_outputs else (result, None)
        loss = window_loss_share(loss, info, self._odb.window_tokens)
        return (loss, outputs) if return_outputs else loss

    # -- resume -----------------------------------------------------------------------------
    def _init_training_state(
        self,
        max_steps,
        num_update_steps_per_epoch,
        num_train_epochs,
        resume_from_checkpoint,
        trial,
    ):
        """On resume, restore odb's position instead of replaying batches."""
        run = self._odb
        epochs, steps = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        if resume_from_checkpoint is None:
            return epochs, steps
        name = _STATE_FILE.format(rank=self.args.process_index)
        path = os.path.join(resume_from_checkpoint, name)
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

    # -- logs -------------------------------------------------------------------------------
    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Add odb's figures to the training logs, and make the final metrics count real
        samples (the Trainer's assume ``per_device_train_batch_size`` samples per batch)."""
        run = self._odb
        if run.session is not None and "loss" in logs:
            logs.update(_interval_figures(self, run))
            run.interval = _Counts()
        elif run.session is not None and "train_runtime" in logs:
            session = run.session
            (real,) = _all_ranks(self, session.real_tokens)
            runtime = max(float(logs["train_runtime"]), 1e-9)
            logs["train_samples_per_second"] = round(session.samples / runtime, 3)
            logs["odb_train_samples"] = session.samples
            logs["odb_train_tokens"] = real
            logs["odb_train_tokens_per_second"] = round(real / runtime, 1)
        super().log(logs, start_time)


class OdbTrainer(OdbTrainerMixin, Trainer):
    """A ``transformers.Trainer`` whose training batches come from odb.

    Takes the Trainer's arguments plus ``token_budget``, ``probe_samples`` (how many samples
    the step estimate measures), ``odb_options`` (any ``odb.DataLoader`` option: ``mode``,
    ``window``, ``max_images``, ...) and ``compute`` (see :func:`enable`).
    """

    def __init__(
        self,
        *args: Any,
        token_budget: float,
        odb_options: dict | None = None,
        probe_samples: int = _PROBE_SAMPLES,
        compute: bool | odb.ComputeCost = True,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        options = dict(odb_options or {})
        _attach(self, _new_run(self, token_budget, probe_samples, options, compute))


def enable(
    trainer: Trainer,
    token_budget: float,
    *,
    probe_samples: int = _PROBE_SAMPLES,
    compute: bool | odb.ComputeCost = True,
    **options: Any,
) -> Trainer:
    """Make ``trainer`` (a ``Trainer`` or subclass, e.g. TRL's ``SFTTrainer``) batch its
    training data with odb; returns the same trainer, now an instance of an odb subclass of
    its class. ``options`` are ``odb.DataLoader`` options; ``probe_samples`` is how many
    samples the step estimate measures (in the loader's workers).

    For a Qwen-VL model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) odb balances estimated compute by
    default: batches cost at most the compute of ``qwen_vl.COMPUTE_HEADROOM * token_budget``
    text tokens (``qwen_vl.compute_budget``) and hold at most ``token_budget`` tokens;
    ``compute=False``, or a ``cost`` option, budgets tokens instead. ``compute`` may also be an
    ``odb.ComputeCost`` of the layout, such as the weights ``qwen_vl.measure_cost`` timed on
    this hardware: the same budget, priced with those weights."""
    if not isinstance(trainer, Trainer):
        raise ConfigError(f"enable expects a transformers.Trainer, got {type(trainer).__name__}")
    if getattr(trainer, "_odb", None) is not None:
        raise ConfigError("odb is already enabled on this trainer")
    run = _new_run(trainer, token_budget, probe_samples, options, compute)
    trainer.__class__ = _odb_class(type(trainer))
    _attach(trainer, run)
    return trainer


_ODB_CLASSES: dict[type, type] = {Trainer: OdbTrainer}


def _odb_class(cls: type) -> type:
    """``cls`` with odb's methods in front: ``OdbTrainerMixin`` first in its MRO."""
    if issubclass(cls, OdbTrainerMixin):
        return cls
    if cls not in _ODB_CLASSES:
        _ODB_CLASSES[cls] = type(
            f"Odb{cls.__name__}", (OdbTrainerMixin, cls), {"__module__": cls.__module__}
        )
    return _ODB_CLASSES[cls]


def _new_run(
    trainer: Trainer,
    token_budget: float,
    probe_samples: int,
    options: dict,
    compute: bool | odb.ComputeCost,
) -> _Run:
    """The adapter's state for ``trainer``, once everything it can check before training is
    checked."""
    for reserved in ("shuffle", "sampler", "steps_multiple_of"):
        if reserved in options:
            raise ConfigError(f"{reserved!r} is set by the Trainer adapter, not by options")
    _check_internals(type(trainer))
    sft.check_trainer(trainer)
    odb.Budget(token_budget)  # validate early, before training starts
    if not isinstance(compute, bool | odb.ComputeCost):
        raise ConfigError(f"compute must be True, False or an odb.ComputeCost, got {compute!r}")
    if isinstance(compute, odb.ComputeCost) and "cost" in options:
        raise ConfigError("compute= and the cost option both price batches: give one of them")
    return _Run(token_budget, options, positive_int("probe_samples", probe_samples), compute)


def _attach(trainer: Trainer, run: _Run) -> None:
    trainer._odb = run
    trainer.loss_is_scaled_for_ga = True  # compute_loss already divides by the window
    trainer.callback_handler.callbacks.insert(0, _OdbCallback(trainer))


def _check_internals(cls: type) -> None:
    """Refuse, naming the transformers version, a Trainer without the internals odb uses."""
    for name, wanted in _TRAINER_INTERNALS.items():
        method = getattr(cls, name, None)
        found = () if method is None else tuple(inspect.signature(method).parameters)[1:]
        if found[: len(wanted)] != wanted:
            raise ConfigError(
                f"odb.adapters.hf needs Trainer.{name}({', '.join(wanted)}), which "
                f"{cls.__name__} of transformers {transformers.__version__} does not have; "
                f"odb supports transformers 5.x (tested with 5.24)"
            )


def _default_collator(trainer: Trainer, mode: str):
    if mode == "packed":
        return odb.PackedCollator()
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    pad = getattr(tokenizer, "pad_token_id", None)
    return odb.PaddedCollator(pad_token_id=pad if pad is not None else 0)


def _is_qwen_vl(model: Any) -> bool:
    config = getattr(getattr(model, "module", model), "config", None)
    return getattr(config, "model_type", None) in VL_MODEL_TYPES


def _is_hf_dataset(dataset: Any) -> bool:
    return type(dataset).__module__.startswith("datasets.")


def _stream_length(loader: odb.DataLoader) -> int | None:
    """A stream's samples over all ranks (``num_samples`` or its ``len()``); None if unknown."""
    try:
        return loader.epoch_samples()
    except ConfigError:
        return None


def _progress_schedule(scheduler: Any) -> ProgressSchedule | None:
    """The ``ProgressSchedule`` inside ``scheduler``, also when wrapped: with an optimizer in
    the DeepSpeed config, the engine steps it and the trainer holds accelerate's
    ``DeepSpeedSchedulerWrapper`` around it (its ``scheduler``)."""
    for _ in range(4):
        if scheduler is None or isinstance(scheduler, ProgressSchedule):
            return scheduler
        scheduler = getattr(scheduler, "scheduler", None)
    return None


def _warn_deepspeed_scheduler(trainer: Trainer, steps: int) -> None:
    """A ``scheduler`` in the DeepSpeed config is DeepSpeed's own, stepped by its engine over
    ``total_num_steps`` (the Trainer's estimate in epochs mode): odb cannot make it follow the
    data, so it ends at the estimate rather than with the last sample."""
    config = getattr(trainer.args, "hf_deepspeed_config", None)
    if not trainer.is_deepspeed_enabled or "scheduler" not in getattr(config, "config", {}):
        return
    warnings.warn(
        f"the DeepSpeed config's scheduler steps over the estimated {steps} optimizer steps, "
        "while the number of steps of an odb epoch is only known at its end: the learning "
        "rate will not end with the data (it reaches its end early or late). Remove "
        "'scheduler' from the DeepSpeed config to use the Trainer's lr_scheduler_type, which "
        "odb drives by the data consumed, or train for max_steps",
        stacklevel=2,
    )


def _end_training(trainer: Trainer) -> None:
    """The data of the last epoch is used up: stop as the default flow does at max_steps."""
    state, control, args = trainer.state, trainer.control, trainer.args
    state.max_steps = state.global_step
    control.should_training_stop = True
    if args.save_strategy == SaveStrategy.STEPS:
        control.should_save = True


# -- the start-up line and the logs ---------------------------------------------------------------
def _announce(trainer: Trainer, loader: odb.DataLoader, plan: str) -> None:
    """One line per run on the main process: what odb will do and what the estimate cost.

    Shown through the ``odb`` logger at INFO; when the program configured no logging at all,
    odb gives its logger a plain stderr handler so the line is seen."""
    if not trainer.is_world_process_zero():
        return
    if not logger.handlers and not logging.getLogger().handlers and not logger.level:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    budget = loader.budget
    caps = [f"{name}={value}" for name, value in vars(budget.caps).items() if value is not None]
    cost = type(budget.cost).__name__
    if budget.cost.prices_compute:
        cost = (
            f"{cost}: the limit is the estimated compute of this many text tokens; pass "
            f"compute=False to budget tokens"
        )
    logger.info(
        "odb: %d rank(s), %s mode, token budget %g (%s)%s, gradient accumulation %d; %s",
        trainer.args.world_size,
        loader.mode,
        budget.limit,
        cost,
        f", caps {', '.join(caps)}" if caps else "",
        trainer.args.gradient_accumulation_steps,
        plan,
    )


def _all_ranks(trainer: Trainer, *counts: int) -> list[int]:
    """``counts`` summed over the ranks. ``log`` runs on every rank at the same steps (the
    Trainer gathers the loss there too), so this one small all-reduce is matched."""
    if trainer.args.world_size <= 1:
        return list(counts)
    values = torch.tensor(counts, dtype=torch.float64, device=trainer.args.device)
    return [int(v) for v in trainer.accelerator.reduce(values, reduction="sum").tolist()]


def _interval_figures(trainer: Trainer, run: _Run) -> dict:
    """odb's figures since the previous log: over all ranks, per optimizer step."""
    counts, stats = run.interval, run.loader.stats()
    real, padded = _all_ranks(trainer, counts.real_tokens, counts.padded_tokens)
    steps = max(counts.steps, 1)
    seconds = max(time.perf_counter() - counts.since, 1e-6)
    budget = counts.batches * trainer.args.world_size * run.token_budget
    return {
        "odb_samples_per_step": round(counts.samples / steps, 2),
        "odb_tokens_per_step": round(real / steps, 1),
        "odb_label_tokens_per_step": round(counts.label_tokens / steps, 1),
        "odb_samples_per_second": round(counts.samples / seconds, 3),
        "odb_tokens_per_second": round(real / seconds, 1),
        "odb_padding_efficiency": round(real / padded, 4) if padded else 0.0,
        "odb_fill": round(real / budget, 4) if budget else 0.0,
        "odb_ghost_steps": stats.ghost_steps,
        "odb_shared_groups": stats.shared_groups,
        "odb_stale_groups": stats.stale_groups,
        "odb_over_budget": stats.over_budget_solo + stats.over_budget_truncated,
    }


# -- the training's flow, checkpoints -------------------------------------------------------------
class _OdbCallback(TrainerCallback):
    """The Trainer's flow for a loader whose step count is only estimated, and odb's state in
    every checkpoint.

    - ``state.epoch`` counts epochs by samples consumed (the Trainer divides by the estimated
      steps), so it ends at the epochs asked for;
    - in epochs mode, ``state.max_steps`` (and the progress bar's total) is the predicted step
      count, never below the next step while data remains: the default flow does not stop on
      the estimate, and the end comes from ``get_batch_samples``;
    - a pass restored from a checkpoint saved after its last step yields no batch (whether a
      stream had more is only known by reading it). The Trainer ends the whole training on an
      epoch without a batch; here it goes on with the next pass while training remains.
    """

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    @property
    def run(self) -> _Run:
        return self.trainer._odb

    def on_step_end(self, args, state, control, **kwargs):
        run = self.run
        if run.epoch_samples:
            state.epoch = run.samples_done / run.epoch_samples
            if run.epochs_mode:
                state.epoch = min(state.epoch, args.num_train_epochs)
        if run.epochs_mode:
            state.max_steps = run.progress.total_steps(state.global_step, run.samples_done)
            for callback in self.trainer.callback_handler.callbacks:
                bar = getattr(callback, "training_bar", None)
                if isinstance(callback, ProgressCallback) and bar is not None:
                    bar.total = state.max_steps
                    bar.refresh()
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        run = self.run
        if run.resumed_pass:
            run.resumed_pass = False
            if run.data_left() if run.epochs_mode else state.global_step < state.max_steps:
                control.should_training_stop = False
        return control

    def on_save(self, args, state, control, **kwargs):
        """This rank's odb state, next to the checkpoint the Trainer just wrote. A stream that
        cannot save its position exactly gets the reason written instead and a warning;
        resuming from that checkpoint is then refused, never silently inexact."""
        run = self.run
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        record = {"samples_done": run.samples_done}
        try:
            record["loader"] = _json_state(run.loader)
        except StateError as error:
            record["unsaved"] = str(error)
            warnings.warn(
                f"{folder} cannot resume the training data exactly, so resuming from it will "
                f"be refused: {error}",
                stacklevel=2,
            )
        path = os.path.join(folder, _STATE_FILE.format(rank=args.process_index))
        with open(path, "w") as handle:
            json.dump(record, handle)
        return control


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
