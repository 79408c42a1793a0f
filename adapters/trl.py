"""Token-budgeted, rank-balanced micro-batches for TRL's ``GRPOTrainer``.

Where odb sits in one GRPO optimizer step (the stock trainer's parts are untouched)::

    generation batch (prompts)                               stock TRL
      -> generate completions, score rewards, advantages     stock TRL (vLLM or transformers)
      -> old / ref log-probs            [odb: forwards cut under the scoring budget]
      -> shuffle, equal row chunks      stock TRL (kept: same RNG, same chunks)
      -> accumulation window            [odb: the rows of the window's chunks are re-cut]
             rows sorted by length, cut into T groups under the budget; every rank runs T
             passes with the same number of rows in pass j (one all_gather of sorted sizes)
             each group trimmed of padding it does not need, images follow their rows
             T passes spread over the window's gradient-accumulation calls
      -> loss per pass                  stock ``_compute_loss``, times a per-loss-type factor
      -> backward per pass (no_sync but the last), optimizer step    stock HF Trainer

Why the per-pass factor (``_plan_window``) makes the window's gradient equal to the stock one: TRL
normalises each micro-batch's loss by a quantity that, for dapo/cispo/vespo, is the same for
every micro-batch of the window (a global token count), so any partition of the rows sums to
the same loss; for grpo/sapo/luspo/dr_grpo by the micro-batch's row count, which odb replaces
with the stock chunk's row count (factor ``rows / chunk_rows``); for bnpo by the micro-batch's
token count, so odb only cuts inside stock chunks and rescales by ``tokens / chunk_tokens``.

Padding: TRL lays a row out as a left-padded prompt and a right-padded completion, so a padded
batch is ``n * (max prompt + max completion)`` wide even when no row is that long. Every
forward odb runs moves each row's tokens to the left (``prompt | completion | pad``), so the
batch is ``n * max(prompt + completion)``: exactly the padded cost the core planner budgets.
Rotary position embeddings are relative and Qwen-VL's 3-D positions are derived from the
attention mask, so log-probabilities do not change (up to float rounding).

Use ``OdbGRPOTrainer(..., token_budget=...)`` or ``enable(trainer, token_budget)``; see
docs/rl.md.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from trl import GRPOTrainer
from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid

from odb.admit import Admission
from odb.align import FAILED
from odb.cost import Budget, Caps, ComputeCost, PaddedCost, SampleSize
from odb.errors import AlignmentError, ConfigError, OdbError
from odb.exchange import GlooExchange, LocalExchange
from odb.planner import plan_groups

__all__ = [
    "GRPOBatching",
    "GRPOBatchingStats",
    "OdbGRPOTrainer",
    "RolloutLayoutError",
    "RowSizes",
    "enable",
    "encode_rows",
    "envelope_groups",
    "fewest_groups",
    "ghost_slot",
    "own_groups",
    "sorted_segments",
    "split_groups",
]

logger = logging.getLogger(__name__)

# How TRL normalises one micro-batch's loss, by loss_type (trl/trainer/grpo_trainer.py,
# ``_compute_loss``): "window" = by a count that is the same for the whole accumulation
# window; "rows" = by the micro-batch's row count; "chunk_tokens" = by its loss-token count.
_NORMALISATION = {
    "dapo": "window",
    "cispo": "window",
    "vespo": "window",
    "grpo": "rows",
    "sapo": "rows",
    "luspo": "rows",
    "dr_grpo": "rows",
    "bnpo": "chunk_tokens",
}

# Per-token tensors laid out over the prompt (left-padded) or over prompt + completion.
_PROMPT_KEYS = ("prompt_ids", "prompt_mask")
_SEQUENCE_KEYS = ("token_type_ids", "mm_token_type_ids")
# Per-image tensors: they follow their rows (through num_images) but have no token axis.
_IMAGE_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "image_position_ids",
)


class RolloutLayoutError(OdbError, ValueError):
    """A rollout batch is not laid out as TRL lays it out (left-padded prompts, right-padded
    completions), so odb cannot tell its rows' lengths."""


