"""`melange route`: an OpenAI-compatible proxy that sends each request to the GPU type a plan
sized for its size (docs/routing.md#melange-route).

Per request: estimate the input length (`melange.route.request`), draw a type from the routing
table (`plan.routing.pick`), and within the type take the upstream with the fewest requests in
flight. A type that cannot take the request before any byte went to the client (no live
upstream, a connection error on each, or an answer 429/503) is left for the others, through
`plan.routing.restricted`, once per type; with none left the client gets a 503. The answer's
status, headers and body bytes pass through unchanged as they arrive; a client that goes away
closes the upstream connection, which is how an engine learns to stop generating.

The table is a file re-read when it changes (a ConfigMap volume), polled once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from melange.plan import routing as route
from melange.route import request as rq

log = logging.getLogger("melange.route")

# No `_created` series (process-wide in prometheus_client): they double every counter's series.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated

BUSY_STATUSES = frozenset({429, 503})  # an engine's "not now": another type may take it
DOWN_SECONDS = 2.0  # an upstream that refused a connection is skipped this long
MAX_BODY_BYTES = 64 * 1024 * 1024  # a request body (long prompts as JSON)
MODELS_TIMEOUT = 5.0
# Headers that describe one connection, not the message (RFC 9110 7.6.1), and those aiohttp sets.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# vLLM's bucket bounds for these histograms (vllm/engine/metrics.py), so dashboards carry over.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


class Metrics:
    """The router's series, in a registry of its own (several routers may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "melange_route_requests_total",
            "Requests answered, by the GPU type that answered (none: no type could), the input "
            "bucket they were placed in and the output bucket of the tokens streamed back "
            "(unknown when none were counted).",
            ["gpu", "input_bucket", "output_bucket"],
            registry=r,
        )
        self.responses = Counter(
            "melange_route_responses_total",
            "Answers by GPU type and HTTP status code (the router's own 503s under gpu=none).",
            ["gpu", "code"],
            registry=r,
        )
        self.spills = Counter(
            "melange_route_spills_total",
            "Requests a GPU type could not take and that went on to another type, by reason: "
            "down (no live upstream), connect (connection failed), busy (429 or 503).",
            ["gpu", "reason"],
            registry=r,
        )
        self.in_flight = Gauge(
            "melange_route_requests_in_flight",
            "Requests sent to an upstream and not yet finished.",
            ["gpu", "upstream"],
            registry=r,
        )
        self.ttft = Histogram(
            "melange_route_time_to_first_token_seconds",
            "From a streamed request's arrival to the first byte of its answer's body.",
            ["gpu"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "melange_route_time_per_output_token_seconds",
            "A streamed answer's time from its first to its last byte over its tokens after the "
            "first (one server-sent event per token).",
            ["gpu"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "melange_route_e2e_request_latency_seconds",
            "From a request's arrival to the end of its answer.",
            ["gpu"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.success = Counter(
            "vllm:request_success",
            "Requests answered 2xx to their end, by the model the client asked for: the shape of "
            "vLLM's counter, so that a rate query written for vLLM can read the router instead.",
            ["model_name"],
            registry=r,
        )
        self.reloads = Counter(
            "melange_route_table_reloads_total",
            "Times the routing table was read again after a change, by result (ok, error).",
            ["result"],
            registry=r,
        )
        self.table_loaded = Gauge(
            "melange_route_table_loaded_timestamp_seconds",
            "When the routing table in use was read (Unix time).",
            registry=r,
        )


@dataclass(eq=False)
class Upstream:
    """One engine's root URL (as `melange profile URL` takes it) and what the router knows of it."""

    gpu: str
    url: str
    in_flight: int = 0
    sent: int = 0  # requests ever sent: breaks ties between idle upstreams in turn
    down_until: float = 0.0

    def live(self, now: float) -> bool:
        return now >= self.down_until


@dataclass
class Settings:
    """How requests are placed; fixed for the router's life."""

    count_text: rq.TextCounter = field(default_factory=rq.char_estimate)
    trust_max_tokens: bool = False
    seed: int | None = None
    connect_timeout: float = 5.0
    poll_seconds: float = 1.0


TableLoader = Callable[[], route.RouteTable]


def file_loader(path: str | os.PathLike[str]) -> TableLoader:
    """Reads the JSON form of a table (plan.routing.to_dict) from `path`; raises ValueError."""

    def load() -> route.RouteTable:
        try:
            with open(path, "rb") as file:
                data = json.loads(file.read())
        except OSError as exc:
            raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ValueError(f"{path}: not JSON: {exc}") from None
        try:
            return route.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    return load


def _stamp(path: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten or a ConfigMap's symlink is swapped."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino, st.st_size


def _error(status: int, message: str, kind: str) -> web.Response:
    """An OpenAI-style error body, as vLLM writes them."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


class Router:
    """The proxy's state: the table, the upstreams per type, the metrics; `app()` serves it."""

    def __init__(
        self,
        table: route.RouteTable,
        upstreams: Mapping[str, Sequence[str]],
        settings: Settings | None = None,
        watch: tuple[str | os.PathLike[str], TableLoader] | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.metrics = Metrics()
        self.upstreams = {
            gpu: [Upstream(gpu, url.rstrip("/")) for url in urls] for gpu, urls in upstreams.items()
        }
        self.random = random.Random(self.settings.seed)
        self.watch = watch
        self.session: aiohttp.ClientSession | None = None
        self._restricted: dict[frozenset[str], route.RouteTable] = {}
        self.table = table
        self._install(table)
        self._stamp = _stamp(watch[0]) if watch else None

    # -- the table ------------------------------------------------------------------------------

    def _install(self, table: route.RouteTable) -> None:
        """Use `table` from now on; say which of its types have no upstream, and the reverse."""
        missing = [g for g in table.gpus if not self.upstreams.get(g)]
        extra = [g for g in self.upstreams if g not in table.gpus]
        if missing:
            log.warning("no --upstream for GPU type(s) %s: their shares go to the others", missing)
        if extra:
            log.warning("--upstream type(s) %s are not in the routing table: unused", extra)
        self.table = table
        self._restricted = {}
        self.metrics.table_loaded.set(time.time())

    def table_for(self, table: route.RouteTable, remaining: frozenset[str]) -> route.RouteTable:
        """`table` restricted to the `remaining` types (cached for the table in use: the set
        changes rarely)."""
        if table is not self.table:  # replaced while this request was being placed
            return route.restricted(table, remaining)
        cached = self._restricted.get(remaining)
        if cached is None:
            cached = route.restricted(table, remaining)
            if len(self._restricted) > 64:
                self._restricted.clear()
            self._restricted[remaining] = cached
        return cached

    async def _poll(self) -> None:
        """Re-read the table when its file changes; a bad file keeps the table in use."""
        assert self.watch is not None
        path, load = self.watch
        while True:
            await asyncio.sleep(self.settings.poll_seconds)
            stamp = _stamp(path)
            if stamp is None or stamp == self._stamp:
                continue
            self._stamp = stamp
            try:
                table = await asyncio.to_thread(load)
            except Exception as exc:  # whatever the file holds, routing goes on with the old table
                self.metrics.reloads.labels("error").inc()
                log.warning("routing table not reloaded, the previous one stays: %s", exc)
                continue
            self._install(table)
            self.metrics.reloads.labels("ok").inc()
            log.info("routing table reloaded from %s (GPU types %s)", path, list(table.gpus))

    # -- the server -----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/healthz", self.healthz)
        app.cleanup_ctx.append(self._lifetime)
        return app

    async def _lifetime(self, _: web.Application) -> AsyncIterator[None]:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=10),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.settings.connect_timeout, sock_read=None
            ),
            auto_decompress=False,  # bytes pass through as the engine encoded them
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )
        poller = asyncio.create_task(self._poll()) if self.watch else None
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            await self.session.close()

    async def healthz(self, _: web.Request) -> web.Response:
        now = time.monotonic()
        live = {gpu: sum(u.live(now) for u in ups) for gpu, ups in self.upstreams.items() if ups}
        return web.json_response({"status": "ok", "gpus": list(self.table.gpus), "live": live})

    async def metrics_page(self, _: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _ordered(self) -> Iterable[Upstream]:
        """Every upstream, the table's types first in its order."""
        for gpu in (*self.table.gpus, *(g for g in self.upstreams if g not in self.table.gpus)):
            yield from self.upstreams.get(gpu, ())

    async def models(self, request: web.Request) -> web.StreamResponse:
        """The first live upstream's model list (every type serves the same model)."""
        assert self.session is not None
        now = time.monotonic()
        for upstream in self._ordered():
            if not upstream.live(now):
                continue
            try:
                async with self.session.get(
                    upstream.url + "/v1/models",
                    headers=_forwarded(request.headers),
                    timeout=aiohttp.ClientTimeout(total=MODELS_TIMEOUT),
                ) as answer:
                    if answer.status != 200:
                        continue
                    body = await answer.read()
                    return web.Response(
                        body=body, status=200, headers=_passed(answer.headers, keep_length=False)
                    )
            except (aiohttp.ClientError, TimeoutError):
                continue
        return _error(503, "no upstream answered /v1/models", "ServiceUnavailableError")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, chat=True)

    # -- one request ----------------------------------------------------------------------------

    def _live_types(self, now: float) -> set[str]:
        return {g for g, ups in self.upstreams.items() if any(u.live(now) for u in ups)}

    async def _proxy(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrived = time.monotonic()
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(400, "the body is not JSON", "BadRequestError")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object", "BadRequestError")
        settings = self.settings
        table = self.table
        tokens_in = rq.input_tokens(body, chat, settings.count_text)
        tokens_out = rq.output_tokens(body, chat) if settings.trust_max_tokens else None
        input_label = rq.bucket_label(
            table.input_edges, route.bucket_index(table.input_edges, tokens_in)
        )
        placed = _Placed(raw, body, chat, _forwarded(request.headers), arrived, input_label)
        tried: set[str] = set()
        while True:
            now = time.monotonic()
            remaining = frozenset(g for g in table.gpus if g not in tried) & self._live_types(now)
            try:
                gpu = route.pick(
                    self.table_for(table, remaining) if remaining else _nowhere(table),
                    tokens_in,
                    tokens_out,
                    self.random.random(),
                )
            except ValueError:
                self.metrics.requests.labels("none", input_label, "unknown").inc()
                self.metrics.responses.labels("none", "503").inc()
                return _error(
                    503,
                    "no GPU type can take this request now (every one tried was down or busy)",
                    "ServiceUnavailableError",
                )
            tried.add(gpu)
            outcome = await self._try_type(request, gpu, placed)
            if isinstance(outcome, web.StreamResponse):
                return outcome
            self.metrics.spills.labels(gpu, outcome).inc()

    async def _try_type(
        self,
        request: web.Request,
        gpu: str,
        placed: _Placed,
    ) -> web.StreamResponse | str:
        """The answer of one of `gpu`'s upstreams, or why the type could not take the request."""
        assert self.session is not None
        now = time.monotonic()
        candidates = sorted(
            (u for u in self.upstreams.get(gpu, ()) if u.live(now)),
            key=lambda u: (u.in_flight, u.sent),
        )
        if not candidates:
            return "down"
        reason = "connect"
        for upstream in candidates:
            upstream.sent += 1
            upstream.in_flight += 1
            gauge = self.metrics.in_flight.labels(gpu, upstream.url)
            gauge.inc()
            try:
                try:
                    answer = await self.session.post(
                        upstream.url + request.path_qs, data=placed.raw, headers=placed.headers
                    )
                except (aiohttp.ClientConnectorError, TimeoutError) as exc:
                    upstream.down_until = time.monotonic() + DOWN_SECONDS
                    log.warning(
                        "%s (%s): %s; skipped for %gs", upstream.url, gpu, exc, DOWN_SECONDS
                    )
                    continue
                except aiohttp.ClientConnectionError as exc:
                    # e.g. a kept-alive connection the engine had closed: no answer, yet not down
                    log.warning("%s (%s): %s", upstream.url, gpu, exc)
                    continue
                try:
                    if answer.status in BUSY_STATUSES:
                        reason = "busy"
                        break
                    return await self._relay(request, answer, gpu, placed)
                finally:
                    answer.close()  # a relay cut short drops the connection: the engine stops
            finally:
                upstream.in_flight -= 1
                gauge.dec()
        return reason

    async def _relay(
        self,
        request: web.Request,
        answer: aiohttp.ClientResponse,
        gpu: str,
        placed: _Placed,
    ) -> web.StreamResponse:
        """Pass `answer` through as it arrives, and record its timing."""
        out = web.StreamResponse(status=answer.status, reason=answer.reason)
        out.headers.extend(_passed(answer.headers, keep_length=True))
        await out.prepare(request)
        streamed = answer.content_type == "text/event-stream"
        events = rq.EventCounter()
        first = last = 0.0
        non_stream = bytearray() if not streamed and answer.status < 300 else None
        async for chunk in answer.content.iter_any():
            last = time.monotonic()
            if not first:
                first = last
            if streamed:
                events.feed(chunk)
            elif non_stream is not None and len(non_stream) < MAX_BODY_BYTES:
                non_stream += chunk
            await out.write(chunk)
        await out.write_eof()
        ended = time.monotonic()
        m, body, chat = self.metrics, placed.body, placed.chat
        generated = (
            max(events.events - rq.stream_overhead(body, chat), 0)
            if streamed
            else _completion_tokens(non_stream)
        )
        table = self.table
        output_label = (
            rq.bucket_label(table.output_edges, route.bucket_index(table.output_edges, generated))
            if generated
            else "unknown"
        )
        m.requests.labels(gpu, placed.input_label, output_label).inc()
        m.responses.labels(gpu, str(answer.status)).inc()
        m.e2e.labels(gpu).observe(ended - placed.arrived)
        if 200 <= answer.status < 300:
            model = body.get("model")
            m.success.labels(model if isinstance(model, str) else "").inc()
            if streamed and first:
                m.ttft.labels(gpu).observe(first - placed.arrived)
                if generated > 1:
                    m.tpot.labels(gpu).observe((last - first) / (generated - 1))
        return out


@dataclass(frozen=True)
class _Placed:
    """A request as read once, for every upstream it may be tried on."""

    raw: bytes
    body: Mapping[str, Any]
    chat: bool
    headers: dict[str, str]
    arrived: float
    input_label: str


def _nowhere(table: route.RouteTable) -> route.RouteTable:
    """A table that routes nothing (every type tried or down): `pick` raises on it."""
    return route.restricted(table, ())


def _forwarded(headers: Mapping[str, str]) -> dict[str, str]:
    """The client's headers for the upstream: all but those of the connection."""
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


def _passed(headers: Mapping[str, str], keep_length: bool) -> list[tuple[str, str]]:
    """The upstream's headers for the client: all but those of the connection (Content-Length
    kept when the body passes unchanged, so a sized answer stays sized)."""
    drop = HOP_BY_HOP - {"content-length"} if keep_length else HOP_BY_HOP
    return [(k, v) for k, v in headers.items() if k.lower() not in drop]


def _completion_tokens(body: bytearray | None) -> int:
    """`usage.completion_tokens` of a non-streamed answer, 0 when it has none."""
    if not body:
        return 0
    try:
        usage = json.loads(body).get("usage") or {}
        value = usage.get("completion_tokens", 0)
    except (ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) and value > 0 else 0


async def serve(router: Router, host: str, port: int) -> None:
    """Serve until SIGTERM or cancelled; a client that disconnects cancels its handler (and so
    closes its upstream request at once, not at the next chunk)."""
    runner = web.AppRunner(router.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        log.info("routing on http://%s:%d", host, port)
        await stop.wait()
    finally:
        await runner.cleanup()
