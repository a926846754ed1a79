"""`melange run` as a separate process, as a user starts it, for e2e tests and benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tests.controlplane.harness import ControlPlane

from .kube import eventually


def terminate(process: subprocess.Popen[bytes] | None, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class LoggedProcess:
    """A process started by a test, its output in `log_path`."""

    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def stop(self) -> None:
        terminate(self.process)
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_healthy(process: subprocess.Popen[bytes], url: str, log: Callable[[], str]) -> None:
    """Poll the liveness endpoint until it answers 200; fail at once if the process exits."""

    def alive() -> None:
        assert process.poll() is None, f"operator exited:\n{log()}"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                assert response.status == 200
        except OSError as exc:
            raise AssertionError(str(exc)) from None

    eventually(alive, timeout=60)


RESYNC_SECONDS = 3  # the tests' --resync-seconds, unless they pass their own arguments
MELANGE = shutil.which("melange", path=str(Path(sys.executable).parent)) or "melange"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OperatorProcess(LoggedProcess):
    """`melange run` as a user starts it, watching one namespace, with its log kept for failures."""

    def __init__(
        self,
        control_plane: ControlPlane,
        namespace: str,
        log_dir: Path,
        identity: str = "melange-test",
        extra_args: tuple[str, ...] = ("--resync-seconds", str(RESYNC_SECONDS)),
    ) -> None:
        self.control_plane = control_plane
        self.namespace = namespace
        self.identity = identity
        self.extra_args = extra_args
        self.user_agent = f"melange-operator/{identity}"
        self.log_path = log_dir / f"operator-{identity}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.metrics_url = ""
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        port, metrics_port = _free_port(), _free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.starts += 1
        with self.log_path.open("a") as marker:
            marker.write(f"\n=== start {self.starts} ===\n")
        log = self.log_path.open("ab")  # the child's; closed in stop()
        self._log = log
        self.process = subprocess.Popen(
            [
                MELANGE,
                "run",
                "-n",
                self.namespace,
                "-v",
                "--kubeconfig",
                str(self.control_plane.kubeconfig_path),
                "--liveness",
                f"http://127.0.0.1:{port}/healthz",
                "--metrics-port",
                str(metrics_port),
                "--metrics-address",
                "127.0.0.1",
                # the Lease in the test's namespace: tests do not wait on each other's
                "--lease-namespace",
                self.namespace,
                "--identity",
                self.identity,
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if k != "KUBECONFIG"},
        )

        wait_healthy(self.process, f"http://127.0.0.1:{port}/healthz", self.log)

    def writes(self) -> list[dict[str, Any]]:
        """Every write this operator made, from the API server's audit log (by user agent)."""
        return [
            e for e in self.control_plane.audit_events() if e.get("userAgent") == self.user_agent
        ]

    def kill(self) -> None:
        """SIGKILL: no clean-up, no Lease release, as a node failure would."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.stop()

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            return str(response.read().decode())

    def rss_bytes(self) -> int:
        """Resident memory of the operator process, from /proc."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def log(self, since_start: int = 1) -> str:
        """The log written since the given start (1 = all of it)."""
        return super().log().split(f"=== start {since_start} ===", 1)[-1]
