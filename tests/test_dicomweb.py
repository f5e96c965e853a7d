"""DICOMweb (PS3.18) against a real ``imx serve``: instances arrive over DIMSE from dcmtk's
storescu, then dicomweb-client (a client written by others), plain HTTP and Debian's Orthanc with
its DICOMweb plugin search, retrieve and store through /dicomweb."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom.data
import pytest
import requests
from authn import bearer
from dicomfiles import STORESCU_TS_FLAG, expected_uid, make_ct_series, storescu
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless, generate_uid
from services import ImxServer, dcmtk_env, free_port, wait_port

from imx.config import Settings
from imx.ingest import make_store
from storage.index import Index
from storage.query import Scope, instances

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
pytestmark = pytest.mark.peer
web = requests.Session()  # the tests' admin: the archive fixture sets its Authorization header


def renamed(src: str, folder: Path, study: str, name: str, patient: str, patient_id: str, rle: bool = False) -> Path:
    """A copy of a pydicom test file in its own encoding (or RLE-compressed by pydicom), as a
    new instance of ``study``."""
    ds = dcmread(TEST_FILES / src)
    if rle:  # pydicom's RLE encoder takes at most 16 bits a sample
        arr = ds.pixel_array
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelData = (arr & 0xFFFF).astype("<u2").tobytes()
        ds.compress(RLELossless)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = patient, patient_id
    out = folder / name
    ds.save_as(out)
    return out


@dataclass
class Sent:
    path: Path
    original: Dataset  # what the sender holds (identifying)
    sop: str = ""  # the archive's pseudonymous SOP Instance UID
    study: str = ""
    series: str = ""


@dataclass
class Archive:
    server: ImxServer
    url: str
    sent: dict[str, Sent]  # by label
    index: Index

    def stored_bytes(self, sop: str) -> bytes:
        settings = Settings.load(data_dir=self.server.data_dir)
        row = self.index.get_instance(sop)
        assert row is not None
        return make_store(settings).get(row.object_key)

    def stored(self, sop: str) -> Dataset:
        return dcmread(io.BytesIO(self.stored_bytes(sop)))

    def client(self, **kw: object) -> DICOMwebClient:
        headers = {**self.server.auth_headers(), **kw.pop("headers", {})}  # type: ignore[dict-item]
        return DICOMwebClient(url=self.url, headers=headers, **kw)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    base = tmp_path_factory.mktemp("dicomweb")
    server = ImxServer(base / "data", env={"IMX_STOW_MAX_BYTES": str(8 * 1024 * 1024)})
    server.start()
    web.headers.update(server.auth_headers())
    files = base / "files"
    try:
        sent: dict[str, Sent] = {}
        for i, p in enumerate(make_ct_series(files / "ct", 3, patient="Doe^Jane", patient_id="HOSP-000123")):
            sent[f"ct{i + 1}"] = Sent(p, dcmread(p))
        study_mr = generate_uid()
        study_rt = generate_uid()
        variants = {
            "mr": ("MR_small.dcm", study_mr, "Roe^Richard", "HOSP-777"),
            "mr_j2k": ("MR_small_jp2klossless.dcm", study_mr, "Roe^Richard", "HOSP-777"),
            "mr_be": ("MR_small_bigendian.dcm", study_mr, "Roe^Richard", "HOSP-777"),
            # a secondary capture: burned-in text likely, so the default policy quarantines it
            "held": ("SC_rgb_rle.dcm", study_mr, "Roe^Richard", "HOSP-777"),
            "dose": ("rtdose.dcm", study_rt, "Poe^Edgar", "HOSP-999"),
            "dose_rle": ("rtdose.dcm", study_rt, "Poe^Edgar", "HOSP-999"),
        }
        for label, (src, study, name, pid) in variants.items():
            files.mkdir(exist_ok=True)
            p = renamed(src, files, study, f"{label}.dcm", name, pid, rle=label.endswith("_rle"))
            sent[label] = Sent(p, dcmread(p))
        by_ts: dict[str, list[Path]] = {}
        for s in sent.values():
            by_ts.setdefault(str(s.original.file_meta.TransferSyntaxUID), []).append(s.path)
        for ts, paths in by_ts.items():
            extra = [STORESCU_TS_FLAG[ts]] if ts in STORESCU_TS_FLAG else []
            r = storescu(server.dicom_port, paths, aet="DEMOPACS", extra=extra)
            assert r.returncode == 0, r.stderr
        index = Index(f"sqlite:///{server.data_dir / 'index.sqlite3'}")
        demo = index.partner_by_name("DEMO")
        assert demo is not None
        for s in sent.values():
            s.sop = expected_uid(server.data_dir, demo.id, str(s.original.SOPInstanceUID))
            row = index.get_instance(s.sop)
            assert row is not None, f"{s.path.name} was not stored:\n{server.output()[-3000:]}"
            assert (row.quarantine is not None) == (s is sent.get("held"))
            s.study = expected_uid(server.data_dir, demo.id, str(s.original.StudyInstanceUID))
            s.series = expected_uid(server.data_dir, demo.id, str(s.original.SeriesInstanceUID))
        yield Archive(server, f"http://127.0.0.1:{server.http_port}/dicomweb", sent, index)
        index.close()
    finally:
        server.stop()


def value(item: dict, tag: str) -> object:
    v = item.get(tag, {}).get("Value")
    return v[0] if v else None


def split_multipart(resp: requests.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related response, each (headers, body)."""
    ctype = resp.headers["content-type"]
    assert ctype.startswith("multipart/related"), ctype
    boundary = ctype.split("boundary=")[1].split(";")[0].strip('"').encode()
    body = resp.content
    assert body.endswith(b"--" + boundary + b"--\r\n")
    out = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, _, data = chunk[2:].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        out.append(({k.lower(): v for k, v in headers.items()}, data[:-2]))
    return out


