"""The only code that talks to Kubernetes (the `kubernetes` client and Kopf)."""
