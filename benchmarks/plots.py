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
from .training_suite import TrainingResult

__all__ = [
    "batch_sizes_figure",
    "efficiency_figure",
    "multimodal_speedup_figure",
    "multimodal_throughput_figure",
    "plot_training_loss",
    "write_multimodal_plots",
    "write_plots",
    "write_training_plots",
]


def _legend_below(fig: Figure, ax: Axes) -> None:
    """``ax``'s legend under the panels, in as many columns as fit the figure's width (a row
    of entries wider than the figure would be cut off at both edges)."""
    handles, labels = ax.get_legend_handles_labels()
    renderer = FigureCanvasAgg(fig).get_renderer()
    for ncols in range(len(handles), 1, -1):
        legend = fig.legend(handles, labels, loc="outside lower center", ncols=ncols)
        if legend.get_window_extent(renderer).width <= fig.bbox.width:
            return
        legend.remove()
    fig.legend(handles, labels, loc="outside lower center", ncols=1)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig).print_png(path)
    return path


def efficiency_figure(results: list[SetResult]) -> Figure:
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
    _legend_below(fig, axes[0])
    return fig


def batch_sizes_figure(results: list[SetResult]) -> Figure:
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
    _legend_below(fig, axes[0][0])
    return fig


def write_plots(results: list[SetResult], out: Path) -> list[Path]:
    """Every planner figure into ``out``; the paths written."""
    return [
        _save(efficiency_figure(results), out / "planner_efficiency.png"),
        _save(batch_sizes_figure(results), out / "planner_batch_sizes.png"),
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
    ax.set_xticks(x, [_ranks(w) for w in worlds])
    ax.set_title(name)
    ax.grid(axis="y", alpha=0.3)


def _ranks(world: int) -> str:
    return f"{world} rank{'s' * (world > 1)}"


def multimodal_throughput_figure(result: MultimodalResult) -> Figure:
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
    _legend_below(fig, axes[0][0])
    return fig


SPEEDUP_BASELINES = ("standard", "best oracle")
"""The speedup figure's columns: odb over the fixed batch size, and over the fastest offline
oracle (GMT or BMT, padded or packed)."""


def _speedup_panel(
    ax: Axes, ratios: dict[tuple[str, int], float], policies: list[str], worlds: tuple[int, ...]
) -> None:
    """One dot per (policy, world) at its ratio, the value written beside it, on an axis
    zoomed to the values and 1.0 (ratios a few percent apart stay apart)."""
    values = [*ratios.values(), 1.0]
    low, high = min(values), max(values)
    span = max(high - low, 0.04)
    digits = ".3f" if span < 0.3 else ".2f"  # a 1% step shows in the written value
    offsets = np.linspace(-0.25, 0.25, len(worlds)) if len(worlds) > 1 else np.zeros(1)
    for k, world in enumerate(worlds):
        ys, xs = [], []
        for y, policy in enumerate(policies):
            if (policy, world) in ratios:
                ys.append(y + offsets[k])
                xs.append(ratios[policy, world])
        ax.plot(xs, ys, "o", color=f"C{k}", label=_ranks(world))
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(
                format(x, digits),
                (x, y),
                xytext=(5, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
            )
    ax.set_xlim(low - 0.08 * span, high + 0.25 * span)  # room on the right for the values
    ax.set_ylim(len(policies) - 0.5, -0.5)
    ax.set_yticks(range(len(policies)), policies)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.grid(axis="x", alpha=0.3)


def multimodal_speedup_figure(result: MultimodalResult) -> Figure | None:
    """odb's estimated samples/s over standard's and over the best offline oracle's, for the
    first model: one row of panels per set, a dot per rank count. None when no odb policy,
    or neither baseline, ran."""
    model = result.config.models[0]
    worlds = result.config.worlds
    policies = [p for p in dict.fromkeys(r.policy for r in result.runs) if p.startswith("odb")]
    ratios: dict[tuple[str, str], dict[tuple[str, int], float]] = {}
    for r in result.runs:
        for e in r.estimates:
            for baseline in SPEEDUP_BASELINES:
                value = e.speedup.get(baseline)
                if e.model == model and r.policy in policies and value is not None:
                    ratios.setdefault((r.set, baseline), {})[r.policy, r.world] = value
    baselines = [b for b in SPEEDUP_BASELINES if any(key[1] == b for key in ratios)]
    if not baselines:
        return None
    names = [s["name"] for s in result.sets]
    height = 0.9 + 0.2 * len(policies) * len(worlds)
    fig = Figure(figsize=(5.5 * len(baselines), height * len(names) + 0.8), layout="constrained")
    axes = fig.subplots(len(names), len(baselines), squeeze=False)
    for row, name in zip(axes, names, strict=True):
        for ax, baseline in zip(row, baselines, strict=True):
            _speedup_panel(ax, ratios.get((name, baseline), {}), policies, worlds)
            ax.set_title(f"{name}: over {baseline}")
    for ax, baseline in zip(axes[-1], baselines, strict=True):
        ax.set_xlabel(f"estimated samples/s over {baseline}'s")
    fig.suptitle(f"{model} on H100, GPU step model (estimated)")
    _legend_below(fig, axes[0][0])
    return fig


def write_multimodal_plots(result: MultimodalResult, out: Path) -> list[Path]:
    """Every multimodal figure into ``out`` (the speedup one when odb and a baseline ran); the
    paths written."""
    written = [_save(multimodal_throughput_figure(result), out / "multimodal_throughput.png")]
    speedup = multimodal_speedup_figure(result)
    if speedup is not None:
        written.append(_save(speedup, out / "multimodal_speedup.png"))
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
