"""What a Qwen-VL model's batches cost on this device, timed, as the weights odb prices them with.

:func:`~odb.adapters.qwen_vl.compute_cost` derives its weights from FLOPs, which assumes that
every kernel runs equally fast. They do not: on a CPU, for example, the per-sample causal
attention of a packed row runs about ten times faster per FLOP than the masked attention of a
padded batch, so FLOPs overprice packed attention tenfold there and compute planning makes
smaller batches than it should. :func:`measure_cost` times the model's own forward and backward
on a few synthetic batches that separate the terms (text rows of one long or many short
samples, images of a few sizes), then fits ``seconds = fixed + per_token * (tokens +
attention_weight * pairs + vision_weight * patches + vision_attention_weight * image_pairs)``,
where each term is what :class:`odb.ComputeCost` itself computes for the batch. The result is
an ``odb.ComputeCost`` to pass to :func:`~odb.adapters.qwen_vl.compute_budget` (``cost=``) or to
the Trainer adapter (``compute=``).

The batches are built as processed samples and laid out by odb's own collator for the mode,
so what is timed is what training runs; none holds more than ``max_tokens`` tokens.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import odb
from odb.adapters.qwen_vl.collators import collator, pixel_features
from odb.adapters.qwen_vl.config import _config_of, _text_config
from odb.adapters.qwen_vl.flops import compute_cost
from odb.errors import ConfigError
from odb.planner import shared_group

__all__ = ["MeasuredCost", "measure_cost"]

_TERMS = ("tokens", "pairs", "patches", "image_pairs", "samples")
_TEXT = 16  # text tokens of each sample that carries an image
_SIDE = 32  # merged tokens along the largest image's side: 1024 tokens, the usual max_pixels


@dataclass(frozen=True)
class MeasuredCost:
    """The fitted cost and how well it explains the timings.

    ``cost``: weights in token units, as ``odb.ComputeCost`` takes them; ``token_seconds``: one
    token's time; ``fixed_seconds``: the fitted time of an empty step (the same on every rank,
    so it does not enter the cost); ``fit``: the share of the timings' variance the fit explains
    (R^2); ``sample_tokens``: what each sample costs on top of its tokens, in tokens (per-call
    work of kernels that loop over a row's samples: fitted so that it does not bias the
    attention weight, but not priced by ``cost``, which has no such term; it is none with a
    varlen kernel); ``batches``: each timed batch's terms (see ``_TERMS``) and median
    ``seconds`` (averaged over the ranks)."""

    cost: odb.ComputeCost
    token_seconds: float
    fixed_seconds: float
    fit: float
    sample_tokens: float
    batches: tuple[dict, ...]


def measure_cost(
    model: torch.nn.Module,
    mode: str = "packed",
    *,
    max_tokens: int,
    longest: int | None = None,
    repeats: int = 3,
    seed: int = 0,
    distributed: bool = True,
) -> MeasuredCost:
    """Time ``model`` (a Qwen-VL model, on the device, in the dtype and mode it will train in,
    with the attention kernel and gradient checkpointing it will train with) on synthetic
    batches of at most ``max_tokens`` tokens in ``mode`` and fit odb's cost weights to the
    timings: the median of ``repeats`` forward and backward passes per batch, after one
    untimed pass. ``longest``: the longest
    sample the data holds (default ``max_tokens``), so that the text batches' samples span
    the lengths training will see.

    Call it before training: it runs backward passes and then clears the parameters'
    gradients. A DDP-wrapped model is timed through its ``module`` (no gradient all-reduce).
    Under ``torch.distributed`` (unless ``distributed=False``) every rank must call it: the
    ranks time the same batches, the timings are averaged over them and rank 0's fit is
    broadcast, so that all ranks plan with the same weights; a rank that fails to time them
    makes every rank raise. A model sharded by FSDP or ZeRO-3 cannot run a forward outside its
    engine: measure an unsharded copy on one device (``distributed=False`` on that process),
    then pass the weights (``MeasuredCost.cost``) to every rank.

    Raises ``ConfigError`` when the timings do not grow with the tokens (too noisy to fit).
    """
    if mode not in ("padded", "packed"):
        raise ConfigError(f"mode must be 'padded' or 'packed', got {mode!r}")
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ConfigError(f"repeats must be a positive integer, got {repeats!r}")
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"measure_cost times a model, got {type(model).__name__}")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module  # compute alone: DDP would add its all-reduce to every backward
    config = _config_of(model)
    if getattr(config, "vision_config", None) is None:
        raise ConfigError(
            f"measure_cost times Qwen-VL models; {type(config).__name__} has no vision tower"
        )
    if not (isinstance(max_tokens, int) and max_tokens >= 256):
        raise ConfigError(f"max_tokens must be an integer >= 256, got {max_tokens!r}")
    if longest is not None and not (isinstance(longest, int) and 256 <= longest <= max_tokens):
        raise ConfigError(f"longest must be an integer in [256, max_tokens], got {longest!r}")
    shape = compute_cost(model, mode)  # the layout's terms (padded, dense mask); weights refitted
    batches = timing_batches(config, mode, max_tokens, longest, seed)
    terms = np.array([batch_terms(samples, shape) for samples in batches])
    dist = torch.distributed
    together = distributed and dist.is_available() and dist.is_initialized()
    failure, seconds = None, np.full(len(batches), np.nan)
    try:
        seconds = _time(model, [collator(model, mode)(samples) for samples in batches], repeats)
    except Exception as error:  # the other ranks must not wait for this one in the all-reduce
        failure = error
        model.zero_grad(set_to_none=True)
    if together:
        seconds = _averaged(seconds, model)
    if failure is not None:
        raise failure
    if not np.isfinite(seconds).all():
        raise ConfigError("measure_cost: another rank failed to time the batches")
    fitted = fit_cost(terms, seconds)
    if together:
        fitted = _from_rank_zero(fitted, model)
    token, fixed, weights, r2 = float(fitted[0]), float(fitted[1]), fitted[2:-1], float(fitted[-1])
    if not (math.isfinite(token) and token > 0):
        raise ConfigError(
            "measure_cost: the timed batches' seconds do not grow with their tokens; the "
            "device was too busy or the batches too small to time (raise max_tokens)"
        )
    cost = dataclasses.replace(
        shape,
        attention_weight=float(weights[0]),
        vision_weight=float(weights[1]),
        vision_attention_weight=float(weights[2]),
    )
    rows = tuple(
        {**dict(zip(_TERMS, map(int, row), strict=True)), "seconds": float(s)}
        for row, s in zip(terms, seconds, strict=True)
    )
    return MeasuredCost(cost, token, fixed, r2, float(weights[3]), rows)


def timing_batches(
    config: Any, mode: str, max_tokens: int, longest: int | None = None, seed: int = 0
) -> list[list[dict]]:
    """Processed samples of the batches to time, none over ``max_tokens`` tokens: text batches
    of the same tokens as one long sample or many short ones (the attention term against the
    tokens), and batches of images with the same patches in a few large or many small images
    (the vision tower's per-patch work against its attention within each image). ``longest``
    must be at least 256 (the shortest samples have ``longest / 64`` tokens)."""
    rng = np.random.default_rng(seed)
    text = _text_config(config)
    vision = config.vision_config
    merge = vision.spatial_merge_size
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    special = [getattr(config, name, None) for name in names]
    ordinary = min([text.vocab_size, *(s for s in special if s is not None)])
    features = pixel_features(vision)

    def sample(length: int, grids: tuple[int, ...] = ()) -> dict:
        pieces = [torch.from_numpy(rng.integers(0, ordinary, length))]
        for side in grids:
            tokens = side * side // (merge * merge)
            pieces.append(
                torch.tensor(
                    [
                        config.vision_start_token_id,
                        *[config.image_token_id] * tokens,
                        config.vision_end_token_id,
                    ]
                )
            )
        ids = torch.cat(pieces).long()
        types = (ids == config.image_token_id).long()
        out = {
            "input_ids": ids,
            "labels": ids.clone(),
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": types,
        }
        if grids:
            patches = sum(side * side for side in grids)
            out["pixel_values"] = torch.from_numpy(
                rng.standard_normal((patches, features), dtype=np.float32)
            )
            out["image_grid_thw"] = torch.tensor([[1, side, side] for side in grids])
        return out

    budget, longest = max_tokens, longest or max_tokens
    # Padded batches hold samples of four lengths (the longest, 7/8, 3/4 and 5/8 of it), so
    # that they carry padding and its attention mask as training batches do; a packed row's
    # samples are all of one length.
    padded = mode == "padded"

    def shorter(length: int, j: int) -> int:
        return length - (j % 4) * max(1, length // 8) if padded else length

    # (samples, tokens each): the budget's tokens in samples of the longest length, 1/8 and
    # 1/64 of it; then half the tokens, and a quarter in short samples
    text_shapes = [(budget // length, length) for length in (longest, longest // 8, longest // 64)]
    text_shapes += [(budget // longest, longest // 2), (budget // longest * 8, longest // 32)]
    batches = [[sample(shorter(length, j)) for j in range(n)] for n, length in text_shapes]
    # the largest square image (within the usual processor limit) whose tokens fill at most a
    # quarter of the budget, then 1/2 and 1/4 of its side at the same total patches (4x and
    # 16x the images), and half those patches
    big = max(merge, min(math.isqrt(budget // 4), _SIDE) * merge)
    text = 2 * _TEXT if padded else _TEXT  # padded: every other sample has _TEXT more text
    for side, images in ((big, 1), (big // 2, 4), (big // 4, 16), (big // 4, 8)):
        side = max(merge, side // merge * merge)
        per_sample = 2 + side * side // (merge * merge) + text
        count = min(images, budget // per_sample)
        lengths = [text - _TEXT * (j % 2) if padded else _TEXT for j in range(count)]
        batches.append([sample(length, (side,)) for length in lengths])
    return batches


def batch_terms(samples: list[dict], shape: odb.ComputeCost) -> list[float]:
    """``[tokens, pairs, patches, image_pairs, samples]`` of one batch, as ``shape`` (a
    ComputeCost of the mode, its weights unused) prices them: each term is the cost the
    planner gives the batch as a group (``shared_group``) with that term's weight 1 and the
    others 0, less the tokens."""
    sizes = [odb.measure_sample(s, i) for i, s in enumerate(samples)]
    plain = dataclasses.replace(
        shape, attention_weight=0.0, vision_weight=0.0, vision_attention_weight=0.0
    )

    def priced(**weights: float) -> float:
        return shared_group(sizes, odb.Budget(1, dataclasses.replace(plain, **weights))).cost

    tokens = priced()
    return [
        tokens,
        priced(attention_weight=1.0) - tokens,
        priced(vision_weight=1.0) - tokens,
        priced(vision_attention_weight=1.0) - tokens,
        float(len(sizes)),
    ]


def fit_cost(terms: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """``[token_seconds, fixed_seconds, weight of each term after the tokens..., r2]`` of
    ``seconds ~ fixed + token_seconds * (tokens + sum of weight * term)`` by least squares
    over the rows of ``terms`` (one per batch, the tokens first), the weights kept at 0 or more
    (a term whose weight comes out negative is dropped and the rest refitted, most negative
    first)."""
    terms = np.asarray(terms, dtype=np.float64)
    seconds = np.asarray(seconds, dtype=np.float64)
    scale = np.maximum(np.abs(terms).max(axis=0), 1.0)
    kept = [i for i in range(1, terms.shape[1]) if terms[:, i].any()]
    while True:
        columns = [0, *kept]
        design = np.column_stack([np.ones(len(seconds)), terms[:, columns] / scale[columns]])
        solution = np.linalg.lstsq(design, seconds, rcond=None)[0]
        slopes = solution[1:] / scale[columns]
        # the most negative in scaled units (each term over its largest value), not raw ones
        negative = [(solution[k + 2], i) for k, i in enumerate(kept) if solution[k + 2] < 0]
        if not negative:
            break
        kept.remove(min(negative)[1])
    per_term = np.zeros(terms.shape[1])
    per_term[columns] = slopes
    predicted = design @ solution
    spread = ((seconds - seconds.mean()) ** 2).sum()
    r2 = 1.0 - ((seconds - predicted) ** 2).sum() / spread if spread > 0 else 1.0
    token = per_term[0]
    weights = per_term[1:] / token if token > 0 else np.zeros(terms.shape[1] - 1)
    return np.array([token, solution[0], *weights, r2])


def _time(model: torch.nn.Module, batches: list[dict], repeats: int) -> np.ndarray:
    """Median seconds of a forward and backward pass of each batch; the batches take turns,
    so that a slow spell of the device spreads over all of them."""
    device = next(model.parameters()).device
    moved = [
        {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        for b in batches
    ]
    cuda = device.type == "cuda"
    times = np.zeros((repeats + 1, len(moved)))
    for attempt in range(repeats + 1):
        for j, batch in enumerate(moved):
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(**batch).loss.backward()
            if cuda:
                torch.cuda.synchronize(device)
            times[attempt, j] = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
    return np.median(times[1:], axis=0)


def _collective_device(model: torch.nn.Module) -> torch.device:
    device = next(model.parameters()).device
    return device if device.type == "cuda" else torch.device("cpu")


def _averaged(seconds: np.ndarray, model: torch.nn.Module) -> np.ndarray:
    """The timings averaged over the ranks of ``torch.distributed`` (NaN where a rank has
    none)."""
    total = torch.tensor(seconds, dtype=torch.float64, device=_collective_device(model))
    torch.distributed.all_reduce(total)
    return total.cpu().numpy() / torch.distributed.get_world_size()


def _from_rank_zero(fitted: np.ndarray, model: torch.nn.Module) -> np.ndarray:
    """Rank 0's fit on every rank (a fit from the same averaged timings could still differ in
    its last bits between hosts whose numerical libraries differ)."""
    values = torch.tensor(fitted, dtype=torch.float64, device=_collective_device(model))
    torch.distributed.broadcast(values, src=0)
    return values.cpu().numpy()
