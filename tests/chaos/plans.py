"""The three-pool allocation of the end-to-end tests, and its plans for a given request rate."""

from __future__ import annotations

import copy
import functools
from typing import Any

from tests.e2e.test_operator import SPEC, expected_replicas

#: pool name -> the GPU type whose pool it is, in the end-to-end tests' SPEC
POOL_GPU = {"pool-l4": "L4", "pool-a100": "A100", "pool-h100": "H100"}


def spec_at(rate: float) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    spec["workload"]["totalRate"] = rate
    return spec


@functools.cache
def plan_at(rate: float) -> dict[str, int]:
    """Replicas per GPU type that the solver plans for SPEC at this request rate."""
    return expected_replicas(spec_at(rate))


def by_pool(plan: dict[str, int]) -> dict[str, int]:
    return {name: plan[gpu] for name, gpu in POOL_GPU.items()}


def equal(actual: object, expected: object) -> None:
    assert actual == expected, f"{actual} != {expected}"
