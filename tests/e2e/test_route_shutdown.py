"""`melange route` stopping as Kubernetes stops it: SIGTERM while the Service may still send to it.

A real router process in front of a simulated engine (tests/e2e/gpusim.py) that streams a token
every 20 ms. On SIGTERM the router must keep serving for --drain-seconds (/readyz 503 at once, a
new request still answered), then close its port, let the stream in flight end with every byte,
and exit 0; in one process and with --workers 2 (the parent passes the signal on). A second
SIGTERM, or a SIGINT, stops it at once, and --shutdown-timeout bounds the wait. The deadlines are
generous bounds, not performance goals.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from .operator_process import terminate
from .prometheus import _get
from .test_profile import MODEL, Simulator, start_simulator
from .test_route import Router, start_router, table, write_table

pytestmark = pytest.mark.e2e

TOKENS = 400  # 8 s at 20 ms a token: longer than the drain, so it outlives the open port
DRAIN = 2.5


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Simulator]:
    sim = start_simulator(tmp_path, "--base=0.02", "--per-seq=0", "--max-num-seqs=8")
    try:
        yield sim
    finally:
        terminate(sim.process)


def router_for(engine: Simulator, workdir: Path, *extra: str) -> Router:
    table_path = workdir / "table.json"
    write_table(table_path, table([[1.0]] * 3, gpus=("C",)))
    return start_router(workdir, table_path, {"C": [engine.url]}, *extra)


def body(max_tokens: int) -> dict[str, object]:
    return {"model": MODEL, "prompt": "hello", "max_tokens": max_tokens, "stream": True}


def readyz(url: str) -> tuple[int, dict[str, object]]:
    status, raw = _get(f"{url}/readyz")
    return status, json.loads(raw)


def refuses_connections(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


async def until(probe: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll `probe` (in a thread) until it returns true; a deadline only."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(probe):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        await asyncio.sleep(0.05)


def wait_exit(process: subprocess.Popen[bytes], timeout: float, log: Path) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(
            f"router still running after {timeout:g} s:\n{log.read_text()}"
        ) from None


@dataclass
class Drained:
    events: list[str]
    ready_while_streaming: tuple[int, dict[str, object]]
    new_request: tuple[int, str | None, int]  # status, Connection header, events
    streamed_during_drain: bool  # bytes arrived after SIGTERM, before the port closed
    refused_while_streaming: bool


async def drain_scenario(router: Router) -> Drained:
    received = bytearray()
    async with aiohttp.ClientSession() as session:
        stream = await session.post(f"{router.url}/v1/completions", json=body(TOKENS))
        assert stream.status == 200
        received += await stream.content.readuntil(b"\n\n")  # it runs through the router

        async def read_to_the_end() -> None:
            async for chunk in stream.content.iter_any():
                received.extend(chunk)

        reader = asyncio.create_task(read_to_the_end())
        router.process.send_signal(signal.SIGTERM)
        at_sigterm = len(received)

        # /readyz says 503 (every worker's) while the stream goes on
        def draining() -> bool:
            status, answer = readyz(router.url)
            return status == 503 and str(answer.get("reason")).startswith("draining")

        await until(draining, "/readyz 503")
        ready = readyz(router.url)
        assert not reader.done()

        # a request that arrives during the drain is answered, on a connection that then closes
        async with (
            aiohttp.ClientSession() as fresh,
            fresh.post(f"{router.url}/v1/completions", json=body(3)) as answer,
        ):
            text = (await answer.read()).decode()
            new = (answer.status, answer.headers.get("Connection"), text.count("\n\n"))

        # after the drain the port closes while the stream is still in flight
        await until(lambda: refuses_connections(router.url), "the port closed")
        refused = not reader.done()
        streamed = len(received) > at_sigterm

        await reader
        stream.release()
    text = received.decode()
    return Drained([e for e in text.split("\n\n") if e], ready, new, streamed, refused)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_then_ends_the_streams_in_flight(
    engine: Simulator, tmp_path: Path, workers: int
) -> None:
    router = router_for(
        engine,
        tmp_path,
        f"--workers={workers}",
        f"--drain-seconds={DRAIN}",
        "--shutdown-timeout=60",
    )
    try:
        if workers > 1:  # both workers serve, so that both drain

            def both() -> bool:
                return router.log_path.read_text().count("routing on http") == workers

            asyncio.run(until(both, "the workers up"))
        drained = asyncio.run(asyncio.wait_for(drain_scenario(router), timeout=60))
        assert wait_exit(router.process, 30, router.log_path) == 0, router.log_path.read_text()
    finally:
        terminate(router.process)

    status, reason = drained.ready_while_streaming
    assert status == 503, reason
    assert drained.new_request == (200, "close", 4)  # 3 tokens and [DONE]
    assert drained.streamed_during_drain
    assert drained.refused_while_streaming
    # every byte of the stream: each token, the finish reason, [DONE]
    assert len(drained.events) == TOKENS + 1
    assert drained.events[-1] == "data: [DONE]"
    last = json.loads(drained.events[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length"
    log = router.log_path.read_text()
    assert log.count("SIGTERM: draining") == workers
    assert log.count("stopped (process") == workers


async def cut_scenario(router: Router, signals: list[signal.Signals]) -> bytes:
    """A stream without end, the `signals` sent to the router; what the client got until its
    connection closed."""
    received = bytearray()
    async with aiohttp.ClientSession() as session:
        stream = await session.post(f"{router.url}/v1/completions", json=body(100_000))
        assert stream.status == 200
        received += await stream.content.readuntil(b"\n\n")
        for signum in signals:
            router.process.send_signal(signum)
            await asyncio.sleep(0.3)
        try:
            async for chunk in stream.content.iter_any():
                received += chunk
        except aiohttp.ClientPayloadError:
            pass
        stream.release()
    return bytes(received)


@pytest.mark.parametrize(
    ("workers", "signals"),
    [
        (1, [signal.SIGTERM, signal.SIGTERM]),
        (1, [signal.SIGINT]),
        (2, [signal.SIGTERM, signal.SIGTERM]),
        (2, [signal.SIGINT]),
    ],
    ids=["sigterm-twice", "sigint", "workers-sigterm-twice", "workers-sigint"],
)
def test_a_second_sigterm_or_a_sigint_stops_at_once(
    engine: Simulator, tmp_path: Path, workers: int, signals: list[signal.Signals]
) -> None:
    # a drain and a timeout far longer than the deadline below: only stopping at once meets it
    router = router_for(
        engine,
        tmp_path,
        f"--workers={workers}",
        "--drain-seconds=120",
        "--shutdown-timeout=120",
    )
    try:
        if workers > 1:

            def both() -> bool:
                return router.log_path.read_text().count("routing on http") == workers

            asyncio.run(until(both, "the workers up"))
        received = asyncio.run(asyncio.wait_for(cut_scenario(router, signals), timeout=30))
        assert wait_exit(router.process, 15, router.log_path) == 0, router.log_path.read_text()
    finally:
        terminate(router.process)
    assert b"[DONE]" not in received  # cut, not finished
    assert "stopping at once" in router.log_path.read_text()


def test_the_shutdown_timeout_cuts_what_is_left(engine: Simulator, tmp_path: Path) -> None:
    router = router_for(engine, tmp_path, "--drain-seconds=0", "--shutdown-timeout=1")
    try:
        received = asyncio.run(asyncio.wait_for(cut_scenario(router, [signal.SIGTERM]), timeout=30))
        assert wait_exit(router.process, 15, router.log_path) == 0, router.log_path.read_text()
    finally:
        terminate(router.process)
    assert b"[DONE]" not in received
    assert "closed the port; waiting up to 1s for 1 request(s) in flight" in (
        router.log_path.read_text()
    )
