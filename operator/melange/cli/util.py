"""What every `melange` command shares: one `error:` line per problem, edge lists, YAML/JSON output.

Exit codes are part of the interface: 0 done, 1 infeasible (`melange solve`), 2 invalid input or an
input that cannot be read or reached (click's own usage errors use 2 as well); an internal error
is 5 for every command (`melange.cli.MainGroup`).
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
import yaml

if TYPE_CHECKING:
    from melange import api

EXIT_INFEASIBLE = 1
EXIT_INVALID = 2
EXIT_UNSOLVED = 4
MAX_ERROR_LINES = 100  # a document with more problems than this gets the first ones and a count
MAX_CREDENTIAL_BYTES = 1024 * 1024  # a bearer token or a CA bundle (the system's is about 220 KB)
MAX_PROFILE_BYTES = 16 * 1024 * 1024  # a measured profile with every step of 32 x 32 buckets


def fail(lines: list[str], code: int) -> NoReturn:
    for line in lines:
        click.echo(f"error: {line}", err=True)
    sys.exit(code)


def require_finite(options: Mapping[str, float | None]) -> None:
    """Exit 2 naming each option whose value is NaN or infinite (both pass `click.FloatRange`)."""
    bad = [
        f"{name}: must be a finite number, got {value}"
        for name, value in options.items()
        if value is not None and not math.isfinite(value)
    ]
    if bad:
        fail(bad, EXIT_INVALID)


def parse_edges(value: str, option: str | None = None) -> list[int]:
    """Bucket edges from `1,128,512`: at least two strictly increasing integers >= 1."""
    try:
        edges = [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"must be comma-separated integers, got {value!r}", param_hint=option
        ) from None
    if len(edges) < 2 or edges[0] < 1 or any(b <= a for a, b in itertools.pairwise(edges)):
        raise click.BadParameter(
            f"must be at least 2 strictly increasing integers >= 1, got {value!r}",
            param_hint=option,
        )
    return edges


def optional_edges(value: str | None) -> list[int] | None:
    return None if value is None else parse_edges(value)


OUTPUT_FORMAT = click.option(
    "-o", "--output", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True
)


_Command = TypeVar("_Command", bound=Callable[..., Any])


def table_format(help: str | None = None) -> Callable[[_Command], _Command]:
    """`-o table|json|yaml` (default table), for commands that print a table for a person."""
    return click.option(
        "-o",
        "--output",
        type=click.Choice(["table", "json", "yaml"]),
        default="table",
        show_default=True,
        help=help,
    )


def _read_bytes(path: str) -> bytes:
    """A file's or stdin's (`-`) bytes, one more than the documents' limit at most (so that a
    larger one is told apart); an unreadable file exits 2."""
    from melange import api

    try:
        if path == "-":
            return sys.stdin.buffer.read(api.MAX_DOCUMENT_BYTES + 1)
        with Path(path).open("rb") as file:
            return file.read(api.MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        fail([f"{path}: cannot read: {exc.strerror or exc}"], EXIT_INVALID)


def read_text(path: str | Path, limit: int, what: str = "", advice: str = "") -> str:
    """A small file's (or stdin's, `-`) UTF-8 text, at most `limit` bytes; a larger, unreadable
    or non-UTF-8 one exits 2 naming it (`what`, e.g. "--ca-file ", goes before its name, `advice`
    after the problem)."""

    def refuse(problem: str) -> NoReturn:
        fail([f"{what}{path}: {problem}{f'; {advice}' if advice else ''}"], EXIT_INVALID)

    if str(path) == "-":
        data = sys.stdin.buffer.read(limit + 1)
    else:
        try:
            with Path(path).open("rb") as file:
                data = file.read(limit + 1)
        except OSError as exc:
            refuse(f"cannot read: {exc.strerror or exc}")
    if len(data) > limit:
        refuse(f"larger than {limit} bytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        refuse(f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start}")


def fail_spec(error: api.SpecError) -> NoReturn:
    """Exit 2 with a spec's problems, one per line (the first `MAX_ERROR_LINES` and a count)."""
    lines = [str(e) for e in error.errors]
    if len(lines) > MAX_ERROR_LINES:
        more = len(lines) - MAX_ERROR_LINES
        lines = [*lines[:MAX_ERROR_LINES], f"... and {more} more errors"]
    fail(lines, EXIT_INVALID)


def read_allocation(path: str) -> api.Allocation:
    """Read a manifest from a file or stdin (`-`); every problem with it exits 2.

    The spec model is imported here, not with this module, so that commands that read no
    allocation do not load pydantic.
    """
    from melange import api

    data = _read_bytes(path)
    try:
        return api.load_bytes(data, source=path)
    except api.SpecError as exc:
        fail_spec(exc)


def dump(data: Any, output: str = "yaml") -> str:
    """`output` is "json" or "yaml" (block style, keys in their order, short lists inline)."""
    if output == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def user_profiles_dir(user_dir: Path | None) -> Path:
    """The user profile directory (`user_dir`, else the default); files in it that are not valid
    profiles are warned about."""
    from melange.tools import profiles

    directory = user_dir if user_dir is not None else profiles.user_profile_dir()
    for problem in profiles.load_user_profiles(directory).problems:
        click.echo(f"warning: {problem} (ignored)", err=True)
    return directory


def load_named(name: str, directory: Path) -> dict[str, Any]:
    """A profile by name, shipped or in `directory`; an unknown or invalid one exits 2."""
    from melange.tools import profiles

    try:
        return profiles.load_profile(name, directory)
    except profiles.UnknownProfileError as exc:
        fail([str(exc)], EXIT_INVALID)
    except profiles.ProfileError as exc:
        fail(exc.errors, EXIT_INVALID)


def read_spec(path: str) -> tuple[Any, str]:
    """The raw spec in a file or stdin (`-`), not yet validated, and its field prefix ("spec" for
    a manifest's, "" for a bare spec such as the `buckets` and `workload` that `melange workload`
    prints). A problem with the text itself (size, YAML, one document, depth, aliases) exits 2;
    the spec's own are left to the caller."""
    from melange import api

    data = _read_bytes(path)
    try:
        document = api.load_document_bytes(data, source=path)
    except api.SpecError as exc:
        fail_spec(exc)
    if isinstance(document, Mapping) and "spec" in document:
        return document["spec"], "spec"
    return document, ""
