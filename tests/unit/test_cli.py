"""The installed `melange` command, run as a user runs it: outputs, exit codes, messages."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
import pytest
import yaml
from click.testing import CliRunner, Result

EXAMPLES = Path(__file__).parents[2] / "examples"
MELANGE = shutil.which("melange", path=str(Path(sys.executable).parent)) or "melange"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MELANGE, *args], input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


SMALL = """
spec:
  buckets: {inputTokens: [1, 100, 1000, 16000], outputTokens: [1, 100, 1000]}
  workload: {distribution: [[16, 6], [6, 3], [2, 1]], totalRate: 34}
  gpus:
  - {name: L4, costPerHour: 0.8, throughput: [[20, 6], [8, 2], [1, 0]]}
  - {name: A100, costPerHour: 3.7, throughput: [[60, 25], [40, 12], [10, 4]]}
"""


def test_table_output() -> None:
    result = run("solve", "-", stdin=SMALL)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["GPU", "REPLICAS", "COST/H", "UTILIZATION"]
    assert lines[1].split()[:3] == ["L4", "2", "1.60"]
    assert lines[2].split()[:3] == ["A100", "1", "3.70"]
    assert lines[3].split() == ["total", "3", "5.30"]
    assert "best single type: A100 x2 at 7.40/h; saving 28.4%" in result.stdout
    assert "lower bound:" in result.stdout
    assert result.stderr == ""


def test_json_output_shape() -> None:
    result = run("solve", "-", "-o", "json", stdin=SMALL)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)  # stdout holds the JSON document and nothing else
    assert plan["status"] == "Optimal"
    assert plan["costPerHour"] == pytest.approx(5.3)
    assert plan["lowerBound"] <= plan["costPerHour"]
    assert [(g["name"], g["replicas"]) for g in plan["gpus"]] == [("L4", 2), ("A100", 1)]
    assert set(plan["gpus"][0]) == {"name", "replicas", "costPerHour", "utilization"}
    assert {"gpu": "A100", "replicas": 2, "costPerHour": 7.4} in plan["baselines"]
    assert isinstance(plan["solveSeconds"], float)
    for bucket in plan["assignment"]:
        assert sum(s["fraction"] for s in bucket["shares"]) == pytest.approx(1.0)


def test_yaml_output_and_overrides() -> None:
    result = run(
        "solve",
        "-",
        "-o",
        "yaml",
        "--rate",
        "68",
        "--slice-factor",
        "4",
        "--method",
        "direct",
        stdin=SMALL,
    )
    assert result.returncode == 0, result.stderr
    plan = yaml.safe_load(result.stdout)
    assert plan["totalRate"] == 68
    assert plan["method"] == "direct"
    fractions = {s["fraction"] for b in plan["assignment"] for s in b["shares"]}
    assert fractions <= {0.25, 0.5, 0.75, 1.0}
    assert all(s["fraction"] == s["slices"] / 4 for b in plan["assignment"] for s in b["shares"])


def test_zero_rate_solves_to_minimums() -> None:
    result = run("solve", "-", "-o", "json", "--rate", "0", stdin=SMALL)
    assert result.returncode == 0
    assert json.loads(result.stdout)["costPerHour"] == 0


def test_infeasible_exits_1_with_reason() -> None:
    capped = SMALL.replace("costPerHour: 3.7,", "costPerHour: 3.7, maxReplicas: 0,")
    result = run("solve", "-", stdin=capped)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: infeasible: the demand of 34 req/s does not fit within maxReplicas of "
        "A100 (maxReplicas 0)"
    )


def test_unservable_bucket_exits_1() -> None:
    only_l4 = SMALL.split("  - {name: A100", maxsplit=1)[0]
    result = run("solve", "-", "-o", "json", stdin=only_l4)
    assert result.returncode == 1
    assert json.loads(result.stdout)["status"] == "Infeasible"
    assert "no GPU type can serve input 1000-16000, output 100-1000 tokens" in result.stderr


def test_invalid_input_exits_2_with_every_error() -> None:
    broken = SMALL.replace("[[20, 6], [8, 2], [1, 0]]", "[[20, 6], [8, -2]]").replace(
        "totalRate: 34", "totalRate: -1"
    )
    result = run("solve", "-", stdin=broken)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: spec.workload.totalRate: must be >= 0, got -1",
        "error: spec.gpus[0].throughput[1][1]: must be >= 0, got -2",
        "error: spec.gpus[0].throughput: must be 3 x 2: 3 rows (one per input bucket) of 2 columns "
        "(one per output bucket), as the bucket edges give; got 2 x 2",
    ]


def test_missing_file_exits_2(tmp_path: Path) -> None:
    result = run("solve", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr


def test_bad_option_exits_2() -> None:
    result = run("solve", "-", "--slice-factor", "0", stdin=SMALL)
    assert result.returncode == 2
    assert "--slice-factor" in result.stderr


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_examples_solve(example: str) -> None:
    result = run("solve", str(EXAMPLES / example))
    assert result.returncode == 0, result.stderr
    assert "status:       Optimal" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["solve"],
        ["profiles"],
        ["profiles", "list"],
        ["profiles", "show"],
        ["profiles", "estimate"],
    ],
)
def test_help_is_complete(args: list[str]) -> None:
    result = run(*args, "--help")
    assert result.returncode == 0
    assert "Usage: melange" in result.stdout
    assert len(result.stdout.splitlines()) > 4


def test_profiles_list_show_estimate() -> None:
    listing = run("profiles", "list")
    assert listing.returncode == 0
    assert "llama-3.1-8b/h100/tpot-40ms" in listing.stdout
    shown = yaml.safe_load(run("profiles", "show", "llama-3.1-8b/a10g/tpot-120ms").stdout)
    assert shown["name"] == "A10G"
    assert shown["source"] == "estimate"
    entry = json.loads(
        run("profiles", "show", "llama-3.1-8b/a10g/tpot-120ms", "--entry-only", "-o", "json").stdout
    )
    assert set(entry) == {"name", "costPerHour", "throughput"}
    estimated = yaml.safe_load(
        run("profiles", "estimate", "--gpu", "A10G", "--tpot-ms", "120").stdout
    )
    assert estimated["throughput"] == shown["throughput"]


def test_profiles_errors() -> None:
    unknown = run("profiles", "show", "nope")
    assert unknown.returncode == 2
    assert "unknown profile 'nope'; available: llama-3.1-" in unknown.stderr
    bad_edges = run(
        "profiles", "estimate", "--gpu", "L4", "--tpot-ms", "50", "--input-edges", "5,3"
    )
    assert bad_edges.returncode == 2
    assert "must be at least 2 strictly increasing integers" in bad_edges.stderr


IMPORTED_MODULES = """
import sys
from melange.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
except SystemExit:
    pass
