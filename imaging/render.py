"""Rendering DICOM frames to display values, and encoding them as PNG, JPEG or WebP.

The greyscale pipeline follows the standard's order (PS3.3 C.11, PS3.4 Annex N.2):

    stored values -> Modality LUT (PS3.3 C.11.1: Rescale Slope/Intercept or Modality LUT Sequence)
                  -> VOI LUT (PS3.3 C.11.2: window with VOI LUT Function LINEAR, LINEAR_EXACT or
                     SIGMOID per C.11.2.1.2/C.11.2.1.3, or VOI LUT Sequence)
                  -> Presentation LUT Shape (PS3.3 C.11.6: IDENTITY / INVERSE) and MONOCHROME1
                     inversion (PS3.3 C.7.6.3.1.2)

Enhanced multi-frame objects carry their Modality and VOI transformations per frame (PS3.3
C.7.6.16.2.9 Pixel Value Transformation, C.7.6.16.2.10 Frame VOI LUT); those win over the
top-level attributes. Where the standard leaves a choice we behave like dcmtk's dcmj2pnm:
a Presentation LUT Shape present in the object decides the polarity, otherwise MONOCHROME1 is
inverted; colour samples wider than 8 bits keep their high bits.

Colour: RGB, YBR_FULL, YBR_FULL_422, YBR_RCT, YBR_ICT (converted by pydicom's decoders, PS3.3
C.7.6.3.1.2) and PALETTE COLOR (PS3.3 C.7.6.3.1.5 and C.7.9, segmented and 16-bit LUTs).

Only the requested frame is decoded. Before anything is decoded the object is checked against
what its Pixel Data can hold, so a crafted header cannot make us allocate gigabytes.
"""

from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

__all__ = [
    "MAX_FRAME_PIXELS",
    "MEDIA_TYPES",
    "RenderError",
    "FramePlan",
    "Window",
    "default_window",
    "encode",
    "frame_count",
    "plan_frames",
    "render",
    "render_frame",
    "render_planned",
]

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

# The largest frame we decode: 64 Mi pixels (8192 x 8192; a full-field mammogram is ~30 Mi).
# Whole-slide images are tiled into frames far smaller than this.
MAX_FRAME_PIXELS = 64 * 1024 * 1024

# PackBits (PS3.5 G.3.1) turns 2 bytes into at most 128: no RLE segment expands beyond 64:1.
_RLE_MAX_RATIO = 64

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class RenderError(ValueError):
    """The object cannot be rendered; the message says why (and never carries PHI)."""


