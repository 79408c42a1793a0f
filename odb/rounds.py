"""One pass over the data, round by round (what ``iter(odb.DataLoader)`` returns).

Each round::

    pull up to round_size processed samples (workers run the user's pipeline)
      -> measure each; apply the over-budget policy
      -> plan the buffer; offer the groups this rank can emit now
      -> exchange one report with every rank; decide the round's steps (odb/align.py)
      -> take the chosen groups out of the buffer and yield them one by one, collated;
         a rank with no data left while others have some yields ghost batches (weight 0)

Resume state is made of dataset indices, never tensors: the position in this rank's index
order, the buffered indices with their ages, the steps decided but not yet yielded, the
sample that ghost batches copy.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from odb.align import (
    FAILED,
    decide,
    decode_received,
    encode_given,
    encode_report,
    encode_verdict,
    read_verdict,
)
from odb.batch import StepInfo, attach_step_info
from odb.buffer import Entry, RoundSettings, SampleBuffer
from odb.collate import is_per_token
from odb.cost import Budget, SampleSize, measure_sample
from odb.errors import AlignmentError, OverBudgetError
from odb.fetch import decode_chunk
from odb.planner import Reason, shared_group
from odb.stats import LoaderStats

__all__ = ["PassSetup", "EpochIterator", "refetch_order"]


@dataclass(frozen=True)
class PassSetup:
    """What a pass needs from its loader. A pass holds this, not the loader, so that no
    reference cycle keeps an abandoned pass alive: dropped, it shuts its workers down at once
    (a cycle leaves that to the garbage collector, whose finalisation order stalls the
    workers' shutdown for seconds)."""

    settings: RoundSettings
    over_budget: str
    collate_fn: Callable
    pin_memory: bool
    decode: bool
    exchange: Any  # LocalExchange or GlooExchange
    join: bool
    share_tail: bool
    steps_multiple_of: int
    seed: int
    dataset: Any  # for the ghost sample of a rank whose shard is empty


def refetch_order(resume: Mapping) -> list[int]:
    """Indices a restored pass reads again first: the pending steps', the buffer's, then the
    ghost sample's."""
    pending = [i for step in resume["pending"] for i in step["indices"] if not step["ghost"]]
    buffered = [index for index, _ in resume["buffer"]]
    ghost = [resume["ghost"]] if resume["ghost"] is not None else []
    return pending + buffered + ghost


class EpochIterator:
    """One pass; see the module docstring for the round structure."""

    def __init__(
        self,
        setup: PassSetup,
        stats: LoaderStats,
        source: Iterator | None,
        epoch: int,
        shard_size: int,
        resume: Mapping | None,
    ):
        self.setup = setup
        self.stats = stats
        self.source = source
        self.epoch = epoch
        self.shard_size = shard_size
        self.buffer = SampleBuffer()
        self.pending: deque[tuple[list[Entry], StepInfo]] = deque()
        self.received: deque[tuple[int, Any]] = deque()
        self.ghost: Entry | None = None
        self.consumed = self.round = self.step = 0
        self.exhausted = self.done = False
        if resume:
            self._restore(resume)

    def __iter__(self) -> EpochIterator:
        return self

    def __next__(self) -> Mapping:
        while not self.pending:
            if self.done:
                self.source = None  # lets non-persistent workers shut down
                raise StopIteration
            self._run_round()
        entries, info = self.pending.popleft()
        stats = self.stats
        start = time.perf_counter()
        batch = self.setup.collate_fn([entry.payload for entry in entries])
        if self.setup.pin_memory:
            batch = _pin(batch)
        batch = attach_step_info(batch, info)
        stats.collate_seconds += time.perf_counter() - start
        stats.steps += 1
        stats.ghost_steps += info.ghost
        if not info.ghost:
            stats.samples += info.local_samples
            stats.real_tokens += info.real_tokens
            stats.padded_tokens += info.padded_tokens
            stats.label_tokens += info.local_label_tokens
        return batch

    # -- intake ---------------------------------------------------------------------------------
    def _receive(self) -> tuple[int, Any] | None:
        """The next (index, sample) from the workers, or None at the end of this rank's order."""
        if not self.received:
            if self.source is None:
                return None
            start = time.perf_counter()
            try:
                chunk = next(self.source)
            except StopIteration:
                return None
            finally:
                self.stats.wait_seconds += time.perf_counter() - start
            self.received.extend(decode_chunk(chunk) if self.setup.decode else chunk)
        return self.received.popleft()

    def _admit(self, index: int, sample: Any, count: bool = True) -> Entry:
        """Measure a sample and apply the over-budget policy."""
        setup, stats = self.setup, self.stats
        size = measure_sample(sample, index)
        why = setup.settings.budget.why_over(size)
        solo = False
        if why is None:
            pass
        elif setup.over_budget == "solo":
            solo = True
            stats.over_budget_solo += count
        elif setup.over_budget == "truncate" and size.images == 0:
            sample, size = _truncate(sample, size, setup.settings.budget, index)
            stats.over_budget_truncated += count
        elif setup.over_budget == "truncate":
            raise OverBudgetError(
                index,
                f"{why}; over_budget='truncate' cannot cut a sample with images (use 'solo', "
                f"or a larger budget)",
            )
        else:
            raise OverBudgetError(
                index,
                f"{why} (over_budget='error'); raise the budget, filter the sample out, or pass "
                f"over_budget='solo' to emit it alone or 'truncate' to cut it",
            )
        entry = Entry(index, size, sample, solo)
        if self._better_ghost(entry):
            self.ghost = entry
        return entry

    def _pull(self) -> Entry | None:
        pair = self._receive()
        if pair is None:
            return None
        self.consumed += 1
        return self._admit(*pair)

    def _better_ghost(self, entry: Entry) -> bool:
        """Ghost batches copy the shortest sample that fits the budget (the cheapest step)."""
        ghost = self.ghost
        if ghost is None:
            return True
        return (entry.solo, entry.size.length) < (ghost.solo, ghost.size.length)

    # -- one round ------------------------------------------------------------------------------
    def _run_round(self) -> None:
        setup, stats, settings = self.setup, self.stats, self.setup.settings
        start, waited = time.perf_counter(), stats.wait_seconds
        try:
            if not self.exhausted:
                self.exhausted = self.buffer.refill(settings, self._pull)
            offer, report = self.buffer.prepare(settings, exhausted=self.exhausted)
            if self.exhausted and self.ghost is None and self._may_run_ghosts():
                self._ghost_entry()  # a rank whose shard was empty reads its ghost sample now
        except Exception:
            self._tell_peers_and_stop()
            raise
        table = setup.exchange.exchange(report)
        rng = np.random.default_rng([setup.seed, self.epoch, self.round])
        decision = decide(
            table,
            max_steps=settings.max_steps,
            join=setup.join,
            rng=rng,
            share_tail=setup.share_tail,
        )
        rank = setup.exchange.rank
        if decision.done:
            self.done = True
            if decision.stopped:
                stats.dropped_samples += len(self.buffer) + self.shard_size - self.consumed
            self._pad_with_ghosts()
            return
        own, given = self.buffer.commit(offer, decision, rank)
        shared, label_fix = {}, np.zeros(decision.steps, dtype=np.int64)
        if decision.transfers:
            shared, label_fix = self._receive_shared(decision, given)
        own_groups = iter(own)
        for j, pick in enumerate(decision.choice[rank].tolist()):
            if pick < 0:
                entries, group = [self._ghost_entry()], None
            elif j in shared:
                entries = shared[j]
                group = shared_group([entry.size for entry in entries], settings.budget)
                stats.shared_groups += 1
            else:
                entries, group = next(own_groups), offer.groups[pick]
                stats.stale_groups += group.reason is Reason.STALE
                stats.pressure_groups += group.reason is Reason.PRESSURE
            totals = (
                int(decision.global_samples[j]),
                int(decision.global_label_tokens[j] + label_fix[j]),
            )
            self.pending.append((entries, self._step_info(entries, group, *totals)))
            self.step += 1
        self.round += 1
        stats.rounds += 1
        stats.plan_seconds += time.perf_counter() - start - (stats.wait_seconds - waited)

    def _receive_shared(self, decision, given):
        """A transfer round's two further exchanges: the donors' dataset indices, then, once
        each recipient has read its groups again by index (in this process: a few groups per
        pass, at its end), whether that worked and how their label tokens differ from what the
        donors reported. Every rank raises together if any read failed, before any of the
        round's steps runs, so no rank is left waiting in a training collective."""
        exchange, rank = self.setup.exchange, self.setup.exchange.rank
        given_indices = [[entry.index for entry in group] for group in given]
        gathered = exchange.exchange(encode_given(decision, rank, given_indices))
        dataset, shared, failure = self.setup.dataset, {}, None
        try:
            for step, indices in decode_received(decision, gathered, rank).items():
                shared[step] = [self._admit(i, dataset[i], count=False) for i in indices]
        except Exception as error:
            failure = error
        labels = {step: sum(e.size.label_tokens for e in group) for step, group in shared.items()}
        verdicts = exchange.exchange(encode_verdict(decision, failure is not None, labels))
        if failure is not None:
            self.done = True
            if hasattr(failure, "add_note"):  # Python 3.11+
                failure.add_note(
                    "odb read this sample again in the main process because another rank handed "
                    "its group over (share_tail=True); if dataset[i] only works inside DataLoader "
                    "workers, pass share_tail=False"
                )
            raise failure
        try:
            return shared, read_verdict(verdicts)
        except AlignmentError:
            self.done = True
            raise

    def _step_info(self, entries, group, global_samples: int, global_label_tokens: int) -> StepInfo:
        exchange = self.setup.exchange
        sizes = [entry.size for entry in entries]
        real = sum(size.length for size in sizes)
        if group is None:  # ghost: computes like one sample, weighs nothing
            padded, reason = real, "ghost"
        else:
            padded, reason = group.padded_tokens, group.reason.value
        return StepInfo(
            sample_indices=tuple(entry.index for entry in entries),
            local_samples=len(entries),
            global_samples=global_samples,
            local_label_tokens=sum(size.label_tokens for size in sizes),
            global_label_tokens=global_label_tokens,
            real_tokens=real,
            padded_tokens=padded,
            step=self.step,
            round=self.round,
            epoch=self.epoch,
            reason=reason,
            ghost=group is None,
            loss_weight=0.0 if group is None else 1.0,
            rank=exchange.rank,
            world_size=exchange.world_size,
        )

    def _pad_with_ghosts(self) -> None:
        """End the pass on a multiple of ``steps_multiple_of`` steps (every rank alike, since
        step counts are equal): a trainer accumulating gradients over that many batches then
        never ends an epoch on a partial window."""
        multiple = self.setup.steps_multiple_of
        if self.step % multiple == 0:
            return
        for _ in range(multiple - self.step % multiple):
            ghost = [self._ghost_entry()]
            self.pending.append((ghost, self._step_info(ghost, None, 0, 0)))
            self.step += 1

    def _may_run_ghosts(self) -> bool:
        return self.setup.exchange.world_size > 1 and len(self.setup.dataset) > 0

    def _ghost_entry(self) -> Entry:
        """A copy of one of this rank's samples; a rank whose shard is empty borrows one."""
        if self.ghost is None:
            dataset = self.setup.dataset
            index = self.setup.exchange.rank % len(dataset)
            self.ghost = self._admit(index, dataset[index], count=False)
        return self.ghost

    def _tell_peers_and_stop(self) -> None:
        """This rank failed preparing a round: let the others fail at once, not time out."""
        self.done = True
        if self.setup.exchange.world_size == 1:
            return
        report = encode_report(FAILED, 0, [], [], [], self.setup.settings.max_steps)
        # The peers may be gone already; the original error is the one to raise.
        with contextlib.suppress(Exception):
            self.setup.exchange.exchange(report)

    # -- resume ---------------------------------------------------------------------------------
    def state(self) -> dict:
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
            "ghost": None if self.ghost is None else self.ghost.index,
            "pending": [
                {
                    "indices": [entry.index for entry in entries],
                    "ghost": info.ghost,
                    "info": asdict(info),
                }
                for entries, info in self.pending
            ],
        }

    def _restore(self, resume: Mapping) -> None:
        self.consumed, self.round, self.step = resume["consumed"], resume["round"], resume["step"]
        self.exhausted, self.done = resume["exhausted"], resume["done"]
        pending = []
        for step in resume["pending"]:
            if step["ghost"]:
                entries = None
            else:
                entries = [self._admit(*self._receive(), count=False) for _ in step["indices"]]
            info = StepInfo(
                **{**step["info"], "sample_indices": tuple(step["info"]["sample_indices"])}
            )
            pending.append((entries, info))
        for _, age in resume["buffer"]:
            self.buffer.add(self._admit(*self._receive(), count=False), age=age)
        if resume["ghost"] is not None:
            self.ghost = self._admit(*self._receive(), count=False)
        for entries, info in pending:
            self.pending.append((entries if entries is not None else [self.ghost], info))


def _truncate(sample: Mapping, size: SampleSize, budget: Budget, index: int):
    """Cut every per-token field of a text-only sample to the longest length that fits."""
    keep = min(budget.longest_text(), size.length)
    if keep < 1:
        raise OverBudgetError(index, "the budget is too small for even one token")
    cut = dict(sample)
    for key, value in sample.items():
        if is_per_token(value, size.length):
            cut[key] = value[:keep]
    return cut, measure_sample(cut, index)


def _pin(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if isinstance(value, Mapping):
        return {key: _pin(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_pin(item) for item in value)
    return value