print(" ".join(sorted(sys.modules)))
"""
COMMAND_MODULES = {
    f"melange.cli.{name}" for name in ("profile", "profiles", "run", "solve", "workload")
}
KUBERNETES_AND_HTTP = {"kopf", "kubernetes", "aiohttp"}


def imported(*args: str) -> set[str]:
    """The modules a fresh `melange ARGS` process has imported when the command returns."""
    result = subprocess.run(
        [sys.executable, "-c", IMPORTED_MODULES, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return set(result.stdout.splitlines()[-1].split())


def packages(modules: set[str]) -> set[str]:
    return {m.partition(".")[0] for m in modules}


def test_root_help_imports_no_command() -> None:
    modules = imported("--help")
    assert not modules & COMMAND_MODULES
    heavy = {"kopf", "kubernetes", "aiohttp", "highspy", "numpy", "pydantic", "yaml", "rich"}
    assert not packages(modules) & heavy


def test_solve_help_imports_neither_the_solver_nor_other_commands() -> None:
    modules = imported("solve", "--help")
    assert modules & COMMAND_MODULES == {"melange.cli.solve"}
    assert "melange.plan.solver" not in modules
    assert not packages(modules) & {*KUBERNETES_AND_HTTP, "highspy", "numpy"}


@pytest.mark.parametrize(
    "args",
    [
        ["profiles", "--help"],
        ["profiles", "list", "--help"],
        ["workload", "--help"],
        ["run", "--help"],
        ["profile", "--help"],
        ["profiles", "list"],
        ["profiles", "estimate", "--gpu", "L4", "--tpot-ms", "50"],
        ["solve", str(EXAMPLES / "mixed.yaml")],
    ],
)
def test_commands_without_a_cluster_load_no_kubernetes_or_http_client(args: list[str]) -> None:
    modules = imported(*args)
    assert modules & COMMAND_MODULES == {f"melange.cli.{args[0]}"}
    assert not packages(modules) & KUBERNETES_AND_HTTP


def test_root_help_lists_each_command_with_its_own_summary() -> None:
    import click

    from melange.cli import COMMANDS, main

    ctx = click.Context(main)
    assert main.list_commands(ctx) == sorted(COMMANDS)
    for name, lazy in COMMANDS.items():
        command = main.get_command(ctx, name)
        assert command is not None
        assert command.name == name
        assert command.get_short_help_str(limit=1000) == lazy.summary
    listing = run("--help").stdout.split("Commands:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in listing] == sorted(COMMANDS)


def test_a_matrix_of_the_wrong_shape_is_one_error_saying_both_shapes() -> None:
    # an 8 x 6 profile pasted into a spec of 3 x 2 buckets: one line, not one per row
    entry = run("profiles", "show", "llama-3.1-8b/l4/tpot-120ms", "--entry-only", "-o", "json")
    pasted = json.loads(entry.stdout)
    spec = yaml.safe_load(SMALL)
    spec["spec"]["gpus"][0] = pasted
    result = run("solve", "-", stdin=yaml.safe_dump(spec))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: spec.gpus[0].throughput: must be 3 x 2: 3 rows (one per input bucket) of 2 "
        "columns (one per output bucket), as the bucket edges give; got 8 x 6"
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["solve", "--profile", "llama-3.1-8b/l4/tpot-120ms"],
        ["workload", "--edges-from", "llama-3.1-8b/l4/tpot-120ms", "--rate", "1"],
    ],
)
def test_commands_given_profiles_load_no_other_command(tmp_path: Path, args: list[str]) -> None:
    workload = tmp_path / "w.yaml"
    workload.write_text(
        "buckets: {inputTokens: [1, 25, 100, 250, 500, 1000, 2000, 4000, 8000], "
        "outputTokens: [1, 25, 100, 250, 500, 1000, 2000]}\n"
        f"workload: {{distribution: {[[1] * 6] * 8}, totalRate: 1}}\n"
    )
    log = tmp_path / "log.jsonl"
    log.write_text('{"input_tokens": 10, "output_tokens": 10}\n')
    modules = imported(args[0], str(workload if args[0] == "solve" else log), *args[1:])
    assert modules & COMMAND_MODULES == {f"melange.cli.{args[0]}"}
    assert "melange.tools.profiles" in modules


# -- exit codes that say what happened ------------------------------------------------------------


def invoke(*args: str, env: dict[str, str | None] | None = None) -> Result:
    from melange.cli import main

    return CliRunner().invoke(main, list(args), env=env)


def broken_solver(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    """Make `melange.plan.solver.solve` raise `exc`: a stand-in for a bug, since no real input is
    known to reach an unexpected exception (each one the fuzzer found was fixed)."""
    from melange.plan import solver

    def broken(*args: object, **kwargs: object) -> NoReturn:
        raise exc

    monkeypatch.setattr(solver, "solve", broken)


LONG_MESSAGE = "first line\nsecond\tline " + "x" * 500


def test_an_internal_error_is_exit_5_in_two_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """No real input reaches this path: the solver is patched to raise."""
    from melange.cli import EXIT_INTERNAL, MAX_MESSAGE_CHARS

    broken_solver(monkeypatch, ZeroDivisionError(LONG_MESSAGE))
    result = invoke("solve", str(EXAMPLES / "mixed.yaml"), env={"MELANGE_DEBUG": None})
    assert result.exit_code == EXIT_INTERNAL == 5
    assert result.stdout == ""
    first, second = result.stderr.splitlines()  # exactly two lines
    prefix = "error: internal error: ZeroDivisionError: "
    assert first.startswith(prefix + "first line second line xxx")
    assert first.endswith("...")
    assert len(first) == len(prefix) + MAX_MESSAGE_CHARS
    assert second.startswith("error: this is a bug in melange; please report it")
    assert "--debug" in second
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--debug"], None), ([], {"MELANGE_DEBUG": "1"})],
    ids=["--debug", "MELANGE_DEBUG=1"],
)
def test_debug_shows_the_traceback(
    monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str | None] | None
) -> None:
    """No real input reaches this path: the solver is patched to raise."""
    broken_solver(monkeypatch, RuntimeError("broken"))
    result = invoke(*args, "solve", str(EXAMPLES / "mixed.yaml"), env=env)
    assert result.exit_code == 5
    lines = result.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "RuntimeError: broken" in lines
    assert lines[-2:] == [
        "error: internal error: RuntimeError: broken",
        "error: this is a bug in melange; please report it with the traceback above",
    ]


def test_an_interrupt_is_exit_130(monkeypatch: pytest.MonkeyPatch) -> None:
    """Click alone turns Ctrl-C into "Aborted!" and exit 1, the code of "infeasible"."""
    broken_solver(monkeypatch, KeyboardInterrupt())
    result = invoke("solve", str(EXAMPLES / "mixed.yaml"))
    assert result.exit_code == 130
    assert result.stderr.splitlines()[-1] == "error: interrupted"


def test_usage_errors_and_exit_codes_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    assert invoke("solve", str(EXAMPLES / "mixed.yaml"), "--method", "nope").exit_code == 2
    assert invoke("nope").exit_code == 2
    broken_solver(monkeypatch, SystemExit(4))
    assert invoke("solve", str(EXAMPLES / "mixed.yaml")).exit_code == 4


@pytest.mark.parametrize(
    "args", [["profiles", "list"], ["solve", str(EXAMPLES / "mixed.yaml"), "-o", "json"]]
)
def test_a_closed_output_is_exit_141(args: list[str]) -> None:
    """`melange ... | head -1`: click alone exits 1 (the code of "infeasible") on a closed pipe."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the command writes anything
    try:
        done = subprocess.run(
            [MELANGE, *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141
    assert done.stderr == ""


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0"])
def test_time_limit_must_be_a_positive_finite_number(value: str) -> None:
    result = run("solve", str(EXAMPLES / "mixed.yaml"), "--time-limit", value)
    assert result.returncode == 2, result.stderr
    assert "--time-limit" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["profiles", "estimate", "--gpu", "L4", "--tpot-ms", "nan"], "--tpot-ms"),
        (
            ["profiles", "estimate", "--gpu", "L4", "--tpot-ms", "50", "--cost-per-hour", "inf"],
            "--cost-per-hour",
        ),
        (["workload", "-", "--rate", "nan"], "--rate"),
        (["run", "--resync-seconds", "nan"], "--resync-seconds"),
    ],
)
def test_numeric_options_must_be_finite(args: list[str], option: str) -> None:
    result = run(*args, stdin="")
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: {option}: must be a finite number, got {args[-1]}\n"


