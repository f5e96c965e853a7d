"""The one ingest path every instance takes, whichever door it came in by (C-STORE, STOW-RS):

    parse -> check -> de-identify -> put the object (or spool it) -> commit the index row -> answer

An instance is acknowledged only once its object and its index row are durable. If the object
store is unreachable, the de-identified object goes to the durable local spool and is still
acknowledged; the supervisor's drainer moves it to the store later. Only if neither works (disk
full) is the instance refused as out of resources.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from pydicom import config, dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID
from sqlalchemy import exc as sa_exc

from imaging.burnin import BurnInError, BurnInRisk, Region, RegionRules, assess, mask
from imaging.deid import DeidentificationError, Deidentifier, DeidResult, partner_prefix
from imaging.descriptors import Vocabulary
from imaging.dicomio import MalformedInstance, ReceivedInstance, read_received, write_instance
from imaging.metadata import index_attributes
from imaging.policy import BurnedInAction, Policy, PolicyError
from imaging.private import SafePrivate
from imaging.pseudonym import KeyedHash
from imx import metrics
from imx.config import Settings
from imx.keys import load_or_create_key
from imx.logs import event
from imx.reid import IdentityVault
from storage.index import LOCATION_SPOOL, LOCATION_STORE, Index, InstanceRecord, Partner
from storage.objects import (
    FileSystemStore,
    ObjectStore,
    Payload,
    S3Store,
    StoreError,
    make_key,
)
from storage.spool import Spool

log = logging.getLogger("imx.ingest")

IN_MEMORY_LIMIT = 64 * 1024 * 1024


class Result(StrEnum):
    STORED = "stored"
    SPOOLED = "spooled"
    DUPLICATE = "duplicate"
    INVALID = "invalid"  # cannot be parsed or de-identified
    MISMATCH = "mismatch"  # does not match what the request said it was
    REFUSED = "refused"  # the partner's policy refuses it (burned-in annotation)
    OUT_OF_RESOURCES = "out_of_resources"
    FAILED = "failed"

    @property
    def acknowledged(self) -> bool:
        return self in (Result.STORED, Result.SPOOLED, Result.DUPLICATE)


@dataclass(frozen=True)
class Outcome:
    result: Result
    reason: str = ""
    sop_instance_uid: str | None = None  # the new (pseudonymous) UID
    sop_class_uid: str | None = None
    quarantine: str | None = None  # why it is held back from specialists, if it is


@dataclass
class Anonymized:
    """An instance de-identified under its partner's policy, ready to be written."""

    inst: ReceivedInstance
    deid: DeidResult
    sop_uid: str
    sop_class: str
    quarantine: str | None = None


@dataclass(frozen=True)
class PartnerRef:
    id: int
    name: str
    ae_title: str
    policy_json: str | None = None  # the partner's own de-identification policy; None: the default

    @property
    def scope(self) -> str:
        return f"partner:{self.id}"

    @property
    def prefix(self) -> str:
        return partner_prefix(self.name)

    @classmethod
    def of(cls, p: Partner) -> PartnerRef:
        return cls(p.id, p.name, p.ae_title, getattr(p, "policy", None))


def make_store(settings: Settings) -> ObjectStore:
    if settings.s3_endpoint:
        return S3Store(
            settings.s3_endpoint,
            settings.s3_access_key,
            settings.s3_secret_key,
            settings.s3_bucket,
            secure=settings.s3_secure,
            region=settings.s3_region,
            timeout=settings.store_timeout,
        )
    return FileSystemStore(settings.objects_dir)


def object_key_for(sop_uid: str) -> str:
    return make_key("i", hashlib.sha256(sop_uid.encode()).hexdigest())


