"""The fleet simulation: calibrated to the profiles, deterministic for a seed, loaded as the plan
says, and able to tell a saturated fleet from an ample one; `melange simulate`'s exit codes."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from melange import api
from melange.cli import main
from melange.plan import routing as route
from melange.plan import solver
from melange.plan.problem import Problem
from melange.tools import perfmodel, profiles
from melange.tools import simulate as sim

EXAMPLES = Path(__file__).parents[2] / "examples"
EDGES = (list(perfmodel.DEFAULT_INPUT_EDGES), list(perfmodel.DEFAULT_OUTPUT_EDGES))


def spec_with(example: str, *names: str) -> api.AllocationSpec:
    """An example's buckets and workload, with the named shipped profiles as its GPU types."""
    raw = yaml.safe_load((EXAMPLES / example).read_text(encoding="utf-8"))["spec"]
    gpus = [profiles.gpu_entry(profiles.load_profile(name)) for name in names]
    return api.validate_spec({**raw, "gpus": gpus} if names else raw, "spec")


def engine_of(name: str) -> sim.Engine:
    doc = profiles.load_profile(name)
    return sim.engine_from_estimate(
        doc["name"], doc["costPerHour"], doc["throughput"], *EDGES, doc["estimate"]
    )


def one_type(profile: str, rate: float, instances: int, seconds: float = 90.0) -> sim.Report:
    spec = spec_with("conversational.yaml", profile)
    engine = engine_of(profile)
    problem = Problem.from_spec(spec, rate=rate)
    trace = sim.poisson_trace(*EDGES, problem.rates, seconds, seed=3)
    return sim.simulate([engine], {engine.name: instances}, trace, "round-robin", seed=3)


@pytest.mark.parametrize("name", [p.name for p in profiles.list_profiles()])
def test_a_perfmodel_engine_has_its_profiles_throughput(name: str) -> None:
    engine = engine_of(name)
    assert engine.calibration == "perfmodel"
    assert engine.fit_error < 1e-3  # the profile's 4 significant digits


def test_a_fitted_engine_recovers_an_engine_of_its_own_form() -> None:
    truth = sim.IterationModel(
        fixed=0.012, per_sequence=4e-4, per_request=1e-3, per_context_token=2e-6
    )
    inputs = [perfmodel.representative_size(a, b) for a, b in itertools.pairwise(EDGES[0])]
    outputs = [perfmodel.representative_size(a, b) for a, b in itertools.pairwise(EDGES[1])]
    matrix = [[sim.fluid_throughput(truth, i, o, 0.1) for o in outputs] for i in inputs]
    engine = sim.fit_engine("X", 1.0, matrix, *EDGES, 0.1)
    assert engine.calibration == "fitted"
    # exactly, though not necessarily with the same terms: below the batch cap a throughput
    # fixes only (SLO - fixed) / (per-sequence seconds), not each
    assert engine.fit_error < 1e-6


def test_a_fitted_engine_approximates_a_roofline_profile() -> None:
    doc = profiles.load_profile("llama-3.1-8b/l40s/tpot-120ms")
    engine = sim.fit_engine("L40S", 1.86, doc["throughput"], *EDGES, 0.12)
    assert engine.fit_error < 0.5  # a linear engine, not the roofline: the error is reported


def test_the_same_seed_gives_the_same_report_and_another_seed_another() -> None:
    a, b = (
        one_type("llama-3.1-8b/l4/tpot-120ms", 6, 1),
        one_type("llama-3.1-8b/l4/tpot-120ms", 6, 1),
    )
    assert a == b
    spec = spec_with("conversational.yaml", "llama-3.1-8b/l4/tpot-120ms")
    problem = Problem.from_spec(spec, rate=6)
    one = sim.poisson_trace(*EDGES, problem.rates, 30, seed=1)
    two = sim.poisson_trace(*EDGES, problem.rates, 30, seed=2)
    assert not np.array_equal(one.arrivals[:10], two.arrivals[:10])


def test_an_ample_fleet_meets_the_slo_and_a_saturated_one_misses_it() -> None:
    profile = "llama-3.1-8b/l40s/tpot-40ms"
    ample = one_type(profile, 4, 1)
    saturated = one_type(profile, 40, 1)
    assert ample.total.load < 0.6
    assert ample.total.within_slo > 0.99
    assert ample.total.ttft[-1] < 1.0
    assert saturated.total.load > 1.5
    assert saturated.total.within_slo < 0.2
    assert saturated.total.tpot[0] > 0.04


