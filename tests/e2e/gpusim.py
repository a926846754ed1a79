"""A simulated GPU behind an OpenAI-compatible streaming API, to test `melange profile`,
`melange route` and `melange simulate` against.

It is a model, not vLLM: no weights, no tokenizer, no sampling. It serves `GET /v1/models` and
`POST /v1/completions` with `stream: true` in vLLM's server-sent-event format (one chunk per token,
`finish_reason: "length"` on the last, a final `usage` chunk when `stream_options.include_usage`
is set, then `data: [DONE]`), with vLLM's error bodies (`{"error": {"message", "type", "code"}}`).

The engine is `melange simulate`'s (`melange.tools.simulate.Instance`, with its `IterationModel`),
run in real time: the same continuous batching, admission, chunked prefill and iteration times,
so a fleet of these servers and a simulation of it are one model. Each iteration produces one token
for every decoding sequence and processes waiting prompts, and takes

    base + per_seq * decoding + per_context_token * (the decoding sequences' contexts)
         + per_request * (requests admitted) + per_prefill_token * (prompt tokens processed)

seconds, where a sequence's context is its prompt plus the tokens generated so far. By default a
prompt costs what a running sequence of that context does (`--per-request` is `--per-seq`,
`--per-prefill-token` is `--per-context-token`) and is processed whole in one iteration; with
`--tpot-slo` prompts are chunked to keep iterations within it, as the simulator's engine does. At
most `max_num_seqs` sequences run; later requests wait in a queue and join at the next iteration.
A new sequence's first token comes at the end of the iteration that finishes its prompt. Prompt
tokens are the prompt's whitespace-separated words plus one (a beginning-of-sequence token), so a
client has to calibrate its prompts against `usage.prompt_tokens` to hit a length exactly. Every
request gives exactly `max_tokens` tokens (as vLLM with `ignore_eos`).

`--strict` answers 400 to vLLM's extension fields (`ignore_eos`, `min_tokens`, `stream_options`),
as a strict OpenAI implementation would; `--fail-after N` answers 500 to every completion request
after the first N (a server that broke mid-measurement); `--log FILE` appends one JSON line per
completion request.

    python -m tests.e2e.gpusim --port 8123 --model sim --base 0.006 --per-seq 0.002
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from aiohttp import web

from melange.tools import simulate as sim

BOS_TOKENS = 1
EXTENSION_FIELDS = ("ignore_eos", "min_tokens", "stream_options")
KNOWN_FIELDS = {"model", "prompt", "max_tokens", "temperature", "stream", *EXTENSION_FIELDS}
# An iteration that ends late (the timer's lateness, a busy machine) starts the next at its model
# time, up to this long ago: the model's timeline holds through short stalls; a longer one is
# caught up with by this much only, not by a burst of iterations.
CATCH_UP_SECONDS = 0.05


def engine_of(
    iteration: sim.IterationModel,
    max_num_seqs: int = sim.DEFAULT_MAX_NUM_SEQS,
    tpot_slo: float = math.inf,
    kv_capacity_tokens: float = math.inf,
) -> sim.Engine:
    """The simulator's engine for these terms (no profile: nothing to calibrate against)."""
    return sim.Engine(
        name="gpusim",
        cost_per_hour=0.0,
        tpot_slo=tpot_slo,
        iteration=iteration,
        input_edges=(),
        output_edges=(),
        throughput=(),
        calibration="fitted",
        fit_error=0.0,
        max_num_seqs=max_num_seqs,
        kv_capacity_tokens=kv_capacity_tokens,
    )


@dataclass(eq=False)
class Sequence_:
    prompt_tokens: int
    max_tokens: int
    request: int = -1
    generated: int = 0
    cancelled: bool = False
    tokens: asyncio.Queue[int] = field(default_factory=asyncio.Queue)


class Engine:
    """The simulator's scheduler in real time: one task sleeps to the end of each iteration, then
    hands out its tokens and starts the next."""

    def __init__(self, engine: sim.Engine) -> None:
        self.outcome = sim.Outcome([], [], [], [], [])
        self.instance = sim.Instance(engine, self.outcome)
        self.sequences: dict[int, Sequence_] = {}
        self.decoding: list[Sequence_] = []
        self.wake = asyncio.Event()

    def submit(self, sequence: Sequence_) -> None:
        sequence.request = self.outcome.add(sequence.prompt_tokens, sequence.max_tokens)
        self.sequences[sequence.request] = sequence
        self.instance.submit(sequence.request, time.monotonic())
        self.wake.set()

    def cancel(self, sequence: Sequence_) -> None:
        """A client that went away frees its slot (from the next iteration on)."""
        if not sequence.cancelled:
            sequence.cancelled = True
            if self.sequences.pop(sequence.request, None) is not None:
                self.instance.cancel(sequence.request)

    async def loop(self) -> None:
        instance = self.instance
        while True:
            if not instance.busy:
                self.wake.clear()
                await self.wake.wait()
                continue
            # Absolute targets, so the timer's lateness does not add up (CATCH_UP_SECONDS).
            await asyncio.sleep(max(instance.end - time.monotonic(), 0))
            firsts = [self.sequences.get(r) for r in instance.first_tokens]
            instance.step(time.monotonic() - CATCH_UP_SECONDS)
            for sequence in self.decoding:
                sequence.generated += 1
                sequence.tokens.put_nowait(sequence.generated)
            for first in firsts:
                if first is not None and not first.cancelled:
                    first.generated = 1
                    first.tokens.put_nowait(1)
                    self.decoding.append(first)
            running = []
            for sequence in self.decoding:
                if sequence.generated < sequence.max_tokens and not sequence.cancelled:
                    running.append(sequence)
                else:
                    self.sequences.pop(sequence.request, None)
            self.decoding = running


