"""De-identification (imaging/deid.py): PS3.15 Table E.1-1 Basic Profile, keyed pseudonyms and
``2.25.`` UIDs scoped per partner, private and overlay data removed. Built on pydicom's bundled
files, read from the local package only (``get_testdata_files`` would try to download more)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage

from imaging.deid import CLASS_UID_TAGS, MAX_DEPTH, DeidentificationError, Deidentifier
from imaging.deid import is_well_known_uid as well_known
from imaging.pseudonym import KeyedHash

KEY = b"test-key-0123456789abcdef"
SCOPE = "partner-a"
TALAIRACH = "1.2.840.10008.1.4.1.1"  # a well-known frame of reference (PS3.6 Table A-2)
PHI = {  # values found nowhere else in CT_small.dcm
    "PatientName": "Quorvex^Ysolde^Maren", "PatientID": "PID-77331-QX", "PatientBirthDate": "19510423",
    "PatientAddress": "7 Ysolde Street", "OtherPatientIDs": "OPID-55219-QX", "InstitutionName": "Saint Quorvex Hospital",
    "ReferringPhysicianName": "Zebulon^Quill", "OperatorsName": "Quintessa^Opal", "StudyDescription": "Quorvex thorax",
    "SeriesDescription": "Quorvex axial series", "AccessionNumber": "ACC99871QX", "StudyDate": "19870613",
    "StudyID": "SQX4417", "StationName": "QUORVEXCT01", "PatientComments": "allergic to quorvex dye",
}
INSTANCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def bundled(name: str) -> Dataset:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom")
    return dcmread(path)


def item(**values: object) -> Dataset:
    ds = Dataset()
    ds.update(values)
    return ds


def encode(ds: Dataset) -> bytes:
    """The dataset as pydicom serializes it (explicit VR little endian, no file meta)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def with_sop(ds: Dataset) -> Dataset:
    ds.SOPClassUID, ds.SOPInstanceUID = ds.get("SOPClassUID", MRImageStorage), ds.get("SOPInstanceUID", "1.2.3.4.5.6")
    return ds


def walk(ds: Dataset):  # every element, at every depth
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for child in elem.value:
                yield from walk(child)


@pytest.fixture
def deid() -> Deidentifier:
    return Deidentifier(KeyedHash(KEY))


# -- Basic Profile ----------------------------------------------------------------------------
def test_no_original_value_survives(deid: Deidentifier) -> None:
    ds = bundled("CT_small.dcm")
    ds.update(PHI)
    ds.OtherPatientIDsSequence = [item(PatientID="OPID-SEQ-60612", IssuerOfPatientID="Quorvex Registry")]
    ds.SourceImageSequence = [item(ReferencedSOPInstanceUID="1.2.3.4.5.6.7.8.9.1", PatientName="Nested^Quorvex")]
    originals = [*PHI.values(), "OPID-SEQ-60612", "Quorvex Registry", "1.2.3.4.5.6.7.8.9.1", "Nested^Quorvex"]
    originals += [str(ds[kw].value) for kw in INSTANCE_UIDS]
    assert all(v.encode() in encode(ds) for v in originals)  # the search below can see them

    deid.deidentify(ds, SCOPE)

    out = encode(ds)
    assert [v for v in originals if v.encode() in out] == []
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.DeidentificationMethod
    code = ds.DeidentificationMethodCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("113100", "DCM")


# -- pseudonyms -------------------------------------------------------------------------------
def pseudonymize(deid: Deidentifier, patient_id: str, scope: str = SCOPE, name: str = "CT_small.dcm", accession: str = "") -> Dataset:
    ds = bundled(name)
    ds.PatientID, ds.PatientName, ds.AccessionNumber = patient_id, "Someone^Else", accession
    result = deid.deidentify(ds, scope)
    assert ds.PatientID == str(ds.PatientName) == result.patient_pseudonym
    assert ds.get("AccessionNumber") == result.accession_pseudonym or not accession
    return ds


def test_patient_pseudonym_is_stable_per_scope_and_key(deid: Deidentifier) -> None:
    first = pseudonymize(deid, "PID-SAME-1").PatientID
    assert "PID-SAME-1" not in first
    assert pseudonymize(deid, "PID-SAME-1", name="MR_small.dcm").PatientID == first
    assert pseudonymize(Deidentifier(KeyedHash(KEY)), "PID-SAME-1", name="MR_small.dcm").PatientID == first
    assert pseudonymize(deid, "PID-SAME-1", scope="partner-b").PatientID != first
    assert pseudonymize(Deidentifier(KeyedHash(b"another-key-0123456789")), "PID-SAME-1").PatientID != first
    assert pseudonymize(deid, "PID-OTHER-2").PatientID != first


