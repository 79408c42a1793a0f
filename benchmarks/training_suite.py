"""Measured training: the same model trains on the same records through each loader, side by
side, on the CPU or on GPUs.

The model (``--model``) is a preset built from its published configuration with random
weights (speed does not depend on trained weights) or the user's checkpoint folder
(:mod:`.train_models`). The data is the user's LLaVA records (``--llava``), a built-in
multimodal set written as real PNG images at its image sizes, or, by default, a small
long-multimodal-like set a tiny model trains an epoch of on CPU in seconds. Records over
``max_length`` tokens are left out (the usual maximum-length filter), as are records that
cannot become a sample (counted by kind). The same records, processor, initial weights and
seed go through every loader; only the loader differs:

- ``standard``: ``torch.utils.data.DataLoader`` with a fixed batch size, the largest whose
  padded tokens fit the budget in 99% of batches of the epoch (``standard-N``: batch size N),
  a ``DistributedSampler`` under several processes, collating with
  ``qwen_vl.collator(model, "padded")``;
- ``odb padded`` / ``odb packed``: ``odb.DataLoader`` under the token budget with
  ``qwen_vl.collator(model, mode)``;
- ``odb neutral``: odb padded with at most Standard's batch size of samples per step, the
  variant that keeps Standard's hyper-parameters;
- ``odb compute padded`` / ``odb compute packed``: the same under the model's own compute
  budget (``qwen_vl.compute_budget``), what the HF adapter uses for Qwen-VL by default;
- ``odb measured padded`` / ``odb measured packed``: the same budget with the weights timed
  on this device at the start of the run (``qwen_vl.measure_cost``, outside the timed steps).

Each run is its own process (:mod:`.training_run`; several under ``torch.distributed.run`` with
``--nproc``), which times every step; this module prepares the data, launches the runs and
summarises them. Throughput counts the steps after the warm-up steps: samples and real tokens
over the time of those steps (every step ends when its slowest rank ends). Model FLOPs count
useful work only (real tokens, causal attention within each sample, the vision tower) with
:func:`odb.adapters.qwen_vl.model_flops`, times 3 for forward and backward; utilisation divides
them by the GPU's dense peak for the dtype when it is known (``--peak-tflops`` otherwise).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from odb.adapters import qwen_vl
from odb.errors import ConfigError

from .llava_input import SYNTHETIC_LONG_MULTIMODAL, write_synthetic_llava
from .multimodal_sets import BUILTIN_SETS
from .policies import epoch_order, standard_batch_size
from .train_models import PRESETS, load_processor_for, model_config, prepare_tokenizer
from .training_run import (
    CHECK,
    COMPUTE_LOADERS,
    LOADERS,
    LR_RULES,
    MEASURED_LOADERS,
    NEUTRAL_LOADER,
    standard_size,
)

__all__ = [
    "ALL_LOADERS",
    "COMPUTE_LOADERS",
    "LOADERS",
    "LR_RULES",
    "NEUTRAL_LOADER",
    "SMALL_SET",
    "TrainingConfig",
    "TrainingResult",
    "TrainingRun",
    "describe",
    "peak_flops",
    "run_training",
]

ALL_LOADERS = (*LOADERS, NEUTRAL_LOADER, *COMPUTE_LOADERS, *MEASURED_LOADERS)
SMALL_SET = "long-multimodal-small"
"""The default data: long-multimodal's shape at a tenth of its text and smaller photos."""

# Dense tensor-core peaks (bf16 / fp16), from NVIDIA's datasheets: matched in the device name.
_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "H20": 148.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "4090": 165.0,
}


def peak_flops(device: str, dtype: str) -> float | None:
    """The dense peak FLOP/s of a GPU named ``device`` in half precision; None when unknown
    (the CPU, float32, an unlisted GPU)."""
    if dtype not in ("bfloat16", "float16"):
        return None
    found = [tflops for name, tflops in _PEAK_TFLOPS.items() if name in device]
    return max(found) * 1e12 if found else None


