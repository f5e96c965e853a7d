"""Burned-in annotation: decide whether an object may carry identifying text in its pixels, and
black out operator-configured regions of it without losing anything else.

Ultrasound frames, secondary captures, screenshots and scanned paper often have the patient's name
drawn into the pixels, where header de-identification (PS3.15 Annex E) cannot reach it. A
partner's policy (``imaging.policy.BurnedInAction``) decides what happens to such objects; this
module supplies the imaging part of the ``mask`` action:

- :func:`assess` says whether an object declares burned-in annotation, probably carries it, or not.
- :class:`RegionRules` are the regions to black out per device and frame size: a packaged data file
  (``imaging/data/burnin_regions.json``, generic starting points) plus an operator's file that is
  consulted first.
- :func:`mask` blacks those regions out on every frame and stores the pixels back losslessly.

Everything here is pure: datasets and arrays in, datasets out. Only :meth:`RegionRules.load`
reads files (the rule files).
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.pixels import apply_color_lut, get_decoder, get_encoder, pack_bits
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.valuerep import VR

__all__ = [
    "BurnInError",
    "BurnInRisk",
    "Region",
    "RegionRule",
    "RegionRules",
    "RegionRulesError",
    "assess",
    "mask",
]


class BurnInError(ValueError):
    """An object whose pixels cannot be masked. The message names only technical facts (transfer
    syntax, photometric interpretation, sizes), never values from the dataset that could be PHI."""


class RegionRulesError(ValueError):
    """A region rule file that cannot be used; the message names the file and the rule."""


# -- assess ---------------------------------------------------------------------------------------


class BurnInRisk(StrEnum):
    NONE = "none"  # declared free of burned-in annotation, or not a kind that usually carries it
    DECLARED = "declared"  # Burned In Annotation (0028,0301) is YES
    LIKELY = "likely"  # attribute absent on a kind of object that often carries burned-in text


# PS3.3 C.7.3.1.1.1 (Modality defined terms): kinds whose pixels are pictures of a screen, a camera
# view or paper, where devices and capture software commonly draw the patient's name and ids.
#   US Ultrasound, IVUS Intravascular Ultrasound: the scanner's display, header band included.
#   XC External-camera Photography, ES Endoscopy: video/photo systems overlay patient data.
#   OT Other, DOC Document: what capture software and document scanners write.
#   SC: not a PS3.3 defined term, but written by secondary-capture software in the wild.
LIKELY_MODALITIES = frozenset({"US", "IVUS", "XC", "ES", "OT", "DOC", "SC"})

# PS3.4 Annex B.5 (Table B.5-1, Standard SOP Classes): Ultrasound Image Storage, Enhanced US Volume
# Storage, Ultrasound Multi-frame Image Storage, and the retired ultrasound classes that older
# scanners still send.
LIKELY_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
        "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume Storage
        "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
        "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage (Retired)
        "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (Retired)
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    }
)
# ... and the Multi-frame Secondary Capture classes 1.2.840.10008.5.1.4.1.1.7.1 to .7.4.
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7."

# PS3.3 C.8.6.1 (SC Equipment Module), Conversion Type (0008,0064) defined terms that capture a
# picture made for people to read: DV Digitized Video, DI Digital Interface, DF Digitized Film
# (printed films carry a demographic header), WSD Workstation (screenshots), SD Scanned Document,
# SI Scanned Image. DRW (Drawing) and SYN (Synthetic Image) are made by software from data, not
# captured from a display or paper, and are left out.
LIKELY_CONVERSION_TYPES = frozenset({"DV", "DI", "DF", "WSD", "SD", "SI"})

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _code(ds: Dataset, keyword: str) -> str:
    """A single-valued code string attribute, stripped and upper-cased; '' when absent, empty or
    multi-valued (a malformed value counts as absent)."""
    value = ds.get(keyword)
    if value is None or not isinstance(value, str | bytes):
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return value.strip().upper()


def _has_pixels(ds: Dataset) -> bool:
    """Whether ``ds`` is an image: it holds pixel data, or it has the Image Pixel Module's Rows and
    Columns (a header read with ``stop_before_pixels`` must not pass as pixel-free)."""
    if any(k in ds for k in _PIXEL_KEYWORDS):
        return True
    return ds.get("Rows") is not None and ds.get("Columns") is not None


def _sop_class(ds: Dataset) -> str:
    """SOP Class UID (0008,0016), else the file meta's Media Storage SOP Class UID."""
    uid = ds.get("SOPClassUID")
    if not uid:
        file_meta = getattr(ds, "file_meta", None)
        uid = file_meta.get("MediaStorageSOPClassUID") if file_meta is not None else None
    return str(uid or "").strip()


