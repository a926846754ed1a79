"""`melange workload`: from a request log to the spec's `buckets` and `workload` blocks."""

from __future__ import annotations

import json
import random
import resource
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from melange import api
from melange.tools import profiles, workload

MELANGE = shutil.which("melange", path=str(Path(sys.executable).parent)) or "melange"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MELANGE, *args], input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


EDGES = ("--input-edges", "1,100,1000", "--output-edges", "1,100,1000")

JSONL = """\
{"input_tokens": 10, "output_tokens": 5, "timestamp": 1000}
{"prompt_tokens": 150, "completion_tokens": 50, "timestamp": 1002.5}
{"id": "chatcmpl-1", "usage": {"prompt_tokens": 150, "completion_tokens": 500, "total_tokens": 650}, "timestamp": "1970-01-01T00:16:50Z"}
{"usage": {"input_tokens": 99, "output_tokens": 99}, "timestamp": "1970-01-01T01:16:45+01:00"}

{"input_tokens": 999, "output_tokens": 1, "timestamp": 1001}
"""

CSV = """\
timestamp,prompt_tokens,completion_tokens,model
2024-05-01T12:00:00Z,10,5,llama
2024-05-01T12:00:02Z,150,50,llama
2024-05-01T12:00:04Z,150,500,llama
2024-05-01T12:00:06Z,99,99,llama
2024-05-01T12:00:10Z,999,1,llama
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def fragment(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert isinstance(data, dict)
    return data


def test_jsonl_exact_matrix_and_rate(tmp_path: Path) -> None:
    result = run("workload", str(write(tmp_path, "requests.jsonl", JSONL)), *EDGES)
    data = fragment(result)
    assert data == {
        "buckets": {"inputTokens": [1, 100, 1000], "outputTokens": [1, 100, 1000]},
        # 5 requests over 10 s: (5 - 1) / 10 = 0.4 req/s
        "workload": {"distribution": [[2, 0], [2, 1]], "totalRate": 0.4},
    }
    assert result.stderr == ""
    assert result.stdout.startswith("# ")  # a summary comment, saying the matrix holds counts
    assert "distribution = request counts" in result.stdout


def test_csv_exact_matrix_rfc3339_rate(tmp_path: Path) -> None:
    result = run("workload", str(write(tmp_path, "requests.csv", CSV)), *EDGES, "-o", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["workload"] == {"distribution": [[2, 0], [2, 1]], "totalRate": 0.4}


def test_format_detected_by_content(tmp_path: Path) -> None:
    for text in (JSONL, CSV):
        data = fragment(run("workload", str(write(tmp_path, "requests.log", text)), *EDGES))
        assert data["workload"] == {"distribution": [[2, 0], [2, 1]], "totalRate": 0.4}


def test_stdin(tmp_path: Path) -> None:
    data = fragment(run("workload", "-", *EDGES, stdin=CSV))
    assert data["workload"] == {"distribution": [[2, 0], [2, 1]], "totalRate": 0.4}


def test_stdin_that_cannot_be_spooled_is_a_clear_error() -> None:
    """A real write failure: the file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored so the write
    fails with EFBIG) stops the copy of stdin to its temporary file, as a full disk would."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))

    log = CSV + "1,10,10,m\n" * 20_000  # about 200 KB, over the 64 KiB limit
    result = subprocess.run(
        [MELANGE, "workload", "-", *EDGES],
        input=log,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        preexec_fn=limit_file_size,
    )
    assert result.returncode == 2, result.stderr
    assert "<stdin>: cannot copy it to a temporary file" in result.stderr
    assert "give the log as a file" in result.stderr
    assert "Traceback" not in result.stderr


def test_output_is_a_valid_spec_fragment(tmp_path: Path) -> None:
    data = fragment(run("workload", str(write(tmp_path, "r.jsonl", JSONL)), *EDGES))
    spec = {**data, "gpus": [{"name": "L4", "costPerHour": 1, "throughput": [[1, 1], [1, 1]]}]}
    api.validate_spec(spec)


