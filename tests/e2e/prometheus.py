"""A real Prometheus server and a vLLM-like load emitter, for the rate-source tests and benchmarks.

`PrometheusServer` runs Debian's `prometheus` binary on loopback with a generated configuration
(scrape interval 1 s, TSDB in a temporary directory) and can be stopped, started, paused (SIGSTOP:
it still accepts connections but never answers) and resumed.

`LoadEmitter` runs this module as a process: a `prometheus_client` exposition of vLLM's metrics
(`vllm:request_success_total` and the prompt/generation token histograms) whose request rate the
test sets over HTTP (`PUT /rate`). The counters grow linearly at exactly that rate, computed at
scrape time. `--format negotiate` answers as prometheus_client does (Prometheus 2.42 asks for
OpenMetrics and stores `vllm_...`); `--format text` always answers in the text format, so the
server stores `vllm:...` as a newer Prometheus would.

    python -m tests.e2e.prometheus --port 9400 --model llama --rate 34 [--format text]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

from tests.e2e.operator_process import LoggedProcess

REPO = Path(__file__).parents[2]
SCRAPE_INTERVAL_SECONDS = 1
MODEL = "llama-3.1-8b"
# Finished requests split by reason, and token-count buckets (vLLM's 1-2-5 series): fractions.
FINISHED = (("stop", 0.9), ("length", 0.1))
# vLLM's bounds for these histograms are 1-2-5 steps up to the model's context length.
PROMPT_BUCKETS = (
    (10, 0.05),
    (20, 0.1),
    (50, 0.3),
    (100, 0.5),
    (200, 0.7),
    (500, 0.9),
    (1000, 1.0),
    (2000, 1.0),
    (5000, 1.0),
    (10000, 1.0),
)
GENERATION_BUCKETS = (
    (10, 0.1),
    (20, 0.2),
    (50, 0.4),
    (100, 0.6),
    (200, 0.8),
    (500, 0.95),
    (1000, 1.0),
    (2000, 1.0),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if found is None:
        raise FileNotFoundError(
            "no prometheus binary: install Debian's package (apt-get install prometheus); "
            "scripts/test.sh does"
        )
    return found


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def _wait(probe: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = probe()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(0.1)


class PrometheusServer(LoggedProcess):
    def __init__(
        self,
        workdir: Path,
        targets: Sequence[str],
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.local_url = f"http://127.0.0.1:{self.port}"  # what this harness uses without TLS
        self.tls = tls
        self.log_path = workdir / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.config_path = workdir / "prometheus.yml"
        targets_yaml = ", ".join(json.dumps(t) for t in targets)
        self.config_path.write_text(
            f"global: {{scrape_interval: {SCRAPE_INTERVAL_SECONDS}s, "
            f"scrape_timeout: {SCRAPE_INTERVAL_SECONDS}s, evaluation_interval: 1s}}\n"
            "scrape_configs:\n"
            "- job_name: vllm\n"
            f"  static_configs: [{{targets: [{targets_yaml}]}}]\n"
        )

    def start(self) -> None:
        argv = [
            prometheus_binary(),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            "--storage.tsdb.retention.time=1h",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        if self.tls:
            web_config = self.workdir / "web.yml"
            cert, key = self.tls
            web_config.write_text(f"tls_server_config: {{cert_file: {cert}, key_file: {key}}}\n")
            argv.append(f"--web.config.file={web_config}")
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)
        if self.tls is None:
            _wait(lambda: self._alive() and _get(f"{self.url}/-/ready")[0] == 200, "ready")
        else:
            _wait(lambda: self._alive() and _port_open(self.port), "listening")

    def _alive(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited:\n{self.log()}")
        return True

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()
        super().stop()

    def pause(self) -> None:
        """Freeze it: connections are still accepted by the kernel, but nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def query(self, promql: str) -> dict[str, Any]:
        """The raw API answer (success or error) for an instant query."""
        params = urllib.parse.urlencode({"query": promql})
        _, body = _get(f"{self.local_url}/api/v1/query?{params}", timeout=5)
        return dict(json.loads(body))

    def value(self, promql: str) -> float | None:
        answer = self.query(promql)
        result = answer.get("data", {}).get("result") or []
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def wait_for_value(self, promql: str, timeout: float = 30.0) -> float:
        return float(_wait(lambda: self.value(promql), f"a value for {promql}", timeout))


