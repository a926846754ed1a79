"""Which Prometheus URLs an allocation's rate source may query, and where its token may go.

Whoever writes an allocation chooses its `rateSource.prometheus.url`; the operator's administrator
chooses where the operator may send queries and tokens (`melange run --allow-prometheus-url`):

- with an allow-list, every rate source's URL must be under one of its prefixes;
- without one, a rate source without a bearer token may query any URL, and one with a token only
  an in-cluster Service, a host ending in `.svc` or `.svc.cluster.local`.

A prefix matches a URL with the same scheme, host and port (the scheme's default port when none is
written) whose path is the prefix's path or below it. Pure: URLs are only parsed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

OPTION = "--allow-prometheus-url"
SERVICE_SUFFIXES = (".svc", ".svc.cluster.local")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Prefix:
    """An allowed URL prefix: scheme, host and port exactly, and a path at or below `path`."""

    scheme: str
    host: str
    port: int
    path: str  # no trailing slash; "" allows every path

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if _DEFAULT_PORTS[self.scheme] == self.port else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.path}"

    def matches(self, url: str) -> bool:
        parsed = _parse(url)
        if parsed is None:
            return False
        scheme, host, port, path = parsed
        if (scheme, host, port) != (self.scheme, self.host, self.port):
            return False
        path = path.rstrip("/")
        return not self.path or path == self.path or path.startswith(self.path + "/")


def _parse(url: str) -> tuple[str, str, int, str] | None:
    """(scheme, host, port, path) of an http(s) URL without user info, query or fragment whose
    path has no `.` or `..` segment; else None."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    host = (parts.hostname or "").rstrip(".")
    if (
        parts.scheme not in _DEFAULT_PORTS
        or not host
        or "@" in parts.netloc
        or "\\" in url
        or "?" in url
        or "#" in url
    ):
        return None
    if any(unquote(segment) in (".", "..") for segment in parts.path.split("/")):
        return None
    return parts.scheme, host, port or _DEFAULT_PORTS[parts.scheme], parts.path


def parse_prefix(text: str) -> Prefix:
    """An allow-list entry, e.g. `https://prometheus.monitoring.svc:9090` or `https://thanos/p`;
    ValueError with a sentence for anything else."""
    parsed = _parse(text.strip())
    if parsed is None:
        raise ValueError(
            f"{OPTION} {text}: expected an http(s) URL with a host and an optional path, without "
            "user info, query or fragment, e.g. https://prometheus.monitoring.svc:9090"
        )
    scheme, host, port, path = parsed
    return Prefix(scheme, host, port, path.rstrip("/"))


def is_cluster_service(host: str) -> bool:
    """A Service's DNS name: `<service>.<namespace>.svc[.cluster.local]`."""
    host = host.lower().rstrip(".")
    return any(
        host.endswith(suffix) and host.count(".") >= suffix.count(".") + 1
        for suffix in SERVICE_SUFFIXES
    )


def refusal(url: str, allowed: Iterable[Prefix], *, sends_token: bool) -> str | None:
    """Why the operator does not query `url` for a rate source, or None when it may.

    `sends_token`: the rate source names a bearer-token Secret, whose value goes with the query.
    """
    prefixes = tuple(allowed)
    parsed = _parse(url)
    if parsed is None:
        return (
            f"{url} is not a Prometheus base URL the operator queries (an http or https URL with "
            "a host, without user info, query, fragment or . and .. path segments); nothing was "
            "sent"
        )
    if prefixes:
        if any(prefix.matches(url) for prefix in prefixes):
            return None
        return (
            f"{url} is not under a Prometheus URL the operator allows ({OPTION}: "
            f"{', '.join(str(prefix) for prefix in prefixes)}); nothing was sent"
        )
    if sends_token and not is_cluster_service(parsed[1]):
        return (
            f"{url} is not an in-cluster Service (a host ending in "
            f"{' or '.join(SERVICE_SUFFIXES)}), and the operator sends a bearer token only to one "
            f"unless its administrator allows the URL ({OPTION}); nothing was sent"
        )
    return None
