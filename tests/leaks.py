"""Checkers for de-identified output: does any planted PHI survive in the bytes of a written file,
does any original UID survive, and are UID relationships kept across a set of outputs.

A value can survive in forms its plain UTF-8 bytes do not show: in the character set it came in
(an engine that copies a raw value over), re-encoded after having been decoded with the wrong
character set (CP1251 bytes labelled ISO_IR 100 come out as Latin-1 mojibake once transcoded to
UTF-8), as UTF-16, upper-cased, as one component of a person name, or, for a date, written in
another style. ``needles`` spells each planted string in all of those forms.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pydicom._uid_dict import UID_dictionary
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

# The byte forms a planted string is searched in.
ENCODINGS = ("utf-8", "cp1251", "iso8859_5", "gb18030", "utf-16-le", "utf-16-be")
# A value encoded in SOURCE and decoded as WRONG, then written as UTF-8 (or as the wrong charset
# again, which gives the SOURCE bytes back and is covered above).
MISDECODE_SOURCES = ("cp1251", "iso8859_5", "gb18030", "utf-8")
MISDECODE_AS = ("latin-1", "cp1252")
# Shorter byte strings match by chance in pixel data and in new 2.25 UIDs; planted values are
# chosen longer than this, so only short *components* of them are left out.
MIN_NEEDLE_BYTES = 4

_DATE_PATTERNS = (
    re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?!\d)"),  # 19870613 (DA), also the head of a DT
    re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?=\d{2,})"),  # 19870613101500 (DT)
    re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)"),  # 1987-06-13
    re.compile(r"(?<!\d)(\d{2})\.(\d{2})\.(\d{4})(?!\d)"),  # 13.06.1987 (day first)
    re.compile(r"(?<!\d)(\d{2})/(\d{2})/(\d{4})(?!\d)"),  # 13/06/1987
)


def date_variants(day: dt.date) -> set[str]:
    """The ways a date is commonly written in DICOM values and in free text."""
    y, m, d = f"{day.year:04d}", f"{day.month:02d}", f"{day.day:02d}"
    return {
        y + m + d,
        f"{y}-{m}-{d}",
        f"{y}.{m}.{d}",
        f"{y}/{m}/{d}",
        f"{d}.{m}.{y}",
        f"{d}/{m}/{y}",
        f"{d}-{m}-{y}",
        f"{m}/{d}/{y}",
    }


def dates_in(text: str) -> set[dt.date]:
    """Calendar dates written inside ``text`` in any of the styles of ``date_variants``."""
    found: set[dt.date] = set()
    for i, pattern in enumerate(_DATE_PATTERNS):
        for m in pattern.finditer(text):
            a, b, c = m.groups()
            y, mo, d = (int(c), int(b), int(a)) if i >= 3 else (int(a), int(b), int(c))
            try:
                day = dt.date(y, mo, d)
            except ValueError:
                continue
            if 1850 <= day.year <= 2100:
                found.add(day)
    return found


def components(value: str) -> set[str]:
    """A person name's component groups and components ('A^B=C^D' gives 'A^B', 'C^D', 'A', 'B',
    'C', 'D'); the value itself for anything else."""
    out = {value}
    for group in value.split("="):
        out.add(group)
        out.update(group.split("^"))
    return {c.strip() for c in out if c.strip()}


@dataclass(frozen=True)
class Needle:
    origin: str  # the planted string
    text: str  # the spelling searched for (the value, a component, a date style)
    form: str  # how it is spelled here, for messages
    data: bytes


def _spellings(text: str) -> Iterator[tuple[str, bytes]]:
    for enc in ENCODINGS:
        try:
            yield enc, text.encode(enc)
        except UnicodeEncodeError:
            continue
    for src in MISDECODE_SOURCES:
        try:
            raw = text.encode(src)
        except UnicodeEncodeError:
            continue
        for wrong in MISDECODE_AS:
            garbled = raw.decode(wrong, errors="replace")
            if garbled != text:
                yield f"{src} read as {wrong}, then UTF-8", garbled.encode("utf-8")


def needles(planted: Iterable[str]) -> list[Needle]:
    """Every byte string whose presence in an output betrays one of ``planted``."""
    out: dict[bytes, Needle] = {}
    for origin in planted:
        texts: dict[str, str] = {}
        for part in components(origin):
            label = "value" if part == origin else f"component {part!r}"
            texts.setdefault(part, label)
            if part.upper() != part:
                texts.setdefault(part.upper(), f"{label} upper-cased")
        for day in dates_in(origin):
            for v in date_variants(day):
                texts.setdefault(v, f"date {day.isoformat()} written {v!r}")
        for text, label in texts.items():
            for enc, data in _spellings(text):
                if len(data) >= MIN_NEEDLE_BYTES and data not in out:
                    out[data] = Needle(origin, text, f"{label} as {enc}", data)
    return list(out.values())


def find_leaks(
    data: bytes,
    planted: Iterable[str],
    *,
    ignore_bytes: bytes = b"",
    ignore_texts: Iterable[str] = (),
) -> list[str]:
    """Each planted string found in ``data``, in any of its spellings, one line per hit.

    ``ignore_bytes``: content the output may rightly hold (what the input has besides its PHI);
    a spelling found there proves nothing and is skipped. ``ignore_texts``: spellings that are
    rightly in the output, such as the shifted value of another planted date."""
    hits = []
    skip = set(ignore_texts)
    for n in needles(planted):
        if n.text in skip or (ignore_bytes and n.data in ignore_bytes):
            continue
        pos = data.find(n.data)
        if pos >= 0:
            hits.append(f"{n.origin!r}: {n.form} at byte {pos}")
    return sorted(hits)


def find_byte_leaks(data: bytes, blobs: Iterable[bytes]) -> list[str]:
    """Planted binary values (an overlay bitmap that draws a name) found verbatim in ``data``."""
    return [
        f"{len(b)}-byte blob starting {b[:8].hex()} at byte {data.find(b)}"
        for b in blobs
        if b and b in data
    ]


def missing_plants(data: bytes, planted: Iterable[str]) -> list[str]:
    """Planted strings that ``data`` does NOT hold, whole, in any of the ENCODINGS: used on the
    original fixtures, to prove that each plant is really there for the checker to find."""
    missing = []
    for value in planted:
        forms = [value.encode(e) for e in ENCODINGS if _encodable(value, e)]
        if not any(f in data for f in forms):
            missing.append(value)
    return sorted(missing)


def _encodable(value: str, encoding: str) -> bool:
    try:
        value.encode(encoding)
        return True
    except UnicodeEncodeError:
        return False


# -- UIDs ---------------------------------------------------------------------------------------
# UID attributes that name a class, a syntax or a coding scheme rather than an instance: their
# values are kept whatever they are (a vendor's private SOP class is no PHI).
CLASS_LIKE_KEYWORDS = (
    "ClassUID",
    "TransferSyntaxUID",
    "TransferSyntaxUIDInFile",
    "CodingSchemeUID",
    "ContextUID",
    "MappingResourceUID",
    "ContextGroupExtensionCreatorUID",
    "ImplementationClassUID",
    "PrivateRecordUID",
)

# Where a value sits: ((sequence tag, item index), ..., (tag, value index)). The file meta is
# addressed as item 0 of a pseudo sequence (0002,0000).
Path = tuple[tuple[int, int], ...]


def _uid_values(value: object) -> list[str]:
    if value is None or value == "":
        return []
    values = (
        list(value)
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"
        else [value]
    )
    return [str(v).strip("\x00 ") for v in values if str(v).strip("\x00 ")]


def uid_elements(ds: Dataset, *, file_meta: bool = True) -> list[tuple[Path, str, str]]:
    """(path, keyword, value) of every UI value at every depth, file meta included."""
    out: list[tuple[Path, str, str]] = []

    def walk(d: Dataset, prefix: Path) -> None:
        for elem in d:
            tag = int(elem.tag)
            if elem.VR == "SQ":
                for i, item in enumerate(elem.value or []):
                    walk(item, (*prefix, (tag, i)))
            elif elem.VR == "UI":
                for k, v in enumerate(_uid_values(elem.value)):
                    out.append(((*prefix, (tag, k)), elem.keyword, v))

    meta = getattr(ds, "file_meta", None)
    if file_meta and meta is not None:
        walk(meta, ((0x00020000, 0),))
    walk(ds, ())
    return out


# File meta attributes uid_mapping leaves alone: the writer's identity (a new writer rightly sets
# its own), and the Media Storage SOP Class and Instance UIDs, which must be set from the dataset
# (a sender's file meta may disagree with its dataset: rtdose.dcm); check those directly.
WRITER_KEYWORDS = (
    "ImplementationClassUID",
    "MediaStorageSOPClassUID",
    "MediaStorageSOPInstanceUID",
)


def is_class_like(keyword: str) -> bool:
    return keyword.endswith(CLASS_LIKE_KEYWORDS) and "Instance" not in keyword


def is_well_known(uid: str) -> bool:
    return uid in UID_dictionary


def original_uids(ds: Dataset) -> set[str]:
    """Every UI value at every depth (and in the file meta)."""
    return {v for _, _, v in uid_elements(ds)}


def instance_uids(ds: Dataset) -> set[str]:
    """The UIDs de-identification must replace: every UI value that is neither well known nor the
    value of a class, syntax or coding scheme attribute."""
    return {v for _, kw, v in uid_elements(ds) if not is_well_known(v) and not is_class_like(kw)}


# A UID shorter than this ('0', '1.2.3') matches numbers by chance; uid_mapping still checks it
# was replaced at its own place.
MIN_UID_SEARCH = 8


def find_uid_leaks(data: bytes, uids: Iterable[str]) -> list[str]:
    """Original UIDs found in ``data``. A UID is matched as a whole value: not preceded or
    followed by a byte that could continue it (so '1.2.3' does not match inside '1.2.34')."""
    hits = []
    for uid in uids:
        if len(uid) < MIN_UID_SEARCH:
            continue
        raw = uid.encode("ascii", "replace")
        for m in re.finditer(re.escape(raw) + rb"(?![0-9.])", data):
            start = m.start()
            if start == 0 or data[start - 1 : start] not in b"0123456789.":
                hits.append(f"{uid} at byte {start}")
                break
    return sorted(hits)


# -- UID relationships across a set of (input, output) pairs ------------------------------------
@dataclass
class UidMapping:
    forward: dict[str, str]  # original -> replacement
    problems: list[str]


def uid_mapping(pairs: Iterable[tuple[str, Dataset, Dataset]]) -> UidMapping:
    """Pair each UI value of an input with the value at the same place in its output, over many
    (label, input, output) triples. Problems: one original given two replacements (the same in
    must give the same out), two originals given one replacement, an instance UID left unchanged
    or a class/well-known UID changed. Places the output no longer has are not compared."""
    forward: dict[str, set[str]] = defaultdict(set)
    backward: dict[str, set[str]] = defaultdict(set)
    problems: list[str] = []
    for label, before, after in pairs:
        now = {path: v for path, _, v in uid_elements(after)}
        for path, kw, old in uid_elements(before):
            new = now.get(path)
            if new is None:
                continue
            if kw in WRITER_KEYWORDS:
                continue
            keep = is_well_known(old) or is_class_like(kw)
            if keep and new != old:
                problems.append(
                    f"{label}: {kw} at {_fmt(path)} is a class or well-known UID but was changed"
                )
            elif not keep:
                if new == old:
                    problems.append(f"{label}: {kw} at {_fmt(path)} kept its original value")
                forward[old].add(new)
                backward[new].add(old)
    for old, news in forward.items():
        if len(news) > 1:
            problems.append(f"one original UID ({_short(old)}) became {len(news)} different UIDs")
    for new, olds in backward.items():
        if len(olds) > 1:
            problems.append(f"{len(olds)} different original UIDs all became {new}")
    return UidMapping({o: next(iter(n)) for o, n in forward.items() if len(n) == 1}, problems)


def _fmt(path: Path) -> str:
    steps = [f"({t >> 16:04X},{t & 0xFFFF:04X})[{i}]" for t, i in path[:-1]]
    tag, k = path[-1]
    return " > ".join(
        [*steps, f"({tag >> 16:04X},{tag & 0xFFFF:04X})" + (f" value {k + 1}" if k else "")]
    )


def _short(uid: str) -> str:
    return uid[:12] + "..." if len(uid) > 15 else uid


def link_problems(pairs: list[tuple[str, Dataset, Dataset]]) -> list[str]:
    """References between the objects of a corpus still point at the right object after mapping.
    The SOP Instance, Series, Study and Frame of Reference UIDs each input defines (at the top
    level) and what its output now says are collected; wherever an input names one of those
    originals inside a sequence (Referenced SOP Instance UID in Referenced Image, Source Image,
    Referenced Study or evidence sequences, Series Instance UID in Referenced Series Sequence,
    Referenced Frame of Reference UID, ...) the output must name the new value at the same place.
    Also every output's file meta must name its own SOP Instance UID."""
    defined: dict[str, tuple[str, str]] = {}  # original -> (what it is, replacement)
    for _, before, after in pairs:
        for kw in (
            "SOPInstanceUID",
            "SeriesInstanceUID",
            "StudyInstanceUID",
            "FrameOfReferenceUID",
        ):
            if kw in before and kw in after:
                defined[str(before[kw].value)] = (kw, str(after[kw].value))
    problems = []
    for label, before, after in pairs:
        meta = getattr(after, "file_meta", None)
        if meta is not None and "MediaStorageSOPInstanceUID" in meta:
            if str(meta.MediaStorageSOPInstanceUID) != str(after.get("SOPInstanceUID", "")):
                problems.append(
                    f"{label}: file meta MediaStorageSOPInstanceUID is not the SOP Instance UID"
                )
        now = {path: v for path, _, v in uid_elements(after, file_meta=False)}
        for path, kw, old in uid_elements(before, file_meta=False):
            if len(path) == 1 or old not in defined or is_class_like(kw):
                continue  # top level: the object's own UIDs define, they do not refer
            kind, want = defined[old]
            got = now.get(path)
            if got is not None and got != want:
                problems.append(
                    f"{label}: {kw} at {_fmt(path)} no longer names the {kind} it referred to"
                )
    return problems


