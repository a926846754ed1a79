"""GPU throughput profiles: the shipped library of estimates, and the user's measured profiles.

Each profile is a `spec.gpus[]` entry of a `MelangeAllocation` (`name`, `costPerHour`,
`throughput`) plus metadata saying what it is for (`model`, `tpotSeconds`, `buckets`) and where it
comes from. The shipped ones are estimates (`source: estimate`, `estimate:` with every model input);
they live in `data/` as package data and are produced by `melange.tools.profiles.build`.

Measured profiles (`source: measured`, optionally `measurement:` saying how) are imported into a
user profile directory: `$MELANGE_PROFILES_DIR`, else `$XDG_DATA_HOME/melange/profiles` (by default
`~/.local/share/melange/profiles`). Listing and loading with a `user_dir` gives the user's profiles
alongside the shipped ones; a user profile with the name of a shipped one replaces it.

Every profile carries the bucket edges it was made for (`buckets`), and its throughput matrix has
their shape. A spec composed from profiles and a workload (`compose_spec`) refuses a profile made
for other edges, even one whose matrix happens to have the right shape: its rows would be read as
other buckets. A profile whose every throughput is 0 serves nothing and is refused when loaded.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from melange import api
from melange.tools import perfmodel

GPU_ENTRY_KEYS = ("name", "costPerHour", "throughput")
USER_DIR_ENV = "MELANGE_PROFILES_DIR"
PROFILE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*$")
MAX_PROFILE_NAME = 200
MEASURED_REQUIRED_KEYS = (
    "profile",
    "name",
    "costPerHour",
    "model",
    "tpotSeconds",
    "buckets",
    "source",
    "throughput",
)
MEASURED_OPTIONAL_KEYS = ("measurement", "description")
SHIPPED_OPTIONAL_KEYS = ("estimate", "description")


@dataclass(frozen=True)
class ProfileInfo:
    """One line of `melange profiles list`."""

    name: str  # e.g. llama-3.1-8b/a100-80gb/tpot-120ms
    model: str
    gpu: str
    tpot_seconds: float
    cost_per_hour: float
    source: str  # "estimate" for everything shipped, "measured" for imported profiles
    path: str | None = None  # the file of a user profile; None for a shipped one


class UnknownProfileError(KeyError):
    """No profile has that name; the message lists the ones that exist, or why it is not shipped."""

    def __init__(self, name: str, available: list[str], withheld: str | None = None) -> None:
        self.name = name
        self.available = available
        self.withheld = withheld
        super().__init__(name)

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        if self.withheld is not None:
            return f"profile {self.name} is not shipped: {self.withheld}"
        return f"unknown profile {self.name!r}; available: {', '.join(self.available) or '(none)'}"


def _data() -> Traversable:
    return files(__name__).joinpath("data")


def _documents() -> dict[str, dict[str, Any]]:
    """Every shipped profile document, by profile name."""
    documents: dict[str, dict[str, Any]] = {}
    for entry in _data().iterdir():
        if entry.is_file() and entry.name.endswith(".yaml"):
            document = yaml.safe_load(entry.read_text(encoding="utf-8"))
            if not isinstance(document, dict) or not isinstance(document.get("profile"), str):
                raise ValueError(f"shipped profile {entry.name} is not a profile document")
            documents[document["profile"]] = document
    return dict(sorted(documents.items()))


def list_profiles(user_dir: Path | None = None) -> list[ProfileInfo]:
    """The shipped profiles, and with `user_dir` the valid user profiles too, sorted by name."""
    user = load_user_profiles(user_dir).documents if user_dir is not None else {}
    documents = {**_documents(), **{name: doc for name, (_, doc) in user.items()}}
    return [
        ProfileInfo(
            name=name,
            model=str(doc["model"]),
            gpu=str(doc["name"]),
            tpot_seconds=float(doc["tpotSeconds"]),
            cost_per_hour=float(doc["costPerHour"]),
            source=str(doc["source"]),
            path=str(user[name][0]) if name in user else None,
        )
        for name, doc in sorted(documents.items())
    ]


def load_profile(name: str, user_dir: Path | None = None) -> dict[str, Any]:
    """A profile by name: a `spec.gpus[]` entry plus its metadata (a fresh copy).

    With `user_dir`, a user profile of that name comes first (user profiles that are not valid
    are never loaded). Raises `UnknownProfileError` (a `KeyError`) listing the available names, or
    saying why a profile the library leaves out is not shipped, and `ProfileError` for a shipped
    profile that is not valid (its metadata, its matrix against its edges, or a profile that
    serves no bucket).
    """
    user = load_user_profiles(user_dir).documents if user_dir is not None else {}
    if name in user:
        return user[name][1]
    documents = _documents()
    if name not in documents:
        raise UnknownProfileError(name, sorted({*documents, *user}), withheld_profiles().get(name))
    errors = check_profile(documents[name], shipped=True)
    if errors:
        raise ProfileError([f"shipped profile {name} is not valid: {e}" for e in errors])
    return documents[name]


# --- user profiles --------------------------------------------------------------------------------


class ProfileError(ValueError):
    """A profile document is not valid; `errors` lists every problem, each naming its field."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


