"""Many ranks in one process, running the loader's own round engine on sizes only.

Each simulated rank is a :class:`~odb.engine.RoundEngine` reading its list of sample sizes
(:class:`~odb.source.SizeSource`), one thread per rank, talking over an in-process exchange
(:class:`~odb.exchange.InProcessGroup`): the same first exchange, reports, decisions,
hand-overs and verdicts as ranks under torchrun. Used by tests (properties of the protocol
for any number of ranks), by step estimates, and by benchmarks (balance and fill at 8 or 16
ranks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from odb.admit import Admission
from odb.batch import StepInfo
from odb.buffer import RoundSettings
from odb.cost import SampleSize
from odb.engine import PassConfig, RoundEngine
from odb.errors import ConfigError
from odb.exchange import Exchange, run_ranks
from odb.source import SizeSource
from odb.stats import LoaderStats

__all__ = ["Simulation", "simulate"]


@dataclass(frozen=True)
class Simulation:
    """``steps[r]`` is rank r's sequence of steps (ghost steps have no samples), ``stats[r]``
    its loader statistics (``rounds``: report exchanges; ``exchanges``: every collective,
    the first exchange and hand-overs included); ``dropped[r]`` what non-join mode left out
    of rank r's order."""

    steps: list[list[StepInfo]]
    stats: list[LoaderStats]

    @property
    def rounds(self) -> int:
        return self.stats[0].rounds

    @property
    def collectives(self) -> int:
        return self.stats[0].exchanges

    @property
    def dropped(self) -> list[int]:
        return [s.dropped_samples for s in self.stats]

    @property
    def transfer_rounds(self) -> int:
        """Rounds in which some rank ran a group another rank had planned."""
        return len({s.round for steps in self.steps for s in steps if s.reason == "shared"})


def simulate(
    shards: Sequence[Sequence[tuple[int, SampleSize]]],
    settings: RoundSettings,
    *,
    join: bool = True,
    share_tail: bool = True,
    seed: int = 0,
    epoch: int = 0,
    over_budget: str = "error",
    steps_multiple_of: int = 1,
    max_rounds: int | None = None,
    wrap_exchange: Callable[[Exchange], Exchange] | None = None,
    timeout: float = 120.0,
) -> Simulation:
    """Run one pass for ``len(shards)`` ranks; ``shards[r]`` is rank r's order of (index,
    size) pairs, all indices of one dataset (a rank may read any of them again when a group
    is handed over). ``max_rounds`` guards tests against a protocol that would not end;
    ``wrap_exchange`` wraps each rank's exchange (a benchmark records what travels);
    ``timeout``: how long a rank waits for the others in an exchange (one thread per rank:
    hundreds of ranks on a busy machine need more than the default)."""
    sizes = {int(index): size for shard in shards for index, size in shard}
    if len(sizes) != sum(len(shard) for shard in shards):
        raise ConfigError("simulated shards must not share an index")
    config = PassConfig(
        settings,
        Admission(settings.budget, over_budget),
        join=join,
        share_tail=share_tail,
        shard=False,
        steps_multiple_of=steps_multiple_of,
        seed=seed,
    )

    def rank(exchange: Exchange) -> tuple[list[StepInfo], LoaderStats]:
        if wrap_exchange is not None:
            exchange = wrap_exchange(exchange)
        source = SizeSource(shards[exchange.rank], sizes)
        engine = RoundEngine(config, exchange, source, epoch=epoch)
        steps = []
        while (step := engine.next_step()) is not None:
            steps.append(step[1])
            if max_rounds is not None and engine.stats.rounds > max_rounds:
                raise RuntimeError(f"the simulation did not end within {max_rounds} rounds")
        return steps, engine.stats

    results = run_ranks(len(shards), rank, timeout=timeout)
    return Simulation([steps for steps, _ in results], [stats for _, stats in results])