@pytest.mark.parametrize("value", ["H100", "H100=", "H100=-1", "H100=two", "=4", "H 100=4"])
def test_a_gpu_budget_is_a_name_and_a_count(value: str) -> None:
    result = run("run", "--gpu-budget", value, stdin="")
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"error: --gpu-budget {value}: expected GPU=COUNT, a gpus[].name and a whole number of "
        "replicas, e.g. H100=40\n"
    )


def test_a_gpu_budget_is_given_once_per_type() -> None:
    result = run("run", "--gpu-budget", "H100=4", "--gpu-budget", "H100=5", stdin="")
    assert result.returncode == 2
    assert result.stderr == "error: --gpu-budget H100=5: H100 has a budget already\n"


def test_inputs_that_are_not_files_are_refused(tmp_path: Path) -> None:
    """A device or a pipe as LOG, endless input as a profile, bytes that are not text: exit 2 with
    one line naming the input, never a crash or a hang."""
    not_text = tmp_path / "token"
    not_text.write_bytes(b"\xff\xfe")
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 5000 + "]" * 5000)
    prometheus = ["--from-prometheus", "http://127.0.0.1:9", "--model", "m"]
    edges = ["--input-edges", "1,10", "--output-edges", "1,10"]
    cases = {
        ("workload", "/dev/zero", "--rate", "1"): (
            "/dev/zero: not a regular file; give it on stdin instead (LOG '-')"
        ),
        ("profiles", "import", "/dev/zero"): "/dev/zero: larger than 16777216 bytes",
        ("profiles", "import", str(deep)): f"{deep}: nested too deeply to be a profile",
        ("workload", *prometheus, *edges, "--bearer-token-file", str(not_text)): (
            f"--bearer-token-file {not_text}: not UTF-8 text: byte 0xff at offset 0"
        ),
        ("workload", *prometheus, *edges, "--ca-file", "/dev/zero"): (
            "--ca-file /dev/zero: larger than 1048576 bytes"
        ),
    }
    for args, message in cases.items():
        result = run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr == f"error: {message}\n", args


