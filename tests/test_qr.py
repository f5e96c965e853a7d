"""DIMSE Query/Retrieve (PS3.4 C.4) through real peers: dcmtk's findscu, getscu, movescu and
storescp, and Debian's Orthanc, against a running ``imx serve`` holding instances that dcmtk's
storescu sent. What they get back is checked against the index and the stored objects, read
directly from the data folder."""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from dicomfiles import local_test_files, make_ct_series, storescu
from pydicom import dcmread
from pydicom.uid import RLELossless
from services import ImxServer, dcmtk_env, free_port, wait_port
from sqlalchemy import select

from dicom_node.qr import IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, parse_find, proposed_contexts
from storage.index import Index, Instance, Partner, Patient, Series, Study
from storage.query import StoredInstance

pytestmark = pytest.mark.peer


# -- the archive every test here queries --------------------------------------------------------------
@dataclass
class Stored:
    """What the index holds for one partner: study UID -> facts, read straight from its tables."""

    partner_id: int
    studies: dict[str, dict] = field(default_factory=dict)

    def sops(self, study_uid: str | None = None) -> dict[str, dict]:
        return {
            sop: inst
            for uid, st in self.studies.items()
            if study_uid in (None, uid)
            for se in st["series"].values()
            for sop, inst in se["instances"].items()
        }


@dataclass
class Archive:
    server: ImxServer
    base: Path
    partners: dict[str, Stored]
    rle_study: str  # DEMO's study holding the RLE Lossless MR instance

    @property
    def port(self) -> int:
        return self.server.dicom_port

    def object_path(self, key: str) -> Path:
        return self.server.data_dir / "objects" / key

    def index(self) -> Index:
        return Index(f"sqlite:///{self.server.data_dir / 'index.sqlite3'}")


def _ct(folder: Path, count: int, *, name: str, pid: str, date: str, description: str) -> list[Path]:
    paths = make_ct_series(folder, count, patient=name, patient_id=pid)
    for p in paths:
        ds = dcmread(p)
        ds.StudyDate = ds.SeriesDate = date
        ds.StudyDescription = description
        ds.save_as(p, enforce_file_format=True)
    return paths


def _rle_mr(folder: Path) -> Path:
    src = next(p for p in local_test_files() if p.name == "MR_small_RLE.dcm")
    ds = dcmread(src)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    folder.mkdir(parents=True, exist_ok=True)
    ds.PatientName, ds.PatientID, ds.StudyDate = "Roe^Richard", "HOSP-000777", "20230601"
    out = folder / "mr_rle.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def _send(port: int, files: list[Path], aet: str, extra: list[str] | None = None) -> None:
    run = storescu(port, files, aet=aet, extra=["-v", *(extra or [])])
    assert run.returncode == 0, run.stderr
    assert (run.stdout + run.stderr).count("Received Store Response (Success)") == len(files), run.stderr


