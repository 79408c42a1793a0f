"""``odb-bench``: run the benchmark suites and write the report, the JSON record and plots.

Each suite is a function from the parsed options to its results; ``main`` runs the ones asked
for and hands every result to the report. The planner, alignment and multimodal suites always
run; ``--overhead`` adds the loader-overhead suite, ``--overhead-stream`` the same over a
stream, ``--alignment-scale`` the alignment round's cost at 8 to 1024 simulated ranks.
``--llava`` runs the multimodal suite on a user's LLaVA-format data instead of the built-in
sets; ``--train`` adds measured training of a tiny Qwen2.5-VL on CPU.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from .alignment_scale import ScaleConfig, run_alignment_scale
from .alignment_suite import AlignmentConfig, run_alignment
from .gpu_model import MODELS
from .llava_input import llava_set
from .multimodal_sets import BUILTIN_SETS, builtin_sets
from .multimodal_suite import POLICIES, MultimodalConfig, MultimodalResult, compare_sets
from .overhead import OverheadResult, run_overhead
from .planner_suite import POLICY_COUNT, PlannerConfig, SetResult, run_planner
from .plots import write_multimodal_plots, write_plots, write_training_plots
from .qwen_vl_offline import ImageSettings, load_processor
from .report import BenchResults, markdown, write_report
from .training_suite import (
    COMPUTE_LOADERS,
    LOADERS,
    LR_RULES,
    TrainingConfig,
    TrainingResult,
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
        type=_model_name,
        action="append",
        help=f"model whose step time is estimated on H100: {', '.join(MODELS)}; repeat for "
        f"several, the first one gets the detailed tables (default {' '.join(mm.models)})",
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
        "run the multimodal suite on your LLaVA-format data (exact sizes from image headers "
        "and the processor's tokenizer) instead of the built-in sets",
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
        "--min-pixels", type=_positive, default=images.min_pixels, help="offline processor"
    )
    llava.add_argument(
        "--max-pixels", type=_positive, default=images.max_pixels, help="offline processor"
    )
    training = parser.add_argument_group(
        "training suite", "measured CPU training of a tiny Qwen2.5-VL through each loader"
    )
    train = TrainingConfig()
    training.add_argument("--train", action="store_true", help="run the training suite")
    training.add_argument(
        "--train-samples",
        type=_positive,
        help=f"synthetic LLaVA records to train on (default {train.samples})",
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
        choices=(*LOADERS, *COMPUTE_LOADERS),
        action="append",
        help=f"loaders to train through; repeat for several (default {' '.join(LOADERS)})",
    )
    training.add_argument(
        "--train-world",
        type=_positive,
        action="append",
        help="processes (torchrun, gloo, DDP when more than 1); repeat for several (default 1)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _model_name(text: str) -> str:
    """A model of :data:`MODELS`, named in any case."""
    names = {name.lower(): name for name in MODELS}
    if text.lower() not in names:
        raise argparse.ArgumentTypeError(f"unknown model {text!r}; choose from {list(MODELS)}")
    return names[text.lower()]


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
    quick = _QUICK if args.quick else {}
    return PlannerConfig(
        mean=args.mean,
        cvs=tuple(args.cv) if args.cv else _DEFAULTS.cvs,
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
        models=tuple(dict.fromkeys(args.model or defaults.models)),
        policies=tuple(args.policy or defaults.policies),
        batch_sizes=tuple(args.batch_size or ()),
        seed=args.seed,
    )


_SHOWN_ERRORS = 5  # invalid --llava records named on the screen


def _multimodal(
    args: argparse.Namespace, config: MultimodalConfig, progress: Callable[[str], None]
) -> MultimodalResult:
    """The multimodal suite on ``--llava`` data, if given, and on the built-in sets of
    ``config`` (none with ``--llava`` unless ``--set`` names some)."""
    sets = builtin_sets(config.sets, config.samples, config.budget, config.seed)
    if args.llava is not None:
        processor = load_processor(args.processor, ImageSettings(args.min_pixels, args.max_pixels))
        errors: list = []
        data = llava_set(
            args.llava, args.images, processor, config.budget, strict=args.strict, errors=errors
        )
        if errors:
            kinds = ", ".join(f"{count} {kind}" for kind, count in data.invalid.items())
            print(f"{args.llava}: {len(errors)} invalid record(s) left out ({kinds}); the first:")
            for error in errors[:_SHOWN_ERRORS]:
                print(f"  {error}")
            print("  (--strict stops at the first instead)")
        sets.insert(0, data)
    return compare_sets(sets, replace(config, sets=tuple(s.name for s in sets)), progress)


def _training(args: argparse.Namespace, progress: Callable[[str], None]) -> TrainingResult:
    defaults = TrainingConfig()
    quick = _QUICK if args.quick else {}
    config = TrainingConfig(
        samples=args.train_samples or quick.get("train_samples", defaults.samples),
        budget=args.train_budget,
        max_length=args.train_max_length,
        lr_rule=args.train_lr_rule,
        worlds=tuple(args.train_world or defaults.worlds),
        loaders=tuple(args.train_loader or defaults.loaders),
        seed=args.seed,
    )
    return run_training(config, progress=progress)


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
    if args.train and args.train_budget < args.train_max_length:
        parser.error("--train-budget must be at least --train-max-length")
    config = _planner_config(args)
    multimodal_config = _multimodal_config(args)
    if args.llava is not None and args.set is None:
        multimodal_config = replace(multimodal_config, sets=())
    args.out.mkdir(parents=True, exist_ok=True)
    steps = config.set_count * POLICY_COUNT + 1
    mm_sets = len(multimodal_config.sets) + (args.llava is not None)
    steps += mm_sets * (1 + len(multimodal_config.worlds))
    if args.train:
        loaders = args.train_loader or TrainingConfig.loaders
        steps += len(loaders) * len(args.train_world or TrainingConfig.worlds)
    overhead_runs = args.overhead + args.overhead_stream
    steps += overhead_runs * (_QUICK if args.quick else _OVERHEAD)["repeats"]
    scale_config = _scale_config(args) if args.alignment_scale else None
    steps += len(scale_config.worlds) if scale_config is not None else 0
    with _progress(steps) as progress:
        planner: list[SetResult] = run_planner(config, progress=progress)
        alignment_config = _alignment_config(args)
        alignment = run_alignment(alignment_config)
        progress("alignment")
        multimodal = _multimodal(args, multimodal_config, progress)
        overhead = _overhead(args, progress) if args.overhead else None
        stream = _overhead(args, progress, stream=True) if args.overhead_stream else None
        training = _training(args, progress) if args.train else None
        scale = (
            (scale_config, run_alignment_scale(scale_config, progress))
            if scale_config is not None
            else None
        )
    results = BenchResults(
        config,
        planner,
        overhead,
        (alignment_config, alignment),
        multimodal,
        training,
        overhead_stream=stream,
        alignment_scale=scale,
    )
    written = write_report(args.out, results)
    written += write_plots(planner, args.out)
    written += write_multimodal_plots(multimodal, args.out)
    if training is not None:
        written += write_training_plots(training, args.out)
    print(markdown(results), end="")
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
