"""A hostile corpus for de-identification tests, built in code on top of pydicom's bundled files
(nothing binary is committed).

Each builder returns a :class:`Hostile`: the Part 10 bytes as a sender would send them, the dataset
parsed back from those bytes (so the engine sees what a receiver sees: raw values in the sender's
character set, private elements of an implicit VR file as UN, and so on), and the set of strings
planted in it. Every planted string is made up for this corpus and found nowhere in the bundled
files, so finding one in an output means it leaked. Every person name, date and date-time the base
file already had is overwritten with planted values, so that no original value goes unchecked.

Where PHI is planted:

- ``nested_sequences``: three and four levels down (Request Attributes > Referenced Study >
  private SQ > Content Sequence), in Referenced Patient and Source Image sequences, Other Patient
  IDs and its sequence, names of physicians and operators, addresses, phone numbers, patient
  comments, dates inside free text ("CT 13.06.1987 ...").
- ``private_explicit`` / ``private_implicit``: private creators and data elements (LO, PN, UT, OB
  holding text, SQ holding a PN, nested private SQ, an orphan private element without its creator,
  public attributes sent as UN); the implicit VR file also has a defined-length private SQ that
  pydicom can only see as UN bytes.
- ``structured_report``: a Comprehensive SR whose content tree holds TEXT, PNAME, DATE, DATETIME,
  TIME, UIDREF, CODE and IMAGE items nested three containers deep, plus verifying observers.
- ``overlays_and_graphics``: overlay groups 6000 and 6002 (description, label, comments and a
  bitmap that draws a name), curve group 5000, a graphic annotation with a text object.
- character sets: Cyrillic in ISO_IR 144 and in UTF-8; CP1251 bytes labelled ISO_IR 100 and with
  no Specific Character Set at all; Chinese in GB18030 and UTF-8 (with an ideographic name group);
  Kyrgyz, Kazakh and Tajik names in UTF-8 on a multi-frame ultrasound.
- ``two_patients``: two patients with several studies each, series of several instances, shared
  frames of reference, and references between objects (Referenced Image, Source Image,
  Referenced Series, Referenced Study, SR evidence and IMAGE content items), for the UID and date
  offset consistency checks.
"""

from __future__ import annotations

import copy
import datetime as dt
import io
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from leaks import missing_plants
from PIL import Image, ImageDraw
from pydicom import dcmread, dcmwrite
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag
from pydicom.uid import (
    ComprehensiveSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)

TEST_FILES = Path(DATA_ROOT) / "test_files"
CHARSET_FILES = Path(DATA_ROOT) / "charset_files"

# UID roots made up for the corpus: not registered to anyone, never in a bundled file.
UID_ROOT = "1.2.826.0.1.3680043.9.7391"


@dataclass
class Hostile:
    name: str
    data: bytes  # the file as a partner sends it (DICOM Part 10)
    ds: Dataset  # parsed back from ``data``, file meta included
    planted: frozenset[str]
    planted_bytes: tuple[bytes, ...] = ()  # binary PHI: an overlay bitmap drawing a name
    patient: str = ""  # two_patients(): which patient
    study: str = ""  # two_patients(): which study

    def fresh(self) -> Dataset:
        """A new parse of the original bytes (the engine modifies its input in place)."""
        return dcmread(io.BytesIO(self.data))


class Plants:
    """Records what is planted: ``ds.PatientName = p('Name^Given')``. ``uid()`` plants a new UID
    under the corpus root, in a namespace of its own per builder (``ns``), so that two builders
    never make the same UID and a builder makes the same UIDs every time it runs."""

    def __init__(self, ns: int = 0, uids: itertools.count | None = None) -> None:
        self.strings: set[str] = set()
        self.tentative: set[str] = set()  # values that a later assignment may overwrite
        self.blobs: list[bytes] = []
        self.ns = ns
        self._uids = uids if uids is not None else itertools.count(1)

    def __call__(self, value: str) -> str:
        if len(value.encode("utf-8")) < 6:
            raise ValueError(f"planted value {value!r} is too short to be searched for reliably")
        self.strings.add(value)
        return value

    def maybe(self, value: str) -> str:
        """Planted if it is still in the file when written."""
        self.tentative.add(value)
        return value

    def uid(self) -> str:
        """A new planted instance UID (found in no bundled file)."""
        return self(f"{UID_ROOT}.{self.ns}.{next(self._uids)}")


def bundled(name: str) -> Dataset:
    return dcmread(TEST_FILES / name)


def item(**values: object) -> Dataset:
    ds = Dataset()
    for k, v in values.items():
        setattr(ds, k, v)
    return ds


def code(value: str, scheme: str, meaning: str) -> Dataset:
    return item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def raw(tag: int, vr: str | None, value: bytes) -> RawDataElement:
    """An element whose value bytes are written exactly as given (a charset mislabelled by the
    sender, or a value pydicom must not re-encode)."""
    if len(value) % 2:
        value += b" "
    return RawDataElement(Tag(tag), vr, len(value), value, 0, vr is None, True)


def implicit_items(*items: Dataset, defined_length: bool = True) -> bytes:
    """Sequence items encoded in implicit VR little endian, as the bytes of a value (what a
    private SQ of an implicit VR file, or a public SQ sent as UN, holds)."""
    out = b""
    for ds in items:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, True
        write_dataset(fp, ds)
        body = fp.getvalue()
        if defined_length:
            out += b"\xfe\xff\x00\xe0" + len(body).to_bytes(4, "little") + body
        else:
            out += b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + body + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    return out