@dataclass(frozen=True)
class TrainingConfig:
    """One training comparison.

    ``model``: a preset of :data:`~odb.benchmarks.train_models.PRESETS` or a checkpoint folder;
    data: ``llava`` and ``images`` (the user's records), else the built-in set ``data``
    (``samples`` records written with real images); ``min_pixels`` / ``max_pixels``: the
    processor's pixel range (None: the model's default). A token ``budget`` per batch (per
    rank); the default, four times the maximum length, is a common set-up (a per-device batch of
    4 at the maximum length), which lets Standard run batches of several samples.
    ``batch_sizes`` adds Standard runs at those sizes. ``lr_rule`` sets odb's learning rate
    from ``learning_rate`` (Standard's) and its mean samples per step (see ``LR_RULES``).
    ``dtype``: ``auto`` is bfloat16 on a GPU, float32 on the CPU. ``attn``: the language
    model's attention; the default, odb's kernel, runs padded batches as sdpa does and packed
    rows without cross-sample work. ``warmup_steps`` are run and
    not timed; then ``steps`` are timed (None: the rest of the
    epoch). Every loader runs once per seed (initial weights and shuffle) and process count;
    ``heldout`` records are kept out of training and scored after it.
    """

    model: str = "tiny"
    data: str = SMALL_SET
    llava: str | None = None
    images: str | None = None
    samples: int | None = 240
    max_length: int = 2048
    budget: int = 8192
    window: int = 256
    worlds: tuple[int, ...] = (1,)
    loaders: tuple[str, ...] = LOADERS
    batch_sizes: tuple[int, ...] = ()
    num_workers: int = 2
    learning_rate: float = 1e-3
    lr_rule: str = "same"
    min_pixels: int | None = None
    max_pixels: int | None = None
    seeds: tuple[int, ...] = (0,)
    device: str = "auto"
    dtype: str = "auto"
    attn: str = "odb_packed"
    gradient_checkpointing: bool = False
    warmup_steps: int = 1
    steps: int | None = None
    heldout: int = 0
    peak_tflops: float | None = None
    data_seed: int = 0

    def __post_init__(self) -> None:
        if unknown := set(self.loaders) - set(ALL_LOADERS):
            raise ConfigError(f"unknown loader(s) {sorted(unknown)}; choose from {ALL_LOADERS}")
        if self.lr_rule not in LR_RULES:
            raise ConfigError(f"lr_rule must be one of {tuple(LR_RULES)}, got {self.lr_rule!r}")
        if self.budget < self.max_length:
            raise ConfigError(
                f"the token budget ({self.budget}) must hold a record of the maximum length "
                f"({self.max_length})"
            )
        if self.llava is None and self.data not in (SMALL_SET, *BUILTIN_SETS):
            raise ConfigError(
                f"unknown data {self.data!r}; choose from {SMALL_SET}, "
                f"{', '.join(BUILTIN_SETS)} or give llava="
            )
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"device must be auto, cuda or cpu, got {self.device!r}")
        for name in ("warmup_steps", "heldout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")

    @property
    def data_name(self) -> str:
        return Path(self.llava).stem if self.llava else self.data

    @property
    def all_loaders(self) -> tuple[str, ...]:
        return (*self.loaders, *(f"standard-{size}" for size in self.batch_sizes))


