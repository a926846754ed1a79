"""`melange run --log-format json` against a real API server: every line on stderr is one JSON
object of the documented shape (docs/cli.md#logs), written once, the operator's, Kopf's and the
libraries' messages alike."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.controlplane.harness import ControlPlane

from .kube import Kube, eventually
from .operator_process import MELANGE, _free_port, terminate
from .test_operator import make_pools, manifest, wait_ready
from .test_startup import assert_status

pytestmark = pytest.mark.e2e

REQUIRED = ["time", "level", "logger", "message"]
OPTIONAL = ["exception", "stack", "object"]
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def parse(stderr: str) -> list[dict[str, Any]]:
    """Each line as JSON, checked against the documented shape (keys and their order)."""
    lines = []
    for text in stderr.splitlines():
        line = json.loads(text)  # every line is one JSON object
        assert isinstance(line, dict), text
        keys = list(line)
        assert keys[:4] == REQUIRED, text
        assert keys[4:] == [key for key in OPTIONAL if key in line], text
        assert TIME.fullmatch(line["time"]), text
        dt.datetime.fromisoformat(line["time"])
        assert line["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}, text
        assert isinstance(line["logger"], str), text
        assert line["logger"], text
        assert isinstance(line["message"], str), text
        lines.append(line)
    return lines


@pytest.mark.parametrize("verbose", [False, True], ids=["default", "verbose"])
def test_json_logs_against_the_api_server(
    control_plane: ControlPlane, kube: Kube, namespace: str, tmp_path: Path, verbose: bool
) -> None:
    port = _free_port()
    ready = f"http://127.0.0.1:{port}/readyz"
    stderr_path, stdout_path = tmp_path / "stderr.log", tmp_path / "stdout.log"
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    with stderr_path.open("wb") as stderr, stdout_path.open("wb") as stdout:
        process = subprocess.Popen(
            [
                MELANGE,
                "run",
                "-n",
                namespace,
                "--no-leader-elect",
                "--kubeconfig",
                str(control_plane.kubeconfig_path),
                "--metrics-port",
                "0",
                "--liveness",
                f"http://127.0.0.1:{port}/healthz",
                "--log-format",
                "json",
                *(["-v"] if verbose else []),
            ],
            env=env,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        eventually(lambda: assert_status(process, ready, 200))
        make_pools(kube, namespace, replicas=5)
        kube.create(manifest("chat"), namespace)
        wait_ready(kube, "chat", namespace)
        key = f"[{namespace}/chat] Reconciled"
        eventually(lambda: key in stderr_path.read_text())
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        terminate(process)
        print(f"--- operator stderr (tail) ---\n{stderr_path.read_text()[-8000:]}")

    assert stdout_path.read_text() == ""
    lines = parse(stderr_path.read_text())
    loggers = {line["logger"] for line in lines}
    reconciled = [line for line in lines if line["message"].startswith(key)]
    assert reconciled[0]["level"] == "INFO"
    assert reconciled[0]["logger"].startswith("melange.")
    # Kopf's stop on SIGTERM, in JSON too, once: one handler writes every line.
    stop = [line for line in lines if "SIGTERM" in line["message"]]
    assert [line["logger"] for line in stop] == ["kopf._core.reactor.running"], stop
    assert "exception" not in stop[0]
    # Kopf's messages about the allocation name it, as `object` (without its empty parts).
    about = [line for line in lines if line.get("object", {}).get("name") == "chat"]
    assert about, loggers
    assert about[0]["logger"].startswith("kopf.")
    assert about[0]["object"]["kind"] == "MelangeAllocation"
    assert about[0]["object"]["namespace"] == namespace
    assert set(about[0]["object"]) <= {"apiVersion", "kind", "namespace", "name", "uid"}
    assert None not in about[0]["object"].values()
    # --verbose: DEBUG lines too, and the libraries' (through the same handler)
    debug = [line for line in lines if line["level"] == "DEBUG"]
    assert bool(debug) == verbose
    if verbose:
        assert any(name.startswith("urllib3.") for name in loggers), loggers
    # Nothing written twice: a second handler would repeat every line of a logger.
    repeated = Counter(json.dumps(line, sort_keys=True) for line in lines)
    twice = {
        logger
        for logger in loggers
        if all(
            repeated[json.dumps(line, sort_keys=True)] > 1
            for line in lines
            if line["logger"] == logger
        )
    }
    assert not twice, twice
