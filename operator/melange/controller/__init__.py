"""The controller: Kopf handlers, per-allocation state, pure decisions, the one Kubernetes client."""
