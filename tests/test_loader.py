"""odb.DataLoader and odb.wrap end to end, in one process."""

from functools import partial

import numpy as np
import pytest
import torch
from synthetic import LengthDataset, label_tokens, lognormal_lengths

import odb
from odb import ConfigError, OverBudgetError, SampleError, SampleTypeError

BUDGET = 4096


@pytest.fixture(scope="module")
def lengths():
    return np.minimum(lognormal_lengths(1500, 400, 1.0, seed=3), BUDGET)


def _epoch(loader):
    batches = list(loader)
    return batches, [odb.step_info(b) for b in batches]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_every_sample_once_within_budget_with_consistent_step_info(lengths, mode, num_workers):
    loader = odb.DataLoader(
        LengthDataset(lengths),
        BUDGET,
        mode=mode,
        shuffle=True,
        num_workers=num_workers,
        window=256,
    )
    batches, infos = _epoch(loader)
    seen = [i for info in infos for i in info.sample_indices]
    assert sorted(seen) == list(range(len(lengths)))
    for step, (batch, info) in enumerate(zip(batches, infos, strict=True)):
        ids = batch["input_ids"]
        assert ids.numel() <= BUDGET
        # the batch holds exactly the samples the step info names (tokens equal their index)
        if mode == "padded":
            assert ids.shape[0] == info.local_samples
            rows = [int(r[0]) for r in ids]
            assert rows == list(info.sample_indices)
            assert batch["attention_mask"].sum() == info.real_tokens
        else:
            assert ids.shape[0] == 1 and ids.numel() == info.real_tokens
            assert torch.unique_consecutive(ids[0]).tolist() == list(info.sample_indices)
        assert info.padded_tokens == ids.numel()
        assert info.real_tokens == sum(lengths[i] for i in info.sample_indices)
        assert info.local_label_tokens == sum(label_tokens(lengths[i]) for i in info.sample_indices)
        assert info.local_label_tokens == int((batch["labels"][..., 1:] != -100).sum()) or (
            mode == "padded"  # padded rows: per-row shift, counted below
        )
        if mode == "padded":
            assert info.local_label_tokens == int((batch["labels"][:, 1:] != -100).sum())
        assert (info.global_samples, info.global_label_tokens) == (
            info.local_samples,
            info.local_label_tokens,
        )
        assert info.step == step and not info.ghost and info.loss_weight == 1.0
    stats = loader.stats()
    assert stats.samples == len(lengths) and stats.steps == len(batches)
    assert stats.real_tokens == lengths.sum()
    assert stats.fill == pytest.approx(stats.real_tokens / (len(batches) * BUDGET))


def test_shuffle_is_seeded_per_epoch(lengths):
    def order(seed, epoch):
        loader = odb.DataLoader(LengthDataset(lengths), BUDGET, shuffle=True, seed=seed)
        loader.set_epoch(epoch)
        return [odb.step_info(b).sample_indices for b in loader]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


def test_without_shuffle_samples_arrive_in_index_order(lengths):
    loader = odb.DataLoader(LengthDataset(lengths), BUDGET, window=8, round_size=8)
    first = odb.step_info(next(iter(loader))).sample_indices
    assert max(first) < 8  # the first round only saw indices 0..7


def test_batches_go_straight_into_a_model():
    class Model(torch.nn.Module):
        def forward(self, input_ids, labels, attention_mask):
            return input_ids.shape

    loader = odb.DataLoader(LengthDataset([5, 9, 3]), 64)
    assert Model()(**next(iter(loader))) == (3, 9)


