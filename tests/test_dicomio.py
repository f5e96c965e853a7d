"""Reading received instances and writing their copies (imaging/dicomio.py): the header parsed by
pydicom, Pixel Data located by offset and copied byte for byte in its own transfer syntax, and
anything that is not a complete DICOM file refused as MalformedInstance. Built on pydicom's
bundled files (looked up locally, never downloaded)."""

from __future__ import annotations

import hashlib
import random
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom import uid as uids
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info

from imaging.dicomio import (
    IMPLEMENTATION_CLASS_UID,
    MalformedInstance,
    ReceivedInstance,
    read_received,
    read_stored,
    write_instance,
)
from imaging.render import RenderError, render

SEQ_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
PIXEL_DATA = 0x7FE00010
ROUND_TRIP = {
    "CT_small.dcm": uids.ExplicitVRLittleEndian,
    "MR_small_implicit.dcm": uids.ImplicitVRLittleEndian,
    "MR_small_bigendian.dcm": uids.ExplicitVRBigEndian,
    "JPEG2000.dcm": uids.JPEG2000,
    "SC_rgb_rle.dcm": uids.RLELossless,
    "MR_small_jpeg_ls_lossless.dcm": uids.JPEGLSLossless,
    "SC_rgb_jpeg_dcmtk.dcm": uids.JPEGBaseline8Bit,
    "image_dfl.dcm": uids.DeflatedExplicitVRLittleEndian,
    "SC_rgb_rle_2frame.dcm": uids.RLELossless,  # 2 frames
    "examples_ybr_color.dcm": uids.JPEGBaseline8Bit,  # 30 frames
}


def bundled(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom")
    return Path(path)


def write(inst: ReceivedInstance, path: Path) -> Path:
    with open(path, "wb") as f:
        write_instance(inst, f)
    return path


def digest_from(path: Path, start: int) -> str:
    """SHA-256 of the file from ``start`` to its end, read in chunks."""
    with open(path, "rb") as f:
        f.seek(start)
        return hashlib.file_digest(f, "sha256").hexdigest()


def pixel_start(path: Path) -> int:
    with open(path, "rb") as f:
        dcmread(f, stop_before_pixels=True)
        return f.tell()


# -- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip_keeps_transfer_syntax_header_and_pixel_bytes(name: str, tmp_path: Path) -> None:
    src = bundled(name)
    inst = read_received(src)
    assert inst.transfer_syntax == ROUND_TRIP[name]
    new_uid = uids.generate_uid()
    inst.ds.SOPInstanceUID, inst.ds.StudyDescription = new_uid, "ROUND TRIP CHANGE"

    out = write(inst, tmp_path / "out.dcm")

    source, written = dcmread(src), dcmread(out)
    assert written.file_meta.TransferSyntaxUID == ROUND_TRIP[name]
    assert written.PixelData == source.PixelData
    assert written.StudyDescription == "ROUND TRIP CHANGE"
    assert written.SOPInstanceUID == written.file_meta.MediaStorageSOPInstanceUID == new_uid
    assert written.file_meta.MediaStorageSOPClassUID == source.SOPClassUID
    assert written.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    kept = [e.tag for e in source if e.tag < PIXEL_DATA and e.keyword not in ("SOPInstanceUID", "StudyDescription")]
    assert [t for t in kept if written.get(t) != source[t]] == []
    if not inst.inline:  # the Pixel Data element, header included, is the source's bytes
        start, end = inst.pixel_span
        assert out.read_bytes().endswith(src.read_bytes()[start:end])


def test_large_header_value_survives_deferred_reading(tmp_path: Path) -> None:
    ds = dcmread(bundled("CT_small.dcm"))
    ds.EncapsulatedDocument = bytes(range(256)) * 1200  # 300 kB: larger than what is read eagerly
    ds.save_as(tmp_path / "src.dcm")
    out = write(read_received(tmp_path / "src.dcm"), tmp_path / "out.dcm")
    assert dcmread(out).EncapsulatedDocument == ds.EncapsulatedDocument


# -- large Pixel Data ------------------------------------------------------------------------
PIXEL_BYTES = 64 * 2**20


@pytest.fixture(scope="module")
def large_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A 4096 x 8192 16-bit CT (64 MiB of Pixel Data), written without holding the pixels."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = uids.CTImageStorage, uids.generate_uid()
    ds.PatientName, ds.PatientID = "Large^Synthetic", "LARGE-1"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 4096, 8192, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uids.ExplicitVRLittleEndian
    path = tmp_path_factory.mktemp("large") / "large.dcm"
    ds.save_as(path, enforce_file_format=True)
    header_end = path.stat().st_size
    rng = random.Random(1453)
    with open(path, "ab") as f:
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, PIXEL_BYTES))
        for _ in range(PIXEL_BYTES // 2**20):
            f.write(rng.randbytes(2**20))
    return path, header_end


def test_large_pixel_data_stays_on_disk(large_file: tuple[Path, int], tmp_path: Path) -> None:
    path, start = large_file
    size = path.stat().st_size
    tracemalloc.start()
    try:
        inst = read_received(path)
        read_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        out = write(inst, tmp_path / "out.dcm")
        write_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert "PixelData" not in inst.ds
    assert inst.pixel_span == (start, size)
    assert read_peak < 4 * 2**20 and write_peak < 4 * 2**20  # vs 64 MiB of pixels
    copied = read_received(out).pixel_span
    assert copied is not None and copied[1] == out.stat().st_size
    assert digest_from(out, copied[0]) == digest_from(path, start)


# -- encapsulated Pixel Data ------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["JPEG2000.dcm", "JPEG2000-embedded-sequence-delimiter.dcm", "SC_rgb_rle_2frame.dcm", "examples_ybr_color.dcm"]
)
def test_encapsulated_span_ends_after_the_sequence_delimiter(name: str, tmp_path: Path) -> None:
    data = bundled(name).read_bytes()
    start, end = read_received(bundled(name)).pixel_span
    assert start == pixel_start(bundled(name))
    assert end == len(data) and data[end - 8 : end] == SEQ_DELIMITER  # nothing follows in these
    # with an element after Pixel Data (Data Set Trailing Padding), the span still ends there
    padded = tmp_path / name
    padded.write_bytes(data + struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, 4) + b"\0" * 4)
    assert read_received(padded).pixel_span == (start, end)


