"""Every solve returns: rates at which HiGHS 1.16's presolve looped on a repair model and never
read its time limit (a reconcile would have hung for good). Run in a child process, so that a
regression fails this test instead of hanging the suite."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.e2e.kube import REPO

# examples/mixed.yaml at these rates (req/s) hung before the decomposition's small models were
# solved without presolve; found by replaying a day of traffic through the operator's decisions.
HUNG_RATES = (18.799574439, 40.46, 61.24, 82.85, 106.08, 121.39, 126.34)
# Far more than the 2 s the solves are given: only a solve that never returns reaches it.
NEVER = 300

PROGRAM = """
import json, sys
from melange import api
from melange.plan import solver
spec = api.load_bytes(open("examples/mixed.yaml", "rb").read()).spec
print(json.dumps([solver.solve_spec(spec, rate, time_limit=2).status for rate in %r]))
"""


def test_the_solves_that_once_hung_return_plans() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM % (HUNG_RATES,)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=NEVER,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    statuses = json.loads(result.stdout)
    assert len(statuses) == len(HUNG_RATES)
    assert set(statuses) <= {"Optimal", "Feasible"}, statuses
