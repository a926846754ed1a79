"""The performance model's calibration: the published data points and their sources, the fit
(deterministic, reproducing `perfmodel.CALIBRATION`, within each point's tolerance, and able to
fail), and `melange profiles cheapest`."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from dataclasses import astuple, fields
from pathlib import Path

import pytest

from melange.tools import perfmodel, profiles
from melange.tools.profiles import build, calibrate

METRICS = set(calibrate.METRICS)


MELANGE = str(Path(sys.executable).with_name("melange"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MELANGE, *args], capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def data() -> calibrate.Data:
    return calibrate.load()


@pytest.fixture(scope="module")
def fitted(data: calibrate.Data) -> perfmodel.Calibration:
    return calibrate.fit(data)


def test_every_point_is_complete_and_names_its_source(data: calibrate.Data) -> None:
    assert len(data.points) >= 10
    assert len({p.id for p in data.points}) == len(data.points)
    for point in data.points:
        assert point.metric in METRICS, point.id
        assert point.value > 0, point.id
        assert point.source.strip(), point.id
        assert point.gpu in data.datasheets, point.id
        assert point.model in data.models, point.id
        if point.metric == "tokensPerDollarRatio":
            assert point.versus in data.datasheets, point.id
            assert point.tpot_seconds, point.id
        if point.tolerance is not None:  # a looser tolerance must say why
            assert point.tolerance > data.tolerance, point.id
            assert point.disagreement, point.id
    # the shipped GPU types and a 70B-class model are among the points
    named = {p.gpu for p in data.points} | {p.versus for p in data.points if p.versus}
    assert {"A10G", "A100-80GB", "H100", "L4"} <= named
    assert any(data.models[p.model].params > 60e9 and p.gpus > 1 for p in data.points)


def test_the_prices_are_the_datasheets_with_their_sources(data: calibrate.Data) -> None:
    listed = {entry["gpu"]: entry for entry in data.prices}
    assert set(listed) == set(perfmodel.DATASHEETS)
    for name, sheet in perfmodel.DATASHEETS.items():
        assert listed[name]["costPerHour"] == sheet.cost_per_hour
        assert listed[name]["source"].strip()
        assert isinstance(listed[name]["checked"], bool)


def test_the_shipped_constants_are_the_fit_of_the_data(
    data: calibrate.Data, fitted: perfmodel.Calibration
) -> None:
    assert calibrate.rounded(fitted) == perfmodel.CALIBRATION, (
        "update perfmodel.CALIBRATION: run `python -m melange.tools.profiles.calibrate`"
    )
    assert calibrate.fit(data) == fitted  # deterministic


def test_every_point_is_within_its_tolerance(data: calibrate.Data) -> None:
    assert calibrate.outside(perfmodel.CALIBRATION, data) == []
    for point in data.points:
        got = calibrate.predict(point, perfmodel.CALIBRATION, data)
        assert abs(got / point.value - 1) <= calibrate.tolerance(point, data), point.id


def test_the_tolerance_check_fails_an_uncalibrated_model(data: calibrate.Data) -> None:
    """The check can fail: halve the fitted bandwidth efficiencies and latencies leave it."""
    worse = dataclasses.replace(
        perfmodel.CALIBRATION,
        gddr_bandwidth_efficiency=perfmodel.CALIBRATION.gddr_bandwidth_efficiency / 2,
        hbm_bandwidth_efficiency=perfmodel.CALIBRATION.hbm_bandwidth_efficiency / 2,
    )
    problems = calibrate.outside(worse, data)
    assert any("single-stream" in problem for problem in problems)
    # a published value far from the model is reported too
    moved = dataclasses.replace(
        data, points=[dataclasses.replace(data.points[-1], value=data.points[-1].value * 3)]
    )
    assert len(calibrate.outside(perfmodel.CALIBRATION, moved)) == 1


def test_the_fit_lowers_the_error_from_its_start(
    data: calibrate.Data, fitted: perfmodel.Calibration
) -> None:
    before = calibrate.residuals(calibrate.START, data)
    after = calibrate.residuals(fitted, data)
    assert float(after @ after) < float(before @ before)


def test_the_fit_recovers_a_model_from_its_own_predictions(data: calibrate.Data) -> None:
    """Points made by the model with known parameters are fitted back to within 2% (without
    the prior, which would pull the parameters towards the start)."""
    truth = dataclasses.replace(
        calibrate.START,
        gddr_bandwidth_efficiency=0.8,
        hbm_bandwidth_efficiency=0.85,
        step_overhead_seconds=0.003,
        early_step_overhead_seconds=0.008,
    )
    synthetic = dataclasses.replace(
        data,
        points=[
            dataclasses.replace(p, value=calibrate.predict(p, truth, data)) for p in data.points
        ],
    )
    fitted = calibrate.fit(synthetic, prior=False)
    for point in synthetic.points:
        assert calibrate.predict(point, fitted, synthetic) == pytest.approx(point.value, rel=0.02)


def test_the_bounds_keep_every_parameter_physical(fitted: perfmodel.Calibration) -> None:
    for field, value in zip(fields(fitted), astuple(fitted), strict=True):
        low, high = calibrate.BOUNDS[field.name]
        assert low <= value <= high, field.name
    assert 0 < fitted.gddr_bandwidth_efficiency < 1
    assert 0 < fitted.hbm_bandwidth_efficiency < 1


def test_the_command_prints_every_point_and_exits_0() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "melange.tools.profiles.calibrate"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for point in calibrate.load().points:
        assert point.id in result.stdout
    assert "gddr_bandwidth_efficiency = " in result.stdout


def test_every_shipped_profile_names_the_calibration_sources(data: calibrate.Data) -> None:
    sources = {p.source for p in data.points}
    for info in profiles.list_profiles():
        record = profiles.load_profile(info.name)["estimate"]["calibration"]
        assert set(record["sources"]) == sources
        assert record["points"] == len(data.points)
    assert build.calibration_record()["data"].endswith("calibration.yaml")


# --- the cheapest type per bucket ----------------------------------------------------------------


def test_cheapest_is_the_type_of_the_lowest_cost_per_request() -> None:
    grid = profiles.cheapest_grid("llama-3.1-8b", 0.12)
    names = [t["name"] for t in grid["types"]]
    assert names == list(perfmodel.SHIPPED_GPUS)
    for r, row in enumerate(grid["cheapest"]):
        for c, winner in enumerate(row):
            costs = {n: grid["costPerMillion"][n][r][c] for n in names}
            served = {n: v for n, v in costs.items() if v is not None}
            assert winner == min(served, key=served.__getitem__)
            cost = perfmodel.DATASHEETS[winner].cost_per_hour
            assert served[winner] == pytest.approx(
                profiles.cost_per_million(
                    cost,
                    profiles.load_profile(f"llama-3.1-8b/{perfmodel.slug(winner)}/tpot-120ms")[
                        "throughput"
                    ][r][c],
                )
            )


def test_cheapest_for_a_70b_model_uses_its_instances_and_a_tight_slo_leaves_some_out() -> None:
    grid = profiles.cheapest_grid("llama-3.1-70b", 0.04)
    sizes = {t["name"]: t["gpus"] for t in grid["types"]}
    assert sizes == {f"{g}x{n}": n for g, n in perfmodel.SHIPPED_INSTANCES["llama-3.1-70b"].items()}
    winners = {w for row in grid["cheapest"] for w in row}
    assert winners == {"H100x2"}  # only two H100s stream 141 GB of weights within 40 ms
    assert all(v is None for row in grid["costPerMillion"]["L4x8"] for v in row)


def test_cheapest_among_the_papers_gpus_with_its_engine() -> None:
    """The Mélange paper's GPU types and engine: at 120 ms a cheap type wins the smallest
    requests and an 80 GB HBM type the longest outputs; at 40 ms the A100 is more cost-efficient
    than the A10G at every size of the paper's SLO figure, and the L4 serves nothing."""
    paper = ["L4", "A10G", "A100-80GB", "H100"]
    loose = profiles.cheapest_grid("llama-2-7b", 0.12, gpus=paper, era="early-vllm")
    tight = profiles.cheapest_grid("llama-2-7b", 0.04, gpus=paper, era="early-vllm")
    assert loose["cheapest"][0][0] in {"L4", "A10G"}
    assert {row[-1] for row in loose["cheapest"]} <= {"A100-80GB", "H100"}
    assert "L4" not in {w for row in tight["cheapest"] for w in row}
    llama2 = perfmodel.MODELS["llama-2-7b"]
    a10g, a100 = perfmodel.GPUS["A10G"], perfmodel.GPUS["A100-80GB"]
    for size in (25, 64, 100, 250, 500):
        per_dollar = [
            perfmodel.request_throughput(
                g, llama2, size, size, 0.04, engine=perfmodel.engine_for(g, era="early-vllm")
            )
            / g.cost_per_hour
            for g in (a10g, a100)
        ]
        assert per_dollar[0] < per_dollar[1], size


