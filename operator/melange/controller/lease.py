"""Leader election on a Kubernetes Lease: exactly one replica writes.

The protocol of client-go's leaderelection, kept small:
- every `retry` seconds each replica reads the Lease; the holder renews it, the others watch it;
- a standby takes the Lease when its record (holder, renewTime) has not changed for
  `duration` seconds *by the standby's own clock* (no trust in other replicas' clocks);
- the holder stops writing as soon as it has not renewed for `renew_deadline` seconds, which is
  shorter than `duration`: a replica that stalls (paused, partitioned) stops writing before anyone
  else may start. Every write asks `leading()` right before it is sent.
- on a clean shutdown the holder releases the Lease, so the standby takes over at its next read.

With the defaults (duration 8 s, retry 2 s), a standby takes over at most duration + 2 x retry
= 12 s after the leader's last renewal.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

log = logging.getLogger("melange.lease")


@dataclass(frozen=True)
class LeaseTiming:
    duration: float = 8.0
    renew_deadline: float = 5.0
    retry: float = 2.0


@dataclass(frozen=True)
class LeaseRecord:
    """The Lease's spec as read, with the version the next write is conditional on."""

    holder: str | None
    renew_time: str | None
    duration_seconds: int | None
    transitions: int
    acquire_time: datetime | None
    resource_version: str | None


class LeaseStore(Protocol):
    def read_lease(self, namespace: str, name: str) -> LeaseRecord | None: ...

    def write_lease(
        self,
        namespace: str,
        name: str,
        holder: str | None,
        duration_seconds: int,
        transitions: int,
        acquire_time: datetime | None,
        resource_version: str | None,
    ) -> bool: ...


@dataclass
class Observed:
    """The Lease as this replica last saw it change, and when (its own monotonic clock)."""

    holder: str | None
    renew_time: str | None
    seen_at: float


def may_take(
    record: LeaseRecord | None, observed: Observed | None, now: float, duration: float
) -> bool:
    """Whether a standby may take the Lease: none, released, or unchanged for `duration`."""
    if record is None or not record.holder:
        return True
    if observed is None or (observed.holder, observed.renew_time) != (
        record.holder,
        record.renew_time,
    ):
        return False  # just changed: the holder is alive
    return now - observed.seen_at >= duration


class LeaderElector:
    """Runs the election loop; `leading()` is the write guard, safe to call from any thread."""

    def __init__(
        self,
        store: LeaseStore,
        namespace: str,
        name: str,
        identity: str,
        timing: LeaseTiming = LeaseTiming(),
        on_change: Callable[[bool], None] = lambda leading: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.namespace, self.name, self.identity = namespace, name, identity
        self.timing = timing
        self.on_change = on_change
        self.clock = clock
        self._renewed_at: float | None = None  # when the last successful renewal was *sent*
        self._observed: Observed | None = None
        self._was_leading = False
        self._task: asyncio.Task[None] | None = None
        # A round runs in a thread, which cancelling its task does not stop: once stopped, a
        # round still in flight must not mark this replica as leading again.
        self._stopped = False
        self._lock = threading.Lock()
        self._round: asyncio.Future[bool] | None = None  # the round in flight, if any

    def leading(self) -> bool:
        renewed = self._renewed_at
        return renewed is not None and self.clock() - renewed < self.timing.renew_deadline

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="melange leader election")

    async def stop(self) -> None:
        """Stop electing; release the Lease if held, so a standby takes over at once."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._round is not None:
            # let it land first, so the release is conditional on the version it wrote
            await asyncio.wait({self._round}, timeout=self.timing.renew_deadline)
            if self._round.done() and not self._round.cancelled():
                self._round.exception()  # seen (a failure would only have been logged)
        with self._lock:
            self._stopped = True
            held = self.leading()
            self._renewed_at = None
        if held:
            self._notify()
            try:
                await asyncio.to_thread(self._release)
            except Exception as exc:  # the Lease then expires on its own
                log.warning("Could not release the Lease %s/%s: %s", self.namespace, self.name, exc)

    def _release(self) -> None:
        record = self.store.read_lease(self.namespace, self.name)
        if record is not None and record.holder == self.identity:
            self.store.write_lease(
                self.namespace,
                self.name,
                None,
                1,
                record.transitions,
                record.acquire_time,
                record.resource_version,
            )

    async def _run(self) -> None:
        while True:
            self._round = asyncio.ensure_future(asyncio.to_thread(self.try_acquire_or_renew))
            try:
                await asyncio.shield(self._round)  # a stop waits for it (`stop`), not cancels it
            except Exception as exc:
                log.warning("Leader election: cannot reach the Lease: %s", exc)
            self._notify()
            await asyncio.sleep(self.timing.retry)

    def _notify(self) -> None:
        leading = self.leading()
        if leading != self._was_leading:
            self._was_leading = leading
            log.info(
                "%s %s the Lease %s/%s",
                self.identity,
                "now holds" if leading else "no longer holds",
                self.namespace,
                self.name,
            )
            self.on_change(leading)

    def try_acquire_or_renew(self) -> bool:
        """One round of the protocol (blocking); True when this replica holds the Lease after it."""
        sent = self.clock()
        record = self.store.read_lease(self.namespace, self.name)
        if record is not None and (
            self._observed is None
            or (self._observed.holder, self._observed.renew_time)
            != (record.holder, record.renew_time)
        ):
            self._observed = Observed(record.holder, record.renew_time, sent)
        duration = int(self.timing.duration)
        if record is not None and record.holder == self.identity:
            written = self.store.write_lease(
                self.namespace,
                self.name,
                self.identity,
                duration,
                record.transitions,
                record.acquire_time,
                record.resource_version,
            )
        elif may_take(record, self._observed, sent, self.timing.duration):
            written = self.store.write_lease(
                self.namespace,
                self.name,
                self.identity,
                duration,
                (record.transitions + 1) if record is not None else 0,
                None,
                record.resource_version if record is not None else None,
            )
        else:
            written = False
            self._renewed_at = None
        if written:
            with self._lock:
                if not self._stopped:
                    self._renewed_at = sent
        return written
