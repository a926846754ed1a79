"""`melange profile`: measure a GPU profile on a running OpenAI-compatible (vLLM-style) server.

The measurement is in `melange.tools.measurement` (what to send, how to judge it, the output document) and
`melange.tools.endpoint` (the HTTP client and the load generator); this module is the command: options,
the output file (which is also the resume state), progress and exit codes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import yaml

from melange.cli.util import (
    EXIT_INVALID,
    MAX_PROFILE_BYTES,
    dump,
    fail,
    parse_edges,
    read_text,
    require_finite,
)
from melange.cli.version import installed_version
from melange.tools import measurement, profiles

if TYPE_CHECKING:
    from melange.tools import endpoint

EXIT_PARTIAL = 3  # stopped with buckets left (--max-duration): run the same command to resume
HEADER = (
    "# A measured profile, written by `melange profile` (`measurement:` says how).\n"
    "# Add it to your profiles with `melange profiles import <this file>`.\n"
)


def _write(path: Path, text: str) -> None:
    """Replace `path` atomically: an interrupted run leaves the previous state, never half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        fail([f"{path}: cannot write: {exc.strerror or exc}"], EXIT_INVALID)


def _save_partial(path: Path, document: dict[str, Any]) -> None:
    _write(path, measurement.partial_header(document) + dump(document))


def _load_state(
    path: Path, conditions: measurement.Conditions, meta: measurement.Meta, restart: bool
) -> dict[str, Any]:
    """The document to continue: the saved one when it matches, else a new one."""
    if restart or not path.exists():
        return measurement.new_document(meta, conditions)
    text = read_text(path, MAX_PROFILE_BYTES, advice="pass --restart to overwrite it")
    try:
        saved = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as exc:
        fail([f"{path}: cannot read it to resume: {exc}; pass --restart to overwrite it"], 2)
    recorded = saved.get("measurement") if isinstance(saved, dict) else None
    if not isinstance(recorded, dict) or not str(recorded.get("tool", "")).startswith("melange"):
        fail(
            [
                f"{path} exists and was not written by `melange profile`; "
                "choose another --output-file or pass --restart to overwrite it"
            ],
            EXIT_INVALID,
        )
    mismatches = conditions.mismatches(saved)
    if mismatches:
        fail(
            [
                f"{path} holds a measurement under other conditions, so it cannot be resumed:",
                *(f"  {m}" for m in mismatches),
                "pass --restart to measure again from scratch (or choose another --output-file)",
            ],
            EXIT_INVALID,
        )
    if measurement.is_finished(saved):
        return dict(saved)
    try:
        measurement.pending(saved)
    except (KeyError, TypeError, ValueError):
        fail([f"{path}: its pending list is not readable; pass --restart"], EXIT_INVALID)
    measurement.update_meta(saved, meta)
    return dict(saved)


@dataclass
class _Progress:
    """Buckets done / total on stderr when it is a terminal; one line per bucket either way."""

    step: Callable[[measurement.Bucket, float], None] | None
    done: Callable[[str], None]


@contextlib.contextmanager
def _progress(total: int, done: int) -> Iterator[_Progress]:
    if not sys.stderr.isatty():
        yield _Progress(step=None, done=lambda line: click.echo(line, err=True))
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("buckets", total=total, completed=done)

        def step(bucket: measurement.Bucket, rate: float) -> None:
            bar.update(task, description=f"{bucket.label} at {rate:.3g} req/s")

        def finished(line: str) -> None:
            bar.advance(task)
            console.print(line, markup=False, highlight=False)

        yield _Progress(step=step, done=finished)


def _summary(result: measurement.BucketMeasurement, percentile: float) -> str:
    record = result.as_record()
    tpot = record["tpotSeconds"]
    at = f"p{percentile:g} TPOT {tpot * 1000:.1f} ms" if tpot is not None else result.note or ""
    return (
        f"{result.bucket.label}: {record['throughput']:g} req/s ({at}; {len(result.steps)} steps)"
    )


