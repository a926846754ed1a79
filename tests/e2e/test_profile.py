"""`melange profile` as a user runs it, against the simulated GPU of tests/e2e/gpusim.py.

The simulator is a model whose capacity can be derived on paper (`implied_rate`), so the measured
profile is checked against it; the same run is cut short by --max-duration and resumed, and the
result imported. No Kubernetes control plane is needed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from melange.tools import measurement, profiles

from .operator_process import MELANGE, terminate
from .prometheus import REPO, _get, _wait, free_port

pytestmark = pytest.mark.e2e

MODEL = "sim"
SLO = 0.01
# seconds per engine iteration: base + per_seq * running + per_context_token * contexts
BASE, PER_SEQ, PER_CONTEXT_TOKEN, MAX_NUM_SEQS = 0.003, 0.001, 5e-6, 256
INPUT_EDGES, OUTPUT_EDGES = "1,16,256", "4,16,64"  # requests of 4 and 64 x 8 and 32 tokens
TOLERANCE = 0.15


@dataclass
class Simulator:
    url: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def requests(self) -> list[dict[str, Any]]:
        """Every completion request so far: time, promptTokens, maxTokens."""
        text = self.log_path.read_text() if self.log_path.exists() else ""
        return [json.loads(line) for line in text.splitlines()]


def start_simulator(workdir: Path, *extra: str) -> Simulator:
    port = free_port()
    log_path = workdir / f"gpusim-{port}.jsonl"
    output = (workdir / f"gpusim-{port}.out").open("ab")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.e2e.gpusim",
            f"--port={port}",
            f"--model={MODEL}",
            f"--base={BASE}",
            f"--per-seq={PER_SEQ}",
            f"--per-context-token={PER_CONTEXT_TOKEN}",
            f"--max-num-seqs={MAX_NUM_SEQS}",
            f"--log={log_path}",
            *extra,
        ],
        cwd=REPO,
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    output.close()
    url = f"http://127.0.0.1:{port}"
    _wait(lambda: process.poll() is None and _get(f"{url}/v1/models")[0] == 200, "gpusim")
    return Simulator(url, log_path, process)


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[Simulator]:
    sim = start_simulator(tmp_path)
    try:
        yield sim
    finally:
        terminate(sim.process)


def profile(url: str, output: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [
        MELANGE,
        "profile",
        url,
        f"--model={MODEL}",
        "--gpu=SIM-1",
        "--cost-per-hour=1.5",
        f"--tpot-slo={SLO}",
        f"--input-edges={INPUT_EDGES}",
        f"--output-edges={OUTPUT_EDGES}",
        "--step-seconds=0.5",
        "--refine=4",
        f"--output-file={output}",
        *extra,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


def implied_rate(prompt_tokens: int, output_tokens: int) -> float:
    """The simulator's highest request rate within the SLO, derived from its model.

    With c sequences running, an iteration makes one token for each and takes
    tpot(c) = BASE + c * (PER_SEQ + PER_CONTEXT_TOKEN * context), where a running sequence's
    context is on average its prompt plus half its output, P + (O - 1) / 2. TPOT meets the SLO up
    to c* = (SLO - BASE) / (PER_SEQ + PER_CONTEXT_TOKEN * context), at most MAX_NUM_SEQS. A
    sequence runs for O iterations (its first token comes at the end of the first), O * tpot(c*)
    seconds, so by Little's law c* = rate * O * tpot(c*): rate* = c* / (O * tpot(c*)).
    """
    per_sequence = PER_SEQ + PER_CONTEXT_TOKEN * (prompt_tokens + (output_tokens - 1) / 2)
    concurrency = min((SLO - BASE) / per_sequence, MAX_NUM_SEQS)
    return concurrency / (output_tokens * (BASE + concurrency * per_sequence))


def measured(document: dict[str, Any]) -> dict[tuple[int, int], dict[str, Any]]:
    """The per-bucket records, by (request input tokens, request output tokens)."""
    return {
        (b["requestInputTokens"], b["requestOutputTokens"]): b
        for b in document["measurement"]["buckets"]
    }


def test_measures_the_simulators_capacity_and_resumes(simulator: Simulator, tmp_path: Path) -> None:
    output = tmp_path / "profile.yaml"

    # a budget that fits the first bucket (about 6 s) but not all four (about 40 s)
    first = profile(simulator.url, output, "--max-duration=14")
    assert first.returncode == 3, first.stderr
    assert "run the same command again to resume" in first.stderr
    partial = yaml.safe_load(output.read_text())
    left = partial["measurement"]["pending"]
    assert 0 < len(left) < 4, first.stderr
    assert profiles.validate_profile(partial), "a partial profile must not be importable"
    imported = subprocess.run(
        [MELANGE, "profiles", "import", "--dir", str(tmp_path / "profiles"), str(output)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert imported.returncode == 2
    done_before = measured(partial)
    requests_before = len(simulator.requests())

    second = profile(simulator.url, output)
    assert second.returncode == 0, second.stderr
    assert f"resuming: {len(done_before)} of 4 buckets already measured" in second.stderr
    final = yaml.safe_load(output.read_text())
    assert profiles.validate_profile(final) == []
    assert final["source"] == "measured"
    assert "pending" not in final["measurement"]
    after = measured(final)
    assert len(after) == 4
    # the buckets measured in the first run were kept, not measured again
    for key, record in done_before.items():
        assert after[key] == record
    resumed = {(r["promptTokens"], r["maxTokens"]) for r in simulator.requests()[requests_before:]}
    assert not resumed & set(done_before), resumed

    edges_in = [int(e) for e in INPUT_EDGES.split(",")]
    edges_out = [int(e) for e in OUTPUT_EDGES.split(",")]
    for bucket in measurement.buckets(edges_in, edges_out, "mean"):  # the default
        record = after[(bucket.prompt_tokens, bucket.output_tokens)]
        assert record["promptTokens"] == bucket.prompt_tokens  # calibrated to the server's count
        assert record["completionTokens"] == bucket.output_tokens
        expected = implied_rate(bucket.prompt_tokens, bucket.output_tokens)
        got = final["throughput"][bucket.row][bucket.column]
        assert got == record["throughput"]
        assert abs(got - expected) <= TOLERANCE * expected, (bucket.label, got, expected)
    assert final["measurement"]["exactOutputLength"] is True
    assert final["measurement"]["promptLength"].startswith("calibrated")

    imported = subprocess.run(
        [MELANGE, "profiles", "import", "--dir", str(tmp_path / "profiles"), str(output)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr
    assert "sim/sim-1/tpot-10ms" in imported.stdout

    # once complete, the same command measures nothing
    requests_before = len(simulator.requests())
    again = profile(simulator.url, output)
    assert again.returncode == 0, again.stderr
    assert "already measured" in again.stdout
    assert len(simulator.requests()) == requests_before


def test_other_conditions_are_not_resumed(simulator: Simulator, tmp_path: Path) -> None:
    output = tmp_path / "profile.yaml"
    first = profile(simulator.url, output, "--max-duration=0.5")
    assert first.returncode == 3, first.stderr
    changed = profile(simulator.url, output, "--max-duration=0.5", "--percentile=99")
    assert changed.returncode == 2
    assert "--percentile: 99.0 now, 90.0 in the file" in changed.stderr
    assert "--restart" in changed.stderr


def test_unreachable_endpoint(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = profile(url, tmp_path / "profile.yaml")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: cannot connect to {url}/v1/models: Connection refused"
    assert not (tmp_path / "profile.yaml").exists()


def test_unknown_model(simulator: Simulator, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            MELANGE,
            "profile",
            simulator.url + "/v1",
            "--model=llama",
            "--gpu=SIM-1",
            "--cost-per-hour=1",
            "--tpot-slo=0.01",
            "--input-edges=1,16",
            "--output-edges=4,16",
            f"--output-file={tmp_path / 'profile.yaml'}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert f"{simulator.url} does not serve model 'llama'; it serves: sim" in result.stderr
    assert simulator.requests() == []


def test_strict_server_without_vllm_extensions(tmp_path: Path) -> None:
    """A server that refuses ignore_eos/min_tokens/stream_options is still measured, and the
    profile says its output lengths were not enforced and its prompt lengths approximated."""
    sim = start_simulator(tmp_path, "--strict")
    try:
        output = tmp_path / "profile.yaml"
        result = profile(sim.url, output, "--input-edges=1,16", "--output-edges=4,16", "--refine=1")
        assert result.returncode == 0, result.stderr
    finally:
        terminate(sim.process)
    document = yaml.safe_load(output.read_text())
    assert document["measurement"]["exactOutputLength"] is False
    assert document["measurement"]["promptLength"].startswith("approximate")
    assert document["throughput"][0][0] > 0
    # the approximation: the number is one word, each filler word one; the simulator adds a BOS
    (record,) = document["measurement"]["buckets"]
    assert record["promptTokens"] is None
    assert {r["promptTokens"] for r in sim.requests()[-5:]} == {record["requestInputTokens"] + 1}


def test_slo_below_the_unloaded_tpot_gives_zero(simulator: Simulator, tmp_path: Path) -> None:
    """No load can make TPOT shorter than one request alone gets: the bucket's throughput is 0."""
    output = tmp_path / "profile.yaml"
    result = profile(
        simulator.url, output, "--tpot-slo=0.002", "--input-edges=1,16", "--output-edges=4,16"
    )
    assert result.returncode == 0, result.stderr
    document = yaml.safe_load(output.read_text())
    assert document["throughput"] == [[0]]
    (record,) = document["measurement"]["buckets"]
    assert record["steps"] == []
    assert "exceeds the SLO" in record["note"]


def test_server_failing_mid_measurement(tmp_path: Path) -> None:
    """The first requests succeed (negotiation, calibration, the unloaded request), then every
    request fails: the run stops at the first step with the server's own error message."""
    sim = start_simulator(tmp_path, "--fail-after=4")
    try:
        output = tmp_path / "profile.yaml"
        result = profile(sim.url, output, "--input-edges=1,16", "--output-edges=4,16")
    finally:
        terminate(sim.process)
    assert result.returncode == 2
    assert "HTTP 500: CUDA error: an illegal memory access was encountered" in result.stderr
    assert "0 of 1 buckets measured" in result.stderr
    assert yaml.safe_load(output.read_text())["measurement"]["pending"] == [[0, 0]]
