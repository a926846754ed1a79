"""`melange route`: serve an OpenAI-compatible proxy that sends each request to the GPU type its
plan sized for it (`melange.route.proxy`; docs/routing.md#melange-route).

aiohttp, the solver, the Kubernetes client and the optional tokenizer load when the command runs,
not for its help.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import click

from melange import api
from melange.cli.util import EXIT_INFEASIBLE, EXIT_INVALID, fail, read_allocation
from melange.route import request as rq

if TYPE_CHECKING:
    from melange.plan.routing import RouteTable


def parse_upstreams(values: tuple[str, ...]) -> dict[str, list[str]]:
    """`L4=http://a:8000` (repeatable, several per type) -> {"L4": [...]}; a malformed one exits 2."""
    upstreams: dict[str, list[str]] = {}
    for value in values:
        gpu, sep, url = value.partition("=")
        gpu, url = gpu.strip(), url.strip()
        if not sep or not gpu or not url.startswith(("http://", "https://")):
            fail([f"--upstream: must be TYPE=URL with an http(s) URL, got {value!r}"], EXIT_INVALID)
        urls = upstreams.setdefault(gpu, [])
        if url not in urls:
            urls.append(url)
    return upstreams


def allocation_table(spec: api.AllocationSpec, rate: float | None) -> RouteTable:
    """The routing table of the plan solved for `spec` (at `rate`); raises ValueError when the
    plan is not solved."""
    from melange.plan import routing as route
    from melange.plan import solver
    from melange.plan.problem import Problem

    problem = Problem.from_spec(spec, rate=rate)
    plan = solver.solve(problem, started=time.monotonic())
    if not plan.solved:
        raise ValueError(f"{plan.status.lower()}: {plan.reason}")
    return route.derive(problem, plan)


def allocation_loader(file: str, rate: float | None) -> Callable[[], RouteTable]:
    """Re-solves FILE when it changes; every problem is a ValueError (the old table stays)."""

    def load() -> RouteTable:
        try:
            data = Path(file).read_bytes()
        except OSError as exc:
            raise ValueError(f"{file}: cannot read: {exc.strerror or exc}") from None
        try:
            spec = api.load_bytes(data, source=file).spec
        except api.SpecError as exc:
            raise ValueError(f"{file}: {'; '.join(str(e) for e in exc.errors[:3])}") from None
        return allocation_table(spec, rate)

    return load


def tokenizer_counter(path: Path) -> rq.TextCounter:
    """Exact prompt lengths from a HuggingFace tokenizer.json (the optional `tokenizers`)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        fail(
            ["--tokenizer needs the `tokenizers` package: pip install 'melange-operator[route]'"],
            EXIT_INVALID,
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the library raises its own Exception subclass for every problem
        fail([f"--tokenizer {path}: cannot load: {exc}"], EXIT_INVALID)

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=True).ids)

    return count


