"""`melange workload`: the spec's buckets and workload from a request log, or from the token
histograms vLLM exports to Prometheus (whose client is imported only for --from-prometheus)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from melange.cli.util import (
    EXIT_INVALID,
    MAX_CREDENTIAL_BYTES,
    OUTPUT_FORMAT,
    dump,
    fail,
    load_named,
    optional_edges,
    read_allocation,
    read_text,
    user_profiles_dir,
)
from melange.tools import workload


@contextlib.contextmanager
def _progress_bar(label: str, total: int) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr when it is a terminal; nothing otherwise (logs stay clean)."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
    with Progress(
        *columns, TimeRemainingColumn(), console=Console(stderr=True), transient=True
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


@click.command("workload")
@click.argument("log", type=click.Path(dir_okay=False, allow_dash=True), required=False)
@click.option(
    "--input-edges",
    help="Input-length bucket edges in tokens, comma-separated (e.g. the profiles' edges); "
    "default: quantiles of the log.",
)
@click.option(
    "--output-edges",
    help="Output-length bucket edges in tokens, comma-separated; default: quantiles of the log.",
)
@click.option(
    "--edges-from",
    metavar="PROFILE",
    help="Take both axes' bucket edges from this profile (shipped or imported; see `melange "
    "profiles list`), so the workload can be solved with it.",
)
@click.option(
    "--profiles-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="User profile directory for --edges-from [default: $MELANGE_PROFILES_DIR, else "
    "$XDG_DATA_HOME/melange/profiles, else ~/.local/share/melange/profiles].",
)
@click.option(
    "--buckets",
    type=click.IntRange(1, 32),
    default=8,
    show_default=True,
    help="Buckets per axis whose edges are not given: edges at quantiles of the log "
    "(equal ones merge, so there may be fewer).",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    help="Total request rate in req/s; default: from the timestamps' span (with "
    "--from-prometheus: the requests finished in the window).",
)
@click.option(
    "--from-prometheus",
    "prometheus_url",
    metavar="URL",
    help="Instead of a log: vLLM's prompt and generation token histograms in this Prometheus.",
)
@click.option("--model", help="With --from-prometheus: vLLM's model_name label.")
@click.option(
    "--window",
    type=click.IntRange(10, 7 * 86400),
    default=3600,
    show_default=True,
    help="With --from-prometheus: the histograms' increase over this many seconds.",
)
@click.option(
    "--allocation",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="With --from-prometheus: take the edges and the prior matrix from this allocation "
    "(default prior: uniform, which fits the product of the two marginals).",
)
@click.option(
    "--bearer-token-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="With --from-prometheus: send this file's token as a bearer token.",
)
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="With --from-prometheus: verify Prometheus' TLS certificate against this CA bundle.",
)
@OUTPUT_FORMAT
def workload_command(
    log: str | None,
    input_edges: str | None,
    output_edges: str | None,
    edges_from: str | None,
    profiles_dir: Path | None,
    buckets: int,
    rate: float | None,
    prometheus_url: str | None,
    model: str | None,
    window: int,
    allocation: str | None,
    bearer_token_file: Path | None,
    ca_file: Path | None,
    output: str,
) -> None:
    """Print the spec's `buckets` and `workload` blocks for the requests in LOG ('-': stdin), or
    for those a vLLM deployment finished lately (--from-prometheus).

    LOG is JSON Lines or CSV (by its extension, else its first line), one request per line with
    input_tokens/output_tokens or prompt_tokens/completion_tokens (also under `usage`), and
    optionally a timestamp (epoch seconds or RFC 3339). The distribution counts the requests per
    bucket [low, high); requests outside the edges are reported and left out, as are unreadable
    lines (listed with their line numbers on stderr). The total rate is the rate of the counted
    requests over the span of the timestamps, unless --rate is given.

    With --from-prometheus, the two token histograms give the matrix's row and column sums over
    the window; the matrix is the one with those sums closest to the prior (iterative
    proportional fitting), as the operator's workload.fromPrometheus does. Exits 0 on success,
    2 when the input gives no workload.

    A profile serves only the bucket edges it was made for: --edges-from PROFILE takes them. Edges
    computed from quantiles that fit no shipped or imported profile are pointed out on stderr.
    """
    if rate is not None and not math.isfinite(rate):
        fail([f"--rate: must be a finite number, got {rate}"], EXIT_INVALID)
    ins, outs = optional_edges(input_edges), optional_edges(output_edges)
    if edges_from is not None:
        if ins is not None or outs is not None or allocation is not None:
            fail(
                ["give --edges-from, --input-edges/--output-edges or --allocation, not two"],
                EXIT_INVALID,
            )
        ins, outs = _profile_edges(edges_from, profiles_dir)
    if prometheus_url is not None:
        if log is not None:
            fail(["give a LOG or --from-prometheus, not both"], EXIT_INVALID)
        _workload_from_prometheus(
            prometheus_url,
            model,
            window,
            _live_prior(allocation, ins, outs),
            rate,
            (bearer_token_file, ca_file),
            output,
        )
        return
    if log is None:
        fail(["give a request LOG ('-' for stdin), or --from-prometheus URL"], EXIT_INVALID)
    if log != "-" and Path(log).exists() and not Path(log).is_file():
        # read twice (quantile edges, then the matrix): a pipe or a device cannot be
        fail([f"{log}: not a regular file; give it on stdin instead (LOG '-')"], EXIT_INVALID)
    try:
        result = workload.build_workload(
            None if log == "-" else Path(log),
            input_edges=ins,
            output_edges=outs,
            buckets=buckets,
            rate=rate,
            progress=_progress_bar,
        )
    except workload.WorkloadError as exc:
        fail([str(exc)], EXIT_INVALID)
    source = "<stdin>" if log == "-" else log
    for line in workload.warning_lines(result, source):
        click.echo(f"warning: {line}", err=True)
    if ins is None or outs is None:
        fits = _fitting_profiles((result.input_edges, result.output_edges), profiles_dir)
        if fits is not None:
            click.echo(f"warning: {fits}", err=True)
    fragment = result.spec_fragment()
    if output == "json":
        click.echo(dump(fragment, output), nl=False)
    else:
        comment = "".join(f"# {line}\n" for line in workload.summary_lines(result, source))
        click.echo(comment + dump(fragment, output), nl=False)


def _profile_edges(name: str, profiles_dir: Path | None) -> tuple[list[int], list[int]]:
    """The bucket edges profile `name` was made for; an unknown or invalid profile exits 2."""
    from melange.tools import profiles

    edges = profiles.edges_of(load_named(name, user_profiles_dir(profiles_dir)))
    assert edges is not None  # a loaded profile has valid edges
    return edges


def _fitting_profiles(edges: tuple[list[int], list[int]], profiles_dir: Path | None) -> str | None:
    """A line saying how to take a profile's edges when no profile was made for `edges`."""
    from melange.tools import profiles

    user_dir = profiles_dir if profiles_dir is not None else profiles.user_profile_dir()
    if profiles.profiles_for_edges(edges, user_dir):
        return None
    example = profiles.list_profiles()[0].name
    return (
        "these quantile edges fit no shipped or imported profile (a profile serves only the "
        "bucket edges it was made for); to solve with one, take its edges with --edges-from "
        f"PROFILE, e.g. --edges-from {example}"
    )


