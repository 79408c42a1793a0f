"""The one-screen summary ``odb-bench`` prints: what ran, and each set's headline figures,
each labelled measured (counted or timed here) or estimated (the GPU step model), with the
path of the full report.

The report holds every table; this keeps only what answers "is odb faster here, and by how
much": odb against the standard fixed batch size and against the best offline oracle.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from .multimodal_suite import MultimodalResult
from .planner_suite import SetResult
from .report import BenchResults, _times, best_oracle, packed_loss_line, what_ran

__all__ = ["headline_policy", "summary"]

_WIDTH = 100  # characters: the summary fits a terminal without wrapping


def _span(values: list[float], form: str) -> str:
    """``low-high`` of ``values`` in ``form``, one value when they agree."""
    low, high = format(min(values), form), format(max(values), form)
    return low if low == high else f"{low}-{high}"


def headline_policy(result: MultimodalResult, mode: str) -> str | None:
    """odb's policy of ``mode`` that the summary shows: the compute-planned one when it ran
    (what odb recommends for vision-language models), else the token-planned one."""
    ran = {r.policy for r in result.runs}
    return next((p for p in (f"odb compute {mode}", f"odb {mode}") if p in ran), None)


def _multimodal_lines(result: MultimodalResult) -> list[str]:
    model = result.config.models[0]
    found = {
        (r.set, r.world, r.policy): e for r in result.runs for e in r.estimates if e.model == model
    }
    policies = [headline_policy(result, mode) for mode in ("padded", "packed")]
    shown = [p for p in policies if p is not None]
    if not shown:
        return []
    w = max(18, *(len(s["name"]) for s in result.sets))
    lines = [
        f"Multimodal, ESTIMATED ({model} on H100): samples/s over standard's / best oracle's; "
        f"balance",
        f"  {'set':<{w}} {'ranks':>5}" + "".join(f"  {p:<26}" for p in shown) + "  best oracle",
        f"  {'':<{w}} {'':>5}" + "  vs std  vs best  balance   " * len(shown) + "  balance",
    ]
    for s in result.sets:
        for k, world in enumerate(result.config.worlds):
            cells = []
            for policy in shown:
                e = found.get((s["name"], world, policy))
                if e is None:
                    cells.append(f"  {'-':>6}  {'-':>7}  {'-':>7}   ")
                    continue
                cells.append(
                    f"  {_times(e.speedup.get('standard')):>6}  "
                    f"{_times(e.speedup.get('best oracle')):>7}  {e.balance:>7.3f}   "
                )
            best = best_oracle(result, s["name"], world, model)
            name = s["name"] if k == 0 else ""
            lines.append(
                f"  {name:<{w}} {world:>5}"
                + "".join(cells)
                + f"  {'-' if best is None else format(best.balance, '.3f'):>7}"
            )
    return lines


def _planner_lines(results: list[SetResult]) -> list[str]:
    if not results:
        return []
    w = max(18, *(len(r.name) for r in results))
    lines = [
        "Planner, MEASURED (exact for the seed): steps standard's / odb's; fill real tokens "
        "/ budget",
        f"  {'set':<{w}} {'steps odb padded':>17} {'odb packed':>11}   {'fill odb padded':>15} "
        f"{'sorted':>7} {'odb packed':>11}",
    ]
    rates: dict[str, list[float]] = {}
    for result in results:
        m = {metric.policy: metric for metric in result.metrics}
        fewer = [m["standard"].steps / m[policy].steps for policy in ("odb padded", "odb packed")]
        lines.append(
            f"  {result.name:<{w}} {_times(fewer[0]):>17} {_times(fewer[1]):>11}   "
            f"{m['odb padded'].fill:>15.3f} {m['sorted'].fill:>7.3f} "
            f"{m['odb packed'].fill:>11.3f}"
        )
        for metric in result.metrics:
            if metric.plan_samples_per_second is not None:
                rates.setdefault(metric.policy, []).append(metric.plan_samples_per_second)
    speeds = ", ".join(
        f"{policy} {_span([rate / 1000 for rate in r], '.0f')}k" for policy, r in rates.items()
    )
    lines.append(f"Planning speed, MEASURED (samples per CPU second in the planner): {speeds}")
    return lines


def _alignment_lines(results: BenchResults) -> list[str]:
    if results.alignment is None:
        return []
    config, rows = results.alignment
    lines = []
    for name in dict.fromkeys(r.set for r in rows):
        shared = [r for r in rows if r.set == name and r.share_tail]
        balance = "; ".join(
            f"{mode} {_span([r.balance for r in shared if r.mode == mode], '.3f')}"
            for mode in ("padded", "packed")
        )
        ghosts = _span([100 * r.ghost_share for r in shared], ".2f")
        lines.append(
            f"Alignment, MEASURED ({name}, {', '.join(map(str, config.worlds))} simulated "
            f"ranks, tail shared): balance {balance}; ghost steps {ghosts}%"
        )
    return lines


def _scale_lines(results: BenchResults) -> list[str]:
    if results.alignment_scale is None:
        return []
    config, rows = results.alignment_scale
    overheads = ", ".join(f"{r.world} ranks {r.overhead:.3%}" for r in rows)
    return [
        f"Alignment round at scale, ESTIMATED (decisions timed here, network modelled): "
        f"overhead per {config.step_seconds:g} s step: {overheads}"
    ]


def _training_lines(results: BenchResults) -> list[str]:
    training = results.training
    if training is None:
        return []
    lines = [
        f"Training, MEASURED on {run.device}: {run.loader}, {run.world} process(es), seed "
        f"{run.seed}: {run.samples_per_second:.2f} samples/s, {_times(training.speedup(run))} "
        f"standard, step p50 {run.step_p50:.3g} s"
        + (f", MFU {run.mfu:.1%}" if run.mfu is not None else "")
        for run in training.runs
    ]
    if training.packed_loss is not None:
        lines.append(packed_loss_line(training.packed_loss))
    return lines


def _overhead_lines(results: BenchResults) -> list[str]:
    return [
        f"Loader overhead{' over a stream' if o.stream else ''}, MEASURED: odb / plain epoch "
        f"time {o.ratio:.3f} (at odb's batch size {o.matched_ratio:.3f}); odb's own work "
        f"{o.own_share:.1%} of its epochs"
        for o in (results.overhead, results.overhead_stream)
        if o is not None
    ]


def summary(results: BenchResults, report: Path) -> str:
    """What ran and the headline of every suite, in about 40 lines; ``report``: where the
    full tables were written."""
    lines = ["odb-bench ran:", *(f"  {line}" for line in what_ran(results)), ""]
    if results.multimodal is not None:
        multimodal = _multimodal_lines(results.multimodal)
        lines += [*multimodal, ""] if multimodal else []
    lines += _planner_lines(results.planner)
    lines += _alignment_lines(results)
    lines += _scale_lines(results)
    lines += _overhead_lines(results)
    lines += _training_lines(results)
    lines += ["", f"Full tables: {report} (odb-bench --full prints them here)"]
    return "".join(_wrap(line) for line in lines)


def _wrap(line: str) -> str:
    """``line`` cut to the screen's width, its continuation indented under it (table rows are
    shorter than the width and stay as they are)."""
    if len(line) <= _WIDTH:
        return line + "\n"
    indent = " " * (len(line) - len(line.lstrip()))
    return (
        textwrap.fill(
            line.strip(),
            _WIDTH,
            initial_indent=indent,
            subsequent_indent=indent + "    ",
            break_long_words=False,
            break_on_hyphens=False,
        )
        + "\n"
    )