def _overwrite_base(
    ds: Dataset, p: Plants, names: list[str], day: str, time: str = "101527"
) -> None:
    """Replace every person name, date and date-time the base file had (at any depth) by planted
    values, so the fixture holds no unplanted original. Times are set but not planted: with
    whole-day offsets a time may rightly stay as it was."""
    k = 0

    def visit(d: Dataset) -> None:
        nonlocal k
        for elem in list(d):
            if elem.tag.is_private or elem.tag.group == 0x0002:
                continue
            if elem.VR == "SQ":
                for i in elem.value:
                    visit(i)
            elif elem.VR == "PN" and elem.value:
                elem.value = p.maybe(names[k % len(names)])
                k += 1
            elif elem.VR == "DA" and elem.value:
                elem.value = p.maybe(day)
            elif elem.VR == "DT" and elem.value:
                elem.value = p.maybe(day + time)
            elif elem.VR == "TM" and elem.value:
                elem.value = time

    visit(ds)


def _new_uids(ds: Dataset, p: Plants) -> None:
    """Planted study, series, instance and frame of reference UIDs."""
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, kw, p.uid())
    if "FrameOfReferenceUID" in ds:
        ds.FrameOfReferenceUID = p.uid()
    for kw in ("InstanceCreatorUID", "IrradiationEventUID"):
        if kw in ds:
            setattr(ds, kw, p.uid())


def finish(
    name: str,
    ds: Dataset,
    p: Plants,
    transfer_syntax: str | None = None,
    *,
    patient: str = "",
    study: str = "",
) -> Hostile:
    """Write ``ds`` as a Part 10 file and parse it back."""
    meta = (
        ds.file_meta
        if "file_meta" in ds.__dict__ and ds.file_meta is not None
        else FileMetaDataset()
    )
    meta = copy.deepcopy(meta)
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if transfer_syntax:
        meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = UID_ROOT + ".1"
    meta.ImplementationVersionName = "QZ_CORPUS"
    ds.file_meta = meta
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    data = buf.getvalue()
    p.strings |= {v for v in p.tentative if not missing_plants(data, [v])}
    missing = missing_plants(data, p.strings) + [
        f"blob {i}" for i, b in enumerate(p.blobs) if b not in data
    ]
    if missing:
        raise AssertionError(f"{name}: planted but not in the written file: {missing}")
    return Hostile(
        name, data, dcmread(io.BytesIO(data)), frozenset(p.strings), tuple(p.blobs), patient, study
    )


# ---------------------------------------------------------------------------------------------
def nested_sequences() -> Hostile:
    """CT: PHI at every depth of public and private sequences, and in the usual top-level places."""
    p = Plants(1)
    ds = bundled("CT_small.dcm")
    _overwrite_base(ds, p, ["Vorontsevich^Yaropolk^Mstislavovich"], "20160512")
    _new_uids(ds, p)
    ds.PatientName = p("Vorontsevich^Yaropolk^Mstislavovich")
    ds.PatientID = p("KG-VY-5520731")
    ds.IssuerOfPatientID = p("Karakol Oblast Registry")
    ds.PatientBirthDate = p("19510423")
    ds.PatientBirthName = p("Zaslavtseva^Miroslava")
    ds.PatientMotherBirthName = p("Obrezkova^Yevdokiya")
    ds.PatientAddress = p("Toktogul Street 125 apt 17, Bishkek 720001")
    ds.PatientTelephoneNumbers = p("+996555417203")
    ds.PatientComments = p("Allergic to iodine, daughter Gulbara Vorontsevich phone 0555 91 22 04")
    ds.OtherPatientIDs = [p("OPID-KG-44190"), p("OPID-KZ-77213")]
    ds.OtherPatientIDsSequence = [
        item(
            PatientID=p("OPIDSEQ-88412-QZ"),
            IssuerOfPatientID=p("Naryn Polyclinic Index"),
            TypeOfPatientID="TEXT",
        ),
        item(
            PatientID=p("OPIDSEQ-19930-QZ"),
            IssuerOfPatientIDQualifiersSequence=[
                item(UniversalEntityID=p("Talas Archive Authority"))
            ],
        ),
    ]
    ds.AccessionNumber = p("ACC-KG-558201")
    ds.StudyID = p("STY7741QZ")
    ds.InstitutionName = p("Karakol Regional Hospital No 7")
    ds.InstitutionAddress = p("Abdrakhmanov Street 3, Karakol")
    ds.InstitutionalDepartmentName = p("Radiology Wing Zarechny")
    ds.StationName = p("QZ-KARAKOL-CT7")
    ds.DeviceSerialNumber = p("SN-CT-99310472")
    ds.ReferringPhysicianName = p("Tolubaeva^Cholpon")
    ds.ReferringPhysicianTelephoneNumbers = p("+996312660918")
    ds.PerformingPhysicianName = p("Bekmuratov^Ulan")
    ds.NameOfPhysiciansReadingStudy = p("Sagynbaeva^Elmira")
    ds.PhysiciansOfRecord = p("Kydyraliev^Marat")
    ds.OperatorsName = [p("Zheenbekova^Asel"), p("Duishonkulov^Timur")]
    ds.RequestingPhysician = p("Abdyldaev^Nurbek")
    ds.StudyDescription = p("CT 13.06.1987 Ivanchenkov")
    p("Ivanchenkov")
    p("13.06.1987")
    ds.SeriesDescription = p("follow-up Vorontsevich 2019-02-28")
    p("2019-02-28")
    ds.ImageComments = p("Patient born 23.04.1951, seen by Dr Tolubaeva on 02/11/2016")
    ds.AdditionalPatientHistory = p("Prior surgery by Prof Akmatbekov at Naryn")
    p("Akmatbekov")
    ds.ReferencedPatientSequence = [
        item(
            ReferencedSOPClassUID="1.2.840.10008.3.1.2.1.1",
            ReferencedSOPInstanceUID=p.uid(),
            ReferringPhysicianName=p("Chynybaev^Azamat"),
            PatientName=p("Vorontsevich^Yaropolk"),
            PatientID=p("KG-VY-NESTED-01"),
            PatientBirthDate=p("19490802"),
        )
    ]
    private_sq = item(
        PatientName=p("Shabdanova^Aigerim^Kubanychbekovna"), PatientID=p("PRIV-SQ-PID-3391")
    )
    private_sq.ContentSequence = [
        item(
            RelationshipType="CONTAINS",
            ValueType="TEXT",
            ConceptNameCodeSequence=[code("121106", "DCM", "Comment")],
            TextValue=p("Deep note: Shabdanova called from Osh on 1998-07-30"),
        ),
        item(
            RelationshipType="CONTAINS",
            ValueType="PNAME",
            ConceptNameCodeSequence=[code("121008", "DCM", "Person Observer Name")],
            PersonName=p("Mamatkulov^Bolot"),
        ),
        item(
            RelationshipType="CONTAINS",
            ValueType="DATE",
            ConceptNameCodeSequence=[code("111536", "DCM", "Date of Examination")],
            Date=p("19980730"),
        ),
    ]
    ref_study = item(
        ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1", ReferencedSOPInstanceUID=p.uid()
    )
    ref_study.private_block(0x0071, "QZ DEEP NEST CORP", create=True).add_new(
        0x01, "SQ", [private_sq]
    )
    p("QZ DEEP NEST CORP")
    ds.RequestAttributesSequence = [
        item(
            RequestedProcedureID=p("RPID-5521-QZ"),
            RequestedProcedureDescription=p("Chest CT for Vorontsevich"),
            ScheduledProcedureStepID=p("SPSID-8812-QZ"),
            ScheduledProcedureStepDescription=p("Scheduled by Dzhumabaeva"),
            ReasonForTheRequestedProcedure=p("Referred by Dr Kasymaliev 1977-11-05"),
            ReferencedStudySequence=[ref_study],
        )
    ]
    p("Vorontsevich")
    p("Dzhumabaeva")
    p("Kasymaliev")
    ds.SourceImageSequence = [
        item(
            ReferencedSOPClassUID=CTImageStorage,
            ReferencedSOPInstanceUID=p.uid(),
            PatientName=p("Nested^Vorontsevich^Inside"),
            PurposeOfReferenceCodeSequence=[code("121320", "DCM", "Uncompressed predecessor")],
        )
    ]
    ds.ReferencedStudySequence = [
        item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1", ReferencedSOPInstanceUID=p.uid())
    ]
    ds.ReferencedPerformedProcedureStepSequence = [
        item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.3", ReferencedSOPInstanceUID=p.uid())
    ]
    ds.PerformedProcedureStepID = p("PPSID-7310-QZ")
    ds.PerformedProcedureStepDescription = p("Performed for Vorontsevich")
    ds.PerformedProcedureStepStartDate = p("20160512")
    ds.AcquisitionDateTime = p("20160512101527")
    return finish("nested_sequences", ds, p)


