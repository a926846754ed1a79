"""Fuzzed input through `melange solve`: never a traceback nor a hang; a rejected document gets an
error naming the offending field, an unreadable input one line naming the input.

The bulk runs in process (click's test runner, with an alarm as the hang guard); a handful of the
hostile inputs run as real subprocesses, from a file and from stdin.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from melange.cli import EXIT_INTERNAL, main

from .mutations import (
    BOUNDS,
    INTEGER_BOUNDS,
    NOT_ALLOCATIONS,
    Fuzzed,
    Mutation,
    Verdict,
    example_manifests,
    fuzzed_allocations,
    hostile_texts,
    is_number,
    past,
    render,
    set_at,
    to_json,
    to_yaml,
    walk,
    within,
)

pytestmark = pytest.mark.fuzz

MELANGE = shutil.which("melange", path=str(Path(sys.executable).parent)) or "melange"
HANG = 30.0  # seconds: far more than any of these inputs takes; past it the input hung the command
EXIT_CODES = {0, 1, 2, 4}  # never EXIT_INTERNAL: an internal error the fuzzer finds is a bug
# `error: <field path>: ...`, the path as `spec.gpus[1].costPerHour` (or `document`, `kind`, ...)
FIELD_LINE = re.compile(r"^error: (?P<path>[\w.\[\]\"-]*[\w\]]): ")
MORE_LINE = re.compile(r"^error: \.\.\. and \d+ more errors$")
MANIFEST = example_manifests()[0]
EXAMPLES_DIR = Path(__file__).parents[2] / "examples"


class Hung(Exception):
    pass


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: FrameType | None) -> None:
        raise Hung(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def solve(tmp_path: Path, data: bytes) -> Result:
    """`melange solve FILE` in process; fails the test on a crash or a hang."""
    path = tmp_path / "input.yaml"
    path.write_bytes(data)
    with deadline(HANG):
        result = CliRunner().invoke(main, ["solve", str(path), "--time-limit", "20"])
    assert not isinstance(result.exception, Hung), f"hung: {data[:300]!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"crashed: {result.exception!r}\n{data[:300]!r}"
    )
    assert "Traceback" not in result.output + result.stderr
    assert result.exit_code != EXIT_INTERNAL, f"internal error: {result.stderr}\n{data[:300]!r}"
    assert result.exit_code in EXIT_CODES, result.output
    return result


def assert_refused_in_one_line(result: Result, source: str) -> None:
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {source}: "), lines
    assert result.stdout == ""


def assert_every_line_names_a_field(result: Result) -> list[str]:
    """Each stderr line is `error: <path>: <message>`; returns the paths."""
    paths = []
    for line in result.stderr.splitlines():
        if MORE_LINE.match(line):
            continue
        match = FIELD_LINE.match(line)
        assert match, f"no field path in {line!r}"
        paths.append(match["path"])
    assert paths, "no error"
    return paths


def names(paths: list[str], wanted: str) -> bool:
    """An error is about `wanted`: the field, one inside it, or the one it is part of below the
    top level (a matrix's shape error names the matrix, and the row in its message)."""
    for path in paths:
        if within(path, wanted):
            return True
        nested = path.removeprefix("spec.")
        if within(wanted, path) and ("." in nested or "[" in nested):
            return True
    return False


def check(fuzzed: Fuzzed, result: Result) -> None:
    context = f"{fuzzed.describe()}\n{result.output}"
    assert "certificate" not in result.output, context  # an internal check, never a verdict
    if result.exit_code == 2:
        paths = assert_every_line_names_a_field(result)
        if fuzzed.invalid_paths:
            assert any(names(paths, p) for p in fuzzed.invalid_paths), context
    else:
        assert not fuzzed.invalid_paths, f"accepted: {context}"
        assert "status:" in result.stdout, context


# -- mutated allocations ---------------------------------------------------------------------------

ENCODINGS = {"yaml": to_yaml, "json": to_json}


def run_fuzzed(tmp_path: Path, fuzzed: Fuzzed, encoding: str) -> None:
    result = solve(tmp_path, ENCODINGS[encoding](fuzzed.document).encode())
    check(fuzzed, result)


def pinned(category: str, changes: dict[str, Any], verdict: Verdict) -> Fuzzed:
    """A counterexample the fuzzer found, kept: the first example's bare spec with some changes
    (`changes` maps a dotted path, integers indexing lists, to its new value)."""
    spec = copy.deepcopy(MANIFEST["spec"])
    for dotted, value in changes.items():
        steps = tuple(int(s) if s.isdigit() else s for s in dotted.split("."))
        set_at(spec, steps, value)
    return Fuzzed(spec, "", [Mutation(category, render(steps), verdict)])


# Each was a crash, a hang or a wrong verdict before the fix next to it.
# An unknown field named "" was reported as "error: is not a known field", with no path.
EMPTY_KEY = pinned("unknown_field", {"": 1}, "invalid")
# 10**400 in the distribution: OverflowError in the positive-sum rule (int + float).
HUGE_INT_CELL = pinned("bad_number", {"workload.distribution.1.0": 10**400}, "invalid")
# A throughput of 1e-320: an infinite load, OverflowError in the single-type baselines.
TINY_THROUGHPUT = pinned("odd_number", {"gpus.0.throughput.0.0": 1e-320}, "any")
DENORMAL_THROUGHPUTS = pinned(
    "odd_number", {f"gpus.{g}.throughput.2.3": 5e-324 for g in range(5)}, "any"
)
# A rate of 1e308: plans of ~1e306 replicas that failed their own certificate ("unsolved"); now
# totalRate is at most 1e9, for the model and the CRD alike.
HUGE_RATE = pinned("odd_number", {"workload.totalRate": 1e308}, "invalid")
# A cost of 1e308 per hour: OverflowError finding the costs' grid (round(1e308 / 1e-6)); now
# costPerHour is at most 1e9, for the model and the CRD alike.
HUGE_COST = pinned("odd_number", {"gpus.1.costPerHour": 1e308}, "invalid")
# A rate of 1e308 over a distribution summing to less than 1: the rates overflowed to inf.
SMALL_SUM = pinned(
    "odd_number",
    {
        "workload.distribution": [[0.01] * 6 for _ in range(8)],
        "workload.totalRate": 1e308,  # the change that is refused, last (pinned names the last)
    },
    "invalid",
)
# Every cell 1e307: their sum overflowed, and the plan was for 0 req/s; cells are at most 1e12.
HUGE_CELLS = pinned(
    "odd_number", {"workload.distribution": [[1e307] * 6 for _ in range(8)]}, "invalid"
)
# The largest cells and rate the bounds allow, and the least positive rate: a plan, or a reason.
LARGEST_CELLS = pinned(
    "bound",
    {"workload.totalRate": 1e9, "workload.distribution": [[1e12] * 6 for _ in range(8)]},
    "any",
)
LEAST_RATE = pinned(
    "bound",
    {"workload.totalRate": 1e-6, "workload.distribution": [[5e-324] * 6 for _ in range(8)]},
    "any",
)


@given(fuzzed=fuzzed_allocations(), encoding=st.sampled_from(sorted(ENCODINGS)))
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@example(fuzzed=EMPTY_KEY, encoding="yaml")
@example(fuzzed=HUGE_INT_CELL, encoding="yaml")
@example(fuzzed=HUGE_INT_CELL, encoding="json")
@example(fuzzed=TINY_THROUGHPUT, encoding="yaml")
@example(fuzzed=DENORMAL_THROUGHPUTS, encoding="json")
@example(fuzzed=HUGE_RATE, encoding="yaml")
@example(fuzzed=HUGE_RATE, encoding="json")
@example(fuzzed=SMALL_SUM, encoding="yaml")
@example(fuzzed=HUGE_COST, encoding="json")
@example(fuzzed=HUGE_CELLS, encoding="json")
@example(fuzzed=LARGEST_CELLS, encoding="yaml")
@example(fuzzed=LEAST_RATE, encoding="json")
def test_mutated_allocations(tmp_path: Path, fuzzed: Fuzzed, encoding: str) -> None:
    run_fuzzed(tmp_path, fuzzed, encoding)


def bounded_fields() -> list[tuple[str, float, bool]]:
    """Each bounded number of the first example, at each of its bounds and one step past it."""
    spec = MANIFEST["spec"]
    limits = {**BOUNDS, **INTEGER_BOUNDS}
    cases = []
    seen = set()
    for steps, node in walk(spec):
        pattern = tuple("*" if isinstance(s, int) else s for s in steps)
        if not (is_number(node) and pattern in limits) or pattern in seen:
            continue
        seen.add(pattern)  # the first of each: gpus[0].throughput[0][0], ...
        low, high = limits[pattern]
        path = ".".join(str(s) for s in steps)
        cases += [(path, low, True), (path, high, True)]
        cases += [(path, past(low, upward=False), False), (path, past(high, upward=True), False)]
    return cases


@pytest.mark.parametrize(("path", "value", "allowed"), bounded_fields())
def test_a_bound_is_allowed_and_one_step_past_it_is_not(
    tmp_path: Path, path: str, value: float, allowed: bool
) -> None:
    fuzzed = pinned("bound", {path: value}, "any" if allowed else "invalid")
    result = solve(tmp_path, to_json(fuzzed.document).encode())
    check(fuzzed, result)
    field = fuzzed.mutations[0].path
    if allowed:  # another rule may refuse it (minReplicas above maxReplicas), never this field's
        paths = assert_every_line_names_a_field(result) if result.exit_code == 2 else []
        assert not any(within(p, field) for p in paths), result.output
    else:
        assert result.exit_code == 2, result.output


# -- hostile texts ---------------------------------------------------------------------------------

HOSTILE = hostile_texts(MANIFEST)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_text_is_refused_in_one_line(tmp_path: Path, name: str) -> None:
    result = solve(tmp_path, HOSTILE[name])
    assert_refused_in_one_line(result, str(tmp_path / "input.yaml"))


@pytest.mark.parametrize("name", sorted(NOT_ALLOCATIONS))
def test_document_that_is_not_an_allocation_is_refused(tmp_path: Path, name: str) -> None:
    result = solve(tmp_path, NOT_ALLOCATIONS[name])
    assert result.exit_code == 2, result.output
    assert_every_line_names_a_field(result)


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_each_example_solves(tmp_path: Path, encoding: str) -> None:
    """The fuzzer's starting points are valid: a rejection comes from a mutation."""
    for manifest in example_manifests():
        result = solve(tmp_path, ENCODINGS[encoding](manifest).encode())
        assert result.exit_code == 0, result.output


# -- a handful as real subprocesses, from a file and from stdin ------------------------------------

SUBPROCESS_CASES = ["billion-laughs", "deep-json-10k", "10MB-matrix", "non-utf8-middle"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
@pytest.mark.parametrize("stdin", [False, True], ids=["file", "stdin"])
def test_hostile_text_through_the_command(tmp_path: Path, name: str, stdin: bool) -> None:
    path = tmp_path / "input.yaml"
    path.write_bytes(HOSTILE[name])
    command = [MELANGE, "solve", "-" if stdin else str(path)]
    with path.open("rb") as source:
        done = subprocess.run(
            command,
            stdin=source if stdin else subprocess.DEVNULL,
            capture_output=True,
            timeout=60,  # a hang fails the test
            check=False,
        )
    stderr = done.stderr.decode()
    assert "Traceback" not in stderr
    assert done.returncode == 2, stderr
    assert done.stdout == b""
    lines = stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {'-' if stdin else path}: "), lines


@pytest.mark.parametrize("stdin", [False, True], ids=["file", "stdin"])
def test_endless_input_is_refused_by_the_size_cap(stdin: bool) -> None:
    """/dev/zero never ends: at most the cap and one byte more are read, then exit 2."""
    command = [MELANGE, "solve", "-" if stdin else "/dev/zero"]
    with Path("/dev/zero").open("rb") as zeros:
        done = subprocess.run(
            command,
            stdin=zeros if stdin else subprocess.DEVNULL,
            capture_output=True,
            timeout=60,  # a hang fails the test
            check=False,
        )
    source = "-" if stdin else "/dev/zero"
    assert done.returncode == 2, done.stderr
    assert done.stderr.decode() == f"error: {source}: larger than 3145728 bytes\n"
    assert done.stdout == b""


# -- numbers as kubectl reads them -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate"),
    [("1e1", "10"), ("1.5E1", "15"), (".2e2", "20"), ("2.0e+1", "20")],
)
def test_exponent_numbers_are_numbers(tmp_path: Path, text: str, rate: str) -> None:
    """YAML 1.1 read `1e1` as a string ("must be a number, got '1e1'"); kubectl reads a number."""
    document = re.sub(r"totalRate: [0-9.]+", f"totalRate: {text}", to_yaml(MANIFEST))
    assert f"totalRate: {text}\n" in document
    result = solve(tmp_path, document.encode())
    assert result.exit_code == 0, result.output
    assert f"request rate: {rate} req/s" in result.stdout


def test_exponent_lookalike_strings_stay_strings(tmp_path: Path) -> None:
    document = re.sub(r"totalRate: [0-9.]+", "totalRate: '1e1'", to_yaml(MANIFEST))
    assert "totalRate: '1e1'\n" in document
    result = solve(tmp_path, document.encode())
    assert result.exit_code == 2
    assert result.stderr == "error: spec.workload.totalRate: must be a number, got '1e1'\n"


@pytest.mark.parametrize("rate", ["inf", "nan", "1e400"])
def test_rate_option_must_be_finite(tmp_path: Path, rate: str) -> None:
    result = CliRunner().invoke(main, ["solve", str(EXAMPLES_DIR / "mixed.yaml"), "--rate", rate])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --rate: must be a finite number"), result.stderr


@pytest.mark.parametrize("limit", ["nan", "inf"])
def test_time_limit_option_must_be_finite(limit: str) -> None:
    """A NaN time limit left no time at all, and a hard allocation came out unsolved."""
    result = CliRunner().invoke(
        main, ["solve", str(EXAMPLES_DIR / "mixed.yaml"), "--time-limit", limit]
    )
    assert result.exit_code == 2, result.output
    assert (
        result.stderr == f"error: --time-limit: must be a finite number of seconds, got {limit}\n"
    )
    assert result.stdout == ""


@pytest.mark.parametrize("cell", [1e12, 5e-324])
def test_distribution_of_extreme_cells_keeps_the_rate(tmp_path: Path, cell: float) -> None:
    """Cells of 1e308 overflowed their sum to inf, and the plan served no traffic (0 replicas,
    `Optimal`); cells of 5e-324 made every rate inf. Only the cells' ratios count: the largest
    cells allowed (1e12; 1e308 is now refused) and the least float both give the full rate."""
    document = copy.deepcopy(MANIFEST)
    distribution = document["spec"]["workload"]["distribution"]
    document["spec"]["workload"]["distribution"] = [[cell] * len(distribution[0])] * len(
        distribution
    )
    result = CliRunner().invoke(main, ["solve", "-", "-o", "json"], input=to_json(document))
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["totalRate"] == document["spec"]["workload"]["totalRate"]
    assert sum(g["replicas"] for g in plan["gpus"]) > 0
