"""Rendering (imaging/render.py) and ``imx render``, proven against dcmtk's dcmj2pnm.

Every image object among pydicom's bundled test files is rendered and compared with dcmj2pnm
(Debian's dcmtk 3.6.7), or with pydicom's own Modality/VOI LUT functions where dcmtk cannot
decode the transfer syntax (JPEG 2000, JPEG-LS) or parse the file. Objects compared with neither
are listed in EXCLUDED with the reason, and a test keeps that list exact.
"""

from __future__ import annotations

import copy
import io
import os
import struct
import subprocess
import sys
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
from dicomfiles import local_test_files
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from imaging.render import (
    MEDIA_TYPES,
    RenderError,
    Window,
    default_window,
    encode,
    frame_count,
    render,
    render_frame,
)

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
VENV_BIN = Path(sys.executable).parent
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# Transfer syntaxes Debian's dcmtk 3.6.7 cannot decode (no JPEG 2000 or JPEG-LS codec in
# dcmj2pnm): pydicom is the reference there. test_dcmtk_cannot_decode_these checks the claim.
DCMTK_LACKS = {
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
}
# Files dcmtk cannot parse although their syntax is one it decodes: pydicom is the reference.
DCMTK_CANNOT_PARSE = {
    "SC_rgb_jpeg.dcm": "its header has implicit VR elements under an explicit VR transfer syntax",
}

# Objects with pixel data compared with no reference, and why. Those marked refused must raise
# RenderError; the others are checked as their reason says.
EXCLUDED = {
    "MR_truncated.dcm": "refused: Pixel Data is shorter than Rows x Columns x bits",
    "badVR.dcm": "refused: Number of Frames is '1A', not an integer",
    "meta_missing_tsyntax.dcm": "refused: no Rows or Columns",
    "nested_priv_SQ.dcm": "refused: no Rows or Columns",
    "JPEG2000-embedded-sequence-delimiter.dcm": "refused: a sequence delimiter overwrote the codestream's SIZ segment, so the frame size disagrees with Rows x Columns",
    "rtdose_expb.dcm": "twin: 32-bit values in OW under Big Endian; dcmtk swaps 16-bit words, pydicom whole values; must render exactly as its Little Endian twin rtdose.dcm",
    "rtdose_expb_1frame.dcm": "twin: as rtdose_expb.dcm; must render exactly as rtdose_1frame.dcm",
}
TWINS = {"rtdose_expb.dcm": "rtdose.dcm", "rtdose_expb_1frame.dcm": "rtdose_1frame.dcm"}


def _read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(path, force=True)


def _image_files() -> dict[str, Path]:
    """pydicom's local test files that carry pixel data, by path relative to test_files."""
    out = {}
    for p in local_test_files():
        try:
            ds = _read(p)
        except Exception:
            continue
        if any(k in ds for k in PIXEL_KEYWORDS):
            out[str(p.relative_to(TEST_FILES))] = p
    return out


IMAGE_FILES = _image_files()


