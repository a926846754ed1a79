"""Which Prometheus URLs the operator queries, where it sends a token, and how it builds the query
URL (`melange.controller.urls`, `melange.signals.prometheus.query_url`, the Observer)."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from melange import api
from melange.api.spec import URL_PATTERN
from melange.controller import urls
from melange.controller.observe import Observer
from melange.controller.state import AllocationState, Kube, RateState, Work
from melange.signals.prometheus import PrometheusClient, query_url
from melange.signals.rates import URLNotAllowed

BENT = [
    "http://127.0.0.1:9/internal/admin#",
    "http://127.0.0.1:9/internal/admin?x=",
    "http://p?query=up",
    "http://user:pw@p",
    "http://evil@p.monitoring.svc",
    "http://p.monitoring.svc\\@evil",
    "ftp://p",
    "file:///etc/passwd",
    "http://",
]


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("http://p:9090", "http://p:9090/api/v1/query"),
        ("http://p:9090/", "http://p:9090/api/v1/query"),
        ("https://thanos.example/prom/", "https://thanos.example/prom/api/v1/query"),
        ("http://[::1]:9090/a", "http://[::1]:9090/a/api/v1/query"),
    ],
)
def test_the_query_url_is_the_base_path_plus_the_endpoint(base: str, expected: str) -> None:
    assert query_url(base) == expected


@pytest.mark.parametrize("base", [*BENT, "http://p:port"])
def test_a_base_url_that_could_bend_the_endpoint_is_refused(base: str) -> None:
    with pytest.raises(URLNotAllowed, match=r"nothing was sent|not a usable URL"):
        query_url(base)


@pytest.mark.parametrize("base", BENT)
def test_the_spec_refuses_what_the_client_refuses(base: str) -> None:
    assert not re.fullmatch(URL_PATTERN, base)
    assert urls.refusal(base, (), sends_token=False) is not None


@pytest.mark.parametrize(
    ("host", "service"),
    [
        ("prometheus.monitoring.svc", True),
        ("prometheus.monitoring.svc.cluster.local", True),
        ("Prometheus.Monitoring.SVC.", True),
        ("monitoring.svc", False),
        ("svc.cluster.local", False),
        ("prometheus.monitoring", False),
        ("prometheus", False),
        ("127.0.0.1", False),
        ("prometheus.monitoring.svc.evil.example", False),
        ("evil-svc", False),
    ],
)
def test_in_cluster_services(host: str, service: bool) -> None:
    assert urls.is_cluster_service(host) is service


def test_without_an_allow_list_any_url_without_a_token() -> None:
    assert urls.refusal("http://127.0.0.1:9090", (), sends_token=False) is None
    assert urls.refusal("https://prometheus.example.com/x", (), sends_token=False) is None


def test_without_an_allow_list_a_token_goes_to_in_cluster_services_only() -> None:
    assert urls.refusal("http://p.monitoring.svc:9090", (), sends_token=True) is None
    assert urls.refusal("https://p.m.svc.cluster.local/prom", (), sends_token=True) is None
    message = urls.refusal("http://attacker.example:8080", (), sends_token=True)
    assert message == (
        "http://attacker.example:8080 is not an in-cluster Service (a host ending in .svc or "
        ".svc.cluster.local), and the operator sends a bearer token only to one unless its "
        "administrator allows the URL (--allow-prometheus-url); nothing was sent"
    )
    assert urls.refusal("http://127.0.0.1:9090", (), sends_token=True) is not None


def test_an_allow_list_applies_to_every_rate_source() -> None:
    allowed = (
        urls.parse_prefix("https://thanos.example/prom/"),
        urls.parse_prefix("http://127.0.0.1:9090"),
    )
    for token in (False, True):
        assert urls.refusal("https://thanos.example/prom", allowed, sends_token=token) is None
        assert urls.refusal("https://thanos.example/prom/x/", allowed, sends_token=token) is None
        assert urls.refusal("https://THANOS.example:443/prom", allowed, sends_token=token) is None
        assert urls.refusal("http://127.0.0.1:9090/", allowed, sends_token=token) is None
    refused = [
        "http://thanos.example/prom",  # another scheme
        "https://thanos.example:8443/prom",  # another port
        "https://thanos.example/prometheus",  # not below /prom
        "https://thanos.example.evil/prom",
        "http://127.0.0.1:9091",
        "http://p.monitoring.svc:9090",  # the default no longer applies
    ]
    for url in refused:
        message = urls.refusal(url, allowed, sends_token=False)
        assert message == (
            f"{url} is not under a Prometheus URL the operator allows (--allow-prometheus-url: "
            "https://thanos.example/prom, http://127.0.0.1:9090); nothing was sent"
        ), url
    for url in ("https://thanos.example/prom/../admin", "https://thanos.example/prom/%2e%2E/a"):
        message = urls.refusal(url, allowed, sends_token=False)
        assert message is not None
        assert ". and .. path segments" in message


@pytest.mark.parametrize(
    "text", ["thanos.example", "https://thanos.example/?x=1", "https://u@thanos", "ftp://t", ""]
)
def test_an_allow_list_entry_is_a_url_prefix(text: str) -> None:
    with pytest.raises(ValueError, match="--allow-prometheus-url"):
        urls.parse_prefix(text)


def test_a_prefix_prints_as_written() -> None:
    assert str(urls.parse_prefix("HTTPS://P.example:443/a/")) == "https://p.example/a"
    assert str(urls.parse_prefix("http://[::1]:9090")) == "http://[::1]:9090"


# -- the Observer checks the URL before it reads a Secret or sends anything ------------------------


class _Kube:
    def __init__(self) -> None:
        self.read: list[str] = []

    def credentials(
        self, namespace: str, source: api.PrometheusSource
    ) -> tuple[str | None, str | None]:
        self.read.append(namespace)
        return "s3cret", None


class _Prometheus:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str | None]] = []

    async def query_rate(self, base_url: str, query: str, **options: Any) -> float:
        self.sent.append((base_url, options.get("bearer_token")))
        return 1.0


def _observe(url: str, allowed: tuple[str, ...]) -> tuple[_Kube, _Prometheus, Work]:
    source = {"url": url, "modelName": "m", "bearerTokenSecretRef": {"name": "t", "key": "k"}}
    spec = api.validate_spec(
        {
            "buckets": {"inputTokens": [1, 10], "outputTokens": [1, 10]},
            "workload": {"distribution": [[1]], "totalRate": 1},
            "gpus": [
                {
                    "name": "L4",
                    "costPerHour": 1,
                    "throughput": [[1]],
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                }
            ],
            "rateSource": {"prometheus": source},
        }
    )
    kube, prometheus, work = _Kube(), _Prometheus(), Work(status={})
    observer = Observer(
        cast(Kube, kube),
        cast(PrometheusClient, prometheus),
        tuple(urls.parse_prefix(prefix) for prefix in allowed),
    )
    state = AllocationState(uid=None, status={}, rate=RateState())
    asyncio.run(observer.observe(("ns", "a"), spec, state, work, datetime.now(UTC)))
    return kube, prometheus, work


def test_a_refused_url_reads_no_secret_and_sends_nothing() -> None:
    kube, prometheus, work = _observe("http://attacker.example:8080", ())
    assert kube.read == []
    assert prometheus.sent == []
    assert [(e.type, e.reason) for e in work.events] == [("Warning", "URLNotAllowed")]


def test_an_allowed_url_gets_the_token() -> None:
    for url, allowed in [
        ("http://prometheus.monitoring.svc:9090", ()),
        ("http://127.0.0.1:9090", ("http://127.0.0.1:9090",)),
    ]:
        kube, prometheus, _ = _observe(url, allowed)
        assert kube.read == ["ns"]
        assert prometheus.sent == [(url, "s3cret")]