def test_a_value_echoed_in_an_error_is_short() -> None:
    """A `!!binary` or `!!set` value was printed whole: hundreds of kilobytes in one line."""
    blob = base64.b64encode(bytes(100_000)).decode()
    keys = ", ".join(f"k{i}" for i in range(20_000))
    for value, shown in [
        (f"!!binary {blob}", "binary data of 100000 bytes"),
        (f"!!set {{{keys}}}", "a set of 20000"),
    ]:
        spec = SMALL.replace("totalRate: 34", f"totalRate: {value}")
        result = run("solve", "-", stdin=spec)
        assert result.returncode == 2
        assert result.stderr == f"error: spec.workload.totalRate: must be a number, got {shown}\n"


def test_a_huge_float_is_echoed_in_its_exponent_form() -> None:
    """An integral float was printed as an integer: 1e308 as 309 digits."""
    spec = SMALL.replace("costPerHour: 0.8", "costPerHour: 1e308")
    result = run("solve", "-", stdin=spec)
    assert result.returncode == 2, result.stderr
    assert result.stderr == "error: spec.gpus[0].costPerHour: must be <= 1000000000, got 1e+308\n"


# -- one meaning for -o, --version, shell completion --------------------------------------------


def leaf_commands() -> dict[str, click.Command]:
    """Every command a user can run, by its words after `melange` (`profiles list`)."""
    from melange.cli import main

    ctx = click.Context(main)
    found: dict[str, click.Command] = {}
    for name in main.list_commands(ctx):
        command = main.get_command(ctx, name)
        assert command is not None
        if isinstance(command, click.Group):
            for sub in command.list_commands(ctx):
                leaf = command.get_command(ctx, sub)
                assert leaf is not None
                found[f"{name} {sub}"] = leaf
        else:
            found[name] = command
    return found


