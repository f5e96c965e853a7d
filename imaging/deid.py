"""De-identification: DICOM PS3.15 Annex E, the Basic Application Level Confidentiality Profile and
its options, applied from Table E.1-1 (``imaging/data``) at every depth of nested sequences.

Order of work for one dataset:

1. Text is decoded with the dataset's character set, mislabelling detected, and the dataset
   re-encoded as ISO_IR 192 (``imaging.charset``); a value that cannot be decoded is emptied.
2. Every attribute gets the action of the table under the partner's policy (``imaging.policy``).
   Combined actions are resolved so the object stays valid for its IOD without knowing the IOD:
   any action that allows D (Z/D, X/D, X/Z/D) writes a dummy of the right VR, which satisfies a
   Type 1, 2 or 3 attribute alike; X/Z empties (valid for Type 2 and 3, the only types the
   standard gives it); X/Z/U* remaps UIDs and references and empties anything else.
3. Sequences the table says to replace (D) or clean (C), such as Content Sequence or Graphic
   Annotation Sequence, are walked in a *mode*: inside them every free-text value is removed
   (dummy) or cleaned to a safe vocabulary, every person name replaced, every date shifted or
   replaced, every UID remapped; coded concepts (Code Value, Coding Scheme, Code Meaning) stay so
   an SR remains readable.
4. Safety nets beyond the table: a Person Name the table does not list is replaced; overlay
   planes (60xx groups) are removed whole, under Clean Graphics too, because a bitmap cannot be
   cleaned of text (Clean Graphics keeps vector graphics and cleans their text); with modified
   dates, a date the table does not list is shifted too; private attributes go unless
   allow-listed under Retain Safe Private.
5. Patient ID and Name become a stable, readable pseudonym per (partner, original Patient ID);
   Accession Number a pseudonym per (partner, accession); every UID that is not a well-known
   one becomes a keyed ``2.25.`` UID, consistently everywhere, file meta included.
6. Patient Identity Removed, De-identification Method (0012,0063), the method codes
   (0012,0064) and Longitudinal Temporal Information Modified (0028,0303) say what was done.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom import config, datadict
from pydicom._uid_dict import UID_dictionary
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from imaging.burnin import BurnInRisk, assess
from imaging.charset import normalize_charset
from imaging.descriptors import Vocabulary, default_vocabulary
from imaging.policy import Policy
from imaging.private import SafePrivate, default_safe_private
from imaging.profile import Option, Profile, basic_profile
from imaging.pseudonym import KeyedHash

MAX_DEPTH = 32

# UID attributes that name a class or syntax, not an instance: never remapped whatever their value.
_CLASS_UID_SUFFIXES = (
    "SOPClassUID",
    "TransferSyntaxUID",
    "TransferSyntaxUIDInFile",
    "ImplementationClassUID",
    "CodingSchemeUID",
    "ContextUID",
    "ContextGroupExtensionCreatorUID",
    "MappingResourceUID",
    "SOPClassUIDInFile",
    "PrivateRecordUID",
)
CLASS_UID_TAGS: frozenset[int] = frozenset(
    tag
    for tag, entry in datadict.DicomDictionary.items()
    if entry[0] == "UI" and entry[4].endswith(_CLASS_UID_SUFFIXES) and "Instance" not in entry[4]
)

# Coded-concept attributes (PS3.3 Table 8.8-1): kept as they are inside replaced/cleaned sequences.
CODE_TAGS: frozenset[int] = frozenset(
    {
        0x00080100,  # Code Value
        0x00080102,  # Coding Scheme Designator
        0x00080103,  # Coding Scheme Version
        0x00080104,  # Code Meaning
        0x00080105,  # Mapping Resource
        0x00080106,  # Context Group Version
        0x00080107,  # Context Group Local Version
        0x0008010B,  # Context Group Extension Flag
        0x0008010F,  # Context Identifier
        0x00080117,  # Context UID
        0x00080119,  # Long Code Value
        0x00080120,  # URN Code Value
        0x00080122,  # Mapping Resource Name
        0x0040A040,  # Value Type
        0x0040A010,  # Relationship Type
        0x0040A050,  # Continuity Of Content
    }
)

_FREE_TEXT = re.compile(r"(Description|Comments?|Remarks|Notes?|Reason|Text|Label|Message|Observations?|Findings|Impressions?)(Sequence)?$")


def _is_free_text(tag: int, vr: str) -> bool:
    """An attribute the table does not list but whose value is free text a person typed."""
    if vr in ("LT", "ST", "UT"):
        return True
    keyword = datadict.keyword_for_tag(tag)
    return bool(keyword) and vr in TEXT_VRS and bool(_FREE_TEXT.search(keyword))


_META_VERSION = BaseTag(0x00020001)
_META_TS = BaseTag(0x00020010)
TIMEZONE_OFFSET = 0x00080201
PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010
ACCESSION_NUMBER = 0x00080050
STUDY_UID = 0x0020000D

TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC"})
DATE_VRS = frozenset({"DA", "DT", "TM"})
_NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})
_BYTES_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
DUMMY_TEXT = "ANONYMIZED"
_DUMMY = {
    "AE": "ANONYMOUS",
    "AS": "000Y",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "DS": "0",
    "IS": "0",
    "PN": DUMMY_TEXT,
    "UR": "",
}

# Modes for the inside of a sequence the table says to replace or clean.
MODE_DUMMY = "dummy"
MODE_CLEAN = "clean"

DEID_METHOD_BASIC = "PS3.15 E.1-1 Basic Profile"

# Identity allocator: (kind, original, originals, candidates) -> pseudonym. The service passes the
# index-backed vault (unique pseudonyms, re-identification); without one, candidate 0 is used.
Allocator = Callable[[str, str, dict[str, str], Callable[[int], str]], str]


class DeidentificationError(ValueError):
    """The dataset cannot be de-identified safely (the message carries no PHI)."""


@dataclass
class DeidResult:
    patient_pseudonym: str
    accession_pseudonym: str | None
    date_offset: dt.timedelta
    study_uid: str = ""
    burn_in: str = BurnInRisk.NONE.value
    removed: int = 0
    replaced_uids: int = 0
    charset_fallbacks: int = 0
    undecodable: int = 0
    notes: list[str] = field(default_factory=list)


def is_well_known_uid(value: str) -> bool:
    return value in UID_dictionary


def partner_prefix(name: str) -> str:
    """The readable prefix of a partner's pseudonyms: up to four letters or digits of its name."""
    letters = re.sub(r"[^A-Z0-9]", "", name.upper())
    return letters[:4] or "P"


