"""Offline tools: request logs to workloads, the performance model and shipped profiles, endpoint measurement."""
