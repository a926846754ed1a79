"""What every `melange` command shares: one `error:` line per problem, edge lists, YAML/JSON output.

Exit codes are part of the interface: 0 done, 1 infeasible (`melange solve`), 2 invalid input or an
input that cannot be read or reached (click's own usage errors use 2 as well).
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import Any, NoReturn

import click
import yaml

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


def dump(data: Any, output: str = "yaml") -> str:
    """`output` is "json" or "yaml" (block style, keys in their order, short lists inline)."""
    if output == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
