"""Burned-in annotation (imaging/burnin.py): the risk assessment, the region rules (packaged and an
operator's file) and lossless masking, on synthetic images and on pydicom's bundled files (read
from the package folder only: ``get_testdata_files`` would try to download more)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, pack_bits, unpack_bits
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from imaging.burnin import (
    BurnInError,
    BurnInRisk,
    Region,
    RegionRule,
    RegionRules,
    RegionRulesError,
    assess,
    mask,
)

TEST_FILES = Path(DATA_ROOT) / "test_files"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
ENHANCED_US_VOLUME = "1.2.840.10008.5.1.4.1.1.6.2"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
SC_TRUE_COLOR = "1.2.840.10008.5.1.4.1.1.7.4"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
NM_IMAGE = "1.2.840.10008.5.1.4.1.1.20"
# VL Photographic Image Storage is in none of the LIKELY lists: with it, Modality decides alone
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
PATIENT = "Quorvex^Ysolde"  # a name that must never appear in an error message
LOSSLESS_OUT = {ExplicitVRLittleEndian, RLELossless}


def bundled(name: str) -> Path:
    path = TEST_FILES / name
    assert path.is_file(), f"pydicom's test file {name} is missing from {TEST_FILES}"
    return path


def image(
    *,
    rows: int = 24,
    columns: int = 40,
    frames: int = 1,
    samples: int = 1,
    pi: str = "MONOCHROME2",
    bits_allocated: int = 16,
    bits_stored: int = 12,
    signed: bool = False,
    planar: int = 0,
    ts: UID = ExplicitVRLittleEndian,
    modality: str | None = "US",
    sop_class: str = US_IMAGE,
    seed: int = 0,
) -> tuple[Dataset, np.ndarray]:
    """A synthetic image and its values shaped (frames, rows, columns, samples). Values avoid the
    black of every photometric interpretation, so a masked pixel always shows."""
    if signed:
        lo, hi = -(2 ** (bits_stored - 1)) + 1, 2 ** (bits_stored - 1) - 2
    else:
        lo, hi = 1, 2**bits_stored - 2
    values = np.random.default_rng(seed).integers(
        lo, hi, size=(frames, rows, columns, samples), endpoint=True
    )
    ds = header(rows=rows, columns=columns, modality=modality, sop_class=sop_class, ts=ts)
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = pi
    if samples > 1:
        ds.PlanarConfiguration = planar
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = layout(values, bits_allocated, signed, ts.is_little_endian, planar)
    ds["PixelData"].VR = "OW" if bits_allocated > 8 else "OB"
    return ds, values


def header(
    *,
    rows: int | None = 24,
    columns: int | None = 40,
    modality: str | None = "US",
    sop_class: str = US_IMAGE,
    ts: UID = ExplicitVRLittleEndian,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientName = PATIENT
    if modality is not None:
        ds.Modality = modality
    if rows is not None:
        ds.Rows = rows
    if columns is not None:
        ds.Columns = columns
    return ds


def layout(
    values: np.ndarray, bits_allocated: int, signed: bool, little: bool, planar: int
) -> bytes:
    """Native Pixel Data bytes for (frames, rows, columns, samples) values, written here without
    the module under test."""
    order = "<" if little else ">"
    planes = values.transpose(0, 3, 1, 2) if planar == 1 else values
    data = (
        np.ascontiguousarray(planes)
        .astype(f"{order}{'i' if signed else 'u'}{bits_allocated // 8}")
        .tobytes()
    )
    return data + b"\0" if len(data) % 2 else data


def roundtrip(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return dcmread(buf)


def as_frames(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    return arr.reshape(
        int(ds.get("NumberOfFrames", 1) or 1), ds.Rows, ds.Columns, ds.SamplesPerPixel
    )


def inside(rows: int, columns: int, regions: list[Region]) -> np.ndarray:
    sel = np.zeros((rows, columns), dtype=bool)
    for r in regions:
        sel[r.y : r.y + r.height, r.x : r.x + r.width] = True  # slicing clips, as mask() does
    return sel


def displayed_black(ds: Dataset) -> int:
    """The decoded (pixel_array) value of black for ``ds`` as written."""
    pi, bits, signed = ds.PhotometricInterpretation, ds.BitsStored, ds.PixelRepresentation == 1
    if pi in ("RGB", "YBR_FULL"):
        return 0  # YBR_FULL (0, 128, 128) decodes to RGB (0, 0, 0)
    if pi == "MONOCHROME2":
        return -(2 ** (bits - 1)) if signed else 0
    assert pi == "MONOCHROME1"
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


def sample_regions(rows: int, columns: int) -> list[Region]:
    """A block in the middle and one at the bottom-right corner that runs off the image (clipped)."""
    return [
        Region(columns // 4, rows // 4, columns // 3, rows // 3),
        Region(columns - 5, rows - 3, 50, 50),
    ]


def check_masked(
    before: np.ndarray, after_ds: Dataset, regions: list[Region], black: int | None = None
) -> None:
    """Region pixels are black on every frame; every other pixel equals ``before`` exactly."""
    after = as_frames(after_ds.pixel_array, after_ds)
    before = as_frames(before, after_ds)
    sel = inside(after_ds.Rows, after_ds.Columns, regions)
    black = displayed_black(after_ds) if black is None else black
    assert not (before[:, sel] == black).all(), "the test regions were black already"
    assert (after[:, sel] == black).all()
    assert np.array_equal(after[:, ~sel], before[:, ~sel])
    assert after_ds.BurnedInAnnotation == "NO"


# -- assess -----------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # lower case on purpose
@pytest.mark.parametrize(
    ("modality", "sop_class", "burned_in", "conversion", "expected"),
    [
        ("US", US_IMAGE, "YES", None, BurnInRisk.DECLARED),
        ("US", US_IMAGE, "NO", None, BurnInRisk.NONE),
        ("US", US_IMAGE, None, None, BurnInRisk.LIKELY),
        ("US", US_IMAGE, "yes ", None, BurnInRisk.DECLARED),  # case and padding ignored
        ("US", US_IMAGE, "MAYBE", None, BurnInRisk.LIKELY),  # not an enumerated value: as if absent
        (None, SC_IMAGE, None, None, BurnInRisk.LIKELY),  # SC class, no Modality
        ("OT", SC_IMAGE, "NO", None, BurnInRisk.NONE),
        ("OT", SC_IMAGE, "YES", None, BurnInRisk.DECLARED),
        # by SOP class whatever the Modality says, multi-frame SC (1.2.840.10008.5.1.4.1.1.7.x) included
        ("MR", SC_TRUE_COLOR, None, None, BurnInRisk.LIKELY),
        ("PT", US_MULTIFRAME, None, None, BurnInRisk.LIKELY),
        ("PT", ENHANCED_US_VOLUME, None, None, BurnInRisk.LIKELY),
        ("CT", CT_IMAGE, None, None, BurnInRisk.NONE),
        ("CT", CT_IMAGE, "YES", None, BurnInRisk.DECLARED),
        ("CT", CT_IMAGE, "NO", None, BurnInRisk.NONE),
        ("NM", NM_IMAGE, None, "WSD", BurnInRisk.LIKELY),
        ("NM", NM_IMAGE, None, "SD", BurnInRisk.LIKELY),
        ("NM", NM_IMAGE, None, "SI", BurnInRisk.LIKELY),
        ("NM", NM_IMAGE, None, "DV", BurnInRisk.LIKELY),
        ("NM", NM_IMAGE, None, "SYN", BurnInRisk.NONE),
        ("NM", NM_IMAGE, None, None, BurnInRisk.NONE),
    ],
)
def test_assess_synthetic(modality, sop_class, burned_in, conversion, expected) -> None:
    ds, _ = image(modality=modality, sop_class=sop_class)
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    if conversion is not None:
        ds.ConversionType = conversion
    assert assess(ds) is expected


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize("modality", ["US", "IVUS", "XC", "ES", "OT", "DOC", "SC", "us"])
def test_assess_likely_modalities(modality: str) -> None:
    ds, _ = image(modality=modality, sop_class=VL_PHOTOGRAPHIC)
    assert assess(ds) is BurnInRisk.LIKELY


@pytest.mark.parametrize("modality", ["CT", "MR", "CR", "DX", "NM", "PT", "XA"])
def test_assess_other_modalities_without_attribute(modality: str) -> None:
    ds, _ = image(modality=modality, sop_class=VL_PHOTOGRAPHIC)
    assert assess(ds) is BurnInRisk.NONE


def test_assess_no_pixel_data_is_none() -> None:
    ds = header(rows=None, columns=None, modality="US", sop_class=US_IMAGE)
    ds.BurnedInAnnotation = "YES"
    assert assess(ds) is BurnInRisk.NONE


def test_assess_header_read_without_pixels_still_counts_as_image() -> None:
    """A dataset read with stop_before_pixels keeps Rows and Columns: it must not pass as NONE."""
    ds = dcmread(bundled("examples_rgb_color.dcm"), stop_before_pixels=True)
    assert "PixelData" not in ds
    assert assess(ds) is BurnInRisk.LIKELY


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("examples_rgb_color.dcm", BurnInRisk.LIKELY),  # US Image Storage, RGB
        ("examples_ybr_color.dcm", BurnInRisk.LIKELY),  # US Multi-frame, JPEG YBR_FULL_422
        ("examples_palette.dcm", BurnInRisk.LIKELY),  # US, PALETTE COLOR
        ("examples_jpeg2k.dcm", BurnInRisk.LIKELY),  # US, JPEG 2000 lossless
        ("ExplVR_BigEnd.dcm", BurnInRisk.LIKELY),  # US, big endian
        ("SC_rgb_rle.dcm", BurnInRisk.LIKELY),  # SC class, Modality OT
        ("GDCMJ2K_TextGBR.dcm", BurnInRisk.LIKELY),  # SC class, no Modality
        ("JPEG2000.dcm", BurnInRisk.LIKELY),  # Modality NM but SC class, Conversion Type WSD
        ("CT_small.dcm", BurnInRisk.NONE),
        ("MR_small.dcm", BurnInRisk.NONE),
        ("693_J2KI.dcm", BurnInRisk.NONE),
        ("dicomdirtests/77654033/CR1/6154", BurnInRisk.NONE),
        ("rtplan.dcm", BurnInRisk.NONE),  # no pixels
        ("reportsi.dcm", BurnInRisk.NONE),
        ("waveform_ecg.dcm", BurnInRisk.NONE),
    ],
)
def test_assess_bundled_files(name: str, expected: BurnInRisk) -> None:
    ds = dcmread(bundled(name))
    assert "BurnedInAnnotation" not in ds  # none of pydicom's files says; the heuristic decides
    assert assess(ds) is expected


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("CT_small.dcm", "YES", BurnInRisk.DECLARED),
        ("examples_rgb_color.dcm", "NO", BurnInRisk.NONE),
        ("examples_rgb_color.dcm", "YES", BurnInRisk.DECLARED),
        ("SC_rgb_rle.dcm", "NO", BurnInRisk.NONE),
    ],
)
def test_assess_bundled_files_with_attribute(name: str, value: str, expected: BurnInRisk) -> None:
    ds = dcmread(bundled(name))
    ds.BurnedInAnnotation = value
    assert assess(ds) is expected


# -- mask: synthetic native images (raw bytes written back with the same layout) --------------------


@pytest.mark.parametrize(
    ("ts", "pi", "samples", "bits_allocated", "bits_stored", "signed", "planar", "frames", "black"),
    [
        (ExplicitVRLittleEndian, "MONOCHROME2", 1, 16, 12, False, 0, 1, 0),
        # signed MONOCHROME2: the lowest value; MONOCHROME1: the highest
        (ExplicitVRLittleEndian, "MONOCHROME2", 1, 16, 12, True, 0, 1, -2048),
        (ImplicitVRLittleEndian, "MONOCHROME1", 1, 16, 10, False, 0, 1, 1023),
        (ExplicitVRLittleEndian, "MONOCHROME1", 1, 16, 12, True, 0, 1, 2047),
        (ExplicitVRBigEndian, "MONOCHROME2", 1, 16, 16, False, 0, 3, 0),
        (ExplicitVRLittleEndian, "MONOCHROME2", 1, 8, 8, False, 0, 5, 0),  # multi-frame
        (ExplicitVRLittleEndian, "RGB", 3, 8, 8, False, 0, 1, 0),
        (ExplicitVRLittleEndian, "RGB", 3, 8, 8, False, 1, 2, 0),  # planar configuration 1
        (ExplicitVRBigEndian, "RGB", 3, 16, 16, False, 1, 1, 0),
        (ExplicitVRLittleEndian, "MONOCHROME2", 1, 32, 20, False, 0, 2, 0),
    ],
)
def test_mask_native_synthetic(
    ts, pi, samples, bits_allocated, bits_stored, signed, planar, frames, black
) -> None:
    ds, values = image(
        ts=ts,
        pi=pi,
        samples=samples,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        signed=signed,
        planar=planar,
        frames=frames,
        rows=21,
        columns=33,
    )
    regions = sample_regions(21, 33)
    before = roundtrip(ds).pixel_array

    mask(ds, regions)

    expected = values.copy()
    expected[:, inside(21, 33, regions)] = black
    assert ds.PixelData == layout(expected, bits_allocated, signed, ts.is_little_endian, planar)
    assert ds.file_meta.TransferSyntaxUID == ts
    assert ds.PhotometricInterpretation == pi
    assert ds.get("PlanarConfiguration") == (planar if samples > 1 else None)
    assert ds.BitsAllocated == bits_allocated and ds.BitsStored == bits_stored
    assert "LossyImageCompression" not in ds
    out = roundtrip(ds)
    assert out.file_meta.TransferSyntaxUID == ts
    check_masked(before, out, regions, black)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_mask_single_bit_multiframe(photometric: str) -> None:
    """Multi-frame Single Bit Secondary Capture: the scanned-document kind, bit-packed across frames."""
    rows, columns, frames = 10, 13, 3  # 130 bits per frame: frames share bytes when packed
    bits = (
        np.random.default_rng(1)
        .integers(0, 1, size=(frames, rows, columns), endpoint=True)
        .astype(np.uint8)
    )
    black = 1 if photometric == "MONOCHROME1" else 0
    bits[:, 0, 0] = 1 - black  # at least one pixel to change inside the region
    ds = header(rows=rows, columns=columns, modality="OT", sop_class="1.2.840.10008.5.1.4.1.1.7.1")
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.NumberOfFrames = 1, photometric, frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.PixelData = pack_bits(bits)
    regions = [Region(0, 0, 4, 3)]
    before = roundtrip(ds).pixel_array

    mask(ds, regions)

    stored = unpack_bits(ds.PixelData)[: frames * rows * columns].reshape(frames, rows, columns)
    expected = bits.copy()
    expected[:, 0:3, 0:4] = black
    assert np.array_equal(stored, expected)
    check_masked(before, roundtrip(ds), regions, black)


# -- mask: pydicom's files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ts"),
    [
        ("examples_rgb_color.dcm", ExplicitVRLittleEndian),  # US RGB planar 0
        ("ExplVR_BigEnd.dcm", ExplicitVRBigEndian),  # US RGB planar 1, big endian
        ("SC_rgb_small_odd.dcm", ExplicitVRLittleEndian),  # 27 bytes of pixels: padded to even
        ("image_dfl.dcm", UID("1.2.840.10008.1.2.1.99")),  # deflated
        ("MR_small_implicit.dcm", ImplicitVRLittleEndian),
        ("MR_small_bigendian.dcm", ExplicitVRBigEndian),
        ("CT_small.dcm", ExplicitVRLittleEndian),
        ("dicomdirtests/77654033/CR1/6154", ExplicitVRLittleEndian),  # MONOCHROME1
        ("rtdose.dcm", ImplicitVRLittleEndian),  # 32-bit, 15 frames
    ],
)
def test_mask_native_bundled(name: str, ts: UID) -> None:
    source = dcmread(bundled(name))
    before = source.pixel_array
    ds = dcmread(bundled(name))
    rows, columns = ds.Rows, ds.Columns
    regions = [
        Region(columns // 4, rows // 4, max(1, columns // 3), max(1, rows // 3)),
        Region(columns - 1, rows - 1, 9, 9),
    ]

    mask(ds, regions)

    assert ds.file_meta.TransferSyntaxUID == ts
    assert ds.PhotometricInterpretation == source.PhotometricInterpretation
    assert ds.get("PlanarConfiguration") == source.get("PlanarConfiguration")
    assert len(ds.PixelData) == len(source.PixelData) + (len(source.PixelData) % 2)
    out = roundtrip(ds)
    assert out.file_meta.TransferSyntaxUID == ts
    check_masked(before, out, regions)


def test_mask_ybr_full_422_uncompressed_becomes_ybr_full() -> None:
    """4:2:2 chroma cannot be stored back subsampled without loss; YBR_FULL keeps every value."""
    name = "SC_ybr_full_422_uncompressed.dcm"
    before = dcmread(bundled(name)).pixel_array  # RGB, as pydicom decodes by default
    ds = dcmread(bundled(name))
    regions = sample_regions(ds.Rows, ds.Columns)

    mask(ds, regions)

    assert ds.PhotometricInterpretation == "YBR_FULL"
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert len(ds.PixelData) == ds.Rows * ds.Columns * 3
    assert ds.LossyImageCompression == "01"  # the file says it was lossy once: that stays
    check_masked(before, roundtrip(ds), regions, black=0)


def test_mask_palette_color_uses_darkest_entry() -> None:
    name = "examples_palette.dcm"
    source = dcmread(bundled(name))
    lut = apply_color_lut(np.arange(256, dtype=np.uint8), source).astype(float)
    luma = lut @ np.array([0.299, 0.587, 0.114])
    darkest = int(np.argmin(luma))
    ds = dcmread(bundled(name))
    regions = sample_regions(ds.Rows, ds.Columns)

    mask(ds, regions)

    out = roundtrip(ds)
    assert out.PhotometricInterpretation == "PALETTE COLOR"
    check_masked(source.pixel_array, out, regions, black=darkest)
    colours = apply_color_lut(out.pixel_array, out)[inside(ds.Rows, ds.Columns, regions)]
    assert (colours == lut[darkest]).all()
    assert lut[darkest].sum() == lut.sum(axis=1).min()  # this palette's darkest is black


# (file, transfer syntax written, source was lossy)
COMPRESSED = [
    ("MR_small_RLE.dcm", RLELossless, False),  # signed 16-bit
    ("SC_rgb_rle.dcm", RLELossless, False),
    ("SC_rgb_rle_2frame.dcm", RLELossless, False),
    ("SC_rgb_rle_16bit.dcm", RLELossless, False),
    ("SC_rgb_rle_32bit_2frame.dcm", ExplicitVRLittleEndian, False),  # beyond RLE's 16-bit profile
    ("rtdose_rle.dcm", ExplicitVRLittleEndian, False),  # 32-bit, 15 frames
    ("examples_jpeg2k.dcm", RLELossless, False),  # US, JPEG 2000 lossless YBR_RCT -> RGB
    ("GDCMJ2K_TextGBR.dcm", RLELossless, False),
    ("MR_small_jp2klossless.dcm", RLELossless, False),
    ("MR_small_jpeg_ls_lossless.dcm", RLELossless, False),
    ("SC_rgb_jpeg_gdcm.dcm", RLELossless, False),  # JPEG lossless
    # US multi-frame, JPEG baseline YBR_FULL_422, 30 frames
    ("examples_ybr_color.dcm", RLELossless, True),
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", RLELossless, True),  # JPEG baseline YBR_FULL_422
    ("SC_rgb_jpeg_dcmtk.dcm", RLELossless, True),  # JPEG baseline YBR_FULL
    # JPEG-LS near-lossless, without Lossy Image Compression in the file
    ("SC_rgb_jls_lossy_line.dcm", RLELossless, True),
    ("693_J2KI.dcm", RLELossless, True),  # JPEG 2000 irreversible
]


@pytest.mark.parametrize(("name", "written_ts", "lossy"), COMPRESSED)
def test_mask_compressed_bundled(name: str, written_ts: UID, lossy: bool) -> None:
    source = dcmread(bundled(name))
    before = source.pixel_array
    ds = dcmread(bundled(name))
    regions = sample_regions(ds.Rows, ds.Columns)

    mask(ds, regions)

    assert ds.file_meta.TransferSyntaxUID == written_ts
    out = roundtrip(ds)
    assert out.file_meta.TransferSyntaxUID in LOSSLESS_OUT
    colour = source.SamplesPerPixel == 3
    assert out.PhotometricInterpretation == ("RGB" if colour else source.PhotometricInterpretation)
    if colour:
        assert out.PlanarConfiguration == 0
    assert out.get("NumberOfFrames", 1) == source.get("NumberOfFrames", 1)
    check_masked(before, out, regions)
    if lossy:
        assert out.LossyImageCompression == "01"
        assert out.LossyImageCompressionMethod
    else:
        assert out.get("LossyImageCompression") == source.get("LossyImageCompression")


def test_mask_keeps_recorded_lossy_method() -> None:
    ds = dcmread(bundled("SC_rgb_small_odd_jpeg.dcm"))
    assert ds.LossyImageCompressionMethod == "ISO_10918_1"
    ds.LossyImageCompressionRatio = "7.5"
    mask(ds, [Region(0, 0, 1, 1)])
    assert (
        ds.LossyImageCompression,
        ds.LossyImageCompressionMethod,
        ds.LossyImageCompressionRatio,
    ) == ("01", "ISO_10918_1", 7.5)


def test_mask_removes_icon_image() -> None:
    """The icon is a thumbnail of the same pixels: it would still show the text."""
    ds = dcmread(bundled("examples_overlay.dcm"))
    assert "IconImageSequence" in ds
    mask(ds, [Region(0, 0, 10, 10)])
    assert "IconImageSequence" not in ds


def test_mask_drops_cached_pixel_array() -> None:
    ds, _ = image()
    assert ds.pixel_array[5, 10] != 0
    mask(ds, [Region(10, 5, 1, 1)])
    assert ds.pixel_array[5, 10] == 0


# -- mask: refusals ---------------------------------------------------------------------------------


def unchanged(ds: Dataset, pixels: bytes, ts: UID) -> bool:
    return (
        ds.PixelData == pixels
        and ds.file_meta.TransferSyntaxUID == ts
        and "BurnedInAnnotation" not in ds
    )


def test_mask_undecodable_pixels() -> None:
    """12-bit JPEG Extended: no installed decoder handles this file."""
    ds = dcmread(bundled("JPEG-lossy.dcm"))
    ds.PatientName = PATIENT
    pixels, ts = ds.PixelData, ds.file_meta.TransferSyntaxUID
    with pytest.raises(BurnInError, match="cannot decode") as err:
        mask(ds, [Region(0, 0, 10, 10)])
    assert PATIENT not in str(err.value) and "Quorvex" not in str(err.value)
    assert unchanged(ds, pixels, ts)


def test_mask_region_outside_image() -> None:
    ds, _ = image(rows=20, columns=30)
    pixels = ds.PixelData
    with pytest.raises(BurnInError, match="outside the 30x20 image"):
        mask(ds, [Region(0, 0, 5, 5), Region(30, 0, 10, 10)])
    assert unchanged(ds, pixels, ExplicitVRLittleEndian)


def test_mask_needs_regions() -> None:
    ds, _ = image()
    with pytest.raises(BurnInError, match="no regions"):
        mask(ds, [])


def test_mask_needs_pixel_data() -> None:
    ds = dcmread(bundled("examples_rgb_color.dcm"), stop_before_pixels=True)
    with pytest.raises(BurnInError, match="no Pixel Data"):
        mask(ds, [Region(0, 0, 5, 5)])


def test_burnin_error_is_value_error() -> None:
    assert issubclass(BurnInError, ValueError) and issubclass(RegionRulesError, ValueError)


@pytest.mark.parametrize(
    "args",
    [(-1, 0, 5, 5), (0, -2, 5, 5), (0, 0, 0, 5), (0, 0, 5, 0), (0, 0, 1.5, 5), (True, 0, 5, 5)],
)
def test_region_validation(args) -> None:
    with pytest.raises(ValueError):
        Region(*args)


# -- rules ------------------------------------------------------------------------------------------


def write_rules(tmp_path: Path, rules: list[dict], name: str = "operator_rules.json") -> Path:
    path = tmp_path / name
    path.write_text(
        json.dumps({"source": "operator test", "notes": ["test"], "rules": rules}), "utf-8"
    )
    return path


def device(
    rows: int = 480, columns: int = 640, manufacturer: str | None = None, model: str | None = None
) -> Dataset:
    ds = header(rows=rows, columns=columns)
    if manufacturer is not None:
        ds.Manufacturer = manufacturer
    if model is not None:
        ds.ManufacturerModelName = model
    return ds


def test_packaged_rules_are_generic_and_labelled() -> None:
    rules = RegionRules.load()
    assert len(rules) >= 3
    assert all(
        r.name.startswith("generic-") and r.manufacturer is None and r.model is None for r in rules
    )
    from importlib import resources

    data = json.loads(
        resources.files("imaging").joinpath("data/burnin_regions.json").read_text("utf-8")
    )
    notes = " ".join(data["notes"])
    assert "not vendor-verified" in notes and "starting points" in notes and data["source"]


@pytest.mark.parametrize(
    ("rows", "columns", "expected"),
    [
        (480, 640, "generic-640x480-top-band"),
        (600, 800, "generic-800x600-top-band"),
        (768, 1024, "generic-1024x768-top-band"),
        (481, 640, None),
        (640, 480, None),  # rows and columns are not interchangeable
    ],
)
def test_packaged_rules_match_frame_size(rows: int, columns: int, expected: str | None) -> None:
    rule = RegionRules.load().match(device(rows, columns, "Any Vendor", "Any Model"))
    assert (rule.name if rule else None) == expected


def test_packaged_rule_masks_bundled_ultrasound() -> None:
    """End to end: the 640x480 US frame from pydicom's files, matched and masked by the packaged rule."""
    name = "examples_jpeg2k.dcm"
    before = dcmread(bundled(name)).pixel_array
    ds = dcmread(bundled(name))
    rule = RegionRules.load().match(ds)
    assert rule is not None and rule.name == "generic-640x480-top-band"

    mask(ds, rule.regions)

    out = roundtrip(ds)
    after = out.pixel_array
    assert (after[:60] == 0).all()
    assert np.array_equal(after[60:], before[60:])
    assert out.BurnedInAnnotation == "NO" and out.file_meta.TransferSyntaxUID == RLELossless