class Archive:
    """Everything one process needs to ingest and read instances, built once from the settings."""

    def __init__(
        self, settings: Settings, *, index: Index | None = None, store: ObjectStore | None = None, offline: bool = False
    ) -> None:
        """``offline``: no object store is opened (``imx anonymize`` de-identifies without storing)."""
        # pydicom checks every value it converts against its VR only to warn; the service reads
        # hostile input anyway, never shows those warnings, and de-identification replaces or
        # checks what it keeps, so the check is skipped (about a tenth of the engine's time).
        config.settings.reading_validation_mode = config.IGNORE
        self.settings = settings
        self.index = index or Index(settings.effective_database_url)
        self.store = store or (None if offline else make_store(settings))  # type: ignore[assignment]
        self.spool = Spool(settings.spool_dir, settings.tmp_dir)
        self.keyed = KeyedHash(load_or_create_key(settings.key_file))
        self.deid = Deidentifier(
            self.keyed,
            vocabulary=Vocabulary.load(settings.vocabulary_file) if settings.vocabulary_file else None,
            safe_private=SafePrivate.load(settings.safe_private_file) if settings.safe_private_file else None,
        )
        self.default_policy = Policy.load(settings.policy_file) if settings.policy_file else Policy.default()
        self._policies: dict[str, Policy] = {}
        self.region_rules = RegionRules.load(settings.burnin_rules_file)
        self.vault = IdentityVault(self.index, self.keyed, settings.vault_key_file)
        self._store_down_until = 0.0
        self._lock = threading.Lock()

    def close(self) -> None:
        self.index.close()

    # -- the ingest path ------------------------------------------------------------------------
    def ingest_file(
        self,
        partner: PartnerRef,
        path: Path,
        *,
        door: str = "dimse",
        expected_sop_class: str | None = None,
        expected_sop_instance: str | None = None,
    ) -> Outcome:
        """Ingest the instance in ``path`` (DICOM file format) sent by ``partner``."""
        t0 = time.perf_counter()
        metrics.RECEIVED.labels(partner.name, door).inc()
        outcome = self._ingest(partner, path, expected_sop_class, expected_sop_instance)
        if outcome.result.acknowledged:
            metrics.INGEST_SECONDS.observe(time.perf_counter() - t0)
            if outcome.result is Result.DUPLICATE:
                metrics.DUPLICATES.labels(partner.name).inc()
            else:
                metrics.STORED.labels(partner.name, outcome.result.value).inc()
        else:
            metrics.REJECTED.labels(partner.name, outcome.result.value).inc()
            event(
                log,
                "instance refused",
                logging.WARNING,
                partner=partner.name,
                result=outcome.result.value,
                reason=outcome.reason,
            )
        return outcome

    def _ingest(
        self,
        partner: PartnerRef,
        path: Path,
        expected_sop_class: str | None,
        expected_sop_instance: str | None,
    ) -> Outcome:
        try:
            inst = read_received(path)
        except MalformedInstance as e:
            return Outcome(Result.INVALID, str(e))
        ds = inst.ds
        try:
            sop_class = str(ds.get("SOPClassUID", "") or "").strip("\x00 ")
            sop_instance = str(ds.get("SOPInstanceUID", "") or "").strip("\x00 ")
        except Exception:
            return Outcome(Result.INVALID, "SOP Class or Instance UID cannot be decoded")
        if not sop_class or not sop_instance:
            return Outcome(Result.INVALID, "the dataset has no SOP Class UID or SOP Instance UID")
        if expected_sop_class is not None and sop_class != expected_sop_class.strip("\x00 "):
            return Outcome(Result.MISMATCH, "the dataset's SOP Class UID differs from the request's")
        if expected_sop_instance is not None and sop_instance != expected_sop_instance.strip("\x00 "):
            return Outcome(Result.MISMATCH, "the dataset's SOP Instance UID differs from the request's")

        new_uid = self.deid.new_uid(partner.scope, sop_instance)
        if self.index.instance_exists(new_uid):
            return Outcome(Result.DUPLICATE, "already stored", new_uid, sop_class)
        prepared = self.anonymize(partner, inst)
        if isinstance(prepared, Outcome):
            return prepared
        deid, inst, ds = prepared.deid, prepared.inst, prepared.inst.ds
        key = object_key_for(new_uid)
        tmp_out: Path | None = None
        try:
            try:
                payload, tmp_out = self._serialize(inst)
            except (MalformedInstance, ValueError, TypeError, OverflowError) as e:
                return Outcome(Result.INVALID, f"the de-identified dataset cannot be encoded ({type(e).__name__})")
            except OSError as e:
                return self._no_room(partner, e)
            location = self._put(key, payload)
            if location is None:
                return self._no_room(partner, None)
            attrs = index_attributes(ds)
            rec = InstanceRecord(
                partner_id=partner.id,
                patient_pseudonym=deid.patient_pseudonym,
                study_uid=str(ds.get("StudyInstanceUID", "") or self.deid.new_uid(partner.scope, "nostudy:" + sop_instance)),
                series_uid=str(ds.get("SeriesInstanceUID", "") or self.deid.new_uid(partner.scope, "noseries:" + sop_instance)),
                sop_uid=new_uid,
                sop_class_uid=sop_class,
                transfer_syntax=str(inst.transfer_syntax),
                object_key=key,
                sha256=payload.sha256,
                size_bytes=payload.size,
                location=location,
                quarantine=prepared.quarantine,
                **attrs,
            )
            try:
                added = self.index.add_instance(rec)
            except sa_exc.SQLAlchemyError as e:
                event(log, "index commit failed", logging.ERROR, partner=partner.name, error=type(e).__name__)
                self._discard(key, location)
                metrics.OUT_OF_RESOURCES.inc()
                return Outcome(Result.OUT_OF_RESOURCES, "the index could not be written")
            if not added:  # a concurrent send of the same instance won; ours wrote identical bytes
                return Outcome(Result.DUPLICATE, "already stored", new_uid, sop_class)
            if prepared.quarantine:
                metrics.QUARANTINED.labels(partner.name).inc()
                event(log, "instance quarantined", logging.WARNING, partner=partner.name, key=key, reason=prepared.quarantine)
            event(
                log,
                "instance stored",
                logging.DEBUG,
                partner=partner.name,
                key=key,
                location=location,
                size=payload.size,
            )
            result = Result.SPOOLED if location == LOCATION_SPOOL else Result.STORED
            return Outcome(result, "", new_uid, sop_class, prepared.quarantine)
        finally:
            if tmp_out is not None:
                tmp_out.unlink(missing_ok=True)

    # -- de-identification (shared with `imx anonymize`) ------------------------------------------
    def policy_for(self, partner: PartnerRef) -> Policy:
        if partner.policy_json:
            policy = self._policies.get(partner.policy_json)  # parsed once, not per instance
            if policy is not None:
                return policy
            try:
                policy = self._policies[partner.policy_json] = Policy.from_json(partner.policy_json)
                return policy
            except PolicyError as e:  # a broken stored policy must not weaken de-identification
                event(log, "partner policy unusable, default used", logging.ERROR, partner=partner.name, error=str(e))
        return self.default_policy

    def anonymize(self, partner: PartnerRef, inst: ReceivedInstance, policy: Policy | None = None) -> Anonymized | Outcome:
        """De-identify a parsed instance under the partner's policy, deciding first what its
        burned-in annotation risk means: quarantine (stored, held back), mask, or refuse."""
        policy = policy or self.policy_for(partner)
        ds = inst.ds
        sop_class = str(ds.get("SOPClassUID", "") or "").strip("\x00 ")
        risk = assess(ds)
        quarantine: str | None = None
        cleaned = False
        if risk is not BurnInRisk.NONE:
            why = "burned-in annotation declared" if risk is BurnInRisk.DECLARED else "burned-in annotation likely for this kind of object"
            if policy.burned_in is BurnedInAction.REJECT:
                return Outcome(Result.REFUSED, f"{why}: the partner's policy refuses such objects")
            if policy.burned_in is BurnedInAction.MASK:
                rule = self.region_rules.match(ds)
                if rule is None:
                    quarantine = f"{why}; no mask rule matches this device and image size"
                else:
                    try:
                        inst = self._masked(inst, rule.regions)
                    except BurnInError as e:
                        quarantine = f"{why}; masking failed: {e}"
                    else:
                        ds, cleaned = inst.ds, True
            else:
                quarantine = why
        try:
            deid = self.deid.deidentify(
                ds,
                partner.scope,
                policy,
                prefix=partner.prefix,
                identities=lambda kind, original, originals, candidates: self.vault.pseudonym(
                    partner.id, partner.scope, kind, original, originals, candidates
                ),
                pixels_cleaned=cleaned,
                burn_in=risk,
            )
        except DeidentificationError as e:
            return Outcome(Result.INVALID, str(e))
        return Anonymized(inst, deid, str(ds.SOPInstanceUID), sop_class, quarantine)

    def _masked(self, inst: ReceivedInstance, regions: tuple[Region, ...]) -> ReceivedInstance:
        """Read the whole object (pixels included), mask it, and return it as an inline instance."""
        try:
            full = dcmread(inst.source)
        except Exception as e:
            raise BurnInError(f"the object cannot be read whole ({type(e).__name__})") from e
        mask(full, regions)
        ts = UID(full.file_meta.TransferSyntaxUID)
        return ReceivedInstance(full, ts, inst.source, None, True)

    def mask_quarantined(self, sop_uid: str, regions: tuple[Region, ...] | None = None) -> str:
        """An operator masks a quarantined instance: with ``regions`` given, or those of the rule
        that matches its device. The masked object is stored under a new key, the index row is
        pointed at it and released in one transaction, then the old object is deleted; a crash
        in between leaves at most an orphan for ``imx check --repair``. Returns a message;
        raises ValueError with a reason when it cannot be done."""
        row = self.index.get_instance(sop_uid)
        if row is None or row.quarantine is None:
            raise ValueError("no quarantined instance has this SOP Instance UID")
        data = self.read_object(sop_uid)
        if data is None:
            raise ValueError("the stored object is missing; run imx check")
        ds = dcmread(io.BytesIO(data))
        if regions is None:
            rule = self.region_rules.match(ds)
            if rule is None:
                raise ValueError("no mask rule matches this device and image size; give --region")
            regions = rule.regions
        try:
            mask(ds, regions)
        except BurnInError as e:
            raise ValueError(f"masking failed: {e}") from None
        codes = ds.get("DeidentificationMethodCodeSequence") or []
        if not any(str(c.get("CodeValue", "")) == "113101" for c in codes):
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "113101", "DCM", "Clean Pixel Data Option"
            ds.DeidentificationMethodCodeSequence = Sequence([*codes, item])
        buf = io.BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        payload = Payload(data=buf.getvalue())
        key = make_key("i", hashlib.sha256(f"masked:{sop_uid}:{payload.sha256}".encode()).hexdigest())
        self.store.put(key, payload)
        old = self.index.replace_object(
            sop_uid, object_key=key, sha256=payload.sha256, size_bytes=payload.size, transfer_syntax=str(ds.file_meta.TransferSyntaxUID)
        )
        if old is None:
            self.store.delete(key)
            raise ValueError("the instance was released or changed meanwhile")
        self._discard(old, row.location)
        event(log, "quarantined instance masked and released", key=key)
        return f"masked {len(regions)} region(s) and released {sop_uid}"

    def _serialize(self, inst: ReceivedInstance) -> tuple[Payload, Path | None]:
        span = inst.pixel_span
        if span is None or span[1] - span[0] < IN_MEMORY_LIMIT:
            buf = io.BytesIO()
            write_instance(inst, buf)
            return Payload(data=buf.getvalue()), None
        tmp = self.settings.tmp_dir / f"{secrets.token_hex(12)}.out"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                write_instance(inst, f)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return Payload(path=tmp), tmp

    def _put(self, key: str, payload: Payload) -> str | None:
        """Store the object durably; LOCATION_STORE, LOCATION_SPOOL, or None if neither could."""
        if time.monotonic() >= self._store_down_until:
            try:
                self.store.put(key, payload)
                return LOCATION_STORE
            except StoreError as e:
                metrics.STORE_FAILURES.inc()
                with self._lock:
                    self._store_down_until = time.monotonic() + self.settings.spool_retry_seconds
                event(log, "object store unavailable, spooling", logging.WARNING, store=self.store.name, error=str(e))
        try:
            self.spool.put(key, payload)
            return LOCATION_SPOOL
        except OSError as e:
            event(log, "spool write failed", logging.ERROR, error=e.strerror or type(e).__name__)
            return None

    def _no_room(self, partner: PartnerRef, e: OSError | None) -> Outcome:
        metrics.OUT_OF_RESOURCES.inc()
        event(
            log,
            "out of resources: neither object store nor spool could take the instance",
            logging.ERROR,
            partner=partner.name,
            error=(e.strerror if e else None),
        )
        return Outcome(Result.OUT_OF_RESOURCES, "no storage space: the object store and the local spool both failed")

    def _discard(self, key: str, location: str) -> None:
        try:
            if location == LOCATION_SPOOL:
                self.spool.remove(key)
            else:
                self.store.delete(key)
        except (StoreError, OSError):
            pass

    # -- the spool drainer (run by one process: the supervisor) --------------------------------
    def drain_spool(self, batch: int = 200) -> int:
        """Move spooled objects to the store; returns how many moved. Stops at the first store
        failure (the caller retries later). Safe to interrupt at any point: a crash between the
        put and the index update only means the same put is repeated."""
        moved = 0
        for instance_id, key, sha in self.index.spooled(batch):
            payload = self.spool.payload(key)
            if payload is None:
                event(log, "spooled object missing", logging.ERROR, key=key)
                continue
            if payload.sha256 != sha:
                event(log, "spooled object damaged, kept for inspection", logging.ERROR, key=key)
                continue
            try:
                self.store.put(key, payload)
            except StoreError as e:
                event(log, "spool drain paused: object store unavailable", logging.INFO, error=str(e))
                break
            self.index.mark_stored(instance_id)
            self.spool.remove(key)
            metrics.SPOOL_DRAINED.inc()
            moved += 1
        if moved:
            event(log, "spool drained", moved=moved)
        return moved

    # -- reading ---------------------------------------------------------------------------------
    def open_stored(self, object_key: str, location: str) -> BinaryIO:
        """A stored object, opened: from the spool while it waits there, else from the object
        store (the drainer may move it in between, so a vanished spool file falls through to the
        store). Raises KeyError if it is in neither; StoreError if the store cannot be reached."""
        if location == LOCATION_SPOOL:
            try:
                return open(self.spool.path(object_key), "rb")
            except FileNotFoundError:
                pass
        return self.store.open(object_key)

    def read_object(self, sop_uid: str) -> bytes | None:
        inst = self.index.get_instance(sop_uid)
        if inst is None:
            return None
        with self.open_stored(inst.object_key, inst.location) as f:
            return f.read()
