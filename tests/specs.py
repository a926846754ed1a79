"""Helpers shared by the unit and end-to-end tests for building spec variants."""

from __future__ import annotations

import copy
from typing import Any


def with_value(spec: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `spec` with one value replaced; `path` is dotted, integers index lists."""
    result = copy.deepcopy(spec)
    node: Any = result
    parts = [int(p) if p.isdigit() else p for p in path.split(".")]
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
    return result
