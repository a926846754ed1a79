"""The installed version, read from the package metadata only when asked (importing
`importlib.metadata` costs ~50 ms, too much for every `melange` start), and `melange --version`,
which prints it."""

from __future__ import annotations

import click

PROG_NAME = "melange"


def installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("melange-operator")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0.0.0"


def version_line() -> str:
    """What `melange --version` prints: `melange, version X` (X as in a measured profile's
    `measurement.tool`, `melange X`)."""
    return f"{PROG_NAME}, version {installed_version()}"


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(version_line())
    ctx.exit()


version_option = click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and exit.",
)
