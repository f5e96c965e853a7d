"""Lossless packed pixels and per-instance viewer metadata (imaging/pixels.py), and their HTTP
routes (viewer/pixels.py) on a real Archive through FastAPI's TestClient."""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from imaging import render
from imaging.dicomjson import encode_metadata
from imaging.pixels import (
    orientation_labels,
    pack_frame,
    unpack,
    viewer_metadata,
    viewer_metadata_from_json,
    voi_table,
)
from imaging.render import RenderError

TEST_FILES = Path(DATA_ROOT, "test_files")
BROKEN = {"MR_truncated.dcm", "JPEG2000-embedded-sequence-delimiter.dcm", "badVR.dcm"}


def _images() -> list[Path]:
    out = []
    for p in sorted(TEST_FILES.glob("*.dcm")):
        if p.name in BROKEN:
            continue
        try:
            ds = dcmread(p, stop_before_pixels=True)
        except Exception:
            continue
        if "Rows" in ds and "Columns" in ds:
            out.append(p)
    return out


def modality_values(ds: Dataset, frame: int = 1) -> np.ndarray:
    """What imaging/render's modality step gives for a frame (PS3.3 C.11.1)."""
    arr, g = render._decode(ds, frame)
    return render._Modality(ds, frame, g.signed)(arr)


@pytest.mark.parametrize("path", _images(), ids=lambda p: p.name)
def test_packed_frames_round_trip_exactly_over_pydicoms_files(path: Path) -> None:
    ds = dcmread(path)
    frames = render.frame_count(ds)
    for frame in sorted({1, frames}):
        packed = pack_frame(ds, frame)
        got = unpack(packed)
        if packed.color:
            assert np.array_equal(got, render.render_frame(ds, frame))
        else:
            assert np.array_equal(got, modality_values(ds, frame))
        meta = viewer_metadata(ds)
        assert meta["rows"] == got.shape[0] and meta["columns"] == got.shape[1]
        assert meta["color"] is packed.color
    # the same metadata from the DICOM JSON the index keeps (bulk data left out)
    assert viewer_metadata_from_json(json.loads(encode_metadata(ds))) == viewer_metadata(ds)