def _read_index(index: Index) -> dict[str, Stored]:
    out: dict[str, Stored] = {}
    with index.read() as s:
        rows = s.execute(
            select(Partner.name, Partner.id, Study, Patient.pseudonym, Series, Instance)
            .join(Study, Study.partner_id == Partner.id)
            .join(Patient, Study.patient_id == Patient.id)
            .join(Series, Series.study_id == Study.id)
            .join(Instance, Instance.series_id == Series.id)
        ).all()
    for name, pid, st, pseudonym, se, inst in rows:
        part = out.setdefault(name, Stored(pid))
        study = part.studies.setdefault(
            st.study_uid,
            {"date": st.study_date, "patient": pseudonym, "description": st.description, "series": {}, "modalities": set()},
        )
        study["modalities"].add(se.modality)
        series = study["series"].setdefault(se.series_uid, {"modality": se.modality, "instances": {}})
        series["instances"][inst.sop_uid] = {"key": inst.object_key, "ts": inst.transfer_syntax}
    return out


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """One ``imx serve`` with three partners: DEMO (two CT studies, one RLE MR study), OTHER (a CT
    study of a patient with the same name and date as DEMO's first) and ORTHANC-HOSP (one CT
    study), each sent by storescu under the partner's AE title."""
    base = tmp_path_factory.mktemp("qr")
    server = ImxServer(base / "data")
    server.start()
    try:
        for args in (("OTHER", "--ae", "OTHERPACS", "--dest", f"127.0.0.1:{free_port()}"), ("ORTHANC-HOSP", "--ae", "ORTHANC")):
            added = server.imx("partner", "add", *args)
            assert added.returncode == 0, added.stderr
        a = _ct(base / "a", 3, name="Doe^Jane", pid="HOSP-000123", date="20240105", description="CT THORAX")
        b = _ct(base / "b", 2, name="Smith^John", pid="HOSP-000456", date="20240310", description="CT ABDOMEN")
        c = _ct(base / "c", 2, name="Doe^Jane", pid="OTH-99", date="20240105", description="CT THORAX")
        d = _ct(base / "d", 2, name="Orthanc^Olga", pid="ORT-1", date="20220202", description="CT HEAD")
        _send(server.dicom_port, a + b, "DEMOPACS")
        _send(server.dicom_port, [_rle_mr(base / "mr")], "DEMOPACS", ["-xr"])
        _send(server.dicom_port, c, "OTHERPACS")
        _send(server.dicom_port, d, "ORTHANC")
        index = Index(f"sqlite:///{server.data_dir / 'index.sqlite3'}")
        try:
            partners = _read_index(index)
        finally:
            index.close()
        demo = partners["DEMO"]
        assert len(demo.studies) == 3 and len(demo.sops()) == 6
        assert len(partners["OTHER"].studies) == 1 and len(partners["ORTHANC-HOSP"].studies) == 1
        rle = [uid for uid, st in demo.studies.items() if st["modalities"] == {"MR"}]
        assert len(rle) == 1 and next(iter(demo.sops(rle[0]).values()))["ts"] == RLELossless
        yield Archive(server, base, partners, rle[0])
    finally:
        server.stop()


# -- dcmtk helpers ----------------------------------------------------------------------------------------
def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout)


def findscu(arc: Archive, keys: dict[str, str], *, root: str = "-S", aet: str = "DEMOPACS", tmp: Path) -> tuple[list, str]:
    """findscu's responses (extracted to files, read back) and its log."""
    out = tmp / f"find-{time.monotonic_ns()}"
    out.mkdir()
    args = [a for k, v in keys.items() for a in ("-k", f"{k}={v}" if v else k)]
    run = _run(["findscu", "-v", root, "-aet", aet, "-aec", "IMX", "-X", "-od", str(out), *args, "127.0.0.1", str(arc.port)])
    assert run.returncode == 0, run.stderr
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))], run.stdout + run.stderr