def _private_content(p: Plants, tag_prefix: str) -> tuple[Dataset, Dataset]:
    inner = item(
        PatientName=p(f"Innerprivat^Sholpan^{tag_prefix}"),
        PatientID=p(f"PRIV-INNER-{tag_prefix}-881"),
    )
    deeper = Dataset()
    deeper.private_block(0x0011, "QZ NESTED PRIVATE", create=True).add_new(
        0x01, "LO", p(f"Nested private note {tag_prefix} Kenzhebaev")
    )
    inner.private_block(0x0011, "QZ NESTED PRIVATE", create=True).add_new(0x02, "SQ", [deeper])
    p("QZ NESTED PRIVATE")
    return inner, deeper


def private_explicit() -> Hostile:
    """MR, explicit VR: private creators and data elements of several VRs, private sequences with
    person names, private elements inside public sequences, an orphan private element, public
    attributes sent as UN."""
    p = Plants(2)
    ds = bundled("MR_small.dcm")
    _overwrite_base(ds, p, ["Privatova^Zhanna"], "20110919")
    _new_uids(ds, p)
    ds.PatientName = p("Privatova^Zhanna^Kairatovna")
    ds.PatientID = p("KZ-PZ-3310975")
    ds.InstitutionName = p("Almaty City Clinic 4 Privatny")
    block = ds.private_block(0x0009, "QZ Karakolskaya Bolnitsa", create=True)
    p("QZ Karakolskaya Bolnitsa")
    block.add_new(0x01, "LO", p("Private LO Zhanna Privatova"))
    block.add_new(0x02, "PN", p("Privatperson^Yerlan"))
    block.add_new(0x03, "UT", p("Private UT: patient Privatova, born 1969-03-21, ward 5"))
    block.add_new(0x04, "OB", p("Private OB bytes Tokhtarova").encode("utf-8") + b"\x00")
    block.add_new(0x05, "SH", p("PRVSH-4471QZ"))
    block.add_new(0x06, "DA", p("19690321"))
    block.add_new(0x07, "UI", p.uid())
    inner, _ = _private_content(p, "EXP")
    block.add_new(0x10, "SQ", [inner])
    ds.SourceImageSequence = [
        item(ReferencedSOPClassUID=MRImageStorage, ReferencedSOPInstanceUID=p.uid())
    ]
    ds.SourceImageSequence[0].private_block(0x0029, "QZ IN PUBLIC SQ", create=True).add_new(
        0x01, "LO", p("Private inside public SQ Abenova")
    )
    p("QZ IN PUBLIC SQ")
    ds.add_new(0x00131001, "LO", p("Orphan private Seitkaliev"))  # no (0013,0010) creator
    # public attributes that a forwarding system sent as UN (explicit VR)
    ds[0x00101040] = raw(0x00101040, "UN", p("UN address Dostyk 44, Almaty").encode("utf-8"))
    ds[0x00101002] = raw(
        0x00101002,
        "UN",
        implicit_items(
            item(PatientID=p("UN-OPIDSEQ-66120"), IssuerOfPatientID=p("Shymkent UN Issuer"))
        ),
    )
    return finish("private_explicit", ds, p, ExplicitVRLittleEndian)


