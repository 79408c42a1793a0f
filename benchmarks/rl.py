"""GRPO training forwards, stock TRL vs odb: padded tokens per optimizer step, peak per forward.

Rollout lengths are synthetic (lognormal completions with CV >= 1, as RL rollouts are: most
short, a few running to ``max_completion_length``). No model runs: the stock side is TRL's
layout arithmetic, the odb side the very planning code ``odb.adapters.trl`` runs in the
trainer (each rank's sorted sizes, the envelope across ranks, every rank's own passes).

Stock ``GRPOTrainer``: a rank's generation batch is padded to its longest prompt plus its
longest completion, then cut into ``gradient_accumulation_steps`` equal chunks of
``per_device_train_batch_size`` rows; every forward (loss, and old/ref scoring) holds
``rows * (max prompt + max completion)`` tokens.

Run ``python -m odb.benchmarks.rl --out rl-out`` for ``rl.png``, ``rl.md`` and ``rl.json``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from odb.adapters.trl import RowSizes, encode_rows, envelope_groups, own_groups, sorted_segments
from odb.cost import Budget

from .lengths import lognormal_lengths

__all__ = ["RLConfig", "RLResult", "main", "markdown", "plot", "run_rl"]


@dataclass(frozen=True)
class RLConfig:
    """A GRPO set-up: TRL's batch settings, the rollout length model and odb's budget."""

    cvs: tuple[float, ...] = (1.0, 1.5, 2.0)
    steps: int = 50
    world_size: int = 2
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 4  # = steps_per_generation, TRL's default
    num_generations: int = 8
    prompt_mean: float = 400.0
    prompt_cv: float = 0.3
    completion_mean: float = 1000.0
    max_completion_length: int = 8192
    token_budget: int = 16384
    seed: int = 0


@dataclass(frozen=True)
class RLResult:
    """Per rank and optimizer step (means over steps and ranks; peaks are maxima)."""

    cv: float
    clipped: float  # fraction of completions cut at max_completion_length
    real_tokens: float
    stock_tokens: float
    odb_tokens: float
    stock_peak: int
    odb_peak: int
    stock_passes: int
    odb_passes: float
    odb_max_passes: int


def _rollouts(config: RLConfig, cv: float, step: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prompt lengths, completion lengths) of each rank's generation batch for one step.

    Each prompt is repeated ``num_generations`` times, consecutive rows, as TRL's sampler
    does; the global batch is split into contiguous per-rank parts."""
    rows = config.per_device_train_batch_size * config.gradient_accumulation_steps
    total = rows * config.world_size
    seed = [config.seed, int(cv * 1000), step]
    prompts = lognormal_lengths(
        config.prompt_mean, config.prompt_cv, -(-total // config.num_generations), seed[0] + step
    )
    prompts = np.repeat(prompts, config.num_generations)[:total]
    completions = lognormal_lengths(
        config.completion_mean, cv, total, int(np.random.default_rng(seed).integers(2**31))
    )
    completions = np.minimum(completions, config.max_completion_length)
    return [
        (prompts[r * rows : (r + 1) * rows], completions[r * rows : (r + 1) * rows])
        for r in range(config.world_size)
    ]


def _odb_step(config: RLConfig, ranks) -> list[list[int]]:
    """Tokens of each pass on each rank: the trainer's planning on these sizes."""
    budget = Budget(config.token_budget)
    calls = config.gradient_accumulation_steps
    capacity = config.per_device_train_batch_size * calls
    sizes = [RowSizes.text(prompts + completions) for prompts, completions in ranks]
    ordered = [sorted_segments(s, [np.arange(len(s))]) for s in sizes]
    table = np.stack([encode_rows(s, o, capacity) for s, o in zip(sizes, ordered, strict=True)])
    passes = envelope_groups(table, capacity, budget, calls)
    return [
        [
            len(rows) * int(s.lengths[rows].max())
            for _, rows, _ in own_groups(s, o, passes, capacity)
        ]
        for s, o in zip(sizes, ordered, strict=True)
    ]


def run_rl(config: RLConfig) -> list[RLResult]:
    """One result per completion-length CV, over ``config.steps`` optimizer steps."""
    b = config.per_device_train_batch_size
    results = []
    for cv in config.cvs:
        real, stock, odb, passes = [], [], [], []
        stock_peak = odb_peak = clipped = 0
        for step in range(config.steps):
            ranks = _rollouts(config, cv, step)
            for prompts, completions in ranks:
                width = int(prompts.max() + completions.max())
                real.append(int(prompts.sum() + completions.sum()))
                stock.append(len(prompts) * width)
                stock_peak = max(stock_peak, b * width)
                clipped += int((completions >= config.max_completion_length).sum())
            for tokens in _odb_step(config, ranks):
                odb.append(sum(tokens))
                odb_peak = max(odb_peak, max(tokens))
                passes.append(len(tokens))
        rows = config.steps * config.world_size * b * config.gradient_accumulation_steps
        results.append(
            RLResult(
                cv=cv,
                clipped=clipped / rows,
                real_tokens=float(np.mean(real)),
                stock_tokens=float(np.mean(stock)),
                odb_tokens=float(np.mean(odb)),
                stock_peak=stock_peak,
                odb_peak=odb_peak,
                stock_passes=config.gradient_accumulation_steps,
                odb_passes=float(np.mean(passes)),
                odb_max_passes=int(max(passes)),
            )
        )
    return results


def markdown(config: RLConfig, results: Sequence[RLResult]) -> str:
    """A Markdown table of the results, with the set-up it came from."""
    lines = [
        f"GRPO rollouts: {config.world_size} ranks x {config.per_device_train_batch_size} rows "
        f"x {config.gradient_accumulation_steps} accumulation steps, prompts ~"
        f"{config.prompt_mean:g} tokens, completions lognormal with mean "
        f"{config.completion_mean:g} capped at {config.max_completion_length}; odb budget "
        f"{config.token_budget} tokens per forward; {config.steps} optimizer steps.",
        "",
        "| completion CV | clipped | real tokens / step | stock padded / step | odb padded / step "
        "| stock peak / forward | odb peak / forward | stock passes | odb passes (max) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.cv:g} | {r.clipped:.1%} | {r.real_tokens:,.0f} | {r.stock_tokens:,.0f} "
            f"({r.real_tokens / r.stock_tokens:.0%} real) | {r.odb_tokens:,.0f} "
            f"({r.real_tokens / r.odb_tokens:.0%} real) | {r.stock_peak:,} | {r.odb_peak:,} "
            f"| {r.stock_passes} | {r.odb_passes:.1f} ({r.odb_max_passes}) |"
        )
    return "\n".join(lines) + "\n"


def plot(config: RLConfig, results: Sequence[RLResult], path: Path) -> Path:
    """Two panels side by side: padded tokens per optimizer step, peak tokens per forward."""
    x = np.arange(len(results))
    width = 0.38
    labels = [f"CV {r.cv:g}" for r in results]
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.bar(x - width / 2, [r.stock_tokens for r in results], width, label="stock TRL")
    left.bar(x + width / 2, [r.odb_tokens for r in results], width, label="odb")
    left.scatter(
        x, [r.real_tokens for r in results], marker="_", s=900, color="black", label="real tokens"
    )
    left.set_title("padded tokens per optimizer step (per rank)")
    right.bar(x - width / 2, [r.stock_peak for r in results], width, label="stock TRL")
    right.bar(x + width / 2, [r.odb_peak for r in results], width, label="odb")
    right.axhline(config.token_budget, color="black", linestyle="--", label="odb token budget")
    right.set_title("peak tokens per forward")
    for ax in (left, right):
        ax.set_xticks(x, labels)
        ax.set_xlabel("completion length CV (lognormal)")
        ax.grid(axis="y", alpha=0.3)
    handles, names = left.get_legend_handles_labels()
    extra, extra_names = right.get_legend_handles_labels()
    handles += [h for h, n in zip(extra, extra_names, strict=True) if n not in names]
    names += [n for n in extra_names if n not in names]
    fig.legend(handles, names, loc="outside lower center", ncols=len(names))
    FigureCanvasAgg(fig).print_png(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m odb.benchmarks.rl",
        description="GRPO forwards, stock TRL vs odb, on skewed rollout lengths; writes "
        "rl.png, rl.md and rl.json.",
    )
    defaults = RLConfig()
    parser.add_argument("--out", type=Path, default=Path("rl-out"), help="output folder")
    parser.add_argument("--budget", type=int, default=defaults.token_budget)
    parser.add_argument("--cv", type=float, action="append", help="completion CV; repeatable")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--world-size", type=int, default=defaults.world_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--quick", action="store_true", help="3 steps, for tests")
    args = parser.parse_args(argv)
    config = RLConfig(
        cvs=tuple(args.cv) if args.cv else defaults.cvs,
        steps=3 if args.quick else args.steps,
        world_size=args.world_size,
        token_budget=args.budget,
        seed=args.seed,
    )
    results = run_rl(config)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(config, results)
    (args.out / "rl.md").write_text(table)
    record = {"config": asdict(config), "results": [asdict(r) for r in results]}
    (args.out / "rl.json").write_text(json.dumps(record, indent=2))
    plot(config, results, args.out / "rl.png")
    print(table)
    print(f"wrote {args.out / 'rl.png'}, {args.out / 'rl.md'}, {args.out / 'rl.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
