"""Lossless pixels for the browser's own window/level, and the per-instance facts a viewer needs.

Packed frames: a greyscale frame's values are sent losslessly as an 8-bit greyscale PNG so that
the browser windows them locally with no round trip (PS3.3 C.11.2 VOI runs in the browser):

    v = value - offset      (offset: the frame's smallest value, so v >= 0)
    the PNG is ``planes`` images of Rows x Columns stacked top to bottom, the bytes of v from the
    most significant down: one plane while v < 256, two below 65536, three, or four.

Byte planes compress far better than the bytes of a pixel side by side (PNG filters work along
rows of like bytes): a noisy 512x512 CT frame is 213 kB in 14 ms (zlib level 6), against 278 kB in
114 ms as RGB with the high byte in G and the low byte in B.

``value`` is the stored value (PS3.3 C.7.6.3.1.4), decoded by the existing codecs
(``imaging/render.py``); the browser recovers the modality value (PS3.3 C.11.1) as
``value * slope + intercept``. A Modality LUT Sequence (C.11.1.1) is baked in: the values sent are
then the table's outputs and slope/intercept are 1/0. An object shown by default through its VOI
LUT Sequence (no window, C.11.2.1) also carries that table's grey level for every value from the
frame's lowest to its highest, in rows after the planes (``X-Imx-Voi``: how many), so the browser
shows what the server renders until its user picks a window. Colour (RGB, YBR converted, PALETTE
COLOR looked up) is sent as the lossless RGB PNG of what ``imaging.render.render_frame`` gives.

``viewer_metadata(ds)`` gives what the viewer needs per instance: windows, VOI LUT Function,
polarity (MONOCHROME1 / Presentation LUT Shape), pixel spacing and its source (Pixel Spacing,
PS3.3 C.7.6.2.1.1 / 10.7.1.3; Imager Pixel Spacing, C.8.11.4, which is at the detector and so not
calibrated for the patient), orientation labels from Image Orientation (Patient) (C.7.6.2.1.1,
letters of C.7.6.1.1.1) or Patient Orientation, and a position for sorting.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from imaging import render as _r
from imaging.render import RenderError

__all__ = [
    "Packed",
    "orientation_labels",
    "pack_frame",
    "unpack",
    "viewer_metadata",
    "voi_table",
]

# zlib level. On a noisy 512x512 CT frame as byte planes: level 1 gives 224 kB, level 6 213 kB,
# both in 10-25 ms; the lossless frames are for slow links, where every byte counts.
PNG_LEVEL = 6


@dataclass(frozen=True)
class Packed:
    """One frame ready for the browser: the PNG and how to read it back."""

    png: bytes
    color: bool
    offset: int = 0
    slope: float = 1.0
    intercept: float = 0.0
    planes: int = 1  # byte planes stacked in the PNG (1 to 4), most significant first
    low: int = 0  # smallest and largest value sent (before slope/intercept)
    high: int = 0
    voi: int = 0  # entries of the VOI LUT display table in the rows after the planes (0: none)

    def headers(self) -> dict[str, str]:
        """The HTTP headers that carry the parameters next to the PNG."""
        return {
            "X-Imx-Color": "1" if self.color else "0",
            "X-Imx-Offset": str(self.offset),
            "X-Imx-Slope": repr(float(self.slope)),
            "X-Imx-Intercept": repr(float(self.intercept)),
            "X-Imx-Planes": str(self.planes),
            "X-Imx-Range": f"{self.low},{self.high}",
            **({"X-Imx-Voi": str(self.voi)} if self.voi else {}),
        }


def _png(pixels: np.ndarray, level: int = PNG_LEVEL) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    mode = "RGB" if pixels.ndim == 3 else "L"
    Image.fromarray(np.ascontiguousarray(pixels), mode).save(buf, "PNG", compress_level=level)
    return buf.getvalue()


def pack_frame(ds: Dataset, frame: int = 1, *, level: int = PNG_LEVEL) -> Packed:
    """Frame ``frame`` (1-based) of ``ds`` as a packed lossless PNG (see the module docstring).
    Raises RenderError (plain words, no PHI) when the frame cannot be decoded."""
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)):
        raise RenderError("the frame number must be an integer")
    frame = int(frame)
    g = _r._geometry(ds)
    if g.spp == 3 or g.photometric == "PALETTE COLOR":
        rgb = _r.render_frame(ds, frame)
        return Packed(_png(rgb, level), True, low=0, high=255)
    arr, g = _r._decode(ds, frame)
    if arr.dtype.kind == "f":
        raise RenderError("float pixel data is not sent losslessly; use the rendered frame")
    modality = _r._Modality(ds, frame, g.signed)
    slope, intercept = modality.slope, modality.intercept
    if modality.table is not None:  # Modality LUT Sequence: send the table's outputs
        values = modality(arr).astype(np.int64)
        slope, intercept = 1.0, 0.0
    else:
        values = arr
    low, high = int(values.min()), int(values.max())
    rows, cols = values.shape
    span = high - low
    planes = 1 if span < 1 << 8 else 2 if span < 1 << 16 else 3 if span < 1 << 24 else 4
    # value - low as little-endian 32 bits; its bytes, most significant first, become the planes
    v = values.astype(np.int64) - low if values.dtype.itemsize >= 4 else values.astype(np.int32) - low
    cells = np.ascontiguousarray(v.astype("<u4", copy=False)).view(np.uint8).reshape(rows, cols, 4)
    table = _voi_table(ds, frame, g, low, high) if modality.table is None else None
    extra = _voi_rows(table.size if table is not None else 0, cols)
    stack = np.zeros((planes * rows + extra, cols), dtype=np.uint8)
    for n in range(planes):
        stack[n * rows : (n + 1) * rows] = cells[..., planes - 1 - n]
    if table is not None:
        stack[planes * rows :].reshape(-1)[: table.size] = table
    voi = table.size if table is not None else 0
    return Packed(_png(stack, level), False, low, slope, intercept, planes, low, high, voi)


def _voi_table(ds: Dataset, frame: int, g: Any, low: int, high: int) -> np.ndarray | None:
    """The grey level (0-255, before any inversion) of every stored value ``low..high`` under the
    object's VOI LUT Sequence, when that is how it is shown by default (no window in the object,
    PS3.3 C.11.2.1): what the server renders, so that the browser shows the same until its user
    picks a window. None for anything else."""
    if high - low >= 1 << 16:
        return None
    try:
        levels = _r._Levels.of(ds, frame, g, None)
    except RenderError:
        return None  # a broken VOI LUT: the browser's range window, as the renderer refuses it
    if levels.voi is None:
        return None
    domain = np.arange(low, high + 1, dtype=np.int64).reshape(1, -1)
    return dataclasses.replace(levels, inverted=False).grey(domain, None).ravel()


def _voi_rows(entries: int, cols: int) -> int:
    """Rows of the PNG after the planes that hold a VOI table of ``entries`` (0 when none)."""
    return -(-entries // cols)


def voi_table(packed: Packed) -> np.ndarray | None:
    """The VOI LUT display table a packed frame carries (``_voi_table``), as the browser reads it;
    None when it carries none. For tests and tools."""
    from PIL import Image

    if not packed.voi:
        return None
    stack = np.asarray(Image.open(io.BytesIO(packed.png)).convert("L"))
    extra = _voi_rows(packed.voi, stack.shape[1])
    return stack[stack.shape[0] - extra :].reshape(-1)[: packed.voi].copy()


def unpack(packed: Packed) -> np.ndarray:
    """The values a packed frame carries, as the browser reads them: modality values (float64)
    for greyscale, uint8 (rows, cols, 3) for colour. For tests and tools."""
    from PIL import Image

    img = Image.open(io.BytesIO(packed.png))
    if packed.color:
        return np.asarray(img.convert("RGB"))
    stack = np.asarray(img.convert("L")).astype(np.int64)
    extra = _voi_rows(packed.voi, stack.shape[1])
    rows = (stack.shape[0] - extra) // packed.planes
    v = np.zeros((rows, stack.shape[1]), dtype=np.int64)
    for n in range(packed.planes):
        v = (v << 8) | stack[n * rows : (n + 1) * rows]
    return (v + packed.offset).astype(np.float64) * packed.slope + packed.intercept


# --------------------------------------------------------------------------------------------
# Per-instance viewer metadata

_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, -x; +y, -y; +z, -z (PS3.3 C.7.6.1.1.1)
_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}
OBLIQUE = 0.25  # a direction component smaller than this is left out of a label


def _direction_label(vec: list[float]) -> str:
    """The letters of a patient-space direction, strongest component first (e.g. 'L', 'LP')."""
    parts = sorted(range(3), key=lambda i: -abs(vec[i]))
    out = ""
    for i in parts:
        if abs(vec[i]) >= OBLIQUE:
            out += _LETTERS[i][0] if vec[i] > 0 else _LETTERS[i][1]
    return out


def orientation_labels(ds: Dataset, frame: int = 1) -> dict[str, str] | None:
    """Labels of the four image edges from Image Orientation (Patient) (PS3.3 C.7.6.2.1.1: the
    row cosines point to increasing column, i.e. to the right edge) or, for projection images,
    from Patient Orientation (C.7.6.1.1.1: right edge, then bottom edge). None when unknown."""
    item = _r._frame_item(ds, frame, "PlaneOrientationSequence")
    iop = _r._floats((item or ds).get("ImageOrientationPatient")) or _r._floats(
        ds.get("ImageOrientationPatient")
    )
    if len(iop) == 6:
        row, col = iop[:3], iop[3:]
        right, bottom = _direction_label(row), _direction_label(col)
        left = _direction_label([-c for c in row])
        top = _direction_label([-c for c in col])
        if right and bottom:
            return {"top": top, "bottom": bottom, "left": left, "right": right}
        return None
    po = ds.get("PatientOrientation")
    if po is not None and not isinstance(po, str) and len(po) == 2:
        right, bottom = (str(v).strip().upper() for v in po)
        if right and bottom and set(right + bottom) <= set(_OPPOSITE):
            flip = lambda s: "".join(_OPPOSITE[c] for c in s)  # noqa: E731
            return {"top": flip(bottom), "bottom": bottom, "left": flip(right), "right": right}
    return None


def _spacing(ds: Dataset) -> tuple[list[float] | None, str | None]:
    item = _r._frame_item(ds, 1, "PixelMeasuresSequence")
    for src in (item, ds):
        if src is not None:
            ps = _r._floats(src.get("PixelSpacing"))
            if len(ps) == 2 and ps[0] > 0 and ps[1] > 0:
                return ps, "PixelSpacing"
    ips = _r._floats(ds.get("ImagerPixelSpacing"))
    if len(ips) == 2 and ips[0] > 0 and ips[1] > 0:
        return ips, "ImagerPixelSpacing"
    return None, None


def _windows(ds: Dataset) -> list[list[float]]:
    item = _r._frame_item(ds, 1, "FrameVOILUTSequence")
    for src in (item, ds):
        if src is None:
            continue
        centers, widths = _r._floats(src.get("WindowCenter")), _r._floats(src.get("WindowWidth"))
        pairs = [[c, w] for c, w in zip(centers, widths, strict=False) if w > 0]
        if pairs:
            return pairs
    return []


def _position(ds: Dataset) -> float | None:
    """Where the slice lies along its normal (IPP . (row x col)), for sorting a stack."""
    ipp = _r._floats(ds.get("ImagePositionPatient"))
    iop = _r._floats(ds.get("ImageOrientationPatient"))
    if len(ipp) != 3 or len(iop) != 6:
        item = _r._frame_item(ds, 1, "PlanePositionSequence")
        ipp = _r._floats(item.get("ImagePositionPatient")) if item is not None else ipp
        item = _r._frame_item(ds, 1, "PlaneOrientationSequence")
        iop = _r._floats(item.get("ImageOrientationPatient")) if item is not None else iop
    if len(ipp) != 3 or len(iop) != 6:
        return None
    r, c = iop[:3], iop[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    return round(sum(a * b for a, b in zip(ipp, n, strict=True)), 6)


def _number(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def viewer_metadata(ds: Dataset) -> dict[str, Any]:
    """The contract's per-instance viewer JSON for ``ds`` (read with or without pixel data)."""
    g = _r._geometry(ds)
    spacing, source = _spacing(ds)
    color = g.spp == 3 or g.photometric == "PALETTE COLOR"
    slope, intercept, lut = 1.0, 0.0, False
    if not color:
        try:
            m = _r._Modality(ds, 1, g.signed)
            slope, intercept, lut = m.slope, m.intercept, m.table is not None
        except RenderError:
            pass
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        slope, intercept = 1.0, 0.0
    return {
        "sop_uid": str(ds.get("SOPInstanceUID", "")),
        "number": _number(ds, "InstanceNumber"),
        "frames": g.frames,
        "rows": g.rows,
        "columns": g.cols,
        "photometric": g.photometric,
        "color": color,
        "pixel_spacing": spacing,
        "spacing_source": source,
        "calibrated": source == "PixelSpacing",
        "windows": [] if color else _windows(ds),
        "voi_function": _r._window_function(ds, 1),
        "slope": slope,
        "intercept": intercept,
        "modality_lut": lut,
        "offset": -(1 << (g.bits_stored - 1)) if g.signed else 0,
        "bits": g.bits_stored,
        "signed": g.signed,
        "invert": (not color) and _r._inverted(ds, g.photometric),
        "orientation": orientation_labels(ds),
        "position": _position(ds),
        "modality": str(ds.get("Modality", "") or ""),
        "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "series_number": _number(ds, "SeriesNumber"),
        "series_description": str(ds.get("SeriesDescription", "") or ""),
        "frame_time": _frame_time(ds),
    }


