"""The multimodal suite: every policy on the built-in multimodal sets at several world sizes,
with each DDP step timed by the GPU cost model.

The batches are the policies' own (odb's from its round and alignment code on simulated
ranks); only the time of a step is modelled (:mod:`.gpu_model`), since no GPU runs here.
Speedups compare estimated samples per second on the same samples: against the fixed batch
size, and against the offline oracles of the same mode (padded policies against the padded
oracles, packed against packed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from odb.adapters.qwen_vl import compute_budget
from odb.cost import Budget, PackedCost, PaddedCost

from .gpu_model import H100, MODELS, BatchShape, StepCostModel, computed_tokens
from .metrics import measure
from .multimodal_sets import BUILTIN_SETS, MultimodalSet, builtin_sets
from .policies import (
    BMT_BUCKET,
    STANDARD,
    PolicyRun,
    epoch_order,
    oracle_batches,
    sorted_batches,
    standard_batch_size,
    standard_batches,
)
from .ranks import RankedRun, odb_ranked, round_robin

__all__ = [
    "POLICIES",
    "Estimate",
    "MultimodalConfig",
    "MultimodalResult",
    "RunResult",
    "batch_shapes",
    "compare_sets",
    "estimate_run",
    "placeholder_ranks",
    "run_multimodal",
    "with_placeholders",
]

POLICIES = (
    "standard",
    "sorted",
    "gmt-padded",
    "bmt-padded",
    "gmt-packed",
    "bmt-packed",
    "odb-padded",
    "odb-packed",
    "odb-compute-padded",
    "odb-compute-packed",
)
"""Policy keys (``--policy``); tables show them with a space for the dash. The ``odb compute``
policies plan with each model's own compute cost (``qwen_vl.compute_budget``), so they run
once per model and carry that model's estimate only."""


@dataclass(frozen=True)
class MultimodalConfig:
    """What the suite runs: ``samples`` of each of ``sets``, under a token ``budget``, for
    each of ``worlds``, timed for each of ``models`` on an H100. ``batch_sizes`` adds
    fixed-size policies besides the headline standard size."""

    sets: tuple[str, ...] = tuple(BUILTIN_SETS)
    samples: int = 80_000
    budget: int = 16_384
    window: int = 1024
    worlds: tuple[int, ...] = (1, 8, 16)
    models: tuple[str, ...] = ("Qwen3-VL-8B", "Qwen3-VL-2B")
    policies: tuple[str, ...] = POLICIES
    batch_sizes: tuple[int, ...] = ()
    seed: int = 0


@dataclass(frozen=True)
class Estimate:
    """One run under one model's cost model.

    ``balance``: the ranks' compute time over ``world x`` the slowest rank's, summed over
    steps (1 when every rank works as long as the slowest). ``speedup[b]``: samples per second
    over baseline ``b``'s in the same set and world (None when ``b`` did not run).
    ``placeholder_cost``: how much longer the epoch takes when every rank without an image at
    a step where another rank has one runs odb's placeholder image (see
    :func:`with_placeholders`; its FLOPs, plus :data:`PLACEHOLDER_LATENCY`), as FSDP and
    ZeRO-3 need.
    """

    model: str
    balance: float
    step_seconds: float
    epoch_seconds: float
    samples_per_second: float
    speedup: dict[str, float | None] = field(default_factory=dict)
    placeholder_cost: float = 0.0


@dataclass(frozen=True)
class RunResult:
    """One policy on one set at one world size.

    ``padding_ratio``: padding over computed tokens; ``real_tokens_per_step``: over all ranks;
    ``peak_tokens``: the most tokens one rank's batch computes; ``idle_share``: rank-steps
    without a batch of the epoch (odb's ghost steps, the offline policies' idle last step).
    ``mixed_steps``: steps where some rank's batch holds an image and another rank's batch
    holds none (under FSDP or ZeRO-3 these hang unless the rank without one runs the vision
    tower anyway); ``placeholders``: the rank-steps that then take odb's placeholder image.
    """

    set: str
    world: int
    policy: str
    packed: bool
    steps: int
    padding_ratio: float
    real_tokens_per_step: float
    peak_tokens: int
    idle_share: float
    estimates: list[Estimate]
    mixed_steps: float = 0.0
    placeholders: float = 0.0


@dataclass(frozen=True)
class MultimodalResult:
    """The settings, each set's description and shape, and every run."""

    config: MultimodalConfig
    sets: list[dict]
    runs: list[RunResult]


