"""melange-operator: the cheapest mix of GPU types that serves an LLM workload within its SLO."""
