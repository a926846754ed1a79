"""`melange route` as a user runs it, in front of simulated GPUs (tests/e2e/gpusim.py).

Two GPU types, A and B, with two simulators each; the router is a `melange route` process over a
hand-written table. Checked: each type gets its table share of each input bucket, a type whose
servers stop passes its requests to the other, streams pass through as they are made, a client
that goes away frees the engine, a rewritten table file routes without a restart, and worker
processes sharing the port sum their metrics. No Kubernetes control plane is needed (the table in
a ConfigMap and the engines from EndpointSlices: test_route_kube.py).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from .kube import eventually
from .operator_process import MELANGE, terminate
from .prometheus import REPO, _get, _wait, free_port
from .test_profile import MODEL, Simulator, start_simulator

pytestmark = pytest.mark.e2e

FAST = ("--base=0.001", "--per-seq=0.0001", "--per-context-token=0")  # ~1 ms per token
INPUT_EDGES, OUTPUT_EDGES = [1, 32, 128, 512], [1, 16, 64]
WORDS = (10, 60, 250)  # a prompt per input bucket: the router counts words, gpusim words + 1
BY_INPUT = [[0.8, 0.2], [0.3, 0.7], [0.0, 1.0]]


def table(by_input: Sequence[Sequence[float]], gpus: Sequence[str] = ("A", "B")) -> dict[str, Any]:
    rows, cols = len(INPUT_EDGES) - 1, len(OUTPUT_EDGES) - 1
    return {
        "schemaVersion": 1,
        "buckets": {"inputTokens": INPUT_EDGES, "outputTokens": OUTPUT_EDGES},
        "gpus": list(gpus),
        "byInput": [list(r) for r in by_input],
        "byBucket": [[list(by_input[i])] * cols for i in range(rows)],
    }


def write_table(path: Path, document: dict[str, Any]) -> None:
    """As the kubelet updates a ConfigMap volume: a new file swapped in at once."""
    staging = path.with_suffix(".new")
    staging.write_text(json.dumps(document))
    os.replace(staging, path)


def prompt(words: int) -> str:
    return " ".join(["w"] * words)


def row_of_prompt_tokens(tokens: int) -> int:
    """The input bucket of a request as gpusim logs it (its words + 1)."""
    return next(i for i, w in enumerate(WORDS) if w + 1 == tokens)


@dataclass
class Router:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by its line's name and labels."""
        status, body = _get(f"{self.url}/metrics")
        assert status == 200
        samples = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def sum(self, pattern: str) -> float:
        return sum(v for k, v in self.metrics().items() if re.fullmatch(pattern, k))

    def wait_for(self, pattern: str, value: float, timeout: float = 10) -> None:
        def probe() -> None:
            assert self.sum(pattern) == value, (pattern, self.sum(pattern))

        eventually(probe, timeout=timeout)


def tokenizer_args(workdir: Path) -> list[str]:
    """A word-level tokenizer.json when `tokenizers` is installed, else the estimate calibrated to
    these prompts (a word and a space: 2 characters per token)."""
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers
    except ImportError:
        return ["--chars-per-token=2"]
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "w": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = workdir / "tokenizer.json"
    tokenizer.save(str(path))
    return [f"--tokenizer={path}"]


def start_router(
    workdir: Path, table_path: Path, upstreams: dict[str, list[str]], *extra: str
) -> Router:
    return launch_router(
        workdir,
        f"--table={table_path}",
        *(f"--upstream={gpu}={url}" for gpu, urls in upstreams.items() for url in urls),
        *extra,
    )


