"""The operator killed with SIGKILL in the middle of a burst of spec edits, then started again.

Every edit changes the request rate, so the plan moves with it; the operator is killed after the
10th of 20 edits (no clean-up, no Lease release) and started again once the burst is over.
"""

from __future__ import annotations

import itertools
import time

import pytest

from tests.e2e.kube import Kinds, Kube, eventually
from tests.e2e.operator_process import OperatorProcess
from tests.e2e.test_operator import make_pools, manifest, pool_replicas, wait_ready

from . import audit
from .plans import by_pool, equal, plan_at, spec_at

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

INITIAL_RATE = 34
RATES = [INITIAL_RATE + 3 * k for k in range(1, 21)]
KILL_AFTER = 10  # edits sent before the SIGKILL


def test_killed_mid_burst_ends_at_the_last_edits_plan(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    make_pools(kube, namespace)
    kube.create(manifest("chat", spec_at(INITIAL_RATE)), namespace)
    wait_ready(kube, "chat", namespace)
    equal(pool_replicas(kube, namespace), plan_at(INITIAL_RATE))
    plans = [plan_at(rate) for rate in [INITIAL_RATE, *RATES]]
    # the burst moves the plan: most edits change it
    assert sum(a != b for a, b in itertools.pairwise(plans)) >= 10

    killed = 0.0
    for k, rate in enumerate(RATES, start=1):
        kube.merge_patch(
            Kinds.allocation, "chat", namespace, {"spec": {"workload": {"totalRate": rate}}}
        )
        if k == KILL_AFTER:
            operator.kill()
            killed = time.time()
        time.sleep(0.2)
    last_generation = int(kube.allocation("chat", namespace)["metadata"]["generation"])
    restarted = time.time()
    operator.start()

    final = plan_at(RATES[-1])
    eventually(lambda: equal(pool_replicas(kube, namespace), final), timeout=90)
    eventually(
        lambda: equal(
            kube.allocation("chat", namespace)["status"]["observedGeneration"], last_generation
        ),
        timeout=60,
    )
    wait_ready(kube, "chat", namespace)
    settled = time.time()
    time.sleep(2 * 3)  # two resync intervals: nothing moves once the plan is reached

    writes = audit.pool_patches(operator.writes(), namespace)
    values = audit.patched_values(writes)
    print(f"pool writes (value sequences): {values}")
    allowed = {pool: {by_pool(plan)[pool] for plan in plans} for pool in by_pool(final)}
    for pool, seen in values.items():
        stray = [v for v in seen if v not in allowed[pool]]
        assert stray == [], f"{pool} patched to {stray}, in no edit's plan ({allowed[pool]})"
    # the killed process wrote nothing after its death (a request it had sent may still finish)
    assert audit.between(operator.writes(), killed + 1.0, restarted) == []
    # the restarted one reads the last spec only: it writes the last plan, once per pool at most
    after = audit.patched_values(audit.between(writes, restarted, time.time()))
    for pool, seen in after.items():
        assert seen == [by_pool(final)[pool]], f"{pool} patched to {seen} after the restart"
    assert audit.between(audit.succeeded(writes), settled, time.time()) == []
    equal(pool_replicas(kube, namespace), final)
    status = kube.allocation("chat", namespace)["status"]
    assert status["observedGeneration"] == last_generation
    assert status["solvedRate"] == RATES[-1]