def test_wrap_keeps_the_users_collate_and_order():
    calls = []

    def collate(samples):
        calls.append(len(samples))
        width = max(len(s["input_ids"]) for s in samples)
        ids = torch.stack(
            [
                torch.nn.functional.pad(s["input_ids"], (0, width - len(s["input_ids"])))
                for s in samples
            ]
        )
        return {"input_ids": ids, "marker": torch.tensor(len(samples))}

    lengths = [30, 10, 20, 40, 50, 25, 5]
    plain = torch.utils.data.DataLoader(LengthDataset(lengths), batch_size=2, collate_fn=collate)
    loader = odb.wrap(plain, 100)
    batches = list(loader)
    assert sum(calls) == len(lengths)
    assert all(int(b["marker"]) == odb.step_info(b).local_samples for b in batches)
    assert sorted(i for b in batches for i in odb.step_info(b).sample_indices) == list(range(7))


def test_wrap_uses_a_custom_sampler_and_turns_random_sampler_into_seeded_shuffle():
    dataset = LengthDataset([10] * 50)
    subset = torch.utils.data.DataLoader(dataset, sampler=[3, 1, 4, 15, 9, 26])
    got = sorted(i for b in odb.wrap(subset, 64) for i in odb.step_info(b).sample_indices)
    assert got == [1, 3, 4, 9, 15, 26]

    shuffled = torch.utils.data.DataLoader(dataset, shuffle=True)
    loader = odb.wrap(shuffled, 64)
    assert loader.shuffle and loader.sampler is None


def test_wrap_refuses_a_custom_batch_sampler():
    dataset = LengthDataset([10] * 4)
    plain = torch.utils.data.DataLoader(dataset, batch_sampler=[[0, 1], [2, 3]])
    with pytest.raises(ConfigError, match="custom batch_sampler"):
        odb.wrap(plain, 64)


def test_wrap_options_override_the_dataloader():
    plain = torch.utils.data.DataLoader(LengthDataset([10] * 4), num_workers=2)
    assert odb.wrap(plain, 64, num_workers=0).num_workers == 0


def test_over_budget_error_names_the_sample():
    loader = odb.DataLoader(LengthDataset([10, 10, 300, 10]), 100)
    with pytest.raises(OverBudgetError, match=r"sample 2: length 300 .* exceeds the token budget"):
        list(loader)


def test_over_budget_solo_emits_it_alone_and_counts_it():
    loader = odb.DataLoader(LengthDataset([10, 10, 300, 10]), 100, over_budget="solo")
    infos = [odb.step_info(b) for b in loader]
    solo = [info for info in infos if 2 in info.sample_indices]
    assert solo[0].sample_indices == (2,) and solo[0].reason == "solo"
    assert loader.stats().over_budget_solo == 1
    assert sorted(i for info in infos for i in info.sample_indices) == [0, 1, 2, 3]


def test_over_budget_truncate_cuts_per_token_fields():
    loader = odb.DataLoader(LengthDataset([10, 300]), 100, over_budget="truncate")
    batches = list(loader)
    long = next(b for b in batches if 1 in odb.step_info(b).sample_indices)
    assert long["input_ids"].shape[-1] == 100 and long["labels"].shape[-1] == 100
    assert loader.stats().over_budget_truncated == 1


def test_max_tokens_caps_batches_and_truncation():
    cost = odb.ComputeCost(padded=True, attention_weight=1e-3)
    lengths = [40] * 30 + [500]
    loader = odb.DataLoader(
        LengthDataset(lengths), 5000, cost=cost, max_tokens=200, over_budget="truncate"
    )
    infos = [odb.step_info(batch) for batch in loader]
    assert all(info.padded_tokens <= 200 for info in infos)
    assert sorted(i for info in infos for i in info.sample_indices) == list(range(31))
    long = next(info for info in infos if 30 in info.sample_indices)
    assert long.real_tokens == 200 and loader.stats().over_budget_truncated == 1


def test_truncate_refuses_samples_with_images():
    dataset = LengthDataset([10, 300], images=[0, 1])
    with pytest.raises(OverBudgetError, match="cannot cut a sample with images"):
        list(odb.DataLoader(dataset, 100, over_budget="truncate"))


