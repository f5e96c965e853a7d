"""DIMSE Query/Retrieve SCP: C-FIND, C-MOVE and C-GET over the shared query layer.

- C-FIND (PS3.4 C.4.1) in the Patient Root and Study Root Query/Retrieve Information Models
  (PS3.4 C.6.1, C.6.2): the identifier becomes one ``storage.query.search`` call; keys with a value
  match (PS3.4 C.2.2.2), empty keys are return keys. Each match is answered Pending (0xFF00, or
  0xFF01 when a matching key was not supported and was treated as a return key) with the requested
  keys filled, then Success. C-CANCEL stops the answers (Cancel, 0xFE00).
- C-MOVE (PS3.4 C.4.2) and C-GET (PS3.4 C.4.3): the unique keys of the identifier select the
  stored instances (``storage.query.instances``), which are sent as stored: the de-identified
  object's data set, in its stored transfer syntax, byte for byte. Only when the receiver accepted
  no presentation context with that syntax is the data set converted (to Explicit or Implicit VR
  Little Endian, decompressing the pixel data if needed; the instance keeps its SOP Instance UID).
  C-MOVE opens an association to the Move Destination proposing, per SOP class, each stored
  compressed syntax in a context of its own plus one context of the uncompressed syntaxes (stored
  one first), so the destination can take each object as stored. C-GET sends on the requestor's
  association, to a requestor that proposed the SCP role for the storage SOP class (PS3.7 D.3.3.4
  role selection); there the node, as acceptor, picks one syntax per context, Explicit VR Little
  Endian first (``dicom_node.server.STORAGE_SYNTAXES``): uncompressed objects go byte for byte, a
  compressed object goes as stored only if the requestor's context for its class offers its syntax
  without an uncompressed one (else it is decompressed).
- C-CANCEL (PS3.4 C.4.1.2.3, C.4.2.2, C.4.3.3) is checked before every answer and sub-operation.
- A C-MOVE identifier the node cannot act on (no level, no unique key) is answered 0xC514, the
  "unable to process" status pynetdicom gives when a handler fails before naming the destination.

Scoping: the calling AE is a registered partner (``dicom_node.server.PartnerAE``) and sees only
the studies it sent, in all three services.

Move Destination rule: the Move Destination AE title must be a registered, active partner with a
destination (``imx partner dest``), and it must be *the calling partner itself*. A partner can
thus pull its own studies into its own PACS, but can never push anything into another partner's
PACS, even its own studies: two hospitals sharing a destination register it once, under one
partner. Anything else is 0xA801 (Move Destination unknown).

pynetdicom drives the DIMSE exchange; the handlers here are generators that yield what its
service classes expect (PS3.4 statuses as named constants).
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from imx.ingest import Archive, PartnerRef
from imx.logs import event
from storage.query import (
    SUPPORTED_KEYS,
    Level,
    QueryError,
    Scope,
    StoredInstance,
    instances,
    search,
)

log = logging.getLogger("imx.qr")

# -- statuses: PS3.4 C.4.1.1.4 (C-FIND), C.4.2.1.5 (C-MOVE), C.4.3.1.4 (C-GET) --------------------
SUCCESS = 0x0000
PENDING = 0xFF00
PENDING_OPTIONAL_KEYS_UNSUPPORTED = 0xFF01
CANCEL = 0xFE00
REFUSED_OUT_OF_RESOURCES = 0xA700
REFUSED_SUBOPERATIONS_OUT_OF_RESOURCES = 0xA702  # pynetdicom answers it when every sub-op failed
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000
WARNING_SUBOPERATIONS_FAILED = 0xB000  # pynetdicom answers it when some sub-ops failed

CHARSET_UTF8 = "ISO_IR 192"
MAX_SUBOPERATIONS = 65535  # Number of ... Suboperations are US (PS3.4 C.4.2.3)
MAX_PROPOSED_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255


class Root:
    """The two query/retrieve information models and the levels each allows (PS3.4 C.6.1.1,
    C.6.2.1): Patient Root starts at PATIENT, Study Root at STUDY."""

    PATIENT = "patient"
    STUDY = "study"

    LEVELS = {
        PATIENT: (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE),
        STUDY: (Level.STUDY, Level.SERIES, Level.IMAGE),
    }


ROOT_OF_SOP_CLASS: dict[str, str] = {
    PatientRootQueryRetrieveInformationModelFind: Root.PATIENT,
    PatientRootQueryRetrieveInformationModelMove: Root.PATIENT,
    PatientRootQueryRetrieveInformationModelGet: Root.PATIENT,
    StudyRootQueryRetrieveInformationModelFind: Root.STUDY,
    StudyRootQueryRetrieveInformationModelMove: Root.STUDY,
    StudyRootQueryRetrieveInformationModelGet: Root.STUDY,
}
QR_SOP_CLASSES: tuple[str, ...] = tuple(ROOT_OF_SOP_CLASS)

# the unique key of each level (PS3.4 C.6.1.1.2-5, C.6.2.1.2-4)
UNIQUE_KEY = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}
_ORDER = (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)
_NOT_KEYS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet"})
_UNCOMPRESSED_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class IdentifierError(ValueError):
    """An identifier we cannot act on; ``status`` is what the peer gets. The message names keys,
    never values (they may be identifying)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- identifiers ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FindRequest:
    """A C-FIND identifier translated for ``search``: ``query`` holds every key (matching or
    return), ``returned`` the keys to answer in the order asked, ``unsupported`` the matching keys
    this level cannot match (treated as return keys, PS3.4 C.2.2.1.3)."""

    level: Level
    query: dict[str, str]
    returned: tuple[str, ...]
    unsupported: tuple[str, ...] = ()
    root: str = Root.STUDY


