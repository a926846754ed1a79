"""`melange route`: an OpenAI-compatible proxy that sends each request to the GPU type a plan
sized for its size (docs/routing.md#melange-route).

Per request: estimate the input length (`melange.route.request`), draw a type from the routing
table (`plan.routing.pick`), and within the type take the upstream with the fewest requests in
flight. A type that cannot take the request before any byte went to the client (no live
upstream, a connection error on each, or an answer 429/503) is left for the others, through
`plan.routing.restricted`, once per type; with none left the client gets a 503. The answer's
status, headers and body bytes pass through unchanged as they arrive; a client that goes away
closes the upstream connection, which is how an engine learns to stop generating.

Where tables and engines come from: a table file re-read when it changes (polled once a second),
and a `Feed`, which tells the router of new tables and of the servers of the types whose table
names a Service (`melange.route.kube` watches a ConfigMap and EndpointSlices). This module knows
nothing of Kubernetes: the feed calls a thread-safe `Sink`. `run` serves on uvloop when it is
installed, in one process or in several sharing the port (SO_REUSEPORT).

Stopping (`Shutdown`): on SIGTERM /readyz answers 503 at once and the router goes on serving for
`drain_seconds`, the time for load balancers to stop sending to it; then it stops listening and
waits up to `timeout` seconds for the requests in flight (streams included) to end, and exits 0.
A second SIGTERM, or a SIGINT, stops it at once, cutting what is still in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import aiohttp
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from yarl import URL

from melange.plan import routing as route
from melange.route import request as rq

log = logging.getLogger("melange.route")

# No `_created` series (process-wide in prometheus_client): they double every counter's series.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated

BUSY_STATUSES = frozenset({429, 503})  # an engine's "not now": another type may take it
DOWN_SECONDS = 2.0  # an upstream that refused a connection is skipped this long
MAX_BODY_BYTES = 64 * 1024 * 1024  # a request body (long prompts as JSON)
MODELS_TIMEOUT = 5.0
# Idle upstream connections are kept this long: under uvicorn's (vLLM's) 5 s, so an engine never
# closes a connection the moment the router reuses it.
KEEPALIVE_SECONDS = 4.0
# How much longer than drain + timeout the parent of several workers waits for them before it
# kills them: enough for aiohttp's rounding of its timeout up to a whole second and for closing.
WORKERS_MARGIN_SECONDS = 10.0
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

    def __init__(self, shared_dir: str | None = None) -> None:
        """`shared_dir`: the directory of prometheus_client's multiprocess mode, when several
        worker processes serve one port (`run`); /metrics then sums them all."""
        self.shared_dir = shared_dir
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
            multiprocess_mode="livesum",
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
            multiprocess_mode="livemax",
        )

    def page(self) -> bytes:
        if self.shared_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.shared_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


@dataclass(eq=False)
class Upstream:
    """One engine's root URL (as `melange profile URL` takes it) and what the router knows of it."""

    gpu: str
    url: str
    in_flight: int = 0
    sent: int = 0  # requests ever sent: breaks ties between idle upstreams in turn
    down_until: float = 0.0
    gauge: Any = None  # its child of melange_route_requests_in_flight
    targets: dict[str, URL] = field(default_factory=dict)

    def live(self, now: float) -> bool:
        return now >= self.down_until

    def target(self, path_qs: str) -> URL:
        """The URL of `path_qs` here, parsed once (a few paths are ever asked for)."""
        url = self.targets.get(path_qs)
        if url is None:
            if len(self.targets) > 32:
                self.targets.clear()
            url = self.targets[path_qs] = URL(self.url + path_qs)
        return url


@dataclass
class Settings:
    """How requests are placed; fixed for the router's life."""

    count_text: rq.TextCounter = field(default_factory=rq.char_estimate)
    trust_max_tokens: bool = False
    seed: int | None = None
    connect_timeout: float = 5.0
    poll_seconds: float = 1.0