async def _measure(
    document: dict[str, Any],
    output: Path,
    client: endpoint.Endpoint,
    run: endpoint.BucketRun,
    todo: list[measurement.Bucket],
    percentile: float,
) -> str | None:
    """Measure the buckets in `todo`, saving after each; the error that stopped it, if any."""
    from melange.tools import endpoint

    async with client:
        try:
            await client.check()
            await client.negotiate()
        except endpoint.EndpointError as exc:
            fail([str(exc)], EXIT_INVALID)
        measurement.set_conditions(document, exactOutputLength=client.features.exact_length)
        _save_partial(output, document)  # an unwritable --output-file fails now, not after a bucket
        total = sum(len(row) for row in document["throughput"])
        with _progress(total, total - len(todo)) as progress:
            run.on_step = progress.step
            for bucket in todo:
                try:
                    result = await endpoint.measure_bucket(client, bucket, run)
                except endpoint.OutOfTime:
                    return None
                except endpoint.EndpointError as exc:
                    return str(exc)
                measurement.record_bucket(document, result)
                measurement.set_conditions(
                    document,
                    promptLength=(
                        "calibrated: filler words adjusted until usage.prompt_tokens matched"
                        if client.features.usage
                        else "approximate: one token per filler word and one for the number "
                        "(the server reports no usage)"
                    ),
                )
                _save_partial(output, document)
                progress.done(_summary(result, percentile))
    return None


def _output_file(output: Path | None, deprecated: Path | None) -> Path:
    """The profile file: --output-file, or the deprecated --output (with a warning)."""
    if output is not None and deprecated is not None:
        raise click.UsageError("give --output-file (-f) only; --output is its deprecated spelling")
    if deprecated is not None:
        click.echo(
            "warning: `melange profile --output` is deprecated: use --output-file (-f); "
            "-o is the output format in every other command",
            err=True,
        )
        return deprecated
    if output is None:
        raise click.MissingParameter(param_hint="'-f' / '--output-file'", param_type="option")
    return output