def _value_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value)


def _level(identifier: Dataset, root: str) -> Level:
    raw = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if not raw:
        raise IdentifierError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "the identifier has no Query/Retrieve Level (0008,0052)")
    try:
        level = Level(raw)
    except ValueError:
        raise IdentifierError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "unknown Query/Retrieve Level") from None
    if level not in Root.LEVELS[root]:
        raise IdentifierError(
            IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"level {level.value} is not in the {root} root information model"
        )
    return level


def parse_find(identifier: Dataset | None, root: str) -> FindRequest:
    """The C-FIND identifier (PS3.4 C.4.1.1.3.1) as a ``search`` query at its level."""
    if identifier is None:
        raise IdentifierError(UNABLE_TO_PROCESS, "the C-FIND request has no identifier")
    try:
        level = _level(identifier, root)
        supported = SUPPORTED_KEYS[level]
        query: dict[str, str] = {}
        returned: list[str] = []
        unsupported: list[str] = []
        for elem in identifier:
            kw = elem.keyword
            if not kw or kw in _NOT_KEYS or elem.tag.group == 0x0002:
                continue
            if elem.VR == "SQ":  # sequence matching (C.2.2.2.6) is not supported: answered empty
                returned.append(kw)
                continue
            value = _value_text(elem.value)
            returned.append(kw)
            if kw in supported:
                query[kw] = value
            elif value.strip("* "):
                unsupported.append(kw)
    except IdentifierError:
        raise
    except Exception as e:  # an element pydicom cannot decode
        raise IdentifierError(UNABLE_TO_PROCESS, f"the identifier cannot be decoded ({type(e).__name__})") from None
    return FindRequest(level, query, tuple(returned), tuple(unsupported), root)


@dataclass(frozen=True)
class RetrieveRequest:
    """The unique keys of a C-MOVE/C-GET identifier (PS3.4 C.4.2.1.4.1): ``uids`` at ``level``,
    constrained by the unique keys given for the levels above."""

    level: Level
    uids: tuple[str, ...]
    above: dict[Level, str] = field(default_factory=dict)


def parse_retrieve(identifier: Dataset | None, root: str) -> RetrieveRequest:
    if identifier is None:
        raise IdentifierError(UNABLE_TO_PROCESS, "the request has no identifier")
    level = _level(identifier, root)
    key = UNIQUE_KEY[level]
    try:
        raw = _value_text(identifier[key].value if key in identifier else "")
        uids = tuple(u.strip() for u in raw.split("\\") if u.strip())
        above = {}
        for upper in _ORDER[: _ORDER.index(level)]:
            k = UNIQUE_KEY[upper]
            if k in identifier and (v := _value_text(identifier[k].value).strip()):
                above[upper] = v
    except Exception as e:
        raise IdentifierError(UNABLE_TO_PROCESS, f"the identifier cannot be decoded ({type(e).__name__})") from None
    if not uids:
        raise IdentifierError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"a {level.value} level retrieve needs {key}")
    if level is Level.PATIENT and len(uids) > 1:
        raise IdentifierError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "PatientID holds a single value")
    return RetrieveRequest(level, uids, above)