def launch_router(workdir: Path, *args: str, env: dict[str, str] | None = None) -> Router:
    """`melange route ARGS` on a free port, once /healthz answers (the table may come later).
    Without a drain on SIGTERM unless ARGS set one (test_route_shutdown.py), so that a test's
    router stops as soon as its requests are done."""
    port = free_port()
    log_path = workdir / f"route-{port}.log"
    argv = [
        MELANGE,
        "route",
        "--drain-seconds=0",
        *args,
        "--host=127.0.0.1",
        f"--port={port}",
        "--seed=7",
        "--connect-timeout=1",
        *tokenizer_args(workdir),
    ]
    with log_path.open("ab") as output:
        process = subprocess.Popen(argv, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, log_path.read_text()
        return _get(f"{url}/healthz")[0] == 200

    _wait(healthy, "melange route")
    return Router(url, process, log_path)


@dataclass
class Fleet:
    sims: dict[str, list[Simulator]]
    workdir: Path

    def upstreams(self) -> dict[str, list[str]]:
        return {gpu: [s.url for s in sims] for gpu, sims in self.sims.items()}

    def counts(self) -> dict[str, int]:
        """Requests each simulator has logged, by its URL."""
        return {s.url: len(s.requests()) for sims in self.sims.values() for s in sims}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("route")
    sims: dict[str, list[Simulator]] = {"A": [], "B": []}
    try:
        for gpu in ("A", "B"):
            for _ in range(2):
                sims[gpu].append(start_simulator(workdir, *FAST))
        yield Fleet(sims, workdir)
    finally:
        for group in sims.values():
            for sim in group:
                terminate(sim.process)


async def _complete(
    session: aiohttp.ClientSession, url: str, words: int, max_tokens: int = 2
) -> int:
    body = {"model": MODEL, "prompt": prompt(words), "max_tokens": max_tokens, "stream": True}
    async with session.post(f"{url}/v1/completions", json=body) as answer:
        await answer.read()
        return answer.status


def send(url: str, rows: Sequence[int], concurrency: int = 32) -> list[int]:
    """One streamed request per entry of `rows` (its input bucket), `concurrency` at a time."""

    async def run() -> list[int]:
        limit = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession() as session:

            async def one(row: int) -> int:
                async with limit:
                    return await _complete(session, url, WORDS[row])

            return await asyncio.gather(*(one(r) for r in rows))

    return asyncio.run(run())


def test_each_type_gets_its_share_of_each_bucket(fleet: Fleet) -> None:
    table_path = fleet.workdir / "shares.json"
    write_table(table_path, table(BY_INPUT))
    router = start_router(fleet.workdir, table_path, fleet.upstreams())
    try:
        before = {s.url: len(s.requests()) for g in fleet.sims.values() for s in g}
        per_row = (240, 240, 80)
        rows = [i for i, n in enumerate(per_row) for _ in range(n)]
        assert set(send(router.url, rows)) == {200}
        got: dict[str, Counter[int]] = {"A": Counter(), "B": Counter()}
        for gpu, sims in fleet.sims.items():
            for sim in sims:
                for record in sim.requests()[before[sim.url] :]:
                    got[gpu][row_of_prompt_tokens(record["promptTokens"])] += 1
            # both upstreams of a type share its requests
            assert all(len(s.requests()) > before[s.url] for s in sims), gpu
        for i, n in enumerate(per_row):
            assert got["A"][i] + got["B"][i] == n
            share, expected = got["A"][i] / n, BY_INPUT[i][0]
            sigma = math.sqrt(expected * (1 - expected) / n)
            assert abs(share - expected) <= 4 * sigma + 1e-9, (i, share, expected)
        # the router's own counts agree with the engines'
        for gpu in ("A", "B"):
            routed = router.sum(rf'melange_route_requests_total\{{gpu="{gpu}",.*\}}')
            assert routed == sum(got[gpu].values())
        assert router.sum(r"vllm:request_success_total\{.*\}") == len(rows)
        assert router.sum(r"melange_route_time_to_first_token_seconds_count\{.*\}") == len(rows)
    finally:
        terminate(router.process)


def test_a_type_whose_servers_stop_spills_to_the_other(fleet: Fleet) -> None:
    own_a = [start_simulator(fleet.workdir, *FAST) for _ in range(2)]
    table_path = fleet.workdir / "spill.json"
    write_table(table_path, table(BY_INPUT))
    upstreams = {"A": [s.url for s in own_a], "B": fleet.upstreams()["B"]}
    router = start_router(fleet.workdir, table_path, upstreams)
    dead = None
    try:
        assert set(send(router.url, [0] * 40)) == {200}
        assert router.sum(r'melange_route_requests_total\{gpu="A",.*\}') > 0
        for sim in own_a:
            terminate(sim.process)
        served_by_a = router.sum(r'melange_route_requests_total\{gpu="A",.*\}')
        assert set(send(router.url, [0] * 60)) == {200}
        assert router.sum(r'melange_route_requests_total\{gpu="A",.*\}') == served_by_a
        assert router.sum(r'melange_route_spills_total\{gpu="A",.*\}') > 0

        # with no type left, a 503 with an OpenAI-style error
        nowhere = {"A": [f"http://127.0.0.1:{free_port()}"], "B": [own_a[0].url]}
        dead = start_router(fleet.workdir, table_path, nowhere)
        status, body = _get_post(f"{dead.url}/v1/completions", prompt(WORDS[0]))
        assert status == 503
        assert json.loads(body)["error"]["type"] == "ServiceUnavailableError"
    finally:
        terminate(router.process)
        if dead is not None:
            terminate(dead.process)


def _get_post(url: str, text: str) -> tuple[int, bytes]:
    async def run() -> tuple[int, bytes]:
        body = {"model": MODEL, "prompt": text, "max_tokens": 2, "stream": True}
        async with aiohttp.ClientSession() as session, session.post(url, json=body) as answer:
            return answer.status, await answer.read()

    return asyncio.run(run())


def test_a_changed_table_file_routes_without_a_restart(fleet: Fleet) -> None:
    table_path = fleet.workdir / "reload.json"
    write_table(table_path, table(BY_INPUT))
    router = start_router(fleet.workdir, table_path, fleet.upstreams())
    try:
        assert set(send(router.url, [0] * 40)) == {200}
        a_before = router.sum(r'melange_route_requests_total\{gpu="A",.*\}')
        assert a_before > 0
        write_table(table_path, table([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]))
        router.wait_for(r'melange_route_table_reloads_total\{result="ok"\}', 1)
        assert set(send(router.url, [0] * 40)) == {200}
        assert router.sum(r'melange_route_requests_total\{gpu="A",.*\}') == a_before

        # a broken file keeps the table in use
        table_path.write_text("{not json")
        router.wait_for(r'melange_route_table_reloads_total\{result="error"\}', 1)
        assert set(send(router.url, [0] * 10)) == {200}
        assert router.sum(r'melange_route_requests_total\{gpu="A",.*\}') == a_before
    finally:
        terminate(router.process)


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[tuple[Simulator, Router]]:
    """One engine of one sequence at a time (5 ms a token) behind its own router."""
    sim = start_simulator(tmp_path, "--base=0.005", "--per-seq=0", "--max-num-seqs=1")
    table_path = tmp_path / "slow.json"
    write_table(table_path, table([[1.0]] * 3, gpus=("C",)))
    router = start_router(tmp_path, table_path, {"C": [sim.url]})
    try:
        yield sim, router
    finally:
        terminate(router.process)
        terminate(sim.process)


def test_streams_pass_through_as_they_are_made(slow: tuple[Simulator, Router]) -> None:
    _, router = slow

    async def run() -> tuple[list[tuple[float, bytes]], str]:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 100, "stream": True}
        reads = []
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{router.url}/v1/completions", json=body) as answer,
        ):
            assert answer.status == 200
            async for chunk in answer.content.iter_any():
                reads.append((time.monotonic(), chunk))
            return reads, answer.headers["Content-Type"]

    reads, content_type = asyncio.run(run())
    assert content_type.startswith("text/event-stream")
    text = b"".join(chunk for _, chunk in reads).decode()
    events = [e for e in text.split("\n\n") if e]
    assert len(events) == 101
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    # 100 tokens take 0.5 s: the first arrived long before the last
    assert len(reads) > 10
    assert reads[-1][0] - reads[0][0] > 0.3


