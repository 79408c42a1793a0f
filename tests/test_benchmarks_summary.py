"""What ``odb-bench`` prints (the one-screen summary), what ``--llava`` feeds the planner and
alignment suites, and the figures' legends and speedup dots."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from odb.adapters.qwen_vl import LlavaDataset
from odb.benchmarks import cli
from odb.benchmarks.llava_input import SYNTHETIC_LONG_MULTIMODAL, write_synthetic_llava
from odb.benchmarks.multimodal_suite import MultimodalConfig, run_multimodal
from odb.benchmarks.planner_suite import PlannerConfig, run_planner
from odb.benchmarks.plots import (
    batch_sizes_figure,
    efficiency_figure,
    multimodal_speedup_figure,
    multimodal_throughput_figure,
)
from odb.benchmarks.qwen_vl_offline import ImageSettings, load_processor

ORACLES = ("gmt padded", "bmt padded", "gmt packed", "bmt packed")
MAX_PIXELS = 28 * 28 * 64  # small images: the records stay short and quick to process


# -- the summary -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default suites at test sizes (every lognormal and built-in set, three rank counts):
    the output folder and what was printed."""
    out = tmp_path_factory.mktemp("summary") / "bench"
    argv = ["--quick", "--out", str(out), "--mm-samples", "240", "--model", "qwen3-vl-8b"]
    argv += ["--world", "1", "--world", "8", "--world", "16"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(argv) == 0
    return out, printed.getvalue()


def _rows(summary: str, name: str, count: int) -> list[list[str]]:
    """The ``count`` rows of set ``name`` in the summary's multimodal table, as fields (the
    name is written on the first row only)."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [name])
    return [lines[start].split()[1:]] + [line.split() for line in lines[start + 1 : start + count]]


def test_summary_fits_one_screen_names_every_set_and_labels_its_sources(default_run):
    out, summary = default_run
    lines = summary.splitlines()
    assert len(lines) <= 40 and max(map(len, lines)) <= 100
    record = json.loads((out / "results.json").read_text())
    planner = [s["name"] for s in record["planner"]["sets"]]
    multimodal = [s["name"] for s in record["multimodal"]["sets"]]
    assert len(planner) == 8 and len(multimodal) == 4  # lognormal and real-length sets
    for name in planner + multimodal:
        assert name in summary, name
    headings = {
        line.split(",")[0]: line for line in lines if "MEASURED" in line or "ESTIMATED" in line
    }
    assert "ESTIMATED" in headings["Multimodal"] and "Qwen3-VL-8B" in headings["Multimodal"]
    assert "MEASURED" in headings["Planner"] and "MEASURED" in headings["Alignment"]
    assert "MEASURED" in headings["Planning speed"]
    assert f"Full tables: {out / 'report.md'}" in summary
    report = (out / "report.md").read_text()
    assert report.startswith("# odb-bench\n\nWhat ran:\n") and "| mixed | odb packed |" in report
    assert "| mixed |" not in summary  # the tables stay in the report


def test_summary_headline_is_odb_over_standard_and_the_best_oracle(default_run):
    out, summary = default_run
    record = json.loads((out / "results.json").read_text())
    rate = {
        (r["set"], r["world"], r["policy"]): r["estimates"][0]["samples_per_second"]
        for r in record["multimodal"]["runs"]
    }
    balance = {
        (r["set"], r["world"], r["policy"]): r["estimates"][0]["balance"]
        for r in record["multimodal"]["runs"]
    }
    worlds = record["multimodal"]["config"]["worlds"]
    for s in record["multimodal"]["sets"]:
        name = s["name"]
        for world, row in zip(worlds, _rows(summary, name, len(worlds)), strict=True):
            assert row[0] == str(world)
            best = max(rate[name, world, oracle] for oracle in ORACLES)
            for k, policy in enumerate(("odb compute padded", "odb compute packed")):
                odb = rate[name, world, policy]
                vs_std, vs_best, bal = row[1 + 3 * k : 4 + 3 * k]
                assert vs_std == f"{odb / rate[name, world, 'standard']:.2f}x"
                assert vs_best == f"{odb / best:.2f}x"
                assert bal == f"{balance[name, world, policy]:.3f}"
    for s in record["planner"]["sets"]:
        steps = {p["policy"]: p["steps"] for p in s["policies"]}
        lines = summary.splitlines()
        planner = lines[next(i for i, line in enumerate(lines) if line.startswith("Planner")) :]
        row = next(line for line in planner if line.startswith(f"  {s['name']} "))
        fewer = [f"{steps['standard'] / steps[p]:.2f}x" for p in ("odb padded", "odb packed")]
        assert row[len(s["name"]) + 2 :].split()[:2] == fewer


# -- --llava everywhere ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    source = write_synthetic_llava(folder, 16, 1, SYNTHETIC_LONG_MULTIMODAL)
    images = folder / "images"
    # Independently of the benchmark's header-based estimates: the processed samples' lengths.
    processor = load_processor(None, ImageSettings(max_pixels=MAX_PIXELS))
    dataset = LlavaDataset(source, images, processor)
    lengths = np.array([len(dataset[i]["input_ids"]) for i in range(len(dataset))])
    return source, images, lengths


def _record_sets(monkeypatch, name):
    """Wrap ``cli.<name>`` so each call's length sets are kept (and the suite still runs)."""
    calls = []
    real = getattr(cli, name)

    def recording(config, sets=None, **kwargs):
        calls.append(sets)
        return real(config, sets, **kwargs)

    monkeypatch.setattr(cli, name, recording)
    return calls


def test_llava_lengths_feed_the_planner_and_alignment_suites(llava, tmp_path, monkeypatch, capsys):
    source, images, lengths = llava
    assert lengths.max() <= 16_384  # every record fits the default budget: none left out
    planned = _record_sets(monkeypatch, "run_planner")
    aligned = _record_sets(monkeypatch, "run_alignment")
    out = tmp_path / "out"
    argv = ["--quick", "--llava", str(source), "--images", str(images), "--out", str(out)]
    argv += ["--max-pixels", str(MAX_PIXELS), "--world", "2"]
    assert cli.main([*argv, "--set", "mixed", "--mm-samples", "200"]) == 0
    summary = capsys.readouterr().out
    ((planner_set,),) = [list(extra.items()) for extra in planned]
    ((alignment_set,),) = aligned
    for name, given in (planner_set, (alignment_set.name, alignment_set.lengths)):
        assert name == "train"
        assert np.array_equal(given, lengths)
    record = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in record["planner"]["sets"]] == ["train"]
    assert {(r["set"], r["samples"]) for r in record["alignment"]["results"]} == {("train", 16)}
    assert [s["name"] for s in record["multimodal"]["sets"]] == ["train", "mixed"]
    assert f"LLaVA input: {source}: 16 records, 0 invalid" in summary.replace("\n    ", " ")
    report = (out / "report.md").read_text()
    planner = report.split("## Planner")[1].split("\n## ")[0]
    alignment = report.split("## Alignment across ranks")[1].split("\n## ")[0]
    assert "Sets: train (16 samples)." in planner and "lognormal" not in planner
    assert f"train (the exact lengths of {source}'s valid records" in alignment
    assert "lognormal" not in alignment

    assert cli.main([*argv, "--cv", "1"]) == 0  # --cv adds a lognormal set back
    record = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in record["planner"]["sets"]] == ["lognormal cv=1", "train"]