def test_accession_pseudonym_is_stable_and_fits_sh(deid: Deidentifier) -> None:
    first = pseudonymize(deid, "PID-1", accession="ACC-123456789").AccessionNumber
    assert first != "ACC-123456789" and len(first) <= 16
    assert pseudonymize(deid, "PID-2", name="MR_small.dcm", accession="ACC-123456789").AccessionNumber == first
    assert pseudonymize(deid, "PID-1", scope="partner-b", accession="ACC-123456789").AccessionNumber != first
    assert pseudonymize(deid, "PID-1", accession="ACC-987654321").AccessionNumber != first
    assert not pseudonymize(deid, "PID-1").get("AccessionNumber")


# -- UIDs -------------------------------------------------------------------------------------
def test_uids_are_replaced_consistently_across_references(deid: Deidentifier) -> None:
    target, referrer = bundled("CT_small.dcm"), bundled("MR_small.dcm")

    def ref() -> Dataset:
        return item(ReferencedSOPClassUID=target.SOPClassUID, ReferencedSOPInstanceUID=target.SOPInstanceUID)

    referrer.StudyInstanceUID, referrer.FrameOfReferenceUID = target.StudyInstanceUID, target.FrameOfReferenceUID
    referrer.ReferencedImageSequence = [ref()]
    referrer.ReferencedSeriesSequence = [item(SeriesInstanceUID=target.SeriesInstanceUID, ReferencedInstanceSequence=[ref()])]
    referrer.SourceImageSequence = [ref()]
    referrer.SharedFunctionalGroupsSequence = [item(DerivationImageSequence=[item(SourceImageSequence=[ref()])])]
    original = {kw: str(target[kw].value) for kw in INSTANCE_UIDS}
    sop_class = target.SOPClassUID

    deid.deidentify(target, SCOPE)
    deid.deidentify(referrer, SCOPE)

    for kw, old in original.items():
        new = target[kw].value
        assert new != old and new.startswith("2.25.") and len(new) <= 64 and UID(new).is_valid
        assert new == deid.new_uid(SCOPE, old)  # what ingest uses to detect duplicates
    assert referrer.SOPInstanceUID != target.SOPInstanceUID
    assert (referrer.StudyInstanceUID, referrer.FrameOfReferenceUID) == (target.StudyInstanceUID, target.FrameOfReferenceUID)
    assert referrer.ReferencedSeriesSequence[0].SeriesInstanceUID == target.SeriesInstanceUID
    refs = [(e.keyword, e.value) for e in walk(referrer) if e.keyword.startswith("ReferencedSOP")]
    assert refs == [("ReferencedSOPClassUID", sop_class), ("ReferencedSOPInstanceUID", target.SOPInstanceUID)] * 4


def test_uids_differ_per_scope_and_key(deid: Deidentifier) -> None:
    sop = bundled("CT_small.dcm").SOPInstanceUID
    other_key = Deidentifier(KeyedHash(b"another-key-0123456789"))
    assert len({deid.new_uid(SCOPE, sop), deid.new_uid("partner-b", sop), other_key.new_uid(SCOPE, sop)}) == 3


def test_class_and_well_known_uids_are_kept(deid: Deidentifier) -> None:
    ds = bundled("CT_small.dcm")
    private_class = "1.3.12.2.1107.5.9.1"  # a vendor's SOP class: not in pydicom's dictionary
    ds.FrameOfReferenceUID = TALAIRACH
    ds.ReferencedImageSequence = [item(ReferencedSOPClassUID=private_class, ReferencedSOPInstanceUID="1.2.3.4.5.6.7.8")]
    schemes = ["2.16.840.1.113883.6.96", "1.2.840.10008.2.16.4"]  # SNOMED (not in the dictionary), DCM
    ds.CodingSchemeIdentificationSequence = [item(CodingSchemeDesignator="X", CodingSchemeUID=uid) for uid in schemes]
    ds.MACCalculationTransferSyntaxUID = ExplicitVRLittleEndian
    sop_class = ds.SOPClassUID

    deid.deidentify(ds, SCOPE)

    assert ds.SOPClassUID == sop_class
    assert ds.FrameOfReferenceUID == TALAIRACH
    assert ds.ReferencedImageSequence[0].ReferencedSOPClassUID == private_class
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID.startswith("2.25.")
    assert [i.CodingSchemeUID for i in ds.CodingSchemeIdentificationSequence] == schemes
    assert ds.MACCalculationTransferSyntaxUID == ExplicitVRLittleEndian


# -- private, overlay and group length attributes ---------------------------------------------
def _forbidden(ds: Dataset) -> list:
    return [e.tag for e in walk(ds) if e.tag.is_private or e.tag.element == 0 or (e.tag.group & 0xFF01 == 0x6000 and e.tag.element == 0x3000)]