def test_cheapest_rejects_unknown_types() -> None:
    with pytest.raises(profiles.ProfileError, match="unknown GPU type 'TPU'"):
        profiles.cheapest_grid("llama-3.1-8b", 0.12, gpus=["TPU"])


def test_the_cheapest_command_prints_the_grid_and_json() -> None:
    table = run("profiles", "cheapest", "--model", "llama-3.1-8b", "--tpot-ms", "120")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    grid = profiles.cheapest_grid("llama-3.1-8b", 0.12)
    rows = lines[1 : 1 + len(grid["cheapest"])]
    assert [line.split()[1:] for line in rows] == [
        ["-" if w is None else w for w in row] for row in grid["cheapest"]
    ]
    winners = [w for row in grid["cheapest"] for w in row]
    assert f"L40S: {winners.count('L40S')} of {len(winners)}" in lines[-1] or (
        f"L40S: {winners.count('L40S')}," in lines[-1]
    )
    as_json = run("profiles", "cheapest", "--tpot-ms", "120", "-o", "json")
    assert json.loads(as_json.stdout) == grid
    paper = run(
        "profiles", "cheapest", "--model", "llama-2-7b", "--tpot-ms", "40",
        "--gpu", "A10G", "--gpu", "A100-80GB", "--engine", "early-vllm", "-o", "json",
    )  # fmt: skip
    assert [t["name"] for t in json.loads(paper.stdout)["types"]] == ["A10G", "A100-80GB"]
    bad = run("profiles", "cheapest", "--tpot-ms", "nan")
    assert bad.returncode == 2


