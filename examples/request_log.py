"""Write a synthetic request log for `melange workload`:

    python examples/request_log.py > requests.jsonl

The log stands in for a chat service's: requests arrive as a Poisson process (exponential gaps at
`--rate` req/s), and prompt and completion lengths are drawn from lognormal distributions (a
median of 300 prompt tokens and 180 completion tokens, with long tails, so that a few requests fall
beyond the shipped profiles' last edges, 8000 input and 2000 output tokens). One JSON object a
line, in the format of OpenAI responses:

    {"timestamp": 1714564800.083, "usage": {"prompt_tokens": 412, "completion_tokens": 96}}

It uses only the standard library and one `random.Random(seed)`, so a seed always gives the same
log. The recipe in docs/cli.md and docs/profiles.md was run on the log of the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Iterator, Sequence

START = 1714564800.0  # 2024-05-01T12:00:00Z, the first request's earliest time
# lognormal parameters: median exp(mu) tokens, spread sigma (in log space)
PROMPT_MEDIAN, PROMPT_SIGMA = 300.0, 1.0
COMPLETION_MEDIAN, COMPLETION_SIGMA = 180.0, 0.8


def _tokens(rng: random.Random, median: float, sigma: float) -> int:
    return max(1, round(rng.lognormvariate(math.log(median), sigma)))


def requests(count: int, rate: float, seed: int) -> Iterator[dict[str, object]]:
    """`count` requests at `rate` req/s (Poisson arrivals), the same ones for the same seed."""
    rng = random.Random(seed)
    now = START
    for _ in range(count):
        now += rng.expovariate(rate)
        yield {
            "timestamp": round(now, 3),
            "usage": {
                "prompt_tokens": _tokens(rng, PROMPT_MEDIAN, PROMPT_SIGMA),
                "completion_tokens": _tokens(rng, COMPLETION_MEDIAN, COMPLETION_SIGMA),
            },
        }


def lines(count: int, rate: float, seed: int) -> Iterator[str]:
    for request in requests(count, rate, seed):
        yield json.dumps(request) + "\n"


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a synthetic chat request log (JSON Lines) for `melange workload` to stdout."
    )
    parser.add_argument("--requests", type=_count, default=20000, help="default 20000")
    parser.add_argument("--rate", type=_rate, default=12.0, help="req/s, default 12")
    parser.add_argument("--seed", type=int, default=1, help="default 1")
    args = parser.parse_args(argv)
    sys.stdout.writelines(lines(args.requests, args.rate, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