def private_implicit() -> Hostile:
    """MR, implicit VR little endian: every private element is UN to a reader without the
    creator's dictionary; a private SQ of undefined length (parsed as SQ) and one of defined length
    (left as UN bytes) both hold person names."""
    p = Plants(3)
    ds = bundled("MR_small_implicit.dcm")
    _overwrite_base(ds, p, ["Implitsitova^Aruzhan"], "20130227")
    _new_uids(ds, p)
    ds.PatientName = p("Implitsitova^Aruzhan^Serikovna")
    ds.PatientID = p("KZ-IA-8841220")
    ds.OtherPatientIDs = p("IMPL-OPID-55071")
    block = ds.private_block(0x0019, "QZ IMPLICIT VENDOR", create=True)
    p("QZ IMPLICIT VENDOR")
    block.add_new(0x01, "LO", p("Implicit private LO Baimukhanov"))
    block.add_new(0x02, "PN", p("Implicitperson^Daulet"))
    block.add_new(0x03, "LT", p("Implicit LT: seen 2002-10-14 by Dr Orazbekova"))
    inner, _ = _private_content(p, "IMP")
    block.add_new(0x10, "SQ", [inner])
    hidden = item(
        PatientName=p("Hiddenova^Dinara"),
        PatientBirthDate=p("19720615"),
        ReferencedSOPInstanceUID=p.uid(),
    )
    # (0019,xx11): a private SQ written with a defined length: an implicit VR reader sees UN bytes
    ds[block.get_tag(0x11)] = raw(block.get_tag(0x11), None, implicit_items(hidden))
    # (0019,xx12): the same with an undefined length and undefined-length items (pydicom writes
    # the sequence delimiter)
    undefined = implicit_items(item(PatientName=p("Undefinedlen^Marzhan")), defined_length=False)
    ds[block.get_tag(0x12)] = RawDataElement(
        Tag(block.get_tag(0x12)), None, 0xFFFFFFFF, undefined, 0, True, True
    )
    return finish("private_implicit", ds, p, ImplicitVRLittleEndian)


def _content(
    value_type: str, concept: tuple[str, str, str], relationship: str = "CONTAINS", **values: object
) -> Dataset:
    it = item(
        RelationshipType=relationship,
        ValueType=value_type,
        ConceptNameCodeSequence=[code(*concept)],
    )
    for k, v in values.items():
        setattr(it, k, v)
    return it


def _sr_tree(p: Plants, tag: str, image_ref: tuple[str, str] | None = None) -> list[Dataset]:
    """A content tree: TEXT, PNAME, DATE, DATETIME, TIME, UIDREF, CODE (and IMAGE) items, nested
    three containers deep."""
    level3 = _content(
        "CONTAINER",
        ("121070", "DCM", "Findings"),
        ContinuityOfContent="SEPARATE",
        ContentSequence=[
            _content(
                "TEXT",
                ("121071", "DCM", "Finding"),
                TextValue=p(f"Deepest finding {tag}: Turdubekova reported pain since 2003-08-19"),
            ),
            _content(
                "PNAME",
                ("121008", "DCM", "Person Observer Name"),
                PersonName=p(f"Deepobserver^Kanykei^{tag}"),
            ),
            _content("DATE", ("111536", "DCM", "Date of Examination"), Date=p("20030819")),
        ],
    )
    level2 = _content(
        "CONTAINER",
        ("111028", "DCM", "Image Library"),
        ContinuityOfContent="SEPARATE",
        ContentSequence=[
            level3,
            _content(
                "DATETIME", ("111526", "DCM", "DateTime Started"), DateTime=p("19990214083015")
            ),
            _content("TIME", ("111527", "DCM", "DateTime Ended"), Time="083015"),
            _content("UIDREF", ("121232", "DCM", "Source series for segmentation"), UID=p.uid()),
            _content(
                "CODE",
                ("121071", "DCM", "Finding"),
                ConceptCodeSequence=[code("4147007", "SCT", "Mass")],
            ),
        ],
    )
    top = [
        _content(
            "TEXT",
            ("121106", "DCM", "Comment"),
            TextValue=p(f"Report for Zhusupova Aizada {tag}, ID KG-ZA-7710, tel +996700112233"),
        ),
        _content(
            "PNAME",
            ("121008", "DCM", "Person Observer Name"),
            "HAS OBS CONTEXT",
            PersonName=p(f"Observerova^Nazira^{tag}"),
        ),
        _content("DATE", ("111536", "DCM", "Date of Examination"), Date=p("20120305")),
        level2,
    ]
    if image_ref is not None:
        top.append(
            _content(
                "IMAGE",
                ("121080", "DCM", "Best illustration of finding"),
                ReferencedSOPSequence=[
                    item(ReferencedSOPClassUID=image_ref[0], ReferencedSOPInstanceUID=image_ref[1])
                ],
            )
        )
    p("Zhusupova Aizada")
    p("Turdubekova")
    p("KG-ZA-7710")
    p("+996700112233")
    return top