def batch_shapes(run: RankedRun, data: MultimodalSet) -> BatchShape:
    """What each rank's batch holds at each step, as ``[steps, world]`` arrays."""
    batches = [batch for step in run.steps for batch in step]
    counts = np.array([len(batch) for batch in batches], dtype=np.int64)
    filled = counts > 0
    flat = np.concatenate(batches).astype(np.int64)
    starts = (np.cumsum(counts) - counts)[filled]
    lengths = data.lengths.astype(np.int64)

    def per_batch(reduce: np.ufunc, column: np.ndarray) -> np.ndarray:
        out = np.zeros(len(batches), dtype=np.int64)
        if len(starts):
            out[filled] = reduce.reduceat(column[flat], starts)
        return out.reshape(len(run.steps), run.world)

    return BatchShape(
        samples=counts.reshape(len(run.steps), run.world),
        longest=per_batch(np.maximum, lengths),
        tokens=per_batch(np.add, lengths),
        square_tokens=per_batch(np.add, lengths * lengths),
        patches=per_batch(np.add, data.patches),
        image_pairs=per_batch(np.add, data.vision_pairs),
    )


def placeholder_ranks(shape: BatchShape) -> np.ndarray:
    """``[steps, world]``: the ranks whose batch holds samples but no image at a step where
    another rank's batch holds one (they run the placeholder image)."""
    has_images = shape.patches > 0
    return (shape.samples > 0) & ~has_images & has_images.any(axis=1, keepdims=True)


def with_placeholders(shape: BatchShape, packed: bool, merge: int = 2) -> BatchShape:
    """``shape`` with odb's placeholder image added where :func:`placeholder_ranks` says: one
    ``merge x merge`` grid of patches and its one token, as one more sequence of a packed row,
    or after a padded batch's last real token (a wider batch only when it holds one sample:
    the last row is its shortest)."""
    added = placeholder_ranks(shape).astype(np.int64)
    patches = merge * merge
    return BatchShape(
        samples=shape.samples,
        longest=shape.longest if packed else shape.longest + added * (shape.samples == 1),
        tokens=shape.tokens + added,
        square_tokens=shape.square_tokens + added,
        patches=shape.patches + patches * added,
        image_pairs=shape.image_pairs + patches * patches * added,
    )


PLACEHOLDER_LATENCY = 0.005
"""Seconds the vision tower's forward and backward over the placeholder's 4 patches take on a
GPU, an assumption: the pass is launch-bound (Qwen3-VL-8B: 27 blocks of about 20 kernels
forward and backward at ~10 us each), which the FLOP-based step model does not see."""


def _epoch_seconds(
    run: RankedRun, shape: BatchShape, model: StepCostModel, extra: np.ndarray | float = 0.0
) -> tuple[np.ndarray, float]:
    """Each step's compute per rank (plus ``extra`` seconds), and the epoch's time (overhead
    plus slowest ranks)."""
    compute = model.compute_seconds(shape, run.packed) + extra
    return compute, float((model.overhead + compute.max(axis=1)).sum())


def estimate_run(run: RankedRun, shape: BatchShape, model: StepCostModel, samples: int) -> Estimate:
    """``run``'s time under ``model``: each step costs the overhead plus its slowest rank."""
    compute, epoch = _epoch_seconds(run, shape, model)
    busy = float(compute.max(axis=1).sum()) * run.world
    latency = PLACEHOLDER_LATENCY * placeholder_ranks(shape)
    _, aligned = _epoch_seconds(run, with_placeholders(shape, run.packed), model, latency)
    return Estimate(
        model=model.model.name,
        balance=float(compute.sum()) / busy if busy else 1.0,
        step_seconds=epoch / len(run.steps),
        epoch_seconds=epoch,
        samples_per_second=samples / epoch,
        placeholder_cost=aligned / epoch - 1.0,
    )


def _offline(data: MultimodalSet, config: MultimodalConfig, batch_size: int) -> Iterator[PolicyRun]:
    """The offline policies' epochs (one process; dealt to ranks later)."""
    lengths, budget, seed, wanted = data.lengths, config.budget, config.seed, config.policies
    if STANDARD in wanted:
        yield standard_batches(lengths, budget, seed, batch_size)
    for size in config.batch_sizes:
        yield replace(standard_batches(lengths, budget, seed, size), name=f"{STANDARD} bs={size}")
    if "sorted" in wanted:
        yield sorted_batches(lengths, budget)
    for mode in ("padded", "packed"):
        for kind, bucket in (("gmt", None), ("bmt", BMT_BUCKET)):
            if f"{kind}-{mode}" in wanted:
                yield oracle_batches(lengths, budget, seed, mode == "packed", bucket)


