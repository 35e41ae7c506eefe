"""Connection-level limits shared by both receivers: counting and logging refusals, and the
DIMSE connection gate.

A connection nodal closes for one of these limits is counted in
`nodal_connections_refused_total{receiver, reason}` and logged once per burst: the first
refusal of a reason is logged at once, the rest of the burst (everything in the next
`BURST_SECONDS`) in one summary line with the count and the busiest addresses. A port
scanner or a flood of idle connections therefore costs a few log lines, not one per
connection.

`ConnectionGate` decides at accept, before any PDU is read, whether a DIMSE connection may
stay: its host must be one the allow-list names (when every `allowed_callers` entry has a
host), the host may hold at most `max_connections_per_host` connections, and at most
`max_pending_connections` connections may be negotiating at once. A connection stops being
pending when its association is established (it then holds one of `max_associations`
slots) and leaves the gate when its association thread has ended.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dicom_node.observe import metrics

log = logging.getLogger("nodal.limits")

BURST_SECONDS = 10.0

# reason -> what it means, for the log (the values of the metric label `reason`)
HOST_NOT_ALLOWED = "host_not_allowed"
PER_HOST_LIMIT = "per_host_limit"
PENDING_LIMIT = "pending_limit"
ARTIM_TIMEOUT = "artim_timeout"
HEADER_TIMEOUT = "header_timeout"
BODY_TIMEOUT = "body_timeout"
UPLOAD_LIMIT = "upload_limit"
CLIENT_UPLOAD_LIMIT = "client_upload_limit"
BODY_TOO_LARGE = "body_too_large"

REASONS = {
    HOST_NOT_ALLOWED: "no allowed_callers entry names this host (closed at accept)",
    PER_HOST_LIMIT: "node.max_connections_per_host connections from this host are open",
    PENDING_LIMIT: "node.max_pending_connections connections are still negotiating",
    ARTIM_TIMEOUT: "no A-ASSOCIATE-RQ within node.artim_seconds",
    HEADER_TIMEOUT: "request headers not complete within node.http_limits.header_timeout_seconds",
    BODY_TIMEOUT: "upload moved no bytes for node.http_limits.body_timeout_seconds",
    UPLOAD_LIMIT: "node.http_limits.max_uploads uploads are running",
    CLIENT_UPLOAD_LIMIT: "node.http_limits.max_uploads_per_client uploads from this client are running",
    BODY_TOO_LARGE: "request body larger than node.http_limits.max_body_mb",
}

# the reasons each receiver counts, created at 0 so that dashboards and alerts see every series
RECEIVER_REASONS = {
    "dimse": (HOST_NOT_ALLOWED, PER_HOST_LIMIT, PENDING_LIMIT, ARTIM_TIMEOUT),
    "http": (HEADER_TIMEOUT, BODY_TIMEOUT, UPLOAD_LIMIT, CLIENT_UPLOAD_LIMIT, BODY_TOO_LARGE),
}
for _receiver, _reasons in RECEIVER_REASONS.items():
    for _reason in _reasons:
        metrics.CONNECTIONS_REFUSED.labels(_receiver, _reason)


@dataclass
class _Burst:
    more: int = 0
    hosts: Counter = field(default_factory=Counter)


class BurstLog:
    """Counts every refusal; logs the first of a burst at once and the rest in one summary."""

    def __init__(self, logger: logging.Logger, seconds: float = BURST_SECONDS):
        self.logger, self.seconds = logger, seconds
        self._lock = threading.Lock()
        self._bursts: dict[tuple[str, str], _Burst] = {}

    def refused(self, receiver: str, reason: str, host: str) -> None:
        """Log (once per burst) that a `receiver` ('dimse', 'http') connection was closed."""
        metrics.CONNECTIONS_REFUSED.labels(receiver, reason).inc()
        self.note(f"{_NAMES.get(receiver, receiver)} connection", reason, host, REASONS.get(reason, reason))

    def note(self, what: str, reason: str, host: str, why: str) -> None:
        """Log (once per burst of `what` and `reason`) that `what` from `host` was refused."""
        key = (what, reason)
        with self._lock:
            burst = self._bursts.get(key)
            if burst is not None:
                burst.more += 1
                burst.hosts[host] += 1
                return
            self._bursts[key] = _Burst()
        self.logger.warning(
            "%s from %s refused: %s (%s); further ones in the next %.0f s are summarised",
            what,
            host,
            reason,
            why,
            self.seconds,
            extra={"event": "connection_refused", "outcome": "refused", "reason": reason},
        )
        timer = threading.Timer(self.seconds, self._summarise, (key,))
        timer.daemon = True
        timer.start()

    def flush(self) -> None:
        """Log the summary of every open burst now (at shutdown) rather than when its timer
        fires, which may be after the logging streams are gone."""
        with self._lock:
            keys = list(self._bursts)
        for key in keys:
            self._summarise(key)

    def _summarise(self, key: tuple[str, str]) -> None:
        with self._lock:
            burst = self._bursts.pop(key, None)
        if burst is None or not burst.more:
            return
        what, reason = key
        top = ", ".join(f"{h} ({n})" for h, n in burst.hosts.most_common(3))
        self.logger.warning(
            "%d more refused in %.0f s (%s): %s; from %s%s",
            burst.more,
            self.seconds,
            what,
            reason,
            top,
            f" and {len(burst.hosts) - 3} more hosts" if len(burst.hosts) > 3 else "",
            extra={"event": "connection_refused", "outcome": "refused", "reason": reason},
        )


_NAMES = {"dimse": "DIMSE", "http": "HTTP"}
REFUSALS = BurstLog(log)


def refused(receiver: str, reason: str, host: str) -> None:
    """Count and (once per burst) log a connection closed for `reason`."""
    REFUSALS.refused(receiver, reason, host)


# -- DIMSE: the gate at the listening socket ----------------------------------------------


@dataclass
class _Conn:
    host: str
    since: float
    requested: bool = False  # an A-ASSOCIATE-RQ arrived
    slot: bool = False  # holds one of max_associations


class ConnectionGate:
    """Which DIMSE connections may stay open, and which hold association slots.

    Keys are the peer's (host, port): unique while the connection is open."""

    def __init__(
        self,
        max_associations: int,
        max_pending: int,
        max_per_host: int,
        artim_seconds: float,
        allowed_hosts: frozenset[str] | None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_associations = max_associations
        self.max_pending, self.max_per_host = max_pending, max_per_host
        self.artim_seconds, self.allowed_hosts, self.clock = artim_seconds, allowed_hosts, clock
        self._lock = threading.Lock()
        self._conns: dict[tuple[str, int], _Conn] = {}
        self._per_host: Counter = Counter()
        self._pending = 0
        self._slots = 0

    def admit(self, address: tuple[str, int]) -> str | None:
        """At accept: None when the connection may stay (it is then tracked), else the reason."""
        host = address[0]
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            return HOST_NOT_ALLOWED
        with self._lock:
            if self._per_host[host] >= self.max_per_host:
                return PER_HOST_LIMIT
            if self._pending >= self.max_pending:
                return PENDING_LIMIT
            self._conns[address] = _Conn(host, self.clock())
            self._per_host[host] += 1
            self._pending += 1
        return None

    def take_slot(self, address: tuple[str, int]) -> bool:
        """An A-ASSOCIATE-RQ passed the allow-list: hold an association slot, or False when
        max_associations are taken (the request is then rejected, transient)."""
        with self._lock:
            conn = self._conns.get(address)
            if conn is not None and conn.slot:
                return True
            if conn is not None:
                conn.requested = True
            if self._slots >= self.max_associations:
                return False
            if conn is None:  # not seen at accept (swept too early): track it from here
                conn = self._conns[address] = _Conn(address[0], self.clock(), requested=True)
                self._per_host[conn.host] += 1
            else:
                self._pending -= 1
            conn.slot = True
            self._slots += 1
            return True

    def requested(self, address: tuple[str, int]) -> None:
        """An A-ASSOCIATE-RQ arrived (and is being rejected): not an ARTIM timeout."""
        with self._lock:
            conn = self._conns.get(address)
            if conn is not None:
                conn.requested = True

    def release(self, address: tuple[str, int]) -> None:
        """The connection ended (idempotent)."""
        with self._lock:
            conn = self._conns.pop(address, None)
            if conn is None:
                return
            self._per_host[conn.host] -= 1
            if not self._per_host[conn.host]:
                del self._per_host[conn.host]
            if conn.slot:
                self._slots -= 1
            else:
                self._pending -= 1
            timed_out = not conn.requested and self.clock() - conn.since >= self.artim_seconds * 0.9
        if timed_out:
            refused("dimse", ARTIM_TIMEOUT, conn.host)

    def sweep(self, alive: Iterable[tuple[str, int]], grace: float = 2.0) -> None:
        """Release connections whose association thread is gone (a backstop for the close
        events pynetdicom does not emit on every path)."""
        alive = set(alive)
        now = self.clock()
        with self._lock:
            gone = [a for a, c in self._conns.items() if a not in alive and now - c.since > grace]
        for address in gone:
            self.release(address)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"open": len(self._conns), "pending": self._pending, "slots": self._slots}