def structured_report() -> Hostile:
    """Comprehensive SR: PHI in TEXT, PNAME, DATE, DATETIME, UIDREF content items at every depth,
    in verifying observers and organisations."""
    p = Plants(4)
    ds = bundled("test-SR.dcm")
    for kw in ("ContentSequence", "VerifyingObserverSequence"):
        del ds[kw]  # replaced below
    _overwrite_base(ds, p, ["Srpatientova^Begimai"], "20120305")
    _new_uids(ds, p)
    ds.PatientName = p("Srpatientova^Begimai^Talantovna")
    ds.PatientID = p("KG-SB-2209184")
    ds.PatientBirthDate = p("19640229")
    ds.AccessionNumber = p("ACC-SR-880417")
    ds.ReferringPhysicianName = p("Srreferrer^Almazbek")
    ds.ContentSequence = _sr_tree(p, "SR")
    ds.VerifyingObserverSequence = [
        item(
            VerifyingObserverName=p("Verifikatova^Gulnara"),
            VerifyingOrganization=p("Bishkek Diagnostic Centre Verif"),
            VerificationDateTime=p("20120305174400"),
            VerifyingObserverIdentificationCodeSequence=[
                code("VO-7713-QZ", "99QZ", p("Verifikatova badge"))
            ],
        )
    ]
    ds.ParticipantSequence = [
        item(
            ParticipationType="ENT",
            ParticipationDateTime=p("20120305174500"),
            PersonName=p("Participantov^Erlan"),
            InstitutionName=p("Osh Participant Hospital"),
        )
    ]
    ds.CompletionFlagDescription = p("Completed by Dr Verifikatova")
    return finish("structured_report", ds, p)


def _text_bitmap(text: str, rows: int, cols: int) -> bytes:
    """A 1-bit overlay plane (PS3.3 C.9.2.1.1: row by row, least significant bit first) that
    draws ``text``."""
    img = Image.new("1", (cols, rows), 0)
    ImageDraw.Draw(img).text((1, 1), text, fill=1)
    bits = np.asarray(img, dtype=np.uint8).reshape(-1)
    packed = np.packbits(bits, bitorder="little").tobytes()
    return packed + (b"\x00" if len(packed) % 2 else b"")


def overlays_and_graphics() -> Hostile:
    """MR with two overlay planes (text in description, label and comments; a bitmap that draws a
    name), curve data text (50xx) and a graphic annotation with a text object."""
    p = Plants(5)
    ds = bundled("MR_small.dcm")
    _overwrite_base(ds, p, ["Overlayeva^Saltanat"], "20140611")
    _new_uids(ds, p)
    ds.PatientName = p("Overlayeva^Saltanat^Askarovna")
    ds.PatientID = p("KG-OS-6630117")
    rows, cols = int(ds.Rows), int(ds.Columns)
    bitmap = _text_bitmap("OVERLAYEVA S", rows, cols)
    p.blobs.append(bitmap)
    for group, kind in ((0x6000, "G"), (0x6002, "R")):
        ds.add_new(group << 16 | 0x0010, "US", rows)
        ds.add_new(group << 16 | 0x0011, "US", cols)
        ds.add_new(group << 16 | 0x0022, "LO", p(f"Overlay description Overlayeva {group:04X}"))
        ds.add_new(group << 16 | 0x0040, "CS", kind)
        ds.add_new(group << 16 | 0x0050, "SS", [1, 1])
        ds.add_new(group << 16 | 0x0100, "US", 1)
        ds.add_new(group << 16 | 0x0102, "US", 0)
        ds.add_new(group << 16 | 0x1500, "LO", p(f"Label Overlayeva {group:04X}"))
        ds.add_new(group << 16 | 0x3000, "OW", bitmap)
        ds.add_new(
            group << 16 | 0x4000,
            "LT",
            p(f"Overlay comments: drawn by Dr Graficheva on 2001-12-09 ({group:04X})"),
        )
    p("Graficheva")
    ds.add_new(0x50000005, "US", 2)
    ds.add_new(0x50000022, "LO", p("Curve description Krivtsova"))
    ds.add_new(0x50002500, "LO", p("Curve label Krivtsova"))
    ds.GraphicAnnotationSequence = [
        item(
            GraphicLayer="LAYER1",
            ReferencedImageSequence=[
                item(ReferencedSOPClassUID=MRImageStorage, ReferencedSOPInstanceUID=p.uid())
            ],
            TextObjectSequence=[
                item(
                    UnformattedTextValue=p("Annotated: Overlayeva Saltanat DOB 1980-01-17"),
                    AnchorPointAnnotationUnits="PIXEL",
                    AnchorPoint=[10.0, 10.0],
                    AnchorPointVisibility="N",
                )
            ],
        )
    ]
    p("1980-01-17")
    return finish("overlays_and_graphics", ds, p)


# -- character sets ---------------------------------------------------------------------------
def cyrillic_iso_ir_144() -> Hostile:
    """CT in ISO_IR 144 (ISO 8859-5): Russian names, institution, free text with a date."""
    p = Plants(6)
    ds = bundled("CT_small.dcm")
    _overwrite_base(ds, p, ["Голубицкая^Евдокия"], "20150827")
    _new_uids(ds, p)
    ds.SpecificCharacterSet = "ISO_IR 144"
    ds.PatientName = p("Голубицкая^Евдокия^Феофановна")
    ds.PatientID = p("RU-GE-4471029")
    ds.PatientAddress = p("ул. Первомайская 14, кв. 9, Каракол")
    p("Первомайская")
    ds.InstitutionName = p("Иссык-Кульская областная больница")
    ds.ReferringPhysicianName = p("Нечипоренко^Святослав")
    ds.OperatorsName = p("Шахназарова^Людмила")
    ds.StudyDescription = p("КТ 13.06.1987 Голубицкая")
    ds.ImageComments = p("Направлена Нечипоренко 1999-04-17")
    p("Нечипоренко")
    ds.PatientComments = p("Дочь Голубицкой, тел. 0555 123 987")
    p("Голубицкой")
    ds.ReferencedPatientSequence = [
        item(ReferringPhysicianName=p("Вложенный^Терентий"), PatientName=p("Голубицкая^Вложенная"))
    ]
    return finish("cyrillic_iso_ir_144", ds, p)


