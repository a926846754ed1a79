"""The operator fixture of the end-to-end suite, for the fuzzed allocations through the API server."""

from tests.e2e.conftest import operator

__all__ = ["operator"]
