"""What `melange route` adds to the time to first token, and how many requests it carries, against
a direct connection to the same upstream, measured in the same run.

    python benchmarks/router.py [--seconds 5] [--streams 50,200,500] [--variants ...]
                                [--baseline-ref GIT_REF]

The upstream is an engine-like aiohttp server in its own process: a streamed answer's first token
at once, then `--tokens` tokens `--token-ms` apart (one tick for every running request at once,
as a continuously batching engine), one server-sent event each; an unstreamed answer as one
JSON body after its token times. A closed loop of N concurrent requests (the *load*) goes
through the router; meanwhile *probes* (one-token answers), 100 a second, alternate between the
router and the upstream directly, and their time to first byte is what the table reports: both
kinds of probe share the machine with the same load at the same moment, so their difference is
the router's own cost, CPU contention taken out. The same load sent straight to the upstream
(`direct` rows) shows what that contention alone does to a direct probe. The load generator and
the upstream run on uvloop when it is installed.

On a machine with few cores the load generator, the upstream and the router compete for them: the
`direct` rows and the `direct probe` columns say how much of a proxied request's time is that
competition rather than the router. Variants: the router on asyncio's event loop or uvloop's,
with 1 or more worker processes; `--baseline-ref` adds the router of another commit (its
`operator/` extracted with `git archive`), run as `melange route` of that commit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

REPO = Path(__file__).parents[1]
MELANGE = shutil.which("melange", path=str(Path(sys.executable).parent)) or "melange"
PROBES_PER_SECOND = 100.0
EVENT = b'data: {"choices": [{"index": 0, "text": " tok", "finish_reason": null}]}\n\n'
VARIANTS = {
    "asyncio x1": ("--event-loop=asyncio", "--workers=1"),
    "uvloop x1": ("--event-loop=uvloop", "--workers=1"),
    "uvloop x2": ("--event-loop=uvloop", "--workers=2"),
    "asyncio x2": ("--event-loop=asyncio", "--workers=2"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_upstream(port: int, tokens: int, token_seconds: float) -> None:
    """The engine-like upstream. Streamed: the first token at once, then one tick every
    `token_seconds` gives every running request its next one (continuous batching). Unstreamed:
    the JSON body after `max_tokens` token times."""
    answers = {
        n: json.dumps(
            {
                "id": "cmpl-0",
                "object": "text_completion",
                "model": "bench",
                "choices": [{"index": 0, "text": " tok" * n, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n},
            }
        ).encode()
        for n in range(1, tokens + 1)
    }
    waiting: list[asyncio.Queue[int]] = []

    async def ticks(_: web.Application) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                await asyncio.sleep(token_seconds)
                for queue in waiting:
                    queue.put_nowait(1)

        task = asyncio.create_task(loop())
        yield
        task.cancel()

    async def completions(request: web.Request) -> web.StreamResponse:
        asked = await request.json()
        count = min(tokens, max(int(asked.get("max_tokens") or tokens), 1))
        if not asked.get("stream"):
            await asyncio.sleep(count * token_seconds)  # the whole answer, then its body
            return web.Response(body=answers[count], content_type="application/json")
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(EVENT)  # the first token at once (the prefill is not what is measured)
        queue: asyncio.Queue[int] = asyncio.Queue()
        waiting.append(queue)
        try:
            for _ in range(count - 1):
                await queue.get()
                await out.write(EVENT)
        finally:
            waiting.remove(queue)
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "bench"}]})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.cleanup_ctx.append(ticks)
    loop = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(
        app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=4096, loop=loop
    )


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


@dataclass
class Cell:
    requests: int = 0
    seconds: float = 0.0
    probe_direct: list[float] = field(default_factory=list)
    probe_proxy: list[float] = field(default_factory=list)


async def measure(
    load_url: str, direct_url: str, proxy_url: str, streams: int, seconds: float, stream: bool
) -> Cell:
    """`streams` requests in flight to `load_url` for `seconds`, and probes to both others."""
    body = {"model": "bench", "prompt": "hello world", "max_tokens": 1_000_000, "stream": stream}
    short = {**body, "max_tokens": 1}  # a probe's answer: one token
    cell = Cell()
    timeout = ClientTimeout(total=60)

    async def one(session: ClientSession, url: str, ask: dict[str, Any]) -> float:
        started = time.monotonic()
        first = 0.0
        async with session.post(f"{url}/v1/completions", json=ask) as answer:
            async for _ in answer.content.iter_any():
                if not first:
                    first = time.monotonic() - started
            assert answer.status == 200, answer.status
        return first

    async with (
        ClientSession(connector=TCPConnector(limit=0), timeout=timeout) as load,
        ClientSession(connector=TCPConnector(limit=0), timeout=timeout) as probes,
    ):
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < deadline:
                await one(load, load_url, body)
                cell.requests += 1

        async def probe(url: str, into: list[float]) -> None:
            into.append(await one(probes, url, short))

        async def prober() -> None:
            await asyncio.sleep(0.3)  # the load ramps up first
            tasks = []
            k = 0
            while time.monotonic() < deadline:
                to_proxy = proxy_url and k % 2 == 0
                target = (
                    (proxy_url, cell.probe_proxy) if to_proxy else (direct_url, cell.probe_direct)
                )
                tasks.append(asyncio.create_task(probe(*target)))
                k += 1
                await asyncio.sleep(1 / PROBES_PER_SECOND)
            await asyncio.gather(*tasks)

        began = time.monotonic()
        await asyncio.gather(prober(), *(worker() for _ in range(streams)))
        cell.seconds = time.monotonic() - began
    return cell


T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """On uvloop when it is installed, so that the load generator takes less of the cores."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coroutine)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return (
        ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")
    )


