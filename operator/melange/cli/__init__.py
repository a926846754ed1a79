"""The `melange` command: solve allocations offline, build their inputs, run the operator.

Exit codes are part of the interface: 0 solved, 1 infeasible (the reason on stderr), 2 invalid input
(every error on stderr, one per line; click's own usage errors use 2 as well); `profile` adds 3 for
a measurement stopped with buckets left; `solve` adds 4 for a time limit that ran out with neither
a plan nor a proof of infeasibility.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import yaml

from melange import api
from melange.cli.profile import profile_command
from melange.cli.util import EXIT_INFEASIBLE, EXIT_INVALID, EXIT_UNSOLVED, dump, fail, parse_edges
from melange.plan import report
from melange.plan import result as plan_result
from melange.tools import perfmodel, profiles, workload
from melange.tools.profiles import build as profile_build


def _read_input(path: str) -> api.Allocation:
    """Read a manifest from a file or stdin (`-`); every problem with it exits 2."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        fail([f"{path}: cannot read: {exc.strerror or exc}"], EXIT_INVALID)
    try:
        return api.load_text(text, source=path)
    except api.SpecError as exc:
        fail([str(e) for e in exc.errors], EXIT_INVALID)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="melange-operator", prog_name="melange")
def main() -> None:
    """Keep LLM serving on the cheapest mix of GPU types that meets the latency SLO.

    `solve` plans offline from a MelangeAllocation file; `workload` turns a request log (or vLLM's
    histograms in Prometheus) into the spec's workload; `profile` measures a GPU's throughput per
    bucket on a running server; `profiles` lists, estimates, imports and compares GPU throughput
    profiles; `run` starts the Kubernetes operator.
    """


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json", "yaml"]),
    default="table",
    show_default=True,
    help="Output format; json and yaml hold the full plan including the per-bucket assignment.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, max_open=False),
    help="Total request rate in req/s, instead of spec.workload.totalRate.",
)
@click.option(
    "--slice-factor",
    type=click.IntRange(1, api.MAX_SLICE_FACTOR),
    help="Slices per bucket, instead of spec.sliceFactor.",
)
@click.option(
    "--method",
    type=click.Choice(list(plan_result.METHODS)),
    default=plan_result.DEFAULT_METHOD,
    show_default=True,
    help="decomposition: branch on the replica counts, repair split buckets (fast at the CRD's "
    "full size); direct: the whole counted-form MILP in HiGHS. Both are certified and exact.",
)
@click.option(
    "--time-limit",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds for the whole command, reading the input included; past it the best plan found "
    "is printed as 'Feasible' with its gap to the lower bound.",
)
def solve(
    file: str,
    output: str,
    rate: float | None,
    slice_factor: int | None,
    method: plan_result.Method,
    time_limit: float,
) -> None:
    """Print the cheapest plan for the allocation in FILE ('-' reads stdin).

    FILE is a MelangeAllocation manifest, or its bare spec, in YAML or JSON. The plan gives the
    replicas per GPU type, the cost per hour, a proven lower bound, and the saving against the best
    single-GPU-type plan. Exits 0 with a plan (status Optimal when proven, Feasible when the time limit
    cut the search short), 1 when infeasibility is proven, 2 when the input is invalid, 4 when the
    time limit ran out with neither a plan nor a proof.
    """
    started = time.monotonic()
    allocation = _read_input(file)
    if rate is not None and math.isnan(rate):  # NaN passes FloatRange
        fail([f"--rate: must be a finite number, got {rate}"], EXIT_INVALID)
    from melange.plan import solver
    from melange.plan.problem import Problem

    problem = Problem.from_spec(allocation.spec, rate=rate, slice_factor=slice_factor)
    plan = solver.solve(problem, method=method, time_limit=time_limit, started=started)
    if output == "table":
        click.echo(report.render_table(plan), nl=False)
    else:
        click.echo(dump(report.plan_to_dict(plan), output), nl=False)
    if plan.status == "Infeasible":
        fail([f"infeasible: {plan.reason}"], EXIT_INFEASIBLE)
    if plan.status == "Unsolved":
        fail([f"unsolved: {plan.reason}"], EXIT_UNSOLVED)


