"""The `melange` command: solve allocations offline, build their inputs, run the operator.

Exit codes are part of the interface: 0 solved, 1 infeasible (the reason on stderr), 2 invalid input
(every error on stderr, one per line; click's own usage errors use 2 as well); `profile` adds 3 for
a measurement stopped with buckets left; `solve` adds 4 for a time limit that ran out with neither
a plan nor a proof of infeasibility.

Each command lives in its own module, imported only when that command runs or shows its help: the
solver, the Prometheus and HTTP clients and Kopf cost hundreds of milliseconds to import, and
`melange --help` or `melange profiles list` should not pay for them.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import click


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
    "run": LazyCommand(
        "melange.cli.run",
        "run",
        "Run the operator: reconcile MelangeAllocations and scale their node pools.",
    ),
    "solve": LazyCommand(
        "melange.cli.solve",
        "solve",
        "Print the cheapest plan for the allocation in FILE ('-' reads stdin).",
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


@click.group(
    cls=LazyGroup,
    lazy_commands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="melange-operator", prog_name="melange")
def main() -> None:
    """Keep LLM serving on the cheapest mix of GPU types that meets the latency SLO.

    `solve` plans offline from a MelangeAllocation file; `workload` turns a request log (or vLLM's
    histograms in Prometheus) into the spec's workload; `profile` measures a GPU's throughput per
    bucket on a running server; `profiles` lists, estimates, imports and compares GPU throughput
    profiles; `run` starts the Kubernetes operator.
    """


if __name__ == "__main__":  # pragma: no cover
    main()