@dataclass(frozen=True)
class TrainingRun:
    """One loader's run at one process count and seed.

    Throughput covers the ``timed_steps`` after the warm-up; ``step_p50`` / ``step_p95`` are
    step times, ``wait`` the mean time per step a rank waited for the slowest one (mean over
    ranks and timed steps), ``wait_share`` all ranks' wait over all ranks' step time;
    ``computed_tokens`` / ``real_tokens`` what the timed steps computed (padding included) and
    held; ``model_tflops`` useful model FLOP/s per process, ``mfu`` over the peak (None when
    unknown). ``losses`` and ``samples_seen`` are per step over all ranks (token-mean loss;
    samples so far); ``missing`` / ``repeated`` count samples a whole epoch left out / trained
    twice (None when the run stopped before the end of the epoch). ``cost_weights``: for a
    compute or measured loader, the weights its budget priced batches with (measured: with the
    fit's R^2, each sample's fitted extra cost in tokens, and the seconds the timing took).
    """

    loader: str
    world: int
    seed: int
    device: str
    dtype: str
    batch_size: int | None
    learning_rate: float
    steps: int
    timed_steps: int
    seconds: float
    samples_per_second: float
    real_tokens_per_second: float
    step_p50: float
    step_p95: float
    wait: float
    wait_share: float
    data_share: float
    computed_tokens: int
    real_tokens: int
    peak_memory_mib: float
    model_tflops: float
    mfu: float | None
    heldout_loss: float | None
    heldout_record_loss: float | None
    missing: int | None
    repeated: int | None
    losses: list[float] = field(repr=False)
    samples_seen: list[int] = field(repr=False)
    cost_weights: dict | None = None

    @property
    def padding(self) -> float:
        """Computed tokens per real token, minus one."""
        return self.computed_tokens / self.real_tokens - 1 if self.real_tokens else 0.0

    @property
    def final_loss(self) -> float:
        """Mean loss over the last tenth of the steps (at least one)."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return float(np.mean(tail)) if tail else float("nan")


@dataclass(frozen=True)
class TrainingResult:
    """The settings, the data's shape, every run, and the packed-loss check (when a packed
    loader ran: :func:`~odb.benchmarks.training_run.check_packed_loss`'s record)."""

    config: TrainingConfig
    data: dict
    runs: list[TrainingRun]
    packed_loss: dict | None = None

    def standard(self, run: TrainingRun) -> TrainingRun | None:
        """The headline Standard run at ``run``'s process count and seed."""
        return next(
            (
                r
                for r in self.runs
                if r.loader == "standard" and r.world == run.world and r.seed == run.seed
            ),
            None,
        )

    def speedup(self, run: TrainingRun) -> float | None:
        """``run``'s samples/s over the headline Standard run's, same processes and seed."""
        base = self.standard(run)
        return run.samples_per_second / base.samples_per_second if base else None

    def loss_spread(self, loader: str, world: int, score: str) -> tuple[float, float, float]:
        """Mean, lowest and highest of a run figure ``score`` (``heldout_loss``,
        ``heldout_record_loss`` or ``final_loss``) of ``loader`` over the seeds."""
        values = [getattr(r, score) for r in self.runs if r.loader == loader and r.world == world]
        return float(np.mean(values)), min(values), max(values)


# -- the data ------------------------------------------------------------------------------------
def _records(config: TrainingConfig, folder: Path) -> tuple[Path, Path]:
    """The LLaVA file and image folder to train on: the user's, or a set written to ``folder``."""
    if config.llava is not None:
        return Path(config.llava), Path(config.images) if config.images else Path(".")
    components = (
        SYNTHETIC_LONG_MULTIMODAL
        if config.data == SMALL_SET
        else BUILTIN_SETS[config.data].components
    )
    return write_synthetic_llava(folder, config.samples, config.data_seed, components), folder / (
        "images"
    )


