"""The I/O of `melange profile`: an OpenAI-compatible streaming client and an open-loop load generator.

`Endpoint` talks to a vLLM-style server (`GET /v1/models`, `POST /v1/completions` with
`stream: true`, server-sent events) and times every streamed token. `measure_bucket` runs one
bucket of the measurement: it calibrates the prompt length against the server's own token count,
times one unloaded request, then runs the rate search of `melange.tools.measurement` with open-loop load
(requests are sent on schedule whether or not earlier ones have finished, as real users do).

Failures before any measurement (cannot connect, TLS, HTTP errors, unknown model) raise
`EndpointError` with one line naming the URL and the cause.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from melange.tools import measurement

USER_AGENT = "melange-profile"
MAX_IN_FLIGHT = 4096  # beyond this the client, not the server, would be the bottleneck
MAX_ERROR_BODY = 64 * 1024
NONCE_DIGITS = 6
CALIBRATION_ROUNDS = 4
# vLLM's sampling extensions that make the server generate exactly max_tokens tokens.
EXACT_LENGTH_FIELDS = ("ignore_eos", "min_tokens")


class EndpointError(Exception):
    """The server cannot be measured; the message says why in one line."""


def base_url(url: str) -> str:
    """The server's root from what the user typed: `http://h:8000`, `.../v1`, `.../v1/completions`."""
    root = url.strip().rstrip("/")
    for suffix in ("/completions", "/v1"):
        root = root.removesuffix(suffix)
    return root


def _host(url: str) -> str:
    return urlsplit(url).netloc or url


def _error_text(body: bytes) -> str:
    """The message of an OpenAI-style error body (`{"error": {"message": ...}}`), else the text."""
    text = body[:MAX_ERROR_BODY].decode("utf-8", errors="replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        return " ".join(text.split())[:500] or "(empty body)"
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed)
        if isinstance(error, dict):
            for key in ("message", "detail", "msg"):
                if isinstance(error.get(key), str):
                    return str(error[key])
        if isinstance(error, str):
            return error
        if isinstance(parsed.get("detail"), str):
            return str(parsed["detail"])
    return " ".join(text.split())[:500]


# aiohttp >= 3.10 tells a failed name lookup apart; older ones report it as a connection error.
_DNS_ERRORS: tuple[type[aiohttp.ClientConnectorError], ...] = tuple(
    getattr(aiohttp, name) for name in ("ClientConnectorDNSError",) if hasattr(aiohttp, name)
)