@dataclass(frozen=True)
class GRPOBatching:
    """How odb cuts GRPO rollouts into forward/backward passes.

    ``token_budget`` bounds every forward of the policy during training: with the default
    :class:`~odb.PaddedCost`, ``rows * longest (prompt + completion)``. ``scoring_budget``
    bounds the no-grad forwards that compute old/reference log-probs (and evaluation losses);
    it defaults to ``token_budget``. ``over_budget``: a single rollout longer than the budget
    raises (``"error"``) or runs alone (``"solo"``, counted in the stats).
    """

    token_budget: float
    cost: ComputeCost = field(default_factory=PaddedCost)
    max_samples: int | None = None
    max_images: int | None = None
    max_vision_patches: int | None = None
    max_tokens: int | None = None
    over_budget: str = "error"
    scoring_budget: float | None = None
    align_timeout: float = 1800.0

    def __post_init__(self) -> None:
        if not isinstance(self.cost, ComputeCost) or not self.cost.padded:
            raise ConfigError(
                "odb's GRPO adapter runs padded forwards (rows of one micro-batch padded to the "
                "longest); pass a padded cost model (odb.PaddedCost() or "
                "odb.ComputeCost(padded=True, ...)). Packed GRPO forwards are not implemented."
            )
        if self.over_budget not in ("error", "solo"):
            raise ConfigError(
                f"over_budget must be 'error' or 'solo' for GRPO rollouts, got "
                f"{self.over_budget!r} (cutting a rollout would change its loss)"
            )
        if not self.align_timeout > 0:
            raise ConfigError(f"align_timeout must be > 0 seconds, got {self.align_timeout!r}")
        _ = self.budget, self.scoring  # Budget and Caps validate the numbers

    @property
    def caps(self) -> Caps:
        return Caps(self.max_samples, self.max_images, self.max_vision_patches, self.max_tokens)

    @property
    def budget(self) -> Budget:
        return Budget(self.token_budget, self.cost, self.caps)

    @property
    def scoring(self) -> Budget:
        limit = self.token_budget if self.scoring_budget is None else self.scoring_budget
        return Budget(limit, self.cost, self.caps)


@dataclass
class GRPOBatchingStats:
    """Running totals of this rank, for logs and benchmarks.

    A *window* is the set of accumulation calls planned together: an optimizer step's calls,
    or the part of them up to the next generation. Token counts are rows times padded width.
    ``padded_tokens`` / ``real_tokens``: what odb's training forwards computed / the rows'
    own tokens; ``stock_tokens`` / ``max_stock_tokens``: what the stock trainer's training
    forwards would compute on the same rows in total / at most in one forward (equal chunks
    padded to the generation batch's widths). ``max_forward_tokens`` and
    ``max_scoring_tokens``: the largest training and no-grad forward odb ran.
    ``window_passes``: passes per window (the same on every rank); ``window_fewest``: the
    fewest this rank alone would have needed. ``ghost_rows``: zero-weight copies run to keep
    row counts equal across ranks; ``solo_rows``: over-budget rows run alone.
    """

    windows: int = 0
    passes: int = 0
    ghost_rows: int = 0
    solo_rows: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    stock_tokens: int = 0
    max_stock_tokens: int = 0
    max_forward_tokens: int = 0
    max_scoring_tokens: int = 0
    scoring_tokens: int = 0
    window_passes: list[int] = field(default_factory=list)
    window_fewest: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Planning: pure functions of the rows' sizes (no trainer, no torch.distributed).


@dataclass(frozen=True)
class RowSizes:
    """Per rollout row: ``lengths`` (prompt + completion tokens), vision ``patches``,
    ``images``."""

    lengths: np.ndarray
    patches: np.ndarray
    images: np.ndarray

    @classmethod
    def text(cls, lengths: Sequence[int]) -> RowSizes:
        lengths = np.asarray(lengths, dtype=np.int64)
        zeros = np.zeros_like(lengths)
        return cls(lengths, zeros, zeros)

    def __len__(self) -> int:
        return len(self.lengths)

    def cost(self, rows: np.ndarray, budget: Budget) -> float:
        """What a padded forward of ``rows`` costs under ``budget``'s cost model."""
        lengths = self.lengths[rows]
        return float(
            budget.cost.group_cost(
                len(rows),
                lengths.max(),
                lengths.sum(),
                (lengths * lengths).sum(),
                self.patches[rows].sum(),
            )
        )


def _solo_rows(sizes: RowSizes, budget: Budget, over_budget: str) -> np.ndarray:
    """Rows that cannot share a forward (over the budget alone); an error unless ``solo``."""
    admission = Admission(budget, over_budget)
    hint = "raise token_budget to at least the longest prompt plus max_completion_length"
    return np.array(
        [
            admission.verdict(
                SampleSize(int(n), 0, int(p), int(i)),
                row,
                subject=f"rollout row {row} of this rank (prompt + completion)",
                hint=hint,
            )
            is not None
            for row, (n, p, i) in enumerate(
                zip(sizes.lengths, sizes.patches, sizes.images, strict=True)
            )
        ],
        dtype=bool,
    )


def _segments(n: int, segments: Sequence[np.ndarray] | None) -> list[np.ndarray]:
    if segments is None:
        return [np.arange(n)]
    return [np.asarray(s, dtype=np.int64) for s in segments if len(s)]


def _plan(rows: np.ndarray, sizes: RowSizes, solo: np.ndarray, budget: Budget) -> list:
    """The core planner's fewest groups of ``rows`` (greedy cut of the length-sorted rows)."""
    plan = plan_groups(
        sizes.lengths[rows],
        sizes.patches[rows],
        sizes.images[rows],
        np.zeros(len(rows), dtype=np.int64),
        solo[rows],
        budget,
        fill_threshold=0.0,
        max_wait=1,
        keep=0,
        final=True,
    )
    return [rows[group.members] for group in plan.groups]


