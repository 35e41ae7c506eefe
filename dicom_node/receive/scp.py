"""The DIMSE receiver: C-ECHO and C-STORE SCP (pynetdicom).

Every association request is checked against `allowed_callers` (calling AE title and,
where given, the host it must come from); `DimseServer.reject` is the one place a
rejection happens: it is logged with its reason and answered "rejected-permanent, calling
AE title not recognised" (1, 1, 3). With `node.dimse_tls` the port speaks DICOM TLS only
(optionally requiring a client certificate signed by `ca_file`). Each C-STORE
dataset is written as received (no decode and re-encode) behind a file meta header
(`dicom_node.spool.part10`, naming the caller as Source Application Entity Title), and answered
only after `Receiver` made it durable.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

from pydicom import uid as tsuid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.config import AllowedCaller, Settings
from dicom_node.observe import audit, metrics
from dicom_node.query.holding import Holding
from dicom_node.receive import limits
from dicom_node.receive.contract import Source
from dicom_node.receive.receiver import Receiver
from dicom_node.receive.transfers import summary_line
from dicom_node.spool.header import InvalidInstanceError, read_dataset_header
from dicom_node.tls import peer_subject, server_context

log = logging.getLogger("nodal.scp")

STORAGE_SOP_CLASSES = {
    str(uid): uid.name
    for uid in (
        tsuid.CTImageStorage,
        tsuid.EnhancedCTImageStorage,
        tsuid.LegacyConvertedEnhancedCTImageStorage,
        tsuid.SecondaryCaptureImageStorage,
        tsuid.MultiFrameSingleBitSecondaryCaptureImageStorage,
        tsuid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        tsuid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        tsuid.MultiFrameTrueColorSecondaryCaptureImageStorage,
        # Accepted (and skipped by routing) so that a PACS forwarding whole studies, our own
        # results included, does not see failures.
        tsuid.SegmentationStorage,
        tsuid.EnhancedSRStorage,
        tsuid.ComprehensiveSRStorage,
        tsuid.Comprehensive3DSRStorage,
    )
}

TRANSFER_SYNTAXES = [
    tsuid.ExplicitVRLittleEndian,
    tsuid.ImplicitVRLittleEndian,
    tsuid.DeflatedExplicitVRLittleEndian,
    tsuid.ExplicitVRBigEndian,
    tsuid.JPEGBaseline8Bit,
    tsuid.JPEGExtended12Bit,
    tsuid.JPEGLossless,
    tsuid.JPEGLosslessSV1,
    tsuid.JPEGLSLossless,
    tsuid.JPEGLSNearLossless,
    tsuid.JPEG2000Lossless,
    tsuid.JPEG2000,
    tsuid.HTJ2KLossless,
    tsuid.HTJ2KLosslessRPCL,
    tsuid.HTJ2K,
    tsuid.RLELossless,
]

REJECT_PERMANENT, SOURCE_USER, CALLING_AE_NOT_RECOGNISED = 0x01, 0x01, 0x03  # A-ASSOCIATE-RJ (1, 1, 3)
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)  # A-ASSOCIATE-RJ rejected-transient, local-limit-exceeded
SWEEP_SECONDS = 1.0


@dataclass(frozen=True)
class CallerRule:
    ae_title: str
    addresses: frozenset[str] | None  # None: any host


def caller_rules(callers: list[AllowedCaller]) -> list[CallerRule]:
    """Resolve each caller's host once at start-up (a name that does not resolve matches nothing)."""
    rules = []
    for c in callers:
        addresses = None
        if c.host:
            try:
                addresses = frozenset(info[4][0] for info in socket.getaddrinfo(c.host, None))
            except OSError as e:
                log.warning(
                    "allowed caller %s: host %r does not resolve (%s); it cannot connect",
                    c.ae_title,
                    c.host,
                    e,
                )
                addresses = frozenset()
        rules.append(CallerRule(c.ae_title.strip(), addresses))  # type: ignore[arg-type]
    return rules


