"""Ownership benchmark: what checking that an allocation owns its node pools costs per reconcile.

    python benchmarks/ownership.py [--allocations 100 1000 3000] [--gpus 4]

Before each allocation patches a pool, the operator checks that no earlier allocation claims it
(`Pools.scale`). The claims come from every stored spec, so a check that scans them all costs
O(allocations) per reconcile, O(allocations²) per interval. The claim index is built once per
spec change instead. This times one check with the index built again every time (the scan, as a
spec change forces: the baseline) against the check from the built index, in the same process,
and prints the ratio. The API server's answer on a kind's scope (cached by the operator after the
first lookup) is a constant here: this measures the operator's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).parents[1]))

from melange import api
from melange.controller.pools import Pools
from melange.controller.settings import Settings
from melange.controller.state import Kube


class Scopes:
    """Answers the one question the ownership check asks the API: a kind's resource and scope."""

    def scope(self, ref: api.ObjectReference) -> tuple[str, bool]:
        return "deployments", True


def bodies(allocations: int, gpus: int) -> dict[tuple[str, str], dict[str, Any]]:
    stored = {}
    for k in range(allocations):
        namespace, name = f"team-{k % 50}", f"chat-{k}"
        stored[(namespace, name)] = {
            "uid": f"uid-{k}",
            "generation": 1,
            "created": f"2026-01-01T00:{k // 60 % 60:02d}:{k % 60:02d}Z",
            "spec": {
                "gpus": [
                    {
                        "name": f"gpu-{g}",
                        "scaleTargetRef": {
                            "apiVersion": "apps/v1",
                            "kind": "Deployment",
                            "name": f"{name}-pool-{g}",
                        },
                    }
                    for g in range(gpus)
                ]
            },
            "status": {},
        }
    return stored


async def rebuilt(pools: Pools) -> object:
    pools.claims_changed()  # what every check cost before the index
    return await pools.claim_index()


def per_check(check: Callable[[], Awaitable[object]], repeat: int) -> float:
    async def run() -> list[float]:
        await check()  # the scope cache warm, as after the first reconcile
        times = []
        for _ in range(repeat):
            began = time.perf_counter()
            await check()
            times.append(time.perf_counter() - began)
        return times

    return statistics.median(asyncio.run(run()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allocations", type=int, nargs="+", default=[100, 1000, 3000])
    parser.add_argument("--gpus", type=int, default=4, help="GPU types (node pools) per allocation")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    print(f"{'allocations':>11} {'scan (ms)':>10} {'index (ms)':>11} {'scan/index':>11}")
    for allocations in args.allocations:
        pools = Pools(cast(Kube, Scopes()), Settings(), bodies(allocations, args.gpus))

        scanned = per_check(functools.partial(rebuilt, pools), args.repeat)
        indexed = per_check(pools.claim_index, args.repeat)
        print(
            f"{allocations:>11} {scanned * 1e3:>10.2f} {indexed * 1e3:>11.4f} "
            f"{scanned / indexed:>11.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
