"""The alignment round's cost at scale: what one rank pays per step for agreeing with the others.

Simulates a pass at each world size with the loader's own round engine (``odb.simulate``),
records every table rank 0 gathers, and then measures, per world size:

- the pure decision's CPU time per round: :func:`~odb.align.decide` re-run, on one thread,
  on every report table of the run with the arguments the engine passed (the replayed
  decision must take the steps the simulated ranks took, or the benchmark raises);
- the bytes each rank sends and receives per exchange (the widths of the gathered rows),
  the report rounds, the pass's opening exchanges and the hand-over exchanges at the tail;
- collectives per step.

What is *estimated*, not measured, is the network: a ring ``all_gather`` (gloo's algorithm)
of ``world - 1`` hops, each paying a latency and the row's bytes over a bandwidth
(:class:`NetworkModel`). The implied overhead adds the measured decision time and the
estimated exchange time of the whole pass and divides by its steps and a step time::

    overhead = (sum over rounds of decide + sum over exchanges of all_gather) / steps / step
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from odb.align import decide, report_width
from odb.buffer import RoundSettings
from odb.cost import Budget, PackedCost, PaddedCost, SampleSize
from odb.exchange import Exchange
from odb.simulate import Simulation, simulate

from .lengths import clip_to_budget, lognormal_lengths

__all__ = [
    "NetworkModel",
    "ScaleConfig",
    "ExchangeCost",
    "ScaleResult",
    "run_alignment_scale",
    "alignment_scale_table",
]


@dataclass(frozen=True)
class NetworkModel:
    """Estimated time of a ring ``all_gather`` on odb's gloo group: ``world - 1`` hops, each
    costing ``hop_latency`` plus the row's bytes over ``bandwidth``.

    Defaults: 25 us per hop, what one small TCP message costs between hosts of a datacenter
    network (gloo runs over the hosts' TCP stack, not the RDMA fabric NCCL uses); 1.25 GB/s
    (10 Gb/s), a conservative share of a host NIC for one gloo connection. A ring is the
    latency-worst all_gather (``world - 1`` sequential hops), so at many ranks this errs high.
    """

    hop_latency: float = 25e-6
    bandwidth: float = 1.25e9

    def all_gather_seconds(self, world: int, row_bytes: int) -> float:
        return (world - 1) * (self.hop_latency + row_bytes / self.bandwidth)


@dataclass(frozen=True)
class ScaleConfig:
    mean: float = 1500.0
    cv: float = 1.0
    samples_per_rank: int = 256
    budget: int = 16_384
    window: int = 1024
    mode: str = "padded"
    worlds: tuple[int, ...] = (8, 64, 256, 1024)
    repeats: int = 3  # decide() runs per round; the least disturbed (minimum) counts
    step_seconds: float = 1.0
    network: NetworkModel = field(default_factory=NetworkModel)
    seed: int = 0
    timeout: float = 3600.0  # a simulated rank's wait in an exchange (1024 threads, 2 cores)


@dataclass(frozen=True)
class ExchangeCost:
    """The exchanges of one kind in a pass, as seen by one rank: how many, the bytes it sent
    in all (its rows) and received in all (the gathered tables, its own row included), and
    the estimated network time in all."""

    kind: str
    count: int
    sent_bytes: int
    received_bytes: int
    network_seconds: float


@dataclass(frozen=True)
class ScaleResult:
    """One world size. Measured: ``steps``, ``rounds``, the exchanges and their bytes,
    ``decide_seconds`` (CPU time of each report round's decision, in round order) and
    ``simulation_seconds`` (wall time of the whole simulated pass, every rank on this
    machine). Estimated: every ``network_seconds`` and so ``overhead``."""

    world: int
    samples_per_rank: int
    steps: int
    rounds: int
    report_width: int
    exchanges: tuple[ExchangeCost, ...]  # "report", "opening", "hand-over"
    decide_seconds: tuple[float, ...]
    simulation_seconds: float
    step_seconds: float

    def kind(self, name: str) -> ExchangeCost:
        return next(e for e in self.exchanges if e.kind == name)

    @property
    def report_bytes_sent(self) -> int:
        return 8 * self.report_width

    @property
    def report_bytes_received(self) -> int:
        return 8 * self.report_width * self.world

    @property
    def collectives(self) -> int:
        return sum(e.count for e in self.exchanges)

    @property
    def collectives_per_step(self) -> float:
        return self.collectives / max(self.steps, 1)

    @property
    def rounds_per_step(self) -> float:
        return self.rounds / max(self.steps, 1)

    @property
    def decide_median(self) -> float:
        return float(np.median(self.decide_seconds))

    @property
    def decide_p95(self) -> float:
        return float(np.percentile(self.decide_seconds, 95))

    @property
    def network_seconds(self) -> float:
        return sum(e.network_seconds for e in self.exchanges)

    @property
    def overhead(self) -> float:
        """Share of a step spent on alignment: the pass's measured decisions plus estimated
        exchanges, per step, over ``step_seconds``; nothing overlapped with training."""
        total = sum(self.decide_seconds) + self.network_seconds
        return total / max(self.steps, 1) / self.step_seconds


class _Recorder:
    """Rank 0's exchange, keeping every table it gathers (the same on every rank)."""

    def __init__(self, exchange: Exchange):
        self.exchange, self.rank, self.world_size = exchange, exchange.rank, exchange.world_size
        self.tables: list[np.ndarray] = []

    def gather(self, row: np.ndarray) -> np.ndarray:
        table = self.exchange.gather(row)
        self.tables.append(table)
        return table


def _shards(config: ScaleConfig, world: int) -> list[list[tuple[int, SampleSize]]]:
    """The alignment suite's lognormal set, ``samples_per_rank`` per rank, dealt in turn."""
    count = world * config.samples_per_rank
    lengths = clip_to_budget(
        lognormal_lengths(config.mean, config.cv, count, config.seed), config.budget
    )[0]
    order = np.random.default_rng([config.seed, 1]).permutation(count)
    return [
        [(int(i), SampleSize(int(lengths[i]), int(lengths[i]) - 1)) for i in order[r::world]]
        for r in range(world)
    ]


def _cost(kind: str, tables: list[np.ndarray], network: NetworkModel) -> ExchangeCost:
    return ExchangeCost(
        kind,
        len(tables),
        sum(8 * t.shape[1] for t in tables),
        sum(8 * t.size for t in tables),
        sum(network.all_gather_seconds(t.shape[0], 8 * t.shape[1]) for t in tables),
    )


def measure_world(config: ScaleConfig, world: int) -> ScaleResult:
    """Simulate one pass at ``world`` ranks and measure its alignment cost."""
    cost = PaddedCost() if config.mode == "padded" else PackedCost()
    settings = RoundSettings.create(Budget(config.budget, cost), window=config.window)
    recorders: list[_Recorder] = []

    def wrap(exchange: Exchange) -> Exchange:
        if exchange.rank != 0:
            return exchange
        recorders.append(_Recorder(exchange))
        return recorders[0]

    start = time.perf_counter()
    run = simulate(
        _shards(config, world),
        settings,
        seed=config.seed,
        wrap_exchange=wrap,
        timeout=config.timeout,
    )
    elapsed = time.perf_counter() - start
    kinds, seconds = _replay(run, recorders[0].tables, settings, config)
    return ScaleResult(
        world=world,
        samples_per_rank=config.samples_per_rank,
        steps=len(run.steps[0]),
        rounds=run.rounds,
        report_width=report_width(settings.max_steps),
        exchanges=tuple(_cost(k, kinds[k], config.network) for k in kinds),
        decide_seconds=tuple(seconds),
        simulation_seconds=elapsed,
        step_seconds=config.step_seconds,
    )


def _replay(
    run: Simulation, tables: list[np.ndarray], settings: RoundSettings, config: ScaleConfig
) -> tuple[dict[str, list[np.ndarray]], list[float]]:
    """Sort rank 0's gathered tables by kind and time ``decide`` on each report table.

    The engine's order (odb/engine.py): two opening exchanges (protocol versions, identities),
    then per round one report and, when the decision hands groups over, two more (indices,
    verdicts). Ghost lending (three more) happens only to ranks with no sample at all, which
    these shards never have. Each report is decided again with the engine's arguments; its
    steps must be the steps rank 0 took in that round."""
    world = len(run.steps)
    kinds: dict[str, list[np.ndarray]] = {"report": [], "opening": [], "hand-over": []}
    seconds: list[float] = []
    if world > 1:
        kinds["opening"] = tables[:2]
    position, steps_so_far = len(kinds["opening"]), 0
    taken = np.bincount([s.round for s in run.steps[0]], minlength=run.rounds)
    width = report_width(settings.max_steps)
    for round_ in range(run.rounds):
        table = tables[position]
        if table.shape != (world, width):
            raise RuntimeError(f"exchange {position} is not round {round_}'s report")
        times = []
        for _ in range(config.repeats):
            rng = np.random.default_rng([config.seed, 0, round_])
            begin = time.thread_time()
            decision = decide(
                table,
                max_steps=settings.max_steps,
                join=True,
                rng=rng,
                share_tail=world > 1,
                steps_so_far=steps_so_far,
            )
            times.append(time.thread_time() - begin)
        if decision.steps != taken[round_]:
            raise RuntimeError(f"round {round_} decided again takes other steps than the run")
        seconds.append(min(times))
        kinds["report"].append(table)
        moved = 2 if decision.transfers else 0
        kinds["hand-over"] += tables[position + 1 : position + 1 + moved]
        position += 1 + moved
        steps_so_far += decision.steps
    if position != run.collectives:
        raise RuntimeError(
            f"{run.collectives} exchanges ran, {position} were accounted for (ghost lending?)"
        )
    return kinds, seconds


def run_alignment_scale(config: ScaleConfig, progress=None) -> list[ScaleResult]:
    results = []
    for world in config.worlds:
        results.append(measure_world(config, world))
        if progress is not None:
            progress(f"alignment scale {world}")
    return results


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _size(count: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count:.0f} B"


def alignment_scale_table(config: ScaleConfig, results: list[ScaleResult]) -> str:
    net = config.network
    lines = [
        f"Lognormal lengths (mean {config.mean:g}, CV {config.cv:g}), "
        f"{config.samples_per_rank} samples per rank, {config.mode}, budget {config.budget}, "
        f"window {config.window}, one pass with the loader's defaults (share_tail on). "
        f"Measured: steps, rounds, bytes, collectives, decide() CPU time per report round "
        f"(minimum of {config.repeats} runs, one thread). Estimated: all_gather time, a ring "
        f"of world - 1 hops at {net.hop_latency * 1e6:g} us + bytes / "
        f"{net.bandwidth / 1e9:g} GB/s per hop; overhead = (decide time + all_gather time of "
        f"the pass) / steps / {config.step_seconds:g} s step.",
        "",
        "| ranks | steps | report rounds | rounds / step | collectives / step "
        "| report sent / received per rank | opening + hand-over exchanges (received) "
        "| decide median / p95 (ms, measured) | all_gather per round (ms, estimated) "
        "| overhead per step (estimated) | simulation wall (s) |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        extra = [r.kind("opening"), r.kind("hand-over")]
        report_net = net.all_gather_seconds(r.world, r.report_bytes_sent)
        lines.append(
            f"| {r.world} | {r.steps} | {r.rounds} | {r.rounds_per_step:.3f} "
            f"| {r.collectives_per_step:.3f} "
            f"| {_size(r.report_bytes_sent)} / {_size(r.report_bytes_received)} "
            f"| {' + '.join(f'{e.count} ({_size(e.received_bytes)})' for e in extra)} "
            f"| {_ms(r.decide_median)} / {_ms(r.decide_p95)} | {_ms(report_net)} "
            f"| {r.overhead:.3%} | {r.simulation_seconds:.1f} |"
        )
    return "\n".join(lines)
