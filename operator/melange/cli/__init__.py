"""The `melange` command: solve allocations offline, build their inputs, run the operator.

Exit codes are part of the interface: 0 solved, 1 infeasible (the reason on stderr; for `status`,
no such allocation), 2 invalid input
(every error on stderr, one per line; click's own usage errors use 2 as well); `profile` adds 3 for
a measurement stopped with buckets left; `solve` adds 4 for a time limit that ran out with neither
a plan nor a proof of infeasibility. Any command ends with 5 on an internal error (an exception no
input should cause: two lines on stderr, the traceback only with `--debug`), 130 when interrupted
(Ctrl-C) and 141 when its output is closed early (`melange ... | head`).

Each command lives in its own module, imported only when that command runs or shows its help: the
solver, the Prometheus and HTTP clients and Kopf cost hundreds of milliseconds to import, and
`melange --help` or `melange profiles list` should not pay for them.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import click

from melange.cli.version import version_option

EXIT_INTERNAL = 5  # an exception no input should cause: a bug, reported in two lines
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports a command ended by SIGINT
EXIT_BROKEN_PIPE = 141  # the output was closed early, as a shell reports SIGPIPE
MAX_MESSAGE_CHARS = 200  # of an internal error's message, on one line
DEBUG_ENV = "MELANGE_DEBUG"


@dataclass(frozen=True)
class LazyCommand:
    """Where a command is defined, and the first paragraph of its help for the command list."""

    module: str
    attribute: str
    summary: str


COMMANDS: Mapping[str, LazyCommand] = {
    "profile": LazyCommand(
        "melange.cli.profile",
        "profile_command",
        "Measure a GPU profile on the server at URL (e.g. http://localhost:8000, vLLM's API).",
    ),
    "profiles": LazyCommand(
        "melange.cli.profiles",
        "profiles_group",
        "GPU throughput profiles: the shipped library, estimates for new set-ups, measured ones.",
    ),
    "route": LazyCommand(
        "melange.cli.route",
        "route_command",
        "Serve an OpenAI-compatible proxy that sends each request to the GPU type sized for it.",
    ),
    "run": LazyCommand(
        "melange.cli.run",
        "run",
        "Run the operator: reconcile MelangeAllocations and scale their node pools.",
    ),
    "simulate": LazyCommand(
        "melange.cli.simulate",
        "simulate_command",
        "Simulate the plan for the allocation in FILE ('-' reads stdin) request by request.",
    ),
    "solve": LazyCommand(
        "melange.cli.solve",
        "solve",
        "Print the cheapest plan for the allocation in FILE ('-' reads stdin).",
    ),
    "status": LazyCommand(
        "melange.cli.status",
        "status_command",
        "Show what the operator decided for the MelangeAllocation NAME, and why.",
    ),
    "workload": LazyCommand(
        "melange.cli.workload",
        "workload_command",
        "Print the spec's `buckets` and `workload` blocks for the requests in LOG ('-': stdin), "
        "or for those a vLLM deployment finished lately (--from-prometheus).",
    ),
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use; its help lists them from `summary`."""

    def __init__(self, *args: Any, lazy_commands: Mapping[str, LazyCommand], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        lazy = self.lazy_commands.get(cmd_name)
        if lazy is None:
            return super().get_command(ctx, cmd_name)
        command = getattr(importlib.import_module(lazy.module), lazy.attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{lazy.module}.{lazy.attribute} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """As click lists commands, with a stand-in built from `summary` for each lazy one."""
        commands: list[tuple[str, click.Command]] = []
        for name in self.list_commands(ctx):
            lazy = self.lazy_commands.get(name)
            command = (
                click.Command(name, help=lazy.summary)
                if lazy is not None
                else super().get_command(ctx, name)
            )
            if command is not None and not command.hidden:
                commands.append((name, command))
        if not commands:
            return
        limit = formatter.width - 6 - max(len(name) for name, _ in commands)
        with formatter.section("Commands"):
            formatter.write_dl([(name, c.get_short_help_str(limit)) for name, c in commands])


class MainGroup(LazyGroup):
    """The `melange` group: whatever its commands raise ends in an exit code that says so.

    Click's own errors (usage, `--help`, `sys.exit`) pass through unchanged. Any other exception is
    a bug: `EXIT_INTERNAL` with two lines on stderr, and the traceback only with `--debug`.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo(err=True)  # ends the terminal's `^C` line
            click.echo("error: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
                _discard_stdout()
                sys.exit(EXIT_BROKEN_PIPE)
            internal_error(exc, debug=bool(ctx.params.get("debug")))


def internal_error(exc: BaseException, *, debug: bool) -> NoReturn:
    """Exit `EXIT_INTERNAL`: the exception's type and message on one line, then what to do."""
    if debug:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    click.echo(f"error: internal error: {describe(exc)}", err=True)
    if debug:
        click.echo(
            "error: this is a bug in melange; please report it with the traceback above", err=True
        )
    else:
        click.echo(
            "error: this is a bug in melange; please report it with the traceback that "
            f"`melange --debug ...` (or {DEBUG_ENV}=1) prints",
            err=True,
        )
    sys.exit(EXIT_INTERNAL)


def describe(exc: BaseException) -> str:
    """`Type: message`, the message on one line of at most `MAX_MESSAGE_CHARS` printable
    characters (an exception's message may hold a whole input, or control characters)."""
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not hide the error
        message = "(its message cannot be shown)"
    message = " ".join(message.split())
    message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    name = type(exc).__name__
    return f"{name}: {message}" if message else name


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises no second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind stdout (a test runner's)
        pass


@click.group(
    cls=MainGroup,
    lazy_commands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--debug",
    is_flag=True,
    envvar=DEBUG_ENV,
    show_envvar=True,
    help="On an internal error (exit 5), print the traceback too.",
)
@version_option
def main(debug: bool) -> None:
    """Keep LLM serving on the cheapest mix of GPU types that meets the latency SLO.

    `solve` plans offline from a MelangeAllocation file; `workload` turns a request log (or vLLM's
    histograms in Prometheus) into the spec's workload; `profile` measures a GPU's throughput per
    bucket on a running server; `profiles` lists, estimates, imports and compares GPU throughput
    profiles; `run` starts the Kubernetes operator.

    Exit codes: 0 done, 1 infeasible (solve) or not found (status), 2 invalid input, 3 stopped
    with buckets left
    (profile), 4 time limit reached unsolved (solve), 5 internal error (a bug; --debug shows the
    traceback), 130 interrupted, 141 output closed early.
    """
    del debug  # read by MainGroup.invoke, from the context, when a command raises


if __name__ == "__main__":  # pragma: no cover
    main()
