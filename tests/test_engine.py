"""The round engine for any number of ranks, through the in-process exchange: N engines over
sample sizes (``odb.simulate``), and N real ``odb.DataLoader``s as threads of this process.

Every property is checked on every step of every rank; what a step must hold does not come
from the engine but from the sizes the test made (label tokens, samples, coverage).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic import LengthDataset, label_tokens, lognormal_lengths

import odb
from odb.buffer import RoundSettings
from odb.cost import Budget, PackedCost, PaddedCost, SampleSize
from odb.errors import AlignmentError, ConfigError, SampleError
from odb.exchange import run_ranks
from odb.simulate import simulate


def _size(index: int, length: int) -> SampleSize:
    """Label tokens that differ from sample to sample, so a count taken from the wrong
    sample or the wrong rank shows; an image in every third sample, so steps mix ranks with
    and without images."""
    image = index % 3 == 0
    return SampleSize(
        length, max(0, length - 1 - index % 7), vision_patches=4 * image, images=image
    )


def _shards(counts, lengths) -> list[list[tuple[int, SampleSize]]]:
    shards, index = [], 0
    for count in counts:
        shards.append(
            [(i, _size(i, lengths[i % len(lengths)])) for i in range(index, index + count)]
        )
        index += count
    return shards


def check_steps(steps, shards, *, join=True, multiple=1, share_tail=True, dropped=None):
    """Every guarantee of docs/protocol.md on every step: equal step counts (a multiple of
    ``multiple``); per step, global label tokens and samples equal to the sums of the ranks'
    non-ghost local counts, and local counts equal to those of the step's samples; ghosts
    weigh 0; in join mode every sample once, else once at most with the rest dropped;
    without ``share_tail`` every rank runs only its own samples. A step is a vision step on
    every rank alike, exactly when some rank's batch in it (a ghost's copied sample included)
    holds an image."""
    sizes = {i: size for shard in shards for i, size in shard}
    counts = {len(rank_steps) for rank_steps in steps}
    assert len(counts) == 1, f"unequal steps {[len(s) for s in steps]}"
    assert counts.pop() % multiple == 0
    for j, step in enumerate(zip(*steps, strict=True)):
        real = [s for s in step if not s.ghost]
        labels = sum(s.local_label_tokens for s in real)
        samples = sum(s.local_samples for s in real)
        for s in step:
            assert s.step == j
            assert (s.global_label_tokens, s.global_samples) == (labels, samples), (j, step)
            assert s.loss_weight == (0.0 if s.ghost else 1.0)
        vision = {s.vision for s in step}
        assert len(vision) == 1, (j, step)
        images = any(sizes[i].images for s in step for i in s.sample_indices if i >= 0)
        lent = any(s.sample_indices == (-1,) for s in step)  # a ghost copying another's sample
        assert vision == {True} if images else (lent or vision == {False}), (j, step)
        for s in real:
            assert s.local_label_tokens == sum(sizes[i].label_tokens for i in s.sample_indices)
            assert s.local_samples == len(s.sample_indices)
    emitted = [
        i for rank_steps in steps for s in rank_steps if not s.ghost for i in s.sample_indices
    ]
    assert len(emitted) == len(set(emitted)), "a sample emitted twice"
    if join:
        assert sorted(emitted) == sorted(sizes), "join mode: every sample of every rank once"
    elif dropped is not None:
        assert len(emitted) + sum(dropped) == len(sizes)
    if not share_tail:
        for rank, rank_steps in enumerate(steps):
            own = {i for i, _ in shards[rank]}
            assert all(set(s.sample_indices) <= own for s in rank_steps if not s.ghost)


@st.composite
def shard_counts(draw) -> list[int]:
    """1-16 ranks, empty ones included; sometimes one rank holds ~100x what the others do."""
    world = draw(st.integers(1, 16))
    counts = draw(st.lists(st.integers(0, 12), min_size=world, max_size=world))
    if draw(st.booleans()):
        counts[draw(st.integers(0, world - 1))] = draw(st.integers(0, 1200))
    return counts


@settings(max_examples=120, deadline=None)
@given(
    counts=shard_counts(),
    lengths=st.lists(st.integers(1, 3000), min_size=1, max_size=40),
    packed=st.booleans(),
    window=st.integers(4, 64),
    join=st.booleans(),
    share_tail=st.booleans(),
    multiple=st.integers(1, 3),
)
def test_every_step_of_every_rank_is_aligned_and_exact(
    counts, lengths, packed, window, join, share_tail, multiple
):
    budget = Budget(4096, PackedCost() if packed else PaddedCost())
    shards = _shards(counts, lengths)
    # termination (docs/protocol.md): at most max_r N_r rounds with steps, sum_r N_r without
    bound = max(counts) + sum(counts) + 1
    result = simulate(
        shards,
        RoundSettings.create(budget, window=window),
        join=join,
        share_tail=share_tail,
        steps_multiple_of=multiple,
        seed=7,
        max_rounds=bound,
    )
    check_steps(
        result.steps,
        shards,
        join=join,
        multiple=multiple,
        share_tail=share_tail,
        dropped=result.dropped,
    )
    if not join:  # no ghost steps but the padding to a multiple, at the very end
        for steps in result.steps:
            ghosts = [k for k, s in enumerate(steps) if s.ghost]
            assert all(k >= len(steps) - (multiple - 1) for k in ghosts)
    for rank_steps, shard in zip(result.steps, shards, strict=True):
        own = {i for i, _ in shard}
        ghosts = [s.round for s in rank_steps if s.ghost]
        if join and ghosts:  # ghosts only from the round its own samples run out
            assert not any(
                s.round > ghosts[0] and set(s.sample_indices) & own
                for s in rank_steps
                if not s.ghost
            )


def test_several_ranks_receive_handed_over_groups_in_one_step_and_counts_stay_exact():
    """The layout that broke turn 1's exact loss: one dataset, 100 / 100 / 700 samples per
    rank; at the end, two ranks receive groups in the same steps."""
    lengths = np.minimum(lognormal_lengths(900, 200, 1.0, seed=0), 2048).tolist()
    shards = _shards([100, 100, 700], lengths)
    result = simulate(shards, RoundSettings.create(Budget(2048), window=128))
    check_steps(result.steps, shards)
    together = [
        j
        for j, step in enumerate(zip(*result.steps, strict=True))
        if sum(s.reason == "shared" for s in step) >= 2
    ]
    assert together, "the layout must hand groups to two ranks in one step"


def test_the_end_of_unequal_shards_is_shared_so_the_ranks_finish_together():
    # rank 0's samples are 8x longer: with equal sample counts it has 8x the groups to run
    shards = [
        [(i, SampleSize(2000, 2)) for i in range(40)],
        [(40 + i, SampleSize(250, 2)) for i in range(40)],
    ]
    settings_ = RoundSettings.create(Budget(4096), window=64)
    apart = simulate(shards, settings_, share_tail=False)
    shared = simulate(shards, settings_)
    assert sum(step.ghost for step in apart.steps[1]) >= 15  # 20 groups against 3
    assert sum(step.ghost for steps in shared.steps for step in steps) <= 1
    assert len(shared.steps[0]) == -(-(20 + 3) // 2)
    handed = [step for step in shared.steps[1] if step.reason == "shared"]
    assert handed and all(set(step.sample_indices) < set(range(40)) for step in handed)
    # the versions and the identities, one report per round, two more in the round that
    # hands over
    assert shared.transfer_rounds == 1 and shared.collectives == 2 + shared.rounds + 2


# -- real loaders as threads --------------------------------------------------------------------


def run_loaders(datasets, options, *, epochs=1, per_rank=None):
    """Each rank's (step infos, error) from one odb.DataLoader per rank in one process;
    ``datasets[r]`` is rank r's dataset, ``per_rank[r]`` its sampler (then ``shard`` as
    ``options`` say). Checks that every batch holds exactly the samples its step info names."""

    def work(exchange):
        rank = exchange.rank
        dataset = datasets[rank]
        extra = {"sampler": per_rank[rank]} if per_rank is not None else {}
        loader = odb.DataLoader(dataset, exchange=exchange, **options, **extra)
        infos = []
        try:
            for epoch in range(epochs):
                loader.set_epoch(epoch)
                for batch in loader:
                    info = odb.step_info(batch)
                    _check_batch(batch, info, dataset, options.get("mode", "padded"))
                    infos.append(info)
        except Exception as error:
            return infos, error
        return infos, None

    return run_ranks(len(datasets), work, timeout=60)


def _check_batch(batch, info, dataset, mode):
    if info.sample_indices == (-1,):  # a ghost step copying a sample another rank lent
        assert info.ghost
        return
    ids = batch["input_ids"]
    lengths = [dataset.lengths[i] for i in info.sample_indices]
    if mode == "packed":
        expected = torch.cat(
            [torch.full((n,), i) for i, n in zip(info.sample_indices, lengths, strict=True)]
        )
        assert torch.equal(ids[0], expected)
    else:
        assert ids.shape[0] == len(lengths)
        for row, (i, n) in enumerate(zip(info.sample_indices, lengths, strict=True)):
            assert (ids[row, :n] == i).all()
    assert info.real_tokens == sum(lengths)
    assert info.local_label_tokens == sum(label_tokens(n) for n in lengths)


def _size_shards(dataset, orders):
    return [
        [(i, SampleSize(dataset.lengths[i], label_tokens(dataset.lengths[i]))) for i in order]
        for order in orders
    ]


@settings(max_examples=25, deadline=None)
@given(
    world=st.integers(1, 4),
    n=st.integers(0, 80),
    seed=st.integers(0, 1000),
    mode=st.sampled_from(["padded", "packed"]),
    own_samplers=st.booleans(),
    share_tail=st.booleans(),
    multiple=st.integers(1, 2),
)
def test_loaders_in_threads_emit_exact_aligned_batches(
    world, n, seed, mode, own_samplers, share_tail, multiple
):
    lengths = np.minimum(lognormal_lengths(n, 120, 1.0, seed=seed), 512).tolist() if n else []
    dataset = LengthDataset(lengths)
    options = dict(
        token_budget=512,
        mode=mode,
        window=16,
        seed=seed,
        share_tail=share_tail,
        steps_multiple_of=multiple,
    )
    per_rank = None
    if own_samplers:  # uneven, disjoint parts given by the user
        cuts = sorted(np.random.default_rng(seed).integers(0, n + 1, world - 1).tolist())
        per_rank = [list(range(a, b)) for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
        options["shard"] = False
    results = run_loaders([dataset] * world, options, per_rank=per_rank)
    for _, error in results:
        assert error is None, error
    steps = [infos for infos, _ in results]
    orders = per_rank or [list(range(n))[r::world] for r in range(world)]
    check_steps(steps, _size_shards(dataset, orders), multiple=multiple, share_tail=share_tail)


def _errors(results):
    return [error for _, error in results]


def test_a_sampler_per_rank_with_default_sharding_is_refused_on_every_rank():
    dataset = LengthDataset([10] * 90)
    per_rank = [list(range(0, 10)), list(range(10, 50)), list(range(50, 90))]
    results = run_loaders([dataset] * 3, dict(token_budget=128), per_rank=per_rank)
    for error in _errors(results):
        assert isinstance(error, ConfigError) and "shard=False" in str(error)
    assert not any(infos for infos, _ in results), "refused before any batch"


def test_ranks_with_their_own_datasets_never_hand_groups_over():
    datasets = [
        LengthDataset(lognormal_lengths(n, 100, 1.0, seed=r)) for r, n in enumerate([30, 60, 200])
    ]
    options = dict(token_budget=1024, window=16, shard=False)
    results = run_loaders(datasets, options)
    steps = [infos for infos, error in results if error is None]
    assert len(steps) == 3
    assert not any(s.reason == "shared" for rank in steps for s in rank)
    assert len({len(rank) for rank in steps}) == 1
    for rank, infos in enumerate(steps):
        mine = [i for s in infos if not s.ghost for i in s.sample_indices]
        assert sorted(mine) == list(range(len(datasets[rank])))
    for step in zip(*steps, strict=True):
        real = [s for s in step if not s.ghost]
        assert {s.global_label_tokens for s in step} == {sum(s.local_label_tokens for s in real)}


def test_a_rank_with_an_empty_dataset_runs_ghost_steps_with_a_sample_lent_by_another():
    datasets = [LengthDataset([20] * 40), LengthDataset([]), LengthDataset([30] * 40)]
    results = run_loaders(datasets, dict(token_budget=256, window=16, shard=False))
    assert _errors(results) == [None, None, None]
    steps = [infos for infos, _ in results]
    assert len({len(infos) for infos in steps}) == 1
    assert all(info.ghost and info.sample_indices == (-1,) for info in steps[1])
    for rank in (0, 2):
        seen = [i for info in steps[rank] if not info.ghost for i in info.sample_indices]
        assert sorted(seen) == list(range(40))


def test_ranks_whose_datasets_are_all_empty_finish_at_once():
    results = run_loaders([LengthDataset([])] * 3, dict(token_budget=256, shard=False))
    assert [(infos, error) for infos, error in results] == [([], None)] * 3


def test_ranks_built_with_other_settings_are_refused():
    dataset = LengthDataset([10] * 30)

    def work(exchange):
        loader = odb.DataLoader(dataset, 128, window=16 + exchange.rank, exchange=exchange)
        with pytest.raises(ConfigError, match="other settings than rank 0"):
            next(iter(loader))

    run_ranks(2, work, timeout=30)


def test_a_failing_sample_stops_the_other_ranks_with_its_cause():
    class Broken(LengthDataset):
        def __getitem__(self, index):
            sample = super().__getitem__(index)
            if index == 25:
                sample["labels"] = sample["labels"][:-1]
            return sample

    results = run_loaders([Broken([10] * 40)] * 2, dict(token_budget=128, window=8))
    errors = _errors(results)
    assert isinstance(errors[1], SampleError) and "sample 25" in str(errors[1])
    assert isinstance(errors[0], AlignmentError)
    assert str(errors[0]).startswith("rank(s) [1] raised while preparing this round (a sample")


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_a_restored_pass_continues_every_rank_with_the_same_steps(mode):
    """Save every rank's state at each step of a pass whose end is shared out between three
    ranks of unequal shards, restore it on fresh loaders, and get the rest of the pass: what the
    uninterrupted pass ran, step for step (handed-over groups and ghosts included)."""
    lengths = np.minimum(lognormal_lengths(150, 120, 1.0, seed=3), 512).tolist()
    dataset = LengthDataset(lengths)
    per_rank = [list(range(0, 15)), list(range(15, 40)), list(range(40, 150))]
    options = dict(token_budget=512, mode=mode, window=16, shard=False, steps_multiple_of=2)

    def work(exchange):
        def loader():
            sampler = per_rank[exchange.rank]
            return odb.DataLoader(dataset, sampler=sampler, exchange=exchange, **options)

        full = [odb.step_info(b) for b in loader()]
        for cut in range(len(full) + 1):
            head = loader()
            batches = iter(head)
            taken = [odb.step_info(next(batches)) for _ in range(cut)]
            state = head.state_dict()
            rest = loader()
            rest.load_state_dict(state)
            assert taken + [odb.step_info(b) for b in rest] == full, (exchange.rank, cut)
        return full

    steps = run_ranks(3, work, timeout=120)
    assert any(s.reason == "shared" for rank in steps for s in rank)
    assert any(s.ghost for rank in steps for s in rank)


class _Unreadable(LengthDataset):
    """A LengthDataset whose samples cannot be read once ``broken`` (a lost mount, say)."""

    broken = False

    def __getitem__(self, index):
        if self.broken:
            raise OSError(f"cannot read sample {index}")
        return super().__getitem__(index)


def test_a_rank_that_cannot_read_its_restored_steps_again_stops_every_rank_before_any_step():
    """A restored pass first reads again the steps its state had decided but not yet run. If one
    rank cannot, no rank may run one of them: the others would wait in the training's
    all-reduce for a rank that raised (or, here, run steps that rank never runs)."""

    def work(exchange):
        options = dict(token_budget=40, window=16, round_size=16, exchange=exchange)
        head = odb.DataLoader(_Unreadable([10] * 64), **options)
        batches = iter(head)
        next(batches)
        state = head.state_dict()
        assert state["position"]["pending"], "the cut must leave decided steps to run"
        dataset = _Unreadable([10] * 64)
        rest = odb.DataLoader(dataset, **options)
        rest.load_state_dict(state)
        dataset.broken = exchange.rank == 1
        ran = []
        try:
            for batch in rest:
                ran.append(odb.step_info(batch).step)
        except Exception as error:
            return ran, error
        return ran, None

    results = run_ranks(2, work, timeout=30)
    assert [ran for ran, _ in results] == [[], []]
    assert isinstance(results[1][1], OSError)
    assert isinstance(results[0][1], AlignmentError) and "rank(s) [1]" in str(results[0][1])


def test_ranks_at_different_epochs_are_refused_before_any_batch():
    """Every decision is seeded by the epoch: ranks on different epochs (set_epoch called with
    other values, no shuffle, so their orders still agree) pair other groups in each step and
    count wrong global label tokens, silently."""
    dataset = LengthDataset(np.minimum(lognormal_lengths(200, 120, 1.0, seed=1), 512).tolist())

    def work(exchange):
        loader = odb.DataLoader(dataset, 512, window=16, exchange=exchange)
        loader.set_epoch(exchange.rank)
        infos = []
        try:
            infos.extend(odb.step_info(batch) for batch in loader)
        except ConfigError as error:
            return infos, error
        return infos, None

    for infos, error in run_ranks(2, work, timeout=30):
        assert infos == [] and isinstance(error, ConfigError), (len(infos), error)
        assert "epoch" in str(error)


def test_ranks_restored_from_states_of_different_steps_are_refused_before_any_batch():
    """Each rank restores its own state; states saved at different steps (files of two
    checkpoints mixed up) put the ranks in different rounds, whose decisions do not match."""
    dataset = LengthDataset(np.minimum(lognormal_lengths(200, 120, 1.0, seed=1), 512).tolist())

    def work(exchange):
        options = dict(token_budget=512, window=16, exchange=exchange)
        head = odb.DataLoader(dataset, **options)
        batches = iter(head)
        states = []
        for _ in range(6):
            next(batches)
            states.append(head.state_dict())
        rest = odb.DataLoader(dataset, **options)
        rest.load_state_dict(states[2 + 3 * exchange.rank])  # steps 3 and 6
        infos = []
        try:
            infos.extend(odb.step_info(batch) for batch in rest)
        except ConfigError as error:
            return infos, error
        return infos, None

    for infos, error in run_ranks(2, work, timeout=30):
        assert infos == [] and isinstance(error, ConfigError), (len(infos), error)


# -- the in-process exchange ----------------------------------------------------------------------


def test_a_rank_that_returns_while_the_others_still_exchange_fails_them_at_once():
    """A rank whose work returns early (it stopped iterating) will never join another exchange:
    the ranks waiting in one fail at once, as gloo peers of a process that exited would, rather
    than after the whole timeout."""

    def work(exchange):
        if exchange.rank == 0:
            return "left"
        exchange.gather(np.array([1]))

    start = time.perf_counter()
    with pytest.raises(AlignmentError):
        run_ranks(3, work, timeout=20)
    assert time.perf_counter() - start < 10


def test_a_rank_that_raises_after_an_exchange_does_not_undo_it_for_the_others():
    """An exchange every rank took part in is complete: a rank that raises right after it (a
    recipient that could not read its samples raises after the verdicts) must not make it fail
    on the other ranks, which then lose the table that says why they must stop."""
    tables = {}

    def work(exchange):
        if exchange.rank == 1:
            time.sleep(0.01)  # the last to arrive: it releases the others
        tables[exchange.rank] = exchange.gather(np.array([exchange.rank]))
        if exchange.rank == 1:
            raise ValueError("rank 1 stops after the exchange")

    for _ in range(20):
        tables.clear()
        with pytest.raises(ValueError):
            run_ranks(3, work, timeout=20)
        assert sorted(tables) == [0, 1, 2]


def test_a_rank_with_an_empty_part_borrows_a_ghost_sample_that_fits_the_budget():
    """Under over_budget="error" the users' samplers leave the over-budget sample 1 out; rank
    1, whose part is empty, must not borrow it for its ghost steps."""
    dataset = LengthDataset([40, 900, 50, 60, 70, 80])
    per_rank = [[0, 2, 3, 4, 5], []]
    options = dict(token_budget=128, shard=False, share_tail=False)
    results = run_loaders([dataset] * 2, options, per_rank=per_rank)
    assert [error for _, error in results] == [None, None]
    ghosts = [s for s in results[1][0] if s.ghost]
    assert ghosts and all(s.sample_indices != (1,) for s in ghosts)


def test_epoch_samples_counts_every_ranks_order():
    dataset = LengthDataset([10] * 40)
    per_rank = [list(range(0, 10)), list(range(10, 30)), list(range(35, 40))]

    def own_samplers(exchange):
        sampler = per_rank[exchange.rank]
        return odb.DataLoader(dataset, 64, sampler=sampler, shard=False, exchange=exchange)

    def sharded(exchange):
        return odb.DataLoader(dataset, 64, shuffle=True, exchange=exchange)

    assert run_ranks(3, lambda ex: own_samplers(ex).epoch_samples()) == [35, 35, 35]
    assert run_ranks(3, lambda ex: sharded(ex).epoch_samples()) == [40, 40, 40]
