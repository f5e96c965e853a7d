"""De-identification against hostile input (PS3.15 Annex E with the exchange's default policy).

- Every hostile fixture (tests/phi_corpus.py) and every file bundled with pydicom, de-identified
  and written, holds none of its PHI in any spelling (tests/leaks.py), none of its original
  instance UIDs, the same Pixel Data bytes, and reads back as ISO_IR 192.
- Across two patients with several studies: UIDs map consistently and references still point at
  the right objects; each patient's dates move by one offset, the two offsets differ; the output
  is deterministic.
- A property test plants random Latin, Cyrillic and CJK strings in attributes the profile removes
  or cleans, at depths 0 to 3 and in private elements.
- dciodvfy (dicom3tools) finds no error in an output that it did not find in its input.
"""

from __future__ import annotations

import datetime as dt
import io
import re
import shutil
import subprocess
import warnings
import zlib
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path

import phi_corpus
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from leaks import (
    ENCODINGS,
    background,
    date_variants,
    dates_in,
    find_byte_leaks,
    find_leaks,
    find_uid_leaks,
    instance_uids,
    link_problems,
    missing_plants,
    phi_of,
    uid_mapping,
)
from phi_corpus import HOSTILE, Hostile
from pydicom import dcmread, dcmwrite
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, SecondaryCaptureImageStorage

from imaging.deid import DeidentificationError, Deidentifier, DeidResult
from imaging.policy import Policy
from imaging.pseudonym import KeyedHash

KEY = b"k" * 32
SCOPE = "partner:1"
PREFIX = "OSH"
ROOT = Path(DATA_ROOT)


@cache
def engine() -> Deidentifier:
    return Deidentifier(KeyedHash(KEY))


def deidentify(ds: Dataset, policy: Policy | None = None) -> tuple[DeidResult, bytes]:
    """De-identify ``ds`` in place with the default policy and write it: (result, bytes)."""
    res = engine().deidentify(ds, scope=SCOPE, policy=policy or Policy.default(), prefix=PREFIX)
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return res, buf.getvalue()


def shifted_dates(planted: Iterable[str], offset: dt.timedelta) -> set[str]:
    """Every spelling of each planted date moved by ``offset``: the output rightly holds these,
    and one may equal another planted date."""
    if not offset:
        return set()
    out: set[str] = set()
    for value in planted:
        for day in dates_in(value):
            for extra in (0, 1):  # a date-time's date moves one more day when its time wraps
                out |= date_variants(day + dt.timedelta(days=offset.days + extra))
    return out


