"""The controller's failures, as plain sentences for conditions and Events (no client types)."""

from __future__ import annotations


class ScaleError(Exception):
    """A node pool could not be read or patched; the message says why, for people."""


class NotLeader(Exception):
    """A write was refused before it was sent: this replica does not hold the leader Lease."""


class StatusGone(Exception):
    """The allocation was deleted while it was being reconciled."""


class PublishError(Exception):
    """The routing table could not be written to its ConfigMap; `reason` is the condition's."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
