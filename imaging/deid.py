"""De-identification on ingest: DICOM PS3.15 Annex E, Basic Application Level Confidentiality
Profile, applied from the table in ``imaging/data`` at every depth of nested sequences.

- Attributes listed in Table E.1-1 get their action (D, Z, X, K, U and the combined ones).
- Every UID that is not a well-known one (SOP classes, transfer syntaxes, coding schemes and the
  rest of the standard's registry) is replaced by a keyed-HMAC ``2.25.`` UID, consistently
  everywhere: the main dataset, Referenced* sequences and, when the file is written, the file meta.
- Patient ID and Patient Name become a stable pseudonym per (partner, original Patient ID);
  Accession Number a stable pseudonym per (partner, accession).
- Private attributes are removed. Patient Identity Removed and De-identification Method record
  what was done (PS3.15 E.1.1, PS3.3 C.7.1.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom import datadict
from pydicom._uid_dict import UID_dictionary
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

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

PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010
ACCESSION_NUMBER = 0x00080050
SPECIFIC_CHARACTER_SET = 0x00080005

_DUMMY_TEXT = "ANONYMIZED"
_DUMMY = {
    "AE": "ANONYMOUS",
    "AS": "000Y",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "DS": "0",
    "IS": "0",
    "PN": _DUMMY_TEXT,
}
_NUMERIC_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"}
_BYTES_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}

DEID_METHOD = "imaging-exchange: PS3.15 E.1-1 Basic Profile"
# PS3.16 CID 7050 De-identification Method
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")


class DeidentificationError(ValueError):
    """The dataset cannot be de-identified safely (the message carries no PHI)."""


@dataclass(frozen=True)
class Policy:
    """Which PS3.15 options apply on top of the Basic Profile (the de-identification issue adds
    them per partner; ingest uses the Basic Profile alone)."""

    options: frozenset[Option] = frozenset()


@dataclass
class DeidResult:
    patient_pseudonym: str
    accession_pseudonym: str | None
    removed: int = 0
    replaced_uids: int = 0
    notes: list[str] = field(default_factory=list)


def is_well_known_uid(value: str) -> bool:
    return value in UID_dictionary


class Deidentifier:
    def __init__(self, keyed: KeyedHash, profile: Profile | None = None, policy: Policy | None = None) -> None:
        self.keyed = keyed
        self.profile = profile or basic_profile()
        self.policy = policy or Policy()

    # -- replacements ---------------------------------------------------------------------------
    def new_uid(self, scope: str, original: str) -> str:
        original = str(original).strip("\x00 ")
        if not original or is_well_known_uid(original):
            return original
        return self.keyed.uid(scope, original)

    def patient_pseudonym(self, scope: str, patient_id: str, fallback: str) -> str:
        key = patient_id.strip() if patient_id and patient_id.strip() else "\x00noid\x00" + fallback
        return self.keyed.pseudonym("patient", scope, key, prefix="P", length=16)

    def accession_pseudonym(self, scope: str, accession: str) -> str:
        return self.keyed.pseudonym("accession", scope, accession.strip(), prefix="A", length=15)

    # -- the walk -------------------------------------------------------------------------------
    def deidentify(self, ds: Dataset, scope: str) -> DeidResult:
        """De-identify ``ds`` in place. ``scope`` names the sending partner."""
        if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
            raise DeidentificationError("the dataset has no SOP Class UID or SOP Instance UID")
        study_uid = str(ds.get("StudyInstanceUID", "") or "")
        patient_id = _text(ds, PATIENT_ID)
        accession = _text(ds, ACCESSION_NUMBER)
        result = DeidResult(
            patient_pseudonym=self.patient_pseudonym(scope, patient_id, study_uid),
            accession_pseudonym=self.accession_pseudonym(scope, accession) if accession.strip() else None,
        )
        self._walk(ds, scope, result, depth=0)

        ds.PatientID = result.patient_pseudonym
        ds.PatientName = result.patient_pseudonym
        if result.accession_pseudonym:
            ds.AccessionNumber = result.accession_pseudonym
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = DEID_METHOD
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
        ds.DeidentificationMethodCodeSequence = Sequence([code])
        return result

    def _walk(self, ds: Dataset, scope: str, result: DeidResult, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise DeidentificationError(f"sequences are nested deeper than {MAX_DEPTH} levels")
        options = self.policy.options
        for tag in list(ds.keys()):
            tag = BaseTag(tag)
            raw = ds.get_item(tag, keep_deferred=True)
            vr = _vr_of(raw, tag)
            if tag.is_private or tag.element == 0 or tag.group in (0x0000, 0x0002):
                del ds[tag]
                result.removed += 1
                continue
            action = self.profile.action(int(tag), options)
            try:
                if action is None:
                    if vr == "SQ":
                        self._walk_sequence(ds[tag], scope, result, depth)
                    elif vr == "UI" and int(tag) not in CLASS_UID_TAGS:
                        self._replace_uid(ds, tag, scope, result)
                    continue
                self._apply(ds, tag, vr, action, scope, result, depth)
            except DeidentificationError:
                raise
            except Exception as e:  # undecodable value: the message names the tag, never the value
                raise DeidentificationError(f"attribute {tag} cannot be decoded ({type(e).__name__})") from e

    def _walk_sequence(self, elem: DataElement, scope: str, result: DeidResult, depth: int) -> None:
        for item in elem.value or []:
            self._walk(item, scope, result, depth + 1)

    def _apply(self, ds: Dataset, tag: BaseTag, vr: str, action: str, scope: str, result: DeidResult, depth: int) -> None:
        if action == "K":
            if vr == "SQ":
                self._walk_sequence(ds[tag], scope, result, depth)
            return
        if action == "X":
            del ds[tag]
            result.removed += 1
            return
        if action == "U" or (action == "X/Z/U*" and vr in ("UI", "SQ")):
            if vr == "SQ":
                self._walk_sequence(ds[tag], scope, result, depth)
            elif vr == "UI":
                self._replace_uid(ds, tag, scope, result)
            else:
                _set_empty(ds, tag, vr)
            return
        if action in ("Z", "X/Z", "X/Z/D", "X/Z/U*"):
            _set_empty(ds, tag, vr)
            return
        if action in ("D", "Z/D", "X/D", "C"):
            if vr == "SQ":
                self._walk_sequence(ds[tag], scope, result, depth)
            elif vr == "UI":
                self._replace_uid(ds, tag, scope, result)
            else:
                _set_dummy(ds, tag, vr)
            return
        raise DeidentificationError(f"unsupported profile action {action}")

    def _replace_uid(self, ds: Dataset, tag: BaseTag, scope: str, result: DeidResult) -> None:
        elem = ds[tag]
        value = elem.value
        if value is None or value == "":
            return
        values = list(value) if elem.VM > 1 else [value]
        new = [self.new_uid(scope, str(v)) for v in values]
        result.replaced_uids += sum(1 for a, b in zip(values, new, strict=True) if str(a) != b)
        elem.value = new if elem.VM > 1 else new[0]


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
    return "" if v is None else str(v)


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
        value = _DUMMY.get(vr, _DUMMY_TEXT)
    ds[tag] = DataElement(Tag(tag), vr, value)