# -- plots -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_set():
    """Every policy on one set (the narrowest figures: one column of panels)."""
    config = MultimodalConfig(
        sets=("mixed",), samples=300, window=128, worlds=(1, 3), models=("Qwen3-VL-2B",)
    )
    return run_multimodal(config)


def _legend_inside(fig) -> bool:
    FigureCanvasAgg(fig).draw()
    (legend,) = fig.legends
    box, page = legend.get_window_extent(), fig.bbox
    return box.x0 >= page.x0 and box.x1 <= page.x1 and box.y0 >= page.y0 and box.y1 <= page.y1


def test_every_legend_stays_inside_its_figure(one_set):
    planner = run_planner(PlannerConfig(cvs=(1.0,), samples=300, window=128))
    figures = [
        multimodal_throughput_figure(one_set),
        multimodal_speedup_figure(one_set),
        efficiency_figure(planner),
        batch_sizes_figure(planner),
    ]
    assert [_legend_inside(fig) for fig in figures] == [True] * 4


def test_speedup_figure_shows_each_odb_ratio_on_a_zoomed_axis(one_set):
    fig = multimodal_speedup_figure(one_set)
    rate = {(r.world, r.policy): r.estimates[0].samples_per_second for r in one_set.runs}
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["mixed: over standard", "mixed: over best oracle"]
    for ax, base in zip(axes, ("standard", "best oracle"), strict=True):
        policies = [label.get_text() for label in ax.get_yticklabels()]
        assert policies == ["odb padded", "odb packed", "odb compute padded", "odb compute packed"]
        shown = {}
        for line in ax.get_lines():
            if line.get_label().endswith(("rank", "ranks")):
                world = int(line.get_label().split()[0])
                for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True):
                    shown[world, policies[round(y)]] = x
        expected = {}
        for world in (1, 3):
            baseline = (
                rate[world, "standard"]
                if base == "standard"
                else max(rate[world, oracle] for oracle in ORACLES)
            )
            for policy in policies:
                expected[world, policy] = rate[world, policy] / baseline
        assert shown == pytest.approx(expected)
        assert any(list(line.get_xdata()) == [1, 1] for line in ax.get_lines())  # the 1.0 line
        values = [*expected.values(), 1.0]
        low, high = ax.get_xlim()
        assert low <= min(values) and max(values) <= high
        assert high - low <= 1.5 * max(max(values) - min(values), 0.04)  # zoomed, not from 0
        written = sorted(float(text.get_text()) for text in ax.texts)
        assert written == pytest.approx(sorted(shown.values()), abs=0.005)