def test_a_queue_that_tpot_does_not_show_is_seen_with_a_ttft_slo() -> None:
    """On an L4 at 120 ms the batch cap, not the SLO, limits short requests: overloaded, its TPOT
    stays within the SLO while requests wait, which the TTFT bound reveals."""
    profile = "llama-3.1-8b/l4/tpot-120ms"
    spec = spec_with("conversational.yaml", profile)
    engine = engine_of(profile)
    trace = sim.poisson_trace(*EDGES, Problem.from_spec(spec, rate=30).rates, 60, seed=3)
    report = sim.simulate([engine], {"L4": 1}, trace, "round-robin", ttft_slo=5.0)
    assert report.total.load > 3
    assert report.total.within_slo > 0.9
    assert report.total.within_slo_and_ttft < 0.5
    assert math.isnan(one_type(profile, 2, 1).total.within_slo_and_ttft)  # none asked for


def bare(model: sim.IterationModel, slo: float, max_num_seqs: int = 256) -> sim.Engine:
    """An engine of these iteration terms, with no profile to account load against."""
    return sim.Engine("X", 1.0, slo, model, (), (), (), "fitted", 0.0, max_num_seqs)


def iterations(instance: sim.Instance, count: int) -> list[float]:
    """The seconds of the next `count` iterations, run back to back."""
    seconds = []
    for _ in range(count):
        before = instance.end
        instance.step(before)
        seconds.append(instance.end - before)
    return seconds


@pytest.mark.parametrize("batch", [100, 130, 160])
def test_a_waiting_prompt_adds_at_most_a_share_of_the_slo_to_a_busy_iteration(batch: int) -> None:
    """A batch whose compute takes as long as its reads or longer, so prompt work adds to its
    time: while a long prompt is chunked in, every iteration stays within the SLO, or (a batch
    that alone takes more than three quarters of it) within the batch's own time plus a quarter of
    the SLO, the least prompt work an iteration does, and the prompt progresses."""
    slo = 0.1
    model = sim.IterationModel(
        fixed=0.01, memory_fixed=0.05, compute_per_sequence=5e-4, compute_per_prefill_token=2e-4
    )
    outcome = sim.Outcome([], [], [], [], [])
    instance = sim.Instance(bare(model, slo), outcome)
    for _ in range(batch):
        instance.submit(outcome.add(10, 10_000), 0.0)
    while any(math.isnan(t) for t in outcome.first):
        iterations(instance, 1)
    alone = iterations(instance, 3)
    assert alone[0] == pytest.approx(alone[2])  # a steady batch (no context term)
    prompt = outcome.add(4000, 2)
    instance.submit(prompt, instance.end)
    limit = max(slo, alone[0] + sim.DEFAULT_MIN_PREFILL_SHARE * slo)
    seconds = []
    while math.isnan(outcome.first[prompt]):
        seconds.extend(iterations(instance, 1))
        assert len(seconds) < 100, "the prompt does not progress"
    assert max(seconds) <= limit + 1e-12
    assert min(seconds[:-1]) > alone[0]  # every iteration but the last (a part chunk) is full