def cyrillic_utf8() -> Hostile:
    """US RGB in ISO_IR 192: Russian and Tajik names (Tajik letters have no 8-bit Cyrillic set)."""
    p = Plants(7)
    ds = bundled("examples_rgb_color.dcm")
    _overwrite_base(ds, p, ["Рахмонзода^Ҷамшед"], "20180103")
    _new_uids(ds, p)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = p("Раҳмонзода^Ҷамшед^Қурбонович")
    ds.PatientID = p("TJ-RJ-2210877")
    ds.InstitutionName = p("Душанбинский медицинский центр Ҳаёт")
    ds.ReferringPhysicianName = p("Ёқубова^Малоҳат")
    ds.PerformingPhysicianName = p("Чернопятова^Ангелина")
    ds.PatientAddress = p("кӯчаи Рӯдакӣ 88, Душанбе")
    p("Рӯдакӣ")
    ds.ImageComments = p("Осмотр Раҳмонзода 05.09.1975 УЗИ")
    p("Раҳмонзода")
    p("05.09.1975")
    ds.AdditionalPatientHistory = p("Сестра Чернопятова сообщила")
    return finish("cyrillic_utf8", ds, p)


def _cp1251_fixture(name: str, base: str, charset: str | None, ns: int) -> Hostile:
    p = Plants(ns)
    ds = bundled(base)
    _overwrite_base(ds, p, ["Sidorenko^Olesya"], "20170414")
    _new_uids(ds, p)
    if charset:
        ds.SpecificCharacterSet = charset
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet

    def cp(tag: int, vr: str, text: str) -> None:
        ds[tag] = raw(tag, vr, p(text).encode("cp1251"))

    cp(0x00100010, "PN", "Сидоренко^Олеся^Игоревна")
    cp(0x00100020, "LO", "ВЦ-4471-ЖЗ")
    cp(0x00081030, "LO", "КТ 21.02.1964 Сидоренко")
    p("Сидоренко")
    p("21.02.1964")
    cp(0x00080080, "LO", "Больница Жемчужная")
    cp(0x00080090, "PN", "Кривошеин^Аркадий")
    cp(0x00101040, "LO", "ул. Ясная 7, Чолпон-Ата")
    p("Чолпон-Ата")
    cp(0x00204000, "LT", "Со слов Кривошеина, адрес Ясная 7")
    p("Кривошеина")
    ds.ReferencedPatientSequence = [
        item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.1.1", ReferencedSOPInstanceUID=p.uid())
    ]
    inner = ds.ReferencedPatientSequence[0]
    inner[0x00100010] = raw(0x00100010, "PN", p("Вложеннова^Серафима").encode("cp1251"))
    return finish(name, ds, p)


def cp1251_labelled_latin1() -> Hostile:
    """CT whose Cyrillic values are CP1251 bytes while Specific Character Set says ISO_IR 100: a
    reader decodes them as Latin-1 mojibake."""
    return _cp1251_fixture("cp1251_labelled_latin1", "CT_small.dcm", "ISO_IR 100", 11)


def cp1251_no_charset() -> Hostile:
    """MR with CP1251 bytes and no Specific Character Set at all (default repertoire)."""
    return _cp1251_fixture("cp1251_no_charset", "MR_small.dcm", None, 12)


def chinese_gb18030() -> Hostile:
    """CT in GB18030: a name with alphabetic and ideographic groups, institution, free text that
    mixes vocabulary terms with a name."""
    p = Plants(8)
    ds = bundled("CT_small.dcm")
    _overwrite_base(ds, p, ["Sima^Yichen=司马^翊晨"], "20191126")
    _new_uids(ds, p)
    ds.SpecificCharacterSet = "GB18030"
    ds.PatientName = p("Sima^Yichen=司马^翊晨")
    ds.PatientID = p("XJ-SY-6602913")
    ds.InstitutionName = p("乌鲁木齐市第七人民医院")
    ds.ReferringPhysicianName = p("欧阳^婧瑶")
    ds.OperatorsName = p("慕容^皓轩")
    ds.StudyDescription = p("胸部平扫 司马翊晨")
    p("司马翊晨")
    ds.ImageComments = p("患者司马翊晨 生于1966年3月8日 电话13899123456")
    p("13899123456")
    ds.PatientAddress = p("新疆乌鲁木齐市天山区解放南路88号")
    return finish("chinese_gb18030", ds, p)


def chinese_utf8() -> Hostile:
    """SC RGB in ISO_IR 192: Chinese and Uyghur names, nested."""
    p = Plants(9)
    ds = bundled("SC_rgb_small_odd.dcm")
    _overwrite_base(ds, p, ["Zhuge^Mingyue=诸葛^明月"], "20200908")
    _new_uids(ds, p)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = p("Zhuge^Mingyue=诸葛^明月")
    ds.PatientID = p("XJ-ZM-1180452")
    ds.InstitutionName = p("喀什地区第一人民医院")
    ds.ReferringPhysicianName = p("Abdurehim^Nurmemet=ئابدۇرېھىم^نۇرمەمەت")
    ds.PatientComments = p("陪同家属 诸葛明月 之女")
    p("诸葛明月")
    ds.ReferencedPatientSequence = [item(PatientName=p("上官^婉儿"), PatientID=p("XJ-NESTED-5521"))]
    return finish("chinese_utf8", ds, p)


