"""odb inside ``trl.GRPOTrainer``: its settings, its state on one trainer, and the hooks.

The trainer layer, the only one that needs ``GRPOTrainer``: each accumulation window is
planned with :mod:`.planning` on the rows :mod:`.layout` reads, agreed on across ranks over
odb's exchange, and run as passes inside the stock ``compute_loss``; no-grad log-prob forwards
are cut under the scoring budget the same way.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from trl import GRPOTrainer
from trl.trainer.utils import split_pixel_values_by_grid

from odb.adapters.trl.layout import (
    _SEQUENCE_KEYS,
    _concat_rows,
    _Layout,
    _loss_tokens,
    _row_vision,
    _take_rows,
    _trim,
)
from odb.adapters.trl.planning import (
    RowSizes,
    _solo_rows,
    encode_rows,
    envelope_groups,
    fewest_groups,
    own_groups,
    sorted_segments,
)
from odb.align import FAILED, cause_of, check_reports
from odb.cost import Budget, Caps, ComputeCost, PaddedCost
from odb.errors import ConfigError
from odb.exchange import world_exchange

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
                _inner_backward(accelerator, loss)
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
            report[:2] = FAILED, cause_of(raised)  # the cause in place of the row count
        table = self._exchanger().gather(report)
        if error is not None:
            raise error
        check_reports(table, "while planning their rollouts under the token budget", cause=1)
        passes = envelope_groups(table, capacity, budget, count)
        return own_groups(sizes, ordered, passes, capacity)

    def _exchanger(self):
        if self._exchange is None:
            self._exchange = world_exchange(self.config.align_timeout)
        return self._exchange


def _inner_backward(accelerator: Any, loss: torch.Tensor) -> None:
    """The backward of a pass before the accumulation call's last one (whose backward the
    Trainer runs).

    Under DeepSpeed, ``accelerator.backward`` would mark this pass as the end of the window
    whenever the call is the window's last (``set_gradient_accumulation_boundary`` from
    ``sync_gradients``) and run ``engine.step()`` after it: the optimizer would step before the
    call's other passes, then once more after them. It would also let the engine divide the
    loss by the accumulation steps, which the Trainer turns off for its own backward
    (``scale_wrt_gas=False``; TRL's loss is already normalised). So the pass goes to the engine
    as a micro-step that is no boundary, unscaled. Every rank runs the same passes, so ZeRO's
    per-backward reductions and ZeRO-3's parameter gathers stay matched.
    """
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is None:
        accelerator.backward(loss)
        return
    wrapped.engine.set_gradient_accumulation_boundary(False)
    wrapped.engine.backward(loss, scale_wrt_gas=False)


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
