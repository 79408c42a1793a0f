"""``odb.DataLoader`` and ``odb.wrap``: online token-budget batching behind a DataLoader API.

One pass over the data runs in rounds::

    pull round_size processed samples (workers run the user's pipeline)
      -> measure each (length, label tokens, vision patches, images)
      -> plan the whole buffer into groups under the budget
      -> align: pick this round's steps and their order
      -> yield them one by one, collated; what was held back stays buffered

Resume state is made of dataset indices, never tensors: the position in the epoch's index
order, the buffered indices with their ages, the groups decided but not yet yielded, and the
emission RNG. Restoring re-reads those few samples and continues exactly where the saved run
was.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    default_collate,
    default_convert,
)

from odb.align import LocalAlignment
from odb.batch import StepInfo, attach_step_info
from odb.buffer import Entry, RoundSettings, SampleBuffer
from odb.collate import PackedCollator, PaddedCollator, is_per_token
from odb.cost import Budget, Caps, ComputeCost, PackedCost, PaddedCost, SampleSize, measure_sample
from odb.errors import ConfigError, OverBudgetError, StateError
from odb.fetch import ChunkSampler, IndexedDataset, decode_chunk, encode_chunk, keep_chunk
from odb.planner import Reason
from odb.stats import LoaderStats

__all__ = ["DataLoader", "wrap"]

_STATE_VERSION = 1
_MODES = ("padded", "packed")
_OVER_BUDGET = ("error", "solo", "truncate")


class DataLoader:
    """A drop-in for ``torch.utils.data.DataLoader`` that forms batches under a token budget.

    ``dataset[i]`` must return ONE processed sample: a dict with a 1-D ``input_ids`` (visual
    tokens already expanded), optional ``labels`` (-100 where no loss) and ``attention_mask``,
    and any model extras. Workers run the dataset in parallel; odb measures, plans and
    collates in the iterating process. Each batch is a mapping for ``model(**batch)`` carrying
    a :class:`~odb.StepInfo` (read it with :func:`odb.step_info`).

    Args:
        token_budget: the most a batch may cost under ``cost`` (tokens, padding included in
            padded mode).
        mode: ``"padded"`` (rows right-padded to the longest; cost ``n * max_len``) or
            ``"packed"`` (one padding-free row; cost ``sum(len)``).
        collate_fn: applied to each group's list of samples; defaults to odb's padded or
            packed collator for text models.
        shuffle, seed: a seeded permutation per epoch (``set_epoch``); ``sampler`` instead
            gives the index order explicitly.
        window: the most samples planned together; larger windows batch more tightly.
        round_size: samples pulled per planning round (default ``window // 8``).
        over_budget: a sample that alone exceeds the budget or a cap: ``"error"`` raises,
            ``"solo"`` emits it alone (counted), ``"truncate"`` cuts its per-token fields to
            fit (text-only samples).
        cost: a :class:`~odb.ComputeCost` replacing the mode's token cost.
        max_samples, max_images, max_vision_patches: hard caps per batch.
        fill_threshold: how good a group must be to leave without waiting (padding efficiency
            of a maximal padded group; budget fill of a packed row).
        max_wait: rounds after which a buffered sample is forced out.
        fetch_size: dataset indices per worker task.
        num_workers, pin_memory, timeout, worker_init_fn, multiprocessing_context, generator,
        prefetch_factor, persistent_workers: as for ``torch.utils.data.DataLoader``.
    """

    def __init__(
        self,
        dataset: Any,
        token_budget: float,
        *,
        mode: str = "padded",
        collate_fn: Callable[[list], Mapping] | None = None,
        shuffle: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        window: int = 1024,
        over_budget: str = "error",
        sampler: Iterable[int] | None = None,
        round_size: int | None = None,
        cost: ComputeCost | None = None,
        max_samples: int | None = None,
        max_images: int | None = None,
        max_vision_patches: int | None = None,
        fill_threshold: float | None = None,
        max_wait: int | None = None,
        fetch_size: int | None = None,
        pin_memory: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        generator: torch.Generator | None = None,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
    ):
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
            raise ConfigError(
                "odb needs a map-style dataset (with __getitem__ and __len__) so that batches "
                "can be resumed by index; got " + type(dataset).__name__
            )
        if mode not in _MODES:
            raise ConfigError(f"mode must be one of {_MODES}, got {mode!r}")
        if over_budget not in _OVER_BUDGET:
            raise ConfigError(f"over_budget must be one of {_OVER_BUDGET}, got {over_budget!r}")
        if sampler is not None and shuffle:
            raise ConfigError("give either shuffle=True or a sampler, not both")
        cost = cost if cost is not None else (PaddedCost() if mode == "padded" else PackedCost())
        if isinstance(cost, ComputeCost) and cost.padded != (mode == "padded"):
            raise ConfigError(
                f"cost {cost!r} prices {'padded' if cost.padded else 'packed'} batches but "
                f"mode={mode!r}; use ComputeCost(padded={mode == 'padded'}, ...)"
            )
        budget = Budget(token_budget, cost, Caps(max_samples, max_images, max_vision_patches))
        self.settings = RoundSettings.create(budget, window, round_size, fill_threshold, max_wait)
        self.budget = budget
        self.mode = mode
        self.over_budget = over_budget
        self.dataset = dataset
        self.sampler = sampler
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.collate_fn = collate_fn or (PaddedCollator() if mode == "padded" else PackedCollator())
        self.pin_memory = bool(pin_memory) and torch.accelerator.is_available()
        self.num_workers = num_workers
        self._alignment = LocalAlignment()
        self._chunks = ChunkSampler(fetch_size if fetch_size is not None else 8)
        self._fetcher = torch.utils.data.DataLoader(
            IndexedDataset(dataset),
            batch_sampler=self._chunks,
            num_workers=num_workers,
            collate_fn=encode_chunk if num_workers else keep_chunk,
            timeout=timeout,
            worker_init_fn=worker_init_fn,
            multiprocessing_context=multiprocessing_context,
            generator=generator,
            # Worker-only settings mean nothing without workers (wrap may carry them over).
            prefetch_factor=prefetch_factor if num_workers else None,
            persistent_workers=persistent_workers and num_workers > 0,
        )
        self._setup = _PassSetup(
            self.settings,
            over_budget,
            self.collate_fn,
            self.pin_memory,
            num_workers > 0,
            self._alignment,
            self.seed,
        )
        self._stats = LoaderStats(token_budget=float(token_budget))
        self._epoch = 0
        self._resume: dict | None = None
        self._iterator: _EpochIterator | None = None

    # -- the DataLoader surface ---------------------------------------------------------------
    def __iter__(self) -> Iterator[Mapping]:
        resume = self._resume if self._resume and self._resume["epoch"] == self._epoch else None
        self._resume = None
        self._iterator = None  # shut the previous pass's workers down before starting new ones
        prefix = _refetch_order(resume) if resume else []
        source = None
        if prefix or not (resume and resume["finished"]):
            source = self._open(prefix, self._epoch, resume["consumed"] if resume else 0)
        self._iterator = _EpochIterator(self._setup, self._stats, source, self._epoch, resume)
        return self._iterator

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next pass uses (as with DistributedSampler)."""
        self._epoch = int(epoch)

    @property
    def epoch(self) -> int:
        return self._epoch

    def stats(self) -> LoaderStats:
        """A snapshot of the running totals."""
        return LoaderStats.from_dict(self._stats.as_dict())

    # -- resume -------------------------------------------------------------------------------
    def _config(self) -> dict:
        """The settings that decide which batches come out; a resumed run must share them."""
        return {
            "mode": self.mode,
            "token_budget": self.budget.limit,
            "cost": repr(self.budget.cost),
            "caps": asdict(self.budget.caps),
            "window": self.settings.window,
            "round_size": self.settings.round_size,
            "max_wait": self.settings.max_wait,
            "fill_threshold": self.settings.fill_threshold,
            "over_budget": self.over_budget,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "dataset_len": len(self.dataset),
        }

    def state_dict(self) -> dict:
        """Where the loader is: plain Python data (indices, counters, RNG state), no tensors."""
        if self._iterator is not None and self._iterator.epoch == self._epoch:
            position = self._iterator.state()
        else:
            position = self._resume
        return {
            "version": _STATE_VERSION,
            "rank": self._alignment.rank,
            "world_size": self._alignment.world_size,
            "epoch": self._epoch,
            "config": self._config(),
            "position": position,
            "stats": self._stats.as_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from ``state``: the next pass yields exactly the batches the saved run had
        left in that epoch."""
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise StateError(f"not an odb loader state of version {_STATE_VERSION}")
        here = (self._alignment.rank, self._alignment.world_size)
        saved = (state["rank"], state["world_size"])
        if saved != here:
            raise StateError(
                f"this state was saved by rank {saved[0]} of {saved[1]}; it cannot be restored "
                f"on rank {here[0]} of {here[1]} (resume with the same world size)"
            )
        changed = {
            key: (value, self._config().get(key))
            for key, value in state["config"].items()
            if self._config().get(key) != value
        }
        if changed:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise StateError(f"the loader settings differ from the saved run ({detail})")
        self._epoch = int(state["epoch"])
        self._resume = state["position"]
        self._iterator = None
        self._stats = LoaderStats.from_dict(state["stats"])

    # -- plumbing used by the epoch iterator --------------------------------------------------
    def _index_order(self, epoch: int) -> Iterable[int]:
        if self.sampler is not None:
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)
            return self.sampler
        if self.shuffle:
            return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return range(len(self.dataset))

    def _open(self, prefix: list[int], epoch: int, skip: int) -> Iterator[list]:
        """Start the workers on ``prefix`` then the epoch's order from position ``skip``."""
        order = itertools.islice(self._index_order(epoch), skip, None)
        self._chunks.indices = itertools.chain(prefix, order)
        return iter(self._fetcher)


def _refetch_order(resume: Mapping) -> list[int]:
    """Indices a restored pass reads again first: pending groups', then the buffer's."""
    pending = [i for group in resume["pending"] for i in group["indices"]]
    return pending + [index for index, _ in resume["buffer"]]


@dataclass(frozen=True)
class _PassSetup:
    """What a pass needs from its loader. A pass holds this, not the loader, so that no
    reference cycle keeps an abandoned pass alive: dropped, it shuts its workers down at once
    (a cycle leaves that to the garbage collector, whose finalisation order stalls the
    workers' shutdown for seconds)."""

    settings: RoundSettings
    over_budget: str
    collate_fn: Callable
    pin_memory: bool
    decode: bool
    alignment: LocalAlignment
    seed: int


class _EpochIterator:
    """One pass over the data; see the module docstring for the round structure."""

    def __init__(
        self,
        setup: _PassSetup,
        stats: LoaderStats,
        source: Iterator | None,
        epoch: int,
        resume: Mapping | None,
    ):
        self.setup = setup
        self.stats = stats
        self.source = source
        self.epoch = epoch
        self.rng = np.random.default_rng([setup.seed, epoch, 1])
        self.buffer = SampleBuffer()
        self.pending: deque[tuple[list[Entry], StepInfo]] = deque()
        self.received: deque[tuple[int, Any]] = deque()
        self.consumed = self.round = self.step = 0
        self.exhausted = self.finished = False
        if resume:
            self.consumed, self.round, self.step = (
                resume["consumed"],
                resume["round"],
                resume["step"],
            )
            self.exhausted, self.finished = resume["exhausted"], resume["finished"]
            self.rng.bit_generator.state = resume["rng"]
            for group in resume["pending"]:
                entries = [self._admit(*self._receive(), count=False) for _ in group["indices"]]
                self.pending.append(
                    (
                        entries,
                        StepInfo(
                            **{
                                **group["info"],
                                "sample_indices": tuple(group["info"]["sample_indices"]),
                            }
                        ),
                    )
                )
            for _, age in resume["buffer"]:
                entry = self._admit(*self._receive(), count=False)
                entry.age = age
                self.buffer.add(entry)

    def __iter__(self) -> _EpochIterator:
        return self

    def __next__(self) -> Mapping:
        while not self.pending:
            if self.finished:
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
        stats.samples += info.local_samples
        stats.real_tokens += info.real_tokens
        stats.padded_tokens += info.padded_tokens
        stats.label_tokens += info.local_label_tokens
        stats.ghost_steps += info.ghost
        return batch

    # -- intake -----------------------------------------------------------------------------
    def _receive(self) -> tuple[int, Any] | None:
        """The next (index, sample) from the workers, or None at the end of the order."""
        if not self.received:
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
                f"{why}; over_budget='truncate' cannot cut a sample "
                f"with images (use 'solo', or a larger budget)",
            )
        else:
            raise OverBudgetError(
                index,
                f"{why} (over_budget='error'); raise the budget, "
                f"filter the sample out, or pass over_budget='solo' to emit "
                f"it alone or 'truncate' to cut it",
            )
        return Entry(index, size, sample, solo)

    # -- one round --------------------------------------------------------------------------
    def _run_round(self) -> None:
        setup, stats = self.setup, self.stats
        start, waited = time.perf_counter(), stats.wait_seconds
        for _ in range(setup.settings.round_size):
            pair = self._receive()
            if pair is None:
                self.exhausted = True
                break
            self.buffer.add(self._admit(*pair))
            self.consumed += 1
        emitted = self.buffer.run_round(setup.settings, setup.alignment, self.rng, self.exhausted)
        for out in emitted:
            info = StepInfo(
                sample_indices=tuple(entry.index for entry in out.entries),
                local_samples=len(out.entries),
                global_samples=out.step.global_samples,
                local_label_tokens=out.label_tokens,
                global_label_tokens=out.step.global_label_tokens,
                real_tokens=out.group.real_tokens,
                padded_tokens=out.group.padded_tokens,
                step=self.step,
                round=self.round,
                epoch=self.epoch,
                reason=out.group.reason.value,
            )
            self.pending.append((out.entries, info))
            self.step += 1
            stats.stale_groups += out.group.reason is Reason.STALE
            stats.pressure_groups += out.group.reason is Reason.PRESSURE
        self.round += 1
        stats.rounds += 1
        self.finished = self.exhausted and not self.buffer
        stats.plan_seconds += time.perf_counter() - start - (stats.wait_seconds - waited)

    # -- resume -----------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "round": self.round,
            "step": self.step,
            "exhausted": self.exhausted,
            "finished": self.finished,
            "rng": self.rng.bit_generator.state,
            "buffer": [[entry.index, entry.age] for entry in self.buffer.entries],
            "pending": [
                {"indices": [entry.index for entry in entries], "info": asdict(info)}
                for entries, info in self.pending
            ],
        }