@dataclass(frozen=True)
class Shutdown:
    """How the router stops on SIGTERM (the module's doc; docs/routing.md#melange-route)."""

    drain_seconds: float = 5.0  # serving on, /readyz 503, before the listening socket closes
    timeout: float = 30.0  # then, for the requests in flight to end (0: cut them at once)


TableLoader = Callable[[], route.RouteTable]


class Sink(Protocol):
    """What a `Feed` tells the router; every method may be called from any thread."""

    def table(self, table: route.RouteTable, source: str) -> None:
        """A new table to route by, read from `source` (for the log)."""

    def table_error(self, message: str) -> None:
        """The table's source changed but holds no valid table: the one in use stays."""

    def endpoints(self, gpu: str, upstream: route.Upstream, urls: Sequence[str]) -> None:
        """The ready servers of `gpu`'s Service `upstream` (every one, not a change)."""


class Feed(Protocol):
    """A source of tables and of servers outside this module (`melange.route.kube`)."""

    def start(self, sink: Sink) -> None:
        """Begin telling `sink`; called once the router's event loop runs."""

    def want(self, upstreams: Mapping[str, route.Upstream]) -> None:
        """Discover the servers of these types (all of them: the others are no longer wanted)."""

    def stop(self) -> None:
        """Stop telling; called before the loop ends."""


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


class _LoopSink:
    """A `Sink` for threads: each call runs on the router's event loop."""

    def __init__(self, router: Router, loop: asyncio.AbstractEventLoop) -> None:
        self.router, self.loop = router, loop

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to tell
            self.loop.call_soon_threadsafe(fn, *args)

    def table(self, table: route.RouteTable, source: str) -> None:
        self._call(self.router.offer_table, table, source)

    def table_error(self, message: str) -> None:
        self._call(self.router.reject_table, message)

    def endpoints(self, gpu: str, upstream: route.Upstream, urls: Sequence[str]) -> None:
        self._call(self.router.set_endpoints, gpu, upstream, tuple(urls))