def _frame_time(ds: Dataset) -> float | None:
    """Milliseconds between frames for cine (PS3.3 C.7.6.5 Frame Time; Recommended Display
    Frame Rate / Cine Rate otherwise)."""
    ft = _r._floats(ds.get("FrameTime"))
    if ft and ft[0] > 0:
        return ft[0]
    for kw in ("RecommendedDisplayFrameRate", "CineRate"):
        rate = _r._floats(ds.get(kw))
        if rate and rate[0] > 0:
            return 1000.0 / rate[0]
    return None


def pack_job(source: bytes | str, frame: int, budget_bytes: int) -> Packed:
    """Parse one object (its bytes, or the path of its file) and pack ``frame``: the job a
    render worker runs (``imx.previews.RenderPool``). A frame whose declared size needs more
    than ``budget_bytes`` to decode is refused before anything is decoded."""
    from pydicom import config

    from imaging.dicomio import read_stored

    config.settings.reading_validation_mode = config.IGNORE
    try:
        ds = read_stored(source)
    except MemoryError:
        raise
    except Exception as e:
        raise RenderError(f"the object cannot be read ({type(e).__name__})") from None
    g = _r._geometry(ds)
    need = g.rows * g.cols * 32  # decoded, shifted and packed copies, and the PNG buffers
    if need > budget_bytes:
        raise RenderError(
            f"a frame of {g.rows} x {g.cols} pixels needs about {need >> 20} MiB to pack, more "
            f"than the {budget_bytes >> 20} MiB a render worker may use"
        )
    return pack_frame(ds, frame)


