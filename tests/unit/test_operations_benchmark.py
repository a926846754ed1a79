"""The operations benchmark's replay (benchmarks/operations.py), on a short compressed day: the
properties its table relies on, so a change to the decision functions that breaks them shows here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

import operations


@pytest.fixture(scope="module")
def result() -> operations.Result:
    return operations.run("mixed", seed=0, hours=2.0, startup=10, quick=True)


def test_the_oracle_is_never_dearer_than_a_strategy(result: operations.Result) -> None:
    oracle = result.tally("oracle")
    for tally in result.tallies:
        assert oracle.cost <= tally.cost + 1e-9, tally.name


def test_the_static_peak_plan_is_never_short_outside_the_outage(
    result: operations.Result,
) -> None:
    assert result.tally("static peak").short_outside == 0
    assert result.tally("oracle").short_outside == 0


def test_the_operator_changes_the_mix_no_more_often_than_today(
    result: operations.Result,
) -> None:
    assert result.tally("operator").mix_changes <= result.tally("today").mix_changes


def test_the_outage_is_felt_and_counted_apart(result: operations.Result) -> None:
    start, end = result.trace.outage
    assert 0 < start < end < len(result.trace.rates)
    assert result.tally("today").short_outage > 0  # the outage type cannot grow when it must


def test_a_seed_gives_the_same_run() -> None:
    first = operations.run("mixed", seed=3, hours=0.5, startup=5, quick=True)
    second = operations.run("mixed", seed=3, hours=0.5, startup=5, quick=True)
    assert first.trace == second.trace
    assert first.tallies == second.tallies
    assert operations.diurnal(30.0, 30, 30, seed=4) != list(first.trace.rates)