@dataclass
class _Ctx:
    scope: str
    policy: Policy
    options: tuple[Option, ...]
    offset: dt.timedelta
    result: DeidResult
    actions: dict[int, str | None]


class Deidentifier:
    def __init__(
        self,
        keyed: KeyedHash,
        profile: Profile | None = None,
        *,
        vocabulary: Vocabulary | None = None,
        safe_private: SafePrivate | None = None,
    ) -> None:
        self.keyed = keyed
        self.profile = profile or basic_profile()
        self.vocabulary = vocabulary or default_vocabulary()
        self.safe_private = safe_private or default_safe_private()
        self._action_cache: dict[tuple[Option, ...], dict[int, str | None]] = {}
        self._uid_cache: dict[tuple[str, str], str] = {}

    # -- replacements ---------------------------------------------------------------------------
    def new_uid(self, scope: str, original: str) -> str:
        original = str(original).strip("\x00 ")
        if not original or is_well_known_uid(original):
            return original
        key = (scope, original)
        uid = self._uid_cache.get(key)
        if uid is None:
            if len(self._uid_cache) > 65536:
                self._uid_cache.clear()
            uid = self._uid_cache[key] = self.keyed.uid(scope, original)
        return uid

    def patient_key(self, patient_id: str, study_uid: str) -> str:
        """What identifies the patient within a partner: the Patient ID, or, without one, the
        study (an unidentified patient is never linked to another study)."""
        pid = patient_id.strip()
        return pid if pid else "\x00noid\x00" + study_uid.strip("\x00 ")

    def pseudonym_candidate(self, kind: str, scope: str, original: str, prefix: str, attempt: int) -> str:
        """Readable candidates: ``OSH-7F3A2C`` for a patient, ``OSH-A-7F3A2C1D`` for an
        accession (at most 16 characters, SH). Later attempts, used only on a collision, are
        drawn from the same keyed hash with the attempt number mixed in."""
        digest = self.keyed.digest("pseudonym:" + kind, scope, original, str(attempt)).hex().upper()
        if kind == "accession":
            return f"{prefix}-A-{digest[:8]}"
        return f"{prefix}-{digest[: 6 if attempt < 8 else 10]}"

    def date_offset(self, scope: str, patient_key: str) -> dt.timedelta:
        """The per-patient shift for Retain Longitudinal Temporal Information with Modified
        Dates: between one and ten years back, plus a time-of-day shift that is never zero."""
        h = int.from_bytes(self.keyed.digest("date-shift", scope, patient_key)[:8], "big")
        days = 366 + h % 3287
        seconds = 1 + (h >> 32) % 86399
        return dt.timedelta(days=-days, seconds=seconds)

    # -- the walk -------------------------------------------------------------------------------
    def deidentify(
        self,
        ds: Dataset,
        scope: str,
        policy: Policy | None = None,
        *,
        prefix: str = "P",
        identities: Allocator | None = None,
        pixels_cleaned: bool = False,
        burn_in: BurnInRisk | None = None,
    ) -> DeidResult:
        """De-identify ``ds`` in place (its file meta too). ``scope`` names the sending partner;
        ``prefix`` starts its pseudonyms; ``identities`` allocates them (and keeps the originals
        for re-identification) when the service has an index."""
        policy = policy or Policy.default()
        if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
            raise DeidentificationError("the dataset has no SOP Class UID or SOP Instance UID")
        try:
            report = normalize_charset(ds)
        except Exception as e:
            raise DeidentificationError(f"the text of the dataset cannot be decoded ({type(e).__name__})") from e

        study_uid = _text(ds, STUDY_UID).strip("\x00 ")
        patient_id = _text(ds, PATIENT_ID)
        patient_name = _text(ds, PATIENT_NAME)
        accession = _text(ds, ACCESSION_NUMBER).strip()
        pkey = self.patient_key(patient_id, study_uid)
        originals = {"patient_id": patient_id.strip(), "patient_name": patient_name.strip()}
        allocate = identities or (lambda kind, original, originals, candidates: candidates(0))
        patient_pseudonym = allocate(
            "patient", pkey, originals, lambda n: self.pseudonym_candidate("patient", scope, pkey, prefix, n)
        )
        accession_pseudonym = None
        if accession:
            accession_pseudonym = allocate(
                "accession",
                accession,
                {"accession": accession},
                lambda n: self.pseudonym_candidate("accession", scope, accession, prefix, n),
            )
        offset = self.date_offset(scope, pkey) if policy.shifts_dates else dt.timedelta(0)
        result = DeidResult(patient_pseudonym, accession_pseudonym, offset)
        result.burn_in = (burn_in if burn_in is not None else assess(ds)).value  # the caller may know it
        result.charset_fallbacks = report.fallbacks
        result.undecodable = len(report.undecodable)

        options = policy.ordered_options
        actions = self._action_cache.setdefault(options, {})
        ctx = _Ctx(scope, policy, options, offset, result, actions)
        self._walk(ds, ctx, None, 0)

        new_study = str(ds.get("StudyInstanceUID", "") or "")
        if study_uid and new_study:
            allocate("study", study_uid, {"study_uid": study_uid}, lambda n: new_study)
        result.study_uid = new_study
        ds.PatientID = patient_pseudonym
        ds.PatientName = patient_pseudonym
        if accession_pseudonym:
            ds.AccessionNumber = accession_pseudonym
        self._record(ds, policy, pixels_cleaned)
        if getattr(ds, "file_meta", None) is not None:
            self._file_meta(ds)
        return result

    def _record(self, ds: Dataset, policy: Policy, pixels_cleaned: bool) -> None:
        """(0012,0062-0064) and (0028,0303). Values are our own constants, known valid, so the
        elements are made without pydicom's per-value validation (a quarter of the engine's time
        otherwise)."""
        codes = policy.method_codes(pixels_cleaned=pixels_cleaned)
        methods = [DEID_METHOD_BASIC + f" ({self.profile.edition})"] + [meaning[:64] for _, meaning in codes[1:]]
        items = []
        for value, meaning in codes:
            item = Dataset()
            _put(item, 0x00080100, "SH", value)
            _put(item, 0x00080102, "SH", "DCM")
            _put(item, 0x00080104, "LO", meaning)
            items.append(item)
        if policy.shifts_dates:
            longitudinal = "MODIFIED"
        elif policy.has(Option.RETAIN_LONG_FULL_DATES):
            longitudinal = "UNMODIFIED"
        else:
            longitudinal = "REMOVED"
        _put(ds, 0x00120062, "CS", "YES")
        _put(ds, 0x00120063, "LO", methods)
        _put(ds, 0x00120064, "SQ", Sequence(items))
        _put(ds, 0x00280303, "CS", longitudinal)

    def _file_meta(self, ds: Dataset) -> None:
        """Only the version and the transfer syntax survive from the sender's file meta (its AE
        titles and implementation names go); the SOP class and new instance UID are set."""
        meta = ds.file_meta
        d = meta._dict
        keep = {t: d[t] for t in (_META_VERSION, _META_TS) if t in d}
        d.clear()
        d.update(keep)
        _put(meta, 0x00020002, "UI", ds.SOPClassUID)
        _put(meta, 0x00020003, "UI", ds.SOPInstanceUID)
        if _META_TS not in d:  # a dataset read without file meta: say how it was encoded
            implicit, little = getattr(ds, "original_encoding", (None, None))
            if little is not None:
                ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
                _put(meta, 0x00020010, "UI", ts)

    def _action(self, tag: int, ctx: _Ctx) -> str | None:
        try:
            return ctx.actions[tag]
        except KeyError:
            a = ctx.actions[tag] = self.profile.action(tag, ctx.options)
            return a

    def _walk(self, ds: Dataset, ctx: _Ctx, mode: str | None, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise DeidentificationError(f"sequences are nested deeper than {MAX_DEPTH} levels")
        result = ctx.result
        private_kept: set[tuple[int, int]] = set()
        creators: dict[tuple[int, int], BaseTag] = {}
        done: set[int] = set()
        for tag in list(ds.keys()):
            if tag in done:
                continue
            tag = BaseTag(tag)
            group = tag >> 16
            if group & 1:
                if (tag & 0xFFFF) < 0x0100 and (tag & 0xFFFF) >= 0x0010:
                    creators[(group, tag & 0xFFFF)] = tag  # decided once the block is seen
                elif not self._keep_private(ds, tag, ctx):
                    del ds[tag]
                    result.removed += 1
                else:
                    private_kept.add((group, (tag & 0xFF00) >> 8))
                continue
            if group in (0x0000, 0x0002) or (tag & 0xFFFF) == 0 or (0x6000 <= group <= 0x601E and not group & 1):
                del ds[tag]  # overlay planes go whole: a bitmap cannot be cleaned of burned-in text
                result.removed += 1
                continue
            raw = ds.get_item(tag, keep_deferred=True)
            vr = _vr_of(raw, tag)
            try:
                action = self._action(tag, ctx)
                if action is None:
                    self._unlisted(ds, tag, vr, ctx, mode, depth, done)
                else:
                    self._apply(ds, tag, vr, action, ctx, mode, depth, done)
            except DeidentificationError:
                raise
            except Exception as e:  # an undecodable value: the message names the tag, never the value
                raise DeidentificationError(f"attribute {tag} cannot be processed ({type(e).__name__})") from e
        for (group, block), tag in creators.items():
            if (group, block) not in private_kept:
                del ds[tag]
                result.removed += 1

    def _keep_private(self, ds: Dataset, tag: BaseTag, ctx: _Ctx) -> bool:
        if not ctx.policy.has(Option.RETAIN_SAFE_PRIVATE):
            return False
        group, element = tag >> 16, tag & 0xFFFF
        creator_tag = (group << 16) | (element >> 8)
        if creator_tag not in ds:
            return False
        try:
            creator = str(ds[creator_tag].value or "").strip()
        except Exception:
            return False
        return self.safe_private.allows(creator, group, element & 0xFF)

    def _unlisted(self, ds: Dataset, tag: BaseTag, vr: str, ctx: _Ctx, mode: str | None, depth: int, done: set[int]) -> None:
        """An attribute Table E.1-1 does not list: kept, except for the safety nets."""
        if int(tag) in CODE_TAGS:
            return
        if vr == "SQ":
            self._walk_sequence(ds[tag], ctx, mode, depth)
        elif vr == "UI":
            if int(tag) not in CLASS_UID_TAGS:
                self._replace_uid(ds, tag, ctx)
        elif vr == "PN":
            _set_dummy(ds, tag, vr)
        elif mode is not None and vr in TEXT_VRS:
            self._clean_text(ds, tag, vr) if mode == MODE_CLEAN else _set_dummy(ds, tag, vr)
        elif vr in TEXT_VRS and _is_free_text(int(tag), vr):
            self._clean_text(ds, tag, vr)
        elif vr in DATE_VRS and (mode is not None or ctx.policy.shifts_dates):
            if ctx.policy.shifts_dates:
                self._shift(ds, tag, vr, ctx, done)
            else:
                _set_dummy(ds, tag, vr)

    def _walk_sequence(self, elem: DataElement, ctx: _Ctx, mode: str | None, depth: int) -> None:
        for item in elem.value or []:
            self._walk(item, ctx, mode, depth + 1)

    def _apply(
        self, ds: Dataset, tag: BaseTag, vr: str, action: str, ctx: _Ctx, mode: str | None, depth: int, done: set[int]
    ) -> None:
        result = ctx.result
        if action == "K":
            if vr == "SQ":
                self._walk_sequence(ds[tag], ctx, mode, depth)
            elif vr == "UI" and int(tag) not in CLASS_UID_TAGS:
                self._replace_uid(ds, tag, ctx)
            return
        if action == "X":
            del ds[tag]
            result.removed += 1
            return
        if action == "C":
            self._clean(ds, tag, vr, ctx, mode, depth, done)
            return
        if action == "U" or action == "X/Z/U*":
            if vr == "SQ":
                self._walk_sequence(ds[tag], ctx, mode, depth)
            elif vr == "UI":
                self._replace_uid(ds, tag, ctx)
            else:
                _set_empty(ds, tag, vr)
            return
        if action == "X/Z" and vr == "SQ":  # an empty Type 3 sequence is invalid; removing is allowed
            del ds[tag]
            result.removed += 1
            return
        if action in ("Z", "X/Z"):
            _set_empty(ds, tag, vr)
            return
        if action in ("D", "Z/D", "X/D", "X/Z/D"):
            if vr == "SQ":
                self._walk_sequence(ds[tag], ctx, MODE_DUMMY, depth)
            elif vr == "UI":
                self._replace_uid(ds, tag, ctx)
            else:
                _set_dummy(ds, tag, vr)
            return
        raise DeidentificationError(f"unsupported profile action {action}")

    def _clean(self, ds: Dataset, tag: BaseTag, vr: str, ctx: _Ctx, mode: str | None, depth: int, done: set[int]) -> None:
        """Action C: keep what is safe. Dates are shifted (Modified Dates); text is reduced to the
        safe vocabulary; names are replaced; sequences are walked in clean mode; bulk data such as
        an overlay bitmap or curve is kept (Clean Graphics keeps graphics, cleans their text)."""
        if vr == "SQ":
            self._walk_sequence(ds[tag], ctx, MODE_CLEAN if mode != MODE_DUMMY else mode, depth)
        elif tag == TIMEZONE_OFFSET:  # an SH that is really a time value: kept when well formed
            value = str(ds[tag].value or "").strip()
            if not re.fullmatch(r"[+-]\d{4}", value):
                del ds[tag]
        elif vr in DATE_VRS:
            if ctx.policy.shifts_dates:
                self._shift(ds, tag, vr, ctx, done)
            elif not ctx.policy.has(Option.RETAIN_LONG_FULL_DATES):
                _set_dummy(ds, tag, vr)
        elif vr == "UI":
            self._replace_uid(ds, tag, ctx)
        elif vr == "PN":
            _set_dummy(ds, tag, vr)
        elif vr in TEXT_VRS:
            self._clean_text(ds, tag, vr)

    def _clean_text(self, ds: Dataset, tag: BaseTag, vr: str) -> None:
        elem = ds[tag]
        value = elem.value
        if value is None or value == "":
            return
        # When nothing safe is left, a neutral placeholder keeps a Type 1 attribute (an SR TEXT
        # item's Text Value, a Scheduled Procedure Step ID) present and valid.
        if isinstance(value, (list, MultiValue)):
            cleaned = [self.vocabulary.clean(str(v)) for v in value]
            elem.value = [c for c in cleaned if c] or DUMMY_TEXT
        else:
            elem.value = self.vocabulary.clean(str(value)) or DUMMY_TEXT

    def _shift(self, ds: Dataset, tag: BaseTag, vr: str, ctx: _Ctx, done: set[int]) -> None:
        elem = ds[tag]
        offset = ctx.offset
        if vr == "DA":
            partner = _time_partner(tag)
            if (
                partner is not None
                and partner in ds
                and partner not in done
                and self._action(partner, ctx) in (None, "C")
            ):
                done.add(partner)
                telem = ds[partner]
                d_vals, t_vals = _values(elem.value), _values(telem.value)
                if len(d_vals) == 1 and len(t_vals) == 1 and d_vals[0] and t_vals[0]:
                    nd, nt = shift_date_time(d_vals[0], t_vals[0], offset)
                    elem.value, telem.value = nd, nt
                    return
                telem.value = _map_values(telem.value, lambda v: shift_tm(v, offset))
            elem.value = _map_values(elem.value, lambda v: shift_da(v, offset))
        elif vr == "DT":
            elem.value = _map_values(elem.value, lambda v: shift_dt(v, offset))
        else:
            elem.value = _map_values(elem.value, lambda v: shift_tm(v, offset))

    def _replace_uid(self, ds: Dataset, tag: BaseTag, ctx: _Ctx) -> None:
        elem = ds[tag]
        value = elem.value
        if value is None or value == "":
            return
        values = list(value) if elem.VM > 1 else [value]
        new = [self.new_uid(ctx.scope, str(v)) for v in values]
        ctx.result.replaced_uids += sum(1 for a, b in zip(values, new, strict=True) if str(a) != b)
        elem.value = new if elem.VM > 1 else new[0]


# -- dates and times (PS3.5 Table 6.2-1) ---------------------------------------------------------
_DA = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")
_TM = re.compile(r"(\d{2}):?(?:(\d{2}):?(?:(\d{2})(\.\d{1,6})?)?)?")
_DT = re.compile(r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?")


class _Unparseable(ValueError):
    pass


def shift_da(value: str, offset: dt.timedelta) -> str:
    m = _DA.fullmatch(value.strip())
    if not m:
        raise _Unparseable
    d = dt.date(int(m[1]), int(m[2]), int(m[3])) + dt.timedelta(days=offset.days)
    return d.strftime("%Y%m%d")


def shift_tm(value: str, offset: dt.timedelta) -> str:
    m = _TM.fullmatch(value.strip())
    if not m:
        raise _Unparseable
    h, mi, s = int(m[1]), int(m[2] or 0), int(m[3] or 0)
    total = (h * 3600 + mi * 60 + min(s, 59) + offset.seconds) % 86400
    out = f"{total // 3600:02d}"
    if m[2] is not None:
        out += f"{total // 60 % 60:02d}"
        if m[3] is not None:
            out += f"{total % 60:02d}" + (m[4] or "")
    return out


def shift_date_time(date: str, time: str, offset: dt.timedelta) -> tuple[str, str]:
    """A date and its time attribute (Study Date and Study Time, ...) shifted together."""
    md, mt = _DA.fullmatch(date.strip()), _TM.fullmatch(time.strip())
    if not md or not mt:
        return shift_da(date, offset) if md else "", shift_tm(time, offset) if mt else ""
    when = dt.datetime(int(md[1]), int(md[2]), int(md[3]), int(mt[1]), int(mt[2] or 0), min(int(mt[3] or 0), 59))
    when += offset
    t = f"{when.hour:02d}"
    if mt[2] is not None:
        t += f"{when.minute:02d}"
        if mt[3] is not None:
            t += f"{when.second:02d}" + (mt[4] or "")
    return when.strftime("%Y%m%d"), t


def shift_dt(value: str, offset: dt.timedelta) -> str:
    m = _DT.fullmatch(value.strip())
    if not m:
        raise _Unparseable
    parts = [m[i] for i in range(1, 7)]
    present = sum(1 for p in parts if p is not None)
    y, mo, d, h, mi, s = (int(p) if p is not None else (1 if i in (1, 2) else 0) for i, p in enumerate(parts))
    when = dt.datetime(y, mo, d, h, mi, min(s, 59)) + offset
    full = when.strftime("%Y%m%d%H%M%S")
    widths = [4, 6, 8, 10, 12, 14]
    out = full[: widths[present - 1]]
    if present == 6 and m[7]:
        out += m[7]
    return out + (m[8] or "")


def _values(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, MultiValue)):
        return [str(v) for v in value]
    return [str(value)]


def _map_values(value: object, fn: Callable[[str], str]) -> object:
    """Apply ``fn`` to each value; a value that is not a valid date or time is treated as PHI
    and dropped rather than kept."""
    out: list[str] = []
    for v in _values(value):
        try:
            out.append(fn(v))
        except (_Unparseable, ValueError, OverflowError):
            continue
    if not out:
        return None
    return out if len(out) > 1 else out[0]


_TIME_PARTNERS: dict[int, int | None] = {}


def _time_partner(tag: int) -> int | None:
    """The TM attribute that goes with a DA one: Study Date -> Study Time, and so on."""
    try:
        return _TIME_PARTNERS[tag]
    except KeyError:
        pass
    partner = None
    keyword = datadict.keyword_for_tag(tag)
    if keyword.endswith("Date"):
        t = datadict.tag_for_keyword(keyword[:-4] + "Time")
        if t is not None and datadict.dictionary_VR(t) == "TM":
            partner = t
    _TIME_PARTNERS[tag] = partner
    return partner


# -- element helpers ---------------------------------------------------------------------------
def _vr_of(raw: DataElement | RawDataElement, tag: BaseTag) -> str:
    vr = raw.VR
    if vr in (None, "UN") or (isinstance(vr, str) and " or " in vr):
        try:
            return datadict.dictionary_VR(tag)
        except KeyError:
            return vr or "UN"
    return vr


def _text(ds: Dataset, tag: int) -> str:
    if tag not in ds:
        return ""
    try:
        v = ds[tag].value
    except Exception:
        return ""
    if v is None:
        return ""
    if isinstance(v, (list, MultiValue)):
        return "\\".join(str(x) for x in v)
    return str(v)


def _put(ds: Dataset, tag: int, vr: str, value: object) -> None:
    ds._dict[BaseTag(tag)] = DataElement(BaseTag(tag), vr, value, validation_mode=config.IGNORE)


def _set_empty(ds: Dataset, tag: BaseTag, vr: str) -> None:
    if vr == "SQ":
        ds[tag] = DataElement(Tag(tag), "SQ", Sequence())
    else:
        ds[tag] = DataElement(Tag(tag), vr, None)


def _set_dummy(ds: Dataset, tag: BaseTag, vr: str) -> None:
    if vr in _NUMERIC_VRS:
        value: object = 0
    elif vr in _BYTES_VRS:
        value = b""
    else:
        value = _DUMMY.get(vr, DUMMY_TEXT)
    if vr in ("OB or OW", "US or SS", "US or OW", "US or SS or OW"):
        vr = {"OB or OW": "OB", "US or SS": "US", "US or OW": "US", "US or SS or OW": "US"}[vr]
    ds[tag] = DataElement(Tag(tag), vr, value)
