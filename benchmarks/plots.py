"""PNG figures of the planner and multimodal suites.

Figures are drawn on matplotlib's Agg canvas directly, not through pyplot, so a benchmark run
needs no display and leaves the caller's global matplotlib backend alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .multimodal_suite import Estimate, MultimodalResult
from .planner_suite import SetResult
from .policies import STANDARD
from .training_suite import TrainingResult

__all__ = [
    "plot_batch_sizes",
    "plot_efficiency",
    "plot_multimodal_speedup",
    "plot_multimodal_throughput",
    "plot_training_loss",
    "write_multimodal_plots",
    "write_plots",
    "write_training_plots",
]


def plot_efficiency(results: list[SetResult], path: Path) -> Path:
    """Grouped bars per length set: padding efficiency, budget fill and steps of each policy."""
    policies = [m.policy for m in results[0].metrics]
    panels = [
        ("padding_efficiency", "padding efficiency", (0, 1.05)),
        ("fill", "fill of the token budget", (0, 1.05)),
        ("steps", "steps per epoch", None),
    ]
    x = np.arange(len(results))
    width = 0.8 / len(policies)
    fig = Figure(figsize=(5 * len(panels), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels))
    for ax, (key, title, ylim) in zip(axes, panels, strict=True):
        for k, policy in enumerate(policies):
            values = [getattr(r.metrics[k], key) for r in results]
            ax.bar(x + (k - (len(policies) - 1) / 2) * width, values, width, label=policy)
        ax.set_xticks(x, [r.name for r in results], rotation=15)
        ax.set_title(title)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(policies))
    FigureCanvasAgg(fig).print_png(path)
    return path


def plot_batch_sizes(results: list[SetResult], path: Path) -> Path:
    """Histogram of samples per batch, one panel per length set, one line per policy."""
    fig = Figure(figsize=(4 * len(results), 4), layout="constrained")
    axes = fig.subplots(1, len(results), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        largest = max(int(sizes.max(initial=1)) for sizes in result.batch_sizes.values())
        bins = np.arange(0.5, largest + 1.5)
        for policy, sizes in result.batch_sizes.items():
            ax.hist(sizes, bins=bins, histtype="step", linewidth=1.5, label=policy)
        ax.set_title(result.name)
        ax.set_xlabel("samples per batch")
        ax.set_xscale("log" if largest > 64 else "linear")
        ax.set_yscale("log")  # fixed-size batching puts every batch in one bin
    axes[0][0].set_ylabel("batches")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(handles))
    FigureCanvasAgg(fig).print_png(path)
    return path


def write_plots(results: list[SetResult], out: Path) -> list[Path]:
    """Every planner figure into ``out``; the paths written."""
    return [
        plot_efficiency(results, out / "planner_efficiency.png"),
        plot_batch_sizes(results, out / "planner_batch_sizes.png"),
    ]


def _world_bars(
    ax: Axes,
    result: MultimodalResult,
    name: str,
    model: str,
    value: Callable[[Estimate], float | None],
) -> None:
    """Grouped bars of one set: x = world size, one bar per policy, height ``value(run,
    estimate)``."""
    worlds = result.config.worlds
    runs = [r for r in result.runs if r.set == name]
    policies = list(dict.fromkeys(r.policy for r in runs))
    width = 0.8 / len(policies)
    x = np.arange(len(worlds))
    for k, policy in enumerate(policies):
        heights = []
        for world in worlds:
            # an odb compute policy runs once per model, each run with its model's estimate
            estimates = [
                e
                for r in runs
                if r.policy == policy and r.world == world
                for e in r.estimates
                if e.model == model
            ]
            heights.append(value(estimates[0]) or 0.0)
        ax.bar(x + (k - (len(policies) - 1) / 2) * width, heights, width, label=policy)
    ax.set_xticks(x, [f"{w} rank{'s' * (w > 1)}" for w in worlds])
    ax.set_title(name)
    ax.grid(axis="y", alpha=0.3)


def plot_multimodal_throughput(result: MultimodalResult, path: Path) -> Path:
    """Estimated samples/s per policy and world size: one row of panels (sets) per model."""
    names = [s["name"] for s in result.sets]
    models = result.config.models
    fig = Figure(figsize=(4.5 * len(names), 3.8 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), len(names), squeeze=False)
    for row, model in zip(axes, models, strict=True):
        for ax, name in zip(row, names, strict=True):
            _world_bars(ax, result, name, model, lambda e: e.samples_per_second)
            ax.set_yscale("log")  # 16 ranks run about 16 times as many samples as 1
        row[0].set_ylabel(f"{model}: estimated samples/s")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(handles))
    FigureCanvasAgg(fig).print_png(path)
    return path


def plot_multimodal_speedup(result: MultimodalResult, path: Path) -> Path:
    """Estimated speedup over the standard fixed batch size, for the first model."""
    names = [s["name"] for s in result.sets]
    model = result.config.models[0]
    fig = Figure(figsize=(4.5 * len(names), 4), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=True):
        _world_bars(ax, result, name, model, lambda e: e.speedup.get("standard"))
        ax.axhline(1.0, color="black", linewidth=0.8)
    axes[0].set_ylabel(f"{model}: speedup over standard")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(handles))
    FigureCanvasAgg(fig).print_png(path)
    return path


def write_multimodal_plots(result: MultimodalResult, out: Path) -> list[Path]:
    """Every multimodal figure into ``out`` (the speedup one when standard ran); the paths
    written."""
    written = [plot_multimodal_throughput(result, out / "multimodal_throughput.png")]
    if STANDARD in result.config.policies:
        written.append(plot_multimodal_speedup(result, out / "multimodal_speedup.png"))
    return written


def plot_training_loss(result: TrainingResult, path: Path) -> Path:
    """Training loss (token mean over all ranks) against samples seen (top: loaders with
    different batch sizes line up) and against optimizer steps (bottom), one column per
    process count, one colour per loader, one line per seed."""
    worlds = result.config.worlds
    fig = Figure(figsize=(5.5 * len(worlds), 7), layout="constrained")
    axes = fig.subplots(2, len(worlds), squeeze=False)
    loaders = list(dict.fromkeys(run.loader for run in result.runs))
    colours = {loader: f"C{k}" for k, loader in enumerate(loaders)}
    for column, world in enumerate(worlds):
        by_samples, by_steps = axes[0][column], axes[1][column]
        for run in (r for r in result.runs if r.world == world):
            first = run.seed == result.config.seeds[0]
            style = {"color": colours[run.loader], "linewidth": 1, "alpha": 0.8}
            label = run.loader if first else None
            by_samples.plot(run.samples_seen, run.losses, label=label, **style)
            by_steps.plot(range(1, len(run.losses) + 1), run.losses, **style)
        by_samples.set_title(f"{world} process{'es' * (world > 1)}")
        by_samples.set_xlabel("samples seen")
        by_steps.set_xlabel("optimizer steps")
        for ax in (by_samples, by_steps):
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss")
    axes[1][0].set_ylabel("training loss")
    axes[0][0].legend(loc="upper right", fontsize="small")
    FigureCanvasAgg(fig).print_png(path)
    return path


def write_training_plots(result: TrainingResult, out: Path) -> list[Path]:
    """The training suite's figure into ``out``; the paths written."""
    return [plot_training_loss(result, out / "training_loss.png")]