# -- malformed input --------------------------------------------------------------------------
def meta_end(data: bytes) -> int:
    assert data[132:136] == b"\x02\x00\x00\x00"  # File Meta Information Group Length comes first
    return 144 + struct.unpack("<I", data[140:144])[0]


def value_at(keyword: str) -> Callable[[Path, bytes], int]:
    return lambda path, data: dcmread(path, stop_before_pixels=True).get_item(tag_for_keyword(keyword)).value_tell


def in_first_fragment(path: Path, data: bytes) -> int:
    pos = pixel_start(path) + 12
    pos += 8 + struct.unpack("<I", data[pos + 4 : pos + 8])[0]  # skip the Basic Offset Table
    return pos + 8 + struct.unpack("<I", data[pos + 4 : pos + 8])[0] // 2


def cut(offset: Callable[[Path, bytes], int]) -> Callable[[Path, bytes], bytes]:
    def make(path: Path, data: bytes) -> bytes:
        at = offset(path, data)
        assert 0 < at < len(data)
        return data[:at]

    return make


def with_transfer_syntax(uid: str) -> Callable[[Path, bytes], bytes]:
    def make(path: Path, data: bytes) -> bytes:
        meta = dcmread(path, stop_before_pixels=True).file_meta
        meta.TransferSyntaxUID = uid
        fp = DicomBytesIO()
        write_file_meta_info(fp, meta, enforce_standard=True)
        return data[:132] + fp.getvalue() + data[meta_end(data) :]

    return make


def with_large_value_cut(path: Path, data: bytes) -> bytes:
    """A 300 kB Encapsulated Document last, cut: pydicom skips such a value (deferred) on reading."""
    ds = dcmread(path)
    del ds.PixelData
    ds.EncapsulatedDocument = bytes(300_000)
    fp = DicomBytesIO()
    ds.save_as(fp)
    return fp.getvalue()[:-40_000]


def with_bad_item(path: Path, data: bytes) -> bytes:
    item = data.rindex(b"\xfe\xff\x00\xe0", 0, in_first_fragment(path, data))  # the fragment's Item tag
    return data[:item] + b"\xfe\xff\x0d\xe0" + data[item + 4 :]


