"""Seeded mutations of valid allocations, and hostile input texts, for both doors: `melange solve`
and the API server with the operator.

A mutation records what it did and where, so a test can say what the verdict must be: `invalid`
mutations must be rejected with an error naming one of `paths`; the others (`any`) may give any
verdict, but never a crash or a hang.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from hypothesis import reject
from hypothesis import strategies as st

REPO = Path(__file__).parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))

Doc = dict[str, Any]
Step = tuple[str | int, ...]
Verdict = Literal["invalid", "any"]


def example_manifests() -> list[Doc]:
    return [yaml.safe_load(path.read_text()) for path in EXAMPLES]


@dataclass(frozen=True)
class Mutation:
    """One change to a spec: its category, the field path it touched, and the verdict it forces."""

    category: str
    path: str
    verdict: Verdict
    # a relation between fields under `path` (two equal names): any later change there may undo it
    fragile: bool = False


@dataclass
class Fuzzed:
    """A mutated allocation: the document, and what was done to it (in order)."""

    document: Any
    prefix: str  # "spec." for a manifest, "" for a bare spec
    mutations: list[Mutation] = field(default_factory=list)

    @property
    def invalid_paths(self) -> list[str]:
        """The paths of the invalid changes that no later change replaced, removed or undid."""
        kept = [
            m
            for k, m in enumerate(self.mutations)
            if m.verdict == "invalid"
            and not any(
                within(m.path, later.path) or (m.fragile and within(later.path, m.path))
                for later in self.mutations[k + 1 :]
            )
        ]
        return [
            (self.prefix.rstrip(".") if m.path.startswith("[") else self.prefix) + m.path
            for m in kept
        ]

    @property
    def touched_paths(self) -> list[str]:
        """The paths of every change, whatever its verdict."""
        return [
            (self.prefix.rstrip(".") if m.path.startswith("[") else self.prefix) + m.path
            for m in self.mutations
        ]

    def describe(self) -> str:
        return ", ".join(f"{m.category}@{m.path or '.'}" for m in self.mutations)


def within(path: str, ancestor: str) -> bool:
    """`path` is `ancestor` or a field inside it."""
    return not ancestor or path == ancestor or path.startswith((f"{ancestor}.", f"{ancestor}["))


def render(steps: Step) -> str:
    """A field path as the errors spell it: `gpus[1].costPerHour`."""
    out = ""
    for step in steps:
        if isinstance(step, int):
            out += f"[{step}]"
        elif not re.match(r"^[A-Za-z0-9_-]+$", step):
            out += f"[{json.dumps(step)}]"
        else:
            out += f".{step}" if out else step
    return out


def walk(node: Any, steps: Step = ()) -> list[tuple[Step, Any]]:
    """Every node under `node` with its steps, the root first."""
    found = [(steps, node)]
    if isinstance(node, dict):
        for key, value in node.items():
            found += walk(value, (*steps, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += walk(value, (*steps, index))
    return found


def set_at(root: Any, steps: Step, value: Any) -> None:
    node = root
    for step in steps[:-1]:
        node = node[step]
    node[steps[-1]] = copy.deepcopy(value)  # never a shared value that a later mutation changes


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# Values that are wrong for every numeric field of the spec (all of them are >= 0 and finite).
BAD_NUMBERS: list[Any] = [
    -1,
    -1e-9,
    math.nan,
    math.inf,
    -math.inf,
    10**400,
    -(10**400),
    "3",
    "1e3",
    "",
    True,
    False,
    [],
    {},
    [1],
]
# Values some numeric fields take: each field's verdict is the model's and the API server's.
ODD_NUMBERS: list[Any] = [0, 0.0, 1e308, 1e-308, 5e-324, 1e-320, 1.5, 2**31, 2**63, 10**20]
# Each bounded number's lowest and highest allowed value (the model's and the CRD's): at a bound it
# passes (unless another rule says otherwise), one step past it (the next float, or the next
# integer) it is refused with an error naming the field. workload.totalRate may also be 0.
BOUNDS: dict[tuple[str, ...], tuple[float, float]] = {
    ("workload", "totalRate"): (1e-6, 1e9),
    ("workload", "distribution", "*", "*"): (0.0, 1e12),
    ("workload", "fromPrometheus", "minRequests"): (0.0, 1e12),
    ("gpus", "*", "throughput", "*", "*"): (0.0, 1e9),
    ("gpus", "*", "costPerHour"): (5e-324, 1e9),  # more than 0: the least float is allowed
    ("headroom",): (0.0, 10.0),
}
INTEGER_BOUNDS: dict[tuple[str, ...], tuple[int, int]] = {
    ("sliceFactor",): (1, 1024),
    ("gpus", "*", "minReplicas"): (0, 10_000),
    ("gpus", "*", "maxReplicas"): (0, 10_000),
}


def past(bound: float, upward: bool) -> float:
    """The value one step past `bound`: the next float (or integer) outside it."""
    if isinstance(bound, int):
        return bound + (1 if upward else -1)
    if bound == 5e-324 and not upward:
        return 0.0
    return math.nextafter(bound, math.inf if upward else -math.inf)


UNKNOWN_KEYS = ["bogusField", "slicefactor", "Name", "replicas", "1", ""]
SLICE_FACTORS: list[tuple[Any, Verdict]] = [
    (0, "invalid"),
    (1, "any"),
    (1024, "any"),
    (1025, "invalid"),
    (-1, "invalid"),
    (10**400, "invalid"),
    (8.5, "invalid"),
]
# Required at each place (a manifest's gpus[] also need scaleTargetRef).
REQUIRED = {
    (): ["buckets", "workload", "gpus"],
    ("buckets",): ["inputTokens", "outputTokens"],
    ("workload",): ["distribution", "totalRate"],
    ("gpus", "*"): ["name", "costPerHour", "throughput"],
    ("gpus", "*", "scaleTargetRef"): ["apiVersion", "kind", "name"],
}


def _spec_nodes(spec: Any, test: Callable[[Step, Any], bool]) -> list[tuple[Step, Any]]:
    return [(steps, node) for steps, node in walk(spec) if steps and test(steps, node)]


def _pattern(steps: Step) -> tuple[str, ...]:
    return tuple("*" if isinstance(s, int) else s for s in steps)


@st.composite
def mutation(draw: st.DrawFn, spec: Any) -> Mutation | None:
    """Change `spec` in place in one way; None when it has nothing this category can change."""
    category = draw(
        st.sampled_from(
            [
                "bad_number",
                "odd_number",
                "bound",
                "wrong_shape",
                "unknown_field",
                "missing_field",
                "null",
                "name",
                "edges",
                "zero_throughputs",
                "slice_factor",
                "same_target",
            ]
        )
    )
    if not isinstance(spec, dict):
        return None
    if category in {"bad_number", "odd_number"}:
        numbers = _spec_nodes(spec, lambda _, n: is_number(n))
        if not numbers:
            return None
        steps, _ = draw(st.sampled_from(numbers))
        bad = category == "bad_number"
        set_at(spec, steps, draw(st.sampled_from(BAD_NUMBERS if bad else ODD_NUMBERS)))
        return Mutation(category, render(steps), "invalid" if bad else "any")
    if category == "bound":
        limits = {**BOUNDS, **INTEGER_BOUNDS}
        bounded = _spec_nodes(spec, lambda s, n: is_number(n) and _pattern(s) in limits)
        if not bounded:
            return None
        steps, _ = draw(st.sampled_from(bounded))
        low, high = limits[_pattern(steps)]
        upward = draw(st.booleans())
        bound = high if upward else low
        if draw(st.booleans()):  # at the bound: the field itself is valid
            set_at(spec, steps, bound)
            return Mutation(category, render(steps), "any")
        set_at(spec, steps, past(bound, upward))
        return Mutation(category, render(steps), "invalid")
    if category == "wrong_shape":
        nodes = _spec_nodes(spec, lambda _, n: True)
        steps, node = draw(st.sampled_from(nodes))
        # wrong for whatever the field takes, even after an earlier change of its shape
        if isinstance(node, dict):
            value: Any = [node]
        elif isinstance(node, list):
            value = draw(st.sampled_from([{"0": node[0] if node else 1}, [node]]))
        else:
            value = draw(st.sampled_from([[node], {"value": node}]))
        set_at(spec, steps, value)
        return Mutation(category, render(steps), "invalid")
    if category == "unknown_field":
        maps = [(s, n) for s, n in walk(spec) if isinstance(n, dict)]
        steps, node = draw(st.sampled_from(maps))
        key = draw(st.sampled_from([k for k in UNKNOWN_KEYS if k not in node]))
        node[key] = copy.deepcopy(draw(st.sampled_from([1, "x", None, [1]])))
        # a null field is an absent one, as for the API server
        return Mutation(category, render((*steps, key)), "any" if node[key] is None else "invalid")
    if category == "missing_field":
        maps = [(s, n) for s, n in walk(spec) if isinstance(n, dict) and n]
        steps, node = draw(st.sampled_from(maps))
        key = draw(st.sampled_from(sorted(node)))
        del node[key]
        required = key in REQUIRED.get(_pattern(steps), [])
        return Mutation(category, render((*steps, key)), "invalid" if required else "any")
    if category == "null":
        leaves = _spec_nodes(spec, lambda s, n: isinstance(s[-1], str))
        steps, _ = draw(st.sampled_from(leaves))
        set_at(spec, steps, None)
        return Mutation(category, render(steps), "any")
    gpus = spec.get("gpus")
    if category == "name" and isinstance(gpus, list) and gpus and isinstance(gpus[-1], dict):
        k = len(gpus) - 1
        if draw(st.booleans()) or k == 0 or not isinstance(gpus[0], dict):
            gpus[k]["name"] = draw(st.sampled_from(["", " ", "-a", "a" * 64, "L4\n", "Ä"]))
        else:  # the same name as gpus[0]: a later change to either may undo it
            gpus[k]["name"] = gpus[0].get("name")
            return Mutation(category, "gpus", "invalid", fragile=True)
        return Mutation(category, render(("gpus", k, "name")), "invalid")
    if category == "same_target" and isinstance(gpus, list) and len(gpus) >= 2:
        if not all(
            isinstance(g, dict) and isinstance(g.get("scaleTargetRef"), dict) for g in gpus[:2]
        ):
            return None
        gpus[1]["scaleTargetRef"] = copy.deepcopy(gpus[0]["scaleTargetRef"])
        return Mutation(category, "gpus", "invalid", fragile=True)
    buckets = spec.get("buckets")
    if category == "edges" and isinstance(buckets, dict):
        axis = draw(st.sampled_from(["inputTokens", "outputTokens"]))
        edges = buckets.get(axis)
        if not isinstance(edges, list) or len(edges) < 2:
            return None
        k = draw(st.integers(1, len(edges) - 1))
        how = draw(st.sampled_from(["swap", "duplicate", "zero", "huge"]))
        pair = edges[k - 1], edges[k]
        if how == "swap" and all(is_number(e) for e in pair):
            edges[k - 1], edges[k] = max(pair), min(pair)  # out of order, even if it was already
        elif how in {"swap", "duplicate"}:
            edges[k] = edges[k - 1]
        elif how == "zero":
            k = 0
            edges[0] = 0
        else:
            edges[k] = 10_000_001
        # named at the edge itself, or at the next one (a pair out of order)
        return Mutation(category, render(("buckets", axis)), "invalid")
    if category == "zero_throughputs" and isinstance(gpus, list):
        for gpu in gpus:
            if isinstance(gpu, dict) and isinstance(gpu.get("throughput"), list):
                gpu["throughput"] = [
                    [0] * len(row) if isinstance(row, list) else row for row in gpu["throughput"]
                ]
        return Mutation(category, "gpus", "any")
    if category == "slice_factor":
        value, verdict = copy.deepcopy(draw(st.sampled_from(SLICE_FACTORS)))
        spec["sliceFactor"] = value
        return Mutation(category, "sliceFactor", verdict)
    return None


@st.composite
def fuzzed_allocations(
    draw: st.DrawFn,
    bases: list[Doc] | None = None,
    max_mutations: int = 3,
    require_invalid: bool = False,
) -> Fuzzed:
    """A valid allocation (an example manifest, or its bare spec) with 1..max_mutations changes."""
    manifest = copy.deepcopy(draw(st.sampled_from(bases or example_manifests())))
    bare = bases is None and draw(st.booleans())
    fuzzed = Fuzzed(manifest["spec"] if bare else manifest, "" if bare else "spec.")
    spec = fuzzed.document if bare else fuzzed.document["spec"]
    for _ in range(draw(st.integers(1, max_mutations))):
        done = draw(mutation(spec))
        if done is not None:
            fuzzed.mutations.append(done)
    if require_invalid and not fuzzed.invalid_paths:
        # Each attempt changes a copy: a draw that is not kept must leave no change behind (one
        # that did could leave, say, an unknown field that no recorded mutation names).
        for _ in range(20):
            trial = copy.deepcopy(spec)
            done = draw(mutation(trial))
            if done is not None and done.verdict == "invalid":
                break
        else:
            reject()
        spec.clear()
        spec.update(trial)
        fuzzed.mutations.append(done)
    return fuzzed


class _Dumper(yaml.SafeDumper):
    """Quotes the strings that YAML 1.2 (kubectl, `melange solve`) reads as numbers, like "1e3"."""


_Dumper.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def to_yaml(document: Any) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=100)


def to_json(document: Any) -> str:
    return json.dumps(document)  # NaN and Infinity as Python writes them: not JSON, but parsed


# -- hostile texts: each is refused with one line naming the input --------------------------------


def billion_laughs(levels: int = 9) -> bytes:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    previous = "a"
    for name in "bcdefghijkl"[: levels - 1]:
        lines.append(f"{name}: &{name} [{', '.join(['*' + previous] * 9)}]")
        previous = name
    return ("\n".join(lines) + "\n").encode()


def bomb_in_spec(manifest: Doc) -> bytes:
    """A manifest whose throughput rows are aliases of aliases: billions of numbers once expanded."""
    text = to_yaml(manifest)
    row = "[" + ", ".join(["1"] * 9) + "]"
    head = f"x0: &x0 {row}\n"
    for k in range(1, 9):
        head += f"x{k}: &x{k} [{', '.join([f'*x{k - 1}'] * 9)}]\n"
    return (head + text.replace("apiVersion:", "apiVersion:", 1)).encode()


def self_reference() -> bytes:
    return b"spec: &a {buckets: *a, workload: [*a], gpus: [*a]}\n"


def deep_list(levels: int = 10_000) -> bytes:
    return ("[" * levels + "]" * levels + "\n").encode()


def deep_mapping(levels: int = 10_000) -> bytes:
    return ("{a: " * levels + "1" + "}" * levels + "\n").encode()


def deep_json(levels: int = 10_000) -> bytes:
    return ('{"spec": ' * levels + "1" + "}" * levels + "\n").encode()


def deep_block(levels: int = 10_000) -> bytes:
    return "".join(f"{' ' * k}k:\n" for k in range(levels)).encode()


def huge(manifest: Doc, size: int = 10 * 1024 * 1024) -> bytes:
    """A valid manifest padded to `size` bytes with a comment."""
    text = to_yaml(manifest).encode()
    return text + b"# " + b"x" * (size - len(text) - 3) + b"\n"


def huge_matrix(size: int = 10 * 1024 * 1024) -> bytes:
    row = "[" + ", ".join(["1"] * 1000) + "]"
    count = size // (len(row) + 4)
    return ("spec:\n  distribution:\n" + f"  - {row}\n" * count).encode()


def several_documents(manifest: Doc, count: int = 2) -> bytes:
    return "---\n".join([to_yaml(manifest)] * count).encode()


def hostile_texts(manifest: Doc) -> dict[str, bytes]:
    """Inputs that are not one readable allocation; each must get one line naming the input."""
    text = to_yaml(manifest).encode()
    return {
        "billion-laughs": billion_laughs(),
        "bomb-in-spec": bomb_in_spec(manifest),
        "self-reference": self_reference(),
        "deep-list-10k": deep_list(),
        "deep-mapping-10k": deep_mapping(),
        "deep-json-10k": deep_json(),
        "deep-block-10k": deep_block(),
        "deep-list-100": deep_list(100),
        "deep-json-100": deep_json(100),
        "10MB-comment": huge(manifest),
        "10MB-matrix": huge_matrix(),
        "non-utf8-start": b"\xff\xfe" + text,
        "non-utf8-middle": text[:200] + b"\xc3\x28" + text[200:],
        "latin1": "spec: {gpus: [{name: 'Ä'}]}\n".encode("latin-1"),
        "two-documents": several_documents(manifest),
        "three-documents": several_documents(manifest, 3),
        "empty": b"",
        "blank": b"\n  \n",
        "comment-only": b"# nothing here\n",
        "document-markers-only": b"---\n...\n",
        "unclosed-flow": b"spec: {buckets: [1, 2\n",
        "tab-indent": b"spec:\n\tbuckets: 1\n",
        "nul-byte": text[:100] + b"\x00" + text[100:],
        "python-tag": b"spec: !!python/object/apply:os.system ['true']\n",
        "unhashable-key": b"? [a, b]\n: 1\n",
        "truncated-json": to_json(manifest).encode()[:-20],
    }


# Parseable documents that are not an allocation: each is refused naming what is wrong.
NOT_ALLOCATIONS: dict[str, bytes] = {
    "list-at-top": b"- 1\n- 2\n",
    "scalar-at-top": b"hello\n",
    "number-at-top": b"42\n",
    "json-list": b"[1, 2, 3]",
    "wrong-kind": b"kind: Deployment\napiVersion: apps/v1\nspec: {}\n",
    "spec-is-list": b"kind: MelangeAllocation\napiVersion: melange.dev/v1alpha1\nspec: []\n",
}
