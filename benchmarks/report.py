"""The benchmark's outputs: a Markdown report for people, a JSON record for comparing runs."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import odb

from .alignment_scale import ScaleConfig, ScaleResult, alignment_scale_table
from .alignment_suite import AlignmentConfig, AlignmentResult, alignment_table
from .multimodal_suite import PLACEHOLDER_LATENCY, Estimate, MultimodalResult, RunResult
from .overhead import OverheadResult
from .planner_suite import PlannerConfig, SetResult
from .policies import BMT_BUCKET
from .training_suite import TrainingResult, describe

__all__ = [
    "BenchResults",
    "LlavaInput",
    "best_oracle",
    "markdown",
    "multimodal_section",
    "overhead_section",
    "overhead_table",
    "planner_table",
    "record",
    "packed_loss_line",
    "training_section",
    "what_ran",
    "write_report",
]


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def planner_table(results: list[SetResult]) -> str:
    """One row per (length set, policy); speeds are samples per second of CPU time."""
    lines = [
        "| set | policy | batch size | steps | padding eff. | fill | peak tokens "
        "| over-budget steps | planner samples/s (CPU) | rounds samples/s (CPU) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for m in result.metrics:
            lines.append(
                f"| {result.name} | {m.policy} | {m.mean_batch_size:.2f} | {m.steps} "
                f"| {m.padding_efficiency:.4f} | {m.fill:.4f} | {m.peak_padded_tokens} "
                f"| {m.over_budget_steps} | {_rate(m.plan_samples_per_second)} "
                f"| {_rate(m.round_samples_per_second)} |"
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
    merge = " (with the merge of the workers' chunks)" if result.stream else ""
    lines += [
        "",
        f"odb / plain median wall time: **{result.ratio:.3f}** (best epochs: "
        f"{result.best_ratio:.3f}); odb / plain at odb's mean batch size: "
        f"{result.matched_ratio:.3f} (best epochs: {result.best_matched_ratio:.3f})",
        "",
        f"odb's own work in the iterating process per epoch: measure and plan{merge} {plan:.3f} "
        f"s, collate {collate:.3f} s (**{result.own_share:.1%}** of its epochs); waiting for "
        f"workers {stats['wait_seconds'] / epochs:.2f} s; everything but waiting "
        f"{result.busy_share:.1%}. These are wall-clock timers: they also count the time the "
        f"iterating process waited for a core its workers held. Counted in CPU time, the "
        f"iterating thread worked **{result.odb.cpu_share:.1%}** of odb's epochs (all it did: "
        f"odb's work, receiving the workers' chunks, the loop), the plain loaders' "
        f"{result.plain.cpu_share:.1%} and {result.matched.cpu_share:.1%} of theirs.",
    ]
    return "\n".join(lines)


def overhead_section(result: OverheadResult) -> str:
    """The loader-overhead section of the report, over the dataset or over a stream."""
    reading = (
        "read as a stream in order (each worker yields every other chat and keeps a "
        "state_dict, so odb keeps every worker's state after each chunk)"
        if result.stream
        else "shuffled"
    )
    return "\n".join(
        [
            f"## Loader overhead{' over a stream' if result.stream else ''}",
            "",
            f"{result.samples} synthetic multi-turn chats (mean {result.mean_tokens:.0f} "
            f"tokens) tokenized with the Qwen tokenizer in {result.num_workers} workers, "
            f"{reading}; epochs of the three loaders timed in turn. Nothing consumes the "
            f"batches, so this is loader throughput, not how much loading a training step "
            f"would hide.",
            "",
            overhead_table(result),
        ]
    )


def _overhead_record(result: OverheadResult) -> dict:
    """One loader-overhead run with its medians, bests and ratios, as JSON-ready data."""
    loaders = ("plain", "matched", "odb")
    return {
        **asdict(result),
        "medians": {key: getattr(result, key).median for key in loaders},
        "bests": {key: getattr(result, key).best for key in loaders},
        "ratio": result.ratio,
        "best_ratio": result.best_ratio,
        "matched_ratio": result.matched_ratio,
        "best_matched_ratio": result.best_matched_ratio,
        "own_share": result.own_share,
        "busy_share": result.busy_share,
        "cpu_shares": {key: getattr(result, key).cpu_share for key in loaders},
    }


def _per_second(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def multimodal_sets_table(result: MultimodalResult) -> str:
    """One row per built-in set: its shape, and the standard policy's batch size on it."""
    lines = [
        "| set | imitates | mean length | length CV | images / sample | patches / image "
        "| visual tokens | standard batch size | filtered |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in result.sets:
        lines.append(
            f"| {s['name']} | {s['description']} | {s['mean_length']:.0f} "
            f"| {s['length_cv']:.2f} | {s['images_per_sample']:.2f} "
            f"| {s['patches_per_image']:.0f} | {s['visual_token_share']:.0%} "
            f"| {s['standard_batch_size']} | {s['filtered']} |"
        )
    return "\n".join(lines)


def multimodal_throughput_table(result: MultimodalResult, model: str) -> str:
    """Estimated samples/s of every (set, policy) at each world size, for one model."""
    worlds = result.config.worlds
    rate = {
        (r.set, r.policy, r.world): e.samples_per_second
        for r in result.runs
        for e in r.estimates
        if e.model == model
    }
    lines = [
        "| set | policy | " + " | ".join(f"{w} rank{'s' * (w > 1)}" for w in worlds) + " |",
        "|---|---|" + "---:|" * len(worlds),
    ]
    for s in result.sets:
        policies = dict.fromkeys(r.policy for r in result.runs if r.set == s["name"])
        for policy in policies:
            cells = " | ".join(_per_second(rate.get((s["name"], policy, w))) for w in worlds)
            lines.append(f"| {s['name']} | {policy} | {cells} |")
    return "\n".join(lines)


def multimodal_runs_table(runs: list[RunResult], model: str) -> str:
    """Every run of one set: batching figures, and one model's estimates."""
    lines = [
        "| ranks | policy | steps | padding | real tokens / step | peak tokens | idle "
        "| balance | step (ms) | samples/s | vs standard | vs GMT | vs BMT | vs best oracle "
        "| mixed image steps | placeholder cost |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        e = next((e for e in r.estimates if e.model == model), None)
        if e is None:  # an odb compute run planned for another model
            continue
        lines.append(
            f"| {r.world} | {r.policy} | {r.steps} | {r.padding_ratio:.2%} "
            f"| {r.real_tokens_per_step:,.0f} | {r.peak_tokens} | {r.idle_share:.1%} "
            f"| {e.balance:.3f} | {1000 * e.step_seconds:,.0f} "
            f"| {_per_second(e.samples_per_second)} "
            f"| {_times(e.speedup.get('standard'))} | {_times(e.speedup.get('gmt'))} "
            f"| {_times(e.speedup.get('bmt'))} | {_times(e.speedup.get('best oracle'))} "
            f"| {r.mixed_steps:.1%} "
            f"| {e.placeholder_cost:+.3%} |"
        )
    return "\n".join(lines)


def _estimates(result: MultimodalResult) -> dict[tuple[str, int, str, str], tuple]:
    """``(set, world, policy, model) -> (run, estimate)`` over every run."""
    return {(r.set, r.world, r.policy, e.model): (r, e) for r in result.runs for e in r.estimates}


def best_oracle(result: MultimodalResult, name: str, world: int, model: str) -> Estimate | None:
    """The fastest offline oracle (GMT or BMT, padded or packed) on one set and world under
    ``model``, as the speedups "vs best oracle" count it; None when no oracle ran."""
    found = _estimates(result)
    oracles = [
        found[key][1]
        for kind in ("gmt", "bmt")
        for mode in ("padded", "packed")
        if (key := (name, world, f"{kind} {mode}", model)) in found
    ]
    return max(oracles, key=lambda e: e.samples_per_second, default=None)


def multimodal_compute_table(result: MultimodalResult) -> str:
    """odb's compute policies against the token oracles: per-step compute balance and
    estimated samples/s over the best oracle of either mode, for every set, world and model."""
    lines = [
        "| set | ranks | model | mode | balance odb compute | balance odb tokens "
        "| balance best oracle | odb compute vs best oracle | odb tokens vs best oracle "
        "| peak tokens |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    found = _estimates(result)
    for s in result.sets:
        for world in result.config.worlds:
            for model in result.config.models:
                best = best_oracle(result, s["name"], world, model)
                for mode in ("padded", "packed"):
                    compute = found.get((s["name"], world, f"odb compute {mode}", model))
                    if compute is None:
                        continue
                    tokens = found.get((s["name"], world, f"odb {mode}", model))
                    run, e = compute
                    lines.append(
                        f"| {s['name']} | {world} | {model} | {mode} | {e.balance:.3f} "
                        f"| {tokens[1].balance if tokens else float('nan'):.3f} "
                        f"| {best.balance if best else float('nan'):.3f} "
                        f"| {_times(e.speedup.get('best oracle'))} "
                        f"| {_times(tokens[1].speedup.get('best oracle') if tokens else None)} "
                        f"| {run.peak_tokens} |"
                    )
    return "\n".join(lines)


def multimodal_section(result: MultimodalResult) -> str:
    """The multimodal suite's part of the report."""
    config = result.config
    primary = config.models[0]
    parts = [
        "## Multimodal (simulated ranks, estimated GPU time)",
        "",
        f"Sets: {_named_counts([(s['name'], s['samples']) for s in result.sets])}. Built-in "
        f"sets are sizes only (text tokens and Qwen3-VL image patches); token budget "
        f"{config.budget}, odb window {config.window}, seed "
        f"{config.seed}. Every policy's own batches; odb's from its round and alignment code "
        f"on simulated ranks. Offline policies deal their batches round-robin to the ranks. "
        f"Step time is estimated per rank on one H100 (docs/benchmarks.md: linear layers, "
        f"attention, vision tower, per-step overhead, utilisation curve); a step lasts as "
        f"long as its slowest rank. `gmt`/`bmt`: offline max-token oracles over the whole "
        f"shuffled epoch / shuffled mega-buckets of {BMT_BUCKET}; speedups are against "
        f"`standard` and against the oracles of the same mode (padded or packed). Idle: rank-steps "
        f"without a batch (odb's ghost steps at the tail of the epoch); balance: the ranks' "
        f"compute time over that of the slowest rank. Mixed image steps: steps where some "
        f"rank's batch has an image and another's has none, which hang under FSDP or ZeRO-3 "
        f"unless that rank runs the vision tower anyway; placeholder cost: the estimated "
        f"epoch time added when each such rank runs odb's placeholder image (one 2x2 grid of "
        f"patches, one token, and an assumed {PLACEHOLDER_LATENCY * 1000:.0f} ms for the "
        f"vision tower's launch-bound pass; odb does this). A `--llava` set holds the data's own "
        f"records, sized by the given processor.",
        "",
        multimodal_sets_table(result),
    ]
    if any(r.policy.startswith("odb compute") for r in result.runs):
        parts += [
            "",
            "### odb compute against the token oracles",
            "",
            "`odb compute`: planned with each model's own compute cost "
            "(`qwen_vl.compute_budget`: up to the compute of 1.5 x the token budget in "
            "text tokens, at most the token budget in tokens per batch), scored by the "
            "independent step model above. Best oracle: the fastest of GMT and BMT, padded "
            "and packed.",
            "",
            multimodal_compute_table(result),
        ]
    for model in config.models:
        parts += [
            "",
            f"### Estimated samples/s, {model} on H100",
            "",
            multimodal_throughput_table(result, model),
        ]
    for s in result.sets:
        runs = [r for r in result.runs if r.set == s["name"]]
        parts += [
            "",
            f"### {s['name']}: {primary} on H100",
            "",
            multimodal_runs_table(runs, primary),
        ]
    return "\n".join(parts)


_LR_RULE_TEXT = {
    "same": "the same",
    "sqrt": "scaled by the square root of its mean samples per step over standard's batch size",
    "linear": "scaled by its mean samples per step over standard's batch size",
}


def _seconds(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


_SCORES = {
    "heldout_loss": "held-out loss per token",
    "heldout_record_loss": "held-out loss per record",
    "final_loss": "final training loss",
}


def _quality_lines(result: TrainingResult) -> list[str]:
    """Loss per loader over the seeds (mean, lowest, highest), and whether odb neutral's mean
    is within Standard's spread."""
    config = result.config
    scores = ["heldout_loss", "heldout_record_loss"] if config.heldout else ["final_loss"]
    what = (
        f"the {result.data['heldout']} held-out records after training, one at a time: the "
        f"mean over their label tokens (long records weigh more) and the mean over records of "
        f"each one's own loss"
        if config.heldout
        else "the mean training loss of the last 10% of steps"
    )
    lines = [
        "",
        f"Loss over {len(config.seeds)} seed(s), {what}; mean [lowest, highest] over the seeds:",
        "",
        "| loader | processes | "
        + " | ".join(_SCORES[score] for score in scores)
        + " | samples/s mean | vs standard mean |",
        "|---|---:|" + "---:|" * (len(scores) + 2),
    ]
    verdicts = []
    for world in config.worlds:
        for loader in dict.fromkeys(r.loader for r in result.runs if r.world == world):
            runs = [r for r in result.runs if r.loader == loader and r.world == world]
            cells = [
                "{:.4f} [{:.4f}, {:.4f}]".format(*result.loss_spread(loader, world, score))
                for score in scores
            ]
            speedups = [x for x in map(result.speedup, runs) if x is not None]
            lines.append(
                f"| {loader} | {world} | {' | '.join(cells)} "
                f"| {np.mean([r.samples_per_second for r in runs]):.2f} "
                f"| {_times(float(np.mean(speedups)) if speedups else None)} |"
            )
        loaders = {r.loader for r in result.runs if r.world == world}
        if {"odb neutral", "standard"} <= loaders:
            for score in scores:
                neutral = result.loss_spread("odb neutral", world, score)[0]
                _, low, high = result.loss_spread("standard", world, score)
                inside = "within" if low <= neutral <= high else "outside"
                verdicts.append(
                    f"{world} process(es), {_SCORES[score]}: odb neutral's mean {neutral:.4f} is "
                    f"{inside} Standard's seed spread [{low:.4f}, {high:.4f}]."
                )
    return lines + [line for verdict in verdicts for line in ("", verdict)]


def training_section(result: TrainingResult) -> str:
    """The measured-training suite's part of the report."""
    config, data = result.config, result.data
    runs = result.runs
    device = runs[0].device if runs else config.device
    invalid = ", ".join(f"{count} {kind}" for kind, count in data["invalid"].items())
    timed = (
        f"{config.steps} optimizer steps timed after {config.warmup_steps} warm-up step(s)"
        if config.steps
        else f"the epoch timed after {config.warmup_steps} warm-up step(s)"
    )
    lines = [
        f"## Measured training ({describe(config, runs[0].dtype if runs else None)}; {device})",
        "",
        f"{data['samples']} records of {data['name']} ({data['with_images']:.0%} with images, "
        f"{data['images_per_sample']:.2f} images per record; mean length "
        f"{data['mean_length']:.0f} tokens, CV {data['length_cv']:.2f}; {data['filtered']} over "
        f"{config.max_length} tokens left out"
        + (f"; invalid records left out: {invalid}" if invalid else "")
        + (f"; {data['heldout']} held out" if data["heldout"] else "")
        + f"). Each loader runs in its own process(es), {config.num_workers} DataLoader "
        f"workers each; {timed}; every step lasts as long as its slowest rank. `standard`: "
        f"torch DataLoader with the largest fixed batch size whose padded tokens fit the "
        f"budget in 99% of batches ({data['standard_batch_size']}). Wait: per step, how long "
        f"a rank waited for the slowest one after its backward (mean; share of all ranks' "
        f"time). Peak memory: the GPU's peak allocation, or the CPU process's peak RSS "
        f"(workers excluded). Model FLOPs count useful work (real tokens, causal attention "
        f"within each sample, the vision tower; `qwen_vl.model_flops`), per process; MFU over "
        f"the device's dense peak where known. Padding: computed tokens over real tokens, "
        f"minus one. Learning rate: AdamW at {config.learning_rate:g} for standard; odb's "
        f"{_LR_RULE_TEXT[config.lr_rule]}. Missing / repeated: samples a whole epoch left out "
        f"/ trained twice.",
        "",
        "| loader | processes | seed | batch | steps (timed) | samples/s | real tokens/s "
        "| step p50 / p95 (s) | wait (ms, share) | data wait | peak memory (MiB) "
        "| model TFLOP/s | MFU | padding | vs standard | missing / repeated |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        batch = f"{run.batch_size} samples" if run.batch_size else f"{config.budget} tokens"
        mfu = f"{run.mfu:.1%}" if run.mfu is not None else "n/a"
        epoch = f"{run.missing} / {run.repeated}" if run.missing is not None else "n/a"
        lines.append(
            f"| {run.loader} | {run.world} | {run.seed} | {batch} "
            f"| {run.steps} ({run.timed_steps}) | {run.samples_per_second:.2f} "
            f"| {run.real_tokens_per_second:,.0f} "
            f"| {_seconds(run.step_p50)} / {_seconds(run.step_p95)} "
            f"| {1000 * run.wait:.1f} ({run.wait_share:.1%}) | {run.data_share:.1%} "
            f"| {run.peak_memory_mib:,.0f} | {run.model_tflops:.3g} | {mfu} "
            f"| {run.padding:.1%} | {_times(result.speedup(run))} | {epoch} |"
        )
    if result.packed_loss is not None:
        lines += ["", packed_loss_line(result.packed_loss)]
    lines += _cost_weight_lines(runs)
    if len(config.seeds) > 1 or config.heldout:
        lines += _quality_lines(result)
    return "\n".join(lines)


def _cost_weight_lines(runs: list) -> list[str]:
    """The weights each compute and measured run priced batches with (FLOPs or timed)."""
    priced = [run for run in runs if run.cost_weights]
    if not priced:
        return []
    lines = [
        "",
        "Cost weights, in tokens: per attention pair, per vision patch, per pair of patches "
        "within an image (compute: from FLOPs; measured: timed here before the run, with the "
        "fit's R^2, each sample's fitted extra cost in tokens, which the cost does not price, "
        "and the seconds the timing took).",
        "",
        "| loader | processes | seed | attention | vision | vision attention | fit R^2 "
        "| per sample | timing (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in priced:
        w = run.cost_weights
        measured = "fit" in w
        lines.append(
            f"| {run.loader} | {run.world} | {run.seed} | {w['attention_weight']:.3g} "
            f"| {w['vision_weight']:.3g} | {w['vision_attention_weight']:.3g} "
            + (
                f"| {w['fit']:.3f} | {w['sample_tokens']:.1f} | {w['seconds']:.1f} |"
                if measured
                else "| - | - | - |"
            )
        )
    return lines


def packed_loss_line(check: dict) -> str:
    """The packed-loss check in one sentence."""
    verdict = "passed" if check["passed"] else "FAILED"
    return (
        f"Packed row against padded batch ({check['samples']} samples, {check['tokens']} "
        f"tokens, {check['dtype']}, {check['attn']}): loss {check['packed']:.5f} packed, "
        f"{check['padded']:.5f} padded, relative difference {check['relative_difference']:.2e} "
        f"(tolerance {check['tolerance']:.0e}); per-token losses differ by "
        f"{check['token_difference']:.2e} on average (tolerance {check['token_tolerance']:.0e}): "
        f"{verdict}."
    )


Alignment = tuple[AlignmentConfig, list[AlignmentResult]]
AlignmentScale = tuple[ScaleConfig, list[ScaleResult]]


@dataclass(frozen=True)
class LlavaInput:
    """A ``--llava`` file as the run used it: its valid records within the budget (``samples``)
    are the set ``name`` of every suite that takes sets; ``invalid`` counts the records left
    out by kind of error, ``filtered`` those over the budget."""

    source: str
    name: str
    samples: int
    filtered: int
    invalid: dict[str, int]

    @property
    def records(self) -> int:
        return self.samples + self.filtered + sum(self.invalid.values())


@dataclass(frozen=True)
class BenchResults:
    """Everything one ``odb-bench`` run measured; suites that did not run are None."""

    config: PlannerConfig
    planner: list[SetResult]
    overhead: OverheadResult | None = None
    alignment: Alignment | None = None
    multimodal: MultimodalResult | None = None
    training: TrainingResult | None = None
    overhead_stream: OverheadResult | None = None
    alignment_scale: AlignmentScale | None = None
    llava: LlavaInput | None = None


def _named_counts(sets: list[tuple[str, int]]) -> str:
    """``a, b (600 samples each)`` when the sets are the same size, else each with its own."""
    if len(sets) > 1 and len({count for _, count in sets}) == 1:
        return f"{', '.join(name for name, _ in sets)} ({sets[0][1]} samples each)"
    return ", ".join(f"{name} ({count} samples)" for name, count in sets)


def _ranks(worlds: tuple[int, ...]) -> str:
    return f"{', '.join(map(str, worlds))} simulated rank{'s' * (worlds != (1,))}"


def _planner_sets(results: BenchResults) -> str:
    """The planner's sets in a few words: the lognormal ones by CV, the others by name, each
    group with its sample count."""
    lognormal = [r for r in results.planner if r.params.get("distribution") == "lognormal"]
    others = [r for r in results.planner if r not in lognormal]
    parts = []
    if lognormal:
        cvs = ", ".join(f"{r.params['cv']:g}" for r in lognormal)
        parts.append(
            f"lognormal CV {cvs} (mean {results.config.mean:g}, "
            f"{lognormal[0].metrics[0].samples} samples each)"
        )
    counts = {r.metrics[0].samples for r in others}
    if len(counts) == 1 and len(others) > 1:
        parts.append(f"{', '.join(r.name for r in others)} ({counts.pop()} samples each)")
    else:
        parts += [f"{r.name} ({r.metrics[0].samples} samples)" for r in others]
    return "; ".join(parts)


def what_ran(results: BenchResults) -> list[str]:
    """One line per suite that ran: its data, sizes and ranks, and whether its figures are
    measured here or estimated (the report's header and the summary's)."""
    config, lines = results.config, []
    if results.planner:
        lines.append(
            f"planner, measured: {_planner_sets(results)}; budget {config.budget}, "
            f"window {config.window}"
        )
    if results.alignment is not None:
        alignment_config, rows = results.alignment
        sets = list({r.set: (r.set, r.samples) for r in rows}.values())
        lines.append(
            f"alignment, measured: {_named_counts(sets)} on {_ranks(alignment_config.worlds)}"
        )
    if results.multimodal is not None:
        mm = results.multimodal.config
        sets = [(s["name"], s["samples"]) for s in results.multimodal.sets]
        lines.append(
            f"multimodal, estimated: {_named_counts(sets)} on {_ranks(mm.worlds)}; GPU step "
            f"model of {', '.join(mm.models)} on H100"
        )
    if results.llava is not None:
        llava = results.llava
        kinds = ", ".join(f"{count} {kind}" for kind, count in llava.invalid.items())
        lines.append(
            f"LLaVA input: {llava.source}: {llava.records} records, "
            f"{sum(llava.invalid.values())} invalid{f' ({kinds})' if kinds else ''}, "
            f"{llava.filtered} over the budget left out; {llava.samples} samples, set "
            f"{llava.name!r} in every suite above"
        )
    if results.alignment_scale is not None:
        lines.append(
            f"alignment scale, estimated: {_ranks(results.alignment_scale[0].worlds)} "
            f"(decisions timed here, network modelled)"
        )
    for overhead in (results.overhead, results.overhead_stream):
        if overhead is not None:
            lines.append(
                f"loader overhead{' over a stream' if overhead.stream else ''}, measured: "
                f"{overhead.samples} chats, {overhead.num_workers} workers"
            )
    if results.training is not None:
        training = results.training
        runs, config = training.runs, training.config
        loaders = ", ".join(dict.fromkeys(r.loader for r in runs))
        device = runs[0].device if runs else config.device
        lines.append(
            f"training, measured on {device}: {describe(config, runs[0].dtype if runs else None)}"
            f"; {loaders} at {', '.join(map(str, config.worlds))} process(es), seed(s) "
            f"{', '.join(map(str, config.seeds))}"
        )
    return lines


def markdown(results: BenchResults) -> str:
    """The whole report."""
    config, planner, overhead = results.config, results.planner, results.overhead
    alignment, multimodal, training = results.alignment, results.multimodal, results.training
    parts = ["# odb-bench", "", "What ran:", "", *(f"- {line}" for line in what_ran(results))]
    if planner:
        parts += [
            "",
            "## Planner",
            "",
            f"Sets: {_planner_sets(results)}. Token budget {config.budget}, odb window "
            f"{config.window}, seed {config.seed}. `standard` is a shuffled epoch in fixed-size "
            f"batches of the largest size that fits the budget in at least 99% of batches; "
            f"`sorted` sorts the whole epoch by length (an offline best case for padding); odb "
            f"rows run odb's own planning rounds. Fill is real tokens per step over the budget; "
            f"packed rows have no padding. Batch size is the mean number of samples per batch. "
            f"Speeds are the epoch's samples per second of CPU time: inside the planner (every "
            f"`plan_groups` call of the rounds), and in the whole rounds (intake, planning and "
            f"decision).",
            "",
            planner_table(planner),
        ]
    clipped = [f"{r.name}: {r.clipped}" for r in planner if r.clipped]
    if clipped:
        parts += ["", "Samples longer than the budget, clipped to it: " + "; ".join(clipped) + "."]
    if results.llava is not None:
        parts += [
            "",
            f"Set {results.llava.name}: the exact lengths of {results.llava.source}'s valid "
            f"records (`LlavaDataset.estimate`); {results.llava.filtered} over the budget left "
            f"out.",
        ]
    if alignment is not None:
        llava = results.llava
        origins = {
            name: f"the exact lengths of {llava.source}'s valid records within the budget"
            if llava is not None and name == llava.name
            else f"lognormal lengths of mean {alignment[0].mean:g}"
            for name in dict.fromkeys(r.set for r in alignment[1])
        }
        parts += [
            "",
            "## Alignment across ranks (simulated with odb's own round code)",
            "",
            alignment_table(*alignment, origins),
        ]
    if results.alignment_scale is not None:
        parts += [
            "",
            "## The alignment round's cost at scale (simulated ranks, network estimated)",
            "",
            alignment_scale_table(*results.alignment_scale),
        ]
    if multimodal is not None:
        parts += ["", multimodal_section(multimodal)]
    for result in (overhead, results.overhead_stream):
        if result is not None:
            parts += ["", overhead_section(result)]
    if training is not None:
        parts += ["", training_section(training)]
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


def _scale_record(result: ScaleResult) -> dict:
    """A world size's measurements and the figures derived from them (the overhead is an
    estimate: its network part is the config's model)."""
    derived = (
        "report_bytes_sent",
        "report_bytes_received",
        "collectives",
        "collectives_per_step",
        "rounds_per_step",
        "decide_median",
        "decide_p95",
        "network_seconds",
        "overhead",
    )
    return {**asdict(result), **{name: getattr(result, name) for name in derived}}


def record(results: BenchResults) -> dict:
    """Everything measured, with the settings and the machine, as JSON-ready data."""
    config, planner, overhead = results.config, results.planner, results.overhead
    alignment, multimodal, training = results.alignment, results.multimodal, results.training
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
    if results.alignment_scale is not None:
        scale_config, scale = results.alignment_scale
        data["alignment_scale"] = {
            "config": asdict(scale_config),
            "results": [_scale_record(r) for r in scale],
        }
    if multimodal is not None:
        data["multimodal"] = asdict(multimodal)
    if results.llava is not None:
        data["llava"] = {**asdict(results.llava), "records": results.llava.records}
    if training is not None:
        data["training"] = asdict(training)
    if overhead is not None:
        data["overhead"] = _overhead_record(overhead)
    if results.overhead_stream is not None:
        data["overhead_stream"] = _overhead_record(results.overhead_stream)
    return data


def write_report(out: Path, results: BenchResults) -> list[Path]:
    """``report.md`` and ``results.json`` into ``out``; the paths written."""
    report = out / "report.md"
    report.write_text(markdown(results))
    record_path = out / "results.json"
    record_path.write_text(json.dumps(record(results), indent=2) + "\n")
    return [report, record_path]