def _speedups(results: list[RunResult]) -> list[RunResult]:
    """Fill each estimate's speedups from the other runs of the same set and world."""
    rate = {(r.policy, e.model): e.samples_per_second for r in results for e in r.estimates}
    done = []
    for r in results:
        mode = "packed" if r.packed else "padded"
        bases = {"standard": STANDARD, "gmt": f"gmt {mode}", "bmt": f"bmt {mode}"}
        oracles = [f"{kind} {m}" for kind in ("gmt", "bmt") for m in ("padded", "packed")]
        estimates = []
        for e in r.estimates:
            speedup = {}
            for key, policy in bases.items():
                base = rate.get((policy, e.model))
                speedup[key] = e.samples_per_second / base if base else None
            best = max((rate.get((o, e.model)) or 0.0 for o in oracles), default=0.0)
            speedup["best oracle"] = e.samples_per_second / best if best else None
            estimates.append(replace(e, speedup=speedup))
        done.append(replace(r, estimates=estimates))
    return done


def _measure(
    run: RankedRun, data: MultimodalSet, config: MultimodalConfig, models: list[StepCostModel]
) -> RunResult:
    """A run's batching figures (after checking it holds every sample once) and estimates."""
    metrics = measure(run.flat(), data.lengths, config.budget)
    shape = batch_shapes(run, data)
    placing = placeholder_ranks(shape)
    return RunResult(
        set=data.name,
        world=run.world,
        policy=run.name,
        packed=run.packed,
        steps=len(run.steps),
        padding_ratio=1.0 - metrics.padding_efficiency,
        real_tokens_per_step=metrics.real_tokens / len(run.steps),
        peak_tokens=int(computed_tokens(shape, run.packed).max()),
        idle_share=float(np.mean(shape.samples == 0)),
        estimates=[estimate_run(run, shape, model, len(data)) for model in models],
        mixed_steps=float(np.mean(placing.any(axis=1))),
        placeholders=float(np.mean(placing)),
    )


def run_multimodal(
    config: MultimodalConfig, progress: Callable[[str], None] | None = None
) -> MultimodalResult:
    """Every policy on every built-in set of ``config`` at every world size; ``progress`` is
    called after each set's offline policies and after each world size."""
    data = builtin_sets(config.sets, config.samples, config.budget, config.seed)
    return compare_sets(data, config, progress)


def compare_sets(
    data_sets: Sequence[MultimodalSet],
    config: MultimodalConfig,
    progress: Callable[[str], None] | None = None,
) -> MultimodalResult:
    """Every policy on the given sets (built-in or measured from a user's data) at every world
    size of ``config``; its ``sets`` and ``samples`` are not used."""
    models = [StepCostModel(MODELS[name], H100) for name in config.models]
    sets, runs = [], []
    for data in data_sets:
        order = epoch_order(len(data), config.seed)
        batch_size = standard_batch_size(data.lengths, config.budget, order)
        sets.append(
            {
                "name": data.name,
                "description": data.description,
                "standard_batch_size": batch_size,
                **data.summary(),
            }
        )
        offline = list(_offline(data, config, batch_size))
        if progress:
            progress(f"{data.name}: offline policies")
        sizes = data.sizes()
        for world in config.worlds:
            ranked = [round_robin(run, world) for run in offline]
            for mode, cost in (("padded", PaddedCost()), ("packed", PackedCost())):
                if f"odb-{mode}" in config.policies:
                    budget = Budget(config.budget, cost)
                    ranked.append(odb_ranked(sizes, budget, config.seed, world, config.window))
            measured = [_measure(run, data, config, models) for run in ranked]
            for model in models:  # planned with the model's compute cost, scored by gpu_model
                for mode in ("padded", "packed"):
                    if f"odb-compute-{mode}" in config.policies:
                        # gpu_model times packed rows per sample: a varlen kernel's price
                        budget = compute_budget(
                            model.model.config(), config.budget, mode, attention="odb_packed"
                        )
                        run = odb_ranked(sizes, budget, config.seed, world, config.window)
                        measured.append(_measure(run, data, config, [model]))
            runs += _speedups(measured)
            if progress:
                progress(f"{data.name}: {world} ranks")
    return MultimodalResult(config, sets, runs)