def _prepare(config: TrainingConfig, folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Write the records to train on, the held-out records and the settings into ``folder``;
    the data's shape and each kept record's length, FLOPs and label tokens."""
    source, images = _records(config, folder)
    prepare_tokenizer(config.model, folder)
    processor = load_processor_for(config.model, folder, config.min_pixels, config.max_pixels)
    dataset = qwen_vl.LlavaDataset(source, images, processor)
    if config.llava and config.samples:  # the first records of the user's file
        dataset = dataset.select(range(min(config.samples, len(dataset))))
    sizes, failures = dataset.estimate_checked()
    keep = [i for i, s in enumerate(sizes) if s is not None and s.length <= config.max_length]
    if len(keep) <= config.heldout:
        raise ConfigError(
            f"{len(keep)} record(s) are valid and within {config.max_length} tokens; the "
            f"training benchmark needs more than the {config.heldout} held out"
        )
    trained, held = keep[: len(keep) - config.heldout], keep[len(keep) - config.heldout :]
    (folder / "train.json").write_text(json.dumps([dataset.records[i] for i in trained]))
    if held:
        (folder / "heldout.json").write_text(json.dumps([dataset.records[i] for i in held]))
    kept = [sizes[i] for i in trained]
    lengths = np.array([s.length for s in kept], dtype=np.int64)
    patches = np.array([s.vision_patches for s in kept], dtype=np.int64)
    pairs = np.array([s.vision_pairs for s in kept], dtype=np.int64)
    model = model_config(config.model, processor)
    work = qwen_vl.compute_cost(model, "packed").sample_cost(lengths, patches, pairs)
    flops = 3.0 * qwen_vl.model_flops(model).token * work
    order = epoch_order(len(lengths), config.data_seed)
    batch_size = standard_batch_size(lengths, config.budget, order)
    settings = {
        **asdict(config),
        "batch_size": batch_size,
        "images": os.fspath(images),
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    invalid: dict[str, int] = {}
    for error in failures:
        invalid[type(error).__name__] = invalid.get(type(error).__name__, 0) + 1
    images_per = np.array([s.images for s in kept])
    data = {
        "name": config.data_name,
        "samples": len(trained),
        "heldout": len(held),
        "filtered": sum(s is not None and s.length > config.max_length for s in sizes),
        "invalid": invalid,
        "mean_length": float(lengths.mean()),
        "length_cv": float(lengths.std() / lengths.mean()),
        "images_per_sample": float(images_per.mean()),
        "with_images": float(np.mean(images_per > 0)),
        "standard_batch_size": batch_size,
    }
    labels = np.array([s.label_tokens for s in kept], dtype=np.int64)
    return data, {"lengths": lengths, "flops": flops, "labels": labels}


# -- the runs ----------------------------------------------------------------------------------
def _launch(folder: Path, loader: str, world: int, seed: int) -> list[dict]:
    """One run in fresh processes (under torchrun when ``world > 1``); each rank's record."""
    out = folder / f"{loader}-{world}-{seed}"
    module = [sys.executable, "-m", "odb.benchmarks.training_run"]
    command = [*module, str(folder), loader, str(seed), str(out)]
    if world > 1:
        runner = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*runner, f"--nproc_per_node={world}", *command[1:]]
    # Half the cores go to the loader workers, the rest are split over the ranks: more
    # threads than cores made the 1-process epoch times swing 3-15x under load from others.
    threads = str(max(1, (os.cpu_count() or 1) // (2 * world)))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(world)]


def _summarise(
    config: TrainingConfig,
    loader: str,
    world: int,
    seed: int,
    ranks: list[dict],
    sizes: dict[str, np.ndarray],
    batch_size: int,
) -> TrainingRun:
    """One run's figures from its ranks' records."""
    steps = [rank["steps"] for rank in ranks]
    count = len(steps[0])
    if any(len(s) != count for s in steps):
        raise RuntimeError(f"{loader}: the ranks ran different numbers of steps")
    if len({rank["weights"] for rank in ranks}) > 1:  # the gradients were not averaged alike
        raise RuntimeError(f"{loader}: the ranks ended with different weights")
    parts = ("data", "busy", "wait", "update")
    # [rank, step] seconds of each part; a step lasts as long as its slowest rank.
    seconds = {p: np.array([[step[p] for step in s] for s in steps]) for p in parts}
    step_time = sum(seconds.values())
    timed = slice(min(config.warmup_steps, count - 1), count)
    wall = step_time[:, timed].max(axis=0)
    indices = [[np.array(step["indices"], dtype=np.int64) for step in s] for s in steps]
    timed_samples = np.concatenate([i for s in indices for i in s[timed]] or [np.zeros(0, int)])
    seen = np.concatenate([i for s in indices for i in s] or [np.zeros(0, int)])
    total = float(wall.sum())
    device, dtype = ranks[0]["device"], ranks[0]["dtype"]
    flops = float(sizes["flops"][timed_samples].sum()) / total / world
    peak = config.peak_tflops * 1e12 if config.peak_tflops else peak_flops(device, dtype)
    counts = np.bincount(seen, minlength=len(sizes["lengths"]))
    whole_epoch = config.steps is None
    per_step = np.array([sum(len(s[k]) for s in indices) for k in range(count)])
    step_total = float(step_time[:, timed].sum())
    return TrainingRun(
        loader=loader.replace("-", " "),
        world=world,
        seed=seed,
        device=device,
        dtype=dtype,
        batch_size=standard_size(loader, {"batch_size": batch_size}),
        learning_rate=ranks[0]["learning_rate"],
        steps=count,
        timed_steps=len(wall),
        seconds=total,
        samples_per_second=len(timed_samples) / total,
        real_tokens_per_second=float(sizes["lengths"][timed_samples].sum()) / total,
        step_p50=float(np.percentile(wall, 50)),
        step_p95=float(np.percentile(wall, 95)),
        wait=float(seconds["wait"][:, timed].mean()),
        wait_share=float(seconds["wait"][:, timed].sum()) / step_total,
        data_share=float(seconds["data"][:, timed].sum()) / step_total,
        computed_tokens=sum(step["computed"] for s in steps for step in s[timed]),
        real_tokens=int(sizes["lengths"][timed_samples].sum()),
        peak_memory_mib=max(rank["peak_memory_mib"] for rank in ranks),
        model_tflops=flops / 1e12,
        mfu=flops / peak if peak else None,
        heldout_loss=ranks[0]["heldout_loss"],
        heldout_record_loss=ranks[0]["heldout_record_loss"],
        missing=int(np.count_nonzero(counts == 0)) if whole_epoch else None,
        repeated=int((counts[counts > 1] - 1).sum()) if whole_epoch else None,
        losses=[step["loss"] for step in steps[0]],
        samples_seen=np.cumsum(per_step).tolist(),
        cost_weights=ranks[0].get("cost_weights"),
    )


def run_training(
    config: TrainingConfig,
    folder: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> TrainingResult:
    """Every loader of ``config`` at every process count and seed; the data is written to
    ``folder`` (a temporary folder by default)."""
    if config.model not in PRESETS and not Path(config.model).is_dir():
        raise ConfigError(f"model {config.model!r} is neither a preset nor a checkpoint folder")
    with tempfile.TemporaryDirectory(prefix="odb-train-") as scratch:
        folder = folder or Path(scratch)
        data, sizes = _prepare(config, folder)
        packed_loss = None
        if any(loader.endswith("-packed") for loader in config.loaders):
            packed_loss = _launch(folder, CHECK, 1, 0)[0]
            if progress:
                progress("training: packed row against padded batch")
        runs = []
        for world in config.worlds:
            for seed in config.seeds:
                for loader in config.all_loaders:
                    ranks = _launch(folder, loader, world, seed)
                    runs.append(
                        _summarise(
                            config, loader, world, seed, ranks, sizes, data["standard_batch_size"]
                        )
                    )
                    if progress:
                        progress(f"training: {loader}, {world} process(es), seed {seed}")
    return TrainingResult(config, data, runs, packed_loss)


def describe(config: TrainingConfig, dtype: str | None = None) -> str:
    """What ran, in one line (the report's and the summary's header); ``dtype``: the one the
    runs resolved ``auto`` to."""
    return (
        f"{config.model} on {config.data_name}, {dtype or config.dtype}, {config.attn} attention"
        f"{', gradient checkpointing' if config.gradient_checkpointing else ''}, token budget "
        f"{config.budget} per rank"
    )
