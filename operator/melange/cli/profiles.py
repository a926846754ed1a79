"""`melange profiles`: list, show, estimate, import, compare GPU throughput profiles, and say
which type the performance model finds cheapest per bucket."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import cast

import click
import yaml

from melange.cli.util import (
    EXIT_INVALID,
    MAX_PROFILE_BYTES,
    OUTPUT_FORMAT,
    dump,
    fail,
    load_named,
    optional_edges,
    read_spec,
    read_text,
    require_finite,
    table_format,
    user_profiles_dir,
)
from melange.plan import report
from melange.tools import perfmodel, profiles
from melange.tools.profiles import build as profile_build


@click.group("profiles")
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


_TABLE_FORMAT = table_format()
_MODEL = click.option(
    "--model",
    type=click.Choice(sorted(perfmodel.MODELS)),
    default=perfmodel.SHIPPED_MODEL,
    show_default=True,
    help="Model architecture.",
)
_TPOT_MS = click.option(
    "--tpot-ms",
    type=click.FloatRange(min=0, min_open=True, max=10000),
    required=True,
    help="SLO on the time per output token, in milliseconds.",
)
_INPUT_EDGES = click.option(
    "--input-edges",
    help="Input-length bucket edges in tokens, comma-separated "
    f"[default: {','.join(map(str, perfmodel.DEFAULT_INPUT_EDGES))}].",
)
_OUTPUT_EDGES = click.option(
    "--output-edges",
    help="Output-length bucket edges in tokens, comma-separated "
    f"[default: {','.join(map(str, perfmodel.DEFAULT_OUTPUT_EDGES))}].",
)


@profiles_group.command("list")
@_TABLE_FORMAT
@_DIR
def profiles_list(output: str, user_dir: Path | None) -> None:
    """List the shipped profiles and the imported (measured) ones, then any profile the library
    leaves out because the model says it serves no bucket, with why."""
    listed = profiles.list_profiles(user_profiles_dir(user_dir))
    names = {p.name for p in listed}
    withheld = {n: why for n, why in profiles.withheld_profiles().items() if n not in names}
    if output != "table":
        document = {
            "profiles": [
                {
                    "profile": p.name,
                    "gpu": p.gpu,
                    "model": p.model,
                    "tpotSeconds": p.tpot_seconds,
                    "costPerHour": p.cost_per_hour,
                    "source": p.source,
                    "path": p.path,
                }
                for p in listed
            ],
            "notShipped": [{"profile": n, "reason": why} for n, why in withheld.items()],
        }
        click.echo(dump(document, output), nl=False)
        return
    rows = [
        [
            p.name,
            p.gpu,
            p.model,
            f"{p.tpot_seconds * 1000:g} ms",
            f"{p.cost_per_hour:.2f}",
            p.source,
        ]
        for p in listed
    ]
    header = ["PROFILE", "GPU", "MODEL", "TPOT SLO", "COST/H", "SOURCE"]
    for line in report.format_table(header, rows):
        click.echo(line)
    if withheld:
        click.echo("")
    for name, why in withheld.items():
        click.echo(f"{name} is not shipped: {why}")


@profiles_group.command("show")
@click.argument("name")
@OUTPUT_FORMAT
@click.option(
    "--entry-only",
    is_flag=True,
    help="Print just the spec.gpus[] entry (name, costPerHour, throughput) to paste into a spec.",
)
@click.option(
    "--workload",
    "workload_file",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Refuse (exit 2) unless the profile was made for the bucket edges of this file: the "
    "output of `melange workload`, or an allocation.",
)
@_DIR
def profiles_show(
    name: str, output: str, entry_only: bool, workload_file: str | None, user_dir: Path | None
) -> None:
    """Print the profile NAME (see `melange profiles list`) with the inputs it was estimated from."""
    profile = load_named(name, user_profiles_dir(user_dir))
    if workload_file is not None:
        edges = profiles.edges_of(read_spec(workload_file)[0])
        if edges is None:
            fail([f"{workload_file}: has no valid buckets.inputTokens/outputTokens"], EXIT_INVALID)
        mismatch = profiles.edges_mismatch(name, profile, edges)
        if mismatch is not None:
            fail([mismatch], EXIT_INVALID)
    click.echo(dump(profiles.gpu_entry(profile) if entry_only else profile, output), nl=False)


@profiles_group.command("estimate")
@click.option(
    "--gpu", type=click.Choice(sorted(perfmodel.DATASHEETS)), required=True, help="GPU type."
)
@_MODEL
@_TPOT_MS
@_INPUT_EDGES
@_OUTPUT_EDGES
@click.option(
    "--gpus",
    type=click.IntRange(min=1, max=64),
    help="GPUs per instance (tensor parallelism) [default: the shipped instance of the model, "
    "e.g. 2 for llama-3.1-70b on H100; else 1].",
)
@click.option(
    "--cost-per-hour",
    type=click.FloatRange(min=0, min_open=True),
    help="Override the price of the instance.",
)
@OUTPUT_FORMAT
def profiles_estimate(
    gpu: str,
    model: str,
    tpot_ms: float,
    input_edges: str | None,
    output_edges: str | None,
    gpus: int | None,
    cost_per_hour: float | None,
    output: str,
) -> None:
    """Estimate a profile with the calibrated performance model (melange.tools.perfmodel).

    Prefill is bound by the GPU's FLOP/s, decode by its memory bandwidth, and the batch by the
    memory left for the KV cache after the weights and by the SLO; each bucket is represented by the
    mean of lengths spread evenly in log space between its edges. The efficiencies and overheads are fitted to published
    measurements (`python -m melange.tools.profiles.calibrate`). The output records every input,
    labelled as an estimate.
    """
    require_finite({"--tpot-ms": tpot_ms, "--cost-per-hour": cost_per_hour})
    if gpus is None:
        gpus = perfmodel.SHIPPED_INSTANCES.get(model, {}).get(gpu, 1)
    spec = perfmodel.gpu_instance(perfmodel.DATASHEETS[gpu], gpus)
    if cost_per_hour is not None:
        spec = dataclasses.replace(spec, cost_per_hour=cost_per_hour)
    profile = profile_build.with_calibration(
        perfmodel.build_profile(
            spec,
            perfmodel.MODELS[model],
            tpot_ms / 1000,
            optional_edges(input_edges),
            optional_edges(output_edges),
        )
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
    text = read_text(file, MAX_PROFILE_BYTES)
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
@_TABLE_FORMAT
@_DIR
def profiles_compare(names: tuple[str, ...], output: str, user_dir: Path | None) -> None:
    """Cost per million requests of each bucket on each profile, and the cheapest per bucket.

    The cost is costPerHour / (throughput x 3600) x 10^6: what a million requests of that bucket
    cost on an instance kept busy at its profiled throughput ('-': the profile cannot serve the
    bucket). The profiles must share their bucket edges.
    """
    directory = user_profiles_dir(user_dir)
    documents = {name: load_named(name, directory) for name in names}
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


@profiles_group.command("cheapest")
@_MODEL
@_TPOT_MS
@click.option(
    "--gpu",
    "gpu_types",
    multiple=True,
    type=click.Choice(sorted(perfmodel.DATASHEETS)),
    help="A GPU type to compare (repeat) [default: every shipped type].",
)
@click.option(
    "--engine",
    type=click.Choice(["current", "early-vllm"]),
    default="current",
    show_default=True,
    help="Engine overheads: today's engines', or the 2023-24 vLLM's (the Mélange paper's).",
)
@_INPUT_EDGES
@_OUTPUT_EDGES
@click.option(
    "--size-point",
    type=click.Choice(["mean", "geometric", "arithmetic", "upper"]),
    default="mean",
    show_default=True,
    help="The request size that stands for a bucket: the mean of lengths spread evenly in log "
    "space (as the shipped profiles), its geometric or arithmetic midpoint, or its upper edge "
    "(with edges 1,25,100,... the sizes 25, 100, ... themselves).",
)
@_TABLE_FORMAT
def profiles_cheapest(
    model: str,
    tpot_ms: float,
    gpu_types: tuple[str, ...],
    engine: str,
    input_edges: str | None,
    output_edges: str | None,
    size_point: str,
    output: str,
) -> None:
    """Which GPU type the performance model finds cheapest per bucket, at a TPOT SLO.

    Cost per request is the instance's price / its estimated throughput in the bucket (each type
    on the instance size shipped for the model, e.g. 2x H100 for llama-3.1-70b). Rows are input
    buckets, columns output buckets; '-': no type serves the bucket within the SLO. The grid
    compares buckets one by one: the cheapest mix for a whole workload is what `melange solve`
    finds. `-o json` adds every type's cost per million requests.
    """
    require_finite({"--tpot-ms": tpot_ms})
    era: perfmodel.EngineEra = "early-vllm" if engine == "early-vllm" else "current"
    try:
        grid = profiles.cheapest_grid(
            model,
            tpot_ms / 1000,
            gpus=list(gpu_types) or None,
            input_edges=optional_edges(input_edges),
            output_edges=optional_edges(output_edges),
            era=era,
            representative=cast(perfmodel.RepresentativeRule, size_point),
        )
    except profiles.ProfileError as exc:
        fail(exc.errors, EXIT_INVALID)
    if output != "table":
        click.echo(dump(grid, output), nl=False)
        return
    ins, outs = grid["buckets"]["inputTokens"], grid["buckets"]["outputTokens"]
    header = ["INPUT \\ OUTPUT", *(f"{a}-{b}" for a, b in itertools.pairwise(outs))]
    rows = [
        [f"{a}-{b}", *("-" if w is None else w for w in row)]
        for (a, b), row in zip(itertools.pairwise(ins), grid["cheapest"], strict=True)
    ]
    for line in report.format_table(header, rows):
        click.echo(line)
    winners = [w for row in grid["cheapest"] for w in row]
    counts = {t["name"]: winners.count(t["name"]) for t in grid["types"]}
    click.echo("")
    click.echo(
        f"{model} at a {tpot_ms:g} ms TPOT SLO ({engine} engine), cheapest in "
        + ", ".join(f"{n}: {c}" for n, c in counts.items())
        + f" of {len(winners)} buckets; "
        + ", ".join(f"{t['name']} ${t['costPerHour']:.2f}/h" for t in grid["types"])
    )
