"""odb over streams (torch and Hugging Face IterableDatasets): real loaders, one per rank,
as threads of this process (ranks) and with DataLoader workers (one process).

What each step must hold comes from the streams the tests made: every sample once, equal steps
on every rank, global counts equal to the sum of the ranks' own, and a restored run yields
exactly the batches an uninterrupted run had left."""

from __future__ import annotations

import datasets
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from streams import PlainStream, StatefulStream, collate_uids, stream_sample
from synthetic import label_tokens, lognormal_lengths

import odb
from odb.errors import ConfigError, SampleTypeError, StateError
from odb.exchange import run_ranks


def _lengths(n: int, seed: int = 0, cap: int = 90) -> list[int]:
    return [int(min(x, cap)) for x in lognormal_lengths(n, 30, 0.8, seed, low=2)]


def run_streams(streams, options, *, save_at=None, states=None):
    """Per rank: [(info, uids, tokens)] of one pass, and the loader state after step
    ``save_at``; ``states`` restores each rank's loader first."""

    def work(exchange):
        rank = exchange.rank
        loader = odb.DataLoader(
            streams[rank], exchange=exchange, collate_fn=collate_uids, **options
        )
        if states is not None:
            loader.load_state_dict(states[rank])
        steps, saved = [], None
        for batch in loader:
            steps.append((odb.step_info(batch), batch["uid"].tolist(), batch["tokens"].tolist()))
            if len(steps) == save_at:
                saved = loader.state_dict()
        return steps, saved

    return run_ranks(len(streams), work, timeout=60)


def check_pass(results, lengths, expected_uids):
    """Equal steps, every sample once, exact per-step counts, batches as their infos say."""
    counts = {len(steps) for steps, _ in results}
    assert len(counts) == 1, counts
    seen = []
    for step in range(counts.pop()):
        rows = [steps[step] for steps, _ in results]
        real = [(info, uids, tokens) for info, uids, tokens in rows if not info.ghost]
        for info, uids, tokens in real:
            assert tokens == [lengths[u] for u in uids]
            assert info.local_samples == len(uids)
            assert info.real_tokens == sum(tokens)
            assert info.local_label_tokens == sum(label_tokens(n) for n in tokens)
            seen.extend(uids)
        for info, _, _ in rows:
            assert info.global_samples == sum(i.local_samples for i, _, _ in real)
            assert info.global_label_tokens == sum(i.local_label_tokens for i, _, _ in real)
            assert info.loss_weight == (0.0 if info.ghost else 1.0)
    assert sorted(seen) == sorted(expected_uids)


@settings(max_examples=30, deadline=None)
@given(
    counts=st.lists(st.integers(0, 60), min_size=1, max_size=4),
    odb_splits=st.booleans(),
    mode=st.sampled_from(["padded", "packed"]),
    window=st.sampled_from([4, 16, 64]),
    fetch_size=st.sampled_from([1, 3, 8]),
    save_at=st.integers(1, 30),
    seed=st.integers(0, 1000),
)
def test_streams_of_any_lengths_are_aligned_exact_and_resume_exactly(
    counts, odb_splits, mode, window, fetch_size, save_at, seed
):
    """Ranks whose streams end at different times (an empty one among them), odb splitting
    one stream or each rank holding its own: equal steps, every sample once, exact counts;
    and ranks restored from the states all saved after one step go on with exactly the steps
    the uninterrupted run had left."""
    total = sum(counts)
    lengths = _lengths(total, seed)
    world = len(counts)
    if odb_splits:
        streams = [StatefulStream(range(total), lengths) for _ in range(world)]
    else:
        starts = [sum(counts[:r]) for r in range(world)]
        streams = [
            StatefulStream(range(s, s + c), lengths) for s, c in zip(starts, counts, strict=True)
        ]
    options = dict(
        token_budget=200, mode=mode, window=window, fetch_size=fetch_size, shard=odb_splits
    )
    full = run_streams(streams, options, save_at=save_at)
    check_pass(full, lengths, range(total))
    if len(full[0][0]) <= save_at:
        return
    rest = run_streams(streams, options, states=[saved for _, saved in full])
    for (steps, _), (tail, _) in zip(full, rest, strict=True):
        assert tail == steps[save_at:]


