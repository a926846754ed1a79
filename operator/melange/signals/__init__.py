"""Signals: PromQL, the observed rate and distribution (pure decisions), IPF, the Prometheus client."""