def test_o_is_the_output_format_wherever_it_is_an_option() -> None:
    formats = {"table", "json", "yaml"}
    with_o = {}
    for words, command in leaf_commands().items():
        for param in command.params:
            if "-o" in param.opts:
                assert param.opts == ["-o", "--output"], words
                assert isinstance(param.type, click.Choice), words
                assert set(param.type.choices) <= formats, words
                with_o[words] = param.default
    assert {
        "solve",
        "workload",
        "profiles list",
        "profiles show",
        "profiles estimate",
        "profiles compare",
    } <= set(with_o)
    assert "profile" not in with_o  # it writes a file (--output-file) and prints progress only


def _workload_log(tmp_path: Path) -> Path:
    log = tmp_path / "requests.jsonl"
    log.write_text(
        "".join(
            json.dumps({"timestamp": i, "input_tokens": 10 + i, "output_tokens": 5 + i}) + "\n"
            for i in range(20)
        )
    )
    return log


@pytest.mark.parametrize(
    "args",
    [
        ["solve", str(EXAMPLES / "mixed.yaml")],
        ["workload", "LOG", "--input-edges", "1,20,40", "--output-edges", "1,20,40"],
        ["profiles", "list"],
        ["profiles", "show", "llama-3.1-8b/l4/tpot-120ms"],
        ["profiles", "estimate", "--gpu", "L4", "--tpot-ms", "120"],
        ["profiles", "compare", "llama-3.1-8b/l4/tpot-120ms", "llama-3.1-8b/a10g/tpot-120ms"],
    ],
    ids=lambda args: " ".join(a for a in args[:2] if not a.startswith("/") and a != "LOG"),
)
def test_every_command_that_prints_data_prints_json_and_yaml_with_o(
    tmp_path: Path, args: list[str]
) -> None:
    args = [str(_workload_log(tmp_path)) if a == "LOG" else a for a in args]
    as_json = run(*args, "-o", "json")
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    as_yaml = run(*args, "-o", "yaml")
    assert as_yaml.returncode == 0, as_yaml.stderr
    parsed = yaml.safe_load(as_yaml.stdout)
    assert type(parsed) is type(document)
    if args[0] != "solve":  # solveSeconds differs between two runs
        assert parsed == document


