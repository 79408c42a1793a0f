"""PNG figures of the planner suite.

Figures are drawn on matplotlib's Agg canvas directly, not through pyplot, so a benchmark run
needs no display and leaves the caller's global matplotlib backend alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .planner_suite import SetResult

__all__ = ["plot_batch_sizes", "plot_efficiency", "write_plots"]


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