def read_back(data: bytes) -> Dataset:
    """Parse an output and decode every value; a value that cannot be decoded fails the test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = dcmread(io.BytesIO(data))
        for elem in out.iterall():
            _ = elem.value
    bad = [str(w.message) for w in caught if "decode" in str(w.message).lower()]
    assert bad == [], f"the output has values that cannot be decoded: {bad}"
    return out


def pixel_bytes(ds: Dataset) -> bytes | None:
    for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if kw in ds:
            return bytes(ds[kw].value)
    return None


def check_output(
    label: str,
    before: Dataset,
    res: DeidResult,
    data: bytes,
    planted: Iterable[str],
    blobs: Iterable[bytes] = (),
    *,
    ignore_bytes: bytes = b"",
) -> Dataset:
    """Everything a de-identified output must satisfy; ``before`` is a fresh parse of the input."""
    leaks = find_leaks(
        data,
        planted,
        ignore_bytes=ignore_bytes,
        ignore_texts=shifted_dates(planted, res.date_offset),
    )
    assert leaks == [], f"{label}: planted PHI survives"
    assert find_byte_leaks(data, blobs) == [], (
        f"{label}: binary PHI (original value bytes or bitmap) survives"
    )
    assert find_uid_leaks(data, instance_uids(before)) == [], f"{label}: original UIDs survive"
    out = read_back(data)
    assert uid_mapping([(label, before, out)]).problems == []
    assert out.SpecificCharacterSet == "ISO_IR 192"
    assert out.PatientIdentityRemoved == "YES"
    assert out.PatientID == res.patient_pseudonym and str(out.PatientName) == res.patient_pseudonym
    assert res.patient_pseudonym.startswith(PREFIX + "-")
    assert res.burn_in in ("none", "declared", "likely")
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    original = pixel_bytes(before)
    if original is not None:  # the default policy quarantines burned-in risk: pixels never change
        sent = before.file_meta.get("TransferSyntaxUID") if "file_meta" in before.__dict__ else None
        assert sent is None or sent == out.file_meta.TransferSyntaxUID, (
            f"{label}: transfer syntax changed"
        )
        assert pixel_bytes(out) == original, f"{label}: Pixel Data changed"
    return out


# -- the hostile corpus -------------------------------------------------------------------------
@cache
def hostile(name: str) -> Hostile:
    return HOSTILE[name]()


@cache
def two_patients() -> tuple[Hostile, ...]:
    return tuple(phi_corpus.two_patients())


@cache
def corpus() -> dict[str, Hostile]:
    out = {name: hostile(name) for name in HOSTILE}
    out.update({h.name: h for h in two_patients()})
    return out


ALL_FIXTURES = [
    *HOSTILE,
    "A1-CT-1",
    "A1-CT-2",
    "A1-CT-derived",
    "A2-MR-1",
    "A2-MR-2",
    "A3-SR",
    "B1-CT-1",
    "B1-CT-2",
    "B2-CT-1",
]


def test_fixture_names_are_complete() -> None:
    assert sorted(ALL_FIXTURES) == sorted(corpus())


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_original_fixture_holds_every_plant(name: str) -> None:
    """The planting works and the checkers can fail: before de-identification, every planted
    string and every original UID is found in the written file."""
    h = corpus()[name]
    assert missing_plants(h.data, h.planted) == []
    assert len(find_leaks(h.data, h.planted)) >= len(h.planted)
    assert len(find_byte_leaks(h.data, h.planted_bytes)) == len(h.planted_bytes)
    uids = instance_uids(h.ds)
    assert uids and len(find_uid_leaks(h.data, uids)) == len(uids)


def test_checker_sees_components_dates_and_mis_decoded_forms() -> None:
    assert find_leaks(b"x Ivanov y", ["Ivanov^Petr"]) != []
    assert find_leaks("Петров".encode("cp1251"), ["Петров^Иван"]) != []
    assert (
        find_leaks("Петров".encode("cp1251").decode("latin-1").encode("utf-8"), ["Петров^Иван"])
        != []
    )
    assert find_leaks("ИВАНОВ".encode("utf-16-be"), ["Иванов^Пётр"]) != []
    assert find_leaks(b"on 1987-06-13", ["19870613"]) != []
    assert find_leaks(b"DOB 13.06.1987", ["19870613"]) != []
    assert find_leaks(b"19870613", ["CT 13.06.1987 Ivanov"]) != []
    assert find_leaks("王".encode("gb18030"), ["王^小明=Wang^Xiaoming"]) == []  # 2 bytes: too short
    assert find_leaks("小明".encode("gb18030"), ["王^小明=Wang^Xiaoming"]) != []
    assert find_leaks("司马翊晨".encode("gb18030"), ["司马翊晨"]) != []
    assert find_leaks(b"1.2.3.4", []) == []
    assert find_uid_leaks(b"\x001.2.3.4.5.67\x00", ["1.2.3.4.5.6"]) == []
    assert find_uid_leaks(b"\x001.2.3.4.5.6\x00", ["1.2.3.4.5.6"]) != []
    assert find_uid_leaks(b"\x009.1.2.3.4.5.6\x00", ["1.2.3.4.5.6"]) == []
    assert set(ENCODINGS) >= {"utf-8", "cp1251", "iso8859_5", "gb18030", "utf-16-le", "utf-16-be"}


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_hostile_fixture_leaks_nothing(name: str) -> None:
    h = corpus()[name]
    ds = h.fresh()
    res, data = deidentify(ds)
    assert res.date_offset != dt.timedelta(0)
    check_output(name, h.fresh(), res, data, h.planted, h.planted_bytes)


def test_deidentification_is_deterministic() -> None:
    for name in ALL_FIXTURES:
        h = corpus()[name]
        first, second = deidentify(h.fresh())[1], deidentify(h.fresh())[1]
        assert first == second, f"{name}: two runs give different bytes"
    other = Deidentifier(KeyedHash(KEY))  # a new engine with the same key: same output
    h = corpus()["nested_sequences"]
    res = other.deidentify(h.fresh(), scope=SCOPE, policy=Policy.default(), prefix=PREFIX)
    assert res.patient_pseudonym == deidentify(h.fresh())[0].patient_pseudonym


# -- two patients: UIDs and dates ---------------------------------------------------------------
@cache
def two_patient_outputs() -> tuple[tuple[Hostile, Dataset, DeidResult], ...]:
    out = []
    for h in two_patients():
        ds = h.fresh()
        res, data = deidentify(ds)
        out.append((h, dcmread(io.BytesIO(data)), res))
    return tuple(out)


def test_uids_map_consistently_across_patients_and_studies() -> None:
    outputs = two_patient_outputs()
    pairs = [(h.name, h.fresh(), out) for h, out, _ in outputs]
    mapping = uid_mapping(pairs)
    assert mapping.problems == []
    assert link_problems(pairs) == []
    for new in mapping.forward.values():
        assert new.startswith("2.25.") and len(new) <= 64 and UID(new).is_valid
    by = {h.name: out for h, out, _ in outputs}
    # the links, spelled out
    assert (
        by["A1-CT-derived"].SourceImageSequence[0].ReferencedSOPInstanceUID
        == by["A1-CT-1"].SOPInstanceUID
    )
    assert (
        by["A1-CT-derived"].SourceImageSequence[1].ReferencedSOPInstanceUID
        == by["A1-CT-2"].SOPInstanceUID
    )
    assert (
        by["A1-CT-derived"].ReferencedSeriesSequence[0].SeriesInstanceUID
        == by["A1-CT-1"].SeriesInstanceUID
    )
    assert (
        by["A1-CT-2"].ReferencedImageSequence[0].ReferencedSOPInstanceUID
        == by["A1-CT-1"].SOPInstanceUID
    )
    assert (
        by["A2-MR-2"].ReferencedImageSequence[0].ReferencedSOPInstanceUID
        == by["A2-MR-1"].SOPInstanceUID
    )
    assert (
        by["B2-CT-1"].ReferencedImageSequence[0].ReferencedSOPInstanceUID
        == by["B1-CT-1"].SOPInstanceUID
    )
    evidence = by["A3-SR"].CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == by["A2-MR-1"].StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == by["A2-MR-1"].SeriesInstanceUID
    assert [
        i.ReferencedSOPInstanceUID
        for i in evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence
    ] == [
        by["A2-MR-1"].SOPInstanceUID,
        by["A2-MR-2"].SOPInstanceUID,
    ]
    # the hierarchy: same study/series/frame of reference in -> same out, different -> different
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"):
        before = {h.name: str(h.ds.get(kw, "")) for h, _, _ in outputs}
        after = {h.name: str(out.get(kw, "")) for h, out, _ in outputs}
        for a in before:
            for b in before:
                if before[a] and before[b]:
                    assert (before[a] == before[b]) == (after[a] == after[b]), f"{kw}: {a} and {b}"


def _when(ds: Dataset, date_kw: str, time_kw: str) -> dt.datetime:
    return dt.datetime.strptime(str(ds[date_kw].value) + str(ds[time_kw].value)[:6], "%Y%m%d%H%M%S")


def test_each_patient_has_one_date_offset_and_intervals_are_kept() -> None:
    outputs = two_patient_outputs()
    offsets: dict[str, set[dt.timedelta]] = {}
    moved: dict[str, tuple[dt.datetime, dt.datetime]] = {}
    for h, out, res in outputs:
        offsets.setdefault(h.patient, set()).add(res.date_offset)
        before = _when(h.ds, "StudyDate", "StudyTime")
        after = _when(out, "StudyDate", "StudyTime")
        assert after - before == res.date_offset, (
            f"{h.name}: study date and time moved by another offset"
        )
        if "AcquisitionDateTime" in h.ds:
            a0 = dt.datetime.strptime(str(h.ds.AcquisitionDateTime)[:14], "%Y%m%d%H%M%S")
            a1 = dt.datetime.strptime(str(out.AcquisitionDateTime)[:14], "%Y%m%d%H%M%S")
            assert a1 - a0 == res.date_offset, (
                f"{h.name}: Acquisition DateTime moved by another offset"
            )
        for kw in ("SeriesDate", "ContentDate", "AcquisitionDate", "InstanceCreationDate"):
            if h.ds.get(kw):
                d0 = dt.datetime.strptime(str(h.ds[kw].value), "%Y%m%d").date()
                d1 = dt.datetime.strptime(str(out[kw].value), "%Y%m%d").date()
                assert (d1 - d0).days in (res.date_offset.days, res.date_offset.days + 1), (
                    f"{h.name}: {kw}"
                )
        moved.setdefault(h.study, (before, after))
        assert moved[h.study] == (before, after)
    assert {p: len(o) for p, o in offsets.items()} == {"A": 1, "B": 1}
    (a,), (b,) = offsets["A"], offsets["B"]
    assert a != b and a and b
    original = phi_corpus.study_datetimes()
    for x in moved:
        for y in moved:
            if x[0] == y[0]:  # same patient: intervals between studies are kept exactly
                assert moved[y][1] - moved[x][1] == original[y] - original[x]


def test_pseudonyms_per_patient() -> None:
    outputs = two_patient_outputs()
    ids = {(h.patient, out.PatientID, res.patient_pseudonym) for h, out, res in outputs}
    assert len({i for _, i, _ in ids}) == 2 and all(i == p for _, i, p in ids)
    acc = {h.study: out.AccessionNumber for h, out, _ in outputs}
    assert len(set(acc.values())) == len(acc)  # one accession per study, all different


# -- every file bundled with pydicom ----------------------------------------------------------
# Not DICOM, or not readable as DICOM by pydicom even with force=True.
EXPECTED_UNREADABLE = {
    "charset_files/FileInfo.txt": "text: describes the character set files",
    "test_files/README.txt": "text: describes the test files",
    "test_files/dicomdirtests/README.txt": "text",
    "test_files/dicomdirtests/TINY_ALPHA/README": "text",
    "test_files/crayons.icc": "an ICC colour profile",
    "test_files/rtplan.dump": "text: a dcmdump listing",
    "test_files/rtstruct.dump": "text: a dcmdump listing",
    "test_files/test1.json": "DICOM JSON model, not Part 10",
    "test_files/test_PN.json": "DICOM JSON model, not Part 10",
    "test_files/zipMR.gz": "a gzip archive",
    "test_files/no_meta.dcm": "CT_small without file meta, but a stray byte before the first tag: force=True parses one garbage element",
}
# No preamble and no file meta: a dataset as it arrives over the network. Read with force=True.
NO_FILE_META = {
    "test_files/ExplVR_BigEndNoMeta.dcm",
    "test_files/ExplVR_LitEndNoMeta.dcm",
    "test_files/rtstruct.dcm",
}
# Not a composite instance (no SOP Class or SOP Instance UID): refusing with DeidentificationError
# is acceptable; de-identifying them is too, and then nothing may leak. They are also run with
# SOP UIDs added (test_bundled_file_with_sop_uids_added), which must succeed.
REFUSAL_ACCEPTABLE = {
    "charset_files/chrSQEncoding.dcm": "a dataset fragment (no SOP UIDs)",
    "charset_files/chrSQEncoding1.dcm": "a dataset fragment (no SOP UIDs)",
    "test_files/UN_sequence.dcm": "a dataset fragment (no SOP UIDs)",
    "test_files/nested_priv_SQ.dcm": "a dataset fragment (no SOP UIDs)",
    "test_files/priv_SQ.dcm": "a dataset fragment (no SOP UIDs)",
    "test_files/meta_missing_tsyntax.dcm": "no SOP UIDs, no transfer syntax",
    "test_files/empty_charset_LEI.dcm": "a dataset fragment (no SOP UIDs)",
    "test_files/no_meta_group_length.dcm": "a dataset fragment (no SOP UIDs)",
    "test_files/dicomdirtests/DICOMDIR": "a DICOMDIR, not an instance",
    "test_files/dicomdirtests/DICOMDIR-bigEnd": "a DICOMDIR, not an instance",
    "test_files/dicomdirtests/DICOMDIR-empty.dcm": "a DICOMDIR, not an instance",
    "test_files/dicomdirtests/DICOMDIR-implicit": "a DICOMDIR, not an instance",
    "test_files/dicomdirtests/DICOMDIR-nooffset": "a DICOMDIR, not an instance",
    "test_files/dicomdirtests/DICOMDIR-nopatient": "a DICOMDIR, not an instance",
    "test_files/dicomdirtests/DICOMDIR-reordered": "a DICOMDIR, not an instance",
    "test_files/dicomdirtests/TINY_ALPHA/DICOMDIR": "a DICOMDIR, not an instance",
}
# Instances that are broken in a way that makes refusing them right (the message must carry no
# PHI). Empty until a file needs it: each entry says why.
MUST_REFUSE: dict[str, str] = {}


def bundled_files() -> list[str]:
    files = []
    for sub in ("test_files", "charset_files"):
        for p in sorted((ROOT / sub).rglob("*")):
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts:
                files.append(p.relative_to(ROOT).as_posix())
    return files


def read_input(rel: str) -> Dataset:
    path = ROOT / rel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(path, force=rel in NO_FILE_META)


def test_bundled_file_lists_are_honest() -> None:
    files = set(bundled_files())
    assert len(files) > 150
    listed = set(EXPECTED_UNREADABLE) | NO_FILE_META | set(REFUSAL_ACCEPTABLE) | set(MUST_REFUSE)
    assert listed <= files, f"listed but not on disk: {sorted(listed - files)}"
    lacking = set()
    for rel in files - set(EXPECTED_UNREADABLE):
        ds = read_input(rel)
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            lacking.add(rel)
    assert lacking == set(REFUSAL_ACCEPTABLE)


@pytest.mark.parametrize("rel", sorted(EXPECTED_UNREADABLE))
def test_expected_unreadable(rel: str) -> None:
    with pytest.raises(InvalidDicomError):
        dcmread(ROOT / rel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            forced = dcmread(ROOT / rel, force=True)
        except Exception:
            return
    assert "SOPInstanceUID" not in forced and "PatientName" not in forced


def _bundled_case(rel: str, ds: Dataset, before: Dataset) -> None:
    planted, blobs = phi_of(before)
    ignore = background(before)
    blobs = {b for b in blobs if b not in ignore}
    try:
        res, data = deidentify(ds)
    except DeidentificationError as e:
        if rel in REFUSAL_ACCEPTABLE or rel in MUST_REFUSE:
            assert (
                find_leaks(str(e).encode(), planted) == []
                and find_uid_leaks(str(e).encode(), instance_uids(before)) == []
            )
            return
        raise
    assert rel not in MUST_REFUSE, f"{rel} should have been refused: {MUST_REFUSE.get(rel)}"
    check_output(rel, before, res, data, planted, blobs, ignore_bytes=ignore)


@pytest.mark.slow
@pytest.mark.parametrize("rel", [r for r in bundled_files() if r not in EXPECTED_UNREADABLE])
def test_bundled_file_leaks_nothing(rel: str) -> None:
    _bundled_case(rel, read_input(rel), read_input(rel))


def _with_sop(ds: Dataset, rel: str) -> Dataset:
    ds.SOPClassUID = ds.get("SOPClassUID", SecondaryCaptureImageStorage)
    ds.SOPInstanceUID = ds.get(
        "SOPInstanceUID", f"{phi_corpus.UID_ROOT}.999.{zlib.crc32(rel.encode())}"
    )
    return ds


@pytest.mark.slow
@pytest.mark.parametrize("rel", sorted(REFUSAL_ACCEPTABLE))
def test_bundled_file_with_sop_uids_added(rel: str) -> None:
    """The same content made an instance: de-identifying it must succeed and leak nothing."""
    before = _with_sop(read_input(rel), rel)
    ds = _with_sop(read_input(rel), rel)
    planted, blobs = phi_of(before)
    ignore = background(before)
    res, data = deidentify(ds)
    check_output(
        rel, before, res, data, planted, {b for b in blobs if b not in ignore}, ignore_bytes=ignore
    )


# -- property: random PHI in random places ------------------------------------------------------
# Text attributes the profile removes or cleans under the default policy (PS3.15 Table E.1-1;
# test_property_leaves_are_in_the_table checks each against the table).
LEAVES = [
    ("PatientName", "PN"),
    ("ReferringPhysicianName", "PN"),
    ("PerformingPhysicianName", "PN"),
    ("OperatorsName", "PN"),
    ("NameOfPhysiciansReadingStudy", "PN"),
    ("RequestingPhysician", "PN"),
    ("PatientBirthName", "PN"),
    ("OtherPatientNames", "PN"),
    ("PersonName", "PN"),
    ("PatientID", "LO"),
    ("OtherPatientIDs", "LO"),
    ("IssuerOfPatientID", "LO"),
    ("InstitutionName", "LO"),
    ("PatientAddress", "LO"),
    ("StudyDescription", "LO"),
    ("SeriesDescription", "LO"),
    ("ProtocolName", "LO"),
    ("RequestedProcedureDescription", "LO"),
    ("MedicalAlerts", "LO"),
    ("StationName", "SH"),
    ("StudyID", "SH"),
    ("AccessionNumber", "SH"),
    ("Occupation", "SH"),
    ("PatientTelephoneNumbers", "SH"),
    ("InstitutionAddress", "ST"),
    ("DerivationDescription", "ST"),
    ("ImageComments", "LT"),
    ("PatientComments", "LT"),
    ("AdditionalPatientHistory", "LT"),
    ("FrameComments", "LT"),
    ("ReasonForVisit", "UT"),
    ("SpecimenDetailedDescription", "UT"),
]
PRIVATE_LEAVES = [("private", "LO"), ("private", "PN"), ("private", "UT")]
CONTENT_LEAVES = [("content TEXT", "UT"), ("content PNAME", "PN")]
CONTAINERS = [
    "SourceImageSequence",
    "ReferencedImageSequence",
    "RequestAttributesSequence",
    "ReferencedStudySequence",
    "OtherPatientIDsSequence",
    "ContentSequence",
    "private",
]
VR_MAX = {"SH": 16, "LO": 64, "PN": 64, "ST": 1024, "LT": 10240, "UT": 10000}
CHARSETS = {
    "ISO_IR 192": "utf-8",
    "GB18030": "gb18030",
    "ISO_IR 144": "iso8859_5",
    "ISO_IR 100": "latin-1",
}


def test_property_leaves_are_in_the_table() -> None:
    import json

    from pydicom.datadict import tag_for_keyword

    table = json.loads(
        (Path(__file__).parents[1] / "imaging/data/ps3_15_table_e1_1.json").read_text("utf-8")
    )
    rows = {int(r["tag"], 16): r for r in table["attributes"] if "X" not in r["tag"].upper()}
    options = {o.value for o in Policy.default().options}
    for keyword, _ in LEAVES:
        row = rows[tag_for_keyword(keyword)]
        actions = {row["basic"]} | {row[o] for o in options if row.get(o)}
        assert "K" not in actions, keyword


@cache
def _safe_words() -> frozenset[str]:
    text = (Path(__file__).parents[1] / "imaging/data/safe_words.txt").read_text("utf-8")
    return frozenset(
        w.casefold() for line in text.splitlines() for w in line.split("#", 1)[0].split()
    )


@cache
def _base() -> bytes:
    ds = dcmread(ROOT / "test_files/CT_small.dcm")
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@cache
def _common() -> bytes:
    """What the base file holds, before and after de-identification, and the safe words: a
    random string found here would prove nothing."""
    before = _base()
    _, after = deidentify(dcmread(io.BytesIO(before)))
    return before + after + "\n".join(sorted(_safe_words())).encode()


LATIN = st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
CYRILLIC = st.one_of(
    st.characters(min_codepoint=0x0410, max_codepoint=0x044F),
    st.sampled_from("ЁёӘәҒғҚқҢңӨөҰұҮүҺһІіҶҷҲҳӮӯ"),
)
CJK = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FA5)


def _usable(s: str) -> bool:
    if len(set(s)) < 3 or s.casefold() in _safe_words():
        return False
    if any(w in s for w in _safe_words() if any("\u4e00" <= c <= "\u9fff" for c in w)):
        return False  # a CJK vocabulary term would rightly survive inside it
    return find_leaks(_common(), [s]) == []


PHI_TEXT = st.one_of(
    st.text(LATIN, min_size=6, max_size=16),
    st.text(CYRILLIC, min_size=6, max_size=16),
    st.text(CJK, min_size=6, max_size=16),
    st.text(st.one_of(LATIN, CYRILLIC, CJK), min_size=6, max_size=16),
).filter(_usable)
PLACEMENT = st.tuples(
    PHI_TEXT,
    st.sampled_from(LEAVES + PRIVATE_LEAVES + CONTENT_LEAVES),
    st.lists(st.sampled_from(CONTAINERS), min_size=0, max_size=3),
)


def _place(ds: Dataset, leaf: tuple[str, str], chain: list[str], value: str, n: int) -> None:
    target = ds
    for depth, container in enumerate(chain):
        child = Dataset()
        if container == "private":
            block = target.private_block(0x0035, "HYPOTHESIS NEST", create=True)
            tag = block.get_tag(0x10 + depth)
            if tag in target:
                target[tag].value.append(child)
            else:
                block.add_new(0x10 + depth, "SQ", [child])
        else:
            seq = target.get(container)
            if seq is None:
                setattr(target, container, [child])
            else:
                seq.append(child)
        target = child
    keyword, vr = leaf
    if keyword == "private":
        target.private_block(0x0033, "HYPOTHESIS PRIVATE", create=True).add_new(n, vr, value)
    elif keyword.startswith("content "):
        vt = keyword.split()[1]
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", vt
        concept = Dataset()
        concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = (
            "121106",
            "DCM",
            "Comment",
        )
        item.ConceptNameCodeSequence = [concept]
        if vt == "TEXT":
            item.TextValue = value
        else:
            item.PersonName = value
        target.ContentSequence = [*target.get("ContentSequence", []), item]
    else:
        setattr(target, keyword, value)


@pytest.mark.slow
@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    placements=st.lists(PLACEMENT, min_size=1, max_size=4, unique_by=lambda t: t[0]), data=st.data()
)
def test_random_phi_never_survives(
    placements: list[tuple[str, tuple[str, str], list[str]]], data: st.DataObject
) -> None:
    values = [v for v, _, _ in placements]
    top = [
        leaf
        for _, leaf, chain in placements
        if not chain and leaf[0] != "private" and not leaf[0].startswith("content")
    ]
    assume(len(top) == len(set(top)))  # two values for one top-level attribute: the second wins
    assume(all(len(v) <= VR_MAX[leaf[1]] for v, leaf, _ in placements))
    assume(not any(a in b for a in values for b in values if a != b))
    # the dataset's character set: any that can encode every value (ISO_IR 192 always can)
    charset = data.draw(
        st.sampled_from(
            [c for c, codec in CHARSETS.items() if all(_encodable(v, codec) for v in values)]
        )
    )
    ds = dcmread(io.BytesIO(_base()))
    ds.SpecificCharacterSet = charset
    for n, (value, leaf, chain) in enumerate(placements, start=0x10):
        _place(ds, leaf, chain, value, n)
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    original = buf.getvalue()
    assert missing_plants(original, values) == []  # each value really is in the input
    res, out = deidentify(dcmread(io.BytesIO(original)))
    assert find_leaks(out, values) == []


def _encodable(value: str, codec: str) -> bool:
    try:
        value.encode(codec)
        return True
    except UnicodeEncodeError:
        return False


# -- dciodvfy -------------------------------------------------------------------------------------
DCIODVFY_BUNDLED = [
    "test_files/CT_small.dcm",
    "test_files/MR_small.dcm",
    "test_files/test-SR.dcm",
    "test_files/reportsi.dcm",
    "test_files/examples_rgb_color.dcm",
    "test_files/examples_ybr_color.dcm",
    "test_files/SC_rgb_small_odd.dcm",
]

_QUOTED = re.compile(r'"[^"]*"')
_VALUE = re.compile(r"= <[^>]*>")
_NUMBER = re.compile(r"(?<![\w<])\d+(?:\.\d+)*(?![\w>])")  # counts, values and UIDs alike


def dciodvfy_errors(path: Path) -> set[str]:
    """dciodvfy's Error lines, with quoted values, '= <value>' and numbers (UIDs included), which
    de-identification changes, replaced by placeholders."""
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy is missing: install Debian's dicom3tools (make system-deps)"
    run = subprocess.run(
        [exe, str(path)], capture_output=True, text=True, errors="replace", timeout=60
    )
    lines = (run.stdout + "\n" + run.stderr).splitlines()
    out = set()
    for line in lines:
        if line.startswith("Error"):
            line = _QUOTED.sub('"<v>"', line)
            line = _VALUE.sub("= <v>", line)
            line = _NUMBER.sub("<n>", line)
            out.add(" ".join(line.split()))
    return out


def _dciodvfy_inputs() -> dict[str, Callable[[], bytes]]:
    out: dict[str, Callable[[], bytes]] = {
        rel: (lambda rel=rel: (ROOT / rel).read_bytes()) for rel in DCIODVFY_BUNDLED
    }
    out.update({name: (lambda name=name: hostile(name).data) for name in HOSTILE})
    out["A3-SR"] = lambda: corpus()["A3-SR"].data
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_dciodvfy_inputs()))
def test_dciodvfy_finds_no_new_error(name: str, tmp_path: Path) -> None:
    data = _dciodvfy_inputs()[name]()
    src, dst = tmp_path / "in.dcm", tmp_path / "out.dcm"
    src.write_bytes(data)
    _, out = deidentify(dcmread(io.BytesIO(data)))
    dst.write_bytes(out)
    new = dciodvfy_errors(dst) - dciodvfy_errors(src)
    assert new == set(), f"{name}: dciodvfy errors the input did not have"