@click.command()
@click.option(
    "--table",
    "table_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The routing table's JSON (plan.routing.to_dict); re-read when it changes.",
)
@click.option(
    "--allocation",
    "allocation_file",
    type=click.Path(dir_okay=False),
    help="An allocation as `melange solve` reads it: solved, and re-solved when it changes.",
)
@click.option(
    "--table-configmap",
    "table_configmap",
    metavar="[NAMESPACE/]NAME",
    help="The routing table in a ConfigMap (as the operator publishes it), watched through the "
    "Kubernetes API; NAMESPACE defaults to the pod's own.",
)
@click.option(
    "--table-key",
    default="table.json",
    show_default=True,
    help="With --table-configmap: the ConfigMap's key that holds the table.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    help="With --allocation: the total request rate to solve for, instead of its totalRate.",
)
@click.option(
    "--upstream",
    "upstream_values",
    metavar="TYPE=URL",
    multiple=True,
    help="An engine of a GPU type, at its root URL (e.g. L4=http://l4-0:8000); repeatable, "
    "several per type. For a type with none, the servers of the Service the table names.",
)
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option(
    "--trust-max-tokens",
    is_flag=True,
    help="Take max_tokens (chat: max_completion_tokens) as the output length and route by "
    "both lengths (byBucket); else by the input length (byInput).",
)
@click.option(
    "--tokenizer",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A HuggingFace tokenizer.json to count prompt tokens exactly (needs the `route` extra).",
)
@click.option(
    "--chars-per-token",
    type=click.FloatRange(min=0, min_open=True),
    default=rq.DEFAULT_CHARS_PER_TOKEN,
    show_default=True,
    help="Without --tokenizer, prompt tokens are estimated as characters / this.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Processes sharing the port (SO_REUSEPORT), each on one core.",
)
@click.option(
    "--event-loop",
    type=click.Choice(["auto", "asyncio", "uvloop"]),
    default="auto",
    hidden=True,  # benchmarks/router.py compares them; auto is uvloop when installed
)
@click.option("--seed", type=int, help="Seed of the random draws that pick a type (tests).")
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds to connect to an upstream before trying another.",
)
@click.option(
    "--drain-seconds",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="On SIGTERM: seconds to go on serving, /readyz answering 503, before the port closes, "
    "so that load balancers stop sending first (0: close at once).",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Then: seconds the requests in flight (streams included) have to end before they are "
    "cut (0: cut at once).",
)
def route_command(
    table_file: Path | None,
    allocation_file: str | None,
    table_configmap: str | None,
    table_key: str,
    rate: float | None,
    upstream_values: tuple[str, ...],
    host: str,
    port: int,
    trust_max_tokens: bool,
    tokenizer: Path | None,
    chars_per_token: float,
    workers: int,
    event_loop: Literal["auto", "asyncio", "uvloop"],
    seed: int | None,
    connect_timeout: float,
    drain_seconds: float,
    shutdown_timeout: float,
) -> None:
    """Serve an OpenAI-compatible proxy that sends each request to the GPU type sized for it.

    Give the routing table (--table, as `melange.plan.routing.to_dict` writes it; or
    --table-configmap, where the operator publishes it) or an allocation to solve (--allocation),
    and the engines of each GPU type (--upstream, or a Service per type named in the table).
    Serves POST /v1/completions and /v1/chat/completions (streamed through unchanged), GET
    /v1/models, /metrics, /healthz and /readyz. A type that refuses a request (down, 429, 503)
    passes it to another. On SIGTERM it drains (--drain-seconds, --shutdown-timeout) and exits 0;
    a second SIGTERM or Ctrl-C stops it at once. Exits 2 when the input is invalid, 1 when the
    allocation has no plan.
    """
    for name, value in (
        ("--rate", rate),
        ("--chars-per-token", chars_per_token),
        ("--drain-seconds", drain_seconds),
        ("--shutdown-timeout", shutdown_timeout),
    ):
        if value is not None and not math.isfinite(value):
            fail([f"{name}: must be a finite number, got {value}"], EXIT_INVALID)
    sources = [table_file, allocation_file, table_configmap]
    if sum(source is not None for source in sources) != 1:
        fail(
            ["give exactly one of --table FILE, --allocation FILE and --table-configmap NAME"],
            EXIT_INVALID,
        )
    if rate is not None and rate > api.MAX_RATE:  # the bound of spec.workload.totalRate
        fail([f"--rate: must be <= {api.MAX_RATE}, got {rate:g}"], EXIT_INVALID)
    if rate is not None and allocation_file is None:
        fail(["--rate: only with --allocation"], EXIT_INVALID)
    upstreams = parse_upstreams(upstream_values)
    count = (
        tokenizer_counter(tokenizer) if tokenizer is not None else rq.char_estimate(chars_per_token)
    )

    from melange.route import kube, proxy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    namespace = kube.own_namespace()
    table: RouteTable | None = None
    watch: tuple[str, Callable[[], RouteTable]] | None = None
    configmap: tuple[str, str] | None = None
    if table_file is not None:
        load = proxy.file_loader(table_file)
        try:
            table = load()
        except ValueError as exc:
            fail([f"--table {exc}"], EXIT_INVALID)
        watch = (str(table_file), load)
    elif allocation_file is not None:
        try:
            table = allocation_table(read_allocation(allocation_file).spec, rate)
        except ValueError as exc:
            fail([str(exc)], EXIT_INFEASIBLE)
        watch = (allocation_file, allocation_loader(allocation_file, rate))
    else:
        assert table_configmap is not None
        try:
            configmap = kube.parse_configmap(table_configmap, namespace)
            kube.connect()  # fails here, not in the server, without a Kubernetes configuration
        except ValueError as exc:
            fail([f"--table-configmap: {exc}"], EXIT_INVALID)
    if table is not None and not any(g in upstreams or table.upstream(g) for g in table.gpus):
        fail(
            [
                f"--upstream: no GPU type of the table ({', '.join(table.gpus)}) has an upstream "
                "(an --upstream, or a Service in the table)"
            ],
            EXIT_INVALID,
        )
    settings = proxy.Settings(
        count_text=count,
        trust_max_tokens=trust_max_tokens,
        seed=seed,
        connect_timeout=connect_timeout,
    )

    def make_router(metrics: proxy.Metrics) -> proxy.Router:
        feed = kube.KubeFeed(configmap, table_key, namespace)  # connects when first needed
        return proxy.Router(table, upstreams, settings, watch=watch, feed=feed, metrics=metrics)

    try:
        status = proxy.run(
            make_router,
            host,
            port,
            workers=workers,
            loop=event_loop,
            shutdown=proxy.Shutdown(drain_seconds, shutdown_timeout),
        )
    except OSError as exc:  # the address is taken, or not ours to listen on
        fail([f"--host/--port {host}:{port}: cannot listen: {exc.strerror or exc}"], EXIT_INVALID)
    if status:
        raise SystemExit(status)
