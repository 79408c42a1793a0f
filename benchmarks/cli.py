"""``odb-bench``: run the benchmark suites, print a one-screen summary, and write the full
report, the JSON record and plots.

Each suite is a function from the parsed options to its results; ``main`` runs the ones asked
for and hands every result to the report. The planner, alignment and multimodal suites always
run; ``--overhead`` adds the loader-overhead suite, ``--overhead-stream`` the same over a
stream, ``--alignment-scale`` the alignment round's cost at 8 to 1024 simulated ranks.
``--llava`` runs the planner, alignment and multimodal suites on a user's LLaVA-format data
instead of the built-in sets; ``--train`` adds measured training of a tiny Qwen2.5-VL on CPU.
``--full`` prints the whole report instead of the summary.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from odb.errors import ConfigError

from .alignment_scale import ScaleConfig, run_alignment_scale
from .alignment_suite import AlignmentConfig, run_alignment
from .gpu_model import MODELS
from .llava_input import llava_set
from .multimodal_sets import BUILTIN_SETS, MultimodalSet, builtin_sets
from .multimodal_suite import POLICIES, MultimodalConfig, MultimodalResult, compare_sets
from .overhead import OverheadResult, run_overhead
from .planner_suite import (
    POLICY_COUNT,
    LengthSet,
    PlannerConfig,
    SetResult,
    run_planner,
)
from .plots import write_multimodal_plots, write_plots, write_training_plots
from .qwen_vl_offline import ImageSettings, load_processor
from .report import BenchResults, LlavaInput, markdown, packed_loss_line, write_report
from .summary import summary
from .train_models import PRESETS, model_name
from .training_suite import (
    ALL_LOADERS,
    LOADERS,
    LR_RULES,
    NEUTRAL_LOADER,
    TrainingConfig,
    run_training,
)

__all__ = ["build_parser", "main"]

_DEFAULTS = PlannerConfig()
# --quick: sizes small enough for a test, still several planning rounds per set.
_QUICK = {
    "samples": 400,
    "window": 128,
    "overhead_samples": 48,
    "repeats": 1,
    "alignment_samples": 2000,
    "worlds": (2, 4),
    "multimodal_samples": 600,
    "multimodal_worlds": (1, 4),
    "train_samples": 12,
    "scale_worlds": (2, 8),
    "scale_samples": 64,
}
_OVERHEAD = {"overhead_samples": 1500, "repeats": 5}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="odb-bench",
        description="Compare odb's batching with fixed-size and sorted batching on the same "
        "samples; write report.md, results.json and PNG plots.",
    )
    parser.add_argument("--out", type=Path, default=Path("odb-bench-out"), help="output folder")
    parser.add_argument("--budget", type=int, default=_DEFAULTS.budget, help="token budget")
    parser.add_argument("--window", type=int, help=f"odb window (default {_DEFAULTS.window})")
    parser.add_argument(
        "--samples", type=int, help=f"samples per length set (default {_DEFAULTS.samples})"
    )
    parser.add_argument(
        "--cv",
        type=float,
        action="append",
        help="length CV of a lognormal set; repeat for several "
        f"(default {' '.join(map(str, _DEFAULTS.cvs))})",
    )
    parser.add_argument("--mean", type=float, default=_DEFAULTS.mean, help="mean sample length")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    parser.add_argument(
        "--overhead",
        action="store_true",
        help="also time odb.DataLoader against a plain DataLoader (real Qwen tokenizer, "
        "2 workers; about a minute and a half)",
    )
    parser.add_argument(
        "--overhead-stream",
        action="store_true",
        help="also time odb.DataLoader against a plain DataLoader over the same stream (a "
        "torch IterableDataset with state_dict, read in order; as long as --overhead)",
    )
    scale = parser.add_argument_group(
        "alignment scale", "the alignment round's cost per step at many simulated ranks"
    )
    sc = ScaleConfig()
    scale.add_argument(
        "--alignment-scale",
        action="store_true",
        help="also measure the alignment round's decision time, bytes and collectives per step "
        "at many simulated ranks, with the per-step overhead they imply (about four minutes "
        "here at the default ranks)",
    )
    scale.add_argument(
        "--scale-world",
        type=_positive,
        action="append",
        help=f"ranks to simulate; repeat for several (default {' '.join(map(str, sc.worlds))})",
    )
    scale.add_argument(
        "--scale-samples",
        type=_positive,
        help=f"samples per rank (default {sc.samples_per_rank})",
    )
    multimodal = parser.add_argument_group(
        "multimodal suite", "built-in multimodal sets on simulated ranks, GPU time estimated"
    )
    mm = MultimodalConfig()
    multimodal.add_argument(
        "--set",
        action="append",
        choices=list(BUILTIN_SETS),
        help="a built-in multimodal set; repeat for several (default all)",
    )
    multimodal.add_argument(
        "--mm-samples", type=_positive, help=f"samples per multimodal set (default {mm.samples})"
    )
    multimodal.add_argument(
        "--world",
        type=_positive,
        action="append",
        help=f"ranks to simulate; repeat for several (default {' '.join(map(str, mm.worlds))})",
    )
    multimodal.add_argument(
        "--model",
        action="append",
        help="a model: the estimated suites take the GPU step models among the values "
        f"({', '.join(MODELS)}; default {' '.join(mm.models)}, the first gets the detailed "
        "tables); --train trains the first value, a preset "
        f"({', '.join(PRESETS)}; default tiny) or a checkpoint folder; repeat for several",
    )
    multimodal.add_argument(
        "--policy",
        action="append",
        choices=POLICIES,
        help="a policy to run; repeat for several (default all)",
    )
    multimodal.add_argument(
        "--batch-size",
        type=_positive,
        action="append",
        help="also run the standard policy with this fixed batch size; repeat for several",
    )
    llava = parser.add_argument_group(
        "LLaVA input",
        "run the planner, alignment and multimodal suites on your LLaVA-format data (exact "
        "sizes from image headers and the processor's tokenizer) instead of the built-in sets "
        "(--cv and --set add some of those back)",
    )
    llava.add_argument("--llava", type=Path, help="a LLaVA-format JSON or JSONL file")
    llava.add_argument("--images", type=Path, help="the folder image paths are relative to")
    llava.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first record that cannot become a sample (by default such records "
        "are left out, counted by kind and the first few shown)",
    )
    llava.add_argument(
        "--processor",
        help="a Qwen-VL processor folder for AutoProcessor.from_pretrained (default: a "
        "Qwen2.5-VL processor built offline from the Qwen tokenizer, with --min-pixels and "
        "--max-pixels)",
    )
    images = ImageSettings()
    llava.add_argument(
        "--min-pixels",
        type=_positive,
        help=f"the processor's smallest image area (offline processor default "
        f"{images.min_pixels}; --train: the model's)",
    )
    llava.add_argument(
        "--max-pixels",
        type=_positive,
        help=f"the processor's largest image area (offline processor default "
        f"{images.max_pixels}; --train: the model's)",
    )
    training = parser.add_argument_group(
        "training suite",
        "measured training of a model through each loader, side by side, on this machine's CPU "
        "or GPUs: the data is --llava, else the first --set, else a small long-multimodal-like "
        "set; --batch-size adds Standard runs",
    )
    train = TrainingConfig()
    training.add_argument("--train", action="store_true", help="run the training suite")
    training.add_argument(
        "--train-only",
        action="store_true",
        help="run only the training suite (with --train): no planner, alignment or estimated "
        "multimodal suite",
    )
    training.add_argument(
        "--train-samples",
        type=_positive,
        help=f"records to train on: written for a built-in set (default {train.samples}), the "
        "first ones of --llava (default all)",
    )
    training.add_argument(
        "--train-budget",
        type=_positive,
        default=train.budget,
        help=f"token budget per rank (default {train.budget})",
    )
    training.add_argument(
        "--train-max-length",
        type=_positive,
        default=train.max_length,
        help=f"records longer than this many tokens are left out (default {train.max_length})",
    )
    training.add_argument(
        "--train-lr-rule",
        choices=sorted(LR_RULES),
        default=train.lr_rule,
        help="odb's learning rate: the same as standard's, or scaled by (mean samples per step / "
        "standard's batch size) ** 0.5 or ** 1 (default same)",
    )
    training.add_argument(
        "--train-loader",
        choices=ALL_LOADERS,
        action="append",
        help=f"loaders to train through; repeat for several (default {' '.join(LOADERS)}); "
        f"{NEUTRAL_LOADER}: odb padded with at most standard's batch size of samples per step; "
        "odb-compute-*: the model's compute budget (FLOPs); odb-measured-*: the same budget "
        "with weights timed on this device before the run",
    )
    training.add_argument(
        "--nproc",
        "--train-world",
        dest="nproc",
        type=_positive,
        action="append",
        help="processes, one per GPU on a GPU machine (torch.distributed.run; NCCL on GPUs, "
        "gloo on the CPU); repeat for several (default 1)",
    )
    training.add_argument(
        "--train-seed",
        type=int,
        action="append",
        help="initial weights and shuffle of each run; repeat for several (default --seed)",
    )
    training.add_argument("--device", choices=("auto", "cuda", "cpu"), default=train.device)
    training.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default=train.dtype,
        help="weights' dtype (default auto: bfloat16 on a GPU, float32 on the CPU)",
    )
    training.add_argument(
        "--attn",
        default=train.attn,
        help="the language model's attention: odb_packed (default: odb's kernel, sdpa for "
        "padded batches, packed rows without cross-sample attention or a dense mask, no extra "
        "package), sdpa, eager, flash_attention_2 where installed, or a kernel registered "
        "with transformers",
    )
    training.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward"
    )
    training.add_argument(
        "--warmup-steps",
        type=int,
        default=train.warmup_steps,
        help=f"optimizer steps run before timing (default {train.warmup_steps})",
    )
    training.add_argument(
        "--steps", type=_positive, help="optimizer steps to time (default: the rest of the epoch)"
    )
    training.add_argument(
        "--heldout",
        type=int,
        default=train.heldout,
        help="records kept out of training, their loss measured after it (default 0)",
    )
    training.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's dense peak TFLOP/s for model FLOPs utilisation (default: known "
        "GPUs in bfloat16/float16)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    parser.add_argument(
        "--full",
        action="store_true",
        help="print the whole report (every table of report.md) instead of the summary",
    )
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _step_models(args: argparse.Namespace) -> tuple[str, ...]:
    """The GPU step models named by ``--model`` (any case), else the defaults; a value that
    is neither one nor, with ``--train``, a model to train is refused."""
    names = {name.lower(): name for name in MODELS}
    for text in args.model or ():
        if text.lower() not in names and not args.train:
            raise ConfigError(
                f"unknown model {text!r}: the estimated suites take {', '.join(MODELS)}; "
                f"presets and checkpoint folders are for --train"
            )
    chosen = [names[text.lower()] for text in args.model or () if text.lower() in names]
    return tuple(dict.fromkeys(chosen)) or MultimodalConfig().models


@contextmanager
def _progress(total: int):
    """A callback advancing a tqdm bar on stderr (silent when tqdm is not installed)."""
    try:
        from tqdm import tqdm
    except ImportError:
        yield lambda label: None
        return
    with tqdm(total=total, file=sys.stderr, leave=False) as bar:

        def advance(label: str) -> None:
            bar.set_description(label)
            bar.update()

        yield advance


def _planner_config(args: argparse.Namespace) -> PlannerConfig:
    """The planner's settings: the lognormal sets of ``--cv`` and the real-length sets of
    ``--set``, the default ones; with ``--llava`` the user's lengths (added by the caller),
    and lognormal sets only if ``--cv`` asks."""
    quick = _QUICK if args.quick else {}
    llava = args.llava is not None
    return PlannerConfig(
        mean=args.mean,
        cvs=tuple(args.cv) if args.cv else () if llava else _DEFAULTS.cvs,
        real_sets=() if llava else tuple(args.set or _DEFAULTS.real_sets),
        samples=args.samples or quick.get("samples", _DEFAULTS.samples),
        budget=args.budget,
        window=args.window or quick.get("window", _DEFAULTS.window),
        seed=args.seed,
    )


def _alignment_config(args: argparse.Namespace) -> AlignmentConfig:
    defaults = AlignmentConfig()
    quick = _QUICK if args.quick else {}
    return AlignmentConfig(
        mean=args.mean,
        samples=quick.get("alignment_samples", defaults.samples),
        budget=args.budget,
        window=args.window or quick.get("window", defaults.window),
        worlds=quick.get("worlds", defaults.worlds),
        seed=args.seed,
    )


def _scale_config(args: argparse.Namespace) -> ScaleConfig:
    defaults = ScaleConfig()
    quick = _QUICK if args.quick else {}
    return ScaleConfig(
        mean=args.mean,
        samples_per_rank=args.scale_samples
        or quick.get("scale_samples", defaults.samples_per_rank),
        budget=args.budget,
        window=args.window or defaults.window,
        worlds=tuple(args.scale_world or quick.get("scale_worlds", defaults.worlds)),
        seed=args.seed,
    )


def _multimodal_config(args: argparse.Namespace) -> MultimodalConfig:
    defaults = MultimodalConfig()
    quick = _QUICK if args.quick else {}
    return MultimodalConfig(
        sets=tuple(args.set or defaults.sets),
        samples=args.mm_samples or quick.get("multimodal_samples", defaults.samples),
        budget=args.budget,
        window=args.window or quick.get("window", defaults.window),
        worlds=tuple(args.world or quick.get("multimodal_worlds", defaults.worlds)),
        models=_step_models(args),
        policies=tuple(args.policy or defaults.policies),
        batch_sizes=tuple(args.batch_size or ()),
        seed=args.seed,
    )


_SHOWN_ERRORS = 5  # invalid --llava records named on the screen


def _llava(args: argparse.Namespace, budget: int) -> tuple[MultimodalSet, LlavaInput]:
    """The ``--llava`` records' exact sizes, invalid ones left out (and the first few named on
    the screen) unless ``--strict``."""
    defaults = ImageSettings()
    pixels = ImageSettings(
        args.min_pixels or defaults.min_pixels, args.max_pixels or defaults.max_pixels
    )
    processor = load_processor(args.processor, pixels)
    errors: list = []
    data = llava_set(args.llava, args.images, processor, budget, strict=args.strict, errors=errors)
    if errors:
        kinds = ", ".join(f"{count} {kind}" for kind, count in data.invalid.items())
        print(f"{args.llava}: {len(errors)} invalid record(s) left out ({kinds}); the first:")
        for error in errors[:_SHOWN_ERRORS]:
            print(f"  {error}")
        print("  (--strict stops at the first instead)")
    found = LlavaInput(str(args.llava), data.name, len(data), data.filtered, dict(data.invalid))
    return data, found


def _lengths(data: MultimodalSet, source: LlavaInput) -> LengthSet:
    """A LLaVA set's sequence lengths as a length set of the planner and alignment suites
    (already within the budget: longer records were left out, none clipped)."""
    params = {"source": source.source, "filtered": source.filtered}
    return LengthSet(data.name, data.lengths, 0, params)


def _multimodal(
    config: MultimodalConfig,
    llava: MultimodalSet | None,
    progress: Callable[[str], None],
) -> MultimodalResult:
    """The multimodal suite on the ``--llava`` set, if given, and on the built-in sets of
    ``config`` (none with ``--llava`` unless ``--set`` names some)."""
    sets = builtin_sets(config.sets, config.samples, config.budget, config.seed)
    if llava is not None:
        sets.insert(0, llava)
    return compare_sets(sets, replace(config, sets=tuple(s.name for s in sets)), progress)


def _training_config(args: argparse.Namespace) -> TrainingConfig:
    defaults = TrainingConfig()
    quick = _QUICK if args.quick else {}
    data = {"data": args.set[0]} if args.set else {}
    if args.llava is not None:
        data = {"llava": str(args.llava), "images": str(args.images) if args.images else None}
    return TrainingConfig(
        model=model_name(args.model[0]) if args.model else defaults.model,
        samples=args.train_samples
        or quick.get("train_samples", None if args.llava else defaults.samples),
        budget=args.train_budget,
        max_length=args.train_max_length,
        lr_rule=args.train_lr_rule,
        worlds=tuple(args.nproc or defaults.worlds),
        loaders=tuple(args.train_loader or defaults.loaders),
        batch_sizes=tuple(args.batch_size or ()),
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        seeds=tuple(args.train_seed or (args.seed,)),
        device=args.device,
        dtype=args.dtype,
        attn=args.attn,
        gradient_checkpointing=args.gradient_checkpointing,
        warmup_steps=args.warmup_steps,
        steps=args.steps,
        heldout=args.heldout,
        peak_tflops=args.peak_tflops,
        data_seed=args.seed,
        **data,
    )


def _overhead(
    args: argparse.Namespace, progress: Callable[[str], None], stream: bool = False
) -> OverheadResult:
    sizes = _QUICK if args.quick else _OVERHEAD
    return run_overhead(
        samples=sizes["overhead_samples"],
        mean_tokens=args.mean,
        token_budget=args.budget,
        repeats=sizes["repeats"],
        seed=args.seed,
        stream=stream,
        progress=progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.train_only and not args.train:
        parser.error("--train-only needs --train")
    try:
        training_config = _training_config(args) if args.train else None
        multimodal_config = _multimodal_config(args)
    except ConfigError as error:
        parser.error(str(error))
    estimates = not args.train_only
    config = _planner_config(args)
    if args.llava is not None and args.set is None:
        multimodal_config = replace(multimodal_config, sets=())
    args.out.mkdir(parents=True, exist_ok=True)
    llava = llava_input = None
    planner_extra, alignment_sets = {}, None  # None: the alignment suite's own lognormal set
    if estimates and args.llava is not None:
        llava, llava_input = _llava(args, multimodal_config.budget)
        planner_extra = {llava.name: llava.lengths}
        alignment_sets = [_lengths(llava, llava_input)]
    steps = 0
    if estimates:
        steps += (config.set_count + len(planner_extra)) * POLICY_COUNT + 1
        mm_sets = len(multimodal_config.sets) + (llava is not None)
        steps += mm_sets * (1 + len(multimodal_config.worlds))
    if training_config is not None:
        c = training_config
        steps += len(c.all_loaders) * len(c.worlds) * len(c.seeds)
    overhead_runs = args.overhead + args.overhead_stream
    steps += overhead_runs * (_QUICK if args.quick else _OVERHEAD)["repeats"]
    scale_config = _scale_config(args) if args.alignment_scale else None
    steps += len(scale_config.worlds) if scale_config is not None else 0
    planner: list[SetResult] = []
    alignment = multimodal = None
    with _progress(steps) as progress:
        if estimates:
            planner = run_planner(config, planner_extra, progress=progress)
            alignment_config = _alignment_config(args)
            alignment = (alignment_config, run_alignment(alignment_config, alignment_sets))
            progress("alignment")
            multimodal = _multimodal(multimodal_config, llava, progress)
        overhead = _overhead(args, progress) if args.overhead else None
        stream = _overhead(args, progress, stream=True) if args.overhead_stream else None
        training = (
            run_training(training_config, progress=progress)
            if training_config is not None
            else None
        )
        scale = (
            (scale_config, run_alignment_scale(scale_config, progress))
            if scale_config is not None
            else None
        )
    results = BenchResults(
        config,
        planner,
        overhead,
        alignment,
        multimodal,
        training,
        overhead_stream=stream,
        alignment_scale=scale,
        llava=llava_input,
    )
    written = write_report(args.out, results)
    if planner:
        written += write_plots(planner, args.out)
    if multimodal is not None:
        written += write_multimodal_plots(multimodal, args.out)
    if training is not None:
        written += write_training_plots(training, args.out)
    print(markdown(results) if args.full else summary(results, written[0]), end="")
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    if training is not None and training.packed_loss and not training.packed_loss["passed"]:
        print(f"odb-bench: {packed_loss_line(training.packed_loss)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