MALFORMED: dict[str, tuple[str | None, Callable[[Path, bytes], bytes]]] = {
    "empty file": (None, lambda p, d: b""),
    "random bytes": (None, lambda p, d: random.Random(7).randbytes(4096)),
    "random bytes after DICM": (None, lambda p, d: bytes(128) + b"DICM" + random.Random(8).randbytes(4096)),
    "bogus transfer syntax": ("CT_small.dcm", with_transfer_syntax("1.2.3.4.5.6.7")),
    "SOP class as transfer syntax": ("CT_small.dcm", with_transfer_syntax(uids.CTImageStorage)),
    "cut in the preamble": ("CT_small.dcm", cut(lambda p, d: 64)),
    "cut in the DICM prefix": ("CT_small.dcm", cut(lambda p, d: 130)),
    "cut in the file meta": ("CT_small.dcm", cut(lambda p, d: meta_end(d) - 5)),
    "cut in a header value": ("CT_small.dcm", cut(lambda p, d: value_at("PatientName")(p, d) + 3)),
    "cut in a header sequence": ("CT_small.dcm", cut(lambda p, d: value_at("OtherPatientIDsSequence")(p, d) + 6)),
    "cut in a large header value": ("CT_small.dcm", with_large_value_cut),
    "cut in the Pixel Data element header": ("CT_small.dcm", cut(lambda p, d: pixel_start(p) + 6)),
    "cut in native Pixel Data": ("CT_small.dcm", cut(lambda p, d: pixel_start(p) + 1000)),
    "cut in implicit VR Pixel Data": ("MR_small_implicit.dcm", cut(lambda p, d: pixel_start(p) + 1000)),
    "cut in big endian Pixel Data": ("MR_small_bigendian.dcm", cut(lambda p, d: pixel_start(p) + 1000)),
    "cut one byte short": ("MR_small_implicit.dcm", cut(lambda p, d: len(d) - 1)),
    "cut in an encapsulated fragment": ("JPEG2000.dcm", cut(in_first_fragment)),
    "cut in the sequence delimiter": ("JPEG2000.dcm", cut(lambda p, d: len(d) - 4)),
    "cut in a deflated dataset": ("image_dfl.dcm", cut(lambda p, d: len(d) // 2)),
    "encapsulated item with a wrong tag": ("JPEG2000.dcm", with_bad_item),
    **{f"bundled {n}": (n, lambda p, d: d) for n in ("meta_missing_tsyntax.dcm", "MR_truncated.dcm", "rtplan_truncated.dcm", "SC_rgb_jpeg.dcm")},
}


def dataset_values(path: Path) -> list[str]:
    ds = dcmread(path, stop_before_pixels=True, force=True)
    values = [str(e.value) for e in [*ds.file_meta, *ds] if e.VR in ("PN", "LO", "SH", "UI", "DA", "TM", "CS", "LT", "ST")]
    return [v for v in values if len(v) >= 6]


@pytest.mark.parametrize("name, make", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_is_refused_without_phi(name: str | None, make: Callable, tmp_path: Path) -> None:
    source = bundled(name) if name else None
    path = tmp_path / "received.dcm"
    path.write_bytes(make(source, source.read_bytes() if source else b""))
    with pytest.raises(MalformedInstance) as exc:
        read_received(path)
    message = str(exc.value)
    assert message
    assert [v for v in [*(dataset_values(source) if source else []), "1.2.3.4.5.6.7"] if v in message] == []


# -- stored objects read for rendering ----------------------------------------------------------
def _render_or_error(ds: Dataset) -> bytes | str:
    try:
        return render(ds, 1, fmt="png")
    except RenderError as e:
        return f"RenderError: {e}"


def _bundled_images() -> list[str]:
    names = []
    for path in get_testdata_files():
        try:
            ds = dcmread(path, stop_before_pixels=False)
        except Exception:
            continue
        if any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            names.append(Path(path).name)
    return sorted(set(names))


@pytest.mark.parametrize("name", _bundled_images())
def test_stored_object_renders_as_when_read_whole(name: str) -> None:
    """read_stored (a mapped file, or bytes, pixel data left in place) renders every bundled image
    exactly as pydicom's whole read does, and refuses the same ones with the same reason."""
    path = bundled(name)
    expected = _render_or_error(dcmread(path))
    assert _render_or_error(read_stored(str(path))) == expected
    assert _render_or_error(read_stored(path.read_bytes())) == expected


def test_stored_file_is_mapped_not_read(large_file: tuple[Path, int]) -> None:
    path, _ = large_file
    tracemalloc.start()
    try:
        ds = read_stored(str(path))
        parse_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(ds.PixelData, memoryview) and len(ds.PixelData) == PIXEL_BYTES
    assert parse_peak < 2**20  # vs 64 MiB of pixels
    with open(path, "rb") as f:
        f.seek(-16, 2)
        assert bytes(ds.PixelData[-16:]) == f.read()


def test_stored_large_values_other_than_pixels_read_on_use(tmp_path: Path) -> None:
    ds = dcmread(bundled("CT_small.dcm"))
    ds.RedPaletteColorLookupTableData = bytes(range(256)) * 512  # 128 KiB, a top-level value
    ds.save_as(tmp_path / "lut.dcm")
    for source in (str(tmp_path / "lut.dcm"), (tmp_path / "lut.dcm").read_bytes()):
        got = read_stored(source)
        assert got.RedPaletteColorLookupTableData == ds.RedPaletteColorLookupTableData
        assert bytes(got.PixelData) == ds.PixelData


def test_stored_deflated_object_is_read_whole() -> None:
    path = bundled("image_dfl.dcm")
    ds = read_stored(str(path))
    assert ds.file_meta.TransferSyntaxUID == uids.DeflatedExplicitVRLittleEndian
    assert bytes(ds.PixelData) == dcmread(path).PixelData


def test_truncated_stored_object_is_refused(tmp_path: Path) -> None:
    ds = dcmread(bundled("CT_small.dcm"))
    ds.Rows = ds.Columns = 256
    ds.PixelData = bytes(256 * 256 * 2)
    ds.save_as(tmp_path / "whole.dcm")
    data = (tmp_path / "whole.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 1000])
    for source in (str(tmp_path / "cut.dcm"), data[: len(data) - 1000]):
        with pytest.raises(MalformedInstance, match="truncated"):
            read_stored(source)
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(InvalidDicomError):
        read_stored(str(tmp_path / "empty.dcm"))