def synthetic(values: np.ndarray, bits_allocated: int, bits_stored: int, signed: bool, **attrs: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    dtype = {8: "u1", 16: "u2", 32: "u4"}[bits_allocated]
    dtype = ("<i" if signed else "<u") + dtype[1:]
    ds.PixelData = values.astype(dtype).tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize(
    ("allocated", "stored", "signed"),
    [(8, 8, False), (16, 12, False), (16, 12, True), (16, 16, False), (16, 16, True), (32, 32, False), (32, 32, True), (32, 24, True)],
)
def test_every_bit_depth_and_sign_round_trips(allocated: int, stored: int, signed: bool) -> None:
    rng = np.random.default_rng(stored * 2 + signed)
    lo, hi = (-(1 << (stored - 1)), (1 << (stored - 1)) - 1) if signed else (0, (1 << stored) - 1)
    values = rng.integers(lo, hi, size=(37, 53), endpoint=True, dtype=np.int64)
    values[0, 0], values[0, 1] = lo, hi  # the extremes are there
    ds = synthetic(values, allocated, stored, signed, RescaleSlope="0.5", RescaleIntercept="-1024")
    packed = pack_frame(ds)
    span = hi - lo
    assert packed.planes == (1 if span < 256 else 2 if span < 65536 else 3 if span < 1 << 24 else 4)
    assert np.array_equal(unpack(packed), values * 0.5 - 1024)
    assert np.array_equal(unpack(packed), modality_values(ds))


def test_a_modality_lut_sequence_is_baked_in() -> None:
    values = np.arange(0, 4096, dtype=np.int64).reshape(64, 64)
    ds = synthetic(values, 16, 12, False)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = [(v * 7) % 5000 for v in range(4096)]
    item.ModalityLUTType = "HU"
    ds.ModalityLUTSequence = [item]
    packed = pack_frame(ds)
    assert (packed.slope, packed.intercept) == (1.0, 0.0)
    assert np.array_equal(unpack(packed), modality_values(ds))
    assert viewer_metadata(ds)["modality_lut"] is True


def voi_lut_object(photometric: str = "MONOCHROME2", window: bool = False) -> Dataset:
    """A 12-bit frame shown through a curved VOI LUT (10-bit output) and, unless ``window``, no
    window of its own."""
    values = np.random.default_rng(9).integers(100, 3900, size=(48, 64), endpoint=True, dtype=np.int64)
    ds = synthetic(values, 16, 12, False, PhotometricInterpretation=photometric)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 10]
    item.LUTData = [round(1023 * (v / 4095) ** 0.6) for v in range(4096)]
    ds.VOILUTSequence = [item]
    if window:
        ds.WindowCenter, ds.WindowWidth = 2000, 1000
    return ds


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_a_voi_lut_shown_by_default_travels_with_the_frame(photometric: str) -> None:
    """The browser gets the grey level of every value under the object's VOI LUT, so it shows
    what the renderer shows (inverting MONOCHROME1 itself); the values stay exact; an object with
    a window of its own is shown through that window, and gets no table."""
    ds = voi_lut_object(photometric)
    packed = pack_frame(ds)
    table = voi_table(packed)
    assert table is not None and packed.voi == table.size == packed.high - packed.low + 1
    assert packed.headers()["X-Imx-Voi"] == str(packed.voi)
    assert np.array_equal(unpack(packed), modality_values(ds))
    shown = table[unpack(packed).astype(np.int64) - packed.offset].astype(int)
    if photometric == "MONOCHROME1":
        shown = 255 - shown
    assert np.abs(shown - render.render_frame(ds).astype(int)).max() <= 1  # a tie may round apart
    windowed = pack_frame(voi_lut_object(window=True))
    assert windowed.voi == 0 and voi_table(windowed) is None and "X-Imx-Voi" not in windowed.headers()


def test_float_pixel_data_is_refused_in_plain_words() -> None:
    ds = synthetic(np.zeros((4, 4), dtype=np.int64), 32, 32, False)
    ds.FloatPixelData = np.zeros(16, dtype="<f4").tobytes()
    del ds.PixelData
    with pytest.raises(RenderError, match="float pixel data"):
        pack_frame(ds)


def test_orientation_labels_follow_the_direction_cosines() -> None:
    ds = Dataset()
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]  # axial: rows to the left, columns to posterior
    assert orientation_labels(ds) == {"top": "A", "bottom": "P", "left": "R", "right": "L"}
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
    assert orientation_labels(ds) == {"top": "H", "bottom": "F", "left": "A", "right": "P"}
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    assert orientation_labels(ds) == {"top": "H", "bottom": "F", "left": "R", "right": "L"}
    ds.ImageOrientationPatient = [0.8, 0.6, 0, 0, 0, -1]  # oblique: strongest first
    assert orientation_labels(ds)["right"] == "LP"
    projection = Dataset()
    projection.PatientOrientation = ["A", "F"]
    assert orientation_labels(projection) == {"top": "H", "bottom": "F", "left": "P", "right": "A"}
    assert orientation_labels(Dataset()) is None


def test_metadata_names_the_spacing_source_and_polarity() -> None:
    values = np.zeros((8, 8), dtype=np.int64)
    ct = synthetic(values, 16, 12, True, PixelSpacing=[0.5, 0.5], WindowCenter=["40", "-600"], WindowWidth=["400", "1500"])
    m = viewer_metadata(ct)
    assert m["pixel_spacing"] == [0.5, 0.5] and m["spacing_source"] == "PixelSpacing" and m["calibrated"]
    assert m["windows"] == [[40.0, 400.0], [-600.0, 1500.0]] and m["invert"] is False
    cr = synthetic(values, 16, 12, False, ImagerPixelSpacing=[0.1, 0.1], PhotometricInterpretation="MONOCHROME1")
    m = viewer_metadata(cr)
    assert m["spacing_source"] == "ImagerPixelSpacing" and not m["calibrated"] and m["invert"] is True
    plain = synthetic(values, 8, 8, False)
    m = viewer_metadata(plain)
    assert m["pixel_spacing"] is None and m["spacing_source"] is None and not m["calibrated"]