def answer(row: dict[str, Any], req: FindRequest, ae_title: str) -> Dataset:
    """A C-FIND response identifier (PS3.4 C.4.1.1.3.2): the requested keys filled from the match
    (empty where we hold nothing), the unique keys of the level and those above, the level, our
    character set and the AE title to retrieve from."""
    ds = Dataset()
    ds.SpecificCharacterSet = CHARSET_UTF8
    ds.QueryRetrieveLevel = req.level.value
    keys = list(req.returned)
    for upper in Root.LEVELS[req.root][: Root.LEVELS[req.root].index(req.level) + 1]:
        if UNIQUE_KEY[upper] not in keys:
            keys.append(UNIQUE_KEY[upper])
    for kw in keys:
        if kw == "RetrieveAETitle":
            continue
        value = row.get(kw)
        try:
            setattr(ds, kw, _dicom_value(value))
        except Exception:  # a value the VR cannot hold: answered empty rather than not at all
            setattr(ds, kw, None)
    ds.RetrieveAETitle = ae_title
    return ds


def _dicom_value(value: Any) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        return list(value) if value else None
    return value


# -- what a retrieve sends -------------------------------------------------------------------------
def retrieve_targets(archive: Archive, scope: Scope, req: RetrieveRequest) -> list[StoredInstance]:
    """The stored instances a C-MOVE/C-GET identifier selects, within the caller's scope."""
    index = archive.index
    study = req.above.get(Level.STUDY)
    series = req.above.get(Level.SERIES)
    if req.level is Level.PATIENT:
        rows = search(index, Level.STUDY, {"PatientID": req.uids[0], "StudyInstanceUID": ""}, scope)
        out: list[StoredInstance] = []
        for r in rows:
            out += instances(index, scope, study_uid=r["StudyInstanceUID"])
        return out
    if req.level is Level.STUDY:
        out = []
        for uid in dict.fromkeys(req.uids):
            out += instances(index, scope, study_uid=uid)
        return out
    if req.level is Level.SERIES:
        out = []
        for uid in dict.fromkeys(req.uids):
            out += instances(index, scope, study_uid=study, series_uid=uid)
        return out
    return instances(index, scope, study_uid=study, series_uid=series, sop_uids=list(dict.fromkeys(req.uids)))


def proposed_contexts(targets: Sequence[StoredInstance]) -> list[PresentationContext]:
    """Presentation contexts for a C-MOVE's storage association: per SOP class, one context per
    stored compressed syntax (so the destination can take it as stored), and one with the stored
    uncompressed syntax first and the Little Endian ones after (the fallback). At most 128: the
    compressed ones beyond that are left out and sent decompressed."""
    classes: dict[str, dict[str, None]] = {}
    for t in targets:
        classes.setdefault(t.sop_class_uid, {})[t.transfer_syntax] = None
    base: list[PresentationContext] = []
    extra: list[PresentationContext] = []
    for sop_class, syntaxes in classes.items():
        plain = [ts for ts in syntaxes if not UID(ts).is_compressed]
        base.append(build_context(sop_class, list(dict.fromkeys([*plain, *_UNCOMPRESSED_LE]))))
        extra += [build_context(sop_class, ts) for ts in syntaxes if UID(ts).is_compressed]
    return (base + extra)[:MAX_PROPOSED_CONTEXTS]


class CannotSend(Exception):
    """One sub-operation cannot be attempted (object missing, no acceptable syntax); the message
    is safe to log."""