def test_estimate_takes_the_shipped_instance_of_a_70b_model() -> None:
    import yaml

    shown = run(
        "profiles", "estimate", "--gpu", "H100", "--model", "llama-3.1-70b", "--tpot-ms", "120"
    )
    assert shown.returncode == 0, shown.stderr
    estimated = yaml.safe_load(shown.stdout)
    shipped = profiles.load_profile("llama-3.1-70b/h100x2/tpot-120ms")
    assert estimated["name"] == "H100x2"
    assert estimated["throughput"] == shipped["throughput"]
    four = yaml.safe_load(
        run("profiles", "estimate", "--gpu", "H100", "--model", "llama-3.1-70b",
            "--tpot-ms", "120", "--gpus", "4").stdout
    )  # fmt: skip
    assert four["name"] == "H100x4"
    assert four["costPerHour"] == pytest.approx(4 * perfmodel.DATASHEETS["H100"].cost_per_hour)
    assert all(
        f >= s
        for fr, sr in zip(four["throughput"], shipped["throughput"], strict=True)
        for f, s in zip(fr, sr, strict=True)
    )
    assert not math.isnan(four["costPerHour"])


def test_the_comparison_with_the_papers_grid_marks_each_disagreement(data: calibrate.Data) -> None:
    comparison = data.comparisons[0]
    assert len(comparison.cheapest) == len(comparison.input_tokens)
    assert {len(row) for row in comparison.cheapest} == {len(comparison.output_tokens)}
    for slo in calibrate.COMPARISON_SLOS:
        agree, tiles = calibrate.agreement(comparison, slo)
        assert tiles == len(comparison.input_tokens) * len(comparison.output_tokens)
        ours = calibrate.model_cheapest(comparison, slo)
        assert agree == sum(
            a == b
            for mine, theirs in zip(ours, comparison.cheapest, strict=True)
            for a, b in zip(mine, theirs, strict=True)
        )
        lines = calibrate.comparison_lines(comparison, [slo])
        marked = sum(line.count("*") for line in lines)
        assert marked == tiles - agree
    # from the paper's black-box columns on, only the HBM cards are candidates
    assert comparison.only_hbm_from_input is not None
    for i, row in zip(
        comparison.input_tokens, calibrate.model_cheapest(comparison, 0.12), strict=True
    ):
        if i >= comparison.only_hbm_from_input:
            assert set(row) <= {"A100-80GB", "H100"}