def test_malformed_lines_are_reported_with_line_numbers(tmp_path: Path) -> None:
    lines = JSONL.splitlines()
    lines[1] = '{"prompt_tokens": 150, "completion_tokens": -3}'
    lines.insert(3, "this is not json")
    lines += ['{"input_tokens": 7}', '{"input_tokens": 7, "output_tokens": 2.5}', "[1, 2]"]
    lines += ['{"input_tokens": 1, "output_tokens": 1, "timestamp": "yesterday"}'] * 12
    path = write(tmp_path, "bad.jsonl", "\n".join(lines) + "\n")
    result = run("workload", str(path), *EDGES, "--rate", "2")
    assert result.returncode == 0, result.stderr
    warnings = result.stderr.splitlines()
    assert warnings[:5] == [
        f"warning: {path}:2: completion_tokens: must be a non-negative integer, got -3",
        f"warning: {path}:4: not valid JSON: Expecting value: line 1 column 1 (char 0)",
        f"warning: {path}:8: no output_tokens or completion_tokens field",
        f"warning: {path}:9: output_tokens: must be a non-negative integer, got 2.5",
        f"warning: {path}:10: must be a JSON object, got list",
    ]
    assert warnings[5].startswith(f"warning: {path}:11: timestamp: must be epoch seconds or RFC")
    assert len([w for w in warnings if w.startswith(f"warning: {path}:")]) == 10  # the first 10
    assert "warning: 17 of 21 lines are not readable requests and were left out" in result.stderr
    assert "(the first 10 listed)" in result.stderr
    assert fragment(result)["workload"] == {"distribution": [[2, 0], [1, 1]], "totalRate": 2}


def test_a_line_too_long_to_be_a_record_is_a_bad_line_read_past(tmp_path: Path) -> None:
    lines = JSONL.splitlines()
    huge = "x" * (workload.MAX_LINE_BYTES + 5)  # no newline within the limit
    path = write(tmp_path, "long.jsonl", "\n".join([lines[0], huge, *lines[1:]]) + "\n")
    result = run("workload", str(path), *EDGES, "--rate", "2")
    assert result.returncode == 0, result.stderr
    assert f"warning: {path}:2: not UTF-8 text, or longer than 16 MiB" in result.stderr
    assert "warning: 1 of " in result.stderr  # that line alone
    complete = run("workload", str(write(tmp_path, "ok.jsonl", JSONL)), *EDGES, "--rate", "2")
    assert fragment(result)["workload"] == fragment(complete)["workload"]


def test_csv_malformed_rows(tmp_path: Path) -> None:
    text = CSV.replace("150,50,llama", "150,fifty,llama") + "2024-05-01T12:00:11Z,5\n"
    path = write(tmp_path, "bad.csv", text)
    result = run("workload", str(path), *EDGES)
    assert result.returncode == 0, result.stderr
    assert f"warning: {path}:3: completion_tokens: must be a non-negative integer" in result.stderr
    assert f"warning: {path}:7: has 2 fields, the header has 4" in result.stderr
    assert "warning: 2 of 6 lines are not readable requests" in result.stderr


def test_csv_without_token_columns_is_invalid(tmp_path: Path) -> None:
    result = run("workload", str(write(tmp_path, "x.csv", "a,b\n1,2\n")), *EDGES)
    assert result.returncode == 2
    assert result.stderr == (
        f"error: {tmp_path}/x.csv: line 1: a CSV header must name the token columns "
        "(input_tokens/prompt_tokens and output_tokens/completion_tokens), got ['a', 'b']\n"
    )


def test_requests_outside_the_edges_are_counted_and_left_out(tmp_path: Path) -> None:
    text = JSONL + '{"input_tokens": 5000, "output_tokens": 5, "timestamp": 1005}\n'
    text += '{"input_tokens": 5, "output_tokens": 0, "timestamp": 1005}\n'
    result = run("workload", str(write(tmp_path, "r.jsonl", text)), *EDGES)
    data = fragment(result)
    # 7 requests over 10 s: 0.6 req/s, of which 5/7 fall inside the edges
    assert data["workload"] == {
        "distribution": [[2, 0], [2, 1]],
        "totalRate": pytest.approx(0.6 * 5 / 7),
    }
    assert (
        "warning: 2 requests outside the edges left out: 1 by input (edges 1..1000, largest 5000), "
        "1 by output (edges 1..1000, largest 500)"
    ) in result.stderr


def test_rate_needs_timestamps_or_the_option(tmp_path: Path) -> None:
    path = write(tmp_path, "r.jsonl", '{"input_tokens": 5, "output_tokens": 5}\n' * 3)
    result = run("workload", str(path), *EDGES)
    assert result.returncode == 2
    assert result.stderr == (
        "error: a total rate is needed: the requests have no timestamp; give it with --rate (req/s)\n"
    )
    assert fragment(run("workload", str(path), *EDGES, "--rate", "3.5"))["workload"] == {
        "distribution": [[3, 0], [0, 0]],
        "totalRate": 3.5,
    }
    partly = write(tmp_path, "p.jsonl", JSONL + '{"input_tokens": 5, "output_tokens": 5}\n')
    result = run("workload", str(partly), *EDGES)
    assert result.returncode == 2
    assert "1 of the 6 requests have no timestamp" in result.stderr