@dataclasses.dataclass(frozen=True)
class _Prior:
    input_edges: list[int]
    output_edges: list[int]
    matrix: list[list[float]]
    source: str


def _live_prior(
    allocation: str | None, input_edges: list[int] | None, output_edges: list[int] | None
) -> _Prior:
    """The edges and the matrix to fit from: an allocation's, or the given edges and uniform."""
    if allocation is not None:
        if input_edges is not None or output_edges is not None:
            fail(["give --allocation or --input-edges/--output-edges, not both"], EXIT_INVALID)
        spec = read_allocation(allocation).spec
        return _Prior(
            list(spec.buckets.input_tokens),
            list(spec.buckets.output_tokens),
            [list(row) for row in spec.workload.distribution],
            f"the distribution in {allocation}",
        )
    if input_edges is None or output_edges is None:
        fail(
            [
                "--from-prometheus needs the bucket edges: --allocation FILE, or both "
                "--input-edges and --output-edges"
            ],
            EXIT_INVALID,
        )
    uniform = [[1.0] * (len(output_edges) - 1) for _ in range(len(input_edges) - 1)]
    return _Prior(input_edges, output_edges, uniform, "a uniform prior")


def _workload_from_prometheus(
    url: str,
    model: str | None,
    window: int,
    prior: _Prior,
    rate: float | None,
    credentials: tuple[Path | None, Path | None],
    output: str,
) -> None:
    import asyncio

    from melange.signals import distribution
    from melange.signals.prometheus import PrometheusClient
    from melange.signals.rates import RateError

    if model is None:
        fail(["--from-prometheus needs --model (vLLM's model_name label)"], EXIT_INVALID)
    if not url.startswith(("http://", "https://")):
        fail([f"--from-prometheus: must be an http(s) URL, got {url!r}"], EXIT_INVALID)
    token_file, ca_file = credentials
    token = (
        read_text(token_file, MAX_CREDENTIAL_BYTES, "--bearer-token-file ").strip()
        if token_file is not None
        else None
    )
    ca = read_text(ca_file, MAX_CREDENTIAL_BYTES, "--ca-file ") if ca_file is not None else None

    async def fetch() -> tuple[distribution.Histogram, distribution.Histogram]:
        client = PrometheusClient()
        try:
            return await client.token_histograms(
                url, model, window, bearer_token=token, ca_pem=ca, timeout=30.0
            )
        finally:
            await client.close()

    try:
        prompt, generation = asyncio.run(fetch())
        observed = distribution.observe(
            prior.matrix, prior.input_edges, prior.output_edges, prompt, generation
        )
    except RateError as exc:
        fail([f"{url}: {exc.message}"], EXIT_INVALID)
    total_rate = rate if rate is not None else float(f"{prompt.total / window:.6g}")
    fragment = {
        "buckets": {"inputTokens": prior.input_edges, "outputTokens": prior.output_edges},
        "workload": {"distribution": observed.matrix, "totalRate": total_rate},
    }
    if output == "json":
        click.echo(dump(fragment, output), nl=False)
        return
    summary = (
        f"{url}, model {model}: {observed.summary(window)}; distribution fitted to the token "
        f"histograms from {prior.source}; totalRate {total_rate:g} req/s "
        f"({'--rate' if rate is not None else 'finished requests over the window'})"
    )
    click.echo(f"# {summary}\n" + dump(fragment, output), nl=False)