@dataclass(frozen=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2): centre and width in modality (output of Modality LUT) units."""

    center: float
    width: float


# --------------------------------------------------------------------------------------------
# Header checks


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """An integer attribute, or RenderError naming the attribute (never its owner)."""
    try:
        value = ds.get(keyword, default)
    except Exception:  # a value pydicom cannot convert (e.g. IS "1A")
        raise RenderError(f"{keyword} has an invalid value") from None
    if value is None or value == "":
        if default is None:
            raise RenderError(f"{keyword} is missing")
        return default
    try:
        if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
            value = value[0]  # a multi-valued element: its first value
        f = float(value)
    except (TypeError, ValueError, IndexError):
        raise RenderError(f"{keyword} has an invalid value") from None
    if not math.isfinite(f) or f != int(f):
        raise RenderError(f"{keyword} has an invalid value")
    return int(f)


def frame_count(ds: Dataset) -> int:
    """Number of frames (PS3.3 C.7.6.6 Number of Frames; 1 when absent)."""
    n = _int(ds, "NumberOfFrames", 1)
    if n < 1:
        raise RenderError("NumberOfFrames must be at least 1")
    return n


def _pixel_keyword(ds: Dataset) -> str:
    for kw in _PIXEL_KEYWORDS:
        if kw in ds and ds[kw].value is not None and len(ds[kw].value) > 0:
            return kw
    raise RenderError("the object has no pixel data")


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if not ts:
        raise RenderError("the transfer syntax is unknown (no Transfer Syntax UID in the file meta information)")
    return UID(str(ts))


@dataclass(frozen=True)
class _Geometry:
    rows: int
    cols: int
    spp: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    frames: int
    photometric: str


def _geometry(ds: Dataset) -> _Geometry:
    rows = _int(ds, "Rows")
    cols = _int(ds, "Columns")
    if rows < 1 or cols < 1:
        raise RenderError("Rows and Columns must be at least 1")
    spp = _int(ds, "SamplesPerPixel", 1)
    if spp not in (1, 3):
        raise RenderError(f"SamplesPerPixel {spp} is not supported (1 or 3)")
    ba = _int(ds, "BitsAllocated")
    if ba not in (1, 8, 16, 32, 64):
        raise RenderError(f"BitsAllocated {ba} is not supported")
    bs = _int(ds, "BitsStored", ba)
    if not 1 <= bs <= ba:
        raise RenderError("BitsStored must be between 1 and BitsAllocated")
    pr = _int(ds, "PixelRepresentation", 0)
    pi = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if not pi:
        pi = "MONOCHROME2" if spp == 1 else "RGB"
    if spp == 1 and pi not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"):
        raise RenderError(f"Photometric Interpretation {pi} does not match one sample per pixel")
    if spp == 3 and pi not in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420"):
        raise RenderError(f"Photometric Interpretation {pi} is not supported for colour")
    if rows * cols > MAX_FRAME_PIXELS:
        raise RenderError(
            f"a frame of {rows} x {cols} pixels exceeds the {MAX_FRAME_PIXELS} pixel limit for rendering"
        )
    return _Geometry(rows, cols, spp, ba, bs, pr == 1, frame_count(ds), pi)


def _check_native(ds: Dataset, g: _Geometry, keyword: str) -> None:
    """Native (uncompressed) Pixel Data must hold every frame the header declares (PS3.5 8.1.1)."""
    per_frame_samples = g.rows * g.cols * g.spp
    if g.photometric == "YBR_FULL_422":
        per_frame_samples = g.rows * g.cols * 2  # two chroma samples per pair of pixels (PS3.3 C.7.6.3.1.2)
    bits = per_frame_samples * g.frames * g.bits_allocated
    need = (bits + 7) // 8
    have = len(ds[keyword].value)
    if have < need:
        raise RenderError(
            f"the pixel data holds {have} bytes but Rows x Columns x frames x samples x bits "
            f"({g.rows} x {g.cols} x {g.frames} x {g.spp} x {g.bits_allocated}) needs {need}"
        )


# JPEG start-of-frame markers (ITU T.81 B.1.1.3) and JPEG-LS SOF55 (ITU T.87 C.2.2)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def _jpeg_dimensions(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG or JPEG-LS codestream's frame header."""
    i, n = 2, len(frame)
    if n < 4 or frame[0] != 0xFF or frame[1] != 0xD8:
        return None
    while i + 4 <= n:
        if frame[i] != 0xFF:
            return None
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", frame[i + 2 : i + 4])
        if marker in _SOF:
            if i + 10 > n:
                return None
            y, x = struct.unpack(">HH", frame[i + 5 : i + 9])
            return y, x, frame[i + 9]
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + length
    return None