class Router:
    """The proxy's state: the table, the upstreams per type, the metrics; `app()` serves it.

    A type's upstreams are its `--upstream` URLs when it has any, else the ready servers of the
    Service the table names for it, as the feed reports them. `table` is None until one is read.
    """

    def __init__(
        self,
        table: route.RouteTable | None,
        upstreams: Mapping[str, Sequence[str]],
        settings: Settings | None = None,
        watch: tuple[str | os.PathLike[str], TableLoader] | None = None,
        feed: Feed | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.metrics = metrics or Metrics()
        self.static = {gpu: [url.rstrip("/") for url in urls] for gpu, urls in upstreams.items()}
        self.random = random.Random(self.settings.seed)
        self.watch = watch
        self.feed = feed
        self.session: aiohttp.ClientSession | None = None
        self.upstreams: dict[str, list[Upstream]] = {}  # per type, what requests go to
        self._known: dict[tuple[str, str], Upstream] = {}  # by (type, URL): kept across updates
        self._discovered: dict[str, tuple[route.Upstream, tuple[str, ...]]] = {}
        self._wanted: dict[str, route.Upstream] = {}
        self._restricted: dict[frozenset[str], route.RouteTable] = {}
        self._children: dict[tuple[Any, ...], Any] = {}  # metric children by (metric, labels)
        self.table: route.RouteTable | None = None
        self.draining = False  # stopping: /readyz answers 503, answers close their connection
        if table is not None:
            self._install(table)
        else:
            self._rebuild()
        self._stamp = _stamp(watch[0]) if watch else None

    # -- the table and the upstreams ------------------------------------------------------------

    def _install(self, table: route.RouteTable) -> None:
        """Use `table` from now on; say which of its types have no upstream, and the reverse."""
        self.table = table
        self._restricted = {}
        self._wanted = {gpu: up for gpu, up in table.upstreams if gpu not in self.static}
        missing = [g for g in table.gpus if g not in self.static and g not in self._wanted]
        extra = [g for g in self.static if g not in table.gpus]
        overridden = [g for g, _ in table.upstreams if g in self.static]
        if missing:
            log.warning(
                "no upstream for GPU type(s) %s (neither --upstream nor a Service in the table): "
                "their shares go to the others",
                missing,
            )
        if extra:
            log.warning("--upstream type(s) %s are not in the routing table: unused", extra)
        if overridden:
            log.info(
                "--upstream given for %s: the table's Services for them are not used", overridden
            )
        self._rebuild()
        if self.feed is not None and self.session is not None:  # else `_lifetime` tells it
            self.feed.want(self._wanted)
        self.metrics.table_loaded.set(time.time())

    def offer_table(self, table: route.RouteTable, source: str) -> None:
        """A table from the feed (on the loop)."""
        self._install(table)
        self.metrics.reloads.labels("ok").inc()
        log.info("routing table read from %s (GPU types %s)", source, list(table.gpus))

    def reject_table(self, message: str) -> None:
        self.metrics.reloads.labels("error").inc()
        log.warning("routing table not reloaded, the previous one stays: %s", message)

    def set_endpoints(self, gpu: str, upstream: route.Upstream, urls: Sequence[str]) -> None:
        """The ready servers of `gpu`'s Service (on the loop); a report about a Service the
        table no longer names is late, and ignored."""
        if self._wanted.get(gpu) != upstream:
            return
        found = tuple(u.rstrip("/") for u in urls)
        if self._discovered.get(gpu) == (upstream, found):
            return
        self._discovered[gpu] = (upstream, found)
        log.info(
            "GPU type %s: %d ready server(s) behind Service %s/%s%s",
            gpu,
            len(found),
            upstream.namespace or "",
            upstream.service,
            f" ({', '.join(found[:8])}{', ...' if len(found) > 8 else ''})" if found else "",
        )
        self._rebuild()

    def _rebuild(self) -> None:
        """Each type's upstreams from the static URLs and the discovered ones. An upstream that
        stays keeps its object (its requests in flight, its turn, its down time)."""
        pools: dict[str, list[Upstream]] = {}
        for gpu, urls in self.static.items():
            pools[gpu] = [self._upstream(gpu, url) for url in urls]
        for gpu, service in self._wanted.items():
            found = self._discovered.get(gpu)
            ready = found[1] if found is not None and found[0] == service else ()
            pools[gpu] = [self._upstream(gpu, url) for url in ready]
        self.upstreams = pools
        self._with_upstreams = frozenset(gpu for gpu, ups in pools.items() if ups)
        self._down_until = max((u.down_until for ups in pools.values() for u in ups), default=0.0)
        self._restricted = {}
        used = {id(u) for ups in pools.values() for u in ups}
        for key, known in list(self._known.items()):
            if id(known) not in used and known.in_flight == 0:
                del self._known[key]
                with contextlib.suppress(KeyError):
                    self.metrics.in_flight.remove(known.gpu, known.url)

    def _upstream(self, gpu: str, url: str) -> Upstream:
        upstream = self._known.get((gpu, url))
        if upstream is None:
            upstream = Upstream(gpu, url)
            upstream.gauge = self.metrics.in_flight.labels(gpu, url)
            self._known[gpu, url] = upstream
        return upstream

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
                self.reject_table(str(exc))
                continue
            self.offer_table(table, str(path))

    def ready(self) -> bool:
        """A table is loaded and at least one of its types has a live upstream."""
        if self.table is None:
            return False
        now = time.monotonic()
        return any(u.live(now) for g in self.table.gpus for u in self.upstreams.get(g, ()))

    def in_flight(self) -> int:
        """Requests sent to an upstream and not yet finished."""
        return sum(u.in_flight for u in self._known.values())

    # -- the server -----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.cleanup_ctx.append(self._lifetime)
        return app

    async def _lifetime(self, _: web.Application) -> AsyncIterator[None]:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, ttl_dns_cache=10, keepalive_timeout=KEEPALIVE_SECONDS
            ),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.settings.connect_timeout, sock_read=None
            ),
            auto_decompress=False,  # bytes pass through as the engine encoded them
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )
        poller = asyncio.create_task(self._poll()) if self.watch else None
        if self.feed is not None:
            self.feed.start(_LoopSink(self, asyncio.get_running_loop()))
            self.feed.want(self._wanted)
        try:
            yield
        finally:
            if self.feed is not None:
                self.feed.stop()
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            await self.session.close()

    async def healthz(self, _: web.Request) -> web.Response:
        now = time.monotonic()
        live = {gpu: sum(u.live(now) for u in ups) for gpu, ups in self.upstreams.items() if ups}
        gpus = list(self.table.gpus) if self.table is not None else []
        return web.json_response({"status": "ok", "gpus": gpus, "live": live})

    async def readyz(self, _: web.Request) -> web.Response:
        if self.draining:
            return web.json_response(
                {"ready": False, "reason": "draining: the router is stopping"}, status=503
            )
        if self.table is None:
            return web.json_response({"ready": False, "reason": "no routing table yet"}, status=503)
        if not self.ready():
            return web.json_response(
                {"ready": False, "reason": "no GPU type of the table has a live upstream"},
                status=503,
            )
        return web.json_response({"ready": True})

    async def metrics_page(self, _: web.Request) -> web.Response:
        body = self.metrics.page()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _ordered(self) -> Iterable[Upstream]:
        """Every upstream, the table's types first in its order."""
        first = self.table.gpus if self.table is not None else ()
        for gpu in (*first, *(g for g in self.upstreams if g not in first)):
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

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once (prometheus_client's lookup takes a lock)."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            if len(self._children) > 10_000:  # e.g. many model names: bounded, as the series are
                self._children.clear()
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- one request ----------------------------------------------------------------------------

    def _live_types(self, now: float) -> frozenset[str]:
        if now >= self._down_until:  # no upstream is down: every type with one is live
            return self._with_upstreams
        return frozenset(g for g, ups in self.upstreams.items() if any(u.live(now) for u in ups))

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
        if table is None:
            self._child(self.metrics.responses, "none", "503").inc()
            return _error(503, "no routing table yet", "ServiceUnavailableError")
        tokens_in = rq.input_tokens(body, chat, settings.count_text)
        tokens_out = rq.output_tokens(body, chat) if settings.trust_max_tokens else None
        input_label = rq.bucket_label(
            table.input_edges, route.bucket_index(table.input_edges, tokens_in)
        )
        placed = _Placed(raw, body, chat, _forwarded(request.headers), arrived, input_label, table)
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
                self._child(self.metrics.requests, "none", input_label, "unknown").inc()
                self._child(self.metrics.responses, "none", "503").inc()
                return _error(
                    503,
                    "no GPU type can take this request now (every one tried was down or busy)",
                    "ServiceUnavailableError",
                )
            tried.add(gpu)
            outcome = await self._try_type(request, gpu, placed)
            if isinstance(outcome, web.StreamResponse):
                return outcome
            self._child(self.metrics.spills, gpu, outcome).inc()

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
            gauge = upstream.gauge
            gauge.inc()
            try:
                try:
                    answer = await self.session.post(
                        upstream.target(request.path_qs), data=placed.raw, headers=placed.headers
                    )
                except (aiohttp.ClientConnectorError, TimeoutError) as exc:
                    upstream.down_until = time.monotonic() + DOWN_SECONDS
                    self._down_until = max(self._down_until, upstream.down_until)
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
        if self.draining:  # the client's next request opens a connection, to another router
            out.force_close()
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
        table = self.table or placed.table
        output_label = (
            rq.bucket_label(table.output_edges, route.bucket_index(table.output_edges, generated))
            if generated
            else "unknown"
        )
        child = self._child
        child(m.requests, gpu, placed.input_label, output_label).inc()
        child(m.responses, gpu, str(answer.status)).inc()
        child(m.e2e, gpu).observe(ended - placed.arrived)
        if 200 <= answer.status < 300:
            model = body.get("model")
            child(m.success, model if isinstance(model, str) else "").inc()
            if streamed and first:
                child(m.ttft, gpu).observe(first - placed.arrived)
                if generated > 1:
                    child(m.tpot, gpu).observe((last - first) / (generated - 1))
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
    table: route.RouteTable


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


EventLoop = Literal["auto", "asyncio", "uvloop"]


def _runner(loop: EventLoop) -> asyncio.Runner:
    """An asyncio runner on uvloop (libuv's event loop: less time per request) when it is
    installed or asked for, else on asyncio's own."""
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise
        else:
            return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


class _Stop:
    """What the signals asked for: `stopping` (a first SIGTERM: drain), `hurry` (a second SIGTERM
    or a SIGINT: at once)."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self.hurry = asyncio.Event()

    def signalled(self, signum: int) -> None:
        if signum != signal.SIGTERM or self.stopping.is_set():
            if not self.hurry.is_set():
                log.info("%s: stopping at once", signal.Signals(signum).name)
            self.hurry.set()
        self.stopping.set()

    async def sleep(self, seconds: float) -> None:
        """`seconds`, or less when asked to hurry."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.hurry.wait(), seconds)


async def serve(
    router: Router,
    host: str,
    port: int,
    reuse_port: bool = False,
    shutdown: Shutdown | None = None,
) -> None:
    """Serve until SIGTERM (then drain and stop as `shutdown` says), SIGINT or cancelled; a client
    that disconnects cancels its handler (and so closes its upstream request at once, not at the
    next chunk)."""
    shutdown = shutdown or Shutdown()
    # aiohttp waits without a limit for a timeout of 0: with 0, `_close` cuts the requests itself.
    runner = web.AppRunner(
        router.app(),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=shutdown.timeout or 1.0,
    )
    await runner.setup()
    stop = _Stop()
    loop = asyncio.get_running_loop()
    handled: dict[signal.Signals, Any] = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not main thread
            previous = signal.getsignal(signum)
            loop.add_signal_handler(signum, stop.signalled, signum)
            handled[signum] = previous
    try:
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_port=reuse_port or None)
        await site.start()
        log.info("routing on http://%s:%d (process %d)", host, port, os.getpid())
        await stop.stopping.wait()
        router.draining = True
        if not stop.hurry.is_set() and shutdown.drain_seconds > 0:
            log.info(
                "SIGTERM: draining, /readyz answers 503; serving %gs more before closing the port",
                shutdown.drain_seconds,
            )
            await stop.sleep(shutdown.drain_seconds)
    finally:
        router.draining = True
        await _close(runner, router, shutdown.timeout, stop)
        for signum, previous in handled.items():
            loop.remove_signal_handler(signum)
            if previous is not None:  # e.g. asyncio.Runner's own SIGINT handler, or SIG_IGN
                signal.signal(signum, previous)
    log.info("stopped (process %d)", os.getpid())