# the attributes viewer_metadata reads: a DICOM JSON object is cut down to these before it is
# made a dataset again (pydicom's from_json costs ~8 ms for a whole CT header, ~0.2 ms for these)
_VIEWER_KEYWORDS = (
    "SOPInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality",
    "InstanceNumber", "Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored",
    "HighBit", "PixelRepresentation", "PhotometricInterpretation", "NumberOfFrames",
    "PixelSpacing", "ImagerPixelSpacing", "WindowCenter", "WindowWidth", "VOILUTFunction",
    "RescaleSlope", "RescaleIntercept", "ModalityLUTSequence", "PresentationLUTShape",
    "ImageOrientationPatient", "ImagePositionPatient", "PatientOrientation", "FrameTime",
    "RecommendedDisplayFrameRate", "CineRate", "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
)


def _viewer_tags() -> frozenset[str]:
    from pydicom.datadict import tag_for_keyword

    return frozenset(f"{tag_for_keyword(k):08X}" for k in _VIEWER_KEYWORDS)


_TAGS = _viewer_tags()
_PER_FRAME = "52009230"


def viewer_metadata_from_json(dicom_json: dict[str, Any]) -> dict[str, Any]:
    """``viewer_metadata`` of an instance given as DICOM JSON (PS3.18 F.2), such as the metadata
    the index keeps; bulk data (a long Modality LUT) is not there, so such a table is reported by
    the packed frames instead."""
    small = {k: v for k, v in dicom_json.items() if k in _TAGS}
    per_frame = small.get(_PER_FRAME)
    if per_frame and per_frame.get("Value"):
        small[_PER_FRAME] = {**per_frame, "Value": per_frame["Value"][:1]}  # frame 1 is enough
    ds = Dataset.from_json(small, bulk_data_uri_handler=lambda *_: b"")
    return viewer_metadata(ds)