def test_operator_rule_wins(tmp_path: Path) -> None:
    path = write_rules(
        tmp_path,
        [
            {
                "name": "acme-sono-5xx",
                "manufacturer": "acme.*",
                "model": r"sono ?5\d\d",
                "rows": 480,
                "columns": 640,
                "regions": [[0, 0, 640, 40], [0, 440, 640, 40]],
            },
        ],
    )
    rules = RegionRules.load(path)
    assert [r.name for r in rules][:2] == ["acme-sono-5xx", "generic-640x480-top-band"]
    rule = rules.match(device(manufacturer="ACME Medical", model="Sono 550"))
    assert rule is not None and rule.name == "acme-sono-5xx"
    assert rule.regions == (Region(0, 0, 640, 40), Region(0, 440, 640, 40))
    # another device of the same size falls through to the packaged rule
    assert (
        rules.match(device(manufacturer="Other Corp", model="Sono 550")).name
        == "generic-640x480-top-band"
    )
    assert (
        rules.match(device(manufacturer="ACME Medical", model="Sono 6000")).name
        == "generic-640x480-top-band"
    )


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        ("acme.*", "ACME Medical", True),
        ("acme medical", "ACME Medical  ", True),  # case-insensitive, padding stripped
        ("acme", "ACME Medical", False),  # the whole value must match
        (".*medical", "ACME Medical", True),
        ("G\\.?E\\.?( Medical Systems| Healthcare)?", "G.E. Medical Systems", True),
        ("G\\.?E\\.?( Medical Systems| Healthcare)?", "GE Healthcare", True),
        ("G\\.?E\\.?( Medical Systems| Healthcare)?", "GENERIC", False),
        ("acme.*", None, False),  # a pattern never matches an absent attribute
    ],
)
def test_manufacturer_regex(pattern: str, value: str | None, matches: bool) -> None:
    rule = RegionRule("r", pattern, None, None, None, (Region(0, 0, 1, 1),))
    assert rule.matches(device(manufacturer=value)) is matches
    assert RegionRules([rule]).match(device(manufacturer=value)) is (rule if matches else None)


