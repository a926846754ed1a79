"""What every `melange` command shares: one `error:` line per problem, edge lists, YAML/JSON output.

Exit codes are part of the interface: 0 done, 1 infeasible (`melange solve`), 2 invalid input or an
input that cannot be read or reached (click's own usage errors use 2 as well).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import yaml

if TYPE_CHECKING:
    from melange import api

EXIT_INFEASIBLE = 1
EXIT_INVALID = 2
EXIT_UNSOLVED = 4


def fail(lines: list[str], code: int) -> NoReturn:
    for line in lines:
        click.echo(f"error: {line}", err=True)
    sys.exit(code)


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


def read_allocation(path: str) -> api.Allocation:
    """Read a manifest from a file or stdin (`-`); every problem with it exits 2.

    The spec model is imported here, not with this module, so that commands that read no
    allocation do not load pydantic.
    """
    from melange import api

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        fail([f"{path}: cannot read: {exc.strerror or exc}"], EXIT_INVALID)
    try:
        return api.load_text(text, source=path)
    except api.SpecError as exc:
        fail([str(e) for e in exc.errors], EXIT_INVALID)


def dump(data: Any, output: str = "yaml") -> str:
    """`output` is "json" or "yaml" (block style, keys in their order, short lists inline)."""
    if output == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
