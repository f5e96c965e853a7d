"""The metadata index: SQLAlchemy over SQLite (default) or PostgreSQL.

It holds rows and knows nothing of DICOM encoding: the ingest path hands it plain records
(``InstanceRecord``) made from an already de-identified dataset. The schema is owned by the
Alembic migrations in ``storage/migrations``; ``Index.migrate()`` brings a database to head.

Concurrency: several receiver processes write at once. On SQLite every write transaction starts
with ``BEGIN IMMEDIATE`` (so writers queue on the lock instead of failing with a stale snapshot);
on PostgreSQL a write that races another on a unique key is retried.

Besides the study tree, the index holds each partner's de-identification policy, the quarantine
reason of instances held back from view, and the identity vault (table ``identity``): for each
original patient ID, accession number and study UID a partner sent, the pseudonym allocated to it
and the originals sealed under the vault key (see ``imx/reid.py``). The index only ever sees keyed
hashes and ciphertext there, never an original value.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy import Index as SqlIndex
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

# what the render workers learnt of an object: (object key, packed DICOM JSON[, frame plan JSON])
Metadata = tuple[str, bytes] | tuple[str, bytes, str | None]
# a kept metadata row: (instance id, object key, packed DICOM JSON[, frame plan JSON])
MetadataRow = tuple[int, str, bytes] | tuple[int, str, bytes, str | None]

LOCATION_STORE = "store"
LOCATION_SPOOL = "spool"

IDENTITY_KINDS = ("patient", "accession", "study")
QUARANTINE_REASON_MAX = 200  # width of instance.quarantine


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Partner(Base):
    __tablename__ = "partner"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    ae_title: Mapped[str] = mapped_column(String(16), unique=True)
    hosts: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of addresses/CIDRs; [] = any
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # JSON object: the partner's de-identification policy; NULL = the operator's default
    policy: Mapped[str | None] = mapped_column(Text)
    # where C-MOVE sends to this partner's AE title (its PACS's storage SCP); NULL = not a destination
    dest_host: Mapped[str | None] = mapped_column(String(255))
    dest_port: Mapped[int | None] = mapped_column(Integer)
    # IANA time zone of the hospital (consultation times are shown in it); NULL = Asia/Urumqi
    time_zone: Mapped[str | None] = mapped_column(String(64))

    @property
    def host_list(self) -> list[str]:
        return list(json.loads(self.hosts or "[]"))

    def allows(self, address: str) -> bool:
        nets = self.host_list
        if not nets:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in ipaddress.ip_network(n, strict=False) for n in nets)


class Patient(Base):
    __tablename__ = "patient"
    __table_args__ = (UniqueConstraint("partner_id", "pseudonym"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    partner_id: Mapped[int] = mapped_column(ForeignKey("partner.id"), index=True)
    pseudonym: Mapped[str] = mapped_column(String(64))
    sex: Mapped[str | None] = mapped_column(String(16))
    birth_date: Mapped[str | None] = mapped_column(String(8))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Study(Base):
    __tablename__ = "study"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    partner_id: Mapped[int] = mapped_column(ForeignKey("partner.id"), index=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)
    study_time: Mapped[str | None] = mapped_column(String(16))
    accession: Mapped[str | None] = mapped_column(String(16), index=True)
    study_id: Mapped[str | None] = mapped_column(String(16))
    description: Mapped[str | None] = mapped_column(String(64))
    modalities: Mapped[str] = mapped_column(String(128), default="")
    num_series: Mapped[int] = mapped_column(Integer, default=0)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16), index=True)
    series_number: Mapped[int | None] = mapped_column(Integer)
    description: Mapped[str | None] = mapped_column(String(64))
    body_part: Mapped[str | None] = mapped_column(String(16))
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)


class Instance(Base):
    __tablename__ = "instance"
    __table_args__ = (
        # partial: only the (rare) quarantined rows are indexed; a visible instance adds no entry
        SqlIndex(
            "ix_instance_quarantine",
            "quarantine",
            sqlite_where=text("quarantine IS NOT NULL"),
            postgresql_where=text("quarantine IS NOT NULL"),
        ),
        # partial: the preview workers' queue is the instances not yet rendered
        SqlIndex(
            "ix_instance_preview_pending",
            "id",
            sqlite_where=text("preview_status IS NULL"),
            postgresql_where=text("preview_status IS NULL"),
        ),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    partner_id: Mapped[int] = mapped_column(ForeignKey("partner.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    frames: Mapped[int | None] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    object_key: Mapped[str] = mapped_column(String(128), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    location: Mapped[str] = mapped_column(String(8), default=LOCATION_STORE, index=True)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # NULL = visible; otherwise why it is held back (a short fixed reason, never PHI)
    quarantine: Mapped[str | None] = mapped_column(String(QUARANTINE_REASON_MAX))
    # previews: NULL = not rendered yet (the workers' queue); 'ok'; 'unrenderable' (with the reason)
    preview_status: Mapped[str | None] = mapped_column(String(16))
    preview_reason: Mapped[str | None] = mapped_column(String(200))


class Rendition(Base):
    """A rendered image of an instance kept in the object store: a thumbnail or preview of one
    frame, under a key the service generates."""

    __tablename__ = "rendition"
    __table_args__ = (UniqueConstraint("instance_id", "kind", "frame", name="uq_rendition"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instance.id"))
    kind: Mapped[str] = mapped_column(String(16))  # 'thumbnail' | 'preview'
    frame: Mapped[int] = mapped_column(Integer)  # 1-based
    object_key: Mapped[str] = mapped_column(String(128), unique=True)
    media_type: Mapped[str] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class InstanceMetadata(Base):
    """An instance's WADO-RS metadata (DICOM JSON, PS3.18 F.2), computed after the ack by the
    render workers, zlib-compressed, with a placeholder for the base of its BulkDataURIs. Kept
    apart from ``instance`` so that the rows every search reads stay narrow. ``object_key`` is
    the object it was computed from: a row of another object (one replaced after masking) is
    not used."""

    __tablename__ = "instance_metadata"
    instance_id: Mapped[int] = mapped_column(ForeignKey("instance.id"), primary_key=True, autoincrement=False)
    object_key: Mapped[str] = mapped_column(String(128))
    dicom_json: Mapped[bytes] = mapped_column(LargeBinary)
    # schema 0006: the frame plan made from the same parse (imaging.render.FramePlan as JSON), or
    # NULL: on-demand renders of this object then need no parse
    render_plan: Mapped[str | None] = mapped_column(Text)


class Identity(Base):
    """One original (patient ID, accession number or study UID) a partner sent, in the vault.

    ``lookup`` is a keyed hash of the original under the partner's scope, computed by the caller;
    ``ciphertext`` is the sealed JSON of the originals. Neither the index nor anyone reading the
    database can recover an original from a row without the vault key."""

    __tablename__ = "identity"
    __table_args__ = (
        UniqueConstraint("partner_id", "kind", "lookup", name="uq_identity_lookup"),
        # no two originals of a kind ever share a pseudonym, across all partners
        UniqueConstraint("kind", "pseudonym", name="uq_identity_pseudonym"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    partner_id: Mapped[int] = mapped_column(ForeignKey("partner.id"))
    kind: Mapped[str] = mapped_column(String(16))
    lookup: Mapped[str] = mapped_column(String(64))
    pseudonym: Mapped[str] = mapped_column(String(64))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


@dataclass
class InstanceRecord:
    """What the ingest path knows of one de-identified instance. Every string here is already
    pseudonymous; nothing identifying may be put in it."""

    partner_id: int
    patient_pseudonym: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    object_key: str
    sha256: str
    size_bytes: int
    location: str = LOCATION_STORE
    patient_sex: str | None = None
    patient_birth_date: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    accession: str | None = None
    study_id: str | None = None
    study_description: str | None = None
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    body_part: str | None = None
    instance_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    frames: int | None = None
    quarantine: str | None = None  # why the instance is held back (never PHI); None = visible


def _rendition_row(instance_id: int, kind: str, frame: int, object_key: str, media_type: str, size_bytes: int) -> Any:
    """The INSERT of one rendition row (previews, thumbnails)."""
    return insert(Rendition).values(
        instance_id=instance_id,
        kind=kind,
        frame=frame,
        object_key=object_key,
        media_type=media_type,
        size_bytes=size_bytes,
        created_at=utcnow(),
    )


class PartnerExists(ValueError):
    pass


class PseudonymsExhausted(RuntimeError):
    """Every candidate pseudonym offered to ``Index.claim_identity`` is held by another original."""


def _check_destination(host: str | None, port: int | None) -> tuple[str | None, int | None]:
    """A C-MOVE destination is a host name or address and a TCP port, or neither."""
    if host is None and port is None:
        return None, None
    if host is None or port is None:
        raise ValueError("a destination needs both a host and a port")
    host = host.strip()
    if not host or len(host) > 255 or any(c.isspace() for c in host):
        raise ValueError("the destination host must be a host name or an IP address")
    if not 1 <= int(port) <= 65535:
        raise ValueError("the destination port must be between 1 and 65535")
    return host, int(port)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see _sqlite_begin)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str, *, writer: bool = False) -> Engine:
    """An engine for ``url``. On SQLite a ``writer`` engine starts every transaction with
    BEGIN IMMEDIATE, so that concurrent writers wait for the lock (busy_timeout) rather than
    fail on upgrading a read snapshot."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        begin = "BEGIN IMMEDIATE" if writer else "BEGIN"
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql(begin))
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
    return engine