def _connection_error(url: str, exc: BaseException) -> EndpointError:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return EndpointError(
            f"TLS certificate of {_host(url)} not trusted: {exc.certificate_error}"
        )
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
        return EndpointError(f"TLS error talking to {_host(url)}: {cause}")
    if isinstance(exc, _DNS_ERRORS):
        error = exc.os_error
        reason = getattr(error, "strerror", None) or str(error)
        return EndpointError(f"cannot resolve the host of {url}: {reason}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        errno = exc.os_error.errno
        reason = os.strerror(errno) if errno else str(exc.os_error)
        return EndpointError(f"cannot connect to {url}: {reason}")
    if isinstance(exc, TimeoutError):
        return EndpointError(f"no answer from {url} (timed out)")
    return EndpointError(f"request to {url} failed: {type(exc).__name__}: {exc}")


@dataclass
class Features:
    """What the server accepted, found by the first request (`Endpoint.negotiate`)."""

    exact_length: bool = True  # ignore_eos / min_tokens
    usage: bool = True  # stream_options.include_usage


@dataclass
class Endpoint:
    """One server and one model; use as `async with Endpoint(...) as endpoint:`."""

    url: str
    model: str
    api_key: str | None = None
    connect_timeout: float = 10.0
    features: Features = field(default_factory=Features)
    _session: aiohttp.ClientSession | None = None
    _nonce: int = field(default_factory=lambda: random.randrange(10**NONCE_DIGITS))

    async def __aenter__(self) -> Endpoint:
        headers = {"User-Agent": USER_AGENT}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._session = aiohttp.ClientSession(
            headers=headers, connector=aiohttp.TCPConnector(limit=0)
        )
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use Endpoint as an async context manager"
        return self._session

    @property
    def root(self) -> str:
        return base_url(self.url)

    @property
    def completions_url(self) -> str:
        return self.root + "/v1/completions"

    # --- before measuring --------------------------------------------------------------------------

    async def models(self) -> list[str] | None:
        """The served models (`GET /v1/models`); None when the server has no such endpoint."""
        url = self.root + "/v1/models"
        try:
            async with self.session.get(
                url, timeout=aiohttp.ClientTimeout(total=self.connect_timeout * 3)
            ) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as exc:
            raise _connection_error(url, exc) from None
        if status in (404, 405):
            return None
        if status >= 400:
            raise self._http_error(url, status, body)
        try:
            data = json.loads(body)["data"]
            return [str(m["id"]) for m in data]
        except (ValueError, KeyError, TypeError):
            return None

    async def check(self) -> None:
        """Reachable, authorised, and serving the model; else EndpointError."""
        served = await self.models()
        if served is not None and self.model not in served:
            raise EndpointError(
                f"{self.root} does not serve model {self.model!r}; it serves: "
                + (", ".join(served) or "(none)")
            )

    def _http_error(self, url: str, status: int, body: bytes) -> EndpointError:
        hint = ""
        if status in (401, 403):
            hint = " (pass --api-key or set OPENAI_API_KEY)"
        return EndpointError(f"{url} answered HTTP {status}: {_error_text(body)}{hint}")

    async def negotiate(self) -> None:
        """Find which extensions the server accepts: a request with all of them, then fewer.

        vLLM accepts `ignore_eos`/`min_tokens` (exact output lengths) and
        `stream_options.include_usage` (its token counts); a strict server answers 400 to unknown
        fields, so they are dropped one group at a time. Any other failure raises EndpointError.
        """
        first_error: str | None = None
        for exact_length, usage in ((True, True), (False, True), (False, False)):
            self.features = Features(exact_length=exact_length, usage=usage)
            status, result = await self._probe(self.prompt(1), 2)
            if result.error is None:
                return
            if status == 404 and first_error is None:
                raise EndpointError(await self._not_found(result.error))
            if status != 400:
                raise EndpointError(f"{self.completions_url}: {result.error}")
            first_error = first_error or result.error
        raise EndpointError(f"{self.completions_url}: {first_error}")

    async def _not_found(self, error: str) -> str:
        served = await self.models()
        listing = f"; it serves: {', '.join(served) or '(none)'}" if served is not None else ""
        return f"{self.completions_url}: {error}{listing}"

    async def _probe(self, prompt: str, max_tokens: int) -> tuple[int, measurement.RequestResult]:
        status: list[int] = []
        result = await self.complete(prompt, max_tokens, time.perf_counter(), status=status)
        return (status[0] if status else 0), result

    # --- requests ---------------------------------------------------------------------------------

    def prompt(self, filler_words: int) -> str:
        """A distinct prompt: a fresh fixed-width number (so that no two requests share a prefix
        the server could cache), then `filler_words` repeats of a common word."""
        self._nonce = (self._nonce + 7919) % 10**NONCE_DIGITS
        return f"{self._nonce:0{NONCE_DIGITS}d}" + f" {measurement.FILLER_WORD}" * filler_words

    def body(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }
        if self.features.exact_length:
            body |= {"ignore_eos": True, "min_tokens": max_tokens}
        if self.features.usage:
            body["stream_options"] = {"include_usage": True}
        return body

    async def complete(
        self, prompt: str, max_tokens: int, origin: float, status: list[int] | None = None
    ) -> measurement.RequestResult:
        """One streamed completion, timed from `origin` (a perf_counter reading).

        Never raises for the server's or the network's failures: they are the result's `error`.
        The first token is the first chunk with a choice; tokens are usage.completion_tokens when
        the server reports them, else the chunks with a choice.
        """
        sent = time.perf_counter()
        first = last = 0.0
        chunks = 0
        usage: dict[str, Any] | None = None
        try:
            async with self.session.post(
                self.completions_url,
                json=self.body(prompt, max_tokens),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout),
            ) as response:
                if status is not None:
                    status.append(response.status)
                if response.status >= 400:
                    body = await response.content.read(MAX_ERROR_BODY)
                    return measurement.RequestResult(
                        sent=sent - origin,
                        error=f"HTTP {response.status}: {_error_text(body)}",
                    )
                async for raw in response.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    chunk = json.loads(data)
                    if not isinstance(chunk, dict):
                        continue
                    if chunk.get("error"):
                        return measurement.RequestResult(
                            sent=sent - origin,
                            error=f"error in the stream: {_error_text(data)}",
                        )
                    if chunk.get("choices"):
                        last = time.perf_counter()
                        if chunks == 0:
                            first = last
                        chunks += 1
                    if isinstance(chunk.get("usage"), dict):
                        usage = chunk["usage"]
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, ValueError) as exc:
            return measurement.RequestResult(
                sent=sent - origin, error=str(_connection_error(self.completions_url, exc))
            )
        finished = time.perf_counter()
        if chunks == 0:
            return measurement.RequestResult(
                sent=sent - origin, error="the stream ended without a token"
            )
        reported = usage.get("completion_tokens") if usage else None
        tokens = reported if isinstance(reported, int) and reported > 0 else chunks
        prompt_tokens = usage.get("prompt_tokens") if usage else None
        return measurement.RequestResult(
            sent=sent - origin,
            finished=finished - origin,
            ttft=first - sent,
            tpot=measurement.request_tpot(first, last, tokens),
            tokens=tokens,
            prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else None,
        )

    async def run_step(
        self,
        plan: measurement.StepPlan,
        filler_words: int,
        max_tokens: int,
        arrivals: measurement.Arrivals,
        rng: random.Random,
    ) -> list[measurement.RequestResult]:
        """Open-loop load at `plan.rate`: the warm-up, the window, then load goes on until every
        request sent in the window has finished or the drain time is up; the rest is cancelled."""
        origin = time.perf_counter()
        end, deadline = plan.warmup + plan.window, plan.warmup + plan.window + plan.drain
        running: dict[asyncio.Task[measurement.RequestResult], float] = {}
        in_window: set[asyncio.Task[measurement.RequestResult]] = set()
        results: list[measurement.RequestResult] = []
        at = 0.0
        index = 0
        try:
            while at < deadline:
                wait = origin + at - time.perf_counter()
                if at >= end:
                    pending = {t for t in in_window if not t.done()}
                    if not pending:
                        break
                    await asyncio.wait(pending, timeout=max(wait, 0))
                    if all(t.done() for t in in_window):
                        break
                elif wait > 0:
                    await asyncio.sleep(wait)
                for task in [t for t in running if t.done()]:
                    running.pop(task)
                    results.append(task.result())
                if len(running) >= MAX_IN_FLIGHT:
                    results.append(
                        measurement.RequestResult(
                            sent=at, error=f"more than {MAX_IN_FLIGHT} requests in flight"
                        )
                    )
                else:
                    task = asyncio.create_task(
                        self.complete(self.prompt(filler_words), max_tokens, origin)
                    )
                    running[task] = at
                    if plan.warmup <= at < end:
                        in_window.add(task)
                index += 1
                at = index / plan.rate if arrivals == "uniform" else at + rng.expovariate(plan.rate)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        for task, sent in running.items():
            if task.cancelled():
                results.append(measurement.RequestResult(sent=sent))
            else:
                results.append(task.result())
        return results