def assess(ds: Dataset) -> BurnInRisk:
    """Whether ``ds`` may carry burned-in identifying annotation in its pixels.

    Burned In Annotation (0028,0301) tells whether the image holds enough burned-in annotation to
    identify the patient and the date it was acquired (PS3.3 C.7.6.1, General Image Module;
    enumerated values YES and NO). It is Type 3 there, so most objects omit it, and an absent
    attribute means the image may or may not carry such text. The decision:

    1. No pixels (neither Pixel Data, Float/Double Float Pixel Data, nor Rows and Columns): NONE.
       Rows and Columns count so that a header read without its Pixel Data is judged as an image.
    2. (0028,0301) YES: DECLARED; NO: NONE (trailing spaces and case are ignored). Any other value
       (empty, multi-valued, garbage) is treated as absent.
    3. Absent: LIKELY when any of these holds, else NONE (CT, MR, CR, NM... without the attribute):

       - Modality (0008,0060) is one of :data:`LIKELY_MODALITIES` (PS3.3 C.7.3.1.1.1);
       - the SOP Class is an ultrasound or secondary capture storage class (PS3.4 Table B.5-1):
         :data:`LIKELY_SOP_CLASSES`, or 1.2.840.10008.5.1.4.1.1.7.x (multi-frame SC);
       - Conversion Type (0008,0064) is one of :data:`LIKELY_CONVERSION_TYPES` (PS3.3 C.8.6.1):
         captured video, film, screens and paper, whatever SOP class the sender chose.
    """
    if not _has_pixels(ds):
        return BurnInRisk.NONE
    declared = _code(ds, "BurnedInAnnotation")
    if declared == "YES":
        return BurnInRisk.DECLARED
    if declared == "NO":
        return BurnInRisk.NONE
    if _code(ds, "Modality") in LIKELY_MODALITIES:
        return BurnInRisk.LIKELY
    sop_class = _sop_class(ds)
    if sop_class in LIKELY_SOP_CLASSES or sop_class.startswith(SECONDARY_CAPTURE_PREFIX):
        return BurnInRisk.LIKELY
    if _code(ds, "ConversionType") in LIKELY_CONVERSION_TYPES:
        return BurnInRisk.LIKELY
    return BurnInRisk.NONE


# -- regions and rules ----------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    """An integer (NumPy's included), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


@dataclass(frozen=True)
class Region:
    """A rectangle in pixel coordinates from the top-left corner of the frame. When masking it is
    clipped to the image; one lying wholly outside the image is an error (see :func:`mask`)."""

    x: int
    y: int
    width: int
    height: int

    def __post_init__(self) -> None:
        for name in ("x", "y", "width", "height"):
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(f"region {name} must be an integer, not {value!r}")
            object.__setattr__(self, name, int(value))  # plain ints, whatever came in
        if self.x < 0 or self.y < 0:
            raise ValueError(f"region x and y must be 0 or more, not ({self.x}, {self.y})")
        if self.width < 1 or self.height < 1:
            raise ValueError(
                f"region width and height must be 1 or more, not {self.width}x{self.height}"
            )