async def _close(runner: web.AppRunner, router: Router, timeout: float, stop: _Stop) -> None:
    """Stop listening, give the requests in flight up to `timeout` seconds to end (aiohttp's
    `shutdown_timeout`, unless `stop` says to hurry), then cut the rest and close the app."""
    for site in runner.sites:
        await site.stop()  # no new connection; idle kept-alive ones close in `cleanup`
    if stop.stopping.is_set() and not stop.hurry.is_set() and timeout > 0:
        log.info(
            "closed the port; waiting up to %gs for %d request(s) in flight",
            timeout,
            router.in_flight(),
        )
    cleanup = asyncio.ensure_future(runner.cleanup())
    if timeout > 0:
        hurried = asyncio.ensure_future(stop.hurry.wait())
        try:
            await asyncio.wait({cleanup, hurried}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurried.cancel()
    if not cleanup.done() and runner.server is not None:
        for connection in runner.server.connections:
            connection.force_close()  # its handler is cancelled, its upstream request closed
    await cleanup


RouterFactory = Callable[[Metrics], Router]
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def run(
    make_router: RouterFactory,
    host: str,
    port: int,
    workers: int = 1,
    loop: EventLoop = "auto",
    shutdown: Shutdown | None = None,
) -> int:
    """Serve with one router made by `make_router`, in this process; or with `workers` processes
    sharing the port (SO_REUSEPORT: the kernel spreads the connections), each its own router
    (its own table, upstream connections and in-flight counts) and their metrics summed on
    every one's /metrics (prometheus_client's multiprocess mode). Each stops as `shutdown` says:
    the parent passes a SIGTERM on to the workers once (they drain), and a second one or a SIGINT
    as a SIGINT (they stop at once). Raises OSError when the address cannot be listened on;
    returns the exit status."""
    shutdown = shutdown or Shutdown()
    if workers <= 1:
        with _runner(loop) as runner:
            runner.run(serve(make_router(Metrics()), host, port, shutdown=shutdown))
        return 0
    with socket.create_server((host, port), reuse_port=True):  # taken, or not ours: OSError here
        pass
    shared = tempfile.mkdtemp(prefix="melange-route-metrics-")
    context = multiprocessing.get_context("fork")  # the children inherit `make_router` as it is
    children = [
        context.Process(
            target=_worker,
            args=(make_router, host, port, loop, shared, shutdown),
            name=f"route-{k}",
        )
        for k in range(workers)
    ]
    level = 0  # what the workers are to do: 0 serve, 1 drain and stop, 2 stop at once
    told: dict[str, int] = {}  # the level each worker was told

    def tell() -> None:
        """Signal each running worker up to `level`: SIGTERM once, then SIGINT."""
        for child in children:
            if child.pid is None or child.exitcode is not None:
                continue
            for want, signum in ((1, signal.SIGTERM), (2, signal.SIGINT)):
                if level >= want > told.get(child.name, 0):
                    told[child.name] = want
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signum)

    def signalled(signum: int, _: Any) -> None:
        nonlocal level
        level = 2 if signum == signal.SIGINT or level >= 1 else 1
        tell()

    previous = {signum: signal.signal(signum, signalled) for signum in STOP_SIGNALS}
    try:
        # The workers start with these signals blocked (a fork keeps the mask) until they have
        # their own handlers: one signalled before that is not handled as the parent.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for child in children:
                child.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        # one worker that ends ends them all: a pod that no longer serves should restart
        multiprocessing.connection.wait([c.sentinel for c in children])
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # not `signalled` halfway through
        try:
            level = max(level, 1)
            tell()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        deadline = time.monotonic() + shutdown.drain_seconds + shutdown.timeout
        deadline += WORKERS_MARGIN_SECONDS
        for child in children:
            child.join(timeout=max(deadline - time.monotonic(), 0.0))
    finally:
        for child in children:
            if child.pid is not None and child.exitcode is None:
                log.warning("worker %d did not stop in time: killed", child.pid)
                child.kill()
                child.join()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(shared, ignore_errors=True)
    return 0 if all(c.exitcode in (0, -signal.SIGTERM) for c in children) else 1


def _worker(
    make_router: RouterFactory,
    host: str,
    port: int,
    loop: EventLoop,
    shared: str,
    shutdown: Shutdown,
) -> None:
    """One of `run`'s worker processes; it starts with SIGTERM and SIGINT blocked."""
    # Until `serve` handles them a SIGTERM ends the worker and a SIGINT is ignored (a terminal's
    # Ctrl-C reaches the parent too, which stops the workers).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = shared
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    try:
        with _runner(loop) as runner:
            router = make_router(Metrics(shared))
            runner.run(serve(router, host, port, reuse_port=True, shutdown=shutdown))
    except Exception:
        log.exception("worker %d stopped", os.getpid())
        sys.exit(1)
    finally:
        multiprocess.mark_process_dead(os.getpid(), shared)  # type: ignore[no-untyped-call]