def test_a_client_that_goes_away_frees_the_engine(slow: tuple[Simulator, Router]) -> None:
    sim, router = slow

    async def abandon() -> None:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 100_000, "stream": True}
        async with aiohttp.ClientSession() as session:
            answer = await session.post(f"{router.url}/v1/completions", json=body)
            for _ in range(3):
                await answer.content.readuntil(b"\n\n")
            answer.close()  # drops the connection mid-stream

    asyncio.run(abandon())
    router.wait_for(r"melange_route_requests_in_flight\{.*\}", 0)

    # the engine runs one sequence at a time: the abandoned one (500 s) must be gone
    async def direct() -> float:
        started = time.monotonic()
        async with aiohttp.ClientSession() as session:
            assert await _complete(session, sim.url, 1, max_tokens=3) == 200
        return time.monotonic() - started

    assert asyncio.run(asyncio.wait_for(direct(), timeout=10)) < 5


class Echo:
    """Upstreams in a thread of this process: each answers with its name, the path and the body
    it got (or 429 when busy), so a test sees where a request went and what arrived there."""

    def __init__(self, names: Sequence[str], busy: Sequence[str] = ()) -> None:
        self.ports = {name: free_port() for name in names}
        self.busy = set(busy)
        self.got: list[tuple[str, str, dict[str, Any]]] = []
        self.loop = asyncio.new_event_loop()
        self.runners: list[web.AppRunner] = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    async def _start(self) -> None:
        for name, port in self.ports.items():

            async def answer(request: web.Request, name: str = name) -> web.Response:
                body = await request.json()
                self.got.append((name, request.path, body))
                if name in self.busy:
                    return web.json_response({"error": {"message": "full"}}, status=429)
                if body.get("model") != MODEL:
                    return web.json_response({"error": {"message": "no model"}}, status=404)
                usage = {"completion_tokens": body.get("max_completion_tokens", 1)}
                return web.json_response({"served_by": name, "usage": usage})

            app = web.Application()
            app.router.add_post("/v1/chat/completions", answer)
            app.router.add_post("/v1/completions", answer)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            self.runners.append(runner)

    def close(self) -> None:
        async def stop() -> None:
            for runner in self.runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def test_chat_by_both_lengths_and_busy_types(tmp_path: Path) -> None:
    """--trust-max-tokens routes chat by byBucket; a 429 spills; other answers pass unchanged."""
    echo = Echo(["A", "B", "C"], busy=["C"])
    document = table(BY_INPUT, gpus=("A", "B", "C"))
    document["byInput"] = [[0.0, 0.0, 1.0]] * 3  # everything to the busy type
    document["byBucket"] = [[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]] * 3  # short: A; long: C, busy
    table_path = tmp_path / "chat.json"
    write_table(table_path, document)
    upstreams = {name: [echo.url(name)] for name in ("A", "B", "C")}
    router = start_router(tmp_path, table_path, upstreams, "--trust-max-tokens")

    async def chat(max_tokens: int | None, model: str = MODEL) -> tuple[int, str, bytes]:
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": [{"type": "text", "text": prompt(60)}]}],
        }
        if max_tokens is not None:
            body["max_completion_tokens"] = max_tokens
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{router.url}/v1/chat/completions", json=body) as answer,
        ):
            return answer.status, answer.headers["Content-Type"], await answer.read()

    try:
        status, content_type, body = asyncio.run(chat(8))  # output bucket 1-16: A
        assert (status, content_type) == (200, "application/json; charset=utf-8")
        assert json.loads(body) == {"served_by": "A", "usage": {"completion_tokens": 8}}
        assert echo.got[-1][:2] == ("A", "/v1/chat/completions")
        # 16-64: C, which answers 429: the request goes on to A or B, whose shares are 0 there
        for _ in range(6):
            status, _, body = asyncio.run(chat(32))
            assert status == 200
            assert json.loads(body)["served_by"] in {"A", "B"}
        assert router.sum(r'melange_route_spills_total\{gpu="C",reason="busy"\}') == 6
        assert router.sum(r'melange_route_requests_total\{gpu="A",input_bucket="32-128",.*\}') >= 1
        # without max_completion_tokens: byInput, all to C, then spilled
        status, _, body = asyncio.run(chat(None))
        assert status == 200
        # an upstream's own error passes through, not spilled
        spills = router.sum(r"melange_route_spills_total\{.*\}")
        status, _, body = asyncio.run(chat(8, model="other"))
        assert status == 404
        assert json.loads(body) == {"error": {"message": "no model"}}
        assert router.sum(r"melange_route_spills_total\{.*\}") == spills
    finally:
        terminate(router.process)
        echo.close()


def test_workers_share_the_port_and_sum_their_metrics(fleet: Fleet) -> None:
    """--workers 2: two processes take the connections; whichever answers /metrics counts both."""
    table_path = fleet.workdir / "workers.json"
    write_table(table_path, table(BY_INPUT))
    router = start_router(fleet.workdir, table_path, fleet.upstreams(), "--workers=2")
    try:
        eventually(
            lambda: _assert_len(
                set(re.findall(r"\(process (\d+)\)", router.log_path.read_text())), 2
            ),
            timeout=20,
        )
        rows = [0] * 150 + [1] * 150
        assert set(send(router.url, rows)) == {200}
        for _ in range(6):  # each scrape is answered by one worker or the other
            assert router.sum(r"melange_route_requests_total\{.*\}") == len(rows)
            assert router.sum(r"melange_route_requests_in_flight\{.*\}") == 0
    finally:
        terminate(router.process)
    assert router.process.returncode == 0


def _assert_len(values: set[str], n: int) -> None:
    assert len(values) == n, values