def test_profiles_list_o_json_holds_the_table_rows_and_the_profiles_not_shipped() -> None:
    table = run("profiles", "list")
    listing = json.loads(run("profiles", "list", "-o", "json").stdout)
    names = [p["profile"] for p in listing["profiles"]]
    assert names == sorted(names)
    rows = [line.split()[0] for line in table.stdout.split("\n\n")[0].splitlines()[1:]]
    assert rows == names
    l4 = next(p for p in listing["profiles"] if p["profile"] == "llama-3.1-8b/l4/tpot-120ms")
    assert l4 == {
        "profile": "llama-3.1-8b/l4/tpot-120ms",
        "gpu": "L4",
        "model": "llama-3.1-8b",
        "tpotSeconds": 0.12,
        "costPerHour": 0.7,
        "source": "estimate",
        "path": None,
    }
    for withheld in listing["notShipped"]:
        assert withheld["profile"] not in names
        assert f"{withheld['profile']} is not shipped: {withheld['reason']}" in table.stdout


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def profile_args(url: str) -> list[str]:
    return [
        "profile",
        url,
        "--model=m",
        "--gpu=L4",
        "--cost-per-hour=1",
        "--tpot-slo=0.1",
        "--input-edges=1,16",
        "--output-edges=4,16",
    ]