def _hf_stream(uids, lengths, shards=4) -> datasets.IterableDataset:
    rows = [stream_sample(u, lengths[u]) for u in uids]
    table = {
        "input_ids": [r["input_ids"].tolist() for r in rows],
        "labels": [r["labels"].tolist() for r in rows],
        "uid": [r["uid"] for r in rows],
    }
    return datasets.Dataset.from_dict(table).to_iterable_dataset(num_shards=shards)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["torch", "hugging face"])
def test_a_stream_read_by_workers_resumes_with_the_batches_left(kind, workers):
    lengths = _lengths(240, seed=1)
    if kind == "torch":
        stream = StatefulStream(range(240), lengths)
    else:
        stream = _hf_stream(range(240), lengths)
    options = dict(token_budget=256, num_workers=workers, window=32, fetch_size=5)
    (full,) = run_streams([stream], options, save_at=11)
    check_pass([full], lengths, range(240))
    (rest,) = run_streams([stream], options, states=[full[1]])
    assert rest[0] == full[0][11:]


def test_odb_splits_a_hugging_face_stream_by_node_across_ranks():
    lengths = _lengths(200, seed=3)
    for shards in (6, 5):  # shards per node, or every world-th example
        streams = [_hf_stream(range(200), lengths, shards) for _ in range(3)]
        full = run_streams(streams, dict(token_budget=256, window=16), save_at=4)
        check_pass(full, lengths, range(200))
        rest = run_streams(streams, dict(token_budget=256, window=16), states=[s for _, s in full])
        for (steps, _), (tail, _) in zip(full, rest, strict=True):
            assert tail == steps[4:]


def test_a_split_hugging_face_stream_follows_the_epoch_on_every_rank():
    """Hugging Face reorders a stream's shards by epoch; odb's split by node must too, and
    every epoch still covers the stream once."""
    lengths = _lengths(160, seed=7)

    def work(exchange):
        stream = _hf_stream(range(160), lengths, shards=8)
        loader = odb.DataLoader(stream, 256, exchange=exchange, collate_fn=collate_uids)
        orders = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches = [b for b in loader if not odb.step_info(b).ghost]
            orders.append([u for batch in batches for u in batch["uid"].tolist()])
        return orders

    ranks = run_ranks(2, work, timeout=60)
    for epoch in range(2):
        assert sorted(u for orders in ranks for u in orders[epoch]) == list(range(160))
    assert all(set(orders[0]) != set(orders[1]) for orders in ranks)  # other shards


def test_a_rank_with_an_empty_stream_runs_ghost_steps_with_a_lent_sample():
    lengths = _lengths(80, seed=4)
    streams = [
        StatefulStream(range(0, 50), lengths),
        StatefulStream([], lengths),
        StatefulStream(range(50, 80), lengths),
    ]
    full = run_streams(streams, dict(token_budget=200, window=8, shard=False), save_at=3)
    check_pass(full, lengths, range(80))
    empty = full[1][0]
    assert empty and all(info.ghost and info.sample_indices == (-1,) for info, _, _ in empty)
    # the lent ghost travels in the state: a restored empty rank still has its ghost steps
    rest = run_streams(
        streams, dict(token_budget=200, window=8, shard=False), states=[s for _, s in full]
    )
    for (steps, _), (tail, _) in zip(full, rest, strict=True):
        assert tail == steps[3:]


def test_join_false_stops_every_rank_when_the_first_stream_ends():
    lengths = _lengths(90, seed=5)
    streams = [StatefulStream(range(0, 20), lengths), StatefulStream(range(20, 90), lengths)]
    results = run_streams(streams, dict(token_budget=200, window=8, shard=False, join=False))
    assert len({len(steps) for steps, _ in results}) == 1
    assert all(not info.ghost for steps, _ in results for info, _, _ in steps)


def test_a_stream_that_cannot_say_where_it_is_refuses_to_save():
    loader = odb.DataLoader(PlainStream(range(50), _lengths(50)), 200, collate_fn=collate_uids)
    batches = iter(loader)
    next(batches)
    with pytest.raises(StateError, match="state_dict"):
        loader.state_dict()


def test_a_hugging_face_stream_shuffled_with_a_buffer_refuses_to_save():
    lengths = _lengths(60)
    stream = _hf_stream(range(60), lengths).shuffle(seed=0, buffer_size=16)
    loader = odb.DataLoader(stream, 200, collate_fn=collate_uids)
    batches = iter(loader)
    next(batches)
    with pytest.raises(StateError, match="shuffle"):
        loader.state_dict()


