"""The DIMSE node: a thin door from the DICOM Upper Layer onto the shared ingest path.

- Association acceptance (PS3.8 7.1): only registered partners, by calling AE title and, when the
  partner lists hosts, by peer address; the called AE title must be ours. Others get an
  A-ASSOCIATE-RJ, rejected-permanent, service-user, "calling AE title not recognized" (0x03) or
  "called AE title not recognized" (0x07). Partners are looked up per association, so a partner
  added or removed with ``imx partner`` counts at once.
- C-ECHO (PS3.4 A.4) and C-STORE (PS3.4 B.2) for every storage SOP class pynetdicom knows, in every
  transfer syntax pydicom knows; the dataset is received in chunks to a private temporary file.
- Query/Retrieve (PS3.4 C.4): C-FIND, C-MOVE and C-GET in the Patient Root and Study Root models,
  handled in ``dicom_node.qr``. The storage contexts accept the SCP/SCU role selection a C-GET
  requestor proposes (PS3.7 D.3.3.4), so the C-GET sub-operations go back on its association.
- Several receiver processes accept on one listening socket that the supervisor opened, each
  taking a new association only while it is no busier than its siblings, so both cores work
  whatever the peers' ports (SO_REUSEPORT would hash four senders onto one process one time in
  eight). Without a shared socket (tests, single process) the node binds its own.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes, ExplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.qr import QR_SOP_CLASSES, QueryRetrieve
from imx import metrics
from imx.config import Settings
from imx.ingest import Archive, PartnerRef, Result
from imx.logs import event

log = logging.getLogger("imx.node")

# PS3.4 Table B.2-1 C-STORE statuses; PS3.7 C.4 general statuses
SUCCESS = 0x0000
REFUSED_OUT_OF_RESOURCES = 0xA700
ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
ERROR_CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
REFUSED_NOT_AUTHORIZED = 0x0124  # PS3.7 C.4.2.1.2 general status: refused by policy

STATUS_FOR_RESULT = {
    Result.STORED: SUCCESS,
    Result.SPOOLED: SUCCESS,
    Result.DUPLICATE: SUCCESS,
    Result.INVALID: ERROR_CANNOT_UNDERSTAND,
    Result.MISMATCH: ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS,
    Result.OUT_OF_RESOURCES: REFUSED_OUT_OF_RESOURCES,
    Result.FAILED: PROCESSING_FAILURE,
    Result.REFUSED: REFUSED_NOT_AUTHORIZED,
}

# The acceptor picks the first of these the requestor proposed in a context. Explicit VR Little
# Endian first (pydicom's list starts with Implicit): it keeps the VRs, and it is what most stored
# objects are in, so a C-GET requestor proposing several syntaxes gets them byte for byte.
STORAGE_SYNTAXES = [ExplicitVRLittleEndian, *(ts for ts in AllTransferSyntaxes if ts != ExplicitVRLittleEndian)]

_NO_MATCH = [""]  # a non-empty list no calling AE title can be in: makes pynetdicom reject


class PartnerAE(AE):
    """An AE whose accepted calling AE titles are the registered partners allowed from the peer's
    address. pynetdicom negotiates each association in that association's own thread, so the
    current thread tells us the peer."""

    def __init__(self, archive: Archive, ae_title: str) -> None:
        self._archive = archive
        super().__init__(ae_title=ae_title)

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        assoc = threading.current_thread()
        if not isinstance(assoc, Association) or not assoc.is_acceptor:
            return _NO_MATCH
        calling = (assoc.requestor.primitive.calling_ae_title if assoc.requestor.primitive else "") or ""
        calling = calling.strip()
        partner = getattr(assoc, "_imx_partner", None)
        if partner is None:
            p = self._archive.index.partner_by_ae(calling) if calling else None
            if p is None or not p.allows(assoc.requestor.address):
                assoc._imx_reject = "unknown calling AE title" if p is None else "host not allowed for this partner"  # type: ignore[attr-defined]
                return _NO_MATCH
            partner = PartnerRef.of(p)
            assoc._imx_partner = partner  # type: ignore[attr-defined]
        return [partner.ae_title]

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        pass  # partners come from the index


class SharedAcceptServer(ThreadedAssociationServer):
    """Association server that accepts on a listening socket shared with sibling processes
    (``shared_socket``), balancing by active associations through the shared array ``load``;
    Nagle is off on every accepted connection."""

    daemon_threads = True
    shared_socket: socket.socket | None = None
    load: Any = None  # multiprocessing.Array("i"): active associations per receiver
    slot: int = 0

    def server_bind(self) -> None:
        if self.shared_socket is None:
            super().server_bind()
            return
        assert self.socket is not None
        self.socket.close()
        self.socket = self.shared_socket
        self.socket.setblocking(False)  # a sibling may take the connection first
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.shared_socket is None:
            super().server_activate()

    def _handle_request_noblock(self) -> None:
        if self.load is not None:
            mine = len(self.active_associations)
            self.load[self.slot] = mine
            if mine > min(self.load[:]):
                time.sleep(0.002)  # a less busy sibling, woken by the same connection, takes it
                return
        super()._handle_request_noblock()

    def get_request(self):  # type: ignore[no-untyped-def]
        sock, address = super().get_request()
        sock.setblocking(True)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        return sock, address


class SharedContexts(list):  # type: ignore[type-arg]
    """The node's supported presentation contexts, shared by every association. pynetdicom
    deep-copies the server's contexts for each association it accepts: 170 storage and Q/R
    contexts of ~35 transfer syntaxes each took 30 ms, on every association. Negotiation only
    reads them (the accepted contexts are new objects), so one copy serves all."""

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedContexts:
        return self


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


class Node:
    def __init__(self, settings: Settings, archive: Archive) -> None:
        self.settings = settings
        self.archive = archive
        self.server: SharedAcceptServer | None = None
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_HANDLER_LEVEL = "none"
        ae = PartnerAE(archive, settings.ae_title)
        ae.require_called_aet = True
        ae.maximum_pdu_size = settings.max_pdu
        ae.maximum_associations = settings.max_associations
        ae.network_timeout = settings.network_timeout
        ae.acse_timeout = 30
        ae.dimse_timeout = settings.network_timeout
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            # both roles: a C-STORE sender is the SCU as usual; a C-GET requestor proposing the
            # SCP role for it (role selection) gets its instances back on this context
            ae.add_supported_context(cx.abstract_syntax, STORAGE_SYNTAXES, scu_role=True, scp_role=True)
        for sop_class in QR_SOP_CLASSES:
            ae.add_supported_context(sop_class)
        self.ae = ae
        self.qr = QueryRetrieve(archive, settings.ae_title, settings.max_pdu)

    # -- handlers: each short, each answering a DICOM status ------------------------------------
    def handle_echo(self, event_: evt.Event) -> int:
        """C-ECHO, PS3.4 A.4: Success for any accepted (therefore registered) partner."""
        return SUCCESS

    def handle_store(self, event_: evt.Event) -> Dataset:
        """C-STORE, PS3.4 B.2.3: Success only once the instance is durable."""
        partner: PartnerRef | None = getattr(event_.assoc, "_imx_partner", None)
        if partner is None:  # cannot happen: acceptance required a partner
            return _status(PROCESSING_FAILURE, "association has no partner")
        req = event_.request
        try:
            outcome = self.archive.ingest_file(
                partner,
                event_.dataset_path,
                door="dimse",
                expected_sop_class=str(req.AffectedSOPClassUID),
                expected_sop_instance=str(req.AffectedSOPInstanceUID),
            )
        except Exception as e:  # a bug, not bad input: say so in our log (pynetdicom's is muted)
            event(log, "ingest failed unexpectedly", logging.ERROR, partner=partner.name, error=type(e).__name__)
            return _status(PROCESSING_FAILURE, "internal error; the instance was not stored")
        return _status(STATUS_FOR_RESULT[outcome.result], "" if outcome.result.acknowledged else outcome.reason)

    def handle_accepted(self, event_: evt.Event) -> None:
        partner = getattr(event_.assoc, "_imx_partner", None)
        event(log, "association accepted", partner=partner.name if partner else None, peer=event_.assoc.requestor.address)

    def handle_rejected(self, event_: evt.Event) -> None:
        assoc = event_.assoc
        rq = assoc.requestor.primitive
        reason = getattr(assoc, "_imx_reject", None) or "called AE title not ours"
        metrics.ASSOC_REJECTED.labels(reason).inc()
        event(
            log,
            "association rejected",
            logging.WARNING,
            reason=reason,
            calling_ae=(rq.calling_ae_title if rq else None),
            peer=event_.assoc.requestor.address,
        )

    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_REJECTED, self.handle_rejected),
            *self.qr.handlers(),
        ]

    # -- life cycle -------------------------------------------------------------------------------
    def start(self, listen_socket: socket.socket | None = None, load: Any = None, slot: int = 0) -> SharedAcceptServer:
        """Serve on ``listen_socket`` (shared with sibling receivers, balanced through ``load``)
        or, without one, on a socket of our own bound to the configured host and port."""
        server_class = type(
            "ReceiverServer", (SharedAcceptServer,), {"shared_socket": listen_socket, "load": load, "slot": slot}
        )
        server = self.ae.make_server(
            (self.settings.host, self.settings.dicom_port),
            ae_title=self.settings.ae_title,
            evt_handlers=self.handlers(),
            server_class=server_class,
        )
        server.contexts = SharedContexts(server.contexts)
        self.ae._servers.append(server)
        threading.Thread(target=server.serve_forever, name="imx-dicom-accept", daemon=True).start()
        self.server = server
        return server

    def stop(self, grace: float) -> int:
        """Stop accepting; let in-flight associations finish for up to ``grace`` seconds, then
        abort what is left. Returns how many had to be aborted."""
        server = self.server
        if server is None:
            return 0
        server.shutdown()  # ends the accept loop and closes the listening socket
        deadline = time.monotonic() + grace
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        left = server.active_associations
        for assoc in left:
            assoc.abort()
        return len(left)