@pytest.mark.parametrize("reads", [0.075, 0.12])
def test_prompt_work_hidden_under_a_memory_bound_batchs_reads_keeps_its_time(reads: float) -> None:
    """A memory-bound batch that alone takes more than three quarters of the SLO (its reads: a
    KV cache near full) leaves compute idle: the prompt's least work (a quarter of the SLO of its
    compute) fits under the reads, so iterations stay within the SLO, or, for a batch that alone
    misses it, within the batch's own time; and the prompt still does at least that much work in
    each iteration (the least is of prompt work, as vLLM's per-step budget is of tokens)."""
    slo, per_token = 0.1, 2e-4
    model = sim.IterationModel(
        fixed=0.01,
        memory_fixed=reads,
        compute_per_sequence=2e-4,
        compute_per_prefill_token=per_token,
    )
    outcome = sim.Outcome([], [], [], [], [])
    instance = sim.Instance(bare(model, slo), outcome)
    for _ in range(100):  # 20 ms of compute, under the reads
        instance.submit(outcome.add(10, 10_000), 0.0)
    while any(math.isnan(t) for t in outcome.first):
        iterations(instance, 1)
    alone = iterations(instance, 1)[0]
    assert alone == pytest.approx(0.01 + reads)
    assert alone > (1 - sim.DEFAULT_MIN_PREFILL_SHARE) * slo
    prompt = outcome.add(4000, 2)
    instance.submit(prompt, instance.end)
    seconds = []
    while math.isnan(outcome.first[prompt]):
        seconds.extend(iterations(instance, 1))
        assert len(seconds) < 100, "the prompt does not progress"
    assert max(seconds) <= max(slo, alone) + 1e-12
    least_tokens = sim.DEFAULT_MIN_PREFILL_SHARE * slo / per_token
    assert len(seconds) <= math.ceil(4000 / least_tokens)


def test_a_cancelled_request_frees_its_slot_at_the_next_iteration() -> None:
    outcome = sim.Outcome([], [], [], [], [])
    instance = sim.Instance(bare(sim.IterationModel(fixed=0.01), 1.0, max_num_seqs=1), outcome)
    first, second = outcome.add(5, 1000), outcome.add(5, 3)
    instance.submit(first, 0.0)
    instance.submit(second, 0.0)
    iterations(instance, 3)
    assert math.isnan(outcome.first[second])  # the one slot is taken
    instance.cancel(first)
    instance.advance(1.0)
    assert math.isnan(outcome.finish[first])
    assert outcome.finish[second] == pytest.approx(0.01 * 7)  # the 4th ends, then its own 3
    assert not instance.busy


def _plan(example: str, rate: float | None = None) -> tuple[Any, ...]:
    spec = spec_with(example)
    problem = Problem.from_spec(spec, rate=rate)
    plan = solver.solve(problem)
    engines = [engine_of(f"llama-3.1-8b/{perfmodel.slug(g.name)}/tpot-120ms") for g in spec.gpus]
    return spec, problem, plan, route.derive(problem, plan), engines


@pytest.mark.parametrize("routing", ["size-aware-output", "size-aware"])
def test_the_simulated_load_per_type_is_the_plans_within_sampling_error(routing: str) -> None:
    _, problem, plan, table, engines = _plan("mixed.yaml")
    seconds = 900.0
    trace = sim.poisson_trace(*EDGES, problem.rates, seconds, seed=11)
    report = sim.simulate(engines, plan.replicas(), trace, routing, route.chooser(table), seed=11)  # type: ignore[arg-type]
    expected = table.plan_load if routing == "size-aware-output" else table.input_load
    shares = table.by_bucket if routing == "size-aware-output" else None
    for g, stats in enumerate(report.gpus):
        # the load is a compound Poisson sum of 1 / throughput per request: its variance is
        # sum(rate * share / throughput^2) / seconds
        variance = 0.0
        for i, row in enumerate(problem.rates):
            for j, rate in enumerate(row):
                t = problem.gpus[g].throughput[i][j]
                share = shares[i][j][g] if shares is not None else table.by_input[i][g]
                if rate > 0 and share > 0 and t > 0:
                    variance += rate * share / t**2
        sigma = math.sqrt(variance / seconds)
        assert stats.load == pytest.approx(expected[g], abs=4 * sigma + 1e-9), stats.name


def test_round_robin_sends_each_instance_the_same_share() -> None:
    _, problem, plan, _, engines = _plan("mixed.yaml")
    trace = sim.poisson_trace(*EDGES, problem.rates, 60, seed=5)
    report = sim.simulate(engines, plan.replicas(), trace, "round-robin")
    total = sum(plan.replicas().values())
    for stats in report.gpus:
        assert stats.requests == pytest.approx(len(trace) * stats.instances / total, abs=total)
    assert report.total.cost_per_hour == pytest.approx(plan.cost_per_hour)


