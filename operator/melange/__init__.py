"""melange-operator: the cheapest mix of GPU types that serves an LLM workload within its SLO."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("melange-operator")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