@dataclass(frozen=True)
class RegionRule:
    """Which regions to mask on the images of some devices at some frame size.

    ``manufacturer`` and ``model`` are case-insensitive regular expressions that must match the
    *whole* value (``re.fullmatch``) of Manufacturer (0008,0070) and Manufacturer's Model Name
    (0008,1090), leading and trailing spaces removed. Whole-value matching is the conservative
    choice: "GE" does not silently match "GENERIC IMAGING"; write "GE.*" or ".*Philips.*" to match
    more. ``None`` matches any value, including an absent attribute; a pattern never matches an
    absent attribute. ``rows`` and ``columns`` must equal (0028,0010) and (0028,0011); ``None``
    matches any size.
    """

    name: str
    manufacturer: str | None
    model: str | None
    rows: int | None
    columns: int | None
    regions: tuple[Region, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("a rule needs a non-empty name")
        for field_name in ("manufacturer", "model"):
            pattern = getattr(self, field_name)
            if pattern is None:
                continue
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(
                    f"{field_name} must be a non-empty regular expression or null (any)"
                )
            try:
                re.compile(pattern, re.IGNORECASE)
            except re.error as e:
                raise ValueError(
                    f"{field_name} {pattern!r} is not a valid regular expression: {e}"
                ) from None
        for field_name in ("rows", "columns"):
            value = getattr(self, field_name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(
                    f"{field_name} must be a positive integer or null (any), not {value!r}"
                )
        if isinstance(self.regions, Region) or not isinstance(self.regions, Iterable):
            raise ValueError("regions must be a sequence of Region values")
        object.__setattr__(self, "regions", tuple(self.regions))
        if not self.regions:
            raise ValueError("a rule needs at least one region")
        if not all(isinstance(r, Region) for r in self.regions):
            raise ValueError("regions must be Region values")

    def matches(self, ds: Dataset) -> bool:
        if self.rows is not None and ds.get("Rows") != self.rows:
            return False
        if self.columns is not None and ds.get("Columns") != self.columns:
            return False
        for pattern, keyword in (
            (self.manufacturer, "Manufacturer"),
            (self.model, "ManufacturerModelName"),
        ):
            if pattern is None:
                continue
            value = ds.get(keyword)
            if (
                not isinstance(value, str)
                or re.fullmatch(pattern, value.strip(), re.IGNORECASE) is None
            ):
                return False
        return True


_RULE_KEYS = {"name", "manufacturer", "model", "rows", "columns", "regions"}
_FILE_KEYS = {"source", "notes", "rules"}
PACKAGED_RULES = "data/burnin_regions.json"


def _region_from_json(value: Any) -> Region:
    if not isinstance(value, list) or len(value) != 4 or not all(_is_int(v) for v in value):
        raise ValueError(
            f"each region must be a list of four integers [x, y, width, height], not {value!r}"
        )
    return Region(*value)


def _rule_from_json(item: Any, index: int, source: str) -> RegionRule:
    label = f"{source}: rule {index}"
    if not isinstance(item, dict):
        raise RegionRulesError(f"{label}: a rule must be an object with a name and regions")
    name = item.get("name")
    if isinstance(name, str) and name.strip():
        label = f"{label} ({name!r})"
    unknown = set(item) - _RULE_KEYS
    if unknown:
        raise RegionRulesError(
            f"{label}: unknown keys {', '.join(sorted(unknown))}; a rule has {', '.join(sorted(_RULE_KEYS))}"
        )
    raw_regions = item.get("regions")
    if not isinstance(raw_regions, list) or not raw_regions:
        raise RegionRulesError(
            f"{label}: 'regions' must be a non-empty list of [x, y, width, height]"
        )
    try:
        regions = tuple(_region_from_json(r) for r in raw_regions)
        return RegionRule(
            name=name,  # type: ignore[arg-type]  # validated by RegionRule
            manufacturer=item.get("manufacturer"),
            model=item.get("model"),
            rows=item.get("rows"),
            columns=item.get("columns"),
            regions=regions,
        )
    except ValueError as e:
        raise RegionRulesError(f"{label}: {e}") from None


class RegionRules:
    """An ordered list of region rules; the first that matches an object wins."""

    def __init__(self, rules: Iterable[RegionRule] = ()) -> None:
        self._rules = tuple(rules)

    @property
    def rules(self) -> tuple[RegionRule, ...]:
        return self._rules

    def __len__(self) -> int:
        return len(self._rules)

    def __iter__(self) -> Iterator[RegionRule]:
        return iter(self._rules)

    @classmethod
    def from_json_data(cls, data: Any, source: str) -> RegionRules:
        """Rules from parsed JSON of the rule-file format; ``source`` names the file in errors."""
        if not isinstance(data, dict):
            raise RegionRulesError(
                f"{source}: the file must hold a JSON object with a 'rules' list"
            )
        unknown = set(data) - _FILE_KEYS
        if unknown:
            raise RegionRulesError(
                f"{source}: unknown keys {', '.join(sorted(unknown))}; the file has {', '.join(sorted(_FILE_KEYS))}"
            )
        rules = data.get("rules")
        if not isinstance(rules, list):
            raise RegionRulesError(f"{source}: 'rules' must be a list of rules")
        notes = data.get("notes", [])
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise RegionRulesError(f"{source}: 'notes' must be a list of strings")
        parsed = [_rule_from_json(item, i, source) for i, item in enumerate(rules)]
        seen: set[str] = set()
        for i, rule in enumerate(parsed):
            if rule.name in seen:
                raise RegionRulesError(
                    f"{source}: rule {i} ({rule.name!r}): another rule in this file has that name"
                )
            seen.add(rule.name)
        return cls(parsed)

    @classmethod
    def from_file(cls, path: Path) -> RegionRules:
        try:
            text = Path(path).read_text("utf-8")
        except OSError as e:
            raise RegionRulesError(
                f"cannot read the region rule file {path}: {e.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise RegionRulesError(f"{path}: not UTF-8 text") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RegionRulesError(
                f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
            ) from None
        return cls.from_json_data(data, str(path))

    @classmethod
    def packaged(cls) -> RegionRules:
        """The rules shipped in ``imaging/data/burnin_regions.json``."""
        return _packaged_rules()

    @classmethod
    def load(cls, extra: Path | None = None) -> RegionRules:
        """The packaged rules, preceded by those of the operator's file ``extra`` (same format) so
        that an operator's rule wins over a packaged one that matches the same object."""
        packaged = _packaged_rules()
        if extra is None:
            return packaged
        return cls((*cls.from_file(extra).rules, *packaged.rules))

    def match(self, ds: Dataset) -> RegionRule | None:
        """The first rule that matches ``ds``, or None."""
        for rule in self._rules:
            if rule.matches(ds):
                return rule
        return None


@cache
def _packaged_rules() -> RegionRules:
    source = f"imaging/{PACKAGED_RULES}"
    text = resources.files("imaging").joinpath(PACKAGED_RULES).read_text("utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RegionRulesError(f"{source}: not valid JSON: {e.msg} at line {e.lineno}") from None
    return RegionRules.from_json_data(data, source)


# -- mask -----------------------------------------------------------------------------------------

# Transfer syntaxes whose compression is always lossy, and those that may be (the dataset's Lossy
# Image Compression (0028,2110) says which; absent, we assume lossy). Values: the Lossy Image
# Compression Method (0028,2114) defined term for it (PS3.3 C.7.6.1.1.5.1).
_ALWAYS_LOSSY = {JPEGBaseline8Bit: "ISO_10918_1", JPEGExtended12Bit: "ISO_10918_1"}
_MAYBE_LOSSY = {
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
    JPEG2000MC: "ISO_15444_1",
    HTJ2K: "ISO_15444_15",
}


def _was_lossy(ds: Dataset, ts: UID) -> bool:
    flag = str(ds.get("LossyImageCompression", "") or "").strip()
    if flag == "01":
        return True
    if ts in _ALWAYS_LOSSY:
        return True
    return ts in _MAYBE_LOSSY and flag != "00"


def _black(
    pi: str, bits_stored: int, signed: bool, ds: Dataset, dtype: np.dtype
) -> tuple[int, ...]:
    """The stored value(s) that display as black, one per sample."""
    if signed:
        lowest, highest = -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    else:
        lowest, highest = 0, 2**bits_stored - 1
    if pi == "MONOCHROME2":
        return (lowest,)  # 0 for unsigned data; the most negative value for signed
    if pi == "MONOCHROME1":
        return (highest,)  # MONOCHROME1 shows the highest value as black
    if pi == "RGB":
        return (0, 0, 0)
    if pi == "YBR_FULL":
        mid = 2 ** (bits_stored - 1)
        return (0, mid, mid)  # Y = 0 with neutral chroma is RGB (0, 0, 0)
    if pi == "PALETTE COLOR":
        return (_darkest_palette_index(ds, lowest, highest, dtype),)
    raise BurnInError(f"cannot mask pixel data with photometric interpretation {pi}")


def _darkest_palette_index(ds: Dataset, lowest: int, highest: int, dtype: np.dtype) -> int:
    """The stored value whose palette colour is darkest (Rec. 601 luma): index 0 is often black but
    nothing in PS3.3 C.7.6.3.1.5 requires it."""
    desc = ds.get("RedPaletteColorLookupTableDescriptor")
    if not desc or len(desc) != 3:
        raise BurnInError("PALETTE COLOR pixel data without a usable palette descriptor")
    entries = int(desc[0]) or 65536  # PS3.3 C.7.6.3.1.5: 0 means 2^16 entries
    first = int(desc[1])
    start, stop = max(first, lowest), min(first + entries - 1, highest)
    if start > stop:
        raise BurnInError("PALETTE COLOR palette does not cover the stored pixel values")
    candidates = np.arange(start, stop + 1).astype(dtype)
    try:
        rgb = apply_color_lut(candidates, ds).astype(np.float64)
    except Exception as e:  # a malformed palette; pydicom's message names only LUT facts
        raise BurnInError(
            f"cannot read the PALETTE COLOR lookup tables ({type(e).__name__})"
        ) from e
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    return int(candidates[int(np.argmin(luma))])


def _raw_bytes(
    frames: np.ndarray, bits_allocated: int, signed: bool, little: bool, planar: int
) -> bytes:
    """Native (uncompressed) Pixel Data for frames shaped (frames, rows, columns, samples)."""
    if bits_allocated == 1:
        data = pack_bits(frames.reshape(-1).astype(np.uint8), pad=False)
    elif bits_allocated in (8, 16, 32, 64):
        order = "<" if little else ">"
        dtype = np.dtype(f"{order}{'i' if signed else 'u'}{bits_allocated // 8}")
        layout = frames.transpose(0, 3, 1, 2) if planar == 1 and frames.shape[3] > 1 else frames
        data = np.ascontiguousarray(layout).astype(dtype, copy=False).tobytes()
    else:
        raise BurnInError(f"cannot write native pixel data with Bits Allocated {bits_allocated}")
    return data + b"\x00" if len(data) % 2 else data  # PS3.5 7.1.1: values have even length


def _clip(regions: Sequence[Region], rows: int, columns: int) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) per region, clipped to the image; BurnInError for one wholly outside it
    (a rule written for another geometry: masking nothing would wrongly claim the text gone)."""
    boxes = []
    for i, r in enumerate(regions):
        if not isinstance(r, Region):
            raise BurnInError(f"region {i} is not a Region")
        x0, y0 = r.x, r.y
        x1, y1 = min(r.x + r.width, columns), min(r.y + r.height, rows)
        if x0 >= x1 or y0 >= y1:
            raise BurnInError(
                f"region {i} ({r.x}, {r.y}, {r.width}x{r.height}) lies outside the {columns}x{rows} image"
            )
        boxes.append((y0, y1, x0, x1))
    return boxes


def mask(ds: Dataset, regions: Sequence[Region]) -> None:
    """Black out ``regions`` on every frame of ``ds`` and store its pixels back losslessly.

    ``ds`` must hold its Pixel Data (read whole, not with ``stop_before_pixels``). The dataset is
    changed in place, and only once everything has succeeded: on BurnInError it is untouched.

    Decoding and the value written:

    - Uncompressed (native) sources are decoded without colour conversion, so the stored values
      are kept exactly. MONOCHROME2 regions get the lowest stored value (0 when unsigned),
      MONOCHROME1 the highest (2^BitsStored - 1 when unsigned), RGB (0, 0, 0), YBR_FULL (0, half,
      half) which is RGB black, PALETTE COLOR the index of the darkest palette entry.
    - Compressed sources are decoded as pydicom does by default (``ds.pixel_array``): YBR_FULL,
      YBR_FULL_422, YBR_RCT and YBR_ICT come out as RGB, so the output becomes RGB.

    Storing back:

    - Native source: the same transfer syntax, byte order, Bits Allocated and Planar
      Configuration. YBR_FULL_422 cannot be written back subsampled without loss, so it becomes
      YBR_FULL (Pixel Data one third longer). Unused high bits (Bits Stored < Bits Allocated) come
      back cleared (or sign-extended), as pydicom decodes them.
    - Compressed source: re-encoded RLE Lossless (pydicom's encoder, with pylibjpeg-rle when
      installed); where RLE cannot hold the data (32-bit, 1-bit, YBR with 16 bits) uncompressed
      Explicit VR Little Endian. Planar Configuration becomes 0.

    Bookkeeping: Photometric Interpretation, Planar Configuration, Bits Allocated/Stored and Pixel
    Representation follow the stored pixels; Lossy Image Compression (0028,2110) is set to 01 when
    the source was lossy (and its Method added when absent) and is never reset (PS3.3
    C.7.6.1.1.5); Burned In Annotation (0028,0301) becomes NO; the Icon Image Sequence (0088,0200),
    a thumbnail that would still show the text, is removed. SOP Instance UID is left alone: the
    de-identification step that follows replaces it.
    """
    if not regions:
        raise BurnInError("no regions to mask: nothing would be removed")
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise BurnInError("float pixel data cannot be masked (it is never a captured picture)")
        raise BurnInError(
            "the dataset holds no Pixel Data (read it whole, not with stop_before_pixels)"
        )
    file_meta = getattr(ds, "file_meta", None)
    ts_value = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not ts_value:
        raise BurnInError("the dataset has no Transfer Syntax UID in its file meta information")
    ts = UID(str(ts_value))
    native = not ts.is_encapsulated
    if not _is_int(ds.get("Rows")) or not _is_int(ds.get("Columns")):
        raise BurnInError("the dataset has no usable Rows and Columns")
    boxes = _clip(regions, int(ds.Rows), int(ds.Columns))  # before the costly decode

    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise BurnInError(f"no pixel data decoder for {ts.name}") from None
    try:
        # raw: native data keeps its colour space; compressed data is decoded as pixel_array does
        arr, props = decoder.as_array(ds, raw=native)
    except Exception as e:  # decoders raise many types; the cause is chained, not echoed
        raise BurnInError(f"cannot decode the Pixel Data ({ts.name}): {type(e).__name__}") from e

    pi = str(props["photometric_interpretation"])
    rows, columns = int(props["rows"]), int(props["columns"])
    samples, n_frames = int(props["samples_per_pixel"]), int(props["number_of_frames"])
    bits_allocated, bits_stored = int(props["bits_allocated"]), int(props["bits_stored"])
    signed = int(props["pixel_representation"]) == 1
    shape = arr.shape
    frames = arr.reshape(n_frames, rows, columns, samples)  # all later writes read ``frames``

    black = np.array(_black(pi, bits_stored, signed, ds, arr.dtype), dtype=arr.dtype)
    for y0, y1, x0, x1 in boxes:
        frames[:, y0:y1, x0:x1, :] = black

    extended: tuple[bytes, bytes] | None = None
    if native:
        planar = int(ds.get("PlanarConfiguration", 0) or 0) if samples > 1 else 0
        out_ts = ts
        data = _raw_bytes(frames, bits_allocated, signed, ts.is_little_endian, planar)
    else:
        planar = 0
        out_ts = RLELossless
        try:
            encoded = list(
                get_encoder(RLELossless).iter_encode(
                    frames.reshape(shape),
                    # never GDCM: it aborts the process on some inputs (imaging/codecs.py)
                    encoding_plugin="pylibjpeg" if "pylibjpeg" in get_encoder(RLELossless).available_plugins else "pydicom",
                    rows=rows,
                    columns=columns,
                    samples_per_pixel=samples,
                    number_of_frames=n_frames,
                    bits_allocated=bits_allocated,
                    bits_stored=bits_stored,
                    pixel_representation=int(signed),
                    photometric_interpretation=pi,
                    planar_configuration=0,
                )
            )
        except (ValueError, RuntimeError):  # outside RLE's profile (PS3.5 Table 8.2.2-1)
            out_ts = ExplicitVRLittleEndian
            data = _raw_bytes(frames, bits_allocated, signed, True, 0)
        else:
            total = sum(len(f) for f in encoded) + 8 * len(encoded)
            if total > 2**32 - 1:  # too long for a Basic Offset Table (PS3.5 A.4)
                data, eot, eot_lengths = encapsulate_extended(encoded)
                extended = (eot, eot_lengths)
            else:
                data = encapsulate(encoded)

    lossy = _was_lossy(ds, ts)

    # -- everything computed: change the dataset --------------------------------------------------
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            del ds[keyword]
    ds.PixelData = data
    elem = ds["PixelData"]
    if out_ts.is_encapsulated:
        elem.VR = VR.OB
        elem.is_undefined_length = True
        if extended is not None:
            ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = extended
    else:
        elem.is_undefined_length = False
        if out_ts != ts or elem.VR not in (VR.OB, VR.OW):
            elem.VR = VR.OW if bits_allocated > 8 else VR.OB
    file_meta.TransferSyntaxUID = out_ts
    ds.PhotometricInterpretation = pi
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if samples > 1:
        ds.PlanarConfiguration = planar
    if lossy:
        ds.LossyImageCompression = "01"
        method = _ALWAYS_LOSSY.get(ts) or _MAYBE_LOSSY.get(ts)
        if method and not ds.get("LossyImageCompressionMethod"):
            ds.LossyImageCompressionMethod = method
    ds.BurnedInAnnotation = "NO"
    if "IconImageSequence" in ds:
        del ds.IconImageSequence
    # pydicom caches the decoded array; drop it so nobody sees the unmasked pixels in-process
    ds._pixel_array = None
    ds._pixel_id = {}