def _j2k_dimensions(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG 2000 codestream's SIZ segment (ITU T.800 A.5.1)."""
    start = frame.find(b"\xff\x4f\xff\x51")  # SOC then SIZ (also inside a JP2 box wrapper)
    if start < 0 or start + 42 > len(frame):
        return None
    siz = frame[start + 4 :]
    _lsiz, _rsiz, xsiz, ysiz, xo, yo = struct.unpack(">HHIIII", siz[:20])
    (csiz,) = struct.unpack(">H", siz[36:38])
    return ysiz - yo, xsiz - xo, csiz


def _check_encapsulated(ds: Dataset, g: _Geometry, ts: UID, frame: int) -> None:
    """An encapsulated frame (PS3.5 A.4) must be what the header says and must not expand without bound."""
    from pydicom.encaps import get_frame

    try:
        eot = None
        if "ExtendedOffsetTable" in ds and ds.ExtendedOffsetTable:
            eot = (ds.ExtendedOffsetTable, ds.get("ExtendedOffsetTableLengths", b""))
        data = get_frame(ds.PixelData, frame - 1, extended_offsets=eot, number_of_frames=g.frames)
    except Exception:
        raise RenderError(f"frame {frame} cannot be found in the encapsulated pixel data") from None
    bytes_per_sample = max(1, g.bits_allocated // 8)
    need = g.rows * g.cols * g.spp * bytes_per_sample
    if ts == "1.2.840.10008.1.2.5":  # RLE Lossless, PS3.5 Annex G
        if len(data) < 64:
            raise RenderError("the RLE frame is shorter than its 64-byte header")
        nseg = struct.unpack("<I", data[:4])[0]
        if nseg != g.spp * bytes_per_sample:
            raise RenderError(f"the RLE frame has {nseg} segments, the header implies {g.spp * bytes_per_sample}")
        if need > _RLE_MAX_RATIO * (len(data) - 64) + 64:
            raise RenderError(
                f"the RLE frame of {len(data)} bytes cannot hold {g.rows} x {g.cols} pixels "
                "(it would have to expand more than RLE allows)"
            )
        return
    dims = None
    if ts.startswith("1.2.840.10008.1.2.4.") and ts not in _J2K_SYNTAXES:
        dims = _jpeg_dimensions(data)
    elif ts in _J2K_SYNTAXES:
        dims = _j2k_dimensions(data)
    if dims is not None:
        rows, cols, comps = dims
        if rows and (rows, cols) != (g.rows, g.cols):
            raise RenderError(
                f"the compressed frame is {rows} x {cols} pixels but Rows x Columns say {g.rows} x {g.cols}"
            )
        if rows * cols > MAX_FRAME_PIXELS:
            raise RenderError("the compressed frame exceeds the pixel limit for rendering")
        if comps not in (1, 3, 4) or (comps == 1) != (g.spp == 1):
            raise RenderError(f"the compressed frame has {comps} components but SamplesPerPixel is {g.spp}")


_J2K_SYNTAXES = {
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.92",
    "1.2.840.10008.1.2.4.93",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
}


# --------------------------------------------------------------------------------------------
# Decoding


def _decode(ds: Dataset, frame: int) -> tuple[np.ndarray, _Geometry]:
    """Stored values of one frame: (rows, cols) or (rows, cols, 3) RGB. Checks come first."""
    from pydicom.pixels import pixel_array
    from pydicom.pixels.decoders.base import get_decoder

    keyword = _pixel_keyword(ds)
    g = _geometry(ds)
    if not 1 <= frame <= g.frames:
        raise RenderError(f"frame {frame} is out of range: the object has {g.frames} frame(s)")
    ts = _transfer_syntax(ds)
    if keyword != "PixelData":
        if g.spp != 1:
            raise RenderError("float pixel data must have one sample per pixel")
        _check_native(ds, g, keyword)
    elif ts.is_compressed if ts.is_transfer_syntax else False:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            raise RenderError(f"transfer syntax {ts.name} is not supported for rendering") from None
        if not decoder.is_available:
            raise RenderError(f"no decoder is installed for transfer syntax {ts.name}")
        _check_encapsulated(ds, g, ts, frame)
    elif ts.is_transfer_syntax:
        _check_native(ds, g, keyword)
    else:
        raise RenderError("the transfer syntax is not a known one")
    try:
        arr = _native_frame(ds, g, ts, frame) if keyword == "PixelData" else None
        if arr is None:
            arr = pixel_array(ds, index=frame - 1)
    except MemoryError:
        raise RenderError("the frame is too large to decode") from None
    except Exception as e:  # decoder messages describe the codestream, never the patient
        arr = None
        if g.spp == 1 and keyword == "PixelData" and ts in _GDCM_FALLBACK:
            arr = _gdcm_frame(ds, g, ts, frame)
        if arr is None:
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise RenderError(f"the pixel data cannot be decoded ({ts.name}): {reason}") from None
    expect = (g.rows, g.cols) if g.spp == 1 else (g.rows, g.cols, 3)
    if arr.shape != expect:
        raise RenderError(f"the decoded frame has shape {arr.shape}, the header says {expect}")
    return arr, g


def _native_frame(ds: Dataset, g: _Geometry, ts: UID, frame: int) -> np.ndarray | None:
    """One frame of uncompressed little-endian single-sample 8 or 16-bit Pixel Data, read in
    place: what pydicom's ``pixel_array`` gives (bits above Bits Stored masked off, or the sign
    extended, PS3.5 8.1.1) without its set-up per call (0.5 ms, a sixth of a render). None for
    any other layout. The length was checked before (``_check_native``)."""
    if g.spp != 1 or g.bits_allocated not in (8, 16) or not 1 <= g.bits_stored <= g.bits_allocated:
        return None
    if not ts.is_transfer_syntax or ts.is_compressed or not ts.is_little_endian:
        return None
    return _native_values(ds.PixelData, 0, g, frame)


def _native_values(buffer: Any, offset: int, g: _Geometry, frame: int) -> np.ndarray:
    """Stored values of ``frame`` of little-endian 8 or 16-bit single-sample pixel data whose
    value starts at ``offset`` in ``buffer`` (``_native_frame``, ``render_planned``), read in
    place when no bits need masking off or sign-extending."""
    dtype = np.dtype(("<i" if g.signed else "<u") + str(g.bits_allocated // 8))
    n = g.rows * g.cols
    arr = np.frombuffer(buffer, dtype=dtype, count=n, offset=offset + (frame - 1) * n * dtype.itemsize)
    shift = g.bits_allocated - g.bits_stored
    if shift and g.signed:
        arr = (arr << shift) >> shift
    elif shift and int(arr.max()) >> g.bits_stored:  # bits above Bits Stored are set: not values
        arr = arr & dtype.type((1 << g.bits_stored) - 1)
    # otherwise a read-only view of the pixel data: nothing downstream writes into stored values
    return arr.reshape(g.rows, g.cols)


# pydicom's GDCM plugin refuses 12-bit JPEG Extended, which GDCM itself decodes (its IJG
# build has 8, 12 and 16-bit variants); we call GDCM directly for greyscale frames there.
_GDCM_FALLBACK = {
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 and 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
}


def _gdcm_frame(ds: Dataset, g: _Geometry, ts: UID, frame: int) -> np.ndarray | None:
    """One greyscale frame decoded by GDCM's codecs (PS3.5 A.4.1, A.4.3), or None if GDCM cannot."""
    try:
        import gdcm
        from pydicom.encaps import get_frame

        src = get_frame(ds.PixelData, frame - 1, number_of_frames=g.frames)
        fragment = gdcm.Fragment()
        fragment.SetByteStringValue(src)
        fragments = gdcm.SequenceOfFragments.New()
        fragments.AddFragment(fragment)
        elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
        elem.SetValue(fragments.__ref__())
        img = gdcm.Image()
        img.SetNumberOfDimensions(2)
        img.SetDimensions((g.cols, g.rows, 1))
        img.SetDataElement(elem)
        img.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(gdcm.PhotometricInterpretation.MONOCHROME2))
        img.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(ts))))
        ba = 8 if g.bits_stored <= 8 else 16
        img.SetPixelFormat(gdcm.PixelFormat(1, ba, g.bits_stored, g.bits_stored - 1, int(g.signed)))
        buf = img.GetBuffer()
    except Exception:
        return None
    if not buf:
        return None
    raw = buf.encode("utf-8", "surrogateescape")
    dtype = np.dtype(("<i" if g.signed else "<u") + ("1" if ba == 8 else "2"))
    if len(raw) != g.rows * g.cols * dtype.itemsize:
        return None
    return np.frombuffer(raw, dtype=dtype).reshape(g.rows, g.cols)


