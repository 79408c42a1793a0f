"""The benchmark's outputs: a Markdown report for people, a JSON record for comparing runs."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import odb

from .alignment_suite import AlignmentConfig, AlignmentResult, alignment_table
from .overhead import OverheadResult
from .planner_suite import PlannerConfig, SetResult

__all__ = ["markdown", "overhead_table", "planner_table", "record", "write_report"]


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def planner_table(results: list[SetResult]) -> str:
    """One row per (length set, policy)."""
    lines = [
        "| set | policy | batch size | steps | padding eff. | fill | peak tokens "
        "| over-budget steps | plan samples/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for m in result.metrics:
            lines.append(
                f"| {result.name} | {m.policy} | {m.mean_batch_size:.2f} | {m.steps} "
                f"| {m.padding_efficiency:.4f} | {m.fill:.4f} | {m.peak_padded_tokens} "
                f"| {m.over_budget_steps} | {_rate(m.plan_samples_per_second)} |"
            )
    return "\n".join(lines)


def overhead_table(result: OverheadResult) -> str:
    """Median epoch wall time of each loader, and odb's ratios to the plain ones."""
    lines = [
        "| loader | batches | steps | median epoch (s) | best epoch (s) | epochs (s) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for timing in (result.plain, result.matched, result.odb):
        runs = ", ".join(f"{s:.2f}" for s in timing.seconds)
        batching = (
            f"budget {result.token_budget} tokens"
            if timing.batch_size is None
            else f"{timing.batch_size} samples"
        )
        lines.append(
            f"| {timing.name} | {batching} | {timing.steps} | {timing.median:.2f} "
            f"| {timing.best:.2f} | {runs} |"
        )
    stats = result.odb_stats
    epochs = len(result.odb.seconds)
    plan, collate = stats["plan_seconds"] / epochs, stats["collate_seconds"] / epochs
    lines += [
        "",
        f"odb / plain median wall time: **{result.ratio:.3f}** (best epochs: "
        f"{result.best_ratio:.3f}; odb / plain at odb's mean batch size: "
        f"{result.matched_ratio:.3f})",
        "",
        f"odb's own work in the iterating process per epoch: measure and plan {plan:.3f} s, "
        f"collate {collate:.3f} s ({(plan + collate) / result.odb.median:.1%} of its median "
        f"epoch); waiting for workers "
        f"{stats['wait_seconds'] / epochs:.2f} s.",
    ]
    return "\n".join(lines)


Alignment = tuple[AlignmentConfig, list[AlignmentResult]]


def markdown(
    config: PlannerConfig,
    planner: list[SetResult],
    overhead: OverheadResult | None = None,
    alignment: Alignment | None = None,
) -> str:
    """The whole report."""
    parts = [
        "# odb-bench",
        "",
        "## Planner",
        "",
        f"Token budget {config.budget}, odb window {config.window}, {config.samples} samples "
        f"per set, seed {config.seed}. `standard` is a shuffled epoch in fixed-size batches of "
        f"the largest size that fits the budget in at least 99% of batches; `sorted` sorts the "
        f"whole epoch by length (an offline best case for padding); odb rows run odb's own "
        f"planning rounds. Fill is real tokens per step over the budget; packed rows have no "
        f"padding. Batch size is the mean number of samples per batch.",
        "",
        planner_table(planner),
    ]
    clipped = [f"{r.name}: {r.clipped}" for r in planner if r.clipped]
    if clipped:
        parts += ["", "Samples longer than the budget, clipped to it: " + "; ".join(clipped) + "."]
    if alignment is not None:
        parts += [
            "",
            "## Alignment across ranks (simulated with odb's own round code)",
            "",
            alignment_table(*alignment),
        ]
    if overhead is not None:
        parts += [
            "",
            "## Loader overhead",
            "",
            f"{overhead.samples} synthetic multi-turn chats (mean {overhead.mean_tokens:.0f} "
            f"tokens) tokenized with the Qwen tokenizer in {overhead.num_workers} workers; "
            f"epochs of the three loaders timed in turn. Nothing consumes the batches, so this "
            f"is loader throughput, not how much loading a training step would hide.",
            "",
            overhead_table(overhead),
        ]
    return "\n".join(parts) + "\n"


def _counts(sizes: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(sizes, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def _set_record(result: SetResult) -> dict:
    return {
        "name": result.name,
        "params": result.params,
        "clipped": result.clipped,
        "standard_batch_size": result.standard_batch_size,
        "policies": [asdict(m) for m in result.metrics],
        "batch_size_counts": {
            policy: _counts(sizes) for policy, sizes in result.batch_sizes.items()
        },
    }


def record(
    config: PlannerConfig,
    planner: list[SetResult],
    overhead: OverheadResult | None = None,
    alignment: Alignment | None = None,
) -> dict:
    """Everything measured, with the settings and the machine, as JSON-ready data."""
    data = {
        "environment": {
            "odb": odb.__version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "planner": {"config": asdict(config), "sets": [_set_record(r) for r in planner]},
    }
    if alignment is not None:
        data["alignment"] = {
            "config": asdict(alignment[0]),
            "results": [asdict(r) for r in alignment[1]],
        }
    if overhead is not None:
        data["overhead"] = {
            **asdict(overhead),
            "medians": {key: getattr(overhead, key).median for key in ("plain", "matched", "odb")},
            "bests": {key: getattr(overhead, key).best for key in ("plain", "matched", "odb")},
            "ratio": overhead.ratio,
            "best_ratio": overhead.best_ratio,
            "matched_ratio": overhead.matched_ratio,
        }
    return data


def write_report(
    out: Path,
    config: PlannerConfig,
    planner: list[SetResult],
    overhead: OverheadResult | None = None,
    alignment: Alignment | None = None,
) -> list[Path]:
    """``report.md`` and ``results.json`` into ``out``; the paths written."""
    report = out / "report.md"
    report.write_text(markdown(config, planner, overhead, alignment))
    results = out / "results.json"
    results.write_text(json.dumps(record(config, planner, overhead, alignment), indent=2) + "\n")
    return [report, results]