def fewest_groups(
    sizes: RowSizes,
    budget: Budget,
    *,
    over_budget: str = "error",
    segments: Sequence[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """The fewest groups of rows whose padded forwards fit ``budget``; a group never spans two
    ``segments`` (bnpo's stock chunks). Each group lists its rows longest first."""
    solo = _solo_rows(sizes, budget, over_budget)
    return [g for rows in _segments(len(sizes), segments) for g in _plan(rows, sizes, solo, budget)]


def split_groups(
    sizes: RowSizes,
    budget: Budget,
    count: int,
    *,
    over_budget: str = "error",
    segments: Sequence[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Exactly ``min(count, rows)`` groups under ``budget``, with the costliest one as cheap as
    the greedy search finds; groups never span two ``segments``.

    Every rank runs the same number of passes, so a rank that needs fewer than ``count``
    spreads its rows over ``count`` lighter passes instead of idling: per segment, the smallest
    budget whose fewest groups are at most its share (bisection over the core planner), then
    the costliest groups are halved; extra passes go to the segment whose costliest group is
    the most expensive. Returns groups costliest first.
    """
    solo = _solo_rows(sizes, budget, over_budget)
    segments = _segments(len(sizes), segments)
    target = min(count, len(sizes))
    parts = [_plan(rows, sizes, solo, budget) for rows in segments]
    if sum(len(p) for p in parts) > target:
        raise ValueError(
            f"{sum(len(p) for p in parts)} groups are needed under the budget, more than "
            f"the {count} passes asked for"
        )
    shares = [len(p) for p in parts]
    while sum(shares) < target:
        open_ = [i for i, rows in enumerate(segments) if shares[i] < len(rows)]
        worst = max(open_, key=lambda i: max(sizes.cost(g, budget) for g in parts[i]))
        shares[worst] += 1
        parts[worst] = _at_most(segments[worst], sizes, solo, budget, shares[worst])
    groups = [g for part in parts for g in part]
    return sorted(groups, key=lambda g: -sizes.cost(g, budget))


def _at_most(rows, sizes, solo, budget, count) -> list[np.ndarray]:
    """Exactly ``count`` (<= len(rows)) groups of ``rows`` with a small costliest group."""
    free = rows[~solo[rows]]
    low = max((sizes.cost(np.array([r]), budget) for r in free), default=budget.limit)
    high = budget.limit
    best = _plan(rows, sizes, solo, budget)
    while high - low > max(0.5, 1e-9 * high):
        mid = (low + high) / 2
        groups = _plan(rows, sizes, solo, Budget(mid, budget.cost, budget.caps))
        if len(groups) <= count:
            high, best = mid, groups
        else:
            low = mid
    best = list(best)
    while len(best) < count:
        splittable = [g for g in best if len(g) > 1]
        worst = max(splittable, key=lambda g: sizes.cost(g, budget))
        best = [g for g in best if g is not worst] + list(_halve(worst, sizes, budget))
    return best


def _halve(group: np.ndarray, sizes: RowSizes, budget: Budget) -> tuple[np.ndarray, np.ndarray]:
    """Split a longest-first group at the point that makes its costlier half cheapest."""
    splits = range(1, len(group))
    best = min(
        splits,
        key=lambda s: max(sizes.cost(group[:s], budget), sizes.cost(group[s:], budget)),
    )
    return group[:best], group[best:]


def encode_rows(
    sizes: RowSizes, ordered: Sequence[np.ndarray], capacity: int, status: int = 0
) -> np.ndarray:
    """One rank's report: ``[status, rows, lengths, patches, images]``, the three columns
    ``capacity * len(ordered)`` wide; segment k's rows (longest first) fill the slots from
    ``k * capacity``. Every rank must use the same ``capacity`` and number of segments."""
    width = capacity * len(ordered)
    report = np.zeros(2 + 3 * width, dtype=np.int64)
    report[0], report[1] = status, sum(len(rows) for rows in ordered)
    columns = report[2:].reshape(3, width)
    for k, rows in enumerate(ordered):
        if len(rows) > capacity:
            raise ValueError(f"segment {k} has {len(rows)} rows, more than its {capacity} slots")
        slots = k * capacity + np.arange(len(rows))
        columns[0, slots] = sizes.lengths[rows]
        columns[1, slots] = sizes.patches[rows]
        columns[2, slots] = sizes.images[rows]
    return report


def envelope_groups(
    table: np.ndarray, capacity: int, budget: Budget, count: int = 1
) -> list[np.ndarray]:
    """The passes every rank runs, as arrays of report slots; the same on every rank.

    ``table`` stacks the ranks' :func:`encode_rows` reports. Slot by slot, the envelope takes
    the largest length, patches and images over the ranks (each rank's rows are sorted, so a
    slot holds every rank's i-th longest row of a segment); a rank with no row in a slot that
    another rank fills counts with its ghost row there (see :func:`ghost_slot`). Groups planned
    on the envelope fit the budget on every rank, ghosts included, and every rank puts the
    same number of rows in pass j; at least ``count`` passes.
    """
    world = len(table)
    width = (table.shape[1] - 2) // 3
    columns = table[:, 2:].reshape(world, 3, width)
    filled = columns[:, 0, :] > 0
    ghosts = np.zeros((world, 3, 1), dtype=np.int64)
    for rank in np.flatnonzero(filled.any(axis=1)):
        ghosts[rank, :, 0] = columns[rank, :, ghost_slot(columns[rank, 0])]
    envelope = np.where(filled[:, None, :], columns, ghosts).max(axis=0)
    present = filled.any(axis=0)
    sizes = RowSizes(envelope[0] * present, envelope[1] * present, envelope[2] * present)
    segments = [
        k * capacity + np.flatnonzero(present[k * capacity : (k + 1) * capacity])
        for k in range(width // capacity)
    ]
    fewest = fewest_groups(sizes, budget, over_budget="solo", segments=segments)
    return split_groups(
        sizes, budget, max(len(fewest), count), over_budget="solo", segments=segments
    )


def ghost_slot(lengths: np.ndarray) -> int:
    """The report slot of the row a rank copies for its ghost rows: its shortest (the first
    such slot), so a ghost costs the least."""
    filled = np.flatnonzero(lengths > 0)
    return int(filled[np.argmin(lengths[filled])])


def sorted_segments(sizes: RowSizes, segments: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each segment's rows, longest first (ties by row): the order of a rank's report slots."""
    return [rows[np.lexsort((rows, -sizes.lengths[rows]))] for rows in segments]


def own_groups(
    sizes: RowSizes, ordered: Sequence[np.ndarray], passes: Sequence[np.ndarray], capacity: int
) -> list[tuple[int, np.ndarray, int]]:
    """This rank's share of the agreed ``passes`` (from :func:`envelope_groups`): per pass,
    ``(segment, rows, ghosts)``; the last ``ghosts`` rows are copies of the rank's ghost row.
    ``ordered`` is what :func:`sorted_segments` gave for this rank's report."""
    slots = np.full(capacity * len(ordered), -1, dtype=np.int64)
    for k, rows in enumerate(ordered):
        slots[k * capacity : k * capacity + len(rows)] = rows
    filled = slots >= 0
    lengths = np.zeros(len(slots), dtype=np.int64)
    lengths[filled] = sizes.lengths[slots[filled]]
    ghost = slots[ghost_slot(lengths)] if filled.any() else -1
    groups = []
    for group in passes:
        own = slots[group]
        real = own[own >= 0]
        ghosts = len(own) - len(real)
        if ghosts and ghost < 0:
            raise AlignmentError("a rank without rollout rows cannot fill its share of a pass")
        rows = np.concatenate([real, np.full(ghosts, ghost, dtype=np.int64)])
        groups.append((int(group[0]) // capacity, rows, ghosts))
    return groups


# --------------------------------------------------------------------------------------------
# Rows of TRL's rollout dicts.


def _concat_rows(chunks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The stock chunks of a window as one dict, with per-image tensors split per row."""
    parts = [split_pixel_values_by_grid(dict(chunk)) for chunk in chunks]
    out: dict[str, Any] = {}
    for key, first in parts[0].items():
        values = [part[key] for part in parts]
        if isinstance(first, torch.Tensor) and first.ndim > 0:
            out[key] = torch.cat(values)
        elif isinstance(first, list):
            out[key] = [item for value in values for item in value]
        else:  # None, a 0-d tensor (num_items_in_batch), a scalar: the same for every chunk
            out[key] = first
    return out


def _take_rows(split: Mapping[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    """Rows of a per-row-split dict (see ``_concat_rows``), images following their rows."""
    rows = [int(r) for r in rows]
    index = torch.tensor(rows, dtype=torch.long)
    out: dict[str, Any] = {}
    for key, value in split.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            out[key] = value[index.to(value.device)]
        elif isinstance(value, list):
            out[key] = [value[r] for r in rows]
        else:
            out[key] = value
    if "num_images" in out and out["num_images"] is not None and not sum(out["num_images"]):
        for key in _IMAGE_KEYS:  # no image in these rows: an empty pixel tensor would break
            out.pop(key, None)
    return unsplit_pixel_values_by_grid(out)


def _trim(batch: dict[str, Any]) -> dict[str, Any]:
    """Drop the padding columns no row of ``batch`` needs (TRL's rollout layout)."""
    prompt_mask, completion_mask = batch["prompt_mask"], batch["completion_mask"]
    rows, prompt_width = prompt_mask.shape
    width = completion_mask.shape[1]
    keep_prompt = int(prompt_mask.sum(1).max())
    keep = max(1, int(completion_mask.sum(1).max()))
    start = prompt_width - keep_prompt
    out = {}
    for key, value in batch.items():
        if key in _IMAGE_KEYS or not isinstance(value, torch.Tensor) or value.ndim < 2:
            out[key] = value
        elif key in _PROMPT_KEYS:
            out[key] = value[:, start:]
        elif key in _SEQUENCE_KEYS:
            out[key] = value[:, start : prompt_width + keep]
        elif value.shape[0] == rows and value.shape[1] == width:
            out[key] = value[:, :keep]  # completion-aligned: ids, masks, log-probs, ratios
        else:
            out[key] = value
    return out


def _loss_tokens(batch: Mapping[str, Any]) -> torch.Tensor:
    mask = batch["completion_mask"]
    if batch.get("tool_mask") is not None:
        mask = mask * batch["tool_mask"]
    return mask.sum(1)


def _row_vision(
    rows: int, image_grid_thw: Any, num_images: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """(patches, images) per row; ``image_grid_thw`` is one tensor or a per-row list."""
    images = np.asarray(num_images if num_images is not None else [0] * rows, dtype=np.int64)
    patches = np.zeros(rows, dtype=np.int64)
    if image_grid_thw is None or num_images is None:
        return patches, images
    if isinstance(image_grid_thw, torch.Tensor):
        image_grid_thw = torch.split(image_grid_thw, list(num_images))
    for row, grid in enumerate(image_grid_thw):
        patches[row] = int(grid.prod(-1).sum()) if len(grid) else 0
    return patches, images


@dataclass(frozen=True)
class _Layout:
    """Where each row's tokens sit in a ``[rows, prompt_width + completion_width]`` batch."""

    prompt: torch.Tensor  # real prompt tokens per row (left-padded)
    completion: torch.Tensor  # real completion tokens per row (right-padded)
    prompt_width: int

    @classmethod
    def of(cls, attention_mask: torch.Tensor, completion_width: int) -> _Layout:
        prompt_width = attention_mask.shape[1] - completion_width
        mask = attention_mask.bool()
        prompt = mask[:, :prompt_width].sum(1)
        completion = mask[:, prompt_width:].sum(1)
        columns = torch.arange(attention_mask.shape[1], device=mask.device)
        expected = (columns >= (prompt_width - prompt)[:, None]) & (
            columns < (prompt_width + completion)[:, None]
        )
        if not torch.equal(mask, expected):
            raise RolloutLayoutError(
                "odb expects TRL's rollout layout: a left-padded prompt then a right-padded "
                "completion, with no gaps in the attention mask; got another layout"
            )
        if int(prompt.min()) < 1:
            raise RolloutLayoutError("every rollout row needs at least one prompt token")
        return cls(prompt, completion, prompt_width)

    @property
    def lengths(self) -> torch.Tensor:
        return self.prompt + self.completion


# --------------------------------------------------------------------------------------------
# The trainer side.


@dataclass
class _Pass:
    """One forward/backward: rows of the window (the last ``ghosts`` are zero-weight copies),
    the loss factor, its padded tokens. Inputs are built when the pass runs, so a window's
    rows are copied once at a time rather than all at once."""

    window: dict[str, Any]
    rows: np.ndarray
    ghosts: int
    scale: float
    tokens: int

    def inputs(self) -> dict[str, Any]:
        batch = _take_rows(self.window, self.rows)
        if self.ghosts:  # copies that keep row counts equal across ranks; no loss tokens
            mask = batch.get("tool_mask")
            mask = torch.ones_like(batch["completion_mask"]) if mask is None else mask.clone()
            mask[len(self.rows) - self.ghosts :] = 0
            batch["tool_mask"] = mask
        return _trim(batch)


@dataclass
class _Passes:
    """What ``_prepare_inputs`` hands to ``compute_loss`` for one accumulation call."""

    passes: list[_Pass]


class _Batcher:
    """odb's state on one trainer: the passes planned for the current window, the stats."""

    def __init__(self, trainer: GRPOTrainer, config: GRPOBatching):
        self.trainer = trainer
        self.config = config
        self.stats = GRPOBatchingStats()
        self._pending: collections.deque = collections.deque()
        self._window_pos = 0
        self._exchange: Any = None
        self._check(trainer)

    @staticmethod
    def _check(trainer: GRPOTrainer) -> None:
        if trainer.loss_type not in _NORMALISATION:
            raise ConfigError(
                f"loss_type {trainer.loss_type!r} is not supported by odb's GRPO adapter "
                f"(supported: {', '.join(sorted(_NORMALISATION))})"
            )
        if trainer.is_deepspeed_enabled:
            raise ConfigError(
                "odb's GRPO adapter does not support DeepSpeed: the DeepSpeed engine counts "
                "micro-steps itself and would step the optimizer inside odb's passes"
            )
        per_forward = []
        if trainer._entropy_bonus_enabled:
            per_forward.append("the entropy bonus (entropy_coef, use_adaptive_entropy)")
        if trainer.aux_loss_enabled:
            per_forward.append("the MoE router auxiliary loss (router_aux_loss_coef)")
        if per_forward:
            raise ConfigError(
                f"odb cannot keep {' and '.join(per_forward)} equal to the stock trainer: TRL "
                f"adds it once per forward divided by gradient_accumulation_steps, and odb runs "
                f"a different number of forwards; set it to 0 or train without odb"
            )
        if trainer.top_entropy_quantile < 1.0:
            logger.warning(
                "odb: top_entropy_quantile < 1 picks the high-entropy tokens of each forward; "
                "odb's forwards hold other rows than the stock micro-batches, so the tokens "
                "picked differ from the stock trainer's"
            )

    # -- hooks ---------------------------------------------------------------------------

    def prepare_inputs(self, stock: Callable, generation_batch: Any) -> Any:
        trainer = self.trainer
        if not trainer.model.training:
            return stock(generation_batch)
        step = trainer._step
        chunk = stock(generation_batch)  # generation, shuffle and chunking exactly as stock
        if not self._pending:
            self._plan_window(step, chunk)
        expected, passes = self._pending.popleft()
        if chunk is not expected:
            raise RuntimeError(
                "odb planned this accumulation call on another stock micro-batch than the "
                "trainer returned; a subclass probably changed _prepare_inputs' buffering"
            )
        self._window_pos = 0 if trainer.accelerator.sync_gradients else self._window_pos + 1
        return _Passes(passes)

    def compute_loss(
        self,
        stock: Callable,
        model: torch.nn.Module,
        inputs: Any,
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        if not isinstance(inputs, _Passes):
            return stock(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        accelerator = self.trainer.accelerator
        earlier = None
        *first, last = inputs.passes
        for item in first:
            # DDP decides at forward time whether the backward all-reduces: both inside no_sync.
            with accelerator.no_sync(model):
                loss = stock(model, item.inputs()) * item.scale
                accelerator.backward(loss)
            earlier = loss.detach() if earlier is None else earlier + loss.detach()
        loss = stock(model, last.inputs()) * last.scale  # the Trainer runs this backward
        return loss if earlier is None else loss + earlier

    def per_token_logps(
        self,
        stock: Callable,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        **extras: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        extras = {k: v for k, v in extras.items() if v is not None}
        layout = _Layout.of(attention_mask, logits_to_keep)
        grad = torch.is_grad_enabled()
        if batch_size is None and grad:  # a training pass: planned under the budget already
            return self._forward(
                stock, model, input_ids, layout, compute_entropy, compute_aux_loss, extras
            )
        # Scoring (old/ref log-probs, evaluation): no graph is kept, so cut under the budget.
        # Every rank runs the same number of forwards (a sharded model gathers its weights in
        # each); the report's width comes from the configured batch sizes, equal on all ranks.
        patches, images = _row_vision(
            len(input_ids), extras.get("image_grid_thw"), extras.get("num_images")
        )
        sizes = RowSizes(layout.lengths.cpu().numpy(), patches, images)
        args = self.trainer.args
        capacity = max(
            len(sizes),  # (a larger call than TRL's own would fail loudly in the exchange)
            args.per_device_train_batch_size * args.steps_per_generation,
            args.per_device_eval_batch_size,
        )
        groups = self._aligned(sizes, [np.arange(len(sizes))], capacity, 1, self.config.scoring)
        split = split_pixel_values_by_grid(
            {"input_ids": input_ids, "attention_mask": attention_mask, **extras}
        )
        logps = entropies = None
        aux = []
        for _, rows, ghosts in groups:
            real = rows[: len(rows) - ghosts]  # ghost copies give no log-probs: run one only
            part = _take_rows(split, real if len(real) else rows[:1])  # when it is alone
            ids, mask = part.pop("input_ids"), part.pop("attention_mask")
            part_layout = _Layout.of(mask, logits_to_keep)
            lp, ent, aux_loss = self._forward(
                stock, model, ids, part_layout, compute_entropy, compute_aux_loss, part
            )
            if not len(real):
                continue  # other ranks' rows needed this forward
            index = torch.as_tensor(real, device=lp.device)
            if logps is None:
                logps = lp.new_zeros(len(input_ids), logits_to_keep)
                entropies = None if ent is None else ent.new_zeros(logps.shape)
            logps = logps.index_copy(0, index, lp)
            if ent is not None:
                entropies = entropies.index_copy(0, index, ent)
            if aux_loss is not None:
                aux.append(aux_loss)
        return logps, entropies, (torch.stack(aux).mean() if aux else None)

    # -- one forward -----------------------------------------------------------------------

    def _forward(self, stock, model, input_ids, layout, compute_entropy, compute_aux_loss, extras):
        """One stock forward with every row's tokens moved left, so the batch is only as wide
        as its longest row; log-probs come back in TRL's ``[rows, completion_width]`` layout."""
        rows, total = input_ids.shape
        device = input_ids.device
        lengths = layout.lengths.to(device)
        width = int(lengths.max())
        columns = torch.arange(width, device=device)
        source = (columns + (layout.prompt_width - layout.prompt.to(device))[:, None]).clamp(
            max=total - 1
        )
        valid = columns < lengths[:, None]
        pad = self.trainer._tokenizer.pad_token_id or 0
        ids = input_ids.gather(1, source).masked_fill(~valid, pad)
        extras = dict(extras)
        for key in _SEQUENCE_KEYS:
            if key in extras:
                extras[key] = extras[key].gather(1, source).masked_fill(~valid, 0)
        shortest_prompt = int(layout.prompt.min())
        keep = max(1, width - shortest_prompt)
        lp, ent, aux = stock(
            model,
            ids,
            valid.long(),
            keep,
            batch_size=None,
            compute_entropy=compute_entropy,
            compute_aux_loss=compute_aux_loss,
            **extras,
        )
        # Column t of lp scores token (width - keep + t); completion token j of row i sits at
        # column prompt_i + j of the moved row.
        completion_width = total - layout.prompt_width
        out_columns = torch.arange(completion_width, device=device)
        target = (layout.prompt.to(device) - (width - keep))[:, None] + out_columns
        target = target.clamp(0, keep - 1)
        real = out_columns < layout.completion.to(device)[:, None]
        lp = lp.gather(1, target).masked_fill(~real, 0.0)
        if ent is not None:
            ent = ent.gather(1, target).masked_fill(~real, 0.0)
        tokens = rows * width
        stats = self.stats
        if torch.is_grad_enabled():
            stats.max_forward_tokens = max(stats.max_forward_tokens, tokens)
        else:
            stats.max_scoring_tokens = max(stats.max_scoring_tokens, tokens)
            stats.scoring_tokens += tokens
        return lp, ent, aux

    # -- planning ----------------------------------------------------------------------------

    def _plan_window(self, step: int, chunk: Mapping[str, Any]) -> None:
        """Plan the passes of the accumulation calls from ``step`` to the end of the window
        (or to the next generation, whichever comes first: later rows do not exist yet)."""
        trainer, config = self.trainer, self.config
        per_generation = trainer.args.steps_per_generation
        every = per_generation * trainer.num_iterations
        calls = min(
            trainer.current_gradient_accumulation_steps - self._window_pos,
            every - step % every,
        )
        chunks = [trainer._buffered_inputs[(step + k) % per_generation] for k in range(calls)]
        if chunks[0] is not chunk:
            raise RuntimeError("odb could not find this call's micro-batch in TRL's buffer")
        window = _concat_rows(chunks)
        layout = _Layout.of(
            torch.cat([window["prompt_mask"], window["completion_mask"]], dim=1),
            window["completion_mask"].shape[1],
        )
        patches, images = _row_vision(
            len(layout.prompt), window.get("image_grid_thw"), window.get("num_images")
        )
        sizes = RowSizes(layout.lengths.cpu().numpy(), patches, images)
        kind = _NORMALISATION[trainer.loss_type]
        chunk_rows = trainer.args.per_device_train_batch_size
        bounds = np.cumsum([0] + [len(c["completion_mask"]) for c in chunks])
        if kind == "chunk_tokens":  # bnpo: never mix two stock chunks in one pass
            segments = [np.arange(a, b) for a, b in itertools.pairwise(bounds)]
            capacity = chunk_rows
        else:  # room for a generation batch (a window can reuse chunks: num_iterations)
            segments = [np.arange(len(sizes))]
            capacity = chunk_rows * max(calls, per_generation)
        groups = self._aligned(sizes, segments, capacity, calls, config.budget)

        loss_tokens = _loss_tokens(window).cpu().numpy()
        work = []
        for segment, rows, ghosts in groups:
            if kind == "window":
                scale = 1.0
            elif kind == "rows":
                scale = len(rows) / chunk_rows
            else:
                own = int(loss_tokens[rows[: len(rows) - ghosts]].sum())
                whole = int(loss_tokens[segments[segment]].sum())
                scale = max(1, own) / max(1, whole)
            tokens = len(rows) * int(sizes.lengths[rows].max())
            work.append(_Pass(window, rows, ghosts, scale, tokens))

        passes = len(work)
        stats = self.stats
        stats.windows += 1
        stats.passes += passes
        stats.ghost_rows += sum(p.ghosts for p in work)
        stats.solo_rows += int(_solo_rows(sizes, config.budget, "solo").sum())
        stats.real_tokens += int(sizes.lengths.sum())
        stats.padded_tokens += sum(p.tokens for p in work)  # ghost rows included
        stock = [c["prompt_ids"].numel() + c["completion_ids"].numel() for c in chunks]
        stats.stock_tokens += sum(stock)
        stats.max_stock_tokens = max(stats.max_stock_tokens, *stock)
        stats.window_passes.append(passes)
        stats.window_fewest.append(
            len(fewest_groups(sizes, config.budget, over_budget="solo", segments=segments))
        )
        metrics = trainer._metrics["train"]
        metrics["odb/passes"].append(float(passes))
        metrics["odb/max_pass_tokens"].append(float(max(p.tokens for p in work)))
        computed = sum(p.tokens for p in work)
        metrics["odb/padding"].append(1.0 - float(sizes.lengths.sum()) / max(1, computed))
        self._pending.extend(
            (chunks[k], work[k * passes // calls : (k + 1) * passes // calls]) for k in range(calls)
        )

    def _aligned(self, sizes, segments, capacity, count, budget) -> list:
        """Groups of this rank's rows, ``(segment, rows, ghost rows)``, that every rank agrees
        on: the same number of passes (at least ``count``) and the same number of rows in pass
        j on every rank, which TRL's per-row metric gathers need. One all_gather of each
        rank's sorted sizes (``encode_rows``) over odb's gloo group; one process skips it."""
        ordered = sorted_segments(sizes, segments)
        error = None
        try:
            _solo_rows(sizes, budget, self.config.over_budget)  # "error": name the row here
            report = encode_rows(sizes, ordered, capacity)
        except Exception as raised:  # tell the other ranks before raising, so none waits
            error = raised
            report = np.zeros(2 + 3 * capacity * len(segments), dtype=np.int64)
            report[0] = FAILED
        table = self._exchanger().gather(report)
        if error is not None:
            raise error
        failed = np.flatnonzero(table[:, 0] & FAILED)
        if failed.size:
            raise AlignmentError(
                f"rank(s) {failed.tolist()} could not plan their rollouts under the token "
                f"budget; see their error"
            )
        passes = envelope_groups(table, capacity, budget, count)
        return own_groups(sizes, ordered, passes, capacity)

    def _exchanger(self):
        if self._exchange is None:
            if self.trainer.accelerator.num_processes > 1:
                self._exchange = GlooExchange(self.config.align_timeout)
            else:
                self._exchange = LocalExchange()
        return self._exchange


# --------------------------------------------------------------------------------------------
# Public entry points.


class OdbGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose training forwards hold at most ``token_budget`` tokens.

    ``odb_options`` are the other fields of :class:`GRPOBatching`; every other argument is
    ``GRPOTrainer``'s. ``odb_stats`` reports what odb did.
    """

    def __init__(
        self,
        *args: Any,
        token_budget: float,
        odb_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        config = GRPOBatching(token_budget, **dict(odb_options or {}))
        super().__init__(*args, **kwargs)
        self._odb = _Batcher(self, config)

    @property
    def odb_stats(self) -> GRPOBatchingStats:
        return self._odb.stats

    def _prepare_inputs(self, generation_batch):
        return self._odb.prepare_inputs(super()._prepare_inputs, generation_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return self._odb.compute_loss(
            super().compute_loss, model, inputs, return_outputs, num_items_in_batch
        )

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, *args, **kw):
        return self._odb.per_token_logps(
            super()._get_per_token_logps_and_entropies,
            model,
            input_ids,
            attention_mask,
            *args,
            **kw,
        )


_HOOKS = {
    "_prepare_inputs": "prepare_inputs",
    "compute_loss": "compute_loss",
    "_get_per_token_logps_and_entropies": "per_token_logps",
}


def enable(trainer: GRPOTrainer, token_budget: float, **options: Any) -> GRPOTrainer:
    """Turn odb on for this ``GRPOTrainer`` instance only; returns the trainer.

    The trainer's own methods (its class's, including a subclass's overrides) stay the stock
    behaviour odb wraps; nothing in TRL's classes changes. ``options`` are the other fields of
    :class:`GRPOBatching`. The stats are at ``trainer.odb_stats``.
    """
    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"enable() needs a trl.GRPOTrainer, got {type(trainer).__name__}")
    if getattr(trainer, "_odb", None) is not None:
        raise ConfigError("odb is already enabled on this trainer")
    batcher = _Batcher(trainer, GRPOBatching(token_budget, **options))
    for name, hook in _HOOKS.items():
        stock = getattr(trainer, name)
        setattr(trainer, name, functools.partial(getattr(batcher, hook), stock))
    trainer._odb = batcher
    trainer.odb_stats = batcher.stats
    return trainer