def test_invalid_inputs_exit_2(tmp_path: Path) -> None:
    missing = run("workload", str(tmp_path / "nope.jsonl"), *EDGES)
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: ")
    assert "cannot read" in missing.stderr
    empty = run("workload", str(write(tmp_path, "e.jsonl", "\n\n")), *EDGES)
    assert (empty.returncode, empty.stderr) == (
        2,
        f"error: {tmp_path}/e.jsonl: holds no requests\n",
    )
    junk = run("workload", str(write(tmp_path, "j.jsonl", "{}\n")), *EDGES)
    assert junk.returncode == 2
    assert "none of its 1 lines is a readable request" in junk.stderr
    bad_edges = run("workload", str(write(tmp_path, "r.jsonl", JSONL)), "--input-edges", "5,3")
    assert bad_edges.returncode == 2
    assert "strictly increasing" in bad_edges.stderr


def test_quantile_edges(tmp_path: Path) -> None:
    assert workload.quantile_edges(Counter(range(1, 101)), 4) == [1, 26, 51, 76, 101]
    assert workload.quantile_edges({10: 1, 150: 2, 99999: 1}, 2) == [1, 151, 100000]
    assert workload.quantile_edges({5: 100}, 4) == [1, 6]  # ties merge
    assert workload.quantile_edges({0: 3, 7: 1}, 3) == [1, 8]  # 0 tokens lie below every bucket
    lines = [
        json.dumps({"input_tokens": i, "output_tokens": 101 - i, "timestamp": i})
        for i in range(1, 101)
    ]
    data = fragment(
        run("workload", str(write(tmp_path, "q.jsonl", "\n".join(lines))), "--buckets", "4")
    )
    assert data["buckets"] == {
        "inputTokens": [1, 26, 51, 76, 101],
        "outputTokens": [1, 26, 51, 76, 101],
    }
    assert data["workload"] == {
        "distribution": [[0, 0, 0, 25], [0, 0, 25, 0], [0, 25, 0, 0], [25, 0, 0, 0]],
        "totalRate": 1.0,  # 100 requests, one a second: 99 gaps over 99 s
    }
    # given edges on one axis, quantiles on the other
    data = fragment(
        run("workload", str(tmp_path / "q.jsonl"), "--buckets", "2", "--input-edges", "1,1000")
    )
    assert data["buckets"] == {"inputTokens": [1, 1000], "outputTokens": [1, 51, 101]}


def test_timestamps_parse() -> None:
    assert workload.parse_timestamp("2024-05-01T12:00:00.5Z") == 1714564800.5
    assert workload.parse_timestamp("2024-05-01T14:00:00+02:00") == 1714564800.0
    assert workload.parse_timestamp("1714564800") == 1714564800.0
    with pytest.raises(ValueError, match="needs an offset"):
        workload.parse_timestamp("2024-05-01T12:00:00")


def test_a_million_lines_in_bounded_memory(tmp_path: Path) -> None:
    """Two passes (quantile edges) over a million-line log; peak RSS of the command < 200 MiB."""
    path = tmp_path / "big.jsonl"
    rng = random.Random(7)
    with path.open("w", encoding="utf-8") as f:
        for k in range(0, 1_000_000, 1000):
            f.write(
                "".join(
                    f'{{"input_tokens": {int(rng.lognormvariate(6, 1.2)) + 1}, '
                    f'"output_tokens": {int(rng.lognormvariate(5, 1)) + 1}, '
                    f'"timestamp": {1.7e9 + (k + n) * 0.01:.2f}}}\n'
                    for n in range(1000)
                )
            )
    probe = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stderr.write(r.stderr)\n"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.stdout.write(r.stdout)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, MELANGE, "workload", str(path), "--buckets", "8"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    status, _, output = result.stdout.partition("\n")
    code, peak_kib = map(int, status.split())
    assert code == 0, result.stderr
    assert peak_kib * 1024 < 200 * 2**20, f"peak RSS {peak_kib} KiB"
    data = yaml.safe_load(output)
    assert sum(map(sum, data["workload"]["distribution"])) == 1_000_000
    assert len(data["buckets"]["inputTokens"]) == 9
    assert data["workload"]["totalRate"] == pytest.approx(100.0, rel=1e-4)
    # nothing but the note that quantile edges fit no profile
    assert result.stderr.splitlines() == [
        "warning: these quantile edges fit no shipped or imported profile (a profile serves only "
        "the bucket edges it was made for); to solve with one, take its edges with --edges-from "
        f"PROFILE, e.g. --edges-from {profiles.list_profiles()[0].name}"
    ]