@click.command("profile")
@click.argument("url")
@click.option("--model", required=True, help="The served model name, as in /v1/models.")
@click.option("--gpu", required=True, help="GPU type the server runs on (the profile's `name`).")
@click.option(
    "--cost-per-hour",
    type=click.FloatRange(min=0, min_open=True),
    required=True,
    help="Price of one such GPU instance per hour (the profile's `costPerHour`).",
)
@click.option(
    "--tpot-slo",
    type=click.FloatRange(min=0, min_open=True, max=10),
    required=True,
    help="SLO on the time per output token, in seconds (e.g. 0.04).",
)
@click.option(
    "--input-edges", required=True, help="Input-length bucket edges in tokens, e.g. 1,128,512."
)
@click.option(
    "--output-edges", required=True, help="Output-length bucket edges in tokens, e.g. 1,64,256."
)
@click.option(
    "-f",
    "--output-file",
    "output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The profile file to write (required); while buckets are left it holds the progress, "
    "and running the same command again resumes from it.",
)
@click.option(
    "--output",
    "deprecated_output",
    type=click.Path(dir_okay=False, path_type=Path),
    hidden=True,
    help="Deprecated spelling of --output-file.",
)
@click.option(
    "--percentile",
    type=click.FloatRange(min=1, max=99.9),
    default=90.0,
    show_default=True,
    help="Percentile of the per-request TPOT that must be within the SLO.",
)
@click.option(
    "--step-seconds",
    type=click.FloatRange(min=0.1),
    default=20.0,
    show_default=True,
    help="Measured window of each rate step (after a warm-up of one request's time at the SLO).",
)
@click.option(
    "--refine",
    type=click.IntRange(0, 10),
    default=3,
    show_default=True,
    help="Bisections between the highest passing and the lowest failing rate.",
)
@click.option(
    "--size-point",
    type=click.Choice(measurement.SIZE_POINTS),
    default="mean",
    show_default=True,
    help="Request length that stands for a bucket [low, high): the mean of lengths spread evenly "
    "in log space (as the estimates), its geometric or arithmetic midpoint, or high - 1 "
    "(conservative).",
)
@click.option(
    "--arrivals",
    type=click.Choice(measurement.ARRIVALS),
    default="uniform",
    show_default=True,
    help="Evenly spaced requests (a steady load), or Poisson arrivals (bursty; a lower rate).",
)
@click.option(
    "--max-duration",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds this run may take; it stops before a step that would not fit, saves the "
    "buckets measured so far and exits 3.",
)
@click.option(
    "--api-key",
    envvar="OPENAI_API_KEY",
    help="Bearer token for the server [default: $OPENAI_API_KEY].",
)
@click.option(
    "--profile-name",
    help="The profile's name [default: MODEL/GPU/tpot-<SLO>ms, lower-cased].",
)
@click.option("--restart", is_flag=True, help="Ignore (and overwrite) a saved measurement.")
def profile_command(
    url: str,
    model: str,
    gpu: str,
    cost_per_hour: float,
    tpot_slo: float,
    input_edges: str,
    output_edges: str,
    output: Path | None,
    deprecated_output: Path | None,
    percentile: float,
    step_seconds: float,
    refine: int,
    size_point: measurement.SizePoint,
    arrivals: measurement.Arrivals,
    max_duration: float | None,
    api_key: str | None,
    profile_name: str | None,
    restart: bool,
) -> None:
    """Measure a GPU profile on the server at URL (e.g. http://localhost:8000, vLLM's API).

    For each (input-length, output-length) bucket: the highest request rate at which the
    --percentile of the time per output token stays within --tpot-slo while the server keeps up.
    Each bucket is measured with requests of one length (--size-point), prompts sized by the
    server's own token count, exact output lengths (vLLM's ignore_eos), and open-loop load stepped
    up from one request at a time, then bisected. See `measurement:` in the output for the details.

    The output is written after every bucket; running the same command again resumes where it
    stopped. Exits 0 when the profile is complete (import it with `melange profiles import`),
    2 on invalid options or a server that cannot be measured, 3 when buckets are left.
    """
    output = _output_file(output, deprecated_output)

    import asyncio

    from melange.tools import (
        endpoint,  # aiohttp: imported by this command only, not by every `melange`
    )

    require_finite(
        {
            "--cost-per-hour": cost_per_hour,
            "--tpot-slo": tpot_slo,
            "--percentile": percentile,
            "--step-seconds": step_seconds,
            "--max-duration": max_duration,
        }
    )
    inputs, outputs = (
        parse_edges(input_edges, "--input-edges"),
        parse_edges(output_edges, "--output-edges"),
    )
    conditions = measurement.Conditions(
        endpoint=endpoint.base_url(url),
        model=model,
        tpot_seconds=tpot_slo,
        percentile=percentile,
        input_edges=tuple(inputs),
        output_edges=tuple(outputs),
        size_point=size_point,
        arrivals=arrivals,
    )
    name = profile_name or measurement.default_profile_name(model, gpu, tpot_slo)
    if not profiles.PROFILE_NAME.match(name) or len(name) > profiles.MAX_PROFILE_NAME:
        fail(
            [
                f"--profile-name: must be lower-case letters, digits, '.', '_' or '-', in parts "
                f"joined by '/', got {name!r}"
            ],
            EXIT_INVALID,
        )
    meta = measurement.Meta(
        profile=name,
        gpu=gpu,
        cost_per_hour=cost_per_hour,
        model=model,
        tool=f"melange {installed_version()}",
    )
    started = time.monotonic()
    document = _load_state(output, conditions, meta, restart)
    if measurement.is_finished(document):
        click.echo(f"{output}: every bucket is already measured (pass --restart to measure again)")
        return
    total = sum(len(row) for row in document["throughput"])
    left = set(measurement.pending(document))
    todo = [
        b for b in measurement.buckets(inputs, outputs, size_point) if (b.row, b.column) in left
    ]
    if len(left) < total:
        click.echo(f"resuming: {total - len(left)} of {total} buckets already measured", err=True)
    else:
        measurement.set_conditions(
            document, started=dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        )
    criteria = measurement.Criteria(tpot_slo=tpot_slo, percentile=percentile)
    run = endpoint.BucketRun(
        criteria=criteria,
        step_seconds=step_seconds,
        refine=refine,
        arrivals=arrivals,
        budget=measurement.Budget(started=started, seconds=max_duration),
    )
    client = endpoint.Endpoint(url=url, model=model, api_key=api_key or None)
    try:
        error = asyncio.run(_measure(document, output, client, run, todo, percentile))
    except KeyboardInterrupt:
        error = "interrupted"
    left_now = len(measurement.pending(document))
    resume = (
        f"{total - left_now} of {total} buckets measured, saved in {output}; "
        "run the same command again to resume"
    )
    if error is not None:
        fail([error, resume], EXIT_INVALID)
    if left_now:
        fail([f"--max-duration {max_duration or 0:g} s reached: {resume}"], EXIT_PARTIAL)
    final = measurement.finish_document(
        document, dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )
    _write(output, HEADER + dump(final))
    click.echo(
        f"wrote {output}: profile {final['profile']} ({total} bucket{'s' * (total != 1)}); "
        f"add it with `melange profiles import {output}`"
    )
