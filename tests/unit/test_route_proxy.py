"""The pure parts of `melange route`: what it reads from a request body and from a stream."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from melange.cli import main
from melange.cli.route import parse_upstreams
from melange.plan import routing as route
from melange.route import request as rq

WORDS = rq.char_estimate(1.0)  # a character a token: lengths are easy to read


def test_char_estimate_rounds_up_and_refuses_nonsense() -> None:
    count = rq.char_estimate(4.0)
    assert [count(""), count("abc"), count("abcd"), count("abcde")] == [0, 1, 1, 2]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="chars per token"):
            rq.char_estimate(bad)


@pytest.mark.parametrize(
    ("prompt", "tokens"),
    [
        ("hello", 5),
        ([1, 2, 3], 3),  # token ids count exactly
        (["ab", "abcdef"], 6),  # a batch: its longest sequence
        ([[1, 2], [1, 2, 3, 4]], 4),
        ([], 0),
        (None, 0),
        (42, 0),
    ],
)
def test_completion_prompts(prompt: object, tokens: int) -> None:
    assert rq.input_tokens({"prompt": prompt}, chat=False, count=WORDS) == tokens


def test_chat_counts_every_messages_text() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "abc"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "de"},
                    {"type": "image_url", "image_url": {"url": "http://x"}},
                ],
            },
            {"role": "assistant", "content": None},
        ]
    }
    assert rq.input_tokens(body, chat=True, count=WORDS) == len("abc\nde")
    assert rq.input_tokens({"messages": "nope"}, chat=True, count=WORDS) == 0


def test_output_tokens_only_from_a_positive_integer() -> None:
    assert rq.output_tokens({"max_tokens": 7}, chat=False) == 7
    assert rq.output_tokens({"max_tokens": 0}, chat=False) is None
    assert rq.output_tokens({"max_tokens": True}, chat=False) is None
    assert rq.output_tokens({"max_tokens": "7"}, chat=False) is None
    assert rq.output_tokens({}, chat=False) is None
    chat = {"max_completion_tokens": 9, "max_tokens": 3}
    assert rq.output_tokens(chat, chat=True) == 9
    assert rq.output_tokens(chat, chat=False) == 3


def test_stream_overhead() -> None:
    assert rq.stream_overhead({}, chat=False) == 1
    assert rq.stream_overhead({"stream_options": {"include_usage": True}}, chat=False) == 2
    assert rq.stream_overhead({}, chat=True) == 2


@given(st.lists(st.integers(0, 200), max_size=8), st.integers(0, 5))
def test_events_are_counted_wherever_the_stream_is_cut(cuts: list[int], events: int) -> None:
    stream = b"".join(b'data: {"n": %d}\n\n' % k for k in range(events)) + b"data: [DONE]\n\n"
    points = sorted({min(c, len(stream)) for c in cuts})
    counter = rq.EventCounter()
    for start, end in zip([0, *points], [*points, len(stream)], strict=True):
        counter.feed(stream[start:end])
    assert counter.events == events + 1


def test_bucket_labels_follow_picks_clamping() -> None:
    edges = (1, 25, 100)
    assert [route.bucket_index(edges, t) for t in (0, 1, 24, 25, 99, 100, 10**6)] == [
        0,
        0,
        0,
        1,
        1,
        1,
        1,
    ]
    assert rq.bucket_label(edges, 1) == "25-100"


def test_upstreams_parse_and_refuse() -> None:
    assert parse_upstreams(("L4=http://a:8000", "L4=http://b:8000/", "H100=https://c")) == {
        "L4": ["http://a:8000", "http://b:8000/"],
        "H100": ["https://c"],
    }
    for bad in ("L4", "=http://a", "L4=a:8000"):
        with pytest.raises(SystemExit) as exc:
            parse_upstreams((bad,))
        assert exc.value.code == 2


def test_route_command_needs_one_table_source() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["route", "--upstream=A=http://a"])
    assert result.exit_code == 2
    assert "exactly one of --table FILE, --allocation FILE and --table-configmap" in result.output
    result = runner.invoke(main, ["route", "--table=t.json", "--table-configmap=routing"])
    assert result.exit_code == 2
    assert "exactly one of" in result.output
    result = runner.invoke(main, ["route", "--upstream=A=http://a", "--table=/nonexistent.json"])
    assert result.exit_code == 2
    assert "cannot read" in result.output


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--drain-seconds=-1", "--drain-seconds"),
        ("--drain-seconds=inf", "--drain-seconds: must be a finite number"),
        ("--shutdown-timeout=-0.5", "--shutdown-timeout"),
        ("--shutdown-timeout=nan", "--shutdown-timeout: must be a finite number"),
    ],
)
def test_route_command_refuses_a_bad_drain_or_shutdown_timeout(option: str, message: str) -> None:
    result = CliRunner().invoke(main, ["route", "--table=t.json", option])
    assert result.exit_code == 2
    assert message in result.output


def test_an_allocation_gives_its_plans_table() -> None:
    from pathlib import Path

    from melange import api
    from melange.cli.route import allocation_loader, allocation_table
    from melange.plan import solver
    from melange.plan.problem import Problem

    path = Path(__file__).parents[2] / "examples" / "mixed.yaml"
    spec = api.load_bytes(path.read_bytes(), source=str(path)).spec
    problem = Problem.from_spec(spec, rate=60.0)
    expected = route.derive(problem, solver.solve(problem))
    assert route.to_dict(allocation_table(spec, 60.0)) == route.to_dict(expected)
    assert route.to_dict(allocation_loader(str(path), 60.0)()) == route.to_dict(expected)
    with pytest.raises(ValueError, match="cannot read"):
        allocation_loader("/nonexistent.yaml", None)()