# Rejection reasons (the values of the metric label `reason`).
CALLING_AE_UNKNOWN, HOST_NOT_ALLOWED = "calling_ae_unknown", "host_not_allowed"
ASSOCIATION_LIMIT = "association_limit"  # node.max_associations established (rejected 2-3-2)
for _reason in (CALLING_AE_UNKNOWN, HOST_NOT_ALLOWED, ASSOCIATION_LIMIT):  # every reason exists at 0
    metrics.ASSOCIATIONS_REJECTED.labels(_reason)


def allowed_hosts(rules: list[CallerRule]) -> frozenset[str] | None:
    """The addresses connections may come from, or None when some caller may use any host."""
    if not rules or any(r.addresses is None for r in rules):
        return None
    return frozenset().union(*(r.addresses for r in rules if r.addresses is not None))


class _GatedServer(ThreadedAssociationServer):
    """pynetdicom's server with socketserver's `verify_request` hook: the gate decides at
    accept, before the connection gets a thread or a PDU is read."""

    gate: limits.ConnectionGate | None = None
    # socketserver listens with a backlog of 5: a burst of connections would have the
    # kernel drop SYNs, and a sender retries its SYN only after a second
    request_queue_size = 256

    def verify_request(self, request, client_address) -> bool:
        if self.gate is None:
            return True
        reason = self.gate.admit(client_address)
        if reason is None:
            return True
        limits.refused("dimse", reason, client_address[0])
        return False  # socketserver shuts the socket down and closes it


class _GatedAE(AE):
    gate: limits.ConnectionGate | None = None

    def make_server(self, address, *args, **kwargs):
        kwargs["server_class"] = _GatedServer
        server = super().make_server(address, *args, **kwargs)
        server.gate = self.gate  # before start_server starts its accept loop
        return server


def check_caller(rules: list[CallerRule], calling_ae: str, address: str) -> tuple[str, str] | None:
    """None when the caller may connect, else (reason code, the reason in words)."""
    if not rules:
        return None
    known = [r for r in rules if r.ae_title == calling_ae.strip()]
    if not known:
        return CALLING_AE_UNKNOWN, f"calling AE title {calling_ae.strip()!r} is not in allowed_callers"
    if any(r.addresses is None or address in r.addresses for r in known):
        return None
    why = f"calling AE title {calling_ae.strip()!r} is allowed, but not from host {address}"
    return HOST_NOT_ALLOWED, why