def walk(ds: Dataset) -> Iterator[tuple[Dataset, BaseTag]]:
    """(dataset, tag) of every element at every depth."""
    for elem in list(ds):
        yield ds, elem.tag
        if elem.VR == "SQ":
            for item in elem.value or []:
                yield from walk(item)


# -- what a bundled file holds that must not survive ---------------------------------------------
# Attributes whose values identify the patient, the institution or the device (besides every
# person name and date): derived from the dataset itself, for files nobody planted anything in.
IDENTIFYING_KEYWORDS = frozenset(
    {
        "PatientID",
        "OtherPatientIDs",
        "IssuerOfPatientID",
        "AccessionNumber",
        "StudyID",
        "RequestedProcedureID",
        "PerformedProcedureStepID",
        "ScheduledProcedureStepID",
        "AdmissionID",
        "MedicalRecordLocator",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "StationName",
        "DeviceSerialNumber",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers",
        "MilitaryRank",
        "BranchOfService",
        "Occupation",
    }
)
PLACEHOLDERS = {"anon", "anonymized", "anonymous", "removed", "unknown", "none", "n/a", "test"}


def _text_values(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value if v is not None and str(v) != ""]
    return [str(value)] if str(value) != "" else []


def _phi_element(elem, dates: bool) -> bool:  # type: ignore[no-untyped-def]
    return (
        elem.VR == "PN"
        or elem.keyword in IDENTIFYING_KEYWORDS
        or (dates and elem.VR in ("DA", "DT"))
    )