def _error(status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


def make_app(
    engine_model: sim.Engine,
    model: str,
    strict: bool = False,
    log: IO[str] | None = None,
    fail_after: int | None = None,
) -> web.Application:
    engine = Engine(engine_model)
    served = [0]

    async def start_engine(app: web.Application) -> Any:
        task = asyncio.create_task(engine.loop())
        yield
        task.cancel()

    async def models(_: web.Request) -> web.Response:
        created = int(time.time())
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": model, "object": "model", "created": created, "owned_by": "sim"}],
            }
        )

    async def completions(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON", "BadRequestError")
        if not isinstance(body, dict):
            return _error(400, "the body must be an object", "BadRequestError")
        unknown = sorted(set(body) - (KNOWN_FIELDS - (set(EXTENSION_FIELDS) if strict else set())))
        if unknown:
            return _error(
                400, f"Unrecognized request argument(s): {', '.join(unknown)}", "BadRequestError"
            )
        if body.get("model") != model:
            return _error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        served[0] += 1
        if fail_after is not None and served[0] > fail_after:
            return _error(
                500, "CUDA error: an illegal memory access was encountered", "InternalServerError"
            )
        if body.get("stream") is not True:
            return _error(400, "this simulator only streams (set stream: true)", "BadRequestError")
        prompt, max_tokens = body.get("prompt"), body.get("max_tokens")
        if not isinstance(prompt, str) or not isinstance(max_tokens, int) or max_tokens < 1:
            return _error(400, "prompt must be a string and max_tokens >= 1", "BadRequestError")
        options = body.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        sequence = Sequence_(prompt_tokens=len(prompt.split()) + BOS_TOKENS, max_tokens=max_tokens)
        if log is not None:
            log.write(
                json.dumps(
                    {
                        "time": time.time(),
                        "promptTokens": sequence.prompt_tokens,
                        "maxTokens": max_tokens,
                    }
                )
                + "\n"
            )
            log.flush()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[dict[str, Any]], usage_value: Any = None) -> bytes:
            data = {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
            }
            if usage:
                data["usage"] = usage_value
            return f"data: {json.dumps(data)}\n\n".encode()

        engine.submit(sequence)
        try:
            while True:
                generated = await sequence.tokens.get()
                last = generated >= max_tokens
                choice = {
                    "index": 0,
                    "text": " tok",
                    "logprobs": None,
                    "finish_reason": "length" if last else None,
                    "stop_reason": None,
                }
                await response.write(chunk([choice]))
                if last:
                    break
            if usage:
                counts = {
                    "prompt_tokens": sequence.prompt_tokens,
                    "total_tokens": sequence.prompt_tokens + max_tokens,
                    "completion_tokens": max_tokens,
                }
                await response.write(chunk([], counts))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        finally:
            engine.cancel(sequence)  # a client that went away frees its slot
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.cleanup_ctx.append(start_engine)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a simulated GPU serving an LLM (a model)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="sim")
    parser.add_argument("--base", type=float, default=0.006, help="seconds per iteration")
    parser.add_argument("--per-seq", type=float, default=0.002, help="seconds per running seq")
    parser.add_argument("--per-context-token", type=float, default=0.0)
    parser.add_argument("--per-request", type=float, help="seconds per admitted request")
    parser.add_argument("--per-prefill-token", type=float, help="seconds per prompt token")
    parser.add_argument("--tpot-slo", type=float, help="chunk prompts to keep iterations within")
    parser.add_argument("--max-num-seqs", type=int, default=sim.DEFAULT_MAX_NUM_SEQS)
    parser.add_argument("--kv-capacity-tokens", type=float, default=math.inf)
    parser.add_argument("--strict", action="store_true", help="400 on vLLM's extensions")
    parser.add_argument("--fail-after", type=int, help="HTTP 500 after this many requests")
    parser.add_argument("--log", type=Path, help="append a JSON line per completion request")
    args = parser.parse_args(argv)
    iteration = sim.IterationModel(
        fixed=args.base,
        per_sequence=args.per_seq,
        per_request=args.per_seq if args.per_request is None else args.per_request,
        per_context_token=args.per_context_token,
        per_prefill_token=args.per_context_token
        if args.per_prefill_token is None
        else args.per_prefill_token,
    )
    engine = engine_of(
        iteration,
        args.max_num_seqs,
        math.inf if args.tpot_slo is None else args.tpot_slo,
        args.kv_capacity_tokens,
    )
    log = args.log.open("a", encoding="utf-8") if args.log else None
    web.run_app(
        make_app(engine, args.model, strict=args.strict, log=log, fail_after=args.fail_after),
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