class DimseServer:
    def __init__(self, settings: Settings, receiver: Receiver):
        self.settings = settings
        self.receiver = receiver
        self.db = receiver.db
        self.rules = caller_rules(settings.allowed_callers)
        node = settings.node
        self.gate = limits.ConnectionGate(
            node.max_associations,
            node.max_pending_connections,
            node.max_connections_per_host,
            node.artim_seconds,
            allowed_hosts(self.rules),
        )
        self.ae = self._make_ae()
        self._server = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.rejected = 0
        self._limit_log = limits.BurstLog(log)
        self.holding = Holding(settings.node.data_dir)  # C-MOVEs of nodal's own retrievals (issue 17)

    def _make_ae(self) -> AE:
        node = self.settings.node
        ae = _GatedAE(ae_title=node.ae_title)
        ae.gate = self.gate
        # The gate enforces max_associations (established) and max_pending_connections;
        # pynetdicom's own count (negotiating and established together) is only a backstop.
        ae.maximum_associations = node.max_associations + 2 * node.max_pending_connections
        ae.maximum_pdu_size = node.max_pdu_bytes
        ae.dimse_timeout = node.dimse_timeout_seconds
        ae.network_timeout = node.network_timeout_seconds
        ae.acse_timeout = node.artim_seconds  # ARTIM: the wait for the A-ASSOCIATE-RQ
        ae.require_called_aet = False  # modalities often get the called AE wrong; callers are checked
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        return ae

    def start(self) -> None:
        node = self.settings.node
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        ssl_context = server_context(node.dimse_tls, "node.dimse_tls", deferred_handshake=True)
        self._server = self.ae.start_server(  # type: ignore[assignment]
            (node.bind_address, node.dimse_port),
            block=False,
            evt_handlers=handlers,  # type: ignore[arg-type]
            ssl_context=ssl_context,
        )
        self._stopped.clear()
        if self.holding.sweep():
            log.info(
                "removed what retrievals interrupted more than an hour ago left in %s", self.holding.root
            )
        threading.Thread(target=self._sweep, name="dimse-gate", daemon=True).start()
        if not self.rules:
            log.warning("allowed_callers is empty: associations from any calling AE are accepted")
        elif self.gate.allowed_hosts is not None:
            log.info("DIMSE connections from hosts allowed_callers does not name are closed at accept")
        log.info(
            "DIMSE receiver %s listening on %s:%d (%s)",
            node.ae_title,
            node.bind_address,
            node.dimse_port,
            _tls_mode(node.dimse_tls.enabled, node.dimse_tls.require_client_cert),
        )

    def stop(self, grace_seconds: float) -> None:
        """Stop listening, let open associations finish for `grace_seconds`, abort the rest."""
        if self._server is None:
            return
        self._stopped.set()
        self._server.shutdown()
        deadline = time.monotonic() + grace_seconds
        while self._acceptors() and time.monotonic() < deadline:
            time.sleep(0.1)
        for assoc in self._acceptors():
            log.warning("aborting an open association at shutdown (its unacknowledged instance is resent)")
            assoc.abort()
        self._server = None
        limits.REFUSALS.flush()  # the open bursts' summaries, while logging still runs

    def _acceptors(self) -> list:
        return [a for a in self.ae.active_associations if a.is_acceptor]

    def _sweep(self) -> None:
        """Release gate entries whose association thread has ended."""
        while not self._stopped.wait(SWEEP_SECONDS):
            self.gate.sweep((a.requestor.address, a.requestor.port) for a in self._acceptors())

    # -- handlers (run in each association's thread) --

    def _on_open(self, event) -> None:
        if self.settings.node.tcp_nodelay:
            sock = event.assoc.dul.socket.socket
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_requested(self, event) -> None:
        calling = event.assoc.requestor.primitive.calling_ae_title
        address = event.assoc.requestor.address
        key = (address, event.assoc.requestor.port)
        refusal = check_caller(self.rules, calling, address)
        if refusal is not None:
            self.gate.requested(key)
            self.reject(event.assoc, calling, address, *refusal)
        elif not self.gate.take_slot(key):
            why = f"{self.settings.node.max_associations} associations already open (node.max_associations)"
            self.reject(event.assoc, calling, address, ASSOCIATION_LIMIT, why, LOCAL_LIMIT_EXCEEDED)

    def reject(
        self,
        assoc,
        calling: str,
        address: str,
        code: str,
        reason: str,
        rsd: tuple[int, int, int] = (REJECT_PERMANENT, SOURCE_USER, CALLING_AE_NOT_RECOGNISED),
    ) -> None:
        """Refuse an association: the one place this is decided, counted, logged and audited.
        A full node (association_limit) is logged once per burst, and answered transient."""
        with self._lock:
            self.rejected += 1
        metrics.ASSOCIATIONS_REJECTED.labels(code).inc()
        if code == ASSOCIATION_LIMIT:
            self._limit_log.note("DIMSE association", code, address, reason)
        else:
            log.warning(
                "association from %s rejected: %s",
                address,
                reason,
                extra={"event": "association", "outcome": "rejected", "reason": code},
            )
        audit.record(
            self.db,
            audit.Event(
                "association",
                audit.FAILURE,
                actor=str(calling).strip(),
                peer=address,
                detail={"reason": reason},
            ),
        )
        assoc.acse.send_reject(*rsd)
        assoc.kill()

    def _on_rejected(self, event) -> None:
        """pynetdicom rejected the request itself: node.max_associations associations are open."""
        if not event.assoc.is_acceptor:
            return
        req = event.assoc.requestor
        reason = f"{self.settings.node.max_associations} associations already open (node.max_associations)"
        metrics.ASSOCIATIONS_REJECTED.labels(ASSOCIATION_LIMIT).inc()
        log.warning(
            "association from %s rejected: %s",
            req.address,
            reason,
            extra={"event": "association", "outcome": "rejected", "reason": ASSOCIATION_LIMIT},
        )
        audit.record(
            self.db,
            audit.Event(
                "association",
                audit.FAILURE,
                actor=str(req.ae_title).strip(),
                peer=req.address,
                detail={"reason": reason},
            ),
        )

    def _on_established(self, event) -> None:
        req = event.assoc.requestor
        self.receiver.transfers.begin(_transfer_id(event.assoc))
        metrics.ASSOCIATIONS_ACCEPTED.inc()
        metrics.ASSOCIATIONS_ACTIVE.inc()
        subject = peer_subject(event.assoc.dul.socket.socket if event.assoc.dul.socket else None)
        log.info(
            "association from %s@%s:%s accepted%s",
            req.ae_title,
            req.address,
            req.port,
            f" (TLS client certificate {subject!r})" if subject else "",
        )
        audit.record(self.db, audit.Event("association", actor=req.ae_title.strip(), peer=req.address))

    def _on_echo(self, event) -> int:
        log.debug("C-ECHO from %s", event.assoc.requestor.ae_title)
        return 0x0000

    def _on_store(self, event) -> int:
        req = event.request
        assoc = event.assoc
        if self.holding.waiting():
            held = self._hold(event)
            if held is not None:
                return held
        source = Source(
            via="dimse",
            transfer_id=_transfer_id(assoc),
            calling_ae=assoc.requestor.ae_title,
            peer_host=assoc.requestor.address,
        )
        result = self.receiver.store_dataset(
            req.DataSet.getvalue(),
            str(event.context.transfer_syntax),
            source,
            expected_sop_uid=str(req.AffectedSOPInstanceUID),
            expected_sop_class_uid=str(req.AffectedSOPClassUID),
        )
        return result.status

    def _hold(self, event) -> int | None:
        """An instance a retrieval of nodal's own is waiting for (a C-MOVE to nodal, issue 17):
        written to that retrieval's folder, never spooled, so it is neither analysed nor sent
        as a study that arrived. None: not one of those."""
        req = event.request
        data = req.DataSet.getvalue()
        ts = str(event.context.transfer_syntax)
        try:
            header = read_dataset_header(data, ts)
        except InvalidInstanceError:
            return None
        folder = self.holding.folder_for(header.series_instance_uid)
        if folder is None:
            return None
        originator = str(getattr(req, "MoveOriginatorApplicationEntityTitle", "") or "").strip()
        try:
            Holding.store(
                folder,
                header.sop_class_uid,
                header.sop_instance_uid,
                ts,
                data,
                event.assoc.requestor.ae_title,
            )
        except (OSError, ValueError) as e:
            log.warning("retrieved instance not kept: %s", e)
            return 0xA700
        log.debug("retrieved instance kept for a retrieval (move originator %r)", originator)
        return 0x0000

    def _on_released(self, event) -> None:
        self._ended(event.assoc, released=True)

    def _on_aborted(self, event) -> None:
        self._ended(event.assoc, released=False)

    def _on_closed(self, event) -> None:
        self.gate.release((event.assoc.requestor.address, event.assoc.requestor.port))
        self._ended(event.assoc, released=False)  # no-op after release or abort

    def _ended(self, assoc, released: bool) -> None:
        summary = self.receiver.release(_transfer_id(assoc), released=released)
        if summary is None:  # already ended, or never established
            return
        metrics.ASSOCIATIONS_ACTIVE.dec()
        req = assoc.requestor
        how = "released" if released else "aborted"
        log.info(
            "association from %s@%s %s: %s",
            req.ae_title.strip(),
            req.address,
            how,
            summary_line(summary),
            extra={"event": "association_end", "outcome": how, "calling_ae": req.ae_title.strip()},
        )
        for uid, n in summary.studies.items():
            audit.record(
                self.db,
                audit.Event(
                    "instances_stored",
                    actor=req.ae_title.strip(),
                    peer=req.address,
                    study_key=audit.study_key(uid),
                    count=n,
                    detail={"receiver": "dimse", "association": how},
                ),
            )


def _tls_mode(enabled: bool, mutual: bool) -> str:
    return "plain TCP" if not enabled else "TLS, client certificate required" if mutual else "TLS"


def _transfer_id(assoc) -> str:
    return f"dimse-{id(assoc):x}"
