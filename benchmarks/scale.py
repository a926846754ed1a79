"""Many allocations on one operator: time to all Ready, memory, and API requests while steady.

    python benchmarks/scale.py [--namespaces 10] [--per-namespace 20] [--resync 30] [--window 60]

Starts etcd + kube-apiserver (tests/controlplane, built by tests/controlplane/build.sh) with an
audit log of every request, creates `--namespaces` namespaces with `--per-namespace` allocations
each (two Deployment pools per allocation), starts `melange run` on all of them, creates every
allocation at once and measures:
- the time until every allocation is Ready, against this client's own time to create them;
- the operator's resident memory (VmRSS) once all are Ready;
- its API requests per second over `--window` seconds once steady, from the audit log, against the
  floor of the design (each pool read once per resync interval, the allocations listed once per
  namespace and resync interval to check the watch's view, the Lease renewed every 2 s).
It also checks what the tests check: every pool at its plan, nothing patched while steady.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from tests.chaos.scale import measure
from tests.controlplane.harness import AUDIT_POLICY_ALL_REQUESTS, ControlPlane

LEASE_RENEW_SECONDS = 2.0


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--per-namespace", type=int, default=20)
    parser.add_argument("--resync", type=float, default=30.0, help="the operator's resync (s)")
    parser.add_argument("--window", type=float, default=60.0, help="steady window measured (s)")
    args = parser.parse_args()

    with (
        ControlPlane(audit=True, audit_policy=AUDIT_POLICY_ALL_REQUESTS) as cp,
        tempfile.TemporaryDirectory(prefix="melange-scale-") as workdir,
    ):
        result = measure(
            cp,
            Path(workdir),
            namespaces=args.namespaces,
            per_namespace=args.per_namespace,
            resync=args.resync,
            window=args.window,
            ready_timeout=1800.0,
        )
    print(result.report(args.resync))
    floor = (2 * result.allocations + args.namespaces) / args.resync + 2 / LEASE_RENEW_SECONDS
    print(
        f"  floor of the design:       {floor:.1f}/s (2 pool reads per allocation and a LIST of "
        "the allocations per namespace per resync, a Lease read and renewal every 2 s)"
    )
    if result.not_at_plan or result.pool_writes_while_steady:
        print(f"WRONG: not at the plan: {result.not_at_plan[:10]}; ", end="")
        print(f"pool writes while steady: {result.pool_writes_while_steady}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