class Index:
    """All reads and writes of the index go through here."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.engine = make_engine(url)
        self.write_engine = make_engine(url, writer=True) if self.is_sqlite else self.engine
        self._read_sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(self.write_engine, expire_on_commit=False)
        # process-local id caches for the ingest path (see add_instance)
        self._patient_cache: dict[tuple[int, str], int] = {}
        self._study_cache: dict[str, tuple[int, frozenset[str]]] = {}
        self._series_cache: dict[str, int] = {}

    def close(self) -> None:
        self.engine.dispose()
        self.write_engine.dispose()

    # -- schema -------------------------------------------------------------------------------
    def migrate(self) -> None:
        from alembic import command
        from alembic.config import Config

        here = Path(__file__).parent
        cfg = Config()
        cfg.set_main_option("script_location", str(here / "migrations"))
        cfg.attributes["connection_url"] = self.url
        with self.write_engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    # -- sessions -----------------------------------------------------------------------------
    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read_sessions() as s:
            yield s

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session whose transaction commits when the block ends (durably: WAL, synchronous=FULL
        on SQLite), and rolls back if it raises."""
        with self._write_sessions() as s, s.begin():
            yield s

    def ping(self) -> None:
        with self.read() as s:
            s.execute(text("SELECT 1"))

    # -- partners -----------------------------------------------------------------------------
    def set_partner_policy(self, name: str, policy_json: str | None) -> bool:
        """Store the de-identification policy (a JSON object) of the active partner ``name``;
        None returns it to the operator's default. False if there is no such partner."""
        if policy_json is not None:
            try:
                parsed = json.loads(policy_json)
            except ValueError as e:
                raise ValueError(f"the policy is not valid JSON: {e}") from None
            if not isinstance(parsed, dict):
                raise ValueError("the policy must be a JSON object")
        return self._update_partner(name, policy=policy_json)

    def add_partner(
        self,
        name: str,
        ae_title: str,
        hosts: list[str] | None = None,
        dest_host: str | None = None,
        dest_port: int | None = None,
    ) -> Partner:
        """Register a partner; ``dest_host``/``dest_port`` (both or neither) make its AE title a
        C-MOVE destination (its PACS's storage SCP)."""
        for h in hosts or []:
            ipaddress.ip_network(h, strict=False)  # raises ValueError with a clear message
        dest_host, dest_port = _check_destination(dest_host, dest_port)
        try:
            with self.write() as s:
                p = Partner(
                    name=name, ae_title=ae_title, hosts=json.dumps(hosts or []), dest_host=dest_host, dest_port=dest_port
                )
                s.add(p)
                s.flush()
                return p
        except sa_exc.IntegrityError:
            raise PartnerExists(f"a partner named {name!r} or with AE title {ae_title!r} already exists") from None

    def set_partner_destination(self, name: str, host: str | None, port: int | None) -> bool:
        """Where C-MOVE sends to the active partner ``name`` (PS3.4 C.4.2: the Move Destination is
        its AE title); ``None, None`` makes it no destination. False if there is no such partner.
        Raises ValueError for a host or port that cannot be one."""
        host, port = _check_destination(host, port)
        return self._update_partner(name, dest_host=host, dest_port=port)

    def set_partner_time_zone(self, name: str, zone_name: str | None) -> bool:
        """The IANA time zone of the active partner ``name`` (None: back to Urumqi's); the caller
        checks the name (``viewer.i18n_server.check_zone``). False if there is no such partner."""
        return self._update_partner(name, time_zone=zone_name)

    def _update_partner(self, name: str, **values: Any) -> bool:
        with self.write() as s:
            result = s.execute(
                update(Partner).where(Partner.name == name, Partner.active.is_(True)).values(**values)
            )
            return result.rowcount == 1

    def remove_partner(self, name: str) -> str | None:
        """Stop accepting a partner. A partner that has sent studies is deactivated (its studies
        stay attributed to it); one that never sent anything is deleted. None if unknown."""
        with self.write() as s:
            p = s.scalar(select(Partner).where(Partner.name == name, Partner.active.is_(True)))
            if p is None:
                return None
            # identity rows are written before the instance is committed, so a partner may have
            # some without a single study; they must stay attributed too
            sent = any(
                s.scalar(select(model.id).where(model.partner_id == p.id).limit(1)) is not None
                for model in (Study, Identity)
            )
            if not sent:
                s.delete(p)
                return "deleted"
            p.active = False
            # free the AE title and name for a new registration, keep the row for attribution
            p.ae_title = f"~{p.id}"
            p.name = f"{p.name}~removed-{p.id}"
            return "deactivated"

    def partners(self) -> list[Partner]:
        with self.read() as s:
            return list(s.scalars(select(Partner).where(Partner.active.is_(True)).order_by(Partner.name)))

    def partner_by_ae(self, ae_title: str) -> Partner | None:
        with self.read() as s:
            return s.scalar(select(Partner).where(Partner.ae_title == ae_title, Partner.active.is_(True)))

    def partner_by_name(self, name: str) -> Partner | None:
        with self.read() as s:
            return s.scalar(select(Partner).where(Partner.name == name, Partner.active.is_(True)))

    # -- instances ----------------------------------------------------------------------------
    def instance_exists(self, sop_uid: str) -> bool:
        with self.engine.connect() as conn:  # Core: this runs for every C-STORE
            return conn.scalar(select(Instance.id).where(Instance.sop_uid == sop_uid)) is not None

    def get_instance(self, sop_uid: str) -> Instance | None:
        with self.read() as s:
            return s.scalar(select(Instance).where(Instance.sop_uid == sop_uid))

    def add_instance(self, rec: InstanceRecord) -> bool:
        """Commit one instance with its patient, study and series. False if it was already there.

        This is on the C-STORE path, so it is Core, not ORM: once a process knows a study and a
        series (ids never change, rows are never deleted), an instance costs one INSERT and two
        counter UPDATEs. Ids learnt in a transaction enter the caches only after it commits."""
        for attempt in range(5):
            learned: dict[str, Any] = {}
            try:
                with self.write_engine.begin() as conn:
                    self._add_instance(conn, rec, learned)
            except sa_exc.IntegrityError:
                if self.instance_exists(rec.sop_uid):
                    return False
                if attempt == 4:
                    raise
                continue  # a concurrent writer inserted the same patient/study/series: look again
            self._learn(learned)
            return True
        return False

    def _learn(self, learned: dict[str, Any]) -> None:
        if len(self._study_cache) > 50_000 or len(self._series_cache) > 200_000:
            self._patient_cache.clear()
            self._study_cache.clear()
            self._series_cache.clear()
        if "patient" in learned:
            self._patient_cache.__setitem__(*learned["patient"])
        if "study" in learned:
            self._study_cache.__setitem__(*learned["study"])
        if "series" in learned:
            self._series_cache.__setitem__(*learned["series"])

    def _add_instance(self, conn: Connection, rec: InstanceRecord, learned: dict[str, Any]) -> None:
        now = utcnow()
        pkey = (rec.partner_id, rec.patient_pseudonym)
        patient_id = self._patient_cache.get(pkey)
        if patient_id is None:
            patient_id = conn.scalar(
                select(Patient.id).where(Patient.partner_id == rec.partner_id, Patient.pseudonym == rec.patient_pseudonym)
            )
            if patient_id is None:
                patient_id = conn.execute(
                    insert(Patient).values(
                        partner_id=rec.partner_id,
                        pseudonym=rec.patient_pseudonym,
                        sex=rec.patient_sex,
                        birth_date=rec.patient_birth_date,
                    )
                ).inserted_primary_key[0]
            learned["patient"] = (pkey, patient_id)

        study = self._study_cache.get(rec.study_uid)  # (id, modalities known to be recorded)
        if study is None:
            row = conn.execute(select(Study.id, Study.modalities).where(Study.study_uid == rec.study_uid)).first()
            if row is None:
                study_id = conn.execute(
                    insert(Study).values(
                        study_uid=rec.study_uid,
                        partner_id=rec.partner_id,
                        patient_id=patient_id,
                        study_date=rec.study_date,
                        study_time=rec.study_time,
                        accession=rec.accession,
                        study_id=rec.study_id,
                        description=rec.study_description,
                        modalities="",
                        received_at=now,
                        updated_at=now,
                    )
                ).inserted_primary_key[0]
                study = (study_id, frozenset())
            else:
                study = (row[0], frozenset(m for m in (row[1] or "").split("\\") if m))

        series_id = self._series_cache.get(rec.series_uid)
        new_series = False
        if series_id is None:
            series_id = conn.scalar(select(Series.id).where(Series.series_uid == rec.series_uid))
            if series_id is None:
                new_series = True
                series_id = conn.execute(
                    insert(Series).values(
                        series_uid=rec.series_uid,
                        study_id=study[0],
                        modality=rec.modality,
                        series_number=rec.series_number,
                        description=rec.series_description,
                        body_part=rec.body_part,
                    )
                ).inserted_primary_key[0]
            learned["series"] = (rec.series_uid, series_id)

        conn.execute(
            insert(Instance).values(
                sop_uid=rec.sop_uid,
                series_id=series_id,
                partner_id=rec.partner_id,
                sop_class_uid=rec.sop_class_uid,
                instance_number=rec.instance_number,
                transfer_syntax=rec.transfer_syntax,
                rows=rec.rows,
                columns=rec.columns,
                frames=rec.frames,
                size_bytes=rec.size_bytes,
                object_key=rec.object_key,
                sha256=rec.sha256,
                location=rec.location,
                received_at=now,
                # clipped: a long reason must not make PostgreSQL refuse the whole instance
                quarantine=None if rec.quarantine is None else rec.quarantine[:QUARANTINE_REASON_MAX],
            )
        )
        conn.execute(
            update(Series)
            .where(Series.id == series_id)
            .values(num_instances=Series.num_instances + 1, size_bytes=Series.size_bytes + rec.size_bytes)
        )
        values: dict[str, Any] = {
            "num_instances": Study.num_instances + 1,
            "size_bytes": Study.size_bytes + rec.size_bytes,
            "updated_at": now,
        }
        if new_series:
            values["num_series"] = Study.num_series + 1
        if rec.modality and rec.modality not in study[1]:
            # re-read under the row lock (FOR NO KEY UPDATE on PostgreSQL): a concurrent writer may
            # have added a modality since we looked, and writing back a stale string would lose it
            current = conn.scalar(select(Study.modalities).where(Study.id == study[0]).with_for_update(key_share=True)) or ""
            known = {m for m in current.split("\\") if m} | {rec.modality}
            values["modalities"] = "\\".join(sorted(known))
            study = (study[0], frozenset(known))
        conn.execute(update(Study).where(Study.id == study[0]).values(**values))
        learned["study"] = (rec.study_uid, study)

    # -- spool --------------------------------------------------------------------------------
    def spooled(self, limit: int = 100) -> list[tuple[int, str, str]]:
        """(instance id, object key, sha256) of instances whose object waits in the local spool."""
        with self.read() as s:
            rows = s.execute(
                select(Instance.id, Instance.object_key, Instance.sha256)
                .where(Instance.location == LOCATION_SPOOL)
                .order_by(Instance.id)
                .limit(limit)
            )
            return [tuple(r) for r in rows]  # type: ignore[misc]

    def spool_depth(self) -> int:
        with self.read() as s:
            return int(s.scalar(select(func.count()).select_from(Instance).where(Instance.location == LOCATION_SPOOL)) or 0)

    def mark_stored(self, instance_id: int) -> None:
        with self.write() as s:
            s.execute(update(Instance).where(Instance.id == instance_id).values(location=LOCATION_STORE))

    # -- quarantine ---------------------------------------------------------------------------
    def quarantined(self, limit: int = 100) -> list[dict[str, Any]]:
        """Instances held back from view, oldest first, with their (pseudonymous) UIDs, partner
        name and reason."""
        with self.read() as s:
            rows = s.execute(
                select(
                    Instance.sop_uid,
                    Study.study_uid,
                    Series.series_uid,
                    Partner.name,
                    Instance.quarantine,
                    Instance.received_at,
                )
                .join(Series, Instance.series_id == Series.id)
                .join(Study, Series.study_id == Study.id)
                .join(Partner, Instance.partner_id == Partner.id)
                .where(Instance.quarantine.is_not(None))
                .order_by(Instance.received_at, Instance.id)
                .limit(limit)
            )
            return [
                {
                    "sop_uid": sop,
                    "study_uid": study,
                    "series_uid": series,
                    "partner": partner,
                    "reason": reason,
                    "received_at": received.isoformat() + "Z",
                }
                for sop, study, series, partner, reason, received in rows
            ]

    def release(self, sop_uid: str) -> bool:
        """Make a quarantined instance visible. False if it is unknown or was not quarantined."""
        with self.write() as s:
            result = s.execute(
                update(Instance)
                .where(Instance.sop_uid == sop_uid, Instance.quarantine.is_not(None))
                .values(quarantine=None)
            )
            return result.rowcount == 1

    def replace_object(self, sop_uid: str, *, object_key: str, sha256: str, size_bytes: int, transfer_syntax: str) -> str | None:
        """Point a quarantined instance at its masked object and release it, in one transaction.
        Returns the old object key (for the caller to delete), or None if the instance is unknown
        or not quarantined."""
        with self.write() as s:
            row = s.execute(
                select(Instance.object_key).where(Instance.sop_uid == sop_uid, Instance.quarantine.is_not(None))
            ).first()
            if row is None:
                return None
            s.execute(
                update(Instance)
                .where(Instance.sop_uid == sop_uid)
                .values(
                    object_key=object_key,
                    sha256=sha256,
                    size_bytes=size_bytes,
                    transfer_syntax=transfer_syntax,
                    location=LOCATION_STORE,
                    quarantine=None,
                )
            )
            return str(row[0])

    # -- identity vault -----------------------------------------------------------------------
    def claim_identity(
        self,
        partner_id: int,
        kind: str,
        lookup: str,
        candidates: Iterable[str],
        ciphertext: bytes | Callable[[str], bytes],
    ) -> str:
        """The pseudonym of the original whose keyed hash is ``lookup``, allocating one if needed.

        If (partner_id, kind, lookup) has a row, its pseudonym is returned and nothing is written.
        Otherwise a row is inserted with the first candidate no other original of this kind holds
        (for any partner). ``ciphertext`` is the sealed originals, or a function of the chosen
        candidate returning them (for a seal whose associated data binds the pseudonym); it is
        called only when a row is about to be inserted.

        Safe when several processes claim at once: a unique-key violation on either constraint
        means a concurrent writer won that lookup (its pseudonym is returned) or that candidate
        (the next one is tried). Raises ``PseudonymsExhausted`` when the candidates run out."""
        if kind not in IDENTITY_KINDS:
            raise ValueError(f"unknown identity kind {kind!r}: expected one of {IDENTITY_KINDS}")
        existing = self.identity(partner_id, kind, lookup)  # common case: no write lock taken
        if existing is not None:
            return existing[0]
        by_lookup = select(Identity.pseudonym).where(
            Identity.partner_id == partner_id, Identity.kind == kind, Identity.lookup == lookup
        )
        tried = 0
        for candidate in candidates:
            tried += 1
            taken = select(Identity.id).where(
                Identity.kind == kind, Identity.pseudonym == candidate
            )
            try:
                with self.write_engine.begin() as conn:
                    found = conn.scalar(by_lookup)
                    if found is not None:
                        return found
                    if conn.scalar(taken) is not None:
                        continue
                    sealed = ciphertext(candidate) if callable(ciphertext) else ciphertext
                    conn.execute(
                        insert(Identity).values(
                            partner_id=partner_id,
                            kind=kind,
                            lookup=lookup,
                            pseudonym=candidate,
                            ciphertext=sealed,
                            created_at=utcnow(),
                        )
                    )
                return candidate
            except sa_exc.IntegrityError:
                # a concurrent writer committed this lookup or this candidate between our look and
                # our insert; anything else (an unknown partner: foreign key) is not ours to hide
                with self.engine.connect() as conn:
                    found = conn.scalar(by_lookup)
                    if found is not None:
                        return found
                    if conn.scalar(taken) is None:
                        raise
        raise PseudonymsExhausted(
            f"all {tried} candidate pseudonyms of kind {kind!r} for partner {partner_id} "
            "are held by other originals"
        )

    def identity(self, partner_id: int, kind: str, lookup: str) -> tuple[str, bytes] | None:
        """(pseudonym, ciphertext) of the row for this partner, kind and lookup hash, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(Identity.pseudonym, Identity.ciphertext).where(
                    Identity.partner_id == partner_id,
                    Identity.kind == kind,
                    Identity.lookup == lookup,
                )
            ).first()
        return None if row is None else (row[0], bytes(row[1]))

    def identity_by_pseudonym(self, kind: str, pseudonym: str) -> tuple[int, bytes] | None:
        """(partner id, ciphertext) of the row that holds this pseudonym of this kind, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(Identity.partner_id, Identity.ciphertext).where(
                    Identity.kind == kind, Identity.pseudonym == pseudonym
                )
            ).first()
        return None if row is None else (row[0], bytes(row[1]))

    def study_pseudonyms(self, study_uid: str) -> tuple[int, str, str | None] | None:
        """(partner id, patient pseudonym, accession) of a study, or None if it is unknown."""
        with self.read() as s:
            row = s.execute(
                select(Study.partner_id, Patient.pseudonym, Study.accession)
                .join(Patient, Study.patient_id == Patient.id)
                .where(Study.study_uid == study_uid)
            ).first()
        return None if row is None else (row[0], row[1], row[2])

    def find_studies(
        self, partner_id: int, *, patient: str | None = None, accession: str | None = None
    ) -> list[str]:
        """UIDs of the partner's studies with this patient pseudonym and/or accession (both
        pseudonymous; both must match when both are given), newest first."""
        if patient is None and accession is None:
            raise ValueError("give a patient pseudonym, an accession or both")
        q = select(Study.study_uid).where(Study.partner_id == partner_id)
        if patient is not None:
            q = q.join(Patient, Study.patient_id == Patient.id).where(
                Patient.partner_id == partner_id, Patient.pseudonym == patient
            )
        if accession is not None:
            q = q.where(Study.accession == accession)
        with self.read() as s:
            return list(s.scalars(q.order_by(Study.received_at.desc(), Study.id.desc())))

    # -- listing ------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self.read() as s:
            return {
                "studies": int(s.scalar(select(func.count()).select_from(Study)) or 0),
                "series": int(s.scalar(select(func.count()).select_from(Series)) or 0),
                "instances": int(s.scalar(select(func.count()).select_from(Instance)) or 0),
            }

    def list_studies(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Studies newest first, without those whose every instance is quarantined. Counts
        (``num_instances``, ``size_bytes``, ...) include quarantined instances; ``quarantined``
        says how many of them there are."""
        held = (  # few rows: it reads the partial index of quarantined instances
            select(Series.study_id.label("study_id"), func.count(Instance.id).label("n"))
            .join(Instance, Instance.series_id == Series.id)
            .where(Instance.quarantine.is_not(None))
            .group_by(Series.study_id)
            .subquery()
        )
        n_held = func.coalesce(held.c.n, 0)
        with self.read() as s:
            rows = s.execute(
                select(Study, Patient.pseudonym, Patient.sex, Partner.name, n_held)
                .join(Patient, Study.patient_id == Patient.id)
                .join(Partner, Study.partner_id == Partner.id)
                .outerjoin(held, held.c.study_id == Study.id)
                # num_instances moves in the transaction that inserts the instance
                .where(n_held < Study.num_instances)
                .order_by(Study.received_at.desc(), Study.id.desc())
                .limit(limit)
                .offset(offset)
            )
            out = []
            for study, pseudonym, sex, partner, quarantined in rows:
                out.append(
                    {
                        "study_uid": study.study_uid,
                        "patient": pseudonym,
                        "patient_sex": sex,
                        "partner": partner,
                        "study_date": study.study_date,
                        "study_time": study.study_time,
                        "accession": study.accession,
                        "description": study.description,
                        "modalities": [m for m in (study.modalities or "").split("\\") if m],
                        "num_series": study.num_series,
                        "num_instances": study.num_instances,
                        "size_bytes": study.size_bytes,
                        "received_at": study.received_at.isoformat() + "Z",
                        "quarantined": int(quarantined),
                    }
                )
            return out

    def all_instances(self) -> Iterator[tuple[str, str, str, str]]:
        """(sop uid, object key, sha256, location) of every instance: for consistency checks."""
        with self.read() as s:
            for row in s.execute(select(Instance.sop_uid, Instance.object_key, Instance.sha256, Instance.location)):
                yield tuple(row)  # type: ignore[misc]

    # -- renditions and previews ----------------------------------------------------------------
    # The preview workers' queue is the instances whose preview_status is NULL (rows exist only
    # after the ack); a rendition is a thumbnail or preview kept in the object store.
    _TARGET_COLUMNS = (
        Instance.id,
        Instance.sop_uid,
        Instance.series_id,
        Instance.sha256,
        Instance.frames,
        Instance.quarantine,
        Instance.preview_status,
        Instance.preview_reason,
        Instance.object_key,
        Instance.location,
    )

    @staticmethod
    def target_of(row: Any) -> dict[str, Any]:
        """A row of ``_TARGET_COLUMNS`` (or of ``target_select``) as a dict."""
        iid, sop, series_id, sha, frames, quarantine, status, reason, key, location, *plan = row
        return {
            "render_plan": plan[0] if plan else None,
            "object_key": key,
            "location": location,
            "id": iid,
            "sop_uid": sop,
            "series_id": series_id,
            "sha256": sha,
            "frames": max(1, int(frames or 1)),
            "quarantine": quarantine,
            "preview_status": status,
            "preview_reason": reason,
        }

    def preview_target(self, sop_uid: str) -> dict[str, Any] | None:
        """What the preview functions need of one instance, or None if it is unknown."""
        with self.engine.connect() as conn:
            row = conn.execute(_PREVIEW_TARGET, {"sop": sop_uid}).first()
        return self.target_of(row) if row is not None else None

    def pending_previews(self, limit: int = 50) -> list[dict[str, Any]]:
        """Visible instances not rendered yet, oldest first (quarantined ones wait for release)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(*self._TARGET_COLUMNS)
                .where(Instance.preview_status.is_(None), Instance.quarantine.is_(None))
                .order_by(Instance.id)
                .limit(limit)
            ).all()
        return [self.target_of(r) for r in rows]

    def set_preview_status(
        self, instance_id: int, status: str, reason: str | None, metadata: Metadata | None = None
    ) -> None:
        """Settle an instance's preview ('ok' or 'unrenderable' with the reason); ``metadata``:
        (object key, packed DICOM JSON[, frame plan]) computed by the same job, kept in the same
        transaction."""
        with self.write_engine.begin() as conn:
            conn.execute(
                update(Instance)
                .where(Instance.id == instance_id)
                .values(preview_status=status, preview_reason=(reason or None) and reason[:200])
            )
            if metadata is not None:
                self._upsert_metadata(conn, [(instance_id, *metadata)])

    def add_rendition(self, instance_id: int, kind: str, frame: int, object_key: str, media_type: str, size_bytes: int) -> tuple[str, str]:
        """Record a rendition; (object key, media type) of the one recorded, which is an earlier
        one if another writer recorded the same (instance, kind, frame) first."""
        try:
            with self.write_engine.begin() as conn:
                conn.execute(
                    _rendition_row(instance_id, kind, frame, object_key, media_type, size_bytes)
                )
            return object_key, media_type
        except sa_exc.IntegrityError:
            found = self.rendition(instance_id, kind, frame)
            if found is None:
                raise
            return found

    def record_preview(
        self,
        instance_id: int,
        frame: int,
        object_key: str,
        media_type: str,
        size_bytes: int,
        metadata: Metadata | None = None,
    ) -> tuple[str, str]:
        """Record a preview rendition and mark the instance rendered ('ok') in one transaction,
        with the instance's ``metadata`` if given (as ``set_preview_status``); as
        ``add_rendition``, returns the one recorded (an earlier one if another writer won)."""
        try:
            with self.write_engine.begin() as conn:
                conn.execute(
                    _rendition_row(instance_id, "preview", frame, object_key, media_type, size_bytes)
                )
                conn.execute(update(Instance).where(Instance.id == instance_id).values(preview_status="ok", preview_reason=None))
                if metadata is not None:
                    self._upsert_metadata(conn, [(instance_id, *metadata)])
            return object_key, media_type
        except sa_exc.IntegrityError:
            found = self.rendition(instance_id, "preview", frame)
            if found is None:
                raise
            self.set_preview_status(instance_id, "ok", None, metadata)
            return found

    def settle_previews(
        self,
        items: list[tuple[int, str, str | None, tuple[str, str, int] | None, Metadata | None]],
    ) -> None:
        """Settle a batch of queued instances in one transaction: for each (instance id, status,
        reason, its preview of frame 1 as (object key, media type, size) or None, its metadata as
        in ``set_preview_status`` or None). Raises IntegrityError, recording nothing, if a
        preview of one of them was recorded meanwhile."""
        from sqlalchemy import bindparam

        if not items:
            return
        now = utcnow()
        renditions = [
            {"instance_id": i, "kind": "preview", "frame": 1, "object_key": r[0], "media_type": r[1], "size_bytes": r[2], "created_at": now}
            for i, _s, _r, r, _m in items
            if r is not None
        ]
        statuses = [{"iid": i, "status": st, "reason": (reason or None) and reason[:200]} for i, st, reason, _r, _m in items]
        metadata = [(i, *m) for i, _s, _r, _p, m in items if m is not None]
        with self.write_engine.begin() as conn:
            if renditions:
                conn.execute(insert(Rendition), renditions)
            conn.execute(
                update(Instance)
                .where(Instance.id == bindparam("iid"))
                .values(preview_status=bindparam("status"), preview_reason=bindparam("reason")),
                statuses,
            )
            if metadata:
                self._upsert_metadata(conn, metadata)

    # -- instance metadata (WADO-RS, PS3.18 10.4.1.1.2) --------------------------------------------
    # Computed after the ack by the render workers (or on first request for older instances);
    # kept packed (see imaging/dicomjson.py), keyed by instance and tagged with its object key.
    METADATA_BATCH = 500  # object keys per SELECT ... IN

    def _upsert_metadata(self, conn: Connection, rows: list[MetadataRow]) -> None:
        if conn.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as upsert
        else:
            from sqlalchemy.dialects.sqlite import insert as upsert
        stmt = upsert(InstanceMetadata)
        stmt = stmt.on_conflict_do_update(
            index_elements=[InstanceMetadata.instance_id],
            set_={
                "object_key": stmt.excluded.object_key,
                "dicom_json": stmt.excluded.dicom_json,
                "render_plan": stmt.excluded.render_plan,
            },
        )
        conn.execute(
            stmt,
            [
                {"instance_id": r[0], "object_key": r[1], "dicom_json": r[2], "render_plan": r[3] if len(r) > 3 else None}
                for r in rows
            ],
        )

    def put_metadata(self, rows: list[MetadataRow]) -> None:
        """Keep (instance id, object key, packed DICOM JSON[, frame plan]) rows, replacing older
        ones."""
        if rows:
            with self.write_engine.begin() as conn:
                self._upsert_metadata(conn, rows)

    def instance_metadata(self, object_keys: list[str]) -> dict[str, tuple[int, bytes | None]]:
        """For each object key of an instance: (instance id, its packed DICOM JSON, or None when
        none is kept for this object yet). One indexed SELECT per METADATA_BATCH keys."""
        out: dict[str, tuple[int, bytes | None]] = {}
        with self.engine.connect() as conn:
            for n in range(0, len(object_keys), self.METADATA_BATCH):
                chunk = object_keys[n : n + self.METADATA_BATCH]
                q = (
                    select(Instance.object_key, Instance.id, InstanceMetadata.dicom_json)
                    .outerjoin(
                        InstanceMetadata,
                        (InstanceMetadata.instance_id == Instance.id) & (InstanceMetadata.object_key == Instance.object_key),
                    )
                    .where(Instance.object_key.in_(chunk))
                )
                for key, iid, packed in conn.execute(q):
                    out[str(key)] = (int(iid), bytes(packed) if packed is not None else None)
        return out

    def rendition(self, instance_id: int, kind: str, frame: int) -> tuple[str, str] | None:
        """(object key, media type) of a rendition, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(Rendition.object_key, Rendition.media_type).where(
                    Rendition.instance_id == instance_id, Rendition.kind == kind, Rendition.frame == frame
                )
            ).first()
        return (str(row[0]), str(row[1])) if row is not None else None

    def drop_rendition(self, object_key: str) -> None:
        from sqlalchemy import delete

        with self.write_engine.begin() as conn:
            conn.execute(delete(Rendition).where(Rendition.object_key == object_key))

    def rendition_keys(self) -> Iterator[str]:
        """Object keys of every rendition (they are not orphans for a consistency check)."""
        with self.read() as s:
            for (key,) in s.execute(select(Rendition.object_key)):
                yield str(key)

    def series_id(self, series_uid: str) -> int | None:
        with self.engine.connect() as conn:
            return conn.scalar(select(Series.id).where(Series.series_uid == series_uid))

    def series_thumbnail(self, series_id: int) -> tuple[int, int, str, str] | None:
        """(instance id, frame, object key, media type) of the series thumbnail, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(Rendition.instance_id, Rendition.frame, Rendition.object_key, Rendition.media_type)
                .join(Instance, Rendition.instance_id == Instance.id)
                .where(Instance.series_id == series_id, Rendition.kind == "thumbnail")
                .order_by(Rendition.id.desc())
                .limit(1)
            ).first()
        return (int(row[0]), int(row[1]), str(row[2]), str(row[3])) if row is not None else None

    def thumbnail_plan(self, series_id: int) -> dict[str, Any] | None:
        """What the series thumbnail should be made of: ``representative`` (the middle visible,
        renderable instance by instance number, and its frame: the middle one when the series is
        a single multi-frame instance), ``current`` (the thumbnail kept now, as
        ``series_thumbnail``) and ``pending`` (an instance of the series waits in the queue)."""
        with self.engine.connect() as conn:
            if conn.scalar(select(Series.id).where(Series.id == series_id)) is None:
                return None
            rows = conn.execute(
                select(*self._TARGET_COLUMNS)
                .where(
                    Instance.series_id == series_id,
                    Instance.quarantine.is_(None),
                    func.coalesce(Instance.preview_status, "") != "unrenderable",
                )
                .order_by(Instance.instance_number.is_(None), Instance.instance_number, Instance.id)
            ).all()
        targets = [self.target_of(r) for r in rows]
        rep = None
        if targets:
            t = targets[(len(targets) - 1) // 2]
            rep = {"target": t, "frame": (t["frames"] + 1) // 2 if len(targets) == 1 else 1}
        return {
            "pending": any(t["preview_status"] is None for t in targets),
            "current": self.series_thumbnail(series_id),
            "representative": rep,
        }

    def replace_thumbnail(self, series_id: int, instance_id: int, frame: int, object_key: str, media_type: str, size_bytes: int) -> list[str]:
        """Make ``object_key`` the series thumbnail in one transaction; returns the object keys of
        the thumbnails it replaces (for the caller to delete from the store): ``[object_key]``
        itself if a concurrent writer just recorded the same one."""
        from sqlalchemy import delete

        try:
            return self._replace_thumbnail(delete, series_id, instance_id, frame, object_key, media_type, size_bytes)
        except sa_exc.IntegrityError:
            return [object_key]

    def _replace_thumbnail(self, delete: Any, series_id: int, instance_id: int, frame: int, object_key: str, media_type: str, size_bytes: int) -> list[str]:
        with self.write_engine.begin() as conn:
            old = [
                str(k)
                for (k,) in conn.execute(
                    select(Rendition.object_key)
                    .join(Instance, Rendition.instance_id == Instance.id)
                    .where(Instance.series_id == series_id, Rendition.kind == "thumbnail")
                )
            ]
            if old:
                conn.execute(delete(Rendition).where(Rendition.object_key.in_(old)))
            conn.execute(
                _rendition_row(instance_id, "thumbnail", frame, object_key, media_type, size_bytes)
            )
        return old


def target_select() -> Any:
    """A SELECT of what the preview functions need of an instance (``Index.target_of`` reads its
    rows) with its frame plan: the one kept for its current object, else NULL."""
    return (
        select(*Index._TARGET_COLUMNS, InstanceMetadata.render_plan)
        .select_from(Instance)
        .outerjoin(
            InstanceMetadata,
            (InstanceMetadata.instance_id == Instance.id) & (InstanceMetadata.object_key == Instance.object_key),
        )
    )


# the one statement behind Index.preview_target, built once: an on-demand render looks an instance
# up by UID per request, and building the SELECT cost twice what running it does
_PREVIEW_TARGET = target_select().where(Instance.sop_uid == bindparam("sop"))


# The tables of accounts and consultations (schema 0004) join Base.metadata wherever the index is
# imported; at the end, since they build on the classes above.
import storage.access  # noqa: E402, F401
