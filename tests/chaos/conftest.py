"""Chaos fixtures: the end-to-end ones (an operator per test on the session's control plane, a real
Prometheus scraping an emitter); scenarios that stop the control plane start their own."""

from __future__ import annotations

from tests.e2e.conftest import emitter, operator, prometheus

__all__ = ["emitter", "operator", "prometheus"]
