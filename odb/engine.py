"""One rank's pass over the data, round by round: the ONE implementation of a round.

The loader drives one engine per process; :mod:`odb.simulate` (and through it the step
estimates and the benchmarks) drives N engines over an in-process exchange. Both run this
code, so every simulated run exercises the real report, decision, hand-over and verdict.

A pass::

    first exchange: every rank's identity (settings, epoch order, dataset)  -> agree()
    each round:
      pull up to round_size samples from the source; admit each (measure, over-budget policy)
        -> plan the buffer; offer the groups this rank can emit now
        -> exchange one report with every rank; decide the round's steps (odb/align.py)
        -> take the chosen groups out of the buffer
        -> [groups handed over] exchange their dataset indices; recipients read them again
           by index; exchange verdicts (read failures, label-token corrections)
        -> queue one step per decided step: a group, a handed-over group, or a ghost

Any failure while preparing a round is still reported in the round's exchange (a FAILED
report), so every rank raises in the same round instead of waiting on a dead peer.

Resume state is made of dataset indices, never tensors: the position in this rank's order,
the buffered indices with their ages, the steps decided but not yet run, the ghost sample;
for a stream (odb/stream.py), where each worker's stream is before the oldest of them.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from odb.admit import SOLO, TRUNCATE, Admission
from odb.align import (
    FAILED,
    NO_GHOST,
    PROTOCOL_VERSION,
    Agreement,
    PassIdentity,
    agree,
    cause_of,
    check_reports,
    check_versions,
    decide,
    decode_received,
    encode_given,
    encode_handshake,
    encode_report,
    encode_verdict,
    failure_report,
    fingerprint,
    lend_ghost,
    read_verdict,
)
from odb.batch import StepInfo
from odb.buffer import Entry, RoundSettings, SampleBuffer
from odb.errors import AlignmentError, OverBudgetError, StateError
from odb.exchange import Exchange
from odb.planner import Group, Reason, shared_group
from odb.source import Source
from odb.stats import LoaderStats

__all__ = ["PassConfig", "RoundEngine", "Step", "refetch_order"]

logger = logging.getLogger("odb")
_TOLD: set[str] = set()  # notes already logged by this process

Step = tuple[list[Entry], StepInfo]


@dataclass(frozen=True)
class PassConfig:
    """Everything that decides which steps a pass emits; every rank must hold the same
    (checked in the first exchange through :meth:`fingerprint`)."""

    settings: RoundSettings
    admission: Admission
    join: bool = True
    share_tail: bool = True
    shard: bool = False  # odb splits one epoch order into per-rank parts (world > 1)
    steps_multiple_of: int = 1
    seed: int = 0

    def fingerprint(self) -> int:
        return fingerprint(repr(self).encode())


def refetch_order(state: Mapping) -> list[int]:
    """Indices a restored pass reads again first: the pending steps', the buffer's, then the
    ghost sample's (unless another rank lent it)."""
    pending = [i for step in state["pending"] for i in step["indices"] if not step["ghost"]]
    buffered = [index for index, _ in state["buffer"]]
    ghost = [state["ghost"]] if state["ghost"] is not None else []
    return pending + buffered + ghost


