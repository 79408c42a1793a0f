"""The Hugging Face Trainer adapter with a stream as train_dataset (a Hugging Face or torch
IterableDataset), with the real Trainer, in one process.

Every sample names itself in its first two tokens (``uid % VOCAB``, ``uid // VOCAB``), so the
tests read which samples each micro-batch trained from the batch the model got, not from
odb's own bookkeeping."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
import transformers
from hf_setup import VOCAB, lengths, tiny_model, training_args
from streams import PlainStream

import odb
from odb.adapters.hf import enable

BUDGET = 256

SMALL_WINDOW = dict(window=8, fetch_size=2)  # a saved position past the stream's start

pytestmark = pytest.mark.usefixtures("trl_one_thread")  # tiny models: one torch thread


def _sample(uid: int, length: int) -> dict:
    ids = (torch.arange(length) * 7 + uid) % VOCAB
    ids[0], ids[1] = uid % VOCAB, uid // VOCAB
    labels = ids.clone()
    labels[: length // 3] = -100
    return {"input_ids": ids.tolist(), "labels": labels.tolist()}


class TokenStream(torch.utils.data.IterableDataset):
    """The same samples as a torch stream, read in one process, that saves its position."""

    def __init__(self, n: int, seed: int = 0):
        self.sizes = lengths(n, seed)
        self.start = self.done = 0

    def __iter__(self):
        self.done = self.start
        for uid in range(self.start, len(self.sizes)):
            self.done += 1
            yield {key: torch.tensor(v) for key, v in _sample(uid, self.sizes[uid]).items()}

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["done"]


def hf_stream(n: int, seed: int = 0) -> datasets.IterableDataset:
    """A tokenizing ``map`` over a 4-shard stream of (uid, length) rows: its columns are
    unknown before it is read, and uid and length are not the model's."""
    rows = {"uid": list(range(n)), "length": lengths(n, seed)}
    stream = datasets.Dataset.from_dict(rows).to_iterable_dataset(num_shards=4)
    return stream.map(lambda row: _sample(row["uid"], row["length"]))


class _Batches:
    """Per micro-batch the Trainer trains on: (odb epoch, ghost, uids of its rows)."""

    def __init__(self, trainer):
        self.seen: list[tuple[int, bool, list[int]]] = []
        original = trainer.training_step

        def training_step(model, inputs, num_items_in_batch=None):
            info = odb.step_info(inputs)
            ids = inputs["input_ids"]
            uids = (ids[:, 0] + VOCAB * ids[:, 1]).tolist()
            self.seen.append((info.epoch, info.ghost, uids))
            return original(model, inputs, num_items_in_batch)

        trainer.training_step = training_step


def _train(output_dir, dataset, *, resume=None, options=None, **args):
    trainer = transformers.Trainer(
        model=tiny_model(), args=training_args(output_dir, **args), train_dataset=dataset
    )
    enable(trainer, BUDGET, **(options or {}))
    batches = _Batches(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, batches.seen


def _real_uids_by_epoch(seen) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for epoch, ghost, uids in seen:
        if not ghost:
            out.setdefault(epoch, []).extend(uids)
    return out


@pytest.mark.slow
def test_a_stream_trains_exactly_max_steps_with_each_sample_once_per_pass(tmp_path):
    n = 30
    trainer, seen = _train(tmp_path, hf_stream(n), max_steps=12, gradient_accumulation_steps=2)
    assert trainer.state.global_step == 12
    assert len(seen) == 24  # full accumulation windows
    passes = _real_uids_by_epoch(seen)
    assert len(passes) >= 2  # the stream ended and a new pass started
    last = max(passes)
    for epoch, uids in passes.items():
        assert len(uids) == len(set(uids))
        if epoch != last:
            assert sorted(uids) == list(range(n))


@pytest.mark.slow
@pytest.mark.parametrize("make", [hf_stream, TokenStream], ids=["hf", "torch"])
def test_resume_from_a_stream_checkpoint_trains_on_the_batches_the_run_had_left(tmp_path, make):
    """Checkpoints at every step of one run; fresh trainers resumed from one in the middle of
    the first pass and from the one at its very end train on exactly the run's later
    micro-batches (the second crosses into a new pass of the stream)."""
    common = dict(max_steps=10, gradient_accumulation_steps=2, options=SMALL_WINDOW)
    _, full = _train(tmp_path / "full", make(40), save_strategy="steps", save_steps=1, **common)
    pass_end = sum(1 for epoch, _, _ in full if epoch == 0) // 2
    assert 2 <= pass_end < 10
    checkpoint = tmp_path / "full" / f"checkpoint-{pass_end - 1}"
    state = json.loads((checkpoint / "odb_state_rank0.json").read_text())
    (worker,) = state["loader"]["position"]["source"]["position"]["workers"]
    assert worker["state"] is not None  # the stream's own position went through json
    for step in (pass_end - 1, pass_end):
        resume = str(tmp_path / "full" / f"checkpoint-{step}")
        trainer, rest = _train(tmp_path / f"resumed{step}", make(40), resume=resume, **common)
        assert trainer.state.global_step == 10
        assert rest == full[2 * step :]


class _TupleStateStream(TokenStream):
    """Says where it is with a tuple, which json would turn into a list."""

    def state_dict(self) -> dict:
        return {"done": (self.done,)}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["done"][0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        (PlainStream(range(30), lengths(30)), "state_dict"),  # its "uid" is not the model's
        (_TupleStateStream(30), "json"),
    ],
    ids=["no state_dict", "not json"],
)
def test_a_stream_that_cannot_save_its_position_warns_and_refuses_to_resume(
    tmp_path, stream, reason
):
    common = dict(max_steps=5, options=SMALL_WINDOW)
    with pytest.warns(UserWarning, match=reason):
        _train(tmp_path, stream, save_strategy="steps", save_steps=4, **common)
    with pytest.raises(odb.StateError, match=reason):
        _train(tmp_path, stream, resume=str(tmp_path / "checkpoint-4"), **common)


def _epochs_trainer(tmp_path, stream, **options):
    """A Trainer for one epoch of ``stream``. The Trainer refuses a dataset without len()
    unless max_steps is set, so it is built with max_steps and switched to epochs after (as a
    caller or a subclass may); odb must then know the stream's length."""
    trainer = transformers.Trainer(
        model=tiny_model(), args=training_args(tmp_path, max_steps=1), train_dataset=stream
    )
    trainer.args.max_steps, trainer.args.num_train_epochs = -1, 1
    enable(trainer, BUDGET, **options)
    return trainer


def test_epochs_of_a_stream_of_unknown_length_are_refused(tmp_path):
    trainer = _epochs_trainer(tmp_path, hf_stream(20))
    with pytest.raises(odb.ConfigError, match=r"num_samples=.*max_steps"):
        trainer.train()


@pytest.mark.slow
def test_an_epoch_of_a_stream_of_known_length_trains_every_sample_once(tmp_path):
    trainer = _epochs_trainer(tmp_path, hf_stream(50), num_samples=50)
    batches = _Batches(trainer)
    trainer.train()
    passes = _real_uids_by_epoch(batches.seen)
    assert list(passes) == [0] and sorted(passes[0]) == list(range(50))
    assert trainer.state.global_step == len(batches.seen)
    assert trainer.state.max_steps == trainer.state.global_step  # ended with the data