def _truncate(sample: Mapping, size: SampleSize, budget: Budget, index: int):
    """Cut every per-token field of a text-only sample to the longest length that fits."""
    keep = min(budget.cost.longest_within(budget.limit), size.length)
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


def wrap(
    dataloader: torch.utils.data.DataLoader, token_budget: float, **options: Any
) -> DataLoader:
    """Build an odb loader from an existing ``torch.utils.data.DataLoader``.

    Keeps its dataset, order (a ``RandomSampler`` becomes odb's seeded shuffle, any other
    sampler is used as is), workers and worker settings, ``pin_memory``, and its
    ``collate_fn``, which is then applied to each of odb's groups (torch's default collate,
    which cannot pad, is replaced by odb's). ``batch_size`` and ``drop_last`` no longer apply:
    odb sizes batches and never drops samples. ``options`` are ``odb.DataLoader`` arguments and
    take precedence.
    """
    if not isinstance(dataloader, torch.utils.data.DataLoader):
        raise TypeError(
            f"wrap expects a torch.utils.data.DataLoader, got {type(dataloader).__name__}"
        )
    batch_sampler = dataloader.batch_sampler
    if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
        raise ConfigError(
            f"the DataLoader uses a custom batch_sampler ({type(batch_sampler).__name__}); odb "
            f"forms batches itself: build the DataLoader with a plain sampler instead"
        )
    settings: dict[str, Any] = {
        "num_workers": dataloader.num_workers,
        "pin_memory": dataloader.pin_memory,
        "timeout": dataloader.timeout,
        "worker_init_fn": dataloader.worker_init_fn,
        "multiprocessing_context": dataloader.multiprocessing_context,
        "generator": dataloader.generator,
        "persistent_workers": dataloader.persistent_workers,
    }
    if dataloader.num_workers:
        settings["prefetch_factor"] = dataloader.prefetch_factor
    if dataloader.collate_fn not in (default_collate, default_convert):
        settings["collate_fn"] = dataloader.collate_fn
    sampler = dataloader.sampler
    if (
        type(sampler) is RandomSampler
        and not sampler.replacement
        and sampler.num_samples == len(sampler.data_source)
    ):
        settings["shuffle"] = True
        if sampler.generator is not None:
            settings["seed"] = sampler.generator.initial_seed()
    elif type(sampler) is not SequentialSampler:
        settings["sampler"] = sampler
    settings.update(options)
    return DataLoader(dataloader.dataset, token_budget, **settings)
