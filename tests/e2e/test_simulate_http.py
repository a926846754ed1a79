"""`melange simulate`'s engine against the real thing: the same small scenario over real HTTP.

Two GPU types, A and B, with two simulated engines each (tests/e2e/gpusim.py, which runs the
simulator's own scheduler and iteration model in real time behind an OpenAI-compatible streaming
API), behind a `melange route` process with a table that sends short prompts to A and long ones to
B. A seeded Poisson trace of known sizes is sent through the router at its arrival times and every
client-side TTFT and TPOT is recorded; then `melange.tools.simulate` replays the same requests, at
the times they were sent, through the same engines and the same table. The two must agree:

- **requests per type**: exactly (the table's shares are 0 or 1, so routing is not drawn);
- **TPOT** p50 and p90 per type: from 5% (and 1 ms) below the simulation's to 12% (and 3 ms)
  above it;
- **TTFT** p50 and p90 per type: from 10% (and 3 ms) below to 25% (and 30 ms) above;
- **share of requests within the TPOT SLO** per type: from 10 points below to 5 above (the SLO is
  set where about 1 request in 20 of type A misses it, so the share is not trivially 100%).

Why those bounds: the real run adds time the simulation leaves out, and never takes any away, so
each bound is tight below and looser above. A request crosses two HTTP hops each way (client,
router, engine), a few hundred microseconds to milliseconds each and tens of milliseconds when
the two shared cores are busy: that delays first tokens (TTFT) far more than it changes the
spacing of the tokens (TPOT is the first-to-last span over many tokens). The engine's iterations
end on an asyncio timer, which wakes late by a millisecond or so; the engine keeps its model
timeline through such lateness and through stalls of up to `gpusim.CATCH_UP_SECONDS`, but a
longer stall lengthens the requests running through it, so real TPOTs may be a little longer.
Measured on 2 shared cores, idle and with two busy loops competing for them, the TPOT
percentiles agreed within 0.6 ms and the TTFT ones within 20 ms; a simulator whose iterations
are 1.2 times as long (or 0.8 times) fails the TPOT bounds.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import numpy as np
import pytest

from melange.plan import routing as route
from melange.tools import perfmodel
from melange.tools import simulate as sim

from . import gpusim
from .operator_process import terminate
from .test_profile import MODEL, Simulator, start_simulator
from .test_route import Router, prompt, start_router, write_table

pytestmark = pytest.mark.e2e

SLO = 0.035  # seconds: both types' TPOT SLO, and the chunk limit of their prompts
INPUT_EDGES, OUTPUT_EDGES = [2, 64, 1024], [4, 16, 96]
# requests per second by (input bucket, output bucket): short prompts to A, long ones to B
RATES = [[4.0, 4.0], [4.0, 4.0]]
SECONDS = 25.0  # of traffic
SEED = 5
INSTANCES = 2  # per type
TYPES = {
    # cheap: a slow step, costly prompts (long ones are chunked to keep steps within the SLO)
    "A": sim.IterationModel(
        fixed=0.016,
        per_sequence=0.003,
        per_request=0.002,
        per_context_token=4e-6,
        per_prefill_token=3e-5,
    ),
    "B": sim.IterationModel(
        fixed=0.012,
        per_sequence=0.002,
        per_request=0.002,
        per_context_token=2e-6,
        per_prefill_token=3e-5,
    ),
}
TABLE = {
    "schemaVersion": 1,
    "buckets": {"inputTokens": INPUT_EDGES, "outputTokens": OUTPUT_EDGES},
    "gpus": list(TYPES),
    "byInput": [[1.0, 0.0], [0.0, 1.0]],
    "byBucket": [[[1.0, 0.0]] * 2, [[0.0, 1.0]] * 2],
}
# The real value must lie within [model * (1 - relative) - seconds, model * (1 + relative) +
# seconds], (relative, seconds) below and above: the real run only adds time, so the bounds below
# are tight and the bounds above allow for the HTTP path and a busy machine.
TPOT_BELOW, TPOT_ABOVE = (0.05, 0.001), (0.12, 0.003)
TTFT_BELOW, TTFT_ABOVE = (0.10, 0.003), (0.25, 0.030)
# the share of requests within the TPOT SLO: real within [model - below, model + above]
SLO_SHARE_BELOW, SLO_SHARE_ABOVE = 0.10, 0.05


def engine(name: str, iteration: sim.IterationModel) -> sim.Engine:
    """The simulator's engine of a type, with its fluid throughput as its profile's matrix."""
    sizes = [
        [perfmodel.representative_size(a, b) for a, b in itertools.pairwise(edges)]
        for edges in (INPUT_EDGES, OUTPUT_EDGES)
    ]
    matrix = tuple(
        tuple(sim.fluid_throughput(iteration, i, o, SLO) for o in sizes[1]) for i in sizes[0]
    )
    return sim.Engine(
        name=name,
        cost_per_hour=1.0,
        tpot_slo=SLO,
        iteration=iteration,
        input_edges=tuple(INPUT_EDGES),
        output_edges=tuple(OUTPUT_EDGES),
        throughput=matrix,
        calibration="fitted",
        fit_error=0.0,
    )


def server_args(iteration: sim.IterationModel) -> list[str]:
    """gpusim's options for an engine of these terms (it has the host terms only)."""
    assert iteration.memory_fixed == iteration.compute_per_sequence == 0
    return [
        f"--base={iteration.fixed}",
        f"--per-seq={iteration.per_sequence}",
        f"--per-request={iteration.per_request}",
        f"--per-context-token={iteration.per_context_token}",
        f"--per-prefill-token={iteration.per_prefill_token}",
        f"--tpot-slo={SLO}",
        f"--max-num-seqs={sim.DEFAULT_MAX_NUM_SEQS}",
    ]