# -- QIDO-RS -------------------------------------------------------------------------------------------------------
def test_search_for_studies_with_filters_and_paging(archive: Archive) -> None:
    c = archive.client()
    ct, mr = archive.sent["ct1"], archive.sent["mr"]
    studies = c.search_for_studies()
    assert {value(s, "0020000D") for s in studies} == {ct.study, mr.study, archive.sent["dose"].study}
    by_uid = {value(s, "0020000D"): s for s in studies}
    ct_study = by_uid[ct.study]
    pseudonym = value(ct_study, "00100020")
    assert pseudonym and pseudonym != "HOSP-000123"
    assert value(ct_study, "00100010") == {"Alphabetic": pseudonym}
    assert (value(ct_study, "00201206"), value(ct_study, "00201208")) == (1, 3)
    assert ct_study["00080061"]["Value"] == ["CT"]
    # dicomweb-client sends a Host header without the port, so compare the path of what it got;
    # plain HTTP below checks the whole URL
    assert value(ct_study, "00081190").endswith(f"/dicomweb/studies/{ct.study}")
    plain = web.get(f"{archive.url}/studies", params={"StudyInstanceUID": ct.study}).json()
    assert value(plain[0], "00081190") == f"{archive.url}/studies/{ct.study}"
    assert (value(by_uid[mr.study], "00201206"), value(by_uid[mr.study], "00201208")) == (3, 3)

    assert [value(s, "0020000D") for s in c.search_for_studies(search_filters={"PatientID": pseudonym})] == [ct.study]
    assert [value(s, "0020000D") for s in c.search_for_studies(search_filters={"ModalitiesInStudy": "RTDOSE"})] == [
        archive.sent["dose"].study
    ]
    date = value(ct_study, "00080020")
    assert ct.study in {value(s, "0020000D") for s in c.search_for_studies(search_filters={"StudyDate": f"{date}-{date}"})}
    assert ct.study not in {value(s, "0020000D") for s in c.search_for_studies(search_filters={"StudyDate": f"-{int(date) - 1}"})}
    prefix = pseudonym[:5] + "*"
    assert ct.study in {value(s, "0020000D") for s in c.search_for_studies(search_filters={"PatientName": prefix})}
    assert c.search_for_studies(search_filters={"PatientName": "Doe*"}) == []  # originals are never matched

    everything = [value(s, "0020000D") for s in studies]
    paged = [value(s, "0020000D") for off in range(3) for s in c.search_for_studies(limit=1, offset=off)]
    assert paged == everything
    assert c.search_for_studies(offset=3) == []


def test_quarantined_instances_are_neither_found_nor_served(archive: Archive) -> None:
    c = archive.client()
    held, mr = archive.sent["held"], archive.sent["mr"]
    assert held.sop not in {value(i, "00080018") for i in c.search_for_instances(mr.study)}
    assert c.search_for_series(mr.study, search_filters={"SeriesInstanceUID": held.series}) == []
    url = f"{archive.url}/studies/{held.study}/series/{held.series}/instances/{held.sop}"
    for path in ("", "/metadata", "/frames/1", "/rendered", "/thumbnail"):
        assert web.get(url + path).status_code == 404, path
    assert web.get(f"{archive.url}/studies/{held.study}/series/{held.series}").status_code == 404
    assert held.sop not in {d.SOPInstanceUID for d in c.retrieve_study(mr.study)}