def prepare(data: bytes, contexts: Sequence[PresentationContext]) -> Dataset:
    """The stored object's data set, ready for pynetdicom to send on one of ``contexts`` (those
    accepted with us as the storage SCU). Left untouched (so its raw elements go out byte for
    byte) when a context has its syntax; otherwise converted to an uncompressed Little Endian
    syntax the peer accepted."""
    ds = dcmread(io.BytesIO(data))
    stored = UID(ds.file_meta.TransferSyntaxUID)
    sop_class = str(ds.SOPClassUID)
    offered = {cx.transfer_syntax[0] for cx in contexts if cx.abstract_syntax == sop_class and cx.as_scu}
    if not offered:
        raise CannotSend("the receiver accepted no presentation context for this SOP class")
    if stored in offered:
        return ds
    if not offered & set(_UNCOMPRESSED_LE):
        raise CannotSend("the receiver accepts neither the stored transfer syntax nor an uncompressed one")
    if stored.is_compressed:
        try:
            # Explicit VR Little Endian (pynetdicom converts to Implicit if need be). The same
            # instance in another encoding: it keeps its SOP Instance UID, the one the peer asked for
            ds.decompress(generate_instance_uid=False)
        except Exception as e:
            raise CannotSend(f"the stored pixel data cannot be decompressed ({type(e).__name__})") from None
        return ds
    if stored.is_little_endian:
        return ds  # pynetdicom converts between the uncompressed Little Endian syntaxes
    raise CannotSend("the stored Big Endian data set cannot be converted")


def _failed(inst: StoredInstance) -> Dataset:
    """A placeholder pynetdicom counts as a failed sub-operation (it has no SOP Class UID, so the
    C-STORE is never attempted) while listing its SOP Instance UID as failed."""
    ds = Dataset()
    ds.SOPInstanceUID = inst.sop_uid
    return ds