def phi_of(ds: Dataset, *, dates: bool = True) -> tuple[set[str], set[bytes]]:
    """What de-identification must remove from a dataset nobody planted anything in: every
    person name, the identifying attributes above and (``dates``: when dates must change) every
    date and date-time, at every depth. Returned as strings, and as the raw bytes each value had
    in the file (its own character set, which ``ENCODINGS`` may not cover: ISO 2022 escapes).
    Placeholders ('ANONYMIZED', '----'), values without a letter (other than 8-digit dates) and
    numbers shorter than 8 digits, which match inside new UIDs by chance, are left out."""
    strings: set[str] = set()
    blobs: set[bytes] = set()

    def keep(v: str) -> bool:
        v = v.strip("\x00 ")
        if v.casefold() in PLACEHOLDERS or len(v.encode("utf-8")) < MIN_NEEDLE_BYTES:
            return False
        if not any(c.isalpha() for c in v):
            return bool(dates_in(v))
        return True

    def visit(d: Dataset) -> None:
        for elem in d:
            if elem.tag.group == 0x0002:
                continue
            if elem.VR == "SQ":
                for it in elem.value or []:
                    visit(it)
                continue
            if not _phi_element(elem, dates):
                continue
            for v in _text_values(elem.value):
                v = v.strip("\x00 ")
                if keep(v):
                    strings.add(v)
                    original = getattr(elem.value, "original_string", None)
                    if isinstance(original, bytes) and len(original.strip(b"\x00 ")) >= 6:
                        blobs.add(original.strip(b"\x00 "))

    visit(ds)
    return strings, blobs


def background(ds: Dataset, *, dates: bool = True) -> bytes:
    """Everything an output may rightly still hold: the values of the input's public elements
    that ``phi_of`` does not take and that are no instance UID (UTF-8 text, or the raw bytes of
    binary values such as Pixel Data). A spelling of a PHI value found here (a patient name that
    is also the manufacturer's, a pixel pattern that spells a short ID) proves nothing."""
    parts: list[bytes] = []

    def visit(d: Dataset) -> None:
        for elem in d:
            if elem.tag.group == 0x0002 or elem.tag.is_private:
                continue
            if elem.VR == "SQ":
                for it in elem.value or []:
                    visit(it)
                continue
            if _phi_element(elem, dates):
                continue
            if elem.VR == "UI":
                parts.extend(
                    v.encode()
                    for v in _uid_values(elem.value)
                    if is_well_known(v) or is_class_like(elem.keyword)
                )
            elif isinstance(elem.value, bytes):
                parts.append(elem.value)
            else:
                parts.extend(v.encode("utf-8", "replace") for v in _text_values(elem.value))

    visit(ds)
    return b"\x00".join(parts)
