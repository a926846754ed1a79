"""What a router reads from an OpenAI-style request to place it, and from its answer to time it.

Pure: no I/O. The router sees a request's JSON body before any engine does, so the input length is
an estimate made without the engine's tokenizer unless one is given:

- `/v1/completions`: `prompt` as a string (estimated), token ids (counted exactly), or a batch of
  either (the longest one places the request: each sequence is a request to the engine);
- `/v1/chat/completions`: the text of every message's `content` (a string, or the `text` of its
  `{"type": "text"}` parts), estimated as one text. The chat template's own tokens (a few per
  message) are not counted.

The estimate without a tokenizer is `ceil(characters / chars_per_token)`; 4 characters per token is
the usual figure for English text with BPE vocabularies of LLaMA-3 size, and a deployment can
calibrate it from the engine's `usage.prompt_tokens` against the prompts' lengths.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

DEFAULT_CHARS_PER_TOKEN = 4.0

TextCounter = Callable[[str], int]


def char_estimate(chars_per_token: float = DEFAULT_CHARS_PER_TOKEN) -> TextCounter:
    """Tokens of a text as its characters over `chars_per_token`, rounded up."""
    if not (math.isfinite(chars_per_token) and chars_per_token > 0):
        raise ValueError(f"chars per token must be a positive number, got {chars_per_token}")

    def count(text: str) -> int:
        return math.ceil(len(text) / chars_per_token)

    return count


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )


def input_tokens(body: Mapping[str, Any], chat: bool, count: TextCounter) -> int:
    """The input length that places the request (0 when the body has no prompt it recognises;
    the engine will answer such a request with its own error)."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return 0
        texts: list[str] = []
        for message in messages:
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                texts.extend(
                    part["text"]
                    for part in content
                    if isinstance(part, Mapping) and isinstance(part.get("text"), str)
                )
        return count("\n".join(texts)) if texts else 0
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return count(prompt)
    if not isinstance(prompt, list) or not prompt:
        return 0
    if _is_ids(prompt):
        return len(prompt)
    longest = 0
    for item in prompt:
        if isinstance(item, str):
            longest = max(longest, count(item))
        elif _is_ids(item):
            longest = max(longest, len(item))
    return longest


def output_tokens(body: Mapping[str, Any], chat: bool) -> int | None:
    """The output length a client announces (`max_completion_tokens` for chat, else `max_tokens`),
    or None when it gives none (only worth routing on when clients set it to what they need)."""
    keys = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    for key in keys:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None


def stream_overhead(body: Mapping[str, Any], chat: bool) -> int:
    """Server-sent events of a streamed answer that carry no generated token: `data: [DONE]`, the
    usage chunk when asked for, and a chat answer's first chunk (the role alone, as vLLM sends)."""
    options = body.get("stream_options")
    usage = isinstance(options, Mapping) and options.get("include_usage") is True
    return 1 + int(usage) + int(chat)


class EventCounter:
    """Counts server-sent events (blank-line terminated) in a byte stream cut anywhere, without
    decoding it: with vLLM's default streaming, one event per generated token."""

    __slots__ = ("_last", "events")

    def __init__(self) -> None:
        self.events = 0
        self._last = 0  # the previous chunk's last byte

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.events += chunk.count(b"\n\n")
        if self._last == 0x0A and chunk[0] == 0x0A:
            self.events += 1
        self._last = chunk[-1]


def bucket_label(edges: tuple[int, ...], index: int) -> str:
    """`25-100` for the bucket [25, 100): a bounded, readable metric label."""
    return f"{edges[index]}-{edges[index + 1]}"