@main.group("profiles")
def profiles_group() -> None:
    """GPU throughput profiles: the shipped library, estimates for new set-ups, measured ones.

    A profile is a `spec.gpus[]` entry (name, costPerHour, throughput) for one model, GPU type and
    time-per-output-token SLO. The shipped ones are estimates (see `melange profiles show`), to be
    replaced by measurements when you have them: `melange profiles import` adds a measured profile
    to the user profile directory, where `list`, `show` and `compare` find it.
    """


_DIR = click.option(
    "--dir",
    "user_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="User profile directory [default: $MELANGE_PROFILES_DIR, else "
    "$XDG_DATA_HOME/melange/profiles, else ~/.local/share/melange/profiles].",
)


def _user_dir(user_dir: Path | None) -> Path:
    """The user profile directory; files in it that are not valid profiles are warned about."""
    directory = user_dir if user_dir is not None else profiles.user_profile_dir()
    for problem in profiles.load_user_profiles(directory).problems:
        click.echo(f"warning: {problem} (ignored)", err=True)
    return directory


@profiles_group.command("list")
@_DIR
def profiles_list(user_dir: Path | None) -> None:
    """List the shipped profiles and the imported (measured) ones."""
    rows = [
        [
            p.name,
            p.gpu,
            p.model,
            f"{p.tpot_seconds * 1000:g} ms",
            f"{p.cost_per_hour:.2f}",
            p.source,
        ]
        for p in profiles.list_profiles(_user_dir(user_dir))
    ]
    header = ["PROFILE", "GPU", "MODEL", "TPOT SLO", "COST/H", "SOURCE"]
    for line in report.format_table(header, rows):
        click.echo(line)


_FORMAT = click.option(
    "-o", "--output", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True
)


@profiles_group.command("show")
@click.argument("name")
@_FORMAT
@click.option(
    "--entry-only",
    is_flag=True,
    help="Print just the spec.gpus[] entry (name, costPerHour, throughput) to paste into a spec.",
)
@_DIR
def profiles_show(name: str, output: str, entry_only: bool, user_dir: Path | None) -> None:
    """Print the profile NAME (see `melange profiles list`) with the inputs it was estimated from."""
    try:
        profile = profiles.load_profile(name, _user_dir(user_dir))
    except profiles.UnknownProfileError as exc:
        fail([str(exc)], EXIT_INVALID)
    click.echo(dump(profiles.gpu_entry(profile) if entry_only else profile, output), nl=False)


def _edges(value: str | None) -> list[int] | None:
    return None if value is None else parse_edges(value)


@profiles_group.command("estimate")
@click.option("--gpu", type=click.Choice(sorted(perfmodel.GPUS)), required=True, help="GPU type.")
@click.option(
    "--model",
    type=click.Choice(sorted(perfmodel.MODELS)),
    default=perfmodel.SHIPPED_MODEL,
    show_default=True,
    help="Model architecture.",
)
@click.option(
    "--tpot-ms",
    type=click.FloatRange(min=0, min_open=True, max=10000),
    required=True,
    help="SLO on the time per output token, in milliseconds.",
)
@click.option(
    "--input-edges",
    help="Input-length bucket edges in tokens, comma-separated "
    f"[default: {','.join(map(str, perfmodel.DEFAULT_INPUT_EDGES))}].",
)
@click.option(
    "--output-edges",
    help="Output-length bucket edges in tokens, comma-separated "
    f"[default: {','.join(map(str, perfmodel.DEFAULT_OUTPUT_EDGES))}].",
)
@click.option(
    "--cost-per-hour", type=click.FloatRange(min=0, min_open=True), help="Override the price."
)
@_FORMAT
def profiles_estimate(
    gpu: str,
    model: str,
    tpot_ms: float,
    input_edges: str | None,
    output_edges: str | None,
    cost_per_hour: float | None,
    output: str,
) -> None:
    """Estimate a profile with the first-order performance model (melange.tools.perfmodel).

    Prefill is bound by the GPU's FLOP/s, decode by its memory bandwidth, and the batch by the
    memory left for the KV cache after the weights and by the SLO; each bucket is represented by the
    geometric midpoint of its edges. The output records every input, labelled as an estimate.
    """
    spec = perfmodel.GPUS[gpu]
    if cost_per_hour is not None:
        spec = dataclasses.replace(spec, cost_per_hour=cost_per_hour)
    profile = perfmodel.build_profile(
        spec,
        perfmodel.MODELS[model],
        tpot_ms / 1000,
        _edges(input_edges),
        _edges(output_edges),
    )
    click.echo(
        profile_build.render_profile(profile) if output == "yaml" else dump(profile, output),
        nl=False,
    )


@profiles_group.command("import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@_DIR
@click.option("--force", is_flag=True, help="Replace a different user profile of the same name.")
def profiles_import(file: str, user_dir: Path | None, force: bool) -> None:
    """Validate a measured profile and add it to the user profile directory.

    FILE ('-' reads stdin) has the shape of a shipped profile (see `melange profiles show`) with
    `source: measured`, and optionally `measurement:` (a mapping saying how it was measured)
    instead of `estimate:`. Its `profile` name is how `list`, `show` and `compare` find it; a
    user profile with the name of a shipped one replaces it. Exits 2 when the file is invalid.
    """
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail([f"{file}: cannot read: {getattr(exc, 'strerror', None) or exc}"], EXIT_INVALID)
    directory = user_dir if user_dir is not None else profiles.user_profile_dir()
    try:
        path = profiles.import_profile(file, text, directory, force=force)
    except profiles.ProfileError as exc:
        fail(exc.errors, EXIT_INVALID)
    except OSError as exc:
        fail([f"{directory}: cannot write: {exc.strerror or exc}"], EXIT_INVALID)
    name = yaml.safe_load(path.read_text(encoding="utf-8"))["profile"]
    note = " (it replaces the shipped estimate of that name)" if profiles.is_shipped(name) else ""
    click.echo(f"imported {name} -> {path}{note}")


@profiles_group.command("compare")
@click.argument("names", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json", "yaml"]),
    default="table",
    show_default=True,
)
@_DIR
def profiles_compare(names: tuple[str, ...], output: str, user_dir: Path | None) -> None:
    """Cost per million requests of each bucket on each profile, and the cheapest per bucket.

    The cost is costPerHour / (throughput x 3600) x 10^6: what a million requests of that bucket
    cost on an instance kept busy at its profiled throughput ('-': the profile cannot serve the
    bucket). The profiles must share their bucket edges.
    """
    directory = _user_dir(user_dir)
    documents: dict[str, dict[str, Any]] = {}
    try:
        for name in names:
            documents[name] = profiles.load_profile(name, directory)
    except profiles.UnknownProfileError as exc:
        fail([str(exc)], EXIT_INVALID)
    try:
        table = profiles.compare_profiles(documents)
    except profiles.ProfileError as exc:
        fail(exc.errors, EXIT_INVALID)
    if output != "table":
        click.echo(dump(table, output), nl=False)
        return
    gpus = [p["gpu"] for p in table["profiles"]]
    labels = gpus if len(set(gpus)) == len(gpus) else list(documents)
    label = dict(zip(documents, labels, strict=True))
    rows = [
        [
            f"{row['inputTokens'][0]}-{row['inputTokens'][1]}",
            f"{row['outputTokens'][0]}-{row['outputTokens'][1]}",
            *("-" if c is None else f"{c:.2f}" for c in row["costPerMillion"].values()),
            "-" if row["winner"] is None else label[row["winner"]],
        ]
        for row in table["rows"]
    ]
    header = ["INPUT", "OUTPUT", *labels, "CHEAPEST"]
    for line in report.format_table(header, rows):
        click.echo(line)
    if labels != gpus:
        return
    click.echo("")
    for name, gpu in zip(documents, gpus, strict=True):
        click.echo(f"{gpu}: {name} ({documents[name]['source']})")


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


@main.command("workload")
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
@_FORMAT
def workload_command(
    log: str | None,
    input_edges: str | None,
    output_edges: str | None,
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
    """
    if rate is not None and not math.isfinite(rate):
        fail([f"--rate: must be a finite number, got {rate}"], EXIT_INVALID)
    if prometheus_url is not None:
        if log is not None:
            fail(["give a LOG or --from-prometheus, not both"], EXIT_INVALID)
        _workload_from_prometheus(
            prometheus_url,
            model,
            window,
            _live_prior(allocation, _edges(input_edges), _edges(output_edges)),
            rate,
            (bearer_token_file, ca_file),
            output,
        )
        return
    if log is None:
        fail(["give a request LOG ('-' for stdin), or --from-prometheus URL"], EXIT_INVALID)
    try:
        result = workload.build_workload(
            None if log == "-" else Path(log),
            input_edges=_edges(input_edges),
            output_edges=_edges(output_edges),
            buckets=buckets,
            rate=rate,
            progress=_progress_bar,
        )
    except workload.WorkloadError as exc:
        fail([str(exc)], EXIT_INVALID)
    source = "<stdin>" if log == "-" else log
    for line in workload.warning_lines(result, source):
        click.echo(f"warning: {line}", err=True)
    fragment = result.spec_fragment()
    if output == "json":
        click.echo(dump(fragment, output), nl=False)
    else:
        comment = "".join(f"# {line}\n" for line in workload.summary_lines(result, source))
        click.echo(comment + dump(fragment, output), nl=False)


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
        spec = _read_input(allocation).spec
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
    token = token_file.read_text().strip() if token_file is not None else None
    ca = ca_file.read_text() if ca_file is not None else None

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


@main.command()
@click.option(
    "-n",
    "--namespace",
    "namespaces",
    multiple=True,
    help="Namespace to watch (repeatable). Without it: all namespaces.",
)
@click.option(
    "--peering",
    help="Join this Kopf peering for active/standby replicas (needs the peering CRDs); "
    "without it the operator runs standalone.",
)
@click.option("--priority", type=int, default=0, show_default=True, help="Priority in the peering.")
@click.option(
    "--liveness",
    metavar="URL",
    help="Serve a liveness probe, e.g. http://0.0.0.0:8080/healthz.",
)
@click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False, exists=True),
    help="Kubeconfig file; default: in-cluster credentials, else $KUBECONFIG or ~/.kube/config.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port of the Prometheus /metrics endpoint (0: do not serve metrics).",
)
@click.option("--metrics-address", default="0.0.0.0", show_default=True, help="Address to bind.")
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
def run(
    namespaces: tuple[str, ...],
    peering: str | None,
    priority: int,
    liveness: str | None,
    kubeconfig: str | None,
    metrics_port: int,
    metrics_address: str,
    verbose: bool,
) -> None:
    """Run the operator: reconcile MelangeAllocations and scale their node pools.

    Runs until interrupted (SIGINT/SIGTERM). Deleting an allocation leaves its node pools as they
    are; the operator puts no finalizer on allocations.
    """
    import os

    import kopf

    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig
    from melange.controller import metrics
    from melange.controller.kube import handlers  # noqa: F401  (importing registers them)

    if metrics_port:
        try:
            metrics.serve(metrics_port, metrics_address)
        except OSError as exc:
            fail([f"--metrics-port {metrics_port}: cannot listen: {exc.strerror or exc}"], 2)

    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.PLAIN)
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=peering is None,
        peering_name=peering,
        priority=priority,
        liveness_endpoint=liveness,
    )


main.add_command(profile_command)


if __name__ == "__main__":  # pragma: no cover
    main()