def test_search_for_series_and_instances(archive: Archive) -> None:
    c = archive.client()
    ct, mr = archive.sent["ct1"], archive.sent["mr"]
    series = c.search_for_series(ct.study)
    assert [value(s, "0020000E") for s in series] == [ct.series]
    assert value(series[0], "00080060") == "CT" and value(series[0], "00201209") == 3
    assert value(series[0], "00081190").endswith(f"/dicomweb/studies/{ct.study}/series/{ct.series}")
    mr_series = c.search_for_series(search_filters={"Modality": "MR"})
    assert {value(s, "0020000E") for s in mr_series} == {archive.sent[k].series for k in ("mr", "mr_j2k", "mr_be")}
    inst = c.search_for_instances(ct.study, ct.series)
    assert [value(i, "00080018") for i in inst] == [archive.sent[f"ct{n}"].sop for n in (1, 2, 3)]
    assert [value(i, "00200013") for i in inst] == [1, 2, 3]
    assert value(inst[0], "00081190").endswith(f"/dicomweb/studies/{ct.study}/series/{ct.series}/instances/{ct.sop}")
    two = c.search_for_instances(ct.study, search_filters={"InstanceNumber": "2"})
    assert [value(i, "00080018") for i in two] == [archive.sent["ct2"].sop]
    assert [value(i, "00080018") for i in c.search_for_instances(limit=2, offset=1, search_filters={"SeriesInstanceUID": ct.series})] == [
        archive.sent["ct2"].sop,
        archive.sent["ct3"].sop,
    ]
    # tag form, includefield and a key we cannot match (ignored with a warning, returned empty)
    r = web.get(
        f"{archive.url}/studies/{mr.study}/series",
        params={"00080060": "MR", "includefield": "00081050,SeriesDate", "OperatorsName": "X"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom+json"
    assert len(r.json()) == 3 and all(s["00081050"] == {"vr": "PN"} and s["00080021"] == {"vr": "DA"} for s in r.json())
    assert "OperatorsName" in r.headers["warning"]
    fuzzy = web.get(f"{archive.url}/studies", params={"PatientName": value(series[0], "00100010")["Alphabetic"][:4].lower(), "fuzzymatching": "true"})
    assert ct.study in {value(s, "0020000D") for s in fuzzy.json()}


# -- WADO-RS --------------------------------------------------------------------------------------------------------
def test_retrieve_instance_is_the_stored_object(archive: Archive) -> None:
    for label in ("ct1", "mr_j2k", "mr_be", "dose_rle"):
        s = archive.sent[label]
        url = f"{archive.url}/studies/{s.study}/series/{s.series}/instances/{s.sop}"
        r = web.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert r.status_code == 200
        assert "Content-Encoding" not in r.headers  # DICOM is never gzipped, even when asked
        ((headers, body),) = split_multipart(r)
        stored = archive.stored_bytes(s.sop)
        assert body == stored
        assert headers["content-type"] == f"application/dicom; transfer-syntax={archive.stored(s.sop).file_meta.TransferSyntaxUID}"
    ds = archive.client().retrieve_instance(s.study, s.series, s.sop)
    assert ds.SOPInstanceUID == s.sop and ds.PixelData == archive.stored(s.sop).PixelData
    assert str(ds.PatientName) != "Poe^Edgar"


def test_retrieve_study_and_series(archive: Archive) -> None:
    c = archive.client()
    mr = archive.sent["mr"]
    got = c.retrieve_study(mr.study)
    assert sorted(d.SOPInstanceUID for d in got) == sorted(archive.sent[k].sop for k in ("mr", "mr_j2k", "mr_be"))
    for d in got:
        assert d == archive.stored(d.SOPInstanceUID)
    ct = archive.sent["ct1"]
    series = c.retrieve_series(ct.study, ct.series)
    assert [d.SOPInstanceUID for d in series] == [archive.sent[f"ct{n}"].sop for n in (1, 2, 3)]


def test_transcoding_to_explicit_vr_little_endian(archive: Archive) -> None:
    for label in ("mr_j2k", "mr_be", "dose_rle", "dose"):
        s = archive.sent[label]
        stored = archive.stored(s.sop)
        assert stored.file_meta.TransferSyntaxUID != EXPLICIT_LE
        r = web.get(
            f"{archive.url}/studies/{s.study}/series/{s.series}/instances/{s.sop}",
            headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT_LE}'},
        )
        assert r.status_code == 200, r.text
        ((headers, body),) = split_multipart(r)
        assert headers["content-type"] == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
        ds = dcmread(io.BytesIO(body))
        assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE
        assert (ds.pixel_array == stored.pixel_array).all()
        assert ds.SOPInstanceUID == s.sop
    # the same through dicomweb-client
    s = archive.sent["mr_j2k"]
    ds = archive.client().retrieve_instance(s.study, s.series, s.sop, media_types=(("application/dicom", EXPLICIT_LE),))
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE


def test_retrieve_frames(archive: Archive) -> None:
    c = archive.client()
    ct = archive.sent["ct2"]
    (frame,) = c.retrieve_instance_frames(ct.study, ct.series, ct.sop, frame_numbers=[1])
    assert frame == archive.stored(ct.sop).PixelData
    dose = archive.sent["dose"]  # implicit VR, 15 frames
    stored = archive.stored(dose.sop)
    size = len(stored.PixelData) // 15
    frames = c.retrieve_instance_frames(dose.study, dose.series, dose.sop, frame_numbers=[2, 15])
    assert frames == [stored.PixelData[size : 2 * size], stored.PixelData[14 * size :]]
    rle = archive.sent["dose_rle"]  # RLE: decoded on request, native otherwise
    decoded = c.retrieve_instance_frames(rle.study, rle.series, rle.sop, frame_numbers=[3], media_types=("application/octet-stream",))
    assert decoded == [archive.stored(rle.sop).pixel_array[2].astype("<u2").tobytes()]
    r = web.get(
        f"{archive.url}/studies/{rle.study}/series/{rle.series}/instances/{rle.sop}/frames/3",
        headers={"Accept": 'multipart/related; type="image/dicom-rle"'},
    )
    ((headers, body),) = split_multipart(r)
    assert headers["content-type"].startswith("image/dicom-rle")
    from pydicom.encaps import generate_frames

    stored_rle = archive.stored(rle.sop)
    assert body == list(generate_frames(stored_rle.PixelData, number_of_frames=15))[2]
    # JPEG 2000: as image/jp2, as OHIF asks (octet-stream, any syntax: the stored bitstream), decoded
    j2k = archive.sent["mr_j2k"]
    stored_j2k = archive.stored(j2k.sop)
    (bitstream,) = generate_frames(stored_j2k.PixelData, number_of_frames=1)
    furl = f"{archive.url}/studies/{j2k.study}/series/{j2k.series}/instances/{j2k.sop}/frames/1"
    for accept, media, expected in [
        ('multipart/related; type="image/jp2"', "image/jp2; transfer-syntax=1.2.840.10008.1.2.4.90", bitstream),
        ("multipart/related; type=application/octet-stream; transfer-syntax=*", "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.90", bitstream),
        ('multipart/related; type="application/octet-stream"', f"application/octet-stream; transfer-syntax={EXPLICIT_LE}", stored_j2k.pixel_array.astype("<u2").tobytes()),
    ]:
        ((headers, body),) = split_multipart(web.get(furl, headers={"Accept": accept}))
        assert (headers["content-type"], body) == (media, expected), accept


def test_metadata_matches_the_stored_datasets(archive: Archive) -> None:
    c = archive.client()
    ct = archive.sent["ct1"]
    study_meta = c.retrieve_study_metadata(ct.study)
    series_meta = c.retrieve_series_metadata(ct.study, ct.series)
    assert [value(m, "00080018") for m in study_meta] == [value(m, "00080018") for m in series_meta]
    assert len(study_meta) == 3
    meta = c.retrieve_instance_metadata(ct.study, ct.series, ct.sop)
    stored = archive.stored(ct.sop)
    ds = Dataset.from_json(meta)
    for elem in stored:
        if elem.tag == 0x7FE00010:
            continue
        assert elem.tag in ds, elem.keyword
        assert ds[elem.tag].value == elem.value, elem.keyword
    assert str(ds.PatientName) != "Doe^Jane"
    uri = web.get(f"{archive.url}/studies/{ct.study}/series/{ct.series}/instances/{ct.sop}/metadata").json()[0]["7FE00010"]["BulkDataURI"]
    assert uri == f"{archive.url}/studies/{ct.study}/series/{ct.series}/instances/{ct.sop}/bulkdata/7FE00010"
    assert meta["7FE00010"] == {"vr": "OW", "BulkDataURI": uri.replace(f":{archive.server.http_port}", "")}
    assert c.retrieve_bulkdata(uri) == [stored.PixelData]


def test_etag_and_not_modified(archive: Archive) -> None:
    s = archive.sent["ct3"]
    url = f"{archive.url}/studies/{s.study}/series/{s.series}/instances/{s.sop}"
    for path in ("", "/metadata", "/frames/1"):
        r = web.get(url + path)
        assert r.status_code == 200
        etag = r.headers["etag"]
        assert "immutable" in r.headers["cache-control"]
        again = web.get(url + path, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
    study = web.get(f"{archive.url}/studies/{s.study}")
    assert study.headers["cache-control"] == "private, no-cache"
    assert web.get(f"{archive.url}/studies/{s.study}", headers={"If-None-Match": study.headers["etag"]}).status_code == 304
    # another representation, another entity tag
    le = web.get(url, headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT_LE}'})
    assert le.headers["etag"] == web.get(url).headers["etag"]  # already Explicit VR LE: the same bytes
    j2k = archive.sent["mr_j2k"]
    jurl = f"{archive.url}/studies/{j2k.study}/series/{j2k.series}/instances/{j2k.sop}"
    assert web.get(jurl).headers["etag"] != web.get(jurl, headers={"Accept": le.request.headers["Accept"]}).headers["etag"]


def test_json_is_gzipped_on_request(archive: Archive) -> None:
    s = archive.sent["ct1"]
    raw = urllib.request.urlopen(urllib.request.Request(f"{archive.url}/studies/{s.study}/metadata", headers={"Accept-Encoding": "gzip", **archive.server.auth_headers()}))
    assert raw.headers["Content-Encoding"] == "gzip"
    assert len(json.loads(gzip.decompress(raw.read()))) == 3
    plain = urllib.request.urlopen(urllib.request.Request(f"{archive.url}/studies/{s.study}/metadata", headers=archive.server.auth_headers()))
    assert plain.headers["Content-Encoding"] is None and len(json.loads(plain.read())) == 3


def test_errors_are_precise(archive: Archive) -> None:
    s = archive.sent["ct1"]
    inst = f"{archive.url}/studies/{s.study}/series/{s.series}/instances/{s.sop}"
    cases = [
        (f"{archive.url}/studies/2.25.1", {}, 404),
        (f"{archive.url}/studies/2.25.1/metadata", {}, 404),
        (f"{archive.url}/studies/{s.study}/series/2.25.1", {}, 404),
        (f"{archive.url}/studies/{s.study}/series/{s.series}/instances/2.25.1", {}, 404),
        (f"{archive.url}/studies/{s.study}/series/{archive.sent['mr'].series}/instances/{s.sop}", {}, 404),
        (f"{inst}/frames/2", {}, 404),
        (f"{inst}/bulkdata/00100010", {}, 404),
        (f"{archive.url}/studies/not-a-uid", {}, 400),
        (f"{inst}/frames/0", {}, 400),
        (f"{inst}/frames/x", {}, 400),
        (f"{inst}/bulkdata/PixelData", {}, 400),
        (f"{archive.url}/studies?StudyDate=yesterday", {}, 400),
        (f"{archive.url}/studies?limit=-1", {}, 400),
        (f"{archive.url}/studies?NoSuchAttribute=1", {}, 400),
        (f"{archive.url}/studies?ReferencedStudySequence.StudyInstanceUID=1.2", {}, 400),
        (inst, {"Accept": "image/png"}, 406),
        (inst, {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'}, 406),
        (f"{inst}/frames/1", {"Accept": 'multipart/related; type="image/jpeg"'}, 406),
        (f"{archive.url}/studies", {"Accept": "application/dicom+xml"}, 406),
    ]
    for url, headers, status in cases:
        r = web.get(url, headers=headers)
        assert r.status_code == status, (url, headers, r.status_code, r.text)
        assert r.headers["content-type"] == "application/problem+json", url
        assert r.json()["status"] == status and r.json()["detail"]


def test_spooled_objects_are_served_and_a_store_outage_is_503(moto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """While the object store is down, an instance waiting in the spool is still served; one
    only in the store gets 503 with Retry-After, not a broken stream."""
    from imx.config import ensure_layout
    from imx.ingest import Archive as ImxArchive
    from imx.ingest import PartnerRef
    from viewer.app import create_app

    settings = Settings.load(
        data_dir=tmp_path / "data",
        s3_endpoint=moto.endpoint,
        s3_access_key=moto.access_key,
        s3_secret_key=moto.secret_key,
        s3_bucket="dicomweb-spool",
        store_timeout=1,
        spool_retry_seconds=600,
    )
    ensure_layout(settings)
    a = ImxArchive(settings)
    a.index.migrate()
    try:
        partner = PartnerRef.of(a.index.add_partner("OSH", "OSHPACS", []))
        first, second = make_ct_series(tmp_path / "ct", 2)
        stored = a.ingest_file(partner, first)
        assert stored.result.value == "stored"
        moto.pause()
        try:
            spooled = a.ingest_file(partner, second)
            assert spooled.result.value == "spooled"
            client = TestClient(create_app(a), client=("127.0.0.1", 40000), headers=bearer(a.index))
            (inst,) = instances(a.index, Scope(None), sop_uids=[spooled.sop_instance_uid])
            url = f"/dicomweb/studies/{inst.study_uid}/series/{inst.series_uid}/instances"
            r = client.get(f"{url}/{spooled.sop_instance_uid}")
            assert r.status_code == 200
            assert r.content.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n--", 1)[0] == a.read_object(spooled.sop_instance_uid)
            assert client.get(f"{url}/{spooled.sop_instance_uid}/metadata").status_code == 200
            down = client.get(f"{url}/{stored.sop_instance_uid}")
            assert down.status_code == 503 and down.headers["retry-after"]
            assert down.headers["content-type"] == "application/problem+json"
        finally:
            moto.resume()
    finally:
        a.close()


def test_a_missing_object_is_a_500_naming_the_repair(tmp_path: Path) -> None:
    from imx.config import ensure_layout
    from imx.ingest import Archive as ImxArchive
    from imx.ingest import PartnerRef
    from viewer.app import create_app

    settings = Settings.load(data_dir=tmp_path / "data")
    ensure_layout(settings)
    a = ImxArchive(settings)
    a.index.migrate()
    try:
        (one,) = make_ct_series(tmp_path / "ct", 1)
        out = a.ingest_file(PartnerRef.of(a.index.add_partner("OSH", "OSHPACS", [])), one)
        (inst,) = instances(a.index, Scope(None), sop_uids=[out.sop_instance_uid])
        a.store.delete(inst.object_key)
        client = TestClient(create_app(a), client=("127.0.0.1", 40000), headers=bearer(a.index))
        url = f"/dicomweb/studies/{inst.study_uid}/series/{inst.series_uid}/instances/{inst.sop_uid}"
        for path in ("", "/metadata", "/frames/1"):
            r = client.get(url + path)
            assert r.status_code == 500 and "imx check" in r.json()["detail"], path
    finally:
        a.close()


def test_only_authenticated_clients_are_served_from_any_host(tmp_path: Path) -> None:
    from imx.config import ensure_layout
    from imx.ingest import Archive as ImxArchive
    from viewer.app import create_app

    settings = Settings.load(data_dir=tmp_path / "data")
    ensure_layout(settings)
    a = ImxArchive(settings)
    a.index.migrate()
    try:
        for host in ("127.0.0.1", "203.0.113.9"):
            anonymous = TestClient(create_app(a), client=(host, 40000))
            assert anonymous.get("/dicomweb/studies").status_code == 401
            assert anonymous.post("/dicomweb/studies", content=b"x").status_code == 401
        remote = TestClient(create_app(a), client=("203.0.113.9", 40000), headers=bearer(a.index))
        r = remote.get("/dicomweb/studies")
        assert r.status_code == 200 and r.json() == []
    finally:
        a.close()


# -- STOW-RS ---------------------------------------------------------------------------------------------------------
def multipart_body(parts: list[bytes], boundary: str = "imx-test-boundary", ctype: str = "application/dicom") -> tuple[bytes, str]:
    body = b"".join(f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    return body + f"--{boundary}--\r\n".encode(), f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_store_instances_deidentifies_and_finds(archive: Archive, tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path / "stow", 2, patient="Stow^Stella", patient_id="STOW-42")
    datasets = [dcmread(p) for p in paths]
    c = archive.client(headers={"X-Imx-Partner": "DEMO"})
    resp = c.store_instances(datasets)
    refs = resp.ReferencedSOPSequence
    assert len(refs) == 2 and "FailedSOPSequence" not in resp
    new = [str(r.ReferencedSOPInstanceUID) for r in refs]
    assert not set(new) & {str(d.SOPInstanceUID) for d in datasets}
    study = resp.RetrieveURL.rsplit("/", 1)[1]
    assert study != str(datasets[0].StudyInstanceUID)
    assert refs[0].RetrieveURL.startswith(resp.RetrieveURL + "/series/")
    assert resp.RetrieveURL.endswith(f"/dicomweb/studies/{study}")
    found = c.search_for_instances(study)
    assert sorted(value(i, "00080018") for i in found) == sorted(new)
    stored = archive.stored(new[0])
    assert "Stow" not in str(stored.PatientName) and stored.PatientID != "STOW-42"
    assert stored.PixelData == datasets[0].PixelData
    # storing again is harmless: the same pseudonymous instances are referenced
    again = c.store_instances(datasets)
    assert [str(r.ReferencedSOPInstanceUID) for r in again.ReferencedSOPSequence] == new


def test_store_partial_failure_and_mismatch(archive: Archive, tmp_path: Path) -> None:
    (good,) = make_ct_series(tmp_path / "p", 1, patient="Part^Paul", patient_id="PART-1")
    garbage = b"\x00" * 128 + b"DICM" + b"not really DICOM"
    body, ctype = multipart_body([good.read_bytes(), garbage])
    r = web.post(f"{archive.url}/studies?partner=DEMO", data=body, headers={"Content-Type": ctype})
    assert r.status_code == 202, r.text
    out = r.json()
    assert len(out["00081199"]["Value"]) == 1
    (failed,) = out["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC000]

    (other,) = make_ct_series(tmp_path / "q", 1)
    body, ctype = multipart_body([other.read_bytes()])
    r = web.post(f"{archive.url}/studies/{dcmread(good).StudyInstanceUID}?partner=DEMO", data=body, headers={"Content-Type": ctype})
    assert r.status_code == 409, r.text
    (failed,) = r.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA900]
    assert failed["00081155"]["Value"] == [str(dcmread(other).SOPInstanceUID)]
    # into its own study it is stored; a part that is not application/dicom is not understood
    body, ctype = multipart_body([other.read_bytes()])
    r = web.post(f"{archive.url}/studies/{dcmread(other).StudyInstanceUID}?partner=DEMO", data=body, headers={"Content-Type": ctype})
    assert r.status_code == 200 and len(r.json()["00081199"]["Value"]) == 1
    odd, _ = multipart_body([b"{}"], ctype="application/json")
    r = web.post(f"{archive.url}/studies?partner=DEMO", data=odd, headers={"Content-Type": ctype})
    assert r.status_code == 409 and r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]


def test_store_refusals(archive: Archive, tmp_path: Path) -> None:
    (one,) = make_ct_series(tmp_path / "r", 1)
    body, ctype = multipart_body([one.read_bytes()])
    url = f"{archive.url}/studies"
    assert web.post(url, data=body, headers={"Content-Type": ctype}).status_code == 403  # no partner named
    r = web.post(url, data=body, headers={"Content-Type": ctype, "X-Imx-Partner": "NOBODY"})
    assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
    ok = {"X-Imx-Partner": "DEMO"}
    assert web.post(url, data=b"{}", headers={**ok, "Content-Type": "application/json"}).status_code == 415
    wrong_type = ctype.replace('type="application/dicom"', 'type="application/dicom+json"')
    assert web.post(url, data=body, headers={**ok, "Content-Type": wrong_type}).status_code == 415
    assert web.post(url, data=b"", headers={**ok, "Content-Type": ctype}).status_code == 400
    # too large: refused from the declared length, and while streaming when none is declared
    big, big_type = multipart_body([b"\x00" * (9 * 1024 * 1024)])
    assert web.post(url, data=big, headers={**ok, "Content-Type": big_type}).status_code == 413

    def chunks() -> Iterator[bytes]:
        yield big[: 1 << 20]
        for i in range(1 << 20, len(big), 1 << 20):
            yield big[i : i + (1 << 20)]

    r = web.post(url, data=chunks(), headers={**ok, "Content-Type": big_type})
    assert r.status_code == 413
    # a bomb of tiny parts
    many, many_type = multipart_body([b"x"] * 10_001)
    assert web.post(url, data=many, headers={**ok, "Content-Type": many_type}).status_code == 413
    tmp = archive.server.data_dir / "tmp"
    assert not [p for p in tmp.rglob("*") if "stow-" in str(p)]  # nothing left behind


# -- Orthanc as a DICOMweb client ---------------------------------------------------------------------------------------
class Orthanc:
    """Debian's Orthanc with its DICOMweb plugin, knowing our node as DICOMweb server "imx"."""

    PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

    def __init__(self, workdir: Path, dicomweb_url: str, user: str, password: str) -> None:
        assert shutil.which("Orthanc"), "Debian's orthanc package is needed (make system-deps installs it)"
        assert Path(self.PLUGIN).exists(), "Debian's orthanc-dicomweb package is needed (make system-deps installs it)"
        self.http_port = free_port()
        config = {
            "Name": "imx-dicomweb-test",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "Plugins": [self.PLUGIN],
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {"imx": [dicomweb_url, user, password]}},  # HTTP Basic
        }
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "orthanc.json").write_text(json.dumps(config))
        self.log = open(workdir / "orthanc.log", "wb")
        self.proc = subprocess.Popen(["Orthanc", str(workdir / "orthanc.json")], env=dcmtk_env(), stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir)
        wait_port(self.http_port, 60, self.proc)

    def call(self, method: str, path: str, body: object = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.mark.slow
def test_orthanc_retrieves_a_study_over_wado_rs(archive: Archive, tmp_path: Path) -> None:
    mr = archive.sent["mr"]
    orthanc = Orthanc(tmp_path / "orthanc", archive.url + "/", *archive.server.basic_auth)
    try:
        orthanc.call("POST", "/dicom-web/servers/imx/retrieve", {"Resources": [{"Study": mr.study}]})
        ids = json.loads(orthanc.call("GET", "/instances"))
        held: dict[str, Dataset] = {}
        for i in ids:
            ds = dcmread(io.BytesIO(orthanc.call("GET", f"/instances/{i}/file")))
            held[str(ds.SOPInstanceUID)] = ds
        expected = {archive.sent[k].sop for k in ("mr", "mr_j2k", "mr_be")}
        assert set(held) == expected, (orthanc.log.name, sorted(held))
        for sop, ds in held.items():
            stored = archive.stored(sop)
            assert ds.PixelData == stored.PixelData
            assert ds.file_meta.TransferSyntaxUID == stored.file_meta.TransferSyntaxUID
            assert ds.StudyInstanceUID == mr.study
    finally:
        orthanc.stop()


# -- rendered and thumbnails (through the preview workers) ------------------------------------------------------------
def test_rendered_and_thumbnails(archive: Archive) -> None:
    from PIL import Image

    ct, dose = archive.sent["ct1"], archive.sent["dose"]
    inst = f"{archive.url}/studies/{ct.study}/series/{ct.series}/instances/{ct.sop}"
    r = web.get(f"{inst}/rendered")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg" and "immutable" in r.headers["cache-control"]
    assert Image.open(io.BytesIO(r.content)).size == (128, 128)  # CT_small is 128 x 128
    assert web.get(f"{inst}/rendered", headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    png = web.get(f"{inst}/rendered", params={"viewport": "64,64", "window": "40,400"}, headers={"Accept": "image/png"})
    assert png.headers["content-type"] == "image/png" and Image.open(io.BytesIO(png.content)).size == (64, 64)
    assert png.headers["etag"] != r.headers["etag"]
    # one frame of the 15-frame dose, and the frames differ
    dinst = f"{archive.url}/studies/{dose.study}/series/{dose.series}/instances/{dose.sop}"
    f3 = web.get(f"{dinst}/frames/3/rendered", headers={"Accept": "image/png"})
    f9 = web.get(f"{dinst}/frames/9/rendered", headers={"Accept": "image/png"})
    assert f3.status_code == f9.status_code == 200 and f3.content != f9.content
    assert web.get(f"{dinst}/frames/16/rendered").status_code == 404
    assert web.get(f"{dinst}/frames/1,2/rendered").status_code == 400
    assert web.get(f"{inst}/rendered", params={"viewport": "0,10"}).status_code == 400
    assert web.get(f"{inst}/rendered", params={"window": "wide"}).status_code == 400
    assert web.get(f"{inst}/rendered", headers={"Accept": "image/gif"}).status_code == 406
    # a series: one rendered part per instance
    many = web.get(f"{archive.url}/studies/{ct.study}/series/{ct.series}/rendered")
    parts = split_multipart(many)
    assert len(parts) == 3 and all(h["content-type"] == "image/jpeg" and b[:2] == b"\xff\xd8" for h, b in parts)
    # thumbnails: series (kept by the preview workers), study (its first series), instance, frame
    thumb = web.get(f"{archive.url}/studies/{ct.study}/series/{ct.series}/thumbnail")
    assert thumb.status_code == 200 and thumb.headers["content-type"].startswith("image/")
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 128
    assert web.get(f"{archive.url}/studies/{ct.study}/thumbnail").content == thumb.content
    small = web.get(f"{inst}/thumbnail", params={"viewport": "32,32"})
    assert Image.open(io.BytesIO(small.content)).size == (32, 32)
    assert web.get(f"{dinst}/frames/2/thumbnail").status_code == 200
    assert web.get(f"{archive.url}/studies/2.25.1/thumbnail").status_code == 404