def test_position_sorts_along_the_slice_normal() -> None:
    ds = dcmread(TEST_FILES / "CT_small.dcm")
    a = copy.deepcopy(ds)
    a.ImagePositionPatient = [0, 0, 10]
    b = copy.deepcopy(ds)
    b.ImagePositionPatient = [0, 0, 12.5]
    a.ImageOrientationPatient = b.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    assert viewer_metadata(b)["position"] - viewer_metadata(a)["position"] == pytest.approx(2.5)


def test_the_png_is_plain_8_bit_grey_planes_without_colour_chunks() -> None:
    """The browser must read the bytes back unchanged: no gamma, ICC or sRGB chunk to apply."""
    from PIL import Image

    packed = pack_frame(dcmread(TEST_FILES / "CT_small.dcm"))
    img = Image.open(io.BytesIO(packed.png))
    assert img.mode == "L" and img.size == (128, 128 * packed.planes) and packed.planes == 2
    assert not {"gamma", "icc_profile", "srgb"} & set(img.info)
    for chunk in (b"gAMA", b"iCCP", b"sRGB", b"cHRM"):
        assert chunk not in packed.png


# -- the HTTP routes --------------------------------------------------------------------------
PASSWORD = "pixels-pass-1"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A real Archive with two partners, a CT series from one of them, an admin and a user of
    each partner, behind the real app (TestClient)."""
    from dicomfiles import make_ct_series
    from fastapi.testclient import TestClient

    from imx import previews
    from imx.config import Settings, ensure_layout
    from imx.ingest import Archive, PartnerRef
    from storage.access import Accounts
    from viewer.app import create_app
    from viewer.auth import hash_password

    base = tmp_path_factory.mktemp("pixels")
    settings = Settings.load(data_dir=base / "data")
    ensure_layout(settings)
    archive = Archive(settings)
    archive.index.migrate()
    archive.index.add_partner("OSH-CITY", "OSHPACS")
    archive.index.add_partner("ALMATY-2", "ALMPACS")
    osh = PartnerRef.of(archive.index.partner_by_name("OSH-CITY"))
    alm = PartnerRef.of(archive.index.partner_by_name("ALMATY-2"))
    stored = []
    for p in make_ct_series(base / "ct", 3):
        out = archive.ingest_file(osh, p)
        assert out.result.acknowledged
        stored.append(out.sop_instance_uid)
    accounts = Accounts(archive.index)
    accounts.add_user("root", "admin", hash_password(PASSWORD))
    accounts.add_user("osh", "partner", hash_password(PASSWORD), partner_id=osh.id)
    accounts.add_user("alm", "partner", hash_password(PASSWORD), partner_id=alm.id)
    accounts.add_user("doc", "specialist", hash_password(PASSWORD))
    app = create_app(archive)
    ds = dcmread(io.BytesIO(archive.read_object(stored[0])))
    try:
        yield {"archive": archive, "app": app, "client": lambda: TestClient(app), "sops": stored, "ds": ds}
    finally:
        previews.detach(archive)
        archive.close()


def logged_in(site: dict, name: str):  # type: ignore[no-untyped-def]
    client = site["client"]()
    r = client.post("/api/login", json={"name": name, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return client


def urls(site: dict) -> tuple[str, str]:
    ds = site["ds"]
    series = f"/api/viewer/series/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}"
    frame = f"/api/pixels/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}/1"
    return series, frame


def test_the_series_route_gives_each_instance_in_order(site: dict) -> None:
    series, _ = urls(site)
    client = logged_in(site, "osh")
    r = client.get(series)
    assert r.status_code == 200 and r.headers["cache-control"] == "private, no-cache"
    items = r.json()["instances"]
    assert sorted(i["sop_uid"] for i in items) == sorted(site["sops"])
    first = items[0]
    assert first["rows"] == first["columns"] == 128 and first["spacing_source"] == "PixelSpacing"
    assert first["intercept"] == -1024.0 and first["orientation"]["right"] == "L"
    positions = [i["position"] for i in items]
    assert positions == sorted(positions) or positions == sorted(positions, reverse=True)
    again = client.get(series, headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304


def test_a_packed_frame_is_the_stored_values_losslessly_and_cached_for_good(site: dict) -> None:
    from imaging.pixels import Packed

    _, frame = urls(site)
    client = logged_in(site, "root")
    r = client.get(frame)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["cache-control"] == "private, max-age=31536000, immutable"
    h = r.headers
    packed = Packed(r.content, h["x-imx-color"] == "1", int(h["x-imx-offset"]), float(h["x-imx-slope"]), float(h["x-imx-intercept"]), int(h["x-imx-planes"]))
    assert np.array_equal(unpack(packed), modality_values(site["ds"]))
    assert client.get(frame, headers={"If-None-Match": h["etag"]}).status_code == 304


def test_pixels_need_a_caller_and_stay_within_the_callers_scope(site: dict) -> None:
    series, frame = urls(site)
    anonymous = site["client"]()
    for url in (series, frame):
        r = anonymous.get(url)
        assert r.status_code == 401 and "WWW-Authenticate" in r.headers
    for name in ("alm", "doc"):  # another partner; a specialist with no consultation of it
        client = logged_in(site, name)
        for url in (series, frame):
            r = client.get(url)
            assert r.status_code == 404, (name, url, r.status_code)
            assert "not shared with you" in r.json()["detail"]


def test_bad_frame_numbers_are_refused_in_plain_words(site: dict) -> None:
    _, frame = urls(site)
    client = logged_in(site, "osh")
    assert client.get(frame[:-1] + "0").status_code == 422
    assert client.get(frame[:-1] + "x").status_code == 422
    r = client.get(frame[:-1] + "2")
    assert r.status_code == 404 and "has 1" in r.json()["detail"]


def test_the_study_route_groups_series_and_gzips_for_slow_links(site: dict) -> None:
    ds = site["ds"]
    client = logged_in(site, "osh")
    r = client.get(f"/api/viewer/study/{ds.StudyInstanceUID}", headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    (series,) = r.json()["series"]
    assert series["series_uid"] == ds.SeriesInstanceUID and series["modality"] == "CT"
    assert sorted(i["sop_uid"] for i in series["instances"]) == sorted(site["sops"])
    assert client.get(f"/api/viewer/study/{ds.StudyInstanceUID}", headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    assert logged_in(site, "alm").get(f"/api/viewer/study/{ds.StudyInstanceUID}").status_code == 404


def test_the_first_frame_is_the_opening_slice_as_webp(site: dict) -> None:
    from PIL import Image

    ds = site["ds"]
    client = logged_in(site, "osh")
    study = client.get(f"/api/viewer/study/{ds.StudyInstanceUID}").json()
    r = client.get(f"/api/viewer/first/{ds.StudyInstanceUID}?quality=50")
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp"
    assert r.headers["x-imx-sop"] == study["series"][0]["instances"][0]["sop_uid"]
    assert r.headers["x-imx-series"] == ds.SeriesInstanceUID and r.headers["x-imx-frame"] == "1"
    assert Image.open(io.BytesIO(r.content)).size == (128, 128)
    assert client.get(f"/api/viewer/first/{ds.StudyInstanceUID}?quality=0").status_code == 422
    assert logged_in(site, "alm").get(f"/api/viewer/first/{ds.StudyInstanceUID}").status_code == 404
    assert site["client"]().get(f"/api/viewer/first/{ds.StudyInstanceUID}").status_code == 401