# --------------------------------------------------------------------------------------------
# Functional groups and the Modality LUT


def _frame_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """The first item of a functional group macro for a frame: per-frame first, then shared (PS3.3 C.7.6.16)."""
    try:
        pf = ds.get("PerFrameFunctionalGroupsSequence")
        if pf is not None and len(pf) >= frame:
            seq = pf[frame - 1].get(sequence)
            if seq:
                return seq[0]
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared:
            seq = shared[0].get(sequence)
            if seq:
                return seq[0]
    except Exception:
        return None
    return None


def _floats(value: object) -> list[float]:
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        value = [value]
    out = []
    for v in value:  # type: ignore[union-attr]
        try:
            f = float(v)
        except (TypeError, ValueError):
            return []
        if not math.isfinite(f):
            return []
        out.append(f)
    return out


def _lut(item: Dataset, what: str, signed: bool = False) -> tuple[np.ndarray, int, int]:
    """(table, first mapped value, bits) from an item with LUT Descriptor and LUT Data (PS3.3 C.11.1.1.1)."""
    try:
        desc = [int(v) for v in item.LUTDescriptor]
        elem = item["LUTData"]
    except Exception:
        raise RenderError(f"the {what} has no valid LUT Descriptor or LUT Data") from None
    if len(desc) != 3:
        raise RenderError(f"the {what} LUT Descriptor must have three values")
    n, first, bits = desc
    n = n or 65536
    if signed and 32767 < first < 65536:  # the first mapped value follows Pixel Representation (PS3.3 C.11.1.1.1)
        first -= 65536
    raw = elem.value
    if isinstance(raw, (bytes, bytearray)):
        if bits == 8 and len(raw) in (n, n + 1):
            table = np.frombuffer(raw[:n], dtype=np.uint8)
        else:
            table = np.frombuffer(raw[: (len(raw) // 2) * 2], dtype="<u2")
    else:
        try:
            values = list(raw) if hasattr(raw, "__iter__") else [raw]
            table = np.asarray(values, dtype=np.int64)
        except (TypeError, ValueError):
            raise RenderError(f"the {what} LUT Data is not a list of numbers") from None
    if table.size < n:
        raise RenderError(f"the {what} LUT Data has {table.size} entries, its descriptor says {n}")
    if not 1 <= bits <= 16:
        raise RenderError(f"the {what} LUT Descriptor declares {bits} bits")
    return table[:n].astype(np.float64), first, bits


def _apply_table(values: np.ndarray, table: np.ndarray, first: int) -> np.ndarray:
    idx = np.clip(np.asarray(values, dtype=np.int64) - first, 0, table.size - 1)
    return table[idx]


class _Modality:
    """Modality LUT of one frame (PS3.3 C.11.1): rescale, a lookup table, or identity."""

    def __init__(self, ds: Dataset, frame: int, signed: bool) -> None:
        self.table: np.ndarray | None = None
        self.first = 0
        self.slope, self.intercept = 1.0, 0.0
        item = _frame_item(ds, frame, "PixelValueTransformationSequence")
        src = item if item is not None and "RescaleSlope" in item else ds
        if "ModalityLUTSequence" in ds and "RescaleSlope" not in src:
            seq = ds.ModalityLUTSequence
            if not seq:
                raise RenderError("the Modality LUT Sequence is empty")
            self.table, self.first, _ = _lut(seq[0], "Modality LUT", signed)
            return
        slope = _floats(src.get("RescaleSlope"))
        intercept = _floats(src.get("RescaleIntercept"))
        if slope and slope[0] != 0:
            self.slope = slope[0]
        if intercept:
            self.intercept = intercept[0]

    @classmethod
    def rescale(cls, slope: float, intercept: float) -> _Modality:
        """A rescale (Rescale Slope and Intercept as ``__init__`` reads them from an object)."""
        m = cls.__new__(cls)
        m.table, m.first, m.slope, m.intercept = None, 0, slope, intercept
        return m

    def __call__(self, values: np.ndarray) -> np.ndarray:
        if self.table is not None:
            return _apply_table(values, self.table, self.first)
        v = np.asarray(values, dtype=np.float64)
        if self.slope == 1.0 and self.intercept == 0.0:
            return v
        return v * self.slope + self.intercept


# --------------------------------------------------------------------------------------------
# VOI


def default_window(ds: Dataset, frame: int = 1) -> Window | None:
    """The object's first window (PS3.3 C.11.2, per-frame Frame VOI LUT C.7.6.16.2.10 first), else None.

    Only a usable window is returned: width at least 1 (for SIGMOID and LINEAR_EXACT, above 0).
    """
    item = _frame_item(ds, frame, "FrameVOILUTSequence")
    for src in (item, ds):
        if src is None:
            continue
        centers = _floats(src.get("WindowCenter"))
        widths = _floats(src.get("WindowWidth"))
        if centers and widths:
            function = _voi_function(src)
            if widths[0] >= 1 or (function != "LINEAR" and widths[0] > 0):
                return Window(centers[0], widths[0])
    return None


def _voi_function(src: Dataset | None) -> str:
    value = str((src.get("VOILUTFunction", "") if src is not None else "") or "").strip().upper()
    return value if value in ("LINEAR", "LINEAR_EXACT", "SIGMOID") else "LINEAR"


def _window_function(ds: Dataset, frame: int) -> str:
    item = _frame_item(ds, frame, "FrameVOILUTSequence")
    if item is not None and "WindowCenter" in item:
        return _voi_function(item)
    return _voi_function(ds)


def _apply_window(x: np.ndarray, w: Window, function: str) -> np.ndarray:
    """Window to [0, 1] per PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT) and C.11.2.1.3 (SIGMOID)."""
    c, width = w.center, w.width
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - c) / width + 0.5, 0.0, 1.0)
    if width <= 1:  # a threshold at c - 0.5
        return (x > c - 0.5).astype(np.float64)
    return np.clip((x - (c - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _range_window(lo: float, hi: float) -> Window:
    """The LINEAR window that maps lo to black and hi to white (dcmtk's min-max window)."""
    return Window((lo + hi + 1) / 2.0, max(hi - lo + 1, 1.0))


# --------------------------------------------------------------------------------------------
# Rendering


def _inverted(ds: Dataset, photometric: str) -> bool:
    """Polarity: a Presentation LUT Shape decides (PS3.3 C.11.6.1.2); otherwise MONOCHROME1 inverts."""
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    if shape == "INVERSE":
        return True
    if shape == "IDENTITY":
        return False
    return photometric == "MONOCHROME1"


@dataclass(frozen=True)
class _Levels:
    """How the stored values of a greyscale frame become grey levels (PS3.3 C.11): its Modality
    LUT, the object's own window (``default``) and its VOI LUT Function, a VOI LUT Sequence
    (``voi``: read only when it can apply: no window given and none in the object) and the
    polarity."""

    modality: _Modality
    default: Window | None
    function: str
    voi: tuple[np.ndarray, int, int] | None
    inverted: bool

    @classmethod
    def of(cls, ds: Dataset, frame: int, g: _Geometry, window: Window | None) -> _Levels:
        default = default_window(ds, frame)
        voi = None
        if window is None and default is None and "VOILUTSequence" in ds and ds.VOILUTSequence:
            voi = _lut(ds.VOILUTSequence[0], "VOI LUT", g.signed and "ModalityLUTSequence" not in ds)
        return cls(
            _Modality(ds, frame, g.signed),
            default,
            _window_function(ds, frame),
            voi,
            _inverted(ds, g.photometric),
        )

    def grey(self, arr: np.ndarray, window: Window | None) -> np.ndarray:
        """uint8 grey levels of the stored values ``arr``; ``window``: the caller's, or None."""
        function = self.function if window is not None or self.default is not None else "LINEAR"
        if window is not None:
            if not (math.isfinite(window.center) and math.isfinite(window.width)):
                raise RenderError("the window centre and width must be finite numbers")
            if window.width <= 0 or (function == "LINEAR" and window.width < 1):
                raise RenderError("the window width must be at least 1")
        else:
            window = self.default
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = arr.min(), arr.max()
        integer = arr.dtype.kind in "iu" and int(hi) - int(lo) <= 65535
        if integer:
            # one vectorised lookup table over the frame's stored range
            lo_i, hi_i = int(lo), int(hi)
            values = self.modality(np.arange(lo_i, hi_i + 1, dtype=np.int64))
        else:
            values = self.modality(arr)
        if window is None and self.voi is not None:
            table, first, bits = self.voi
            out = _apply_table(values, table, first) / float((1 << bits) - 1)
            top = float(table.max()) if table.size else 0.0
            if top > (1 << bits) - 1:  # data wider than declared: scale by what is there
                out = _apply_table(values, table, first) / top
        else:
            if window is None:
                window = _range_window(float(values.min()), float(values.max()))
                function = "LINEAR"
            out = _apply_window(values, window, function)
        if self.inverted:
            out = 1.0 - out
        out8 = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
        return _lookup(out8, arr, lo_i) if integer else out8


def _grey(ds: Dataset, arr: np.ndarray, g: _Geometry, frame: int, window: Window | None) -> np.ndarray:
    return _Levels.of(ds, frame, g, window).grey(arr, window)


def _lookup(table: np.ndarray, arr: np.ndarray, first: int) -> np.ndarray:
    """``table[v - first]`` for every stored value ``v`` of an integer frame (the frame's
    values all lie in ``first .. first + table.size - 1``).

    Frames of 8 or 16 bits index a table over every bit pattern of their type directly (signed
    values through their unsigned view), with no index array made: ``take`` over the frame is
    about twice as fast as fancy indexing with a computed offset."""
    if not arr.dtype.isnative:  # big-endian data: the unsigned view below reads native order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype.itemsize <= 2:
        full = np.zeros(1 << (8 * arr.dtype.itemsize), dtype=table.dtype)
        mask = full.size - 1
        full[np.arange(first, first + table.size, dtype=np.int64) & mask] = table
        return full.take(arr.view(f"u{arr.dtype.itemsize}"))
    return table.take(arr.astype(np.int64) - first)


# --------------------------------------------------------------------------------------------
# Frame plans: rendering the common case without the object's header


@dataclass(frozen=True)
class FramePlan:
    """Everything rendering a frame of an uncompressed greyscale object takes from its header:
    where the value of its Pixel Data lies in the stored object, its geometry and its grey-level
    pipeline (rescale, the object's window and VOI LUT Function, polarity). Made once from a
    parsed object (``plan_frames``); ``render_planned`` then renders any frame of it from the
    object's bytes alone, the same pixels as ``render_frame``, without parsing it again."""

    offset: int
    rows: int
    cols: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    frames: int
    photometric: str
    slope: float
    intercept: float
    window: tuple[float, float] | None
    function: str
    inverted: bool

    VERSION = 1

    def to_json(self) -> str:
        return json.dumps({"v": self.VERSION, **asdict(self)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> FramePlan | None:
        """The plan, or None when ``text`` is not one of this version (made by another release)."""
        try:
            d = json.loads(text)
            if d.pop("v", None) != cls.VERSION:
                return None
            if d["window"] is not None:
                d["window"] = (float(d["window"][0]), float(d["window"][1]))
            return cls(**d)
        except (TypeError, ValueError, KeyError):
            return None

    @property
    def geometry(self) -> _Geometry:
        return _Geometry(
            self.rows, self.cols, 1, self.bits_allocated, self.bits_stored, self.signed, self.frames, self.photometric
        )

    @property
    def length(self) -> int:
        return self.rows * self.cols * self.frames * self.bits_allocated // 8


def plan_frames(ds: Dataset, pixel_offset: int | None) -> FramePlan | None:
    """The object's frame plan, or None unless it is the common case the plan covers:
    uncompressed little-endian 8 or 16-bit MONOCHROME1/2 Pixel Data whose value lies at
    ``pixel_offset`` (``imaging.dicomio.locate_stored``), a rescale (no Modality LUT Sequence),
    a window or none (no VOI LUT Sequence in use), and no functional groups (the same levels for
    every frame). Anything else is rendered from the parsed object."""
    if pixel_offset is None or any(k in ds for k in ("FloatPixelData", "DoubleFloatPixelData")):
        return None
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        return None
    try:
        keyword = _pixel_keyword(ds)
        g = _geometry(ds)
        ts = _transfer_syntax(ds)
        if keyword != "PixelData" or g.spp != 1 or g.photometric not in ("MONOCHROME1", "MONOCHROME2"):
            return None
        if not ts.is_transfer_syntax or ts.is_compressed or not ts.is_little_endian or ts.is_deflated:
            return None
        if g.bits_allocated not in (8, 16):
            return None
        _check_native(ds, g, keyword)
        levels = _Levels.of(ds, 1, g, None)
    except RenderError:
        return None
    if levels.modality.table is not None or levels.voi is not None:
        return None
    w = levels.default
    return FramePlan(
        offset=pixel_offset,
        rows=g.rows,
        cols=g.cols,
        bits_allocated=g.bits_allocated,
        bits_stored=g.bits_stored,
        signed=g.signed,
        frames=g.frames,
        photometric=g.photometric,
        slope=levels.modality.slope,
        intercept=levels.modality.intercept,
        window=(w.center, w.width) if w is not None else None,
        function=levels.function,
        inverted=levels.inverted,
    )


def render_planned(buffer: Any, plan: FramePlan, frame: int = 1, *, window: Window | None = None) -> np.ndarray:
    """``render_frame`` of the object whose bytes are ``buffer`` (a mapping of its file, or its
    bytes), from its ``plan`` instead of its header."""
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)):
        raise RenderError("the frame number must be an integer")
    if not 1 <= frame <= plan.frames:
        raise RenderError(f"frame {frame} is out of range: the object has {plan.frames} frame(s)")
    if plan.offset < 0 or plan.offset + plan.length > len(buffer):
        raise RenderError("the stored object does not hold the pixel data its frame plan describes")
    modality = _Modality.rescale(plan.slope, plan.intercept)
    default = Window(*plan.window) if plan.window is not None else None
    levels = _Levels(modality, default, plan.function, None, plan.inverted)
    return levels.grey(_native_values(buffer, plan.offset, plan.geometry, int(frame)), window)


def _palette(ds: Dataset, arr: np.ndarray) -> np.ndarray:
    """PALETTE COLOR to RGB (PS3.3 C.7.6.3.1.5, C.7.9), normal and segmented, 8 and 16 bits."""
    from pydicom.pixels import apply_color_lut

    try:
        rgb = apply_color_lut(arr, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    except Exception as e:
        raise RenderError(f"the palette colour lookup table is invalid ({type(e).__name__})") from None
    if rgb.dtype == np.uint8 or bits <= 8:
        return rgb.astype(np.uint8)
    if int(rgb.max()) <= 255 and _palette_max(ds) <= 255:
        return rgb.astype(np.uint8)  # a 16-bit descriptor over 8-bit data (dcmtk checks the same)
    return (rgb >> 8).astype(np.uint8)


def _palette_max(ds: Dataset) -> int:
    top = 0
    for c in ("Red", "Green", "Blue"):
        data = ds.get(f"{c}PaletteColorLookupTableData")
        if data is not None and len(data) >= 2:
            top = max(top, int(np.frombuffer(data[: len(data) // 2 * 2], dtype="<u2").max()))
        else:
            return 65535
    return top


def _colour(arr: np.ndarray, g: _Geometry) -> np.ndarray:
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    shift = max(g.bits_stored - 8, 0)
    return (arr.astype(np.uint64 if g.bits_allocated > 16 else np.uint32) >> shift).clip(0, 255).astype(np.uint8)


def render_frame(ds: Dataset, frame: int = 1, *, window: Window | None = None) -> np.ndarray:
    """Display values of one frame (1-based): uint8 (rows, cols) grey or (rows, cols, 3) RGB.

    ``window`` overrides the object's VOI (PS3.3 C.11.2); it is ignored for colour images.
    """
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)):
        raise RenderError("the frame number must be an integer")
    arr, g = _decode(ds, int(frame))
    if g.spp == 3:
        return _colour(arr, g)
    if g.photometric == "PALETTE COLOR":
        return _palette(ds, arr)
    return _grey(ds, arr, g, int(frame), window)


# --------------------------------------------------------------------------------------------
# Encoding


def encode(
    image: np.ndarray,
    fmt: str = "png",
    *,
    quality: int = 90,
    size: tuple[int, int] | None = None,
) -> bytes:
    """PNG, JPEG or WebP bytes of a rendered frame; ``size`` = (width, height) viewport.

    The image is fitted inside the viewport keeping its aspect ratio (Lanczos resampling) and is
    never enlarged: a viewport larger than the image leaves it at its own size.
    """
    from PIL import Image

    fmt = fmt.lower()
    if fmt == "jpg":
        fmt = "jpeg"
    if fmt not in MEDIA_TYPES:
        raise RenderError(f"format {fmt!r} is not supported (png, jpeg or webp)")
    if not 1 <= int(quality) <= 100:
        raise RenderError("quality must be between 1 and 100")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise RenderError("encode takes uint8 (rows, cols) or (rows, cols, 3) arrays")
    img = Image.fromarray(np.ascontiguousarray(image), "L" if image.ndim == 2 else "RGB")
    if size is not None:
        vw, vh = (int(v) for v in size)
        if vw < 1 or vh < 1:
            raise RenderError("the viewport must be at least 1 x 1")
        w, h = img.size
        scale = min(vw / w, vh / h, 1.0)
        if scale < 1.0:
            nw, nh = max(1, min(vw, round(w * scale))), max(1, min(vh, round(h * scale)))
            img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", compress_level=3)
    elif fmt == "jpeg":
        img.save(buf, "JPEG", quality=int(quality))
    else:
        img.save(buf, "WEBP", quality=int(quality), method=2)
    return buf.getvalue()


def render(
    ds: Dataset,
    frame: int = 1,
    *,
    window: Window | None = None,
    size: tuple[int, int] | None = None,
    fmt: str = "png",
    quality: int = 90,
) -> bytes:
    """Render one frame and encode it (PS3.18 rendered resources use the same pipeline)."""
    return encode(render_frame(ds, frame, window=window), fmt, quality=quality, size=size)