def test_profile_writes_the_file_given_with_output_file(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    refused = f"error: cannot connect to {url}/v1/models: Connection refused"
    for option in ("-f", "--output-file"):
        result = run(*profile_args(url), option, str(tmp_path / "p.yaml"))
        assert (result.returncode, result.stderr.splitlines()) == (2, [refused])
    # The old spelling still works, with a warning; -o is not a file anywhere.
    old = run(*profile_args(url), "--output", str(tmp_path / "p.yaml"))
    assert old.returncode == 2
    assert old.stderr.splitlines() == [
        "warning: `melange profile --output` is deprecated: use --output-file (-f); "
        "-o is the output format in every other command",
        refused,
    ]
    short = run(*profile_args(url), "-o", str(tmp_path / "p.yaml"))
    assert short.returncode == 2
    assert "No such option '-o'" in short.stderr
    missing = run(*profile_args(url))
    assert missing.returncode == 2
    assert "Missing option '-f' / '--output-file'" in missing.stderr
    both = run(*profile_args(url), "-f", "a.yaml", "--output", "b.yaml")
    assert both.returncode == 2
    assert "give --output-file (-f) only" in both.stderr
    assert not (tmp_path / "p.yaml").exists()


def test_profile_will_not_overwrite_a_file_it_did_not_write(tmp_path: Path) -> None:
    other = tmp_path / "notes.yaml"
    other.write_text("mine: true\n")
    result = run(*profile_args(f"http://127.0.0.1:{closed_port()}"), "-f", str(other))
    assert result.returncode == 2
    assert "choose another --output-file or pass --restart" in result.stderr
    assert other.read_text() == "mine: true\n"


def test_version_is_the_installed_version_and_loads_no_command() -> None:
    from importlib.metadata import version

    result = run("--version")
    assert (result.returncode, result.stdout) == (
        0,
        f"melange, version {version('melange-operator')}\n",
    )
    modules = imported("--version")
    assert not modules & COMMAND_MODULES


def test_shell_completion_scripts_are_printed() -> None:
    def source(shell: str) -> str:
        done = subprocess.run(
            [MELANGE],
            env={**os.environ, "_MELANGE_COMPLETE": f"{shell}_source"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (done.returncode, done.stderr) == (0, "")
        return done.stdout

    assert "complete -o nosort -F _melange_completion melange" in source("bash")
    assert source("zsh").startswith("#compdef melange")
    assert "complete --no-files --command melange" in source("fish")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("melange prof", ["profile", "profiles"]),
        ("melange profiles list -o ", ["table", "json", "yaml"]),
        ("melange solve x.yaml --method ", ["decomposition", "direct"]),
        ("melange run --log-format ", ["text", "json"]),
    ],
)
def test_shell_completion_completes_commands_and_choices(line: str, expected: list[str]) -> None:
    words = line.split()
    done = subprocess.run(
        [MELANGE],
        env={
            **os.environ,
            "_MELANGE_COMPLETE": "bash_complete",
            "COMP_WORDS": line,
            "COMP_CWORD": str(len(words) - (0 if line.endswith(" ") else 1)),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"plain,{word}" for word in expected]


# -- melange run --log-format -------------------------------------------------------------------


def run_in_a_pod_without_api_server(tmp_path: Path, *args: str) -> str:
    """`melange run` as in a pod whose API server does not answer yet: it logs one warning per
    attempt (and Kopf its own messages); stopped by SIGTERM after the first attempt. Its stderr."""
    import time

    service_account = tmp_path / "serviceaccount"
    service_account.mkdir()
    (service_account / "token").write_text("token")
    (service_account / "ca.crt").write_text("unused: the connection is refused before TLS\n")
    env = {k: v for k, v in os.environ.items() if k not in {"KUBECONFIG", "POD_NAME"}}
    env |= {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(closed_port()),
        "MELANGE_SERVICE_ACCOUNT_DIR": str(service_account),
        "POD_NAMESPACE": "ops",
        "HOME": str(tmp_path),
    }
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [MELANGE, "run", "--metrics-port=0", "--no-leader-elect", *args],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 60
        while "attempt 1: " not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert process.returncode == 0, log.read_text()
    return log.read_text()


def test_run_logs_json_lines_kopf_included(tmp_path: Path) -> None:
    import datetime as dt

    stderr = run_in_a_pod_without_api_server(tmp_path, "--log-format", "json")
    lines = [json.loads(line) for line in stderr.splitlines()]  # every line is one JSON object
    assert lines
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line)
        assert line["time"].endswith("Z")
        dt.datetime.fromisoformat(line["time"])
        assert line["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
    attempts = [line for line in lines if line["logger"] == "melange.startup"]
    assert attempts[0]["level"] == "WARNING"
    assert attempts[0]["message"].startswith("attempt 1: cannot reach the API server https://")
    # Kopf's own messages too (its stop on SIGTERM), once each: nothing left in plain text.
    kopf = [line for line in lines if line["logger"].startswith("kopf")]
    assert any("SIGTERM" in line["message"] for line in kopf)
    assert len({json.dumps(line) for line in lines}) == len(lines)


def test_run_logs_text_by_default(tmp_path: Path) -> None:
    stderr = run_in_a_pod_without_api_server(tmp_path)
    first = stderr.splitlines()[0]
    assert first.startswith("attempt 1: cannot reach the API server https://")
    assert not first.startswith("{")


JSON_LOGGING = """
import logging, sys
import kopf
from melange.cli.logs import JsonFormatter

# as `melange run --log-format json [-v]` starts Kopf (melange.controller.kube.runner.run_operator)
kopf.configure(verbose="-v" in sys.argv, log_format=kopf.LogFormat.JSON, log_refkey="object")
logging.getLogger().handlers[-1].setFormatter(JsonFormatter())
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("melange.controller").exception("reconcile of %s failed", "ns/chat")
logging.getLogger("kopf.objects").info(
    "Handler done.",
    extra={"k8s_ref": {"apiVersion": "melange.dev/v1alpha1", "kind": "MelangeAllocation",
                       "namespace": "ns", "name": "chat", "uid": None},
           "k8s_skip": True, "settings": kopf.OperatorSettings()},
)
logging.getLogger("melange.controller").debug("shown with --verbose: déjà vu")
for name in ("aiohttp.access", "kubernetes.client.rest", "urllib3.connectionpool"):
    logging.getLogger(name).warning("from %s", name)
logging.getLogger("melange.controller").info("where", stack_info=True)
"""


def json_log_lines(*args: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-c", JSON_LOGGING, *args],
        env={**os.environ, "TZ": "Asia/Tokyo"},  # the times are UTC all the same
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in done.stderr.splitlines()]


def test_json_log_lines_carry_the_exception_and_the_object() -> None:
    import datetime as dt

    failed, handled, *libraries, located = json_log_lines()
    assert list(failed) == ["time", "level", "logger", "message", "exception"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", failed["time"])
    when = dt.datetime.fromisoformat(failed["time"])
    assert abs(when - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)
    assert failed["level"] == "ERROR"
    assert failed["logger"] == "melange.controller"
    assert failed["message"] == "reconcile of ns/chat failed"
    assert failed["exception"].startswith("Traceback (most recent call last):")
    assert failed["exception"].endswith("ZeroDivisionError: division by zero")
    # Kopf's extras: the object reference (without its empty parts) and nothing else
    assert list(handled) == ["time", "level", "logger", "message", "object"]
    assert handled["logger"] == "kopf.objects"
    assert handled["message"] == "Handler done."
    assert handled["object"] == {
        "apiVersion": "melange.dev/v1alpha1",
        "kind": "MelangeAllocation",
        "namespace": "ns",
        "name": "chat",
    }
    # the libraries' loggers: once each, through the same handler
    assert [(line["logger"], line["message"]) for line in libraries] == [
        (name, f"from {name}")
        for name in ("aiohttp.access", "kubernetes.client.rest", "urllib3.connectionpool")
    ]
    assert list(located) == ["time", "level", "logger", "message", "stack"]
    assert located["stack"].startswith("Stack (most recent call last):")


def test_json_log_lines_at_debug_with_verbose() -> None:
    lines = json_log_lines("-v")
    debug = [line for line in lines if line["level"] == "DEBUG"]
    assert [line["message"] for line in debug] == ["shown with --verbose: déjà vu"]
    assert len(lines) == 7
