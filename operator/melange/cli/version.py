"""The installed version, read from the package metadata only when asked (importing
`importlib.metadata` costs ~50 ms, too much for every `melange` start)."""

from __future__ import annotations


def installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("melange-operator")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0.0.0"