# --- one bucket -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    filler_words: int
    prompt_tokens: int | None  # as the server counted them; None: it does not say


async def calibrate(endpoint: Endpoint, target: int) -> Calibration:
    """Filler words for a prompt of `target` tokens by the server's own count.

    One-token probes, adjusting the filler by the difference to `target` (one token per filler
    word); the closest is kept. Without usage in the stream, the approximation: the number counts
    as one token and each filler word as one.
    """
    words = measurement.filler_words(target, overhead=1)
    if not endpoint.features.usage:
        return Calibration(words, None)
    best: Calibration | None = None
    for _ in range(CALIBRATION_ROUNDS):
        result = await endpoint.complete(endpoint.prompt(words), 1, time.perf_counter())
        if result.error is not None:
            raise EndpointError(f"{endpoint.completions_url}: {result.error}")
        if result.prompt_tokens is None:
            endpoint.features.usage = False
            return Calibration(measurement.filler_words(target, overhead=1), None)
        if best is None or abs(result.prompt_tokens - target) < abs(
            (best.prompt_tokens or 0) - target
        ):
            best = Calibration(words, result.prompt_tokens)
        following = measurement.next_filler_words(words, result.prompt_tokens, target)
        if following == words:
            break
        words = following
    assert best is not None
    return best