def test_a_fleet_without_a_type_sends_its_share_to_the_others() -> None:
    _, problem, _, table, engines = _plan("mixed.yaml")
    trace = sim.poisson_trace(*EDGES, problem.rates, 20, seed=5)
    report = sim.simulate(engines, {"L40S": 6}, trace, "size-aware", route.chooser(table, ["L40S"]))
    assert [s.requests for s in report.gpus if s.name != "L40S"] == [0, 0, 0, 0]
    assert report.total.requests == len(trace)


def test_a_logged_trace_keeps_its_times_or_takes_the_rate() -> None:
    logged = [(10, 5, 100.0), (20, 6, 100.5), (30, 0, 101.0), (40, 7, 102.0)]
    trace = sim.trace_of(logged, None, 0)
    assert trace.arrivals.tolist() == [0.0, 0.5, 2.0]  # the request of no output is left out
    assert trace.output_tokens.tolist() == [5, 6, 7]
    paced = sim.trace_of([(10, 5, None)] * 1000, 50.0, 0)
    assert paced.duration == pytest.approx(20.0, rel=0.15)
    with pytest.raises(ValueError, match="give a request rate"):
        sim.trace_of([(10, 5, None)], None, 0)


# --- the command ------------------------------------------------------------------------------------


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def test_the_command_reports_per_type_and_overall() -> None:
    result = invoke("simulate", str(EXAMPLES / "document.yaml"), "--duration", "30", "-o", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["costPerHour"] == pytest.approx(5.58)
    assert data["total"]["requests"] == data["requests"] > 0
    assert {g["calibration"] for g in data["gpus"]} == {"perfmodel"}
    assert set(data["total"]["tpotSeconds"]) == {"p50", "p90", "p99"}
    table = invoke("simulate", str(EXAMPLES / "document.yaml"), "--duration", "30", "--seed", "4")
    assert table.exit_code == 0
    assert table.stdout.splitlines()[0].split()[:4] == ["GPU", "INSTANCES", "COST/H", "REQUESTS"]
    assert "seed 4" in table.stdout


def test_a_matrix_of_no_shipped_profile_needs_tpot(tmp_path: Path) -> None:
    raw = yaml.safe_load((EXAMPLES / "document.yaml").read_text(encoding="utf-8"))
    raw["spec"]["gpus"][2]["throughput"][0][0] = 700.0
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    refused = invoke("simulate", str(path), "--duration", "5")
    assert refused.exit_code == 2
    assert refused.stderr.splitlines() == [
        "error: gpus[2] (L40S): its throughput matches no shipped profile, so its TPOT SLO is "
        "unknown; give it with --tpot SECONDS"
    ]
    fitted = invoke("simulate", str(path), "--duration", "5", "--tpot", "0.12", "-o", "yaml")
    assert fitted.exit_code == 0, fitted.output
    assert "calibration: fitted" in fitted.stdout


def test_a_trace_is_replayed(tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    log.write_text(
        "".join(
            json.dumps({"timestamp": 1000 + k * 0.1, "input_tokens": 50 + k, "output_tokens": 20})
            + "\n"
            for k in range(200)
        ),
        encoding="utf-8",
    )
    result = invoke(
        "simulate", str(EXAMPLES / "conversational.yaml"), "--trace", str(log), "-o", "json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["requests"] == 200


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--gpus", "L4=two"],
            "error: --gpus: must be TYPE=N pairs separated by commas, got 'L4=two'",
        ),
        (["--gpus", "T4=1"], "error: --gpus: T4 is not a GPU type of"),
        (["--gpus", "L4=1,L4=2"], "error: --gpus: L4 is given twice"),
        (["--gpus", "L4=0"], "error: the fleet has no instance: give one with --gpus TYPE=N"),
        (["--rate", "nan"], "error: --rate: must be a finite number, got nan"),
        (["--routing", "random"], "Invalid value for '--routing'"),
        (
            ["--trace", "/nonexistent/log.jsonl"],
            "error: --trace /nonexistent/log.jsonl: cannot read",
        ),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(args: list[str], message: str) -> None:
    result = invoke("simulate", str(EXAMPLES / "mixed.yaml"), "--duration", "5", *args)
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 or message.startswith("Invalid")
    assert message in result.stderr


def test_a_file_that_is_not_an_allocation_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("spec: {buckets: 3}\n", encoding="utf-8")
    result = invoke("simulate", str(path))
    assert result.exit_code == 2
    assert result.stderr.startswith("error: spec.")
