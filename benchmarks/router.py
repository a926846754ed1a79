"""What `melange route` costs: requests per second and time to first byte through the proxy,
against a direct connection to the same upstream, measured in the same run.

    python benchmarks/router.py [--seconds 3] [--streams 50,200,500]

The upstream is a trivial aiohttp server in its own process (no engine: it answers at once), so
the numbers are the proxy's own cost, not a GPU's. Streamed answers are 8 server-sent events 1 ms
apart, as an engine's tokens; unstreamed ones a 300-byte JSON body. The router is `melange route`
as a user runs it, in its own process, over a one-type table; this process is the client: a
closed loop of N concurrent requests for `--seconds` per cell. All three share the machine, so
on few cores the client and the upstream compete with the router: read the ratios, not the
absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from aiohttp import ClientSession, TCPConnector, web

REPO = Path(__file__).parents[1]
MELANGE = shutil.which("melange", path=str(Path(sys.executable).parent)) or "melange"
EVENTS = 8
BODY = json.dumps(
    {
        "id": "cmpl-0",
        "object": "text_completion",
        "model": "bench",
        "choices": [{"index": 0, "text": " tok" * 32, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 32, "total_tokens": 42},
    }
).encode()
EVENT = b'data: {"choices": [{"index": 0, "text": " tok", "finish_reason": null}]}\n\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_upstream(port: int) -> None:
    """The trivial upstream: streams EVENTS events 1 ms apart, or a JSON body at once."""

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.Response(body=BODY, content_type="application/json")
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for _ in range(EVENTS):
            await out.write(EVENT)
            await asyncio.sleep(0.001)
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "bench"}]})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=1024)


def wait_up(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(url)


async def load(url: str, streams: int, seconds: float, stream: bool) -> tuple[float, list[float]]:
    """Requests per second and every request's time to first byte, with `streams` in flight."""
    body = {"model": "bench", "prompt": "hello world", "max_tokens": EVENTS, "stream": stream}
    ttfb: list[float] = []
    done = 0
    async with ClientSession(connector=TCPConnector(limit=0)) as session:
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                started = time.monotonic()
                async with session.post(f"{url}/v1/completions", json=body) as answer:
                    first = True
                    async for _ in answer.content.iter_any():
                        if first:
                            ttfb.append(time.monotonic() - started)
                            first = False
                    assert answer.status == 200, answer.status
                done += 1

        began = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(streams)))
        elapsed = time.monotonic() - began
    return done / elapsed, ttfb


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return (
        ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--streams", default="50,200,500", help="concurrency levels")
    parser.add_argument("--upstream-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream_server:
        serve_upstream(args.upstream_server)
        return 0

    levels = [int(v) for v in args.streams.split(",")]
    up_port, router_port = free_port(), free_port()
    upstream_url, router_url = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{router_port}"
    with tempfile.TemporaryDirectory() as workdir:
        table = Path(workdir) / "table.json"
        table.write_text(
            json.dumps(
                {
                    "schemaVersion": 1,
                    "buckets": {"inputTokens": [1, 1_000_000], "outputTokens": [1, 1_000_000]},
                    "gpus": ["X"],
                    "byInput": [[1.0]],
                    "byBucket": [[[1.0]]],
                }
            )
        )
        upstream = subprocess.Popen(
            [sys.executable, __file__, f"--upstream-server={up_port}"], cwd=REPO
        )
        router = subprocess.Popen(
            [
                MELANGE,
                "route",
                f"--table={table}",
                f"--upstream=X={upstream_url}",
                "--host=127.0.0.1",
                f"--port={router_port}",
            ],
            cwd=REPO,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_up(f"{upstream_url}/v1/models", upstream)
            wait_up(f"{router_url}/healthz", router)
            asyncio.run(load(router_url, 20, 0.5, True))  # warm both up
            header = (
                f"{'mode':<7} {'streams':>7} {'direct rps':>10} {'proxy rps':>9} {'ratio':>6} "
                f"{'direct ttfb p50/p99 ms':>22} {'proxy ttfb p50/p99 ms':>21} "
                f"{'added p50/p99 ms':>16}"
            )
            print(header)
            for stream in (True, False):
                for streams in levels:
                    rps_d, ttfb_d = asyncio.run(load(upstream_url, streams, args.seconds, stream))
                    rps_p, ttfb_p = asyncio.run(load(router_url, streams, args.seconds, stream))
                    d50, d99 = percentile(ttfb_d, 0.5) * 1e3, percentile(ttfb_d, 0.99) * 1e3
                    p50, p99 = percentile(ttfb_p, 0.5) * 1e3, percentile(ttfb_p, 0.99) * 1e3
                    print(
                        f"{'stream' if stream else 'json':<7} {streams:>7} {rps_d:>10.0f} "
                        f"{rps_p:>9.0f} {rps_p / rps_d:>6.2f} "
                        f"{f'{d50:.1f}/{d99:.1f}':>22} {f'{p50:.1f}/{p99:.1f}':>21} "
                        f"{f'{p50 - d50:+.1f}/{p99 - d99:+.1f}':>16}",
                        flush=True,
                    )
        finally:
            for process in (router, upstream):
                process.terminate()
                process.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