def test_image_caps_bound_every_batch():
    dataset = LengthDataset([20] * 40, images=[i % 3 for i in range(40)])
    loader = odb.DataLoader(dataset, 4096, max_images=4, max_samples=6, window=40)
    images = 0
    for batch in loader:
        info = odb.step_info(batch)
        expected = sum(i % 3 for i in info.sample_indices)
        assert batch.get("image_grid_thw", torch.zeros(0, 3)).shape[0] == expected <= 4
        assert info.local_samples <= 6
        images += expected
    assert images == sum(i % 3 for i in range(40))


class _Returns:
    def __init__(self, value):
        self.value = value

    def __len__(self):
        return 3

    def __getitem__(self, index):
        return self.value


def test_dataset_returning_a_batch_is_an_error():
    batch = {"input_ids": torch.ones(1, 5, dtype=torch.long)}
    with pytest.raises(SampleError, match=r"sample 0: 'input_ids' has shape \(1, 5\)"):
        list(odb.DataLoader(_Returns(batch), 100))


def test_dataset_returning_a_list_of_samples_is_an_error():
    with pytest.raises(SampleTypeError, match="returned list"):
        list(odb.DataLoader(_Returns([{"input_ids": [1]}]), 100))


def test_sample_errors_name_the_index_from_workers_too():
    class Bad(LengthDataset):
        def __getitem__(self, index):
            sample = super().__getitem__(index)
            if index == 5:
                sample["labels"] = sample["labels"][:-1]
            return sample

    loader = odb.DataLoader(Bad([8] * 10), 100, num_workers=2)
    with pytest.raises(SampleError, match="sample 5: 'labels' has length 7"):
        list(loader)


def _mark_worker(folder, worker_id):
    (folder / f"worker{worker_id}").touch()


def test_the_users_worker_init_fn_runs_in_every_worker(tmp_path):
    loader = odb.DataLoader(
        LengthDataset([8] * 40), 100, num_workers=2, worker_init_fn=partial(_mark_worker, tmp_path)
    )
    assert sum(odb.step_info(batch).local_samples for batch in loader) == 40
    assert sorted(path.name for path in tmp_path.iterdir()) == ["worker0", "worker1"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"token_budget": 0}, "token_budget must be > 0"),
        ({"token_budget": -3}, "token_budget must be > 0"),
        ({"mode": "ragged"}, "mode must be one of"),
        ({"over_budget": "drop"}, "over_budget must be one of"),
        ({"shuffle": True, "sampler": [0]}, "either shuffle=True or a sampler"),
        ({"mode": "padded", "cost": odb.PackedCost()}, "prices packed batches but mode='padded'"),
        ({"fetch_size": 0}, "fetch_size must be a positive integer, got 0"),
        ({"window": 0}, "window must be a positive integer, got 0"),
        ({"round_size": 0}, "round_size must be a positive integer, got 0"),
        ({"round_size": -4}, "round_size must be a positive integer, got -4"),
        ({"max_wait": 0}, "max_wait must be a positive integer, got 0"),
        ({"max_wait": -1}, "max_wait must be a positive integer, got -1"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    kwargs = {"token_budget": 100, **kwargs}
    with pytest.raises(ConfigError, match=match):
        odb.DataLoader(LengthDataset([5]), **kwargs)


def test_objects_that_are_neither_datasets_nor_streams_are_refused():
    with pytest.raises(ConfigError, match=r"map-style dataset .* or a stream"):
        odb.DataLoader(iter([{"input_ids": [1]}]), 100)


def test_empty_dataset_yields_nothing():
    assert list(odb.DataLoader(LengthDataset([]), 100)) == []


def test_step_info_of_a_foreign_batch_is_a_clear_error():
    with pytest.raises(odb.BatchTypeError, match="carries no odb step info"):
        odb.step_info({"input_ids": torch.ones(2)})


def test_stats_account_for_waiting_and_planning(lengths):
    loader = odb.DataLoader(LengthDataset(lengths), BUDGET, num_workers=2)
    list(loader)
    stats = loader.stats()
    assert stats.wait_seconds > 0 and stats.plan_seconds > 0 and stats.collate_seconds > 0
    # the planner's CPU time is part of the rounds' time (one thread: CPU <= wall)
    assert 0 < stats.planner_cpu_seconds < stats.plan_seconds
    assert 0 < stats.padding_efficiency <= 1 and 0 < stats.fill <= 1
    assert stats.rounds >= len(lengths) // loader.settings.round_size


def test_a_distributed_sampler_becomes_odb_sharding_with_its_settings():
    dataset = LengthDataset([10] * 20)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, seed=9)
    loader = odb.wrap(torch.utils.data.DataLoader(dataset, sampler=sampler), 64)
    assert loader.sampler is None and loader.shuffle and loader.seed == 9
    assert sorted(i for b in loader for i in odb.step_info(b).sample_indices) == list(range(20))


def test_a_distributed_sampler_for_another_world_is_refused():
    dataset = LengthDataset([10] * 20)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=1)
    loader = odb.DataLoader(dataset, 64, sampler=sampler)
    with pytest.raises(ConfigError, match="rank 1 of 2, but this process is rank 0 of 1"):
        iter(loader)


@pytest.mark.parametrize("timeout", [0, -5, True, "60"])
def test_align_timeout_must_be_a_positive_number(timeout):
    with pytest.raises(ConfigError, match="align_timeout must be a number of seconds > 0"):
        odb.DataLoader(LengthDataset([10]), 100, align_timeout=timeout)


# -- the batch layout and the mode ---------------------------------------------------------------
def _pad_by_hand(samples):
    """A user's collator that states no layout: right-padded rows."""
    return odb.PaddedCollator()(samples)


def test_a_collator_that_states_its_layout_sets_the_mode():
    from transformers import DataCollatorWithFlattening
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    dataset = LengthDataset([5, 9, 3])
    for collate_fn, mode in [
        (odb.PackedCollator(), "packed"),
        (odb.PaddedCollator(), "padded"),
        (partial(odb.PackedCollator()), "packed"),
        (DataCollatorWithFlattening(), "packed"),
        (DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True), "packed"),
        (DataCollatorForLanguageModeling(pad_token_id=0), "padded"),
        (_pad_by_hand, "padded"),  # states nothing: padded, unless the cost says otherwise
    ]:
        assert odb.DataLoader(dataset, 64, collate_fn=collate_fn).mode == mode, collate_fn
    assert odb.DataLoader(dataset, 64, cost=odb.PackedCost()).mode == "packed"


def test_a_collator_of_the_other_layout_is_refused_when_the_loader_is_built():
    refused = r"mode='packed' but the collate_fn .* lays batches out padded"
    with pytest.raises(ConfigError, match=refused):
        odb.DataLoader(LengthDataset([5, 9]), 64, mode="packed", collate_fn=odb.PaddedCollator())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_batch_of_the_other_layout_is_refused_before_it_is_yielded(num_workers):
    """The issue's case: a padded collator under mode="packed" made (10, 253) batches, 2530
    computed tokens against a 2048 budget; a collator that states no layout is checked on its
    batches."""
    dataset = LengthDataset(lognormal_lengths(64, 120, 0.8, seed=3, low=8))
    loader = odb.DataLoader(
        dataset, 2048, mode="packed", collate_fn=_pad_by_hand, num_workers=num_workers
    )
    with pytest.raises(ConfigError, match=r"laid \d+ samples out as \d+ padded rows"):
        next(iter(loader))
    packed = odb.DataLoader(dataset, 2048, mode="packed", collate_fn=odb.PackedCollator())
    assert all(batch["input_ids"].shape[1] <= 2048 for batch in packed)


def _vision_samples(count: int, image_every: int) -> list[dict]:
    """Samples of 10 to 40 tokens; every ``image_every``-th one (0: none) holds a 2x2-patch
    image whose token id is 99."""
    samples = []
    for i in range(count):
        length = 10 + (7 * i) % 31
        image = image_every and i % image_every == 0
        ids = torch.full((length,), i % 90)
        sample = {"input_ids": ids, "labels": ids.clone()}
        if image:
            ids[1] = 99
            sample["pixel_values"] = torch.full((4, 6), float(i))
            sample["image_grid_thw"] = torch.tensor([[1, 2, 2]])
        samples.append(sample)
    return samples


PLACEHOLDER = {
    "input_ids": torch.tensor([99]),
    "labels": torch.tensor([-100]),
    "pixel_values": torch.zeros(4, 6),
    "image_grid_thw": torch.tensor([[1, 2, 2]]),
}


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_a_rank_without_images_gets_the_placeholder_where_another_has_some(mode):
    """Rank 0 reads image samples, rank 1 none: at every step where rank 0's batch has an
    image, rank 1's batch holds exactly the placeholder's, after its last real token."""
    from odb.exchange import run_ranks

    collate = (odb.PaddedCollator if mode == "padded" else odb.PackedCollator)(
        vision_placeholder=PLACEHOLDER
    )
    datasets = [_vision_samples(30, 2), _vision_samples(30, 0)]

    def work(exchange):
        dataset = datasets[exchange.rank]
        loader = odb.DataLoader(dataset, 160, collate_fn=collate, window=8, exchange=exchange)
        steps = []
        for batch in loader:
            info = odb.step_info(batch)
            steps.append((info, batch))
        return steps, loader.stats()

    (first, _), (second, stats) = run_ranks(2, work, timeout=60)
    assert len(first) == len(second)
    placed = 0
    for (info0, batch0), (info1, batch1) in zip(first, second, strict=True):
        has_image = "image_grid_thw" in batch0
        assert info0.vision == info1.vision == has_image
        assert ("image_grid_thw" in batch1) == has_image == info1.vision_placeholder
        if not has_image:
            continue
        placed += 1
        assert batch1["image_grid_thw"].tolist() == [[1, 2, 2]]
        assert torch.equal(batch1["pixel_values"], PLACEHOLDER["pixel_values"])
        lengths = [len(datasets[1][i]["input_ids"]) for i in info1.sample_indices]
        row, end = (-1, lengths[-1]) if mode == "padded" else (0, sum(lengths))
        assert batch1["input_ids"][row, end] == 99 and batch1["labels"][row, end] == -100
        assert (batch1["labels"] != -100).sum() == sum(n - (mode == "packed") for n in lengths)
        assert batch1["input_ids"].shape[0] == (len(lengths) if mode == "padded" else 1)
    assert placed == stats.vision_placeholders > 0


def test_vision_steps_without_a_placeholder_warn_once_and_bad_placeholders_are_refused(caplog):
    from odb.exchange import run_ranks

    datasets = [_vision_samples(12, 1), _vision_samples(12, 0)]

    def work(exchange):
        loader = odb.DataLoader(datasets[exchange.rank], 160, window=8, exchange=exchange)
        return [odb.step_info(batch).vision_placeholder for batch in loader]

    with caplog.at_level("WARNING", logger="odb"):
        results = run_ranks(2, work, timeout=60)
    assert not any(any(placed) for placed in results)
    warned = [r for r in caplog.records if "the collator has no vision_placeholder" in r.message]
    assert len(warned) == 1 and "hangs" in warned[0].message
    for bad in ({**PLACEHOLDER, "labels": torch.tensor([5])}, {"input_ids": torch.tensor([1])}):
        with pytest.raises(ConfigError, match="vision_placeholder must hold an image"):
            odb.DataLoader(datasets[0], 160, vision_placeholder=bad)