def _ts(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def _is_grey(ds: Dataset) -> bool:
    return int(ds.get("SamplesPerPixel", 1)) == 1 and ds.get("PhotometricInterpretation") != "PALETTE COLOR"


def _range_window(ds: Dataset) -> Window:
    """The full-range window of frame 1, computed with pydicom (LINEAR: min -> black, max -> white)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = apply_modality_lut(pixel_array(ds, index=0), ds)
    lo, hi = float(values.min()), float(values.max())
    return Window((lo + hi + 1) / 2, hi - lo + 1)


def _dcmj2pnm(path: Path, out: Path, *args: str) -> np.ndarray:
    env = dict(os.environ, TCP_NODELAY="1")
    r = subprocess.run(["dcmj2pnm", "+on", "-O", *args, str(path), str(out)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and out.exists(), f"dcmj2pnm failed: {r.stderr[-500:]}"
    return np.asarray(Image.open(out))


def _agree(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float((np.abs(ours.astype(np.int64) - ref.astype(np.int64)) <= 1).mean())


def _pydicom_reference(ds: Dataset) -> np.ndarray:
    """Frame 1 rendered with pydicom's Modality and VOI LUT functions (PS3.4 N.2), scaled to 8 bits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = pixel_array(ds, index=0)
        if not _is_grey(ds):
            assert arr.dtype == np.uint8
            return arr
        w = default_window(ds) or _range_window(ds)
        ref = copy.deepcopy(ds)
        ref.WindowCenter, ref.WindowWidth = w.center, w.width
        values = apply_modality_lut(arr, ref)
        out = apply_voi_lut(values.astype(np.float64), ref, prefer_lut=False)
        # pydicom windows into the range the stored values could span: find it from the extremes
        y_min, y_max = apply_voi_lut(np.array([-1e300, 1e300]), ref, prefer_lut=False)
    grey = np.rint((out - y_min) / (y_max - y_min) * 255).astype(np.uint8)
    return 255 - grey if ds.PhotometricInterpretation == "MONOCHROME1" else grey


def _reference_kind(name: str, ds: Dataset) -> str:
    if name in EXCLUDED:
        return "excluded"
    if _ts(ds) in DCMTK_LACKS or name in DCMTK_CANNOT_PARSE:
        return "pydicom"
    return "dcmtk"


# ---------------------------------------------------------------------------------------------
# pydicom's test files against dcmtk and pydicom


@pytest.mark.peer
@pytest.mark.parametrize("name", sorted(IMAGE_FILES))
def test_bundled_file_renders_like_the_reference(name: str, tmp_path: Path) -> None:
    path = IMAGE_FILES[name]
    ds = _read(path)
    kind = _reference_kind(name, ds)
    if kind == "excluded":
        if name in TWINS:
            assert np.array_equal(render_frame(ds), render_frame(_read(TEST_FILES / TWINS[name])))
        else:
            with pytest.raises(RenderError):
                render_frame(ds)
        return
    ours = render_frame(ds)
    assert ours.dtype == np.uint8
    assert ours.shape[:2] == (ds.Rows, ds.Columns)
    if kind == "pydicom":
        ref = _pydicom_reference(ds)
    else:
        args: list[str] = []
        if _is_grey(ds):
            w = default_window(ds)
            if w:
                args = ["+Wi", "1"]
            else:
                try:
                    rw = _range_window(ds)
                    args = ["+Ww", repr(rw.center), repr(rw.width)]
                except RuntimeError:  # pydicom cannot decode 12-bit JPEG-lossy.dcm: dcmtk's min-max window
                    args = ["+Wm"]
        ref = _dcmj2pnm(path, tmp_path / "ref.png", *args)
    assert _agree(ours, ref) >= 0.99


def test_excluded_list_is_exact() -> None:
    """EXCLUDED names only files that exist, and the refused ones are exactly those we refuse."""
    assert set(EXCLUDED) <= set(IMAGE_FILES)
    refused = set()
    for name, path in IMAGE_FILES.items():
        try:
            render_frame(_read(path))
        except RenderError:
            refused.add(name)
    assert refused == {n for n, why in EXCLUDED.items() if why.startswith("refused")}
    assert set(TWINS) == {n for n, why in EXCLUDED.items() if why.startswith("twin")}


@pytest.mark.peer
def test_dcmtk_cannot_decode_these(tmp_path: Path) -> None:
    """The reason pydicom is the reference for some files: dcmj2pnm refuses each of them."""
    names = [n for n, p in IMAGE_FILES.items() if n not in EXCLUDED and _reference_kind(n, _read(p)) == "pydicom"]
    assert len(names) >= 10 and set(DCMTK_CANNOT_PARSE) <= set(names)
    for name in names:
        r = subprocess.run(["dcmj2pnm", "+on", str(IMAGE_FILES[name]), str(tmp_path / "x.png")], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0, name


# ---------------------------------------------------------------------------------------------
# Synthetic objects


def _grey_object(pixels: np.ndarray, **attrs: object) -> Dataset:
    """A native Explicit VR Little Endian greyscale object holding ``pixels`` (frames, rows, cols)."""
    if pixels.ndim == 2:
        pixels = pixels[None]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[1:]
    if pixels.shape[0] > 1:
        ds.NumberOfFrames = pixels.shape[0]
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def _linear(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR to 0..255, written out independently of the module."""
    y = np.where(x <= c - 0.5 - (w - 1) / 2, 0.0, np.where(x > c - 0.5 + (w - 1) / 2, 255.0, ((x - (c - 0.5)) / (w - 1) + 0.5) * 255))
    return np.rint(y)


HU = np.array([-1000, -160, -100, 0, 40, 100, 238, 240, 1000])


def _ct() -> Dataset:
    """A CT whose column j holds HU[j] (stored HU + 1024, Rescale Intercept -1024)."""
    stored = np.tile((HU + 1024).astype(np.uint16), (4, 1))
    return _grey_object(stored, RescaleSlope=1, RescaleIntercept=-1024, Modality="CT", WindowCenter=-600, WindowWidth=1500)


def test_ct_window_40_400_gives_the_expected_grey_values() -> None:
    out = render_frame(_ct(), window=Window(40, 400))
    expected = _linear(HU.astype(float), 40, 400)
    assert list(expected[:4]) == [0, 0, 38, 102]  # air and fat black-ish, water at 102
    assert expected[-1] == 255 and expected[4] == 128
    assert np.array_equal(out[0], expected.astype(np.uint8))
    assert np.array_equal(out[3], out[0])


def test_object_window_is_the_default() -> None:
    ds = _ct()
    assert default_window(ds) == Window(-600, 1500)
    assert np.array_equal(render_frame(ds)[0], _linear(HU.astype(float), -600, 1500).astype(np.uint8))


def test_no_window_spans_the_frame_range() -> None:
    ds = _ct()
    del ds.WindowCenter, ds.WindowWidth
    assert default_window(ds) is None
    row = render_frame(ds)[0]
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row.astype(int)) >= 0)


@pytest.mark.peer
def test_synthetic_ct_matches_dcmtk(tmp_path: Path) -> None:
    ds = _ct()
    ds.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    ref = _dcmj2pnm(tmp_path / "ct.dcm", tmp_path / "ct.png", "+Ww", "40", "400")
    assert _agree(render_frame(ds, window=Window(40, 400)), ref) == 1.0


@pytest.mark.peer
@pytest.mark.parametrize(
    ("allocated", "stored", "signed"),
    [(8, 8, 0), (8, 8, 1), (16, 12, 0), (16, 12, 1), (16, 10, 1), (16, 16, 0), (16, 16, 1), (32, 32, 0), (32, 32, 1)],
)
def test_bit_depths_and_signs_match_dcmtk(allocated: int, stored: int, signed: int, tmp_path: Path) -> None:
    """A ramp over the whole stored range, with garbage above High Bit (PS3.5 8.1.1), against dcmj2pnm."""
    lo, hi = (-(1 << (stored - 1)), (1 << (stored - 1)) - 1) if signed else (0, (1 << stored) - 1)
    values = np.linspace(lo, hi, 64 * 64).round().astype(np.int64).reshape(64, 64)
    raw = values & ((1 << stored) - 1)  # two's complement in ``stored`` bits
    if stored < allocated:
        raw |= 0b101 << stored  # bits above High Bit must be ignored
    ds = _grey_object(raw.astype(np.dtype(f"<u{allocated // 8}")))
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = stored, stored - 1, signed
    w = Window((lo + hi + 1) / 2, hi - lo + 1)
    ds.save_as(tmp_path / "ramp.dcm", enforce_file_format=True)
    ref = _dcmj2pnm(tmp_path / "ramp.dcm", tmp_path / "ramp.png", "+Ww", repr(w.center), repr(w.width))
    ours = render_frame(ds)
    assert ours[0, 0] == 0 and ours[-1, -1] == 255
    assert np.array_equal(ours, render_frame(ds, window=w))  # no window: the frame's range
    assert _agree(ours, ref) >= 0.99


def test_monochrome1_renders_inverted() -> None:
    ds = _read(TEST_FILES / "dicomdirtests/77654033/CR1/6154")
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    m1 = render_frame(ds)
    ds2 = copy.deepcopy(ds)
    ds2.PhotometricInterpretation = "MONOCHROME2"
    m2 = render_frame(ds2)
    assert m1.std() > 0
    assert np.array_equal(m1.astype(int) + m2.astype(int), np.full(m1.shape, 255))
    ds2.PresentationLUTShape = "INVERSE"
    assert np.array_equal(render_frame(ds2), m1)


@pytest.mark.peer
@pytest.mark.parametrize(
    "change",
    ["MONOCHROME1+IDENTITY", "MONOCHROME1+INVERSE", "MONOCHROME2+INVERSE", "SIGMOID", "VOI LUT", "Modality LUT"],
)
def test_lut_variants_match_dcmtk(change: str, tmp_path: Path) -> None:
    """Presentation LUT Shape, SIGMOID (PS3.3 C.11.2.1.3), VOI LUT and Modality LUT Sequences."""
    args = ["+Wi", "1"]
    if change.startswith("MONOCHROME1"):
        ds = _read(TEST_FILES / "dicomdirtests/77654033/CR1/6154")
        ds.PresentationLUTShape = change.split("+")[1]
    else:
        ds = _read(TEST_FILES / "MR_small.dcm")
    if change == "MONOCHROME2+INVERSE":
        ds.PresentationLUTShape = "INVERSE"
    elif change == "SIGMOID":
        ds.VOILUTFunction = "SIGMOID"
    elif change == "VOI LUT":
        del ds.WindowCenter, ds.WindowWidth
        item = Dataset()
        item.add_new("LUTDescriptor", "US", [2048, 0, 12])
        item.add_new("LUTData", "US", [min(4095, int((i / 2047) ** 0.5 * 4095)) for i in range(2048)])
        ds.VOILUTSequence = [item]
        args = ["+Wl", "1"]
    elif change == "Modality LUT":
        item = Dataset()
        item.add_new("LUTDescriptor", "US", [4096, 0, 16])
        item.add_new("LUTData", "US", [(4095 - i) * 8 for i in range(4096)])
        item.ModalityLUTType = "US"
        ds.ModalityLUTSequence = [item]
        ds.WindowCenter, ds.WindowWidth = 16000, 32000
    ds.save_as(tmp_path / "x.dcm")
    ours = render_frame(ds)
    assert ours.std() > 0
    assert _agree(ours, _dcmj2pnm(tmp_path / "x.dcm", tmp_path / "x.png", *args)) >= 0.99


def test_linear_exact() -> None:
    ds = _grey_object(np.arange(0, 200, dtype=np.uint16).reshape(10, 20), WindowCenter=100, WindowWidth=50, VOILUTFunction="LINEAR_EXACT")
    out = render_frame(ds).ravel().astype(float)
    x = np.arange(200.0)
    expected = np.rint(np.clip((x - 100) / 50 + 0.5, 0, 1) * 255)
    assert np.array_equal(out, expected)


def test_enhanced_per_frame_groups_win() -> None:
    """Pixel Value Transformation and Frame VOI LUT per frame (PS3.3 C.7.6.16.2.9/.10)."""
    frames = np.stack([np.full((4, 4), 1064, np.uint16), np.full((4, 4), 40, np.uint16)])
    ds = _grey_object(frames, WindowCenter=0, WindowWidth=10)

    def group(**kw: object) -> Dataset:
        d = Dataset()
        for k, v in kw.items():
            setattr(d, k, v)
        return d

    shared = Dataset()
    shared.PixelValueTransformationSequence = [group(RescaleSlope=1, RescaleIntercept=-1024, RescaleType="HU")]
    ds.SharedFunctionalGroupsSequence = [shared]
    f1, f2 = Dataset(), Dataset()
    f1.FrameVOILUTSequence = [group(WindowCenter=40, WindowWidth=400)]
    f2.FrameVOILUTSequence = [group(WindowCenter=100, WindowWidth=100)]
    f2.PixelValueTransformationSequence = [group(RescaleSlope=2, RescaleIntercept=0, RescaleType="HU")]
    ds.PerFrameFunctionalGroupsSequence = [f1, f2]
    assert frame_count(ds) == 2
    assert default_window(ds, 1) == Window(40, 400)
    assert default_window(ds, 2) == Window(100, 100)
    assert render_frame(ds, 1)[0, 0] == _linear(np.array([40.0]), 40, 400)[0]  # 1064 - 1024 HU
    assert render_frame(ds, 2)[0, 0] == _linear(np.array([80.0]), 100, 100)[0]  # 40 * 2


def test_every_frame_of_a_multiframe_renders() -> None:
    ds = _read(TEST_FILES / "examples_ybr_color.dcm")  # YBR_FULL_422 JPEG, 30 frames
    n = frame_count(ds)
    assert n == 30
    first = render_frame(ds, 1)
    last = render_frame(ds, n)
    assert first.shape == last.shape == (ds.Rows, ds.Columns, 3)
    assert np.abs(first.astype(int) - last).mean() > 1
    for f in (2, 15):
        assert render_frame(ds, f).shape == first.shape
    rle = _read(TEST_FILES / "SC_rgb_rle_2frame.dcm")
    assert not np.array_equal(render_frame(rle, 1), render_frame(rle, 2))
    grey = _grey_object(np.stack([np.full((3, 3), v, np.uint8) for v in (10, 20, 30)]), WindowCenter=128, WindowWidth=256)
    assert [int(render_frame(grey, f)[0, 0]) for f in (1, 2, 3)] == [int(v) for v in _linear(np.array([10.0, 20, 30]), 128, 256)]


@pytest.mark.parametrize("frame", [0, 3, -1])
def test_frame_out_of_range_is_refused(frame: int) -> None:
    with pytest.raises(RenderError, match="out of range"):
        render_frame(_read(TEST_FILES / "SC_rgb_rle_2frame.dcm"), frame)


def test_only_the_requested_frame_is_decoded() -> None:
    """Frame 1 of an RLE object renders although frame 2 is garbage: frame 2 was never decoded."""
    ds = _read(TEST_FILES / "SC_rgb_rle_2frame.dcm")
    frame1 = get_frame(ds.PixelData, 0, number_of_frames=2)
    ds.PixelData = encapsulate([frame1, struct.pack("<I", 3) + b"\x00" * 60 + b"\x81" * 200])
    assert np.array_equal(render_frame(ds, 1), render_frame(_read(TEST_FILES / "SC_rgb_rle_2frame.dcm"), 1))
    with pytest.raises(RenderError):
        render_frame(ds, 2)


# SC_rgb's colour bars (rows 0-9 red, 20-29 green, 40-49 blue, 60-69 black, 80-89 light grey)
BARS = {5: (255, 0, 0), 25: (0, 255, 0), 45: (0, 0, 255), 65: (0, 0, 0), 85: (192, 192, 192), 95: (255, 255, 255)}


@pytest.mark.parametrize(
    "name",
    ["SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", "SC_rgb_jpeg_gdcm.dcm"],
)
def test_ybr_renders_true_colour(name: str) -> None:
    ds = _read(TEST_FILES / name)
    out = render_frame(ds)
    for row, colour in BARS.items():
        assert np.abs(out[row, 10:90].astype(int) - colour).max() <= 8, (row, out[row, 50])  # lossy YBR: a few levels
    lossless = render_frame(_read(TEST_FILES / "SC_rgb_rle.dcm"))
    assert np.abs(out.astype(int) - lossless).mean() < 1.5


def test_palette_colour_is_applied() -> None:
    ds = _read(TEST_FILES / "examples_palette.dcm")
    out = render_frame(ds)
    assert out.shape == (ds.Rows, ds.Columns, 3)
    stored = pixel_array(ds)
    lut = [np.frombuffer(ds[f"{c}PaletteColorLookupTableData"].value, "<u2") >> 8 for c in ("Red", "Green", "Blue")]
    expected = np.stack([lut[i][stored] for i in range(3)], axis=-1)
    assert np.array_equal(out, expected)
    assert len(np.unique(out.reshape(-1, 3), axis=0)) > 50


def _palette_object(**luts: bytes) -> Dataset:
    ds = _grey_object(np.arange(256, dtype=np.uint8).reshape(16, 16))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    for colour in ("Red", "Green", "Blue"):
        ds.add_new(f"{colour}PaletteColorLookupTableDescriptor", "US", [256, 0, 16])
    for keyword, data in luts.items():
        ds.add_new(keyword, "OW", data)
    return ds


def _segmented(*words: int) -> bytes:
    return struct.pack(f"<{len(words)}H", *words)


def test_segmented_16_bit_palette() -> None:
    """Segmented palette LUTs (PS3.3 C.7.9.2): discrete and linear segments, 16-bit entries."""
    ds = _palette_object(
        SegmentedRedPaletteColorLookupTableData=_segmented(0, 1, 0, 1, 255, 65535),
        SegmentedGreenPaletteColorLookupTableData=_segmented(0, 1, 32768, 1, 255, 32768),
        SegmentedBluePaletteColorLookupTableData=_segmented(0, 1, 65535, 1, 255, 0),
    )
    out = render_frame(ds).reshape(-1, 3).astype(int)
    i = np.arange(256)
    assert np.abs(out[:, 0] - i).max() <= 1
    assert np.all(out[:, 1] == 128)
    assert np.abs(out[:, 2] - (255 - i)).max() <= 1


def test_bad_palette_is_refused() -> None:
    ds = _palette_object(RedPaletteColorLookupTableData=b"\x00\x01" * 256)  # green and blue missing
    with pytest.raises(RenderError, match="palette"):
        render_frame(ds)


def test_bad_luts_are_refused() -> None:
    ds = _read(TEST_FILES / "MR_small.dcm")
    del ds.WindowCenter, ds.WindowWidth
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 12])
    item.add_new("LUTData", "US", [1, 2, 3])
    ds.VOILUTSequence = [item]
    with pytest.raises(RenderError, match="VOI LUT"):
        render_frame(ds)
    ds = _read(TEST_FILES / "MR_small.dcm")
    ds.ModalityLUTSequence = [Dataset()]
    with pytest.raises(RenderError, match="Modality LUT"):
        render_frame(ds)


@pytest.mark.parametrize("window", [Window(40, 0), Window(float("nan"), 400)])
def test_bad_caller_window_is_refused(window: Window) -> None:
    with pytest.raises(RenderError, match="window"):
        render_frame(_ct(), window=window)


# ---------------------------------------------------------------------------------------------
# Hostile objects: refused before anything large is allocated


def _peak_mib(fn) -> float:  # type: ignore[no-untyped-def]
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 2**20


def _refused(ds: Dataset, match: str, frame: int = 1) -> None:
    def go() -> None:
        with pytest.raises(RenderError, match=match):
            render_frame(ds, frame)

    assert _peak_mib(go) < 32


def test_no_pixel_data_is_refused() -> None:
    ds = _read(TEST_FILES / "CT_small.dcm")
    del ds.PixelData
    _refused(ds, "no pixel data")


def test_rows_columns_beyond_the_pixel_data_are_refused() -> None:
    ds = _grey_object(np.zeros((8, 8), np.uint16))
    ds.Rows = ds.Columns = 4096
    _refused(ds, r"pixel data holds 128 bytes.*needs 33554432")
    ds = _grey_object(np.zeros((8, 8), np.uint16))
    ds.NumberOfFrames = 100000
    _refused(ds, "pixel data holds")
    ds = _grey_object(np.zeros((8, 8), np.uint16))
    ds.Rows = ds.Columns = 60000
    _refused(ds, "pixel limit")


def _rle_object(rows: int, cols: int, frame: bytes) -> Dataset:
    ds = _grey_object(np.zeros((2, 2), np.uint8))
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return ds


def test_rle_bomb_is_refused() -> None:
    # one segment of PackBits runs: 2 bytes for 128 pixels at most
    segment = b"\x81\x00" * 64
    frame = struct.pack("<16I", 1, 64, *([0] * 14)) + segment
    small = _rle_object(64, 128, frame)
    assert render_frame(small).shape == (64, 128)  # the same frame, honest header: renders
    _refused(_rle_object(60000, 60000, frame), "pixel limit")
    _refused(_rle_object(4096, 4096, frame), "cannot hold 4096 x 4096")


def _jpeg(rows: int, cols: int, claim: tuple[int, int] | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((rows, cols), 100, np.uint8), "L").save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    if claim:
        i = data.find(b"\xff\xc0")
        data[i + 5 : i + 9] = struct.pack(">HH", *claim)
    return bytes(data)


def _jpeg_object(rows: int, cols: int, frame: bytes) -> Dataset:
    ds = _grey_object(np.zeros((2, 2), np.uint8))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return ds


def test_jpeg_bomb_is_refused() -> None:
    honest = render_frame(_jpeg_object(16, 16, _jpeg(16, 16)), window=Window(100, 50))
    assert np.all(honest == _linear(np.array([100.0]), 100, 50)[0])  # the same frame, honest header: renders
    _refused(_jpeg_object(16, 16, _jpeg(16, 16, claim=(60000, 60000))), "compressed frame is 60000 x 60000")
    _refused(_jpeg_object(60000, 60000, _jpeg(16, 16, claim=(60000, 60000))), "pixel limit")


def test_unsupported_syntax_is_refused() -> None:
    ds = _read(TEST_FILES / "CT_small.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: video, not a frame we render
    ds.PixelData = encapsulate([b"\x00" * 16])
    with pytest.raises(RenderError, match="not supported|no decoder|cannot"):
        render_frame(ds)


# ---------------------------------------------------------------------------------------------
# encode / render


@pytest.mark.parametrize("fmt", sorted(MEDIA_TYPES))
def test_encode_formats_decode_to_the_expected_size(fmt: str) -> None:
    grey = render_frame(_read(TEST_FILES / "CT_small.dcm"))
    colour = render_frame(_read(TEST_FILES / "examples_rgb_color.dcm"))
    for image, mode in ((grey, "L"), (colour, "RGB")):
        data = encode(image, fmt, quality=80)
        img = Image.open(io.BytesIO(data))
        assert img.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
        assert img.size == (image.shape[1], image.shape[0])
        assert img.mode == mode or fmt == "webp"
        if fmt == "png":
            assert np.array_equal(np.asarray(img), image)


@pytest.mark.parametrize(
    ("shape", "viewport", "expected"),
    [
        ((128, 128), (200, 100), (100, 100)),
        ((240, 320), (160, 160), (160, 120)),
        ((240, 320), (1000, 1000), (320, 240)),  # never enlarged
        ((350, 800), (64, 64), (64, 28)),
        ((3, 3), (1, 1), (1, 1)),
    ],
)
def test_viewport_keeps_aspect_ratio(shape: tuple[int, int], viewport: tuple[int, int], expected: tuple[int, int]) -> None:
    image = (np.indices(shape).sum(axis=0) % 256).astype(np.uint8)
    img = Image.open(io.BytesIO(encode(image, "png", size=viewport)))
    assert img.size == expected


def test_encode_refuses_bad_arguments() -> None:
    image = np.zeros((4, 4), np.uint8)
    with pytest.raises(RenderError):
        encode(image, "gif")
    with pytest.raises(RenderError):
        encode(image, "png", size=(0, 10))
    with pytest.raises(RenderError):
        encode(image.astype(np.uint16), "png")


def test_render_is_render_frame_then_encode() -> None:
    ds = _read(TEST_FILES / "CT_small.dcm")
    data = render(ds, window=Window(40, 400), size=(64, 64), fmt="png")
    img = Image.open(io.BytesIO(data))
    assert img.size == (64, 64)
    assert data == encode(render_frame(ds, window=Window(40, 400)), "png", size=(64, 64))


# ---------------------------------------------------------------------------------------------
# imx render


def _imx(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "imx"), "render", *args], capture_output=True, text=True, timeout=120)


def test_cli_renders_ct_with_and_without_window(tmp_path: Path) -> None:
    src = TEST_FILES / "CT_small.dcm"
    ds = _read(src)
    r = _imx(str(src), str(tmp_path / "a.png"))
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), render_frame(ds))
    r = _imx(str(src), str(tmp_path / "b.png"), "--window", "40", "400")
    assert r.returncode == 0, r.stderr
    b = np.asarray(Image.open(tmp_path / "b.png"))
    assert np.array_equal(b, render_frame(ds, window=Window(40, 400)))
    assert not np.array_equal(b, np.asarray(Image.open(tmp_path / "a.png")))
    r = _imx(str(src), str(tmp_path / "c.jpg"), "--size", "64x32", "--quality", "70")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "c.jpg").size == (32, 32)


def test_cli_renders_a_frame_of_a_multiframe(tmp_path: Path) -> None:
    src = TEST_FILES / "examples_ybr_color.dcm"
    r = _imx(str(src), str(tmp_path / "f.webp"), "--frame", "20")
    assert r.returncode == 0, r.stderr
    img = Image.open(tmp_path / "f.webp")
    assert img.format == "WEBP" and img.size == (320, 240)
    r = _imx(str(src), str(tmp_path / "f.png"), "--frame", "20")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "f.png")), render_frame(_read(src), 20))
    r = _imx(str(src), str(tmp_path / "g.png"), "--frame", "31")
    assert r.returncode == 1 and "out of range" in r.stderr


def test_cli_bad_input_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not a dicom file at all" * 10)
    r = _imx(str(bad), str(tmp_path / "x.png"))
    assert r.returncode == 1 and "cannot render" in r.stderr and "Traceback" not in r.stderr
    r = _imx(str(TEST_FILES / "MR_truncated.dcm"), str(tmp_path / "x.png"))
    assert r.returncode == 1 and "pixel data holds" in r.stderr
    r = _imx(str(TEST_FILES / "CT_small.dcm"), str(tmp_path / "x.gif"))
    assert r.returncode == 1 and ".png" in r.stderr
    r = _imx(str(tmp_path / "missing.dcm"), str(tmp_path / "x.png"))
    assert r.returncode == 1 and "no such file" in r.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("dtype", ["|u1", "|i1", "<u2", "<i2", ">u2", ">i2", "<i4", ">u4"])
def test_lookup_reads_the_table_at_each_stored_value(dtype: str) -> None:
    """The grey-level table lookup (a table over every bit pattern for 8 and 16 bits, signed
    values through their unsigned view, byte order respected) gives ``table[v - first]``."""
    from imaging.render import _lookup

    info = np.iinfo(np.dtype(dtype))
    rng = np.random.default_rng(7)
    lo, hi = max(info.min, -70000), min(info.max, 70000)
    arr = rng.integers(lo, hi, size=(37, 53), endpoint=True).astype(dtype)
    arr[0, 0], arr[-1, -1] = lo, hi
    first = int(arr.min())
    table = rng.integers(0, 255, size=int(arr.max()) - first + 1, endpoint=True).astype(np.uint8)
    expected = table[arr.astype(np.int64) - first]
    assert np.array_equal(_lookup(table, arr, first), expected)


# ---------------------------------------------------------------------------------------------
# Frame plans: the same pixels without the header


def _voi_lut_case() -> Dataset:
    ds = _grey_object(np.random.default_rng(3).integers(0, 4096, size=(96, 112)).astype(np.uint16))
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.add_new(0x00283006, "OW", np.arange(4096, dtype="<u2").tobytes())
    ds.VOILUTSequence = [item]
    return ds


def _plan_cases() -> dict[str, Dataset]:
    rng = np.random.default_rng(1453)
    ct = rng.integers(0, 4096, size=(3, 96, 112)).astype(np.uint16)
    signed = rng.integers(-2000, 2000, size=(96, 112)).astype(np.int16)
    byte = rng.integers(0, 256, size=(2, 128, 160)).astype(np.uint8)
    cases = {
        "ct 12 of 16 bits, rescale, two windows": _grey_object(
            ct | np.uint16(0xF000),  # bits above Bits Stored set: masked off
            BitsStored=12, HighBit=11, RescaleSlope=1, RescaleIntercept=-1024,
            WindowCenter=[40, -600], WindowWidth=[400, 1500],
        ),
        "signed, no window": _grey_object(signed),
        "signed 12 bits, sigmoid": _grey_object(
            signed, BitsStored=12, HighBit=11, WindowCenter=10, WindowWidth=300, VOILUTFunction="SIGMOID"
        ),
        "linear exact, fractional slope": _grey_object(
            ct[0], RescaleSlope=0.5, RescaleIntercept=3.25, WindowCenter=900.5, WindowWidth=0.5,
            VOILUTFunction="LINEAR_EXACT",
        ),
        "monochrome1": _grey_object(ct[:2], PhotometricInterpretation="MONOCHROME1", WindowCenter=2000, WindowWidth=3000),
        "monochrome1, identity shape": _grey_object(ct[0], PhotometricInterpretation="MONOCHROME1", PresentationLUTShape="IDENTITY"),
        "inverse shape, 8 bits, 2 frames": _grey_object(byte, PresentationLUTShape="INVERSE"),
        "unusable window width 0": _grey_object(byte[0], WindowCenter=100, WindowWidth=0),
        "constant frame": _grey_object(np.full((128, 160), 7, np.uint16)),
    }
    cases["voi lut sequence"] = _voi_lut_case()  # and no window: no plan (the table is not in it)
    return cases


@pytest.mark.parametrize("name", sorted(_plan_cases()))
def test_frame_plan_renders_what_the_header_renders(name: str, tmp_path: Path) -> None:
    """render_planned from a stored file and its plan gives render_frame's pixels for every
    frame, with the object's window, a caller's windows, and across a JSON round trip."""
    from imaging.dicomio import locate_stored, map_stored
    from imaging.render import FramePlan, plan_frames, render_planned

    path = tmp_path / "obj.dcm"
    _plan_cases()[name].save_as(path, enforce_file_format=True)
    ds, offset = locate_stored(str(path))
    plan = plan_frames(ds, offset)
    if name == "voi lut sequence":
        assert plan is None
        return
    assert plan is not None and offset is not None
    plan = FramePlan.from_json(plan.to_json())
    assert plan is not None
    buf = map_stored(str(path))
    for frame in range(1, frame_count(ds) + 1):
        for window in (None, Window(40, 400), Window(1000.5, 1), Window(-3, 7000)):
            assert np.array_equal(render_planned(buf, plan, frame, window=window), render_frame(ds, frame, window=window)), (frame, window)
    with pytest.raises(RenderError, match="out of range"):
        render_planned(buf, plan, frame_count(ds) + 1)
    with pytest.raises(RenderError, match="at least 1"):
        render_planned(buf, plan, 1, window=Window(10, 0.5)) if plan.function == "LINEAR" else render_planned(buf, plan, 1, window=Window(10, 0))
    with pytest.raises(RenderError, match="does not hold"):
        render_planned(bytes(buf)[:-2], plan, 1)


def test_frame_plans_cover_only_what_they_can_describe() -> None:
    """Over every bundled image: a plan only for uncompressed little-endian MONOCHROME1/2 Pixel
    Data without functional groups, and then the same frame as its header gives; CT_small (a
    native 16-bit CT) gets one."""
    from imaging.dicomio import locate_stored, map_stored
    from imaging.render import FramePlan, plan_frames, render_planned

    planned = []
    for name, path in sorted(IMAGE_FILES.items()):
        try:
            ds, offset = locate_stored(str(path))
            plan = plan_frames(ds, offset)
        except Exception:  # unreadable as a stored object: no plan is made for it either
            continue
        if plan is None:
            continue
        planned.append(name)
        ts = ds.file_meta.TransferSyntaxUID
        assert ts.is_little_endian and not ts.is_compressed and not ts.is_deflated, name
        assert ds.PhotometricInterpretation in ("MONOCHROME1", "MONOCHROME2"), name
        assert "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds, name
        assert np.array_equal(render_planned(map_stored(str(path)), plan), render_frame(ds)), name
    assert "CT_small.dcm" in planned
    assert len(planned) < len(IMAGE_FILES) // 2  # the common case, not everything
    assert FramePlan.from_json('{"v": 0}') is None and FramePlan.from_json("not json") is None



@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("junk", [False, True])
def test_stored_values_read_in_place_are_pydicoms(signed: bool, junk: bool) -> None:
    """Native frames read in place (12 of 16 bits, with or without bits set above Bits Stored,
    the sign extended for signed data) are what pydicom's pixel_array gives, for every frame."""
    from imaging.render import _decode

    rng = np.random.default_rng(11)
    stored = rng.integers(-2048 if signed else 0, 2048 if signed else 4096, size=(3, 40, 56))
    raw = (stored & 0x0FFF).astype(np.uint16)
    if junk:
        raw |= rng.integers(0, 16, size=raw.shape).astype(np.uint16) << 12
    ds = _grey_object(raw.view(np.int16) if signed else raw, BitsStored=12, HighBit=11)
    for frame in (1, 2, 3):
        arr, _ = _decode(ds, frame)
        assert np.array_equal(arr, pixel_array(ds, index=frame - 1)), frame
        assert np.array_equal(arr, stored[frame - 1])