def test_model_regex_and_any(tmp_path: Path) -> None:
    path = write_rules(
        tmp_path,
        [
            {
                "name": "model-only",
                "manufacturer": None,
                "model": "logiq.*",
                "rows": None,
                "columns": None,
                "regions": [[0, 0, 10, 10]],
            },
            {"name": "catch-all", "regions": [[0, 0, 5, 5]]},  # the matchers default to null: any
        ],
    )
    rules = RegionRules.load(path)
    assert rules.match(device(rows=300, columns=200, model="LOGIQ 700")).name == "model-only"
    assert rules.match(device(rows=300, columns=200, model="Voluson")).name == "catch-all"
    assert rules.match(device(rows=300, columns=200)).name == "catch-all"  # no model attribute
    assert (
        rules.match(dcmread(bundled("examples_jpeg2k.dcm"), stop_before_pixels=True)).name
        == "model-only"
    )


def test_rows_and_columns_match_separately(tmp_path: Path) -> None:
    path = write_rules(
        tmp_path,
        [
            {"name": "rows-600", "rows": 600, "columns": None, "regions": [[0, 0, 10, 10]]},
            {"name": "columns-720", "rows": None, "columns": 720, "regions": [[0, 0, 10, 10]]},
        ],
    )
    rules = RegionRules.load(path)
    assert rules.match(device(rows=600, columns=123)).name == "rows-600"
    assert rules.match(device(rows=576, columns=720)).name == "columns-720"
    assert rules.match(device(rows=600, columns=720)).name == "rows-600"  # first match wins
    assert rules.match(device(rows=576, columns=704)) is None


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ("{not json", ["not valid JSON", "line 1"]),
        ("[]", ["JSON object"]),
        ('{"rule": []}', ["unknown keys rule"]),
        ('{"rules": {}}', ["'rules' must be a list"]),
        ('{"rules": [], "notes": "one string"}', ["'notes'"]),
        ('{"rules": [7]}', ["rule 0", "must be an object"]),
        ('{"rules": [{"regions": [[0, 0, 1, 1]]}]}', ["rule 0", "name"]),
        ('{"rules": [{"name": "empty", "regions": []}]}', ["rule 0 ('empty')", "regions"]),
        ('{"rules": [{"name": "three", "regions": [[0, 0, 1]]}]}', ["('three')", "four integers"]),
        ('{"rules": [{"name": "neg", "regions": [[0, 0, -5, 1]]}]}', ["('neg')", "width"]),
        (
            '{"rules": [{"name": "bad-re", "manufacturer": "([", "regions": [[0, 0, 1, 1]]}]}',
            ["('bad-re')", "regular expression"],
        ),
        (
            '{"rules": [{"name": "empty-re", "model": "", "regions": [[0, 0, 1, 1]]}]}',
            ["('empty-re')", "model"],
        ),
        (
            '{"rules": [{"name": "typo", "colums": 640, "regions": [[0, 0, 1, 1]]}]}',
            ["('typo')", "colums"],
        ),
        (
            '{"rules": [{"name": "str-rows", "rows": "480", "regions": [[0, 0, 1, 1]]}]}',
            ["('str-rows')", "rows"],
        ),
        (
            '{"rules": [{"name": "bool-rows", "rows": true, "regions": [[0, 0, 1, 1]]}]}',
            ["('bool-rows')", "rows"],
        ),
        (
            '{"rules": [{"name": "a", "regions": [[0, 0, 1, 1]]}, {"name": "a", "regions": [[0, 0, 1, 1]]}]}',
            ["rule 1 ('a')", "that name"],
        ),
    ],
)
def test_malformed_operator_file(tmp_path: Path, content: str, fragments: list[str]) -> None:
    path = tmp_path / "site_rules.json"
    path.write_text(content, "utf-8")
    with pytest.raises(RegionRulesError) as err:
        RegionRules.load(path)
    message = str(err.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_missing_operator_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(RegionRulesError, match="cannot read the region rule file") as err:
        RegionRules.load(path)
    assert str(path) in str(err.value)


def test_region_and_rule_accept_numpy_ints_and_lists() -> None:
    region = Region(np.int64(1), np.int32(2), np.uint16(3), 4)
    assert region == Region(1, 2, 3, 4) and type(region.x) is int
    rule = RegionRule("r", None, None, 480, 640, [region])  # type: ignore[arg-type]
    assert rule.regions == (region,)
    with pytest.raises(ValueError, match="at least one region"):
        RegionRule("r", None, None, None, None, ())


def test_mask_checks_regions_before_decoding() -> None:
    """A misfitting rule is reported as such, even on pixels that could not be decoded anyway."""
    ds = dcmread(bundled("JPEG-lossy.dcm"))
    with pytest.raises(BurnInError, match="outside"):
        mask(ds, [Region(ds.Columns, 0, 5, 5)])
