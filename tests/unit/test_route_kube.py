"""What `melange route` reads from Kubernetes objects (melange.route.kube), and how the router keeps
its upstreams as the servers of a type change (melange.route.proxy.Router)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes.client import (
    DiscoveryV1EndpointPort,
    V1Endpoint,
    V1EndpointConditions,
    V1EndpointSlice,
    V1ObjectMeta,
)

from melange.plan import routing as route
from melange.route import kube, proxy


def endpoint_slice(
    addresses: list[tuple[str, bool | None]],
    ports: list[tuple[str | None, int]],
    address_type: str = "IPv4",
) -> V1EndpointSlice:
    return V1EndpointSlice(
        metadata=V1ObjectMeta(name="s"),
        address_type=address_type,
        endpoints=[
            V1Endpoint(
                addresses=[address],
                conditions=None if ready is None else V1EndpointConditions(ready=ready),
            )
            for address, ready in addresses
        ],
        ports=[DiscoveryV1EndpointPort(name=name, port=port) for name, port in ports],
    )


def test_ready_endpoints_at_the_named_port() -> None:
    piece = endpoint_slice(
        [("10.0.0.1", True), ("10.0.0.2", False), ("10.0.0.3", None)],
        [("metrics", 9090), ("http", 8000)],
    )
    # ready false is left out; an absent condition counts as ready
    assert kube.ready_urls([piece], "http") == ["http://10.0.0.1:8000", "http://10.0.0.3:8000"]
    assert kube.ready_urls([piece], "grpc") == []  # no such port: no server
    assert kube.ready_urls([piece], None) == []  # the Service's port is not known
    unnamed = endpoint_slice([("fd00::1", True)], [(None, 8000)], address_type="IPv6")
    assert kube.ready_urls([unnamed], "") == ["http://[fd00::1]:8000"]


def test_configmap_names() -> None:
    assert kube.parse_configmap("routing", "serving") == ("serving", "routing")
    assert kube.parse_configmap("other/routing", "serving") == ("other", "routing")
    for bad in ("", "a/", "a/b/c"):
        with pytest.raises(ValueError, match="NAMESPACE"):
            kube.parse_configmap(bad, "serving")


def test_own_namespace(tmp_path: Path) -> None:
    path = tmp_path / "namespace"
    assert kube.own_namespace(str(path)) == "default"
    path.write_text("serving\n")
    assert kube.own_namespace(str(path)) == "serving"


TABLE = route.from_dict(
    {
        "schemaVersion": 1,
        "buckets": {"inputTokens": [1, 100], "outputTokens": [1, 100]},
        "gpus": ["A", "B"],
        "byInput": [[0.5, 0.5]],
        "byBucket": [[[0.5, 0.5]]],
        "upstreams": {"A": {"namespace": "serving", "service": "a", "port": "http"}},
    }
)
SERVICE_A = route.Upstream("a", "http", "serving")


def test_discovered_servers_keep_their_requests_in_flight() -> None:
    router = proxy.Router(TABLE, {"B": ["http://b:8000"]})
    assert router.upstreams == {"B": router.upstreams["B"], "A": []}
    assert not router._known.get(("A", "http://x:1"))
    router.set_endpoints("A", SERVICE_A, ["http://x:1", "http://y:1"])
    x = router.upstreams["A"][0]
    x.in_flight = 3
    router.set_endpoints("A", SERVICE_A, ["http://y:1", "http://x:1", "http://z:1"])
    assert [u.url for u in router.upstreams["A"]] == ["http://y:1", "http://x:1", "http://z:1"]
    assert router.upstreams["A"][1] is x
    assert x.in_flight == 3
    # gone from the Service while requests are in flight: kept until they end, then dropped
    router.set_endpoints("A", SERVICE_A, ["http://y:1"])
    assert [u.url for u in router.upstreams["A"]] == ["http://y:1"]
    x.in_flight = 0
    router.set_endpoints("A", SERVICE_A, [])
    assert router.upstreams["A"] == []
    assert set(router._known) == {("B", "http://b:8000")}
    # a late report about a Service the table does not name (any more) changes nothing
    router.set_endpoints("A", route.Upstream("old", "http", "serving"), ["http://old:1"])
    assert router.upstreams["A"] == []


def test_an_upstream_option_wins_over_the_tables_service() -> None:
    router = proxy.Router(TABLE, {"A": ["http://a:8000"]})
    router.set_endpoints("A", SERVICE_A, ["http://x:1"])
    assert [u.url for u in router.upstreams["A"]] == ["http://a:8000"]


def test_ready_only_with_a_table_and_a_live_upstream() -> None:
    router = proxy.Router(None, {})
    assert not router.ready()
    router.offer_table(TABLE, "test")
    assert not router.ready()  # A's servers are not known yet, B has none
    router.set_endpoints("A", SERVICE_A, ["http://x:1"])
    assert router.ready()
    router.upstreams["A"][0].down_until = float("inf")
    assert not router.ready()


def test_the_same_servers_under_another_service_port_are_taken() -> None:
    """A table that names A's port differently (a number, then its name) starts a new watch;
    its report of the same servers must not be taken for a repetition of the old one's."""
    router = proxy.Router(TABLE, {})
    router.set_endpoints("A", SERVICE_A, ["http://x:1"])
    renamed = route.Upstream("a", 8000, "serving")
    moved = route.with_upstreams(TABLE, {"A": renamed})
    router.offer_table(moved, "test")
    assert router.upstreams["A"] == []  # the old Service's report no longer counts
    router.set_endpoints("A", renamed, ["http://x:1"])
    assert [u.url for u in router.upstreams["A"]] == ["http://x:1"]