def test_private_overlay_and_group_length_attributes_are_removed(deid: Deidentifier) -> None:
    ds = bundled("CT_small.dcm")
    block = ds.private_block(0x0009, "QUORVEX CORP", create=True)
    block.add_new(0x01, "LO", "PRIVATE-VALUE-9931")
    block.add_new(0x02, "SQ", [item(PatientName="Private^Nested^Person", PatientID="PRIV-NESTED-4471")])
    ds.ReferencedImageSequence = [item(ReferencedSOPClassUID=ds.SOPClassUID, ReferencedSOPInstanceUID="1.2.3.4.5")]
    ds.ReferencedImageSequence[0].private_block(0x0011, "NESTED CORP", create=True).add_new(0x01, "LO", "NESTED-PRIVATE-772")
    ds.ReferencedImageSequence[0].add_new(0x00080000, "UL", 0)
    for group in (0x6000, 0x6002):
        ds.add_new(group << 16 | 0x3000, "OW", b"OVERLAY-BITS-QX" + b"\0")
    ds.add_new(0x00100000, "UL", 0)
    values = [b"PRIVATE-VALUE-9931", b"Private^Nested^Person", b"PRIV-NESTED-4471", b"NESTED-PRIVATE-772", b"OVERLAY-BITS-QX"]
    assert len(_forbidden(ds)) >= 10 and all(v in encode(ds) for v in values)

    deid.deidentify(ds, SCOPE)

    assert _forbidden(ds) == []
    assert [v for v in values if v in encode(ds)] == []


# -- nesting limit ----------------------------------------------------------------------------
def nested(depth: int) -> Dataset:
    """CT_small with PHI in a sequence item ``depth`` levels down."""
    ds = bundled("CT_small.dcm")
    ds.PatientName, ds.PatientID = PHI["PatientName"], PHI["PatientID"]
    inner = item(PatientName="Deep^Secret^Name", PatientID="DEEP-ID-90210")
    for _ in range(depth - 1):
        inner = item(SourceImageSequence=[inner])
    ds.SourceImageSequence = [inner]
    return ds


def test_nesting_deeper_than_max_depth_is_refused_without_phi(deid: Deidentifier) -> None:
    ok = nested(MAX_DEPTH)
    deid.deidentify(ok, SCOPE)
    assert b"Deep^Secret^Name" not in encode(ok)

    too_deep = nested(MAX_DEPTH + 1)
    phi = [PHI["PatientName"], PHI["PatientID"], "Deep^Secret^Name", "DEEP-ID-90210", too_deep.SOPInstanceUID, too_deep.StudyInstanceUID]
    with pytest.raises(DeidentificationError) as exc:
        deid.deidentify(too_deep, SCOPE)
    assert [v for v in phi if v in str(exc.value)] == []


# -- character sets ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(get_charset_files("*.dcm")), ids=lambda p: Path(p).name)
def test_character_sets(deid: Deidentifier, path: str) -> None:
    ds = with_sop(dcmread(path))
    names = [(str(e.value), e.value.original_string) for e in walk(ds) if e.keyword == "PatientName"]
    assert names  # each decoded, and as encoded in the file

    result = deid.deidentify(ds, SCOPE)

    assert str(ds.PatientName) == result.patient_pseudonym
    texts = "\n".join(str(e.value) for e in walk(ds) if e.VR in ("PN", "LO", "SH", "LT", "ST", "UT", "UC"))
    out = encode(ds)
    assert [name for name, raw in names if name in texts or raw in out] == []


# -- every bundled file -----------------------------------------------------------------------
def _readable(path: Path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return dcmread(path, stop_before_pixels=True) is not None
        except Exception:
            return False


@pytest.mark.parametrize("path", [p for p in sorted(Path(DATA_ROOT, "test_files").glob("*.dcm")) if _readable(p)], ids=lambda p: p.name)
def test_every_bundled_file_deidentifies(deid: Deidentifier, path: Path) -> None:
    """Those without SOP UIDs get some; all then succeed (none needs refusing)."""
    ds = with_sop(dcmread(path))
    uids = {str(v).strip("\x00 ") for e in walk(ds) if e.VR == "UI" for v in (e.value if e.VM > 1 else [e.value]) if v}
    kept = {str(e.value) for e in walk(ds) if e.tag in CLASS_UID_TAGS}
    originals = {u for u in uids - kept if not well_known(u)}

    deid.deidentify(ds, SCOPE)

    assert ds.PatientIdentityRemoved == "YES"
    assert _forbidden(ds) == []
    out = encode(ds)
    assert [u for u in originals if u.encode() in out] == []
