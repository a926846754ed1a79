"""Rate-source faults at flat traffic change nothing: a real Prometheus killed and restarted (on its
own data, as a pod restart does), scrapes that stop, and the operator restarted in the middle.

After an outage, `rate()` over a range that starts inside the gap reads low. Each scenario holds
the traffic flat and asserts that no node pool was written (their resourceVersions are unchanged),
that the rate is observed again afterwards, and that the plan is still the one for the true rate.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from tests.e2e.conftest import EMITTER_RATE
from tests.e2e.kube import Kinds, Kube, eventually, reasons
from tests.e2e.operator_process import OperatorProcess
from tests.e2e.prometheus import MODEL, LoadEmitter, PrometheusServer
from tests.e2e.test_operator import make_pools, pool_versions
from tests.e2e.test_rates import at_plan_near, rate_manifest, status_of, wait_observed

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

RANGE = 16  # rate() over 16 s, scraped every second
# A scale-down window shorter than the range: the range's under-reads after a restart outlast the
# window, so only the coverage check stands between them and a scale-down.
WINDOW = 8
SETTLE = RANGE + WINDOW + 10  # after this, every under-read would have been acted on


def settle_at_plan(
    kube: Kube, namespace: str, prometheus: PrometheusServer, window: int, **prometheus_spec: Any
) -> None:
    make_pools(kube, namespace, replicas=0)
    spec = prometheus_spec or {"modelName": MODEL, "rangeSeconds": RANGE}
    manifest = rate_manifest("chat", prometheus.url, **spec)
    manifest["spec"]["rateSource"]["scaleDownStabilizationSeconds"] = window
    kube.create(manifest, namespace)
    wait_observed(kube, "chat", namespace)
    eventually(lambda: at_plan_near(kube, "chat", namespace, EMITTER_RATE), timeout=90)
    # A whole window of good observations, so the window holds nothing but the flat rate.
    time.sleep(window)


def patched_nothing(kube: Kube, namespace: str, before: dict[str, str], seconds: float) -> None:
    """The pools stay untouched for `seconds` (checked throughout, not only at the end)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert pool_versions(kube, namespace) == before, status_of(kube, "chat", namespace)
        time.sleep(1)


@pytest.mark.parametrize(
    ("outage", "restart_operator"),
    [(RANGE // 2, False), (RANGE + WINDOW, False), (RANGE + WINDOW, True)],
    ids=["shorter-than-the-range", "longer-than-range-and-window", "operator-restarted-too"],
)
def test_prometheus_restart_at_flat_traffic_patches_nothing(
    kube: Kube,
    namespace: str,
    operator: OperatorProcess,
    emitter: LoadEmitter,
    prometheus: PrometheusServer,
    outage: int,
    restart_operator: bool,
) -> None:
    settle_at_plan(kube, namespace, prometheus, WINDOW)
    versions = pool_versions(kube, namespace)

    prometheus.stop()
    if restart_operator:
        operator.kill()
    time.sleep(outage)
    prometheus.start()
    if restart_operator:
        operator.start()
    patched_nothing(kube, namespace, versions, SETTLE)
    wait_observed(kube, "chat", namespace, "True", "Observed")
    at_plan_near(kube, "chat", namespace, EMITTER_RATE)
    seen = reasons(kube.events(namespace, "chat"))
    assert "RateDrift" not in seen
    if outage > RANGE:
        # Right after the restart the range began inside the gap: held, not read low.
        assert "PartialWindow" in seen, seen


def test_own_query_after_an_outage_keeps_the_window_peak(
    kube: Kube,
    namespace: str,
    operator: OperatorProcess,
    emitter: LoadEmitter,
    prometheus: PrometheusServer,
) -> None:
    """The spec's own query cannot be checked for coverage, so its under-reads after a restart
    are observations; the failed polls during the outage keep the window's peak until a whole
    window of observations refilled it, and with a window longer than the query's range (as the
    docs advise) the range is whole again by then."""
    query = f"sum(rate({emitter.metric_name}[{RANGE}s]))"
    settle_at_plan(kube, namespace, prometheus, RANGE + WINDOW, query=query)
    versions = pool_versions(kube, namespace)

    prometheus.stop()
    wait_observed(kube, "chat", namespace, "False", "PrometheusUnavailable")
    time.sleep(2 * RANGE)
    prometheus.start()
    patched_nothing(kube, namespace, versions, SETTLE)
    wait_observed(kube, "chat", namespace, "True", "Observed")
    at_plan_near(kube, "chat", namespace, EMITTER_RATE)
    assert "RateDrift" not in reasons(kube.events(namespace, "chat"))


def test_scrapes_that_stop_hold_the_plan(
    kube: Kube,
    namespace: str,
    operator: OperatorProcess,
    emitter: LoadEmitter,
    prometheus: PrometheusServer,
) -> None:
    """The emitter frozen: Prometheus' scrapes time out, the newest samples age, then the series go
    stale. Neither a range with a gap at its end nor an empty one is a rate of 0."""
    settle_at_plan(kube, namespace, prometheus, WINDOW)
    versions = pool_versions(kube, namespace)

    emitter.process.send_signal(signal.SIGSTOP)
    try:
        eventually(
            lambda: _reason_seen(kube, namespace, {"PartialWindow", "NoData"}), timeout=RANGE * 4
        )
        patched_nothing(kube, namespace, versions, RANGE + WINDOW)
    finally:
        emitter.process.send_signal(signal.SIGCONT)
    patched_nothing(kube, namespace, versions, SETTLE)
    wait_observed(kube, "chat", namespace, "True", "Observed")
    at_plan_near(kube, "chat", namespace, EMITTER_RATE)
    assert kube.get(Kinds.allocation, "chat", namespace)["status"]["rateHistory"]


def _reason_seen(kube: Kube, namespace: str, wanted: set[str]) -> None:
    condition = kube.condition("chat", namespace, "RateObserved")
    assert condition is not None
    assert condition["status"] == "False"
    assert condition["reason"] in wanted, condition