def _nodelay(event_: evt.Event) -> None:
    sock = getattr(getattr(event_.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass
class _StoreLink:
    """Catches the storage association pynetdicom opens for a C-MOVE: its socket gets
    TCP_NODELAY, its accepted contexts decide what each sub-operation sends."""

    assoc: Association | None = None

    def on_open(self, event_: evt.Event) -> None:
        _nodelay(event_)

    def on_accepted(self, event_: evt.Event) -> None:
        self.assoc = event_.assoc

    def contexts(self) -> list[PresentationContext]:
        return list(self.assoc.accepted_contexts) if self.assoc is not None else []


# -- the handlers --------------------------------------------------------------------------------
class QueryRetrieve:
    """The Q/R SCP handlers a ``dicom_node.server.Node`` binds (``handlers()``)."""

    def __init__(self, archive: Archive, ae_title: str, max_pdu: int = 262144) -> None:
        self.archive = archive
        self.ae_title = ae_title
        self.max_pdu = max_pdu

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [
            (evt.EVT_C_FIND, self.handle_find),
            (evt.EVT_C_GET, self.handle_get),
            (evt.EVT_C_MOVE, self.handle_move),
        ]

    @staticmethod
    def _partner(event_: evt.Event) -> PartnerRef | None:
        return getattr(event_.assoc, "_imx_partner", None)

    @staticmethod
    def _root(event_: evt.Event) -> str:
        return ROOT_OF_SOP_CLASS[str(event_.request.AffectedSOPClassUID)]

    def handle_find(self, event_: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        """C-FIND SCP, PS3.4 C.4.1.2: Pending per match, then Success; Cancel on C-CANCEL."""
        partner = self._partner(event_)
        if partner is None:  # cannot happen: acceptance required a partner
            yield _status(UNABLE_TO_PROCESS, "association has no partner"), None
            return
        try:
            req = parse_find(event_.identifier, self._root(event_))
            rows = search(self.archive.index, req.level, req.query, Scope(partner.id))
        except IdentifierError as e:
            event(log, "C-FIND refused", logging.WARNING, partner=partner.name, reason=str(e))
            yield _status(e.status, str(e)), None
            return
        except QueryError as e:
            event(log, "C-FIND refused", logging.WARNING, partner=partner.name, reason=str(e))
            yield _status(UNABLE_TO_PROCESS, str(e)), None
            return
        event(log, "C-FIND", logging.DEBUG, partner=partner.name, qr_level=req.level.value, matches=len(rows))
        pending = PENDING_OPTIONAL_KEYS_UNSUPPORTED if req.unsupported else PENDING
        for row in rows:
            if event_.is_cancelled:
                yield CANCEL, None
                return
            yield pending, answer(row, req, self.ae_title)
        yield SUCCESS, None

    def handle_get(self, event_: evt.Event) -> Iterator[Any]:
        """C-GET SCP, PS3.4 C.4.3.2: the number of sub-operations, then one C-STORE on this
        association per instance (pynetdicom sends the Pending and final responses)."""
        partner = self._partner(event_)
        try:
            if partner is None:
                raise IdentifierError(UNABLE_TO_PROCESS, "association has no partner")
            req = parse_retrieve(event_.identifier, self._root(event_))
            targets = retrieve_targets(self.archive, Scope(partner.id), req)
        except (IdentifierError, QueryError) as e:
            event(log, "C-GET refused", logging.WARNING, partner=partner.name if partner else None, reason=str(e))
            yield 1  # pynetdicom takes a failure status only after the count
            yield _status(getattr(e, "status", UNABLE_TO_PROCESS), str(e)), None
            return
        event(log, "C-GET", partner=partner.name, qr_level=req.level.value, instances=len(targets))
        yield len(targets)
        yield from self._suboperations(event_, targets, lambda: event_.assoc.accepted_contexts)

    def handle_move(self, event_: evt.Event) -> Iterator[Any]:
        """C-MOVE SCP, PS3.4 C.4.2.2: the destination, the number of sub-operations, then one
        C-STORE per instance on an association to the destination. An identifier we cannot act on
        raises before the first yield: pynetdicom answers it 0xC514 (Failed: unable to process),
        the only failure it lets a handler give before the destination."""
        partner = self._partner(event_)
        if partner is None:
            raise IdentifierError(UNABLE_TO_PROCESS, "association has no partner")
        try:
            req = parse_retrieve(event_.identifier, self._root(event_))
        except IdentifierError as e:
            event(log, "C-MOVE refused", logging.WARNING, partner=partner.name, reason=str(e))
            raise
        dest = self.destination(partner, str(event_.move_destination or "").strip())
        if dest is None:
            yield None, None
            return
        targets = retrieve_targets(self.archive, Scope(partner.id), req)
        link = _StoreLink()
        yield dest[0], dest[1], {
            "contexts": proposed_contexts(targets),
            "max_pdu": self.max_pdu,
            "evt_handlers": [(evt.EVT_CONN_OPEN, link.on_open), (evt.EVT_ACCEPTED, link.on_accepted)],
        }
        event(log, "C-MOVE", partner=partner.name, qr_level=req.level.value, instances=len(targets))
        yield len(targets)
        yield from self._suboperations(event_, targets, link.contexts)

    # -- helpers ---------------------------------------------------------------------------------
    def destination(self, caller: PartnerRef, move_destination: str) -> tuple[str, int] | None:
        """(host, port) of the Move Destination, or None when it is unknown to the caller: not a
        registered partner with a destination, or not the calling partner itself (module doc)."""
        p = self.archive.index.partner_by_ae(move_destination) if move_destination else None
        reason = None
        if p is None:
            reason = "the move destination is not a registered partner"
        elif p.id != caller.id:
            reason = "the move destination is another partner"
        elif not p.dest_host or not p.dest_port:
            reason = "the partner has no C-MOVE destination (imx partner dest)"
        if reason is not None or p is None:
            event(log, "C-MOVE destination unknown", logging.WARNING, partner=caller.name, reason=reason)
            return None
        return p.dest_host, int(p.dest_port)  # type: ignore[arg-type]

    def _suboperations(
        self, event_: evt.Event, targets: list[StoredInstance], contexts: Callable[[], Sequence[PresentationContext]]
    ) -> Iterator[tuple[int, Dataset | None]]:
        """Pending + the data set per instance (a placeholder counted as failed when it cannot be
        sent), Cancel when the peer cancels (PS3.4 C.4.2.2, C.4.3.2)."""
        if len(targets) > MAX_SUBOPERATIONS:
            return  # pynetdicom has already refused the request (0xC516 / 0xC416)
        failed = 0
        for inst in targets:
            if event_.is_cancelled:
                yield CANCEL, None
                return
            try:
                data = self.archive.read_object(inst.sop_uid)
                if data is None:
                    raise CannotSend("the stored object is missing")
                ds = prepare(data, contexts())
            except CannotSend as e:
                failed += 1
                event(log, "sub-operation not attempted", logging.WARNING, key=inst.object_key, reason=str(e))
                yield PENDING, _failed(inst)
                continue
            except Exception as e:  # the store failed or the object is unreadable
                failed += 1
                event(log, "sub-operation failed", logging.ERROR, key=inst.object_key, error=type(e).__name__)
                yield PENDING, _failed(inst)
                continue
            yield PENDING, ds


def _status(code: int, comment: str = "") -> Dataset | int:
    """A status dataset with an Error Comment (PS3.7 C.4.2.1.5: at most 64 characters)."""
    if not comment:
        return code
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds
