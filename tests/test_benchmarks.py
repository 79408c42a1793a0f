"""The benchmark policies, metrics and the ``odb-bench`` command (``odb.benchmarks``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import odb
from odb.benchmarks.cli import main
from odb.benchmarks.lengths import clip_to_budget, lognormal_lengths
from odb.benchmarks.metrics import CoverageError, check_coverage, measure
from odb.benchmarks.policies import (
    PolicyRun,
    odb_batches,
    sorted_batches,
    standard_batch_size,
    standard_batches,
    text_sizes,
)
from odb.cost import Budget, PackedCost, PaddedCost


# -- lengths ---------------------------------------------------------------------------------
def test_lognormal_lengths_have_the_requested_mean_and_cv():
    lengths = lognormal_lengths(1500, 0.5, 200_000, seed=1)
    assert lengths.dtype == np.int64
    assert abs(lengths.mean() / 1500 - 1) < 0.01
    assert abs(lengths.std() / lengths.mean() - 0.5) < 0.01


def test_lognormal_lengths_are_at_least_one_token_and_seeded():
    lengths = lognormal_lengths(2, 3.0, 10_000, seed=0)
    assert lengths.min() == 1
    assert np.array_equal(lengths, lognormal_lengths(2, 3.0, 10_000, seed=0))
    assert not np.array_equal(lengths, lognormal_lengths(2, 3.0, 10_000, seed=1))


def test_clip_to_budget_cuts_only_longer_samples_and_counts_them():
    clipped, count = clip_to_budget(np.array([5, 20, 10, 11]), 10)
    assert clipped.tolist() == [5, 10, 10, 10]
    assert count == 2


# -- policies --------------------------------------------------------------------------------
def test_sorted_cuts_the_length_sorted_epoch_greedily_longest_first():
    # Sorted longest first (ties by index): 5(#1) 3(#2) 3(#5) 2(#0) 2(#4) 2(#6) 1(#3).
    # Budget 6: 1 x 5, then 2 x 3, then 3 x 2, then the 1 alone.
    run = sorted_batches(np.array([2, 5, 3, 1, 2, 3, 2]), 6)
    assert [b.tolist() for b in run.batches] == [[1], [2, 5], [0, 4, 6], [3]]
    assert not run.packed and run.plan_seconds is None


def test_standard_batch_size_with_equal_lengths_is_budget_over_length():
    lengths = np.full(10, 100)
    assert standard_batch_size(lengths, 300, np.arange(10)) == 3
    assert standard_batch_size(lengths, 299, np.arange(10)) == 2


def test_standard_batch_size_lets_one_percent_of_batches_exceed_the_budget():
    # One 1000-token sample first, 299 of 10 tokens; budget 1000. Only the batch holding the
    # long sample can exceed it: with size 3 that is 1 of 100 batches (99% fit, allowed), with
    # size 4 1 of 75 (98.7% fit, too many).
    lengths = np.array([1000] + [10] * 299)
    assert standard_batch_size(lengths, 1000, np.arange(300)) == 3


def test_standard_batches_are_a_shuffled_epoch_in_fixed_sizes():
    lengths = np.full(23, 10)
    run = standard_batches(lengths, 50, seed=3)
    assert [len(b) for b in run.batches] == [5, 5, 5, 5, 3]
    order = np.concatenate(run.batches)
    assert sorted(order.tolist()) == list(range(23))
    assert order.tolist() != list(range(23))
    assert [len(b) for b in standard_batches(lengths, 50, seed=3, batch_size=7).batches] == [
        7,
        7,
        7,
        2,
    ]


@pytest.fixture(scope="module")
def spread_lengths():
    return np.minimum(lognormal_lengths(800, 1.0, 3000, seed=5), 4096)


def _all_policies(lengths, budget, window=256):
    sizes = text_sizes(lengths)
    return [
        standard_batches(lengths, budget, seed=0),
        sorted_batches(lengths, budget),
        odb_batches(sizes, Budget(budget, PaddedCost()), seed=0, window=window),
        odb_batches(sizes, Budget(budget, PackedCost()), seed=0, window=window),
    ]


def test_every_policy_emits_every_sample_exactly_once(spread_lengths):
    runs = _all_policies(spread_lengths, 4096)
    assert [r.name for r in runs] == ["standard", "sorted", "odb padded", "odb packed"]
    for run in runs:
        flat = sorted(int(i) for b in run.batches for i in b)
        assert flat == list(range(len(spread_lengths))), run.name
        check_coverage(run.name, run.batches, len(spread_lengths))


def test_token_budget_policies_keep_every_batch_within_the_budget(spread_lengths):
    _, sort, padded, packed = _all_policies(spread_lengths, 4096)
    for run in (sort, padded):
        assert max(len(b) * spread_lengths[b].max() for b in run.batches) <= 4096, run.name
    assert packed.packed
    assert max(spread_lengths[b].sum() for b in packed.batches) <= 4096


def test_odb_policy_gives_the_batches_of_odb_dataloader():
    """The benchmark drives the planner exactly as the loader does: same batches, same order."""
    lengths = lognormal_lengths(60, 0.8, 500, seed=2)

    class Lengths(torch.utils.data.Dataset):
        def __len__(self):
            return len(lengths)

        def __getitem__(self, index):
            return {"input_ids": torch.zeros(int(lengths[index]), dtype=torch.long)}

    for mode, cost in (("padded", PaddedCost()), ("packed", PackedCost())):
        loader = odb.DataLoader(Lengths(), 600, mode=mode, shuffle=True, seed=4, window=64)
        loader.set_epoch(2)
        expected = [list(odb.step_info(batch).sample_indices) for batch in loader]
        run = odb_batches(text_sizes(lengths), Budget(600, cost), seed=4, window=64, epoch=2)
        assert [b.tolist() for b in run.batches] == expected, mode
        assert 0 < run.plan_seconds < run.round_seconds  # the planner runs inside the rounds


# -- metrics ---------------------------------------------------------------------------------
def test_check_coverage_names_missing_repeated_and_foreign_samples():
    check_coverage("ok", [np.array([2, 0]), np.array([1])], 3)
    with pytest.raises(CoverageError, match=r"lost: 1 samples missing \(first \[2\]\)"):
        check_coverage("lost", [np.array([0, 1])], 3)
    with pytest.raises(CoverageError, match=r"twice: 0 samples missing .* 1 repeated"):
        check_coverage("twice", [np.array([0, 1]), np.array([1, 2])], 3)
    with pytest.raises(CoverageError, match="outside range"):
        check_coverage("far", [np.array([0, 1, 2, 3])], 3)
    with pytest.raises(CoverageError, match="empty batch"):
        check_coverage("empty", [np.array([0, 1, 2]), np.array([], dtype=np.int64)], 3)
    with pytest.raises(CoverageError):
        measure(PolicyRun("bad", [np.array([0])]), np.array([1, 2]), 10)


def test_metrics_of_a_padded_epoch_by_hand():
    # Batches {4, 2} and {3, 1}: real 10 tokens, padded 2*4 + 2*3 = 14, two steps of budget 7.
    run = PolicyRun("p", [np.array([0, 1]), np.array([2, 3])], plan_seconds=0.5, round_seconds=2)
    m = measure(run, np.array([4, 2, 3, 1]), 7)
    assert (m.steps, m.real_tokens, m.padded_tokens) == (2, 10, 14)
    assert m.padding_efficiency == pytest.approx(10 / 14)
    assert m.fill == pytest.approx(10 / 14)
    assert (m.peak_padded_tokens, m.over_budget_steps) == (8, 1)
    assert (m.mean_batch_size, m.max_batch_size) == (2.0, 2)
    assert m.plan_samples_per_second == pytest.approx(8.0)
    assert m.round_samples_per_second == pytest.approx(2.0)


def test_metrics_of_a_packed_epoch_by_hand():
    run = PolicyRun("q", [np.array([0, 1, 3]), np.array([2])], packed=True)
    m = measure(run, np.array([4, 2, 3, 1]), 8)
    assert (m.real_tokens, m.padded_tokens, m.padding_efficiency) == (10, 10, 1.0)
    assert m.fill == pytest.approx(10 / 16)
    assert (m.peak_padded_tokens, m.over_budget_steps) == (7, 0)
    assert m.plan_samples_per_second is None and m.round_samples_per_second is None


# -- the command -----------------------------------------------------------------------------
def _png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_quick_full_prints_the_report_and_writes_json_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--quick", "--out", str(out), "--cv", "0.5", "--cv", "2", "--seed", "3", "--full"]
    assert main([*argv, "--set", "mixed", "--world", "2"]) == 0
    table = capsys.readouterr().out
    for name in ("lognormal cv=0.5", "lognormal cv=2"):
        for policy in ("standard", "sorted", "odb padded", "odb packed"):
            assert f"| {name} | {policy} |" in table
    assert (out / "report.md").read_text() == table
    record = json.loads((out / "results.json").read_text())
    assert record["planner"]["config"]["cvs"] == [0.5, 2.0]
    assert record["planner"]["config"]["seed"] == 3
    for entry in record["planner"]["sets"]:
        samples = record["planner"]["config"]["samples"]
        for policy in entry["policies"]:
            assert policy["samples"] == samples
            counts = entry["batch_size_counts"][policy["policy"]]
            assert sum(int(k) * v for k, v in counts.items()) == samples
    assert "overhead" not in record
    assert _png(out / "planner_efficiency.png") and _png(out / "planner_batch_sizes.png")


# -- loader overhead -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from odb.benchmarks.overhead import load_qwen_tokenizer

    return load_qwen_tokenizer()


def test_chat_samples_follow_the_sample_contract_and_mask_the_prompt(tokenizer):
    from odb.benchmarks.overhead import ChatDataset

    dataset = ChatDataset(40, tokenizer, mean_tokens=300, seed=1, max_length=1000)
    sample = dataset[7]
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids.ndim == 1 and labels.shape == ids.shape
    assert torch.equal(dataset[7]["input_ids"], ids)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n")
    # Everything up to the first reply is prompt; every reply ends with a labelled <|im_end|>.
    reply_start = text.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    prompt_tokens = len(tokenizer(text[:reply_start], add_special_tokens=False)["input_ids"])
    assert (labels[:prompt_tokens] == -100).all()
    assert labels[prompt_tokens] == ids[prompt_tokens]
    trained = tokenizer.decode(ids[labels != -100])
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert trained.count("<|im_end|>") == text.count("<|im_start|>assistant")
    assert int((ids == end).sum()) == text.count("<|im_start|>")
    lengths = [len(dataset[i]["input_ids"]) for i in range(40)]
    assert max(lengths) <= 1000 and len(set(lengths)) > 20
    odb.measure_sample(sample, 7)


def test_chat_stream_yields_the_dataset_split_across_workers_and_resumes(tokenizer):
    from odb.benchmarks.overhead import ChatDataset, ChatStream

    chats = ChatDataset(6, tokenizer, mean_tokens=100, seed=2, max_length=500)
    expected = [chats[i]["input_ids"] for i in (0, 2, 4, 1, 3, 5)]  # worker 0's, then worker 1's
    loader = torch.utils.data.DataLoader(
        ChatStream(chats), batch_size=3, num_workers=2, collate_fn=list
    )
    read = [s["input_ids"] for batch in loader for s in batch]
    assert all(torch.equal(a, b) for a, b in zip(read, expected, strict=True))
    stream = ChatStream(chats)
    samples = iter(stream)
    next(samples), next(samples)
    resumed = ChatStream(chats)
    resumed.load_state_dict(stream.state_dict())
    rest = [s["input_ids"] for s in resumed]
    assert all(torch.equal(rest[i], chats[2 + i]["input_ids"]) for i in range(4))


@pytest.mark.slow
def test_cli_quick_overhead_times_every_loader_over_the_dataset_and_a_stream(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--quick", "--overhead", "--overhead-stream", "--cv", "1", "--out", str(out)]
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert "Loader overhead, MEASURED" in summary and "over a stream, MEASURED" in summary
    report = (out / "report.md").read_text()
    assert "## Loader overhead\n" in report and "## Loader overhead over a stream" in report
    record = json.loads((out / "results.json").read_text())
    for overhead, stream in ((record["overhead"], False), (record["overhead_stream"], True)):
        samples, workers = overhead["samples"], overhead["num_workers"]
        assert overhead["stream"] is stream
        for key in ("plain", "matched", "odb"):
            assert len(overhead[key]["seconds"]) == 1
        # A plain loader over a stream batches each worker's part on its own.
        parts = [len(range(w, samples, workers)) for w in range(workers)] if stream else [samples]
        for key in ("plain", "matched"):
            size = overhead[key]["batch_size"]
            assert overhead[key]["steps"] == sum(-(-part // size) for part in parts)
        assert overhead["odb"]["batch_size"] is None
        stats = overhead["odb_stats"]
        assert stats["samples"] == samples and stats["steps"] == overhead["odb"]["steps"]
        medians = overhead["medians"]
        assert overhead["ratio"] == pytest.approx(medians["odb"] / medians["plain"])
        own = (stats["plan_seconds"] + stats["collate_seconds"]) / overhead["odb"]["seconds"][0]
        assert overhead["own_share"] == pytest.approx(own)
        assert 0 < overhead["own_share"] <= overhead["busy_share"] <= 1