def user_profile_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$MELANGE_PROFILES_DIR`, else `$XDG_DATA_HOME/melange/profiles`, else under ~/.local/share.

    As the XDG base directory specification says, a relative `XDG_DATA_HOME` is ignored.
    """
    env = os.environ if environ is None else environ
    if env.get(USER_DIR_ENV):
        return Path(env[USER_DIR_ENV])
    xdg = env.get("XDG_DATA_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "melange" / "profiles"


def validate_profile(document: Any, *, shipped: bool = False) -> list[str]:
    """Every problem with a measured profile document, as `field: message` lines (empty: valid).

    The shape is the shipped one with `source: measured`: `profile` (the name, lower-case words
    joined by `/`, e.g. `llama-3.1-8b/l4/tpot-40ms`), `name` (the GPU type), `costPerHour`,
    `model`, `tpotSeconds`, `buckets` and `throughput` (one row per input bucket, one column per
    output bucket, req/s), and optionally `measurement` (a mapping: how, when, with what) and
    `description`. The GPU entry is checked by the same rules as `spec.gpus[]`, its throughput
    against its own `buckets`. With `shipped`, the document is a shipped estimate: `source:
    estimate`, and `estimate:` (the model's inputs) instead of `measurement:`.
    """
    if not isinstance(document, Mapping):
        return [f"must be a mapping (a profile document), got {type(document).__name__}"]
    optional = SHIPPED_OPTIONAL_KEYS if shipped else MEASURED_OPTIONAL_KEYS
    source = "estimate" if shipped else "measured"
    errors = [f"{key}: is required" for key in MEASURED_REQUIRED_KEYS if key not in document] + [
        f"{key}: is not a known field"
        for key in document
        if key not in MEASURED_REQUIRED_KEYS and key not in optional
    ]
    name = document.get("profile")
    if "profile" in document and (
        not isinstance(name, str) or len(name) > MAX_PROFILE_NAME or not PROFILE_NAME.match(name)
    ):
        errors.append(
            "profile: must be lower-case letters, digits, '.', '_' or '-', in parts joined by '/' "
            f"(e.g. llama-3.1-8b/l4/tpot-40ms), at most {MAX_PROFILE_NAME} characters, got {name!r}"
        )
    if "source" in document and document["source"] != source:
        errors.append(f"source: must be {source!r}, got {document['source']!r}")
    if "model" in document and (not isinstance(document["model"], str) or not document["model"]):
        errors.append(f"model: must be a non-empty string, got {document['model']!r}")
    tpot = document.get("tpotSeconds")
    if "tpotSeconds" in document and not (
        isinstance(tpot, int | float)
        and not isinstance(tpot, bool)
        and math.isfinite(tpot)
        and tpot > 0
    ):
        errors.append(f"tpotSeconds: must be a number > 0, got {tpot!r}")
    for key in ("measurement", "estimate"):
        if key in document and key in optional and not isinstance(document[key], Mapping):
            errors.append(f"{key}: must be a mapping")
    if "description" in document and not isinstance(document["description"], str):
        errors.append("description: must be a string")

    # the GPU entry and the edges, by the allocation's own rules
    buckets = document.get("buckets")
    ins = buckets.get("inputTokens") if isinstance(buckets, Mapping) else None
    outs = buckets.get("outputTokens") if isinstance(buckets, Mapping) else None
    distribution: list[list[int]] = []
    if isinstance(ins, list) and isinstance(outs, list) and len(ins) >= 2 and len(outs) >= 2:
        distribution = [[0] * (len(outs) - 1) for _ in range(len(ins) - 1)]
    spec = {
        "buckets": buckets,
        "workload": {"distribution": distribution, "totalRate": 0},
        "gpus": [{key: document[key] for key in GPU_ENTRY_KEYS if key in document}],
    }
    try:
        api.validate_spec(spec, prefix="")
    except api.SpecError as exc:
        for error in exc.errors:
            path = error.path.removeprefix("gpus[0].")
            if path.startswith(("workload", "gpus")):  # consequences of errors reported above
                continue
            line = f"{path}: {error.message}" if path else error.message
            if line not in errors and not (
                path in GPU_ENTRY_KEYS and f"{path}: is required" in errors
            ):
                errors.append(line)
    return errors


def check_profile(document: Any, *, shipped: bool = False) -> list[str]:
    """`validate_profile`, and a profile that serves no bucket (every throughput 0) is refused:
    the rule for a profile to be loaded or imported (a measurement may well find all zeros)."""
    errors = validate_profile(document, shipped=shipped)
    if not errors and not serves_any(document["throughput"]):
        errors.append(
            f"throughput: every entry is 0: profile {document['profile']} serves no bucket, so it "
            "has no place in a spec"
        )
    return errors


def serves_any(throughput: Any) -> bool:
    """Whether a throughput matrix has a bucket with a throughput above 0."""
    rows = throughput if isinstance(throughput, list) else []
    return any(
        isinstance(v, int | float) and v > 0 for row in rows if isinstance(row, list) for v in row
    )


@dataclass(frozen=True)
class UserProfiles:
    documents: dict[str, tuple[Path, dict[str, Any]]]  # profile name -> (file, document)
    problems: list[str]  # files that could not be used, each with the reason


def load_user_profiles(directory: Path) -> UserProfiles:
    """The valid profiles in `directory` (`*.yaml`), and a line per file that is not one."""
    documents: dict[str, tuple[Path, dict[str, Any]]] = {}
    problems: list[str] = []
    if not directory.is_dir():
        return UserProfiles(documents, problems)
    for path in sorted(directory.glob("*.yaml")):
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
            problems.append(f"{path}: cannot read: {exc}")
            continue
        errors = check_profile(document)
        if errors:
            problems.append(f"{path}: not a valid profile: {errors[0]}")
            continue
        name = str(document["profile"])
        if name in documents:
            problems.append(f"{path}: profile {name!r} is also in {documents[name][0]}")
            continue
        documents[name] = (path, document)
    return UserProfiles(documents, problems)


def render_user_profile(document: Mapping[str, Any], origin: str) -> str:
    header = f"# A measured profile, imported by `melange profiles import` from {origin}.\n"
    return header + yaml.safe_dump(
        dict(document), sort_keys=False, default_flow_style=None, width=100
    )


def import_profile(source: str, text: str, directory: Path, *, force: bool = False) -> Path:
    """Validate a measured profile (YAML or JSON `text`) and write it into `directory`.

    Returns the file written. Raises `ProfileError` listing every problem, or when a different
    user profile of that name exists and `force` is not set.
    """
    from melange.tools.profiles.build import file_name

    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ProfileError([f"{source}: not valid YAML: {exc}"]) from None
    except RecursionError:
        raise ProfileError([f"{source}: nested too deeply to be a profile"]) from None
    if len(documents) != 1:
        raise ProfileError([f"{source}: must hold exactly one document, got {len(documents)}"])
    document = documents[0]
    errors = check_profile(document)
    if errors:
        raise ProfileError([f"{source}: {e}" for e in errors])
    target = directory / file_name(str(document["profile"]))
    if target.exists() and not force:
        existing = yaml.safe_load(target.read_text(encoding="utf-8"))
        if existing != document:
            raise ProfileError(
                [
                    f"{target}: a different profile {document['profile']!r} is already there; "
                    "pass --force to replace it"
                ]
            )
    directory.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_text(render_user_profile(document, source), encoding="utf-8")
    temporary.replace(target)
    return target


def is_shipped(name: str) -> bool:
    return name in _documents()


def gpu_entry(profile: Mapping[str, Any]) -> dict[str, Any]:
    """Just `name`, `costPerHour`, `throughput`: `spec.gpus[]` rejects the metadata keys."""
    return {key: profile[key] for key in GPU_ENTRY_KEYS}


# --- comparing profiles ---------------------------------------------------------------------------


def cost_per_million(cost_per_hour: float, throughput: float) -> float | None:
    """What a million requests of one bucket cost on a GPU type at its full SLO throughput.

    Rounded to 6 decimals (of the currency of `costPerHour`); None when it cannot serve the bucket.
    """
    if throughput <= 0:
        return None
    return round(cost_per_hour / (throughput * 3600.0) * 1e6, 6)


def compare_profiles(documents: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Cost per million requests per bucket across profiles, and which profile is cheapest.

    `documents` maps profile names to profile documents, which must share their bucket edges
    (else `ProfileError`). A bucket no profile can serve has no winner; ties go to the profile
    given first.
    """
    if not documents:
        raise ProfileError(["no profile to compare"])
    names = list(documents)
    first = names[0]
    edges = documents[first]["buckets"]
    mismatched = [n for n in names[1:] if documents[n]["buckets"] != edges]
    if mismatched:
        other = documents[mismatched[0]]["buckets"]
        raise ProfileError(
            [
                f"profiles must share bucket edges to be compared: {first} has inputTokens "
                f"{edges['inputTokens']}, outputTokens {edges['outputTokens']}; "
                f"{mismatched[0]} has inputTokens {other['inputTokens']}, "
                f"outputTokens {other['outputTokens']}"
            ]
        )
    ins, outs = list(edges["inputTokens"]), list(edges["outputTokens"])
    rows = []
    for i in range(len(ins) - 1):
        for j in range(len(outs) - 1):
            costs = {
                n: cost_per_million(
                    float(documents[n]["costPerHour"]), float(documents[n]["throughput"][i][j])
                )
                for n in names
            }
            served = [(c, k, n) for k, (n, c) in enumerate(costs.items()) if c is not None]
            rows.append(
                {
                    "inputTokens": [ins[i], ins[i + 1]],
                    "outputTokens": [outs[j], outs[j + 1]],
                    "costPerMillion": costs,
                    "winner": min(served)[2] if served else None,
                }
            )
    return {
        "profiles": [
            {"profile": n, "gpu": documents[n]["name"], "costPerHour": documents[n]["costPerHour"]}
            for n in names
        ],
        "buckets": {"inputTokens": ins, "outputTokens": outs},
        "rows": rows,
    }


def cheapest_grid(
    model: str,
    tpot_seconds: float,
    *,
    gpus: list[str] | None = None,
    input_edges: list[int] | None = None,
    output_edges: list[int] | None = None,
    era: perfmodel.EngineEra = "current",
    representative: perfmodel.RepresentativeRule = "mean",
) -> dict[str, Any]:
    """Which GPU type the performance model says serves each bucket cheapest, for `model` at a
    TPOT SLO: cost per request = an instance's price / its throughput in the bucket.

    The types are `gpus` (datasheet names; default: every shipped type), each on the instance
    size `perfmodel.SHIPPED_INSTANCES` gives it for `model` (one GPU for a model not shipped);
    `era` picks the engine overheads (`early-vllm`: the Mélange paper's vLLM), `representative`
    the request size that stands for a bucket (`upper`: its upper edge). The result holds
    the grid of winners (rows: input buckets, columns: output buckets; None: no type serves the
    bucket) and every type's cost per million requests, computed as `compare_profiles` does.
    """
    names = list(perfmodel.SHIPPED_GPUS if gpus is None else gpus)
    unknown = [n for n in names if n not in perfmodel.DATASHEETS]
    if unknown or model not in perfmodel.MODELS or not names:
        raise ProfileError(
            [
                f"unknown GPU type {n!r}; use one of {', '.join(perfmodel.DATASHEETS)}"
                for n in unknown
            ]
            + ([f"unknown model {model!r}"] if model not in perfmodel.MODELS else [])
            + ([] if names else ["no GPU type to compare"])
        )
    sizes = perfmodel.SHIPPED_INSTANCES.get(model, {})
    documents = {}
    for name in names:
        gpu = perfmodel.gpu_instance(perfmodel.DATASHEETS[name], sizes.get(name, 1))
        profile = perfmodel.build_profile(
            gpu,
            perfmodel.MODELS[model],
            tpot_seconds,
            input_edges,
            output_edges,
            engine=perfmodel.engine_for(gpu, era=era),
            representative=representative,
        )
        documents[gpu.name] = profile
    table = compare_profiles(documents)
    ins, outs = table["buckets"]["inputTokens"], table["buckets"]["outputTokens"]
    columns = len(outs) - 1
    winners = [row["winner"] for row in table["rows"]]
    costs = {
        name: [
            [row["costPerMillion"][name] for row in table["rows"][r * columns : (r + 1) * columns]]
            for r in range(len(ins) - 1)
        ]
        for name in documents
    }
    return {
        "model": model,
        "tpotSeconds": tpot_seconds,
        "engine": era,
        "sizePoint": representative,
        "types": [
            {"name": n, "gpus": d["estimate"]["gpu"]["gpus"], "costPerHour": d["costPerHour"]}
            for n, d in documents.items()
        ],
        "buckets": table["buckets"],
        "cheapest": [winners[r * columns : (r + 1) * columns] for r in range(len(ins) - 1)],
        "costPerMillion": costs,
    }


# --- edges: a profile against a workload ----------------------------------------------------------

Edges = tuple[list[int], list[int]]  # (input edges, output edges)


def _integers(value: Any) -> list[int] | None:
    """A list of integral numbers as ints (8.0 is 8, as the spec reads it); None otherwise."""
    if not isinstance(value, list):
        return None
    items = [int(v) if isinstance(v, float) and v.is_integer() else v for v in value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        return None
    return items


def edges_of(spec: Any) -> Edges | None:
    """The bucket edges of a raw spec or profile document (its `buckets`); None when malformed."""
    buckets = spec.get("buckets") if isinstance(spec, Mapping) else None
    if not isinstance(buckets, Mapping):
        return None
    ins, outs = _integers(buckets.get("inputTokens")), _integers(buckets.get("outputTokens"))
    return None if ins is None or outs is None else (ins, outs)


def edges_mismatch(name: str, profile: Mapping[str, Any], edges: Edges) -> str | None:
    """One line when profile `name` was made for other bucket edges than `edges`, else None.

    A profile's throughput is per bucket of its own edges: with other edges its rows and columns
    stand for other request sizes, whether or not the matrix happens to have the right shape.
    """
    lines = edges_mismatches({name: profile}, edges)
    return lines[0] if lines else None


def edges_mismatches(chosen: Mapping[str, Mapping[str, Any]], edges: Edges) -> list[str]:
    """A line per set of edges, other than `edges`, that profiles in `chosen` were made for."""
    groups: dict[str, list[str]] = {}
    for name, profile in chosen.items():
        own = edges_of(profile)
        if own != (list(edges[0]), list(edges[1])):
            ins, outs = own if own is not None else (profile.get("buckets"), None)
            groups.setdefault(f"input edges {ins} / output edges {outs}", []).append(name)
    workload = f"the workload's are {list(edges[0])} / {list(edges[1])}"
    return [
        f"profile {names[0]} was made for {own}; {workload}"
        if len(names) == 1
        else f"profiles {', '.join(names)} were made for {own}; {workload}"
        for own, names in groups.items()
    ]


def profiles_for_edges(edges: Edges, user_dir: Path | None = None) -> list[str]:
    """The shipped (and, with `user_dir`, user) profiles made for exactly these edges."""
    user = load_user_profiles(user_dir).documents if user_dir is not None else {}
    documents = {**_documents(), **{name: doc for name, (_, doc) in user.items()}}
    return sorted(name for name, doc in documents.items() if edges_of(doc) == edges)


def compose_spec(
    spec: Mapping[str, Any], chosen: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """A raw spec with a `gpus[]` entry per profile in `chosen` (profile name -> document) added.

    `spec` holds at least the buckets and the workload (entries already in its `gpus` stay first).
    Raises `ProfileError` when a profile was made for other bucket edges than the spec's: one
    line per set of such edges, naming the profiles and both edge sets.
    The result is raw: validate it as any spec (malformed edges are reported there).
    """
    edges = edges_of(spec)
    if edges is not None:
        errors = edges_mismatches(chosen, edges)
        if errors:
            raise ProfileError(errors)
    given = spec.get("gpus", [])
    if not isinstance(given, list):
        return dict(spec)  # not a list: the spec's validation says so
    return {**spec, "gpus": given + [gpu_entry(doc) for doc in chosen.values()]}


def withheld_profiles() -> dict[str, str]:
    """The profiles the library leaves out (the model says they serve no bucket), and why."""
    from melange.tools.profiles.build import withheld_profiles as withheld

    return withheld()
