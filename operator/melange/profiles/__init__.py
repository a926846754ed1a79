"""The shipped profile library: estimated throughput profiles to start from before measuring.

Each profile is a `spec.gpus[]` entry of a `MelangeAllocation` (`name`, `costPerHour`,
`throughput`) plus metadata saying what it is for (`model`, `tpotSeconds`, `buckets`) and that it
is an estimate (`source: estimate`, `estimate:` with every model input). The files live in
`data/` as package data and are produced by `melange.profiles.build`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Any

import yaml

GPU_ENTRY_KEYS = ("name", "costPerHour", "throughput")


@dataclass(frozen=True)
class ProfileInfo:
    """One line of `melange profiles list`."""

    name: str  # e.g. llama-3.1-8b/a100-80gb/tpot-120ms
    model: str
    gpu: str
    tpot_seconds: float
    cost_per_hour: float
    source: str  # "estimate" for everything shipped


class UnknownProfileError(KeyError):
    """No shipped profile has that name; the message lists the ones that exist."""

    def __init__(self, name: str, available: list[str]) -> None:
        self.name = name
        self.available = available
        super().__init__(name)

    def __str__(self) -> str:  # KeyError would print the repr of its argument
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


def list_profiles() -> list[ProfileInfo]:
    """The shipped profiles, sorted by name."""
    return [
        ProfileInfo(
            name=name,
            model=str(doc["model"]),
            gpu=str(doc["name"]),
            tpot_seconds=float(doc["tpotSeconds"]),
            cost_per_hour=float(doc["costPerHour"]),
            source=str(doc["source"]),
        )
        for name, doc in _documents().items()
    ]


def load_profile(name: str) -> dict[str, Any]:
    """A shipped profile by name: a `spec.gpus[]` entry plus its metadata (a fresh copy).

    Raises `UnknownProfileError` (a `KeyError`) listing the available names.
    """
    documents = _documents()
    if name not in documents:
        raise UnknownProfileError(name, list(documents))
    return documents[name]


def gpu_entry(profile: Mapping[str, Any]) -> dict[str, Any]:
    """Just `name`, `costPerHour`, `throughput`: `spec.gpus[]` rejects the metadata keys."""
    return {key: profile[key] for key in GPU_ENTRY_KEYS}