@dataclass
class Observed:
    """One request as the client saw it (monotonic seconds)."""

    sent: float
    first: float
    last: float
    tokens: int


async def _one(
    session: aiohttp.ClientSession, url: str, words: int, max_tokens: int, start: float
) -> Observed:
    await asyncio.sleep(max(start - time.monotonic(), 0))
    body = {"model": MODEL, "prompt": prompt(words), "max_tokens": max_tokens, "stream": True}
    sent = time.monotonic()
    first = last = math.nan
    tokens = 0
    async with session.post(f"{url}/v1/completions", json=body) as answer:
        assert answer.status == 200, await answer.text()
        async for line in answer.content:
            if line.startswith(b"data: {") and b'"text"' in line:
                last = time.monotonic()
                first = last if tokens == 0 else first
                tokens += 1
    return Observed(sent, first, last, tokens)


def replay(url: str, trace: sim.Trace) -> list[Observed]:
    """Each request of the trace through `url` at its arrival time, streamed, all concurrently."""

    async def run() -> list[Observed]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            start = time.monotonic() + 0.5
            return await asyncio.gather(
                *(
                    _one(session, url, int(i) - gpusim.BOS_TOKENS, int(o), start + float(t))
                    for t, i, o in zip(
                        trace.arrivals, trace.input_tokens, trace.output_tokens, strict=True
                    )
                )
            )

    return asyncio.run(run())


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Router, dict[str, list[Simulator]]]]:
    workdir = tmp_path_factory.mktemp("simulate-http")
    sims: dict[str, list[Simulator]] = {name: [] for name in TYPES}
    router = None
    try:
        for name, iteration in TYPES.items():
            for _ in range(INSTANCES):
                sims[name].append(start_simulator(workdir, *server_args(iteration)))
        table_path = workdir / "table.json"
        write_table(table_path, TABLE)
        upstreams = {name: [s.url for s in group] for name, group in sims.items()}
        router = start_router(workdir, table_path, upstreams)
        yield router, sims
    finally:
        if router is not None:
            terminate(router.process)
        for group in sims.values():
            for server in group:
                terminate(server.process)


def _percentiles(values: list[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in np.percentile(values, sim.PERCENTILES))


def test_the_simulation_agrees_with_the_real_http_run(
    fleet: tuple[Router, dict[str, list[Simulator]]],
) -> None:
    router, sims = fleet
    trace = sim.poisson_trace(INPUT_EDGES, OUTPUT_EDGES, RATES, SECONDS, SEED)
    observed = replay(router.url, trace)
    assert [r.tokens for r in observed] == trace.output_tokens.tolist()

    # the same requests, at the times they were sent, through the same engines and table
    began = min(r.sent for r in observed)
    sent = sim.Trace(
        np.array([r.sent - began for r in observed]), trace.input_tokens, trace.output_tokens
    )
    table = route.from_dict(TABLE)
    choose = route.chooser(table)

    def as_the_router_counts(input_tokens: int, output_tokens: int | None, u: float) -> str:
        return choose(input_tokens - gpusim.BOS_TOKENS, output_tokens, u)  # words, not BOS

    engines = [engine(name, iteration) for name, iteration in TYPES.items()]
    report = sim.simulate(
        engines,
        dict.fromkeys(TYPES, INSTANCES),
        sent,
        "size-aware",
        as_the_router_counts,
        seed=SEED,
    )

    served = [as_the_router_counts(int(i), None, 0.0) for i in trace.input_tokens]
    lines = []
    failures = []
    for stats in report.gpus:
        mine = [r for r, name in zip(observed, served, strict=True) if name == stats.name]
        logged = sum(len(s.requests()) for s in sims[stats.name])
        ttft = _percentiles([r.first - r.sent for r in mine])
        tpot_values = [(r.last - r.first) / (r.tokens - 1) for r in mine if r.tokens >= 2]
        tpot = _percentiles(tpot_values)
        within = float(np.mean([v <= SLO * (1 + 1e-9) for v in tpot_values]))
        lines.append(
            f"{stats.name}: requests {logged} / simulated {stats.requests}; "
            f"TTFT p50/p90 ms {ttft[0] * 1e3:.1f}/{ttft[1] * 1e3:.1f} / "
            f"{stats.ttft[0] * 1e3:.1f}/{stats.ttft[1] * 1e3:.1f}; "
            f"TPOT p50/p90 ms {tpot[0] * 1e3:.1f}/{tpot[1] * 1e3:.1f} / "
            f"{stats.tpot[0] * 1e3:.1f}/{stats.tpot[1] * 1e3:.1f}; "
            f"within SLO {within:.1%} / {stats.within_slo:.1%}"
        )
        if not logged == stats.requests == len(mine):
            failures.append(f"{stats.name}: requests")
        for what, real, model, below, above in (
            ("TTFT", ttft, stats.ttft, TTFT_BELOW, TTFT_ABOVE),
            ("TPOT", tpot, stats.tpot, TPOT_BELOW, TPOT_ABOVE),
        ):
            for k in (0, 1):  # p50, p90
                low = model[k] * (1 - below[0]) - below[1]
                high = model[k] * (1 + above[0]) + above[1]
                if not low <= real[k] <= high:
                    failures.append(f"{stats.name}: {what} p{sim.PERCENTILES[k]}")
        if not -SLO_SHARE_BELOW <= within - stats.within_slo <= SLO_SHARE_ABOVE:
            failures.append(f"{stats.name}: within SLO")
    print("\n".join(["real / simulated", *lines]))
    assert not failures, "\n".join(["real / simulated", *lines, *failures])