def test_a_bad_item_on_one_rank_stops_every_rank_with_its_cause():
    lengths = _lengths(80)
    streams = [
        StatefulStream(range(0, 40), lengths),
        StatefulStream(range(40, 80), lengths, bad_at=55),
    ]
    with pytest.raises(SampleTypeError, match="str"):
        run_streams(streams, dict(token_budget=200, window=8, shard=False))


def test_a_worker_raising_mid_stream_stops_every_rank():
    lengths = _lengths(80)
    streams = [
        StatefulStream(range(0, 40), lengths, fail_at=30),
        StatefulStream(range(40, 80), lengths),
    ]
    with pytest.raises(RuntimeError, match="broke at sample 30"):
        run_streams(streams, dict(token_budget=200, window=8, shard=False))


def test_a_worker_process_raising_mid_stream_reaches_the_loop():
    stream = StatefulStream(range(100), _lengths(100), fail_at=61)
    loader = odb.DataLoader(stream, 200, num_workers=2, collate_fn=collate_uids)
    with pytest.raises(RuntimeError, match="broke at sample 61"):
        list(loader)


def test_ranks_given_different_streams_to_split_are_refused():
    lengths = _lengths(40)
    streams = [StatefulStream(range(40), lengths), _hf_stream(range(40), lengths)]
    with pytest.raises(ConfigError, match="shard=False"):
        run_streams(streams, dict(token_budget=200))


def test_stream_options_that_do_not_apply_are_refused():
    stream = StatefulStream(range(10), _lengths(10))
    with pytest.raises(ConfigError, match="own order"):
        odb.DataLoader(stream, 200, shuffle=True)
    with pytest.raises(ConfigError, match="persistent_workers"):
        odb.DataLoader(stream, 200, num_workers=1, persistent_workers=True)
    with pytest.raises(ConfigError, match="num_samples"):
        odb.DataLoader(stream, 200).epoch_samples()
    assert odb.DataLoader(stream, 200, num_samples=10).epoch_samples() == 10


def test_wrap_takes_a_torch_dataloader_over_a_stream():
    lengths = _lengths(64)
    plain = torch.utils.data.DataLoader(
        StatefulStream(range(64), lengths), batch_size=4, collate_fn=collate_uids
    )
    loader = odb.wrap(plain, 200)
    uids = [u for batch in loader for u in batch["uid"].tolist()]
    assert sorted(uids) == list(range(64))


def test_a_long_stream_saves_a_position_close_to_where_it_is():
    """A restored pass reads the stream again from the oldest sample it still holds; the
    ghost sample must not pin that at the stream's start."""
    lengths = _lengths(2000, seed=6)
    lengths[0] = 2  # the cheapest sample of the stream comes first
    (full,) = run_streams(
        [StatefulStream(range(2000), lengths)], dict(token_budget=200, window=16), save_at=300
    )
    position = full[1]["position"]
    behind = position["consumed"] - position["source"]["position"]["seq"]
    assert position["consumed"] > 1000 and behind <= 100, behind


def test_a_stream_that_cannot_say_where_it_is_saves_a_finished_pass():
    loader = odb.DataLoader(PlainStream(range(50), _lengths(50)), 200, collate_fn=collate_uids)
    assert sorted(u for batch in loader for u in batch["uid"].tolist()) == list(range(50))
    state = loader.state_dict()
    again = odb.DataLoader(PlainStream(range(50), _lengths(50)), 200, collate_fn=collate_uids)
    again.load_state_dict(state)
    assert list(again) == []


class _Unsplit(StatefulStream):
    """A stream that forgets to split itself across DataLoader workers."""

    def _own(self) -> list[int]:
        return self.uids


def test_a_torch_stream_that_every_worker_reads_whole_is_refused():
    stream = _Unsplit(range(60), _lengths(60))
    loader = odb.DataLoader(stream, 200, num_workers=2, collate_fn=collate_uids)
    with pytest.raises(ConfigError, match="get_worker_info"):
        list(loader)
    alone = odb.DataLoader(stream, 200, num_workers=1, collate_fn=collate_uids)
    assert sorted(u for batch in alone for u in batch["uid"].tolist()) == list(range(60))