class RoundEngine:
    """One rank's pass: call :meth:`next_step` until it returns None (on every rank alike:
    rounds are collective)."""

    def __init__(
        self,
        config: PassConfig,
        exchange: Exchange,
        source: Source,
        *,
        epoch: int = 0,
        stats: LoaderStats | None = None,
        resume: Mapping | None = None,
    ):
        self.config = config
        self.exchange = exchange
        self.source = source
        self.epoch = epoch
        self.stats = stats if stats is not None else LoaderStats(config.settings.budget.limit)
        self.buffer = SampleBuffer(self.stats)
        self.pending: deque[Step] = deque()
        self.ghost: Entry | None = None
        self.lent_ghost: bytes | None = None  # a ghost sample another rank sent, serialized
        self.agreement: Agreement | None = None
        self.opened = False
        self._resume = resume
        self.consumed = self.round = self.step = 0
        self.exhausted = self.done = False
        if resume is not None:
            if resume["epoch"] != epoch:
                raise StateError(f"a state of epoch {resume['epoch']} resumes epoch {epoch}")
            self.consumed, self.round = resume["consumed"], resume["round"]
            self.step, self.exhausted = resume["step"], resume["exhausted"]

    @property
    def rank(self) -> int:
        return self.exchange.rank

    def next_step(self) -> Step | None:
        """The next step this rank runs, or None once the pass is over."""
        while not self.pending:
            if self.done:
                self.source.close()
                return None
            try:
                self._run_round()
            except BaseException:
                self.done = True
                self.source.close()
                raise
        return self.pending.popleft()

    # -- exchanges ------------------------------------------------------------------------------
    def _gather(self, row: np.ndarray) -> np.ndarray:
        self.stats.exchanges += 1
        return self.exchange.gather(row)

    def _report_failure(self, row: np.ndarray) -> None:
        """Take part in the exchange this rank failed to prepare, so the others fail at once;
        the peers may be gone already, and the rank's own error is the one to raise."""
        if self.exchange.world_size > 1:
            with contextlib.suppress(Exception):
                self._gather(row)

    def _agree(self) -> Agreement:
        """The pass's first exchange: settle sharding and hand-over, or fail on every rank."""
        config, world = self.config, self.exchange.world_size
        if world == 1:
            return Agreement(shard=False, hand_over=False)
        check_versions(self._gather(np.array([PROTOCOL_VERSION], dtype=np.int64)))
        try:
            identity = PassIdentity(
                config.fingerprint(),
                *self.source.describe(compare_dataset=config.share_tail),
                epoch=self.epoch,
                round=self.round,
                step=self.step,
            )
        except Exception as error:
            self._report_failure(encode_handshake(None, error))
            raise
        agreement = agree(self._gather(encode_handshake(identity)), shard=config.shard)
        if config.share_tail and not agreement.hand_over and agreement.note not in _TOLD:
            _TOLD.add(agreement.note)
            logger.warning(
                "odb: %s, so groups are not handed over between ranks at the end of the data "
                "(ranks that run out first run ghost steps instead)",
                agreement.note,
            )
        return agreement

    # -- intake ---------------------------------------------------------------------------------
    def _admit(self, index: int, sample: Any, count: bool = True, own: bool = True) -> Entry:
        """Measure a sample (``count``: into the over-budget statistics). Ghost steps copy
        the cheapest of this rank's ``own`` samples; a group handed over in a round arrives
        after the round's report told the others what this rank's ghost holds."""
        entry, verdict = self.config.admission.admit(index, sample)
        if verdict is not None and count:
            self.stats.over_budget_solo += verdict == SOLO
            self.stats.over_budget_truncated += verdict == TRUNCATE
        if not own:
            return entry
        ghost = self.ghost  # ghost steps copy the cheapest sample that fits the budget
        if (
            ghost is None
            or (entry.solo, entry.size.length) < (ghost.solo, ghost.size.length)
            or self._ghost_too_old(entry)
        ):
            self.ghost = entry
        return entry

    def _ghost_too_old(self, entry: Entry) -> bool:
        """A stream reads a restored pass's samples again from the oldest one kept, so its
        ghost is the cheapest of recent samples (within a window), not of the whole pass."""
        ghost = self.ghost
        return (
            not self.source.rereadable
            and ghost.index >= 0
            and entry.index - ghost.index > self.config.settings.window
        )

    def _oldest_needed(self) -> int:
        """The lowest index this pass may still have to read again (a stream keeps its
        position from there on)."""
        ghost = self.ghost.index if self.ghost is not None and self.lent_ghost is None else None
        indices = [e.index for e in self.buffer.entries]
        indices += [e.index for entries, info in self.pending if not info.ghost for e in entries]
        return min([*indices, *([ghost] if ghost is not None else []), self.consumed])

    def _pull(self) -> Entry | None:
        pair = self.source.pull()
        if pair is None:
            return None
        self.consumed += 1
        return self._admit(*pair)

    def _borrow_ghost(self, attempts: int = 8) -> None:
        """The sample the ghost steps of a rank with an empty part copy, from the dataset: the
        first of a few that fits the budget (under ``over_budget="error"`` a sample the user's
        sampler left out may be too long)."""
        for attempt in range(attempts):
            borrowed = self.source.borrow(self.rank, attempt)
            if borrowed is None:
                return
            try:
                self._admit(*borrowed, count=False)
                return
            except OverBudgetError:
                if attempt == attempts - 1:
                    raise

    def _reread(self, index: int) -> Entry:
        """A sample of a restored pass, read again in its old order."""
        pair = self.source.pull()
        if pair is None or int(pair[0]) != index:
            raise StateError(
                f"restoring the pass expected sample {index} next, got "
                f"{None if pair is None else pair[0]}: the epoch order changed since the save"
            )
        return self._admit(*pair, count=False)

    def _open(self) -> None:
        """Start reading this rank's part of the epoch; a restored pass first reads again what
        its state names (pending steps, buffer, ghost)."""
        world, resume = self.exchange.world_size, self._resume
        prefix = refetch_order(resume) if resume else []
        shard = (self.rank, world) if self.agreement.shard else None
        if resume and resume.get("source") is not None:
            self.source.restore(resume["source"])
        self.source.open(shard, self.consumed, prefix)
        self.opened = True
        if not resume:
            return
        self._resume = None
        pending = []
        for step in resume["pending"]:
            entries = None if step["ghost"] else [self._reread(i) for i in step["indices"]]
            info = StepInfo(
                **{**step["info"], "sample_indices": tuple(step["info"]["sample_indices"])}
            )
            pending.append((entries, info))
        for index, age in resume["buffer"]:
            self.buffer.add(self._reread(index), age=age)
        if resume["ghost"] is not None:
            self.ghost = self._reread(resume["ghost"])
        elif resume.get("lent_ghost") is not None:
            self._take_lent_ghost(base64.b64decode(resume["lent_ghost"]))
        for entries, info in pending:
            self.pending.append((entries if entries is not None else [self.ghost], info))
        if resume["done"]:
            self.done = True

    def _open_pass(self) -> bool:
        """Open the pass; True when it is a restored pass whose state holds steps already
        decided (or its end), which then run before any round.

        Those steps are the same number on every rank (ranks save at the same step), and every
        rank must have read them again before any of them runs: a rank that could not would
        leave the others waiting in the training's collectives. So every rank exchanges one
        report first, the failing rank a ``FAILED`` one, and all raise together. A restored
        pass with nothing decided reports a failure in its first round's exchange instead."""
        resume, max_steps = self._resume, self.config.settings.max_steps
        restored = resume is not None and bool(resume["pending"] or resume["done"])
        try:
            self._open()
        except Exception as error:
            self._report_failure(failure_report(error, max_steps))
            raise
        if restored and self.exchange.world_size > 1:
            check_reports(self._gather(encode_report(0, 0, [], [], [], max_steps)))
        return restored

    # -- one round ------------------------------------------------------------------------------
    def _run_round(self) -> None:
        config, stats, settings = self.config, self.stats, self.config.settings
        start, waited = time.perf_counter(), stats.wait_seconds
        if self.agreement is None:
            self.agreement = self._agree()
        if not self.opened and self._open_pass():
            return
        try:
            if not self.exhausted:
                self.exhausted = self.buffer.refill(settings, self._pull)
            borrowing = self.exhausted and self.ghost is None and self.exchange.world_size > 1
            if borrowing:
                self._borrow_ghost()  # a rank whose part was empty
            ghost_images = 0 if self.ghost is None else self.ghost.size.images
            offer, report = self.buffer.prepare(
                settings, exhausted=self.exhausted, ghost_images=ghost_images
            )
            if borrowing and self.ghost is None:
                report[0] |= NO_GHOST
        except Exception as error:
            self._report_failure(failure_report(error, settings.max_steps))
            raise
        table = self._lend_ghost(self._gather(report))
        stats.rounds += 1
        decision = decide(
            table,
            max_steps=settings.max_steps,
            join=config.join,
            rng=np.random.default_rng([config.seed, self.epoch, self.round]),
            share_tail=config.share_tail and self.agreement.hand_over,
            steps_so_far=self.step,
            steps_multiple_of=config.steps_multiple_of,
        )
        if decision.done:
            self.done = True
            if decision.stopped:
                stats.dropped_samples += len(self.buffer) + self.source.size - self.consumed
            for _ in range(decision.padding):
                self._queue([self.ghost], None, 0, 0, decision.padding_vision)
            return
        own, given = self.buffer.commit(offer, decision, self.rank)
        shared, label_fix = {}, np.zeros(decision.steps, dtype=np.int64)
        if decision.transfers:
            shared, label_fix = self._hand_over(decision, given)
        own_groups = iter(own)
        for j, pick in enumerate(decision.choice[self.rank].tolist()):
            if pick < 0:
                entries, group = [self.ghost], None
            elif j in shared:
                entries = shared[j]
                group = shared_group([entry.size for entry in entries], settings.budget)
                stats.shared_groups += 1
            else:
                entries, group = next(own_groups), offer.groups[pick]
                stats.stale_groups += group.reason is Reason.STALE
                stats.pressure_groups += group.reason is Reason.PRESSURE
            global_labels = int(decision.global_label_tokens[j] + label_fix[j])
            samples = int(decision.global_samples[j])
            self._queue(entries, group, samples, global_labels, bool(decision.vision[j]))
        self.round += 1
        if not self.source.rereadable:
            self.source.mark(self._oldest_needed())
        stats.plan_seconds += time.perf_counter() - start - (stats.wait_seconds - waited)

    def _lend_ghost(self, table: np.ndarray) -> np.ndarray:
        """Give ranks with no sample of their own to copy for ghost steps (an empty stream,
        an empty dataset that nothing could be borrowed from) a copy of the lowest other rank's
        ghost sample; returns the reports with their ``NO_GHOST`` bits cleared.

        Three exchanges, in the one round of a pass where a rank first reports ``NO_GHOST``:
        the sample's size in bytes, the bytes, and whether every receiver could take it
        (all ranks raise together if not)."""
        status = table[:, 0]
        lacking = (status & NO_GHOST) != 0
        if not lacking.any() or lacking.all() or (status & FAILED).any():
            return table
        donor = int(np.flatnonzero(~lacking)[0])
        data, failure = b"", None
        if self.rank == donor:
            try:
                if self.ghost is None:
                    raise AlignmentError("the rank chosen to lend its ghost sample has none")
                data = _serialize(self.ghost.payload)
            except Exception as error:
                failure = error
        sizes = self._gather(_status_row(failure, len(data)))
        check_reports(sizes, "while lending a ghost sample to ranks without data")
        width = -(-int(sizes[donor, 1]) // 8)
        row = np.zeros(width, dtype=np.int64)
        row.view(np.uint8)[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        received = self._gather(row)[donor].view(np.uint8)[: int(sizes[donor, 1])].tobytes()
        if lacking[self.rank]:
            try:
                self._take_lent_ghost(received)
            except Exception as error:
                failure = error
        check_reports(
            self._gather(_status_row(failure, 0)), "while taking a ghost sample lent to them"
        )
        if failure is not None:
            raise failure
        if lacking[self.rank] and "lent" not in _TOLD:
            _TOLD.add("lent")
            logger.warning(
                "odb: rank %d has no sample of its own (an empty stream or dataset): it runs "
                "ghost steps (loss weight 0) with a sample lent by rank %d",
                self.rank,
                donor,
            )
        return lend_ghost(table, donor)

    def _take_lent_ghost(self, data: bytes) -> None:
        sample = torch.load(io.BytesIO(data), weights_only=True)
        self.ghost = self._admit(-1, sample, count=False)
        self.lent_ghost = data

    def _hand_over(self, decision, given) -> tuple[dict[int, list[Entry]], np.ndarray]:
        """A transfer round's two further exchanges: the donors' dataset indices, then, once
        each recipient has read its groups again by index (in this process: a few groups per
        pass, at its end), whether that worked and how their label tokens differ from what the
        donors reported. Every rank raises together if any read failed, before any of the
        round's steps runs, so no rank is left waiting in a training collective."""
        rank = self.rank
        given_indices = [[entry.index for entry in group] for group in given]
        gathered = self._gather(encode_given(decision, rank, given_indices))
        shared, failure = {}, None
        try:
            for step, indices in decode_received(decision, gathered, rank).items():
                shared[step] = [
                    self._admit(i, self.source.read(i), count=False, own=False) for i in indices
                ]
        except Exception as error:
            failure = error
        labels = {step: sum(e.size.label_tokens for e in group) for step, group in shared.items()}
        verdicts = self._gather(encode_verdict(decision, rank, failure, labels))
        if failure is not None:
            if hasattr(failure, "add_note"):  # Python 3.11+
                failure.add_note(
                    "odb read this sample again in the main process because another rank handed "
                    "its group over (share_tail=True); if dataset[i] only works inside DataLoader "
                    "workers, pass share_tail=False"
                )
            raise failure
        return shared, read_verdict(verdicts)

    def _queue(
        self,
        entries: list[Entry],
        group: Group | None,
        global_samples: int,
        global_labels: int,
        vision: bool,
    ) -> None:
        """Queue one step; ``group`` None makes it a ghost step (computes like one sample,
        weighs nothing); ``vision``: some rank's batch at this step has an image."""
        sizes = [entry.size for entry in entries]
        real = sum(size.length for size in sizes)
        ghost = group is None
        self.pending.append(
            (
                entries,
                StepInfo(
                    sample_indices=tuple(entry.index for entry in entries),
                    local_samples=len(entries),
                    global_samples=global_samples,
                    local_label_tokens=sum(size.label_tokens for size in sizes),
                    global_label_tokens=global_labels,
                    real_tokens=real,
                    padded_tokens=real if ghost else group.padded_tokens,
                    step=self.step,
                    round=self.round,
                    epoch=self.epoch,
                    reason="ghost" if ghost else group.reason.value,
                    ghost=ghost,
                    loss_weight=0.0 if ghost else 1.0,
                    rank=self.rank,
                    world_size=self.exchange.world_size,
                    cost=0.0 if ghost else float(group.cost),
                    vision=vision,
                ),
            )
        )
        self.step += 1

    # -- resume ---------------------------------------------------------------------------------
    def state(self) -> dict:
        """Where this pass is, as plain data (indices, never tensors)."""
        if self._resume is not None:  # restored but not started: still the saved position
            return dict(self._resume)
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "round": self.round,
            "step": self.step,
            "exhausted": self.exhausted,
            "done": self.done,
            "buffer": [
                [entry.index, age]
                for entry, age in zip(self.buffer.entries, self.buffer.ages(), strict=True)
            ],
            "ghost": None if self.ghost is None or self.lent_ghost else self.ghost.index,
            "lent_ghost": None  # base64: the state is plain data
            if self.lent_ghost is None
            else base64.b64encode(self.lent_ghost).decode("ascii"),
            # a pass with nothing left to run reads nothing again
            "source": None
            if self.done and not self.pending
            else self.source.state(self._oldest_needed()),
            "pending": [
                {
                    "indices": [entry.index for entry in entries],
                    "ghost": info.ghost,
                    "info": asdict(info),
                }
                for entries, info in self.pending
            ],
        }


def _serialize(sample: Any) -> bytes:
    """A sample as bytes that ``torch.load(weights_only=True)`` reads back (tensors, numbers,
    strings, lists and dicts of them)."""
    buffer = io.BytesIO()
    torch.save(sample, buffer)
    return buffer.getvalue()


def _status_row(failure: BaseException | None, value: int) -> np.ndarray:
    """A four-column row ``check_reports`` reads: ``FAILED`` and its cause, or ``value``."""
    if failure is not None:
        return np.array([FAILED, 0, 0, cause_of(failure)], dtype=np.int64)
    return np.array([0, value, 0, 0], dtype=np.int64)
