"""``odb.DataLoader`` and ``odb.wrap``: online token-budget batching behind a DataLoader API.

The loader owns the settings, the index order of each epoch (shuffled, or a sampler's, cut
into one shard per rank) and the workers; a pass over the data (``iter(loader)``) runs in
rounds, see odb/engine.py. Under torch.distributed every rank yields the same number of
batches, see odb/align.py and docs/protocol.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    default_collate,
    default_convert,
)

from odb.admit import Admission
from odb.batch import StepInfo, attach_step_info
from odb.buffer import RoundSettings
from odb.collate import (
    LAYOUTS,
    PackedCollator,
    PaddedCollator,
    check_layout,
    collator_layout,
    collator_placeholder,
)
from odb.cost import (
    IGNORE_INDEX,
    Budget,
    Caps,
    ComputeCost,
    PackedCost,
    PaddedCost,
    SampleSize,
    measure_sample,
)
from odb.engine import PassConfig, RoundEngine
from odb.errors import ConfigError, StateError, positive_int
from odb.exchange import Exchange, world_exchange
from odb.fetch import (
    ChunkSampler,
    IndexedDataset,
    MeasuredDataset,
    WorkerInit,
    encode_chunk,
    keep_chunk,
)
from odb.source import IndexSource, index_array, rank_part
from odb.stats import LoaderStats
from odb.stream import StreamSource, is_stream, stream_length

__all__ = ["DataLoader", "wrap"]

_STATE_VERSION = 2

logger = logging.getLogger("odb")
_TOLD: set[str] = set()  # warnings already logged by this process


class DataLoader:
    """A drop-in for ``torch.utils.data.DataLoader`` that forms batches under a token budget.

    ``dataset[i]`` must return ONE processed sample: a dict with a 1-D ``input_ids`` (visual
    tokens already expanded), optional ``labels`` (-100 where no loss) and ``attention_mask``,
    and any model extras. Workers run the dataset in parallel; odb measures, plans and
    collates in the iterating process. Each batch is a mapping for ``model(**batch)`` carrying
    a :class:`~odb.StepInfo` (read it with :func:`odb.step_info`).

    ``dataset`` may also be a stream, a torch ``IterableDataset`` or a Hugging Face
    ``datasets.IterableDataset`` yielding such samples, read in its own order (see
    odb/stream.py and docs/usage.md: how it is split across ranks and workers, what resumes
    exactly).

    Args:
        token_budget: the most a batch may cost under ``cost`` (tokens, padding included in
            padded mode).
        mode: ``"padded"`` (rows right-padded to the longest; cost ``n * max_len``) or
            ``"packed"`` (one padding-free row; cost ``sum(len)``). By default the layout
            ``collate_fn`` states (odb's collators, TRL's padding-free flag, Hugging Face's
            ``DataCollatorWithFlattening``: see ``odb.collate.collator_layout``), else
            ``cost``'s, else padded. A stated layout that differs from ``mode`` raises
            :class:`ConfigError`, and so does any batch that is not laid out as ``mode``.
        collate_fn: applied to each group's list of samples; defaults to odb's padded or
            packed collator for text models.
        shuffle, seed: a seeded permutation per epoch (``set_epoch``); ``sampler`` instead
            gives the index order explicitly (neither applies to a stream).
        window: the most samples planned together; larger windows batch more tightly.
        round_size: samples pulled per planning round (default ``window // 8``).
        over_budget: a sample that alone exceeds the budget or a cap: ``"error"`` raises,
            ``"solo"`` emits it alone (counted), ``"truncate"`` cuts its per-token fields to
            fit (text-only samples).
        cost: a :class:`~odb.ComputeCost` replacing the mode's token cost.
        max_samples, max_images, max_vision_patches, max_tokens: hard caps per batch
            (``max_tokens``: tokens computed, padding included; with a ``cost`` pricing step
            time it keeps memory bounded).
        fill_threshold: how good a group must be to leave without waiting (padding efficiency
            of a maximal padded group; budget fill of a packed row).
        max_wait: rounds after which a buffered sample is forced out.
        fetch_size: dataset indices per worker task.
        join: under torch.distributed, ``True`` (default) emits every sample of every rank,
            with ghost batches (loss weight 0) on ranks that ran out first; ``False`` stops
            all ranks when the first runs out and counts what was dropped.
        share_tail: under torch.distributed, once every rank has read its whole shard, ranks
            with more planned batches left hand some to ranks with fewer, so all finish
            together instead of the others running ghost batches (True, the default; shards of
            equal sample counts hold unequal tokens). A receiving rank reads those samples
            again by index, in the main process: a few batches per pass. ``False`` keeps every
            sample on its own rank.
        shard: split the index order across ranks (default: when torch.distributed is
            initialised; a ``DistributedSampler`` given as ``sampler`` is turned into odb's
            own sharding with its seed, shuffle and rank, without its padding duplicates).
            Every rank must then hold the same epoch order; a sampler that already gives
            each rank its own indices needs ``shard=False`` (checked at the start of each
            pass: different orders with sharding on raise ``ConfigError``).
        align_timeout: seconds a rank waits for the others in a round before failing.
        num_samples: a stream's samples over all ranks, when known and the stream does not
            state it (``len()``); only step estimates and epoch accounting use it.
        exchange: how this rank talks to the others (default: a dedicated gloo group under
            torch.distributed, else none); an :class:`~odb.exchange.InProcessGroup`'s
            exchange runs several loaders as ranks in one process (tests, simulations).
        steps_multiple_of: end every pass on a multiple of this many steps, with ghost batches
            (loss weight 0) if needed; set it to the gradient-accumulation steps so an epoch
            never ends on a partial accumulation window.
        vision_placeholder: a processed sample holding the smallest image, all labels -100
            (default: the collator's ``vision_placeholder``, which ``odb.adapters.qwen_vl``'s
            collators carry). At a step where another rank's batch has images and this rank's
            has none, odb appends it to this rank's batch, so every rank runs the vision tower:
            under FSDP and DeepSpeed ZeRO-3 its weights are gathered collectively, and a rank
            that skipped it would leave the others waiting forever. The collator lays it out
            where no real token attends to it; the loss is unchanged.
        num_workers, pin_memory, timeout, worker_init_fn, multiprocessing_context, generator,
        prefetch_factor, persistent_workers: as for ``torch.utils.data.DataLoader``
            (``prefetch_factor`` counts fetch chunks per worker; by default enough for a
            whole round to be in flight).
    """

    def __init__(
        self,
        dataset: Any,
        token_budget: float,
        *,
        mode: str | None = None,
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
        max_tokens: int | None = None,
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
        join: bool = True,
        share_tail: bool = True,
        shard: bool | None = None,
        align_timeout: float = 1800.0,
        steps_multiple_of: int = 1,
        num_samples: int | None = None,
        exchange: Exchange | None = None,
        vision_placeholder: Mapping | None = None,
    ):
        self.streaming = is_stream(dataset)
        if not self.streaming and not hasattr(dataset, "__getitem__"):
            raise ConfigError(
                "odb needs a map-style dataset (with __getitem__ and __len__) or a stream (a "
                "torch or Hugging Face IterableDataset); got " + type(dataset).__name__
            )
        if self.streaming and (shuffle or sampler is not None):
            raise ConfigError(
                "a stream is read in its own order: shuffle it before it reaches odb (a "
                "Hugging Face stream: shuffle the dataset before to_iterable_dataset, or the "
                "stream's shards), not with shuffle= or a sampler"
            )
        if self.streaming and persistent_workers:
            raise ConfigError(
                "persistent_workers is not available for streams: each pass tells the workers "
                "where their part of the stream starts"
            )
        self.num_samples = None if num_samples is None else positive_int("num_samples", num_samples)
        mode = _resolve_mode(mode, collate_fn, cost)
        if sampler is not None and shuffle:
            raise ConfigError("give either shuffle=True or a sampler, not both")
        self._replicas: tuple[int, int] | None = None  # (rank, world) from a DistributedSampler
        if isinstance(sampler, DistributedSampler):
            shuffle, seed = sampler.shuffle, sampler.seed
            self._replicas = (sampler.rank, sampler.num_replicas)
            sampler = None
        cost = cost if cost is not None else (PaddedCost() if mode == "padded" else PackedCost())
        if isinstance(cost, ComputeCost) and cost.padded != (mode == "padded"):
            raise ConfigError(
                f"cost {cost!r} prices {'padded' if cost.padded else 'packed'} batches but "
                f"mode={mode!r}; use ComputeCost(padded={mode == 'padded'}, ...)"
            )
        budget = Budget(
            token_budget, cost, Caps(max_samples, max_images, max_vision_patches, max_tokens)
        )
        self.settings = RoundSettings.create(budget, window, round_size, fill_threshold, max_wait)
        self.admission = Admission(budget, over_budget)
        self.budget = budget
        self.mode = mode
        self.over_budget = over_budget
        self.dataset = dataset
        self.sampler = sampler
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.collate_fn = collate_fn or (PaddedCollator() if mode == "padded" else PackedCollator())
        if vision_placeholder is None:
            vision_placeholder = collator_placeholder(self.collate_fn)
        self.vision_placeholder = _checked_placeholder(vision_placeholder)
        self.pin_memory = bool(pin_memory) and torch.accelerator.is_available()
        self.num_workers = num_workers
        self._chunks = ChunkSampler(fetch_size if fetch_size is not None else 8)
        if num_workers and prefetch_factor is None:
            # Keep a whole round of samples in flight, so a round never waits for the
            # workers to start on samples it needs (torch's default keeps 2 chunks a worker).
            chunks_per_round = -(-self.settings.round_size // self._chunks.fetch_size)
            prefetch_factor = max(2, -(-chunks_per_round // num_workers))
        self._worker_options = dict(
            num_workers=num_workers,
            timeout=timeout,
            worker_init_fn=WorkerInit(worker_init_fn),
            multiprocessing_context=multiprocessing_context,
            generator=generator,
            # Worker-only settings mean nothing without workers (wrap may carry them over).
            prefetch_factor=prefetch_factor if num_workers else None,
        )
        self._fetcher = None
        if not self.streaming:
            self._fetcher = torch.utils.data.DataLoader(
                IndexedDataset(dataset),
                batch_sampler=self._chunks,
                collate_fn=encode_chunk if num_workers else keep_chunk,
                persistent_workers=persistent_workers and num_workers > 0,
                **self._worker_options,
            )
        self.join = bool(join)
        self.share_tail = bool(share_tail)
        self.steps_multiple_of = positive_int("steps_multiple_of", steps_multiple_of)
        self.shard = shard
        if isinstance(align_timeout, bool) or not (
            isinstance(align_timeout, int | float) and align_timeout > 0
        ):
            raise ConfigError(
                f"align_timeout must be a number of seconds > 0, got {align_timeout!r}"
            )
        self.align_timeout = float(align_timeout)
        self._exchange = exchange
        self._stats = LoaderStats(token_budget=float(token_budget))
        self._epoch = 0
        self._resume: dict | None = None
        self._iterator: _EpochIterator | None = None
        self._fingerprints: dict = {}  # the dataset's, taken once (see IndexSource)

    def measure(self, indices: Iterable[int]) -> list[SampleSize]:
        """The sizes of these samples of the (map-style) dataset, processed and measured in
        this loader's workers (in this process without workers); only the sizes come back."""
        measured = torch.utils.data.DataLoader(
            MeasuredDataset(self.dataset),
            sampler=[int(i) for i in indices],
            batch_size=None,
            **self._worker_options,
        )
        return list(measured)

    # -- the DataLoader surface ---------------------------------------------------------------
    def __iter__(self) -> Iterator[Mapping]:
        resume = self._resume if self._resume and self._resume["epoch"] == self._epoch else None
        self._resume = None
        self._iterator = None  # shut the previous pass's workers down before starting new ones
        exchange = self._world()
        engine = RoundEngine(
            self._pass_config(),
            exchange,
            self._source(),
            epoch=self._epoch,
            stats=self._stats,
            resume=resume,
        )
        self._iterator = _EpochIterator(
            engine, self.collate_fn, self.mode, self.pin_memory, self.vision_placeholder
        )
        return self._iterator

    def _source(self) -> IndexSource | StreamSource:
        """Where this pass's samples come from: the dataset in the epoch's index order, or the
        stream."""
        if self.streaming:
            return StreamSource(
                self.dataset,
                fetch_size=self._chunks.fetch_size,
                loader_options=self._worker_options,
                stats=self._stats,
            )
        return IndexSource(
            self.dataset,
            self._epoch_order(self._epoch),
            self._fetcher,
            self._chunks,
            decode=self.num_workers > 0,
            stats=self._stats,
            fingerprints=self._fingerprints,
        )

    def _pass_config(self) -> PassConfig:
        return PassConfig(
            self.settings,
            self.admission,
            join=self.join,
            share_tail=self.share_tail,
            shard=self.shard is not False,
            steps_multiple_of=self.steps_multiple_of,
            seed=self.seed,
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next pass uses (as with DistributedSampler); a
        stream with ``set_epoch`` (Hugging Face's reshuffles its shards by epoch) gets it too."""
        self._epoch = int(epoch)
        if self.streaming and callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(self._epoch)

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
            "dataset_len": self._length(),
            "stream": self.streaming,
            "join": self.join,
            "share_tail": self.share_tail,
            "steps_multiple_of": self.steps_multiple_of,
        }

    def state_dict(self) -> dict:
        """Where the loader is: plain Python data (indices, counters, RNG state), no tensors."""
        if self._iterator is not None and self._iterator.engine.epoch == self._epoch:
            position = self._iterator.engine.state()
        else:
            position = self._resume
        exchange = self._world()
        return {
            "version": _STATE_VERSION,
            "rank": exchange.rank,
            "world_size": exchange.world_size,
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
        exchange = self._world()
        here = (exchange.rank, exchange.world_size)
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

    # -- ranks and index order ------------------------------------------------------------------
    def _world(self) -> Exchange:
        """How this loader talks to the other ranks, settled at first use (so a loader may be
        built before torch.distributed is initialised)."""
        if self._exchange is None:
            self._exchange = world_exchange(self.align_timeout)
            if self._replicas is not None and self._replicas != (
                self._exchange.rank,
                self._exchange.world_size,
            ):
                raise ConfigError(
                    f"the DistributedSampler is for rank {self._replicas[0]} of "
                    f"{self._replicas[1]}, but this process is rank {self._exchange.rank} of "
                    f"{self._exchange.world_size}"
                )
        return self._exchange

    def _length(self) -> int | None:
        """Samples in the dataset, or in a stream when it states its length."""
        return stream_length(self.dataset) if self.streaming else len(self.dataset)

    def _epoch_order(self, epoch: int) -> Iterable[int]:
        """The whole epoch's index order, identical on every rank."""
        if self.sampler is not None:
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)
            return self.sampler
        if self.shuffle:
            return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return range(len(self.dataset))

    def epoch_samples(self, epoch: int | None = None) -> int:
        """The samples one epoch emits over all ranks (join mode): the epoch order's length
        when odb shards it (or in one process), else the sum of every rank's own order,
        gathered from the ranks. Then it is a collective: call it on every rank.

        A stream: ``num_samples``, or the length it states (on each rank when odb does not
        shard it); raises :class:`ConfigError` when neither is known."""
        exchange = self._world()
        if self.streaming:
            if self.num_samples is not None:
                return self.num_samples
            own = self._length()
            if own is None:
                raise ConfigError(
                    f"the stream ({type(self.dataset).__name__}) does not state its length: "
                    f"pass num_samples= (its samples over all ranks) to odb.DataLoader, or "
                    f"train for a number of steps (max_steps)"
                )
        else:
            own = len(index_array(self._epoch_order(self._epoch if epoch is None else epoch)))
        if exchange.world_size == 1 or self.shard is not False:
            return own
        return int(exchange.gather(np.array([own], dtype=np.int64)).sum())

    def shard_orders(self, epoch: int) -> list[np.ndarray]:
        """Every rank's index order for ``epoch`` as this loader splits the epoch (one order,
        this process's own, when it does not shard): what planning simulations replay."""
        if self.streaming:
            raise ConfigError("a stream has no index order to replay (see odb.estimate_steps)")
        order = index_array(self._epoch_order(epoch))
        world = self._world().world_size
        if world == 1 or self.shard is False:
            return [order]
        return [rank_part(order, rank, world) for rank in range(world)]


class _EpochIterator:
    """One pass (what ``iter(odb.DataLoader)`` returns): the round engine's steps, collated,
    with the vision placeholder where another rank's batch of the step has images."""

    def __init__(
        self,
        engine: RoundEngine,
        collate_fn: Callable,
        mode: str,
        pin_memory: bool,
        placeholder: Mapping | None,
    ):
        self.engine, self.collate_fn, self.mode = engine, collate_fn, mode
        self.pin_memory, self.placeholder = pin_memory, placeholder

    def __iter__(self) -> _EpochIterator:
        return self

    def __next__(self) -> Mapping:
        step = self.engine.next_step()
        if step is None:
            raise StopIteration
        entries, info = step
        stats = self.engine.stats
        start = time.perf_counter()
        samples = [entry.payload for entry in entries]
        if (
            info.vision
            and not any(entry.size.images for entry in entries)
            and self._can_place(samples, info)
        ):
            samples.append(self.placeholder)
            info = replace(info, vision_placeholder=True)
            stats.vision_placeholders += 1
        batch = self.collate_fn(samples)
        check_layout(batch, self.mode, [entry.size.length for entry in entries])
        if self.pin_memory:
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

    def _can_place(self, samples: list, info: StepInfo) -> bool:
        """Whether the placeholder can keep this rank in step with the vision tower (or why
        not, said once)."""
        if self.placeholder is not None and all("labels" in s for s in samples):
            return True
        why = (
            "the collator has no vision_placeholder (odb.adapters.qwen_vl's collators have "
            "one; or pass vision_placeholder= to odb.DataLoader)"
            if self.placeholder is None
            else "the samples have no labels, so the placeholder's tokens would carry loss"
        )
        if why not in _TOLD:
            _TOLD.add(why)
            logger.warning(
                "odb: at step %d another rank's batch has images and rank %d's has none, but %s. "
                "Under DDP that is fine; under FSDP or DeepSpeed ZeRO-3 this rank skips the "
                "vision tower whose weights the others gather, and training hangs",
                info.step,
                info.rank,
                why,
            )
        return False


def _checked_placeholder(placeholder: Mapping | None) -> Mapping | None:
    """``placeholder`` if it is one: a sample with at least one image and no label token."""
    if placeholder is None:
        return None
    images = measure_sample(placeholder, -1).images
    labels = placeholder.get("labels")
    if images < 1 or labels is None or (torch.as_tensor(labels) != IGNORE_INDEX).any():
        raise ConfigError(
            f"a vision_placeholder must hold an image (image_grid_thw) and labels that are all "
            f"-100; this one has {images} image(s) and labels {labels!r}"
        )
    return placeholder


def _resolve_mode(mode: str | None, collate_fn: Callable | None, cost: Any) -> str:
    """The batch layout: ``mode`` if given (checked against the layout ``collate_fn`` states),
    else the collator's, else the one ``cost`` prices, else padded."""
    stated = collator_layout(collate_fn)
    if mode is None:
        if stated is not None:
            return stated
        if isinstance(cost, ComputeCost):
            return "padded" if cost.padded else "packed"
        return "padded"
    if mode not in LAYOUTS:
        raise ConfigError(f"mode must be one of {LAYOUTS}, got {mode!r}")
    if stated is not None and stated != mode:
        raise ConfigError(
            f"mode={mode!r} but the collate_fn ({type(collate_fn).__name__}) lays batches out "
            f"{stated}: odb would price {stated} batches as {mode} ones. Leave mode out (it "
            f"follows the collator) or pass a {mode} collator"
        )
    return mode


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
    elif type(sampler) is not SequentialSampler and not is_stream(dataloader.dataset):
        settings["sampler"] = sampler  # a DistributedSampler becomes odb's own sharding
    settings.update(options)
    return DataLoader(dataloader.dataset, token_budget, **settings)