@contextlib.contextmanager
def router(argv: list[str], env: dict[str, str] | None) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [*argv, "--host=127.0.0.1", f"--port={port}"],
        cwd=REPO,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_up(f"{url}/healthz", process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def baseline(ref: str, workdir: Path) -> tuple[list[str], dict[str, str]]:
    """`melange route` as of commit `ref`: its operator/ tree, first on the import path."""
    tree = workdir / "baseline"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "archive", ref, "operator"], cwd=REPO, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    env = {**os.environ, "PYTHONPATH": str(tree / "operator")}
    return [sys.executable, "-c", "from melange.cli import main; main()"], env


def row(mode: str, streams: int, name: str, cell: Cell) -> str:
    d50, d99 = (percentile(cell.probe_direct, q) * 1e3 for q in (0.5, 0.99))
    p50, p99 = (percentile(cell.probe_proxy, q) * 1e3 for q in (0.5, 0.99))
    added = f"{p50 - d50:+.1f}/{p99 - d99:+.1f}" if cell.probe_proxy else "-"
    proxied = f"{p50:.1f}/{p99:.1f}" if cell.probe_proxy else "-"
    return (
        f"{mode:<7} {streams:>7} {name:<16} {cell.requests / cell.seconds:>8.0f} "
        f"{f'{d50:.1f}/{d99:.1f}':>19} {proxied:>18} {added:>16}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--streams", default="50,200,500", help="concurrency levels of the load")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per answer")
    parser.add_argument("--token-ms", type=float, default=40.0, help="time per token")
    parser.add_argument("--modes", default="stream,json")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of: {', '.join(VARIANTS)}")
    parser.add_argument("--baseline-ref", help="also measure the router of this git commit")
    parser.add_argument("--upstream-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream_server:
        serve_upstream(args.upstream_server, args.tokens, args.token_ms / 1e3)
        return 0

    levels = [int(v) for v in args.streams.split(",")]
    up_port = free_port()
    upstream_url = f"http://127.0.0.1:{up_port}"
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
        route_args = ["route", f"--table={table}", f"--upstream=X={upstream_url}"]
        routers: dict[str, tuple[list[str], dict[str, str] | None]] = {}
        if args.baseline_ref:
            command, base_env = baseline(args.baseline_ref, Path(workdir))
            routers[f"{args.baseline_ref} x1"] = ([*command, *route_args], base_env)
        for name in args.variants.split(","):
            routers[name] = ([MELANGE, *route_args, *VARIANTS[name]], None)
        upstream = subprocess.Popen(
            [
                sys.executable,
                __file__,
                f"--upstream-server={up_port}",
                f"--tokens={args.tokens}",
                f"--token-ms={args.token_ms}",
            ],
            cwd=REPO,
        )
        try:
            wait_up(f"{upstream_url}/v1/models", upstream)
            print(
                f"# {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} before the run; "
                f"{args.tokens} tokens {args.token_ms:g} ms apart per answer; "
                f"{args.seconds:g} s per cell; probes {PROBES_PER_SECOND:g}/s"
            )
            print(
                f"{'mode':<7} {'streams':>7} {'load through':<16} {'load rps':>8} "
                f"{'direct probe p50/p99':>19} {'proxy probe p50/p99':>18} {'added p50/p99':>16}"
            )
            for mode in args.modes.split(","):
                stream = mode == "stream"
                for streams in levels:
                    cell = run(
                        measure(upstream_url, upstream_url, "", streams, args.seconds, stream)
                    )
                    print(row(mode, streams, "direct", cell), flush=True)
                    for name, (argv, env) in routers.items():
                        with router(argv, env) as url:
                            run(measure(url, upstream_url, url, 20, 0.5, stream))  # warm
                            cell = run(
                                measure(url, upstream_url, url, streams, args.seconds, stream)
                            )
                        print(row(mode, streams, name, cell), flush=True)
        finally:
            upstream.terminate()
            upstream.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