@dataclass
class BucketRun:
    """The options of a run that every bucket shares."""

    criteria: measurement.Criteria
    step_seconds: float
    refine: int
    arrivals: measurement.Arrivals
    budget: measurement.Budget
    seed: int = 0
    on_step: Callable[[measurement.Bucket, float], None] | None = None
    clock: Callable[[], float] = time.monotonic
    calibrations: dict[int, Calibration] = field(default_factory=dict)


class OutOfTime(Exception):
    """The next step would not fit in --max-duration."""


async def measure_bucket(
    endpoint: Endpoint, bucket: measurement.Bucket, run: BucketRun
) -> measurement.BucketMeasurement:
    """Calibrate, time one unloaded request, then search for the highest passing rate.

    Raises OutOfTime before a step that would not fit the budget, and EndpointError when requests
    fail outright (the unloaded one, or most of a step's).
    """
    calibration = run.calibrations.get(bucket.prompt_tokens)
    if calibration is None:
        calibration = await calibrate(endpoint, bucket.prompt_tokens)
        run.calibrations[bucket.prompt_tokens] = calibration
    unloaded = await endpoint.complete(
        endpoint.prompt(calibration.filler_words), bucket.output_tokens, time.perf_counter()
    )
    if unloaded.error is not None or unloaded.ttft is None or unloaded.tpot is None:
        raise EndpointError(f"{endpoint.completions_url}: {unloaded.error}")
    extra: dict[str, Any] = {}
    if unloaded.tokens != bucket.output_tokens:
        extra["completionTokensShort"] = (
            f"asked for {bucket.output_tokens} tokens, got {unloaded.tokens}"
        )

    def result(search: measurement.RateSearch, note: str | None) -> measurement.BucketMeasurement:
        return measurement.BucketMeasurement(
            bucket=bucket,
            throughput=search.throughput,
            prompt_tokens=calibration.prompt_tokens,
            completion_tokens=unloaded.tokens,
            unloaded_ttft=unloaded.ttft or 0.0,
            unloaded_tpot=unloaded.tpot or 0.0,
            steps=search.steps,
            note=note,
            extra=extra,
        )

    latency = unloaded.ttft + unloaded.tpot * max(bucket.output_tokens - 1, 0)
    search = measurement.RateSearch(
        start=1 / max(latency, 1e-3), criteria=run.criteria, refine=run.refine
    )
    if unloaded.tpot > run.criteria.tpot_slo:
        return result(
            search,
            f"unloaded TPOT {unloaded.tpot * 1000:.1f} ms exceeds the SLO: no rate meets it",
        )
    request_seconds = unloaded.ttft + bucket.output_tokens * run.criteria.tpot_slo
    rng = random.Random(run.seed)

    def plan(rate: float) -> measurement.StepPlan:
        return measurement.plan_step(rate, run.step_seconds, request_seconds)

    def out_of_time(rate: float) -> bool:
        return not run.budget.fits(run.clock(), plan(rate).seconds)

    async def measure(rate: float) -> measurement.StepResult:
        if run.on_step is not None:
            run.on_step(bucket, rate)
        step_plan = plan(rate)
        results = await endpoint.run_step(
            step_plan, calibration.filler_words, bucket.output_tokens, run.arrivals, rng
        )
        step = measurement.summarise(results, step_plan, run.criteria.percentile)
        if measurement.mostly_failed(step):
            raise EndpointError(
                f"{endpoint.completions_url}: {step.errors} of {step.sent} requests failed at "
                f"{rate:.3g} req/s in {bucket.label}: {step.error}"
            )
        return step

    if not await measurement.run_search(search, measure, stop=out_of_time):
        raise OutOfTime()
    note = None
    if search.unbounded:
        note = "the server kept up at every rate tried; the limit is higher"
    elif search.throughput == 0:
        note = "no rate passed, down to 1/64 of one request at a time"
    return result(search, note)
