"""A small async client for Prometheus' HTTP API (`GET /api/v1/query`), on aiohttp.

One pooled session for the whole operator. Each query has a total timeout, an optional bearer token
and an optional CA bundle; TLS is always verified (with the system's CAs unless a CA is given).
Every failure comes back as a `melange.signals.rates.RateError` whose message names what went wrong.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import time
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from melange.signals import coverage
from melange.signals.distribution import Histogram, parse_histogram_response
from melange.signals.distribution import queries as distribution_queries
from melange.signals.rates import (
    InvalidResponse,
    PrometheusUnavailable,
    URLNotAllowed,
    parse_query_response,
)

MAX_RESPONSE_BYTES = 4 * 1024 * 1024
USER_AGENT = "melange-operator"


def query_url(base_url: str) -> str:
    """Prometheus' query endpoint under its base URL (which may carry a path prefix).

    The base URL is parsed and the endpoint's path appended to its path, so nothing in it (a `#`,
    a `?`) can turn the endpoint into a fragment or a parameter; a base URL with a query, a
    fragment or user info, or not http(s) with a host, raises `URLNotAllowed`.
    """
    try:
        parts = urlsplit(base_url)
        _ = parts.port  # a port that is not a number raises ValueError
    except ValueError as exc:
        raise URLNotAllowed(f"{base_url!r} is not a usable URL: {exc}") from None
    problems = [
        problem
        for problem, present in (
            ("its scheme is not http or https", parts.scheme not in ("http", "https")),
            ("it has no host", not parts.hostname),
            ("it has user info (user@)", "@" in parts.netloc),
            ("it has a query (?)", bool(parts.query) or "?" in base_url),
            ("it has a fragment (#)", bool(parts.fragment) or "#" in base_url),
        )
        if present
    ]
    if problems:
        raise URLNotAllowed(
            f"{base_url!r} is not a Prometheus base URL: {'; '.join(problems)}; nothing was sent"
        )
    path = parts.path.rstrip("/") + "/api/v1/query"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _host(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc or url


class PrometheusClient:
    """Instant queries against any number of Prometheus servers, one connection pool."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._contexts: dict[str, ssl.SSLContext] = {}

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
                connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=60),
            )
        return self._session

    def _ssl(self, ca_pem: str | None) -> ssl.SSLContext | bool:
        if not ca_pem:
            return True  # aiohttp's default: verified against the system's CAs
        key = hashlib.sha256(ca_pem.encode()).hexdigest()
        context = self._contexts.get(key)
        if context is None:
            context = ssl.create_default_context(cadata=ca_pem)
            if len(self._contexts) >= 32:  # bounded: CAs rotate
                self._contexts.clear()
            self._contexts[key] = context
        return context

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def query_rate(
        self,
        base_url: str,
        query: str,
        *,
        bearer_token: str | None = None,
        ca_pem: str | None = None,
        timeout: float = 10.0,
        samples: tuple[str, int] | None = None,
    ) -> float:
        """The query's single value, as a rate (finite, >= 0); else a `RateError`.

        With `samples` (the raw samples query behind the rate, and its range in seconds), both are
        evaluated at the same instant and a range the samples do not cover raises `PartialWindow`.
        """
        if samples is None:
            status, body, url, kind = await self.query(
                base_url, query, bearer_token=bearer_token, ca_pem=ca_pem, timeout=timeout
            )
            return parse_query_response(status, body, url, content_type=kind)
        at = time.time()
        answers = await asyncio.gather(
            *(
                self.query(
                    base_url, text, bearer_token=bearer_token, ca_pem=ca_pem, timeout=timeout, at=at
                )
                for text in (query, samples[0])
            ),
            return_exceptions=True,
        )
        rate_answer, samples_answer = answers
        if isinstance(rate_answer, BaseException):  # the rate's own failure first
            raise rate_answer
        status, body, url, kind = rate_answer
        rate = parse_query_response(status, body, url, content_type=kind)
        if isinstance(samples_answer, BaseException):
            raise samples_answer
        samples_status, samples_body, _, samples_kind = samples_answer
        coverage.check(
            coverage.parse_samples_response(
                samples_status,
                samples_body,
                at=at,
                range_seconds=samples[1],
                url=url,
                content_type=samples_kind,
            )
        )
        return rate

    async def token_histograms(
        self,
        base_url: str,
        model_name: str,
        window_seconds: int,
        *,
        bearer_token: str | None = None,
        ca_pem: str | None = None,
        timeout: float = 10.0,
    ) -> tuple[Histogram, Histogram]:
        """vLLM's prompt- and generation-token histograms' increase over the window, together."""

        async def histogram(query: str, what: str) -> Histogram:
            status, body, url, kind = await self.query(
                base_url, query, bearer_token=bearer_token, ca_pem=ca_pem, timeout=timeout
            )
            return parse_histogram_response(status, body, what, url, content_type=kind)

        prompt_query, generation_query = distribution_queries(model_name, window_seconds)
        answers = await asyncio.gather(
            histogram(prompt_query, "prompt-tokens"),
            histogram(generation_query, "generation-tokens"),
            return_exceptions=True,
        )
        for answer in answers:  # the prompt's failure first, whichever came back first
            if isinstance(answer, BaseException):
                raise answer
        prompt, generation = answers
        assert isinstance(prompt, Histogram)
        assert isinstance(generation, Histogram)
        return prompt, generation

    async def query(
        self,
        base_url: str,
        query: str,
        *,
        bearer_token: str | None = None,
        ca_pem: str | None = None,
        timeout: float = 10.0,
        at: float | None = None,
    ) -> tuple[int, bytes, str, str]:
        """An instant query's HTTP status, body, URL and content type; transport failures (and a
        base URL that is not one, `query_url`) as `RateError`s.

        `at`: the evaluation time (Unix seconds); Prometheus' own clock when None.
        """
        url = query_url(base_url)
        headers = {"Authorization": f"Bearer {bearer_token}"} if bearer_token else {}
        try:
            context = self._ssl(ca_pem)
        except (ssl.SSLError, ValueError) as exc:
            raise PrometheusUnavailable(f"the CA certificate is not usable PEM: {exc}") from None
        # Prometheus stops evaluating a little before we stop waiting, so a slow query comes back
        # with its own error message rather than our timeout.
        params = {"query": query, "timeout": f"{max(round(timeout * 1000) - 500, 500)}ms"}
        if at is not None:
            params["time"] = f"{at:.3f}"
        try:
            async with self._get_session().get(
                url,
                params=params,
                headers=headers,
                ssl=context,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 5.0)),
            ) as response:
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise InvalidResponse(
                            f"the answer from {url} is larger than {MAX_RESPONSE_BYTES} bytes"
                        )
                status = response.status
                content_type = response.headers.get("Content-Type", "")
        except TimeoutError:
            raise PrometheusUnavailable(
                f"no answer from {url} within {timeout:g} s (timed out)"
            ) from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise PrometheusUnavailable(
                f"TLS certificate of {_host(url)} not trusted: {exc.certificate_error}"
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise PrometheusUnavailable(f"TLS error talking to {_host(url)}: {exc}") from None
        except aiohttp.ClientConnectorError as exc:
            errno = exc.os_error.errno
            reason = os.strerror(errno) if errno else str(exc.os_error)
            raise PrometheusUnavailable(f"cannot connect to {_host(url)}: {reason}") from None
        except aiohttp.ClientError as exc:
            raise PrometheusUnavailable(
                f"request to {url} failed: {type(exc).__name__}: {exc}"
            ) from None
        return status, bytes(body), url, content_type