def dataset_bytes(path: Path) -> bytes:
    """The data set of a DICOM file: everything after its File Meta Information (PS3.10 7.1),
    whose length (0002,0000) both pydicom and dcmtk write."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00" and data[136:138] == b"UL"
    return data[144 + int.from_bytes(data[140:144], "little") :]


def received_by_sop(folder: Path) -> dict[str, Path]:
    out = {}
    for p in folder.rglob("*"):
        if p.is_file():
            out[str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)] = p
    return out


def assert_same_as_stored(arc: Archive, received: Path, stored_key: str) -> None:
    """Byte for byte: the data set written by dcmtk in bit-preserving mode is the stored one."""
    assert dataset_bytes(received) == dataset_bytes(arc.object_path(stored_key))


def assert_decoded_equal(arc: Archive, received: Path, stored_key: str) -> None:
    """Converted (the receiver refused the stored syntax): same attributes, same pixels."""
    got, stored = dcmread(received), dcmread(arc.object_path(stored_key))
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert got.SOPInstanceUID == stored.SOPInstanceUID
    assert np.array_equal(got.pixel_array, stored.pixel_array)
    skip = {"PixelData", "PhotometricInterpretation", "PlanarConfiguration"}
    for elem in stored:
        if elem.keyword not in skip:
            assert got[elem.tag].value == elem.value, elem.keyword


# -- C-FIND -------------------------------------------------------------------------------------------------
def _uids(rsps: list, key: str = "StudyInstanceUID") -> set[str]:
    return {str(r.get(key)) for r in rsps}


def test_findscu_study_root_studies_series_images(archive: Archive, tmp_path: Path) -> None:
    demo = archive.partners["DEMO"]
    rsps, _ = findscu(
        archive,
        {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", "PatientName": "", "PatientID": "", "StudyDate": "",
         "ModalitiesInStudy": "", "NumberOfStudyRelatedInstances": "", "StudyDescription": ""},
        tmp=tmp_path,
    )
    assert _uids(rsps) == set(demo.studies)
    for r in rsps:
        st = demo.studies[r.StudyInstanceUID]
        assert r.QueryRetrieveLevel == "STUDY" and r.RetrieveAETitle == "IMX" and r.SpecificCharacterSet == "ISO_IR 192"
        assert r.StudyDate == st["date"] and str(r.PatientID) == st["patient"]
        assert int(r.NumberOfStudyRelatedInstances) == sum(len(se["instances"]) for se in st["series"].values())
        mods = r.ModalitiesInStudy if isinstance(r.ModalitiesInStudy, str) else list(r.ModalitiesInStudy)
        assert set([mods] if isinstance(mods, str) else mods) == st["modalities"]
        assert "Doe" not in str(r.PatientName) and "HOSP-" not in str(r.PatientID)  # pseudonyms only

    # SERIES and IMAGE levels under one study
    study = next(uid for uid, st in demo.studies.items() if len(demo.sops(uid)) == 3)
    rsps, _ = findscu(archive, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study, "SeriesInstanceUID": "", "Modality": ""}, tmp=tmp_path)
    assert _uids(rsps, "SeriesInstanceUID") == set(demo.studies[study]["series"])
    assert {r.Modality for r in rsps} == {"CT"}
    rsps, _ = findscu(archive, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study, "SOPInstanceUID": "", "InstanceNumber": ""}, tmp=tmp_path)
    assert _uids(rsps, "SOPInstanceUID") == set(demo.sops(study))
    assert sorted(int(r.InstanceNumber) for r in rsps) == [1, 2, 3]

    # a list of UIDs (PS3.4 C.2.2.2.2)
    two = sorted(demo.sops(study))[:2]
    rsps, _ = findscu(archive, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study, "SOPInstanceUID": "\\".join(two)}, tmp=tmp_path)
    assert sorted(_uids(rsps, "SOPInstanceUID")) == two


def test_findscu_wildcards_and_date_ranges(archive: Archive, tmp_path: Path) -> None:
    demo = archive.partners["DEMO"]
    dates = sorted(st["date"] for st in demo.studies.values())
    assert len(set(dates)) == 3

    def studies(keys: dict[str, str]) -> set[str]:
        return _uids(findscu(archive, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", **keys}, tmp=tmp_path)[0])

    def expect(pred) -> set[str]:  # type: ignore[no-untyped-def]
        return {uid for uid, st in demo.studies.items() if pred(st)}

    assert studies({"StudyDate": f"{dates[0]}-{dates[1]}"}) == expect(lambda st: dates[0] <= st["date"] <= dates[1])
    assert studies({"StudyDate": f"{dates[1]}-"}) == expect(lambda st: st["date"] >= dates[1])
    assert studies({"StudyDate": f"-{dates[0]}"}) == expect(lambda st: st["date"] <= dates[0])
    assert studies({"StudyDate": dates[2]}) == expect(lambda st: st["date"] == dates[2])
    assert studies({"StudyDate": "19000101-19001231"}) == set()

    one = next(iter(demo.studies.values()))["patient"]
    for pattern in (one, one[:-2] + "*", one[:-1] + "?", "*" + one[-3:]):
        assert studies({"PatientName": pattern}) == expect(lambda st, p=pattern: fnmatch.fnmatchcase(st["patient"], p)), pattern
    assert studies({"PatientID": one}) == expect(lambda st: st["patient"] == one)
    assert studies({"ModalitiesInStudy": "MR"}) == {archive.rle_study}
    assert studies({"ModalitiesInStudy": "CT\\MR"}) == set(demo.studies)
    assert studies({"StudyDescription": "CT THORAX"}) == expect(lambda st: st["description"] == "CT THORAX")


def test_findscu_patient_root(archive: Archive, tmp_path: Path) -> None:
    demo = archive.partners["DEMO"]
    patients = {st["patient"] for st in demo.studies.values()}
    rsps, _ = findscu(
        archive, {"QueryRetrieveLevel": "PATIENT", "PatientID": "", "PatientName": "", "NumberOfPatientRelatedStudies": ""},
        root="-P", tmp=tmp_path,
    )
    assert {str(r.PatientID) for r in rsps} == patients
    assert all(int(r.NumberOfPatientRelatedStudies) == 1 for r in rsps)
    assert all("StudyInstanceUID" not in r for r in rsps)

    one = sorted(patients)[0]
    rsps, _ = findscu(archive, {"QueryRetrieveLevel": "STUDY", "PatientID": one, "StudyInstanceUID": ""}, root="-P", tmp=tmp_path)
    assert _uids(rsps) == {uid for uid, st in demo.studies.items() if st["patient"] == one}
    rsps, _ = findscu(archive, {"QueryRetrieveLevel": "IMAGE", "PatientID": one, "SOPInstanceUID": ""}, root="-P", tmp=tmp_path)
    assert _uids(rsps, "SOPInstanceUID") == {
        sop for uid, st in demo.studies.items() if st["patient"] == one for sop in demo.sops(uid)
    }


def test_findscu_refusals(archive: Archive, tmp_path: Path) -> None:
    # the Study Root model has no PATIENT level: identifier does not match SOP class (0xA900)
    rsps, log = findscu(archive, {"QueryRetrieveLevel": "PATIENT", "PatientID": ""}, tmp=tmp_path)
    assert rsps == [] and "DataSetDoesNotMatchSOPClass" in log
    rsps, log = findscu(archive, {"PatientID": ""}, tmp=tmp_path)  # no level at all
    assert rsps == [] and "DataSetDoesNotMatchSOPClass" in log
    # a malformed range: unable to process (0xC000), the comment names the key, not the value
    rsps, log = findscu(archive, {"QueryRetrieveLevel": "STUDY", "StudyDate": "2024-01-01-02"}, tmp=tmp_path)
    assert rsps == [] and "UnableToProcess" in log and "StudyDate" in log
    # a matching key we cannot match on: treated as a return key, answered (Pending warning 0xFF01)
    rsps, log = findscu(archive, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", "ReferringPhysicianName": "X*"}, tmp=tmp_path)
    assert _uids(rsps) == set(archive.partners["DEMO"].studies)
    assert all(r.ReferringPhysicianName in (None, "") for r in rsps)


def test_parse_find_levels_per_model() -> None:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = "PATIENT"
    ds.PatientID = "P*"
    assert parse_find(ds, "patient").query == {"PatientID": "P*"}
    with pytest.raises(ValueError) as e:
        parse_find(ds, "study")
    assert e.value.status == IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS  # type: ignore[attr-defined]


# -- scoping ------------------------------------------------------------------------------------------------
def test_partners_never_see_each_others_studies(archive: Archive, tmp_path: Path) -> None:
    demo, other = archive.partners["DEMO"], archive.partners["OTHER"]
    (other_study,) = other.studies
    demo_study = next(iter(demo.studies))

    rsps, _ = findscu(archive, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", "StudyDate": "19000101-20991231"}, aet="OTHERPACS", tmp=tmp_path)
    assert _uids(rsps) == {other_study}
    rsps, _ = findscu(archive, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": demo_study}, aet="OTHERPACS", tmp=tmp_path)
    assert rsps == []
    rsps, _ = findscu(archive, {"QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": "\\".join(demo.sops())}, aet="OTHERPACS", tmp=tmp_path)
    assert rsps == []
    rsps, _ = findscu(archive, {"QueryRetrieveLevel": "PATIENT", "PatientID": ""}, root="-P", aet="OTHERPACS", tmp=tmp_path)
    assert {str(r.PatientID) for r in rsps} == {st["patient"] for st in other.studies.values()}
    rsps, _ = findscu(archive, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": other_study}, tmp=tmp_path)
    assert rsps == []  # and DEMO does not see OTHER's

    # C-GET of DEMO's study by OTHER: nothing comes back
    out = tmp_path / "get-other"
    out.mkdir()
    run = _run(["getscu", "-v", "-S", "-aet", "OTHERPACS", "-aec", "IMX", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                "-k", f"StudyInstanceUID={demo_study}", "127.0.0.1", str(archive.port)])
    assert run.returncode == 0, run.stderr
    assert "Received C-GET Response (Success)" in run.stdout + run.stderr, run.stderr
    assert list(out.iterdir()) == []

    # C-MOVE of DEMO's study by OTHER, to OTHER's own destination: nothing is sent
    got = tmp_path / "move-other"
    got.mkdir()
    port = free_port()
    assert archive.server.imx("partner", "dest", "OTHER", f"127.0.0.1:{port}").returncode == 0
    with storescp(port, got, "OTHERPACS"):
        run = _run(["movescu", "-v", "-S", "-aet", "OTHERPACS", "-aec", "IMX", "-aem", "OTHERPACS", "-k", "QueryRetrieveLevel=STUDY",
                    "-k", f"StudyInstanceUID={demo_study}", "127.0.0.1", str(archive.port)])
        assert run.returncode == 0, run.stderr
        assert "Received Final Move Response (Success)" in run.stdout + run.stderr
        # its own study does arrive: the destination works
        run = _run(["movescu", "-v", "-S", "-aet", "OTHERPACS", "-aec", "IMX", "-aem", "OTHERPACS", "-k", "QueryRetrieveLevel=STUDY",
                    "-k", f"StudyInstanceUID={other_study}", "127.0.0.1", str(archive.port)])
        assert run.returncode == 0, run.stderr
    assert set(received_by_sop(got)) == set(other.sops())

    # DEMO cannot push its studies into OTHER's PACS, nor to an AE title nobody registered
    for dest in ("OTHERPACS", "NOSUCHPACS"):
        run = _run(["movescu", "-v", "-S", "-aet", "DEMOPACS", "-aec", "IMX", "-aem", dest, "-k", "QueryRetrieveLevel=STUDY",
                    "-k", f"StudyInstanceUID={demo_study}", "127.0.0.1", str(archive.port)])
        assert "MoveDestinationUnknown" in run.stdout + run.stderr, dest
    assert set(received_by_sop(got)) == set(other.sops())


# -- C-GET and C-MOVE --------------------------------------------------------------------------------------
class storescp:  # noqa: N801 - used as a context manager, like open()
    """dcmtk's storescp in bit-preserving mode (+B: it writes the data set exactly as received)."""

    def __init__(self, port: int, out: Path, aet: str, extra: list[str] | None = None) -> None:
        self.cmd = ["storescp", "+B", "-od", str(out), "-aet", aet, *(extra or []), str(port)]
        self.port = port

    def __enter__(self) -> storescp:
        self.proc = subprocess.Popen(self.cmd, env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, 30, self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_getscu_retrieves_stored_instances_byte_for_byte(archive: Archive, tmp_path: Path) -> None:
    demo = archive.partners["DEMO"]
    ct_study = next(uid for uid in demo.studies if len(demo.sops(uid)) == 3)

    def getscu(keys: list[str], extra: list[str], root: str = "-S") -> dict[str, Path]:
        out = tmp_path / f"get-{time.monotonic_ns()}"
        out.mkdir()
        run = _run(["getscu", "-v", root, "+B", *extra, "-aet", "DEMOPACS", "-aec", "IMX", "-od", str(out),
                    *(a for k in keys for a in ("-k", k)), "127.0.0.1", str(archive.port)])
        assert run.returncode == 0, run.stderr
        return received_by_sop(out)

    got = getscu(["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={ct_study}"], [])
    assert set(got) == set(demo.sops(ct_study))
    for sop, path in got.items():
        assert_same_as_stored(archive, path, demo.sops()[sop]["key"])

    # series and image levels, patient root
    series = next(iter(demo.studies[ct_study]["series"]))
    assert set(getscu(["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={ct_study}", f"SeriesInstanceUID={series}"], [])) == set(
        demo.sops(ct_study)
    )
    one = sorted(demo.sops(ct_study))[0]
    patient = demo.studies[ct_study]["patient"]
    assert set(getscu(["QueryRetrieveLevel=IMAGE", f"PatientID={patient}", f"StudyInstanceUID={ct_study}",
                       f"SeriesInstanceUID={series}", f"SOPInstanceUID={one}"], [], root="-P")) == {one}
    assert set(getscu(["QueryRetrieveLevel=PATIENT", f"PatientID={patient}"], [], root="-P")) == set(demo.sops(ct_study))

    # the RLE instance: getscu proposes RLE and the uncompressed syntaxes in one context and the
    # node picks Explicit VR Little Endian, so it arrives decompressed, same instance, same pixels
    ((sop, inst),) = demo.sops(archive.rle_study).items()
    for extra in ([], ["+xr"]):
        got = getscu(["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={archive.rle_study}"], extra)
        assert set(got) == {sop}
        assert_decoded_equal(archive, got[sop], inst["key"])


def test_retrieve_with_a_missing_object_reports_the_failed_suboperation(archive: Archive, tmp_path: Path) -> None:
    """A stored object gone missing: the other instances still go, the answer is Warning (0xB000)
    with the failure counted; when every sub-operation fails it is 0xA702 (PS3.4 C.4.3.1.4)."""
    demo = archive.partners["DEMO"]
    ct_study = next(uid for uid in demo.studies if len(demo.sops(uid)) == 3)
    sop, inst = sorted(demo.sops(ct_study).items())[0]
    obj = archive.object_path(inst["key"])
    hidden = obj.with_name(obj.name + ".hidden")
    obj.rename(hidden)
    try:
        def getscu(keys: list[str]) -> tuple[str, dict[str, Path]]:
            out = tmp_path / f"get-{time.monotonic_ns()}"
            out.mkdir()
            run = _run(["getscu", "-v", "-S", "-aet", "DEMOPACS", "-aec", "IMX", "-od", str(out),
                        *(a for k in keys for a in ("-k", k)), "127.0.0.1", str(archive.port)])
            return run.stdout + run.stderr, received_by_sop(out)

        log, got = getscu(["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={ct_study}"])
        assert set(got) == set(demo.sops(ct_study)) - {sop}
        assert "Received C-GET Response (Warning: SubOperationsCompleteOneOrMoreFailures)" in log, log
        assert "Number of Completed Suboperations : 2" in log and "Number of Failed Suboperations    : 1" in log, log
        log, got = getscu(["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={ct_study}", f"SOPInstanceUID={sop}"])
        assert got == {}
        assert "Received C-GET Response (Refused: OutOfResourcesSubOperations)" in log, log  # 0xA702
        assert "Number of Failed Suboperations    : 1" in log, log
    finally:
        hidden.rename(obj)


def test_cget_requestor_taking_only_the_stored_syntax_gets_it_as_stored(archive: Archive) -> None:
    """A C-GET requestor (pynetdicom here) proposing RLE alone, with the SCP role (PS3.7 D.3.3.4),
    receives the stored RLE data set byte for byte."""
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import MRImageStorage, StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

    ((sop, inst),) = archive.partners["DEMO"].sops(archive.rle_study).items()
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event: evt.Event) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = (str(event.context.transfer_syntax), event.encoded_dataset(include_meta=False))
        return 0x0000

    ae = AE(ae_title="DEMOPACS")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(MRImageStorage, RLELossless)
    assoc = ae.associate(
        "127.0.0.1", archive.port, ae_title="IMX", ext_neg=[build_role(MRImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        from pydicom.dataset import Dataset

        q = Dataset()
        q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", archive.rle_study
        statuses = [int(status.Status) for status, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000
    assert set(received) == {sop}
    ts, data = received[sop]
    assert ts == RLELossless
    assert data == dataset_bytes(archive.object_path(inst["key"]))


def test_movescu_to_registered_destination_byte_for_byte(archive: Archive, tmp_path: Path) -> None:
    demo = archive.partners["DEMO"]
    port = free_port()
    # no destination registered yet: Move Destination unknown (0xA801)
    run = _run(["movescu", "-v", "-S", "-aet", "DEMOPACS", "-aec", "IMX", "-aem", "DEMOPACS",
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={next(iter(demo.studies))}", "127.0.0.1", str(archive.port)])
    assert "MoveDestinationUnknown" in run.stdout + run.stderr

    for bad in ("127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", ":104"):
        refused = archive.server.imx("partner", "dest", "DEMO", bad)
        assert refused.returncode == 2 and "HOST:PORT" in refused.stderr, bad
    assert archive.server.imx("partner", "dest", "NOSUCH", f"127.0.0.1:{port}").returncode == 1
    set_dest = archive.server.imx("partner", "dest", "DEMO", f"127.0.0.1:{port}")
    assert set_dest.returncode == 0, set_dest.stderr
    plain, everything = tmp_path / "plain", tmp_path / "all"
    plain.mkdir()
    everything.mkdir()

    def move(study: str, ok: bool = True) -> str:
        run = _run(["movescu", "-v", "-S", "-aet", "DEMOPACS", "-aec", "IMX", "-aem", "DEMOPACS",
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(archive.port)])
        assert (run.returncode == 0) is ok, run.stderr
        return run.stdout + run.stderr

    # storescp's default: uncompressed syntaxes only. CT goes as stored; RLE is decompressed.
    with storescp(port, plain, "DEMOPACS"):
        for study in demo.studies:
            assert "Received Final Move Response (Success)" in move(study)
    got = received_by_sop(plain)
    assert set(got) == set(demo.sops())
    for sop, path in got.items():
        inst = demo.sops()[sop]
        if inst["ts"] == RLELossless:
            assert_decoded_equal(archive, path, inst["key"])
        else:
            assert_same_as_stored(archive, path, inst["key"])

    # a destination that takes every syntax gets every instance exactly as stored
    with storescp(port, everything, "DEMOPACS", ["--accept-all"]):
        for study in demo.studies:
            move(study)
    got = received_by_sop(everything)
    assert set(got) == set(demo.sops())
    for sop, path in got.items():
        assert_same_as_stored(archive, path, demo.sops()[sop]["key"])

    # an identifier without a level or without the level's unique key: unable to process (0xC514)
    for keys in (["-k", f"StudyInstanceUID={next(iter(demo.studies))}"], ["-k", "QueryRetrieveLevel=SERIES"]):
        run = _run(["movescu", "-v", "-S", "-aet", "DEMOPACS", "-aec", "IMX", "-aem", "DEMOPACS", *keys, "127.0.0.1", str(archive.port)])
        assert "Received Final Move Response (Failed: UnableToProcess)" in run.stdout + run.stderr, keys

    # the destination is down: it cannot be associated with, and the peer is told (0xA801)
    out = move(next(iter(demo.studies)), ok=False)
    assert "Received Final Move Response (Refused: MoveDestinationUnknown)" in out


def test_proposed_contexts_offer_stored_syntax_and_fallback() -> None:
    def inst(sop_class: str, ts: str) -> StoredInstance:
        return StoredInstance("1.2.3", sop_class, ts, "1.2", "1.2.1", "k", "store", 1, 1, 1, 1)

    ct, mr = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
    cxs = proposed_contexts([inst(ct, "1.2.840.10008.1.2.1"), inst(mr, RLELossless), inst(mr, "1.2.840.10008.1.2")])
    got = {(cx.abstract_syntax, tuple(cx.transfer_syntax)) for cx in cxs}
    assert got == {
        (ct, ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")),
        (mr, ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")),
        (mr, (RLELossless,)),
    }
    many = [inst(f"1.2.3.{i}", RLELossless) for i in range(100)]
    assert len(proposed_contexts(many)) == 128


# -- QIDO-RS and C-FIND agree ---------------------------------------------------------------------------------
def test_qido_rs_and_cfind_return_the_same_studies(archive: Archive, tmp_path: Path) -> None:
    """For the same query, C-FIND (a partner: its own studies) and QIDO-RS on the running node
    (loopback: every partner's studies) return the same studies, partner by partner."""
    demo, other = archive.partners["DEMO"], archive.partners["OTHER"]
    one = next(iter(demo.studies.values()))
    dates = sorted(st["date"] for p in (demo, other) for st in p.studies.values())
    queries = [
        {"PatientID": one["patient"]},
        {"PatientName": one["patient"][:-3] + "*"},
        {"PatientName": "*"},
        {"StudyDate": f"{dates[0]}-{dates[-2]}"},
        {"StudyDate": f"{dates[1]}-"},
        {"ModalitiesInStudy": "CT"},
        {"ModalitiesInStudy": "MR"},
        {"StudyDescription": "CT*"},
        {"StudyDescription": "CT THORAX", "StudyDate": f"-{dates[-1]}"},
    ]
    for q in queries:
        status, body = archive.server.http_get(f"/dicomweb/studies?{urllib.parse.urlencode(q)}")
        assert status == 200, body
        via_qido = {r["0020000D"]["Value"][0] for r in json.loads(body or b"[]")}
        assert via_qido, q  # every query here matches something
        for aet, part in (("DEMOPACS", demo), ("OTHERPACS", other)):
            rsps, _ = findscu(archive, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", **q}, aet=aet, tmp=tmp_path)
            assert _uids(rsps) == via_qido & set(part.studies), (aet, q)


# -- Orthanc as a partner archive ------------------------------------------------------------------------------
class Orthanc:
    """Debian's Orthanc on free ports with a throw-away config; our node is its modality "imx"."""

    def __init__(self, workdir: Path, imx_port: int) -> None:
        self.workdir, self.dicom_port, self.http_port = workdir, free_port(), free_port()
        config = {
            "Name": "imx-test",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "Plugins": [],
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": "ORTHANC",
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {"imx": ["IMX", "127.0.0.1", imx_port]},
            "SyncStorageArea": False,
        }
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "orthanc.json").write_text(json.dumps(config))
        self.log = open(workdir / "orthanc.log", "wb")
        self.proc = subprocess.Popen(
            ["Orthanc", str(workdir / "orthanc.json")], env=dcmtk_env(), stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir
        )
        wait_port(self.http_port, 60, self.proc)
        wait_port(self.dicom_port, 60, self.proc)

    def call(self, method: str, path: str, body: object = None) -> object:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read() or b"null")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.mark.slow
def test_orthanc_finds_and_moves_its_study(archive: Archive, tmp_path: Path) -> None:
    assert shutil.which("Orthanc"), "Debian's orthanc package is needed (make system-deps installs it)"
    ours = archive.partners["ORTHANC-HOSP"]
    (study,) = ours.studies
    orthanc = Orthanc(tmp_path / "orthanc", archive.port)
    try:
        dest = archive.server.imx("partner", "dest", "ORTHANC-HOSP", f"127.0.0.1:{orthanc.dicom_port}")
        assert dest.returncode == 0, dest.stderr
        q = orthanc.call("POST", "/modalities/imx/query", {"Level": "Study", "Query": {"StudyDate": "", "PatientID": ""}})
        qid = q["ID"]  # type: ignore[index]
        answers = orthanc.call("GET", f"/queries/{qid}/answers")
        found = {orthanc.call("GET", f"/queries/{qid}/answers/{a}/content?simplify")["StudyInstanceUID"] for a in answers}  # type: ignore[index,union-attr]
        assert found == {study}  # its own study, none of DEMO's or OTHER's
        orthanc.call("POST", f"/queries/{qid}/retrieve", b"ORTHANC")  # C-MOVE to itself, synchronous
        held = {orthanc.call("GET", f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in orthanc.call("GET", "/instances")}  # type: ignore[index,union-attr]
        assert held == set(ours.sops())
    finally:
        orthanc.stop()
        archive.server.imx("partner", "dest", "ORTHANC-HOSP", "--none")


def test_cget_cancel_stops_the_suboperations(archive: Archive) -> None:
    """C-CANCEL during a C-GET (PS3.4 C.4.3.3): the requestor cancels while it receives the first
    instance, before answering its C-STORE, so the cancel is there before the next sub-operation;
    the node stops and answers Cancel (0xFE00) with the sub-operations left."""
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

    demo = archive.partners["DEMO"]
    ct_study = next(uid for uid in demo.studies if len(demo.sops(uid)) == 3)
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        if len(received) == 1:
            event.assoc.send_c_cancel(7, query_model=StudyRootQueryRetrieveInformationModelGet)
        return 0x0000

    ae = AE(ae_title="DEMOPACS")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(
        "127.0.0.1", archive.port, ae_title="IMX", ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        q = Dataset()
        q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", ct_study
        responses = list(assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet, msg_id=7))
    finally:
        assoc.release()
    final = responses[-1][0]
    assert int(final.Status) == 0xFE00
    assert len(received) == 1 and received[0] in demo.sops(ct_study)
    assert int(final.NumberOfRemainingSuboperations) == 2 and int(final.NumberOfCompletedSuboperations) == 1
