"""A simulated GPU behind an OpenAI-compatible streaming API, to test `melange profile` against.

It is a model, not vLLM: no weights, no tokenizer, no sampling. It serves `GET /v1/models` and
`POST /v1/completions` with `stream: true` in vLLM's server-sent-event format (one chunk per token,
`finish_reason: "length"` on the last, a final `usage` chunk when `stream_options.include_usage`
is set, then `data: [DONE]`), with vLLM's error bodies (`{"error": {"message", "type", "code"}}`).

The engine batches continuously, as vLLM does: each iteration produces one token for every running
sequence and takes

    base + per_seq * running + per_context_token * (sum of the running sequences' contexts)

seconds, where a sequence's context is its prompt plus the tokens generated so far. At most
`max_num_seqs` sequences run; later requests wait in a queue and join at the next iteration. A new
sequence's first token comes at the end of its first iteration. Prompt tokens are the prompt's
whitespace-separated words plus one (a beginning-of-sequence token), so a client has to calibrate
its prompts against `usage.prompt_tokens` to hit a length exactly. Every request gives exactly
`max_tokens` tokens (as vLLM with `ignore_eos`).

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
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from aiohttp import web

BOS_TOKENS = 1
EXTENSION_FIELDS = ("ignore_eos", "min_tokens", "stream_options")
KNOWN_FIELDS = {"model", "prompt", "max_tokens", "temperature", "stream", *EXTENSION_FIELDS}


@dataclass(frozen=True)
class GpuModel:
    """Seconds per engine iteration as a function of the batch."""

    base: float
    per_seq: float
    per_context_token: float = 0.0
    max_num_seqs: int = 256

    def iteration(self, running: int, context: int) -> float:
        return self.base + self.per_seq * running + self.per_context_token * context


@dataclass(eq=False)
class Sequence_:
    prompt_tokens: int
    max_tokens: int
    generated: int = 0
    cancelled: bool = False
    tokens: asyncio.Queue[int] = field(default_factory=asyncio.Queue)

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.generated


class Engine:
    """The continuous-batching loop: one task, iterations back to back while there is work."""

    def __init__(self, gpu: GpuModel) -> None:
        self.gpu = gpu
        self.waiting: deque[Sequence_] = deque()
        self.running: list[Sequence_] = []
        self.wake = asyncio.Event()

    def submit(self, sequence: Sequence_) -> None:
        self.waiting.append(sequence)
        self.wake.set()

    async def loop(self) -> None:
        target = time.monotonic()
        while True:
            if not self.running and not self.waiting:
                self.wake.clear()
                await self.wake.wait()
            self.running = [s for s in self.running if not s.cancelled]
            while self.waiting and len(self.running) < self.gpu.max_num_seqs:
                sequence = self.waiting.popleft()
                if not sequence.cancelled:
                    self.running.append(sequence)
            if not self.running:
                continue
            seconds = self.gpu.iteration(len(self.running), sum(s.context for s in self.running))
            # Absolute targets, so the timer's overshoot does not add up; but a long stall (the
            # machine was busy) is not caught up with by running iterations faster than the model.
            now = time.monotonic()
            target = max(target, now - 0.002) + seconds
            await asyncio.sleep(max(target - now, 0))
            for sequence in self.running:
                sequence.generated += 1
                sequence.tokens.put_nowait(sequence.generated)
            self.running = [s for s in self.running if s.generated < s.max_tokens]


def _error(status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


def make_app(
    gpu: GpuModel,
    model: str,
    strict: bool = False,
    log: IO[str] | None = None,
    fail_after: int | None = None,
) -> web.Application:
    engine = Engine(gpu)
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
            sequence.cancelled = True  # a client that went away frees its slot
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
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--strict", action="store_true", help="400 on vLLM's extensions")
    parser.add_argument("--fail-after", type=int, help="HTTP 500 after this many requests")
    parser.add_argument("--log", type=Path, help="append a JSON line per completion request")
    args = parser.parse_args(argv)
    gpu = GpuModel(args.base, args.per_seq, args.per_context_token, args.max_num_seqs)
    log = args.log.open("a", encoding="utf-8") if args.log else None
    web.run_app(
        make_app(gpu, args.model, strict=args.strict, log=log, fail_after=args.fail_after),
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
