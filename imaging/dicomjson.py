"""A stored instance's metadata as DICOM JSON (PS3.18 F.2), with bulk data by URI (F.2.6).

Pure functions over a pydicom dataset, shared by the two places that build it: the render
workers after the ack (``imx/previews.py``, which keep it in the index) and WADO-RS metadata
on demand (``viewer/dicomweb.py``) for an instance whose kept copy is missing. Both must give the
same bytes, so both go through ``encode_metadata``.

The encoded form names each BulkDataURI as ``BULK_PLACEHOLDER/<tag>``; the HTTP layer replaces the
placeholder with the instance's own URL (``with_bulk_base``), so what is kept does not depend on
the host name a client used.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID

BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
BULK_THRESHOLD = 1024  # binary values above this many bytes become BulkDataURIs
PIXEL_DATA = 0x7FE00010
# pydicom's stop_before_pixels stops at the first of Float Pixel Data, Double Float Pixel Data and
# Pixel Data (7FE0,0008/0009/0010): nothing from there on is part of the metadata
FIRST_PIXEL_TAG = 0x7FE00008
BULK_PLACEHOLDER = "@@imx-bulkdata@@"


def metadata_json(ds: Dataset, bulk_base: str) -> dict[str, Any]:
    """``ds`` (read with or without its pixel data) as DICOM JSON, tags sorted. Binary values
    above BULK_THRESHOLD bytes and the pixel data become BulkDataURIs ``{bulk_base}/{tag}``.
    Elements from Float Pixel Data (7FE0,0008) on are left out, as a read that stops before the
    pixels leaves them out."""
    bulk: dict[int, str] = {}
    rest = Dataset()
    for elem in ds:
        if elem.tag >= FIRST_PIXEL_TAG:
            break
        raw_len = len(elem.value) if isinstance(elem.value, bytes | bytearray) else 0
        if elem.VR in BINARY_VRS and raw_len > BULK_THRESHOLD:
            bulk[elem.tag] = elem.VR
        else:
            rest.add(elem)
    if "Rows" in ds and "Columns" in ds:  # an image: its pixel data by URI (PS3.18 F.2.6)
        ts = UID(ds.file_meta.TransferSyntaxUID)
        bulk[PIXEL_DATA] = (
            "OB" if ts.is_compressed or int(ds.get("BitsAllocated", 8) or 8) <= 8 else "OW"
        )
    out = rest.to_json_dict(bulk_data_threshold=1 << 62, suppress_invalid_tags=True)
    for tag, vr in bulk.items():
        out[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": f"{bulk_base}/{tag:08X}"}
    return dict(sorted(out.items()))


def encode_metadata(ds: Dataset) -> bytes:
    """The compact JSON of ``metadata_json(ds, BULK_PLACEHOLDER)`` (UTF-8)."""
    return json.dumps(metadata_json(ds, BULK_PLACEHOLDER), separators=(",", ":")).encode()


def with_bulk_base(encoded: bytes, bulk_base: str) -> bytes:
    """``encode_metadata``'s bytes with the placeholder replaced by ``bulk_base``."""
    return encoded.replace(BULK_PLACEHOLDER.encode(), bulk_base.encode())


def pack(encoded: bytes) -> bytes:
    """The form kept in the index: zlib (DICOM JSON repeats itself; about a fifth of the size)."""
    return zlib.compress(encoded, 6)


def unpack(packed: bytes) -> bytes:
    """``encode_metadata``'s bytes back from ``pack``."""
    return zlib.decompress(packed)