class GaugeExporter:
    """An exporter in this process serving the gauges the test sets, in Prometheus' text format
    over real HTTP: `values` maps a series (`name{label="value"}`) to its value; a series not in
    it is not exposed (so Prometheus marks it stale)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                lines = [f"{series} {value}" for series, value in sorted(exporter.values.items())]
                body = ("\n".join(lines) + "\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class LoadEmitter:
    """The emitter process; `set_rate` changes the request rate it reports."""

    def __init__(
        self, workdir: Path, rate: float, model: str = MODEL, fmt: str = "negotiate"
    ) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        self.model = model
        self.format = fmt
        self.log_path = workdir / f"emitter-{self.port}.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.e2e.prometheus",
                "--port",
                str(self.port),
                "--model",
                model,
                "--rate",
                str(rate),
                "--format",
                fmt,
            ],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        _wait(lambda: self.process.poll() is None and _get(f"{self.url}/rate")[0] == 200, "emitter")

    @property
    def metric_name(self) -> str:
        """How the Prometheus under test stores the request counter scraped from this emitter."""
        return (
            "vllm:request_success_total" if self.format == "text" else "vllm_request_success_total"
        )

    def set_rate(self, rate: float) -> None:
        request = urllib.request.Request(f"{self.url}/rate", data=str(rate).encode(), method="PUT")
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 204

    def set_shapes(self, **shapes: Sequence[tuple[float, float]]) -> None:
        """New cumulative fractions for `prompt` and/or `generation` (same le bounds as before)."""
        body = json.dumps({k: [list(b) for b in v] for k, v in shapes.items()}).encode()
        request = urllib.request.Request(f"{self.url}/shape", data=body, method="PUT")
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 204

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def self_signed_certificate(directory: Path) -> tuple[Path, Path, str]:
    """A self-signed CA certificate for 127.0.0.1: (cert file, key file, PEM text)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "prometheus")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, pem.decode()


# -- the emitter process ----------------------------------------------------------------------


Shape = tuple[tuple[float, float], ...]  # (le, cumulative fraction) per finite bucket


class _Load:
    """Counters that grow at `rate` per second (the token-histogram buckets at their share of it),
    exactly, whenever they are read; a new rate or shape applies from then on."""

    def __init__(self, rate: float) -> None:
        self._lock = threading.Lock()
        self._bases: dict[str, float] = {}
        self._since = time.monotonic()
        self.rate = rate
        self.shapes: dict[str, Shape] = {"prompt": PROMPT_BUCKETS, "generation": GENERATION_BUCKETS}

    def _slopes(self) -> dict[str, float]:
        slopes = {"requests": self.rate}
        for name, shape in self.shapes.items():
            slopes.update({f"{name}:{le:g}": self.rate * share for le, share in shape})
        return slopes

    def _advance(self) -> None:
        now = time.monotonic()
        for key, slope in self._slopes().items():
            self._bases[key] = self._bases.get(key, 0.0) + slope * (now - self._since)
        self._since = now

    def set(self, rate: float) -> None:
        with self._lock:
            self._advance()
            self.rate = rate

    def set_shapes(self, shapes: dict[str, Shape]) -> None:
        """New cumulative fractions per histogram; the bounds must stay the same."""
        with self._lock:
            for name, shape in shapes.items():
                if [le for le, _ in shape] != [le for le, _ in self.shapes[name]]:
                    raise ValueError(f"{name}: the le bounds must stay the same")
            self._advance()
            self.shapes = {**self.shapes, **shapes}

    def totals(self) -> dict[str, float]:
        with self._lock:
            elapsed = time.monotonic() - self._since
            return {k: self._bases.get(k, 0.0) + s * elapsed for k, s in self._slopes().items()}

    def total(self) -> float:
        return self.totals()["requests"]


def _collector(load: _Load, model: str) -> Any:
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    class VllmCollector:
        def collect(self) -> Iterator[Any]:
            totals = load.totals()
            total = totals["requests"]
            finished = CounterMetricFamily(
                "vllm:request_success",
                "Count of successfully processed requests.",
                labels=["model_name", "engine", "finished_reason"],
            )
            for reason, share in FINISHED:
                finished.add_metric([model, "0", reason], total * share)
            yield finished
            for name, shape, mean in (
                ("prompt", load.shapes["prompt"], 150.0),
                ("generation", load.shapes["generation"], 120.0),
            ):
                histogram = HistogramMetricFamily(
                    f"vllm:request_{name}_tokens",
                    "Number of tokens per request.",
                    labels=["model_name", "engine"],
                )
                histogram.add_metric(
                    [model, "0"],
                    buckets=[(str(float(le)), totals[f"{name}:{le:g}"]) for le, _ in shape]
                    + [("+Inf", total)],
                    sum_value=total * mean,
                )
                yield histogram

    return VllmCollector()


def _serve(port: int, model: str, rate: float, fmt: str) -> None:
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest

    load = _Load(rate)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_collector(load, model))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/rate":
                self._reply(200, "text/plain", f"{load.rate}\n".encode())
                return
            if fmt == "text":
                self._reply(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                return
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, content_type, encoder(registry))

        def do_PUT(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if self.path == "/shape":
                try:
                    raw = json.loads(self.rfile.read(length))
                    load.set_shapes(
                        {k: tuple((float(le), float(f)) for le, f in v) for k, v in raw.items()}
                    )
                except (ValueError, KeyError, TypeError) as exc:
                    self._reply(400, "text/plain", f"{exc}\n".encode())
                    return
                self._reply(204, "text/plain", b"")
                return
            try:
                value = float(self.rfile.read(length))
            except ValueError:
                self._reply(400, "text/plain", b"the body must be a number\n")
                return
            load.set(value)
            self._reply(204, "text/plain", b"")

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="vLLM-like metrics at a controlled request rate")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--format", choices=["negotiate", "text"], default="negotiate")
    args = parser.parse_args(argv)
    _serve(args.port, args.model, args.rate, args.format)


if __name__ == "__main__":
    main()