def central_asian_utf8() -> Hostile:
    """US multi-frame (JPEG) in ISO_IR 192: Kyrgyz and Kazakh names, per-frame text two levels down."""
    p = Plants(10)
    ds = bundled("examples_ybr_color.dcm")
    _overwrite_base(ds, p, ["Асанов^Бакыт"], "20210722")
    _new_uids(ds, p)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = p("Асанов^Бакыт^Үсөнбекович")
    ds.PatientID = p("KG-AB-0041977")
    ds.OtherPatientIDs = p("KZ-ӘН-5531907")
    ds.ReferringPhysicianName = p("Әбенов^Нұрлан")
    ds.OperatorsName = p("Жұмабекова^Ғалия")
    ds.PerformingPhysicianName = p("Өмүрбекова^Нургүл")
    ds.InstitutionName = p("Нарын облустук ооруканасы Үмүт")
    ds.PatientAddress = p("Жибек Жолу көчөсү 12, Нарын")
    p("Жибек Жолу")
    ds.StudyDescription = p("УЗИ Асанов Бакыт 1990-10-01")
    p("1990-10-01")
    ds.PerformedProcedureStepDescription = p("Қарау Әбенов Нұрлан")
    p("Әбенов")
    p("Нұрлан")
    frames = int(ds.NumberOfFrames)
    ds.PerFrameFunctionalGroupsSequence = [
        item(
            FrameContentSequence=[
                item(
                    FrameComments=p(f"Кадр {i}: Асанов белгиледи ({i:02d})"),
                    FrameAcquisitionNumber=i + 1,
                )
            ]
        )
        for i in range(min(frames, 3))
    ]
    p("Асанов")
    return finish("central_asian_utf8", ds, p)


HOSTILE: dict[str, Callable[[], Hostile]] = {
    "nested_sequences": nested_sequences,
    "private_explicit": private_explicit,
    "private_implicit": private_implicit,
    "structured_report": structured_report,
    "overlays_and_graphics": overlays_and_graphics,
    "cyrillic_iso_ir_144": cyrillic_iso_ir_144,
    "cyrillic_utf8": cyrillic_utf8,
    "cp1251_labelled_latin1": cp1251_labelled_latin1,
    "cp1251_no_charset": cp1251_no_charset,
    "chinese_gb18030": chinese_gb18030,
    "chinese_utf8": chinese_utf8,
    "central_asian_utf8": central_asian_utf8,
}


# -- two patients, several studies ------------------------------------------------------------
@dataclass
class _Study:
    key: str
    day: str
    time: str
    uid: str = ""
    series: dict[str, str] = field(default_factory=dict)
    frames: dict[str, str] = field(default_factory=dict)


# Study dates nine or more years apart, so that a shifted date can only equal another original
# date if the offset is that large (the tests check the offsets are smaller).
PATIENTS = {
    "A": {
        "name": "Асанбекова^Бурулай^Төлөнбековна",
        "id": "KG-AB-77015533",
        "birth": "19580117",
        "studies": [
            ("A1", "20030314", "091512"),
            ("A2", "20120105", "143005"),
            ("A3", "20210617", "101010"),
        ],
    },
    "B": {
        "name": "Әбенова^Нұргүл^Серікқызы",
        "id": "KZ-AN-30021549",
        "birth": "19740908",
        "studies": [("B1", "20061102", "080000"), ("B2", "20190719", "160245")],
    },
}


def _instance(
    kind: str, pkey: str, study: _Study, series_key: str, accession: str, p: Plants, number: int
) -> Dataset:
    pat = PATIENTS[pkey]
    ds = bundled("CT_small.dcm" if kind == "CT" else "MR_small.dcm")
    _overwrite_base(ds, p, [pat["name"]], study.day, study.time)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = p(pat["name"])
    ds.PatientID = p(pat["id"])
    ds.PatientBirthDate = p(pat["birth"])
    ds.AccessionNumber = p(accession)
    ds.StudyDate, ds.StudyTime = p(study.day), study.time
    ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = ds.InstanceCreationDate = p(study.day)
    ds.AcquisitionDateTime = p(study.day + study.time)
    if not study.uid:
        study.uid = p.uid()
    if series_key not in study.series:
        study.series[series_key] = p.uid()
    if series_key[:1] not in study.frames:  # series S1 and S2 share a frame of reference
        study.frames[series_key[:1]] = p.uid()
    ds.StudyInstanceUID = p(study.uid)
    ds.SeriesInstanceUID = p(study.series[series_key])
    ds.FrameOfReferenceUID = p(study.frames[series_key[:1]])
    ds.SOPInstanceUID = p.uid()
    ds.InstanceNumber = number
    ds.StudyID = p(f"{study.key}-STUDY-{pat['id'][-4:]}")
    ds.InstitutionName = p(f"Hospital of study {study.key} {pat['id'][-6:]}")
    return ds


def _study_ref(uid: str) -> Dataset:
    return item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1", ReferencedSOPInstanceUID=uid)


def two_patients() -> list[Hostile]:
    """Patient A: A1 CT (series of two, plus a derived series whose Source Image Sequence and
    Referenced Series Sequence point at the first), A2 MR (two instances sharing a frame of
    reference; the second references the first, and A1 as a prior study), A3 SR (evidence and an
    IMAGE item pointing at A2's instances). Patient B: B1 CT (two instances), B2 CT referencing
    B1's first instance as a comparison, and B1 as a prior study."""
    uids = itertools.count(1)  # one UID sequence for the whole corpus
    studies = {
        k: _Study(k, day, time) for pat in PATIENTS.values() for k, day, time in pat["studies"]
    }
    out: list[Hostile] = []

    def new(kind: str, pkey: str, skey: str, series: str, acc: str) -> tuple[Dataset, Plants]:
        p = Plants(100, uids)
        return _instance(kind, pkey, studies[skey], series, acc, p, len(out) + 1), p

    def emit(ds: Dataset, p: Plants, pkey: str, skey: str, label: str) -> None:
        out.append(finish(label, ds, p, patient=pkey, study=skey))

    a1, a2, a3, b1 = studies["A1"], studies["A2"], studies["A3"], studies["B1"]
    ct1, p = new("CT", "A", "A1", "S1", "ACC-A1-90017")
    emit(ct1, p, "A", "A1", "A1-CT-1")
    ct2, p = new("CT", "A", "A1", "S1", "ACC-A1-90017")
    ct2.ReferencedImageSequence = [
        item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=ct1.SOPInstanceUID)
    ]
    emit(ct2, p, "A", "A1", "A1-CT-2")
    der, p = new("CT", "A", "A1", "S2", "ACC-A1-90017")
    der.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    der.SourceImageSequence = [
        item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=ct1.SOPInstanceUID),
        item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=ct2.SOPInstanceUID),
    ]
    der.ReferencedSeriesSequence = [
        item(
            SeriesInstanceUID=ct1.SeriesInstanceUID,
            ReferencedInstanceSequence=[
                item(
                    ReferencedSOPClassUID=CTImageStorage,
                    ReferencedSOPInstanceUID=ct1.SOPInstanceUID,
                )
            ],
        )
    ]
    emit(der, p, "A", "A1", "A1-CT-derived")
    mr1, p = new("MR", "A", "A2", "M1", "ACC-A2-90233")
    emit(mr1, p, "A", "A2", "A2-MR-1")
    mr2, p = new("MR", "A", "A2", "M1", "ACC-A2-90233")
    mr2.ReferencedImageSequence = [
        item(ReferencedSOPClassUID=MRImageStorage, ReferencedSOPInstanceUID=mr1.SOPInstanceUID)
    ]
    mr2.ReferencedStudySequence = [_study_ref(a1.uid)]
    emit(mr2, p, "A", "A2", "A2-MR-2")

    pat = PATIENTS["A"]
    p = Plants(100, uids)
    sr = bundled("test-SR.dcm")
    for kw in (
        "ContentSequence",
        "VerifyingObserverSequence",
        "PredecessorDocumentsSequence",
        "PertinentOtherEvidenceSequence",
    ):
        if kw in sr:
            del sr[kw]
    _overwrite_base(sr, p, [pat["name"]], a3.day, a3.time)
    sr.SpecificCharacterSet = "ISO_IR 192"
    sr.PatientName, sr.PatientID, sr.PatientBirthDate = (
        p(pat["name"]),
        p(pat["id"]),
        p(pat["birth"]),
    )
    sr.AccessionNumber = p("ACC-A3-91102")
    a3.uid = p.uid()
    sr.StudyInstanceUID = a3.uid
    sr.SeriesInstanceUID = p.uid()
    sr.SOPInstanceUID = p.uid()
    sr.SOPClassUID = ComprehensiveSRStorage
    sr.StudyDate, sr.StudyTime, sr.ContentDate = p(a3.day), a3.time, p(a3.day)
    sr.ContentSequence = _sr_tree(p, "A3", (MRImageStorage, mr2.SOPInstanceUID))
    sr.CurrentRequestedProcedureEvidenceSequence = [
        item(
            StudyInstanceUID=a2.uid,
            ReferencedSeriesSequence=[
                item(
                    SeriesInstanceUID=mr1.SeriesInstanceUID,
                    ReferencedSOPSequence=[
                        item(
                            ReferencedSOPClassUID=MRImageStorage,
                            ReferencedSOPInstanceUID=mr1.SOPInstanceUID,
                        ),
                        item(
                            ReferencedSOPClassUID=MRImageStorage,
                            ReferencedSOPInstanceUID=mr2.SOPInstanceUID,
                        ),
                    ],
                )
            ],
        )
    ]
    sr.CompletionFlag, sr.VerificationFlag = "COMPLETE", "UNVERIFIED"
    emit(sr, p, "A", "A3", "A3-SR")

    c1, p = new("CT", "B", "B1", "S1", "ACC-B1-40021")
    emit(c1, p, "B", "B1", "B1-CT-1")
    c2, p = new("CT", "B", "B1", "S1", "ACC-B1-40021")
    emit(c2, p, "B", "B1", "B1-CT-2")
    c3, p = new("CT", "B", "B2", "S1", "ACC-B2-40388")
    c3.ReferencedImageSequence = [
        item(
            ReferencedSOPClassUID=CTImageStorage,
            ReferencedSOPInstanceUID=c1.SOPInstanceUID,
            PurposeOfReferenceCodeSequence=[code("121314", "DCM", "Comparison image")],
        )
    ]
    c3.ReferencedStudySequence = [_study_ref(b1.uid)]
    emit(c3, p, "B", "B2", "B2-CT-1")
    return out


def study_datetimes() -> dict[str, dt.datetime]:
    """Study key -> its original study date and time."""
    return {
        key: dt.datetime.strptime(day + time, "%Y%m%d%H%M%S")
        for pat in PATIENTS.values()
        for key, day, time in pat["studies"]
    }
