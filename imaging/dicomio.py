"""Reading a received instance and writing its de-identified copy without decoding pixels.

The header (everything before Pixel Data) is parsed with pydicom; Pixel Data itself is located by
offset and copied byte for byte, in its own transfer syntax, so nothing lossy ever happens and a
1 GB multi-frame object never has to sit in memory. A deflated dataset, whose offsets refer to a
compressed stream, is read and written whole.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import dcmwrite, write_dataset, write_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

PIXEL_DATA = 0x7FE00010
ITEM = 0xFFFEE000
SEQ_DELIM = 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
DEFER_BYTES = 256 * 1024
MAPPED_BYTES = 16 * 1024  # read_stored: values above this size are not copied into the dataset
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float, Double Float, Pixel Data
COPY_CHUNK = 1024 * 1024

IMPLEMENTATION_CLASS_UID = UID("1.2.826.0.1.3680043.10.1453.1")  # no organisational meaning; ours
IMPLEMENTATION_VERSION = "IMX_0_1"


class MalformedInstance(ValueError):
    """The bytes are not a DICOM dataset we can process; the message says why, without PHI."""


@dataclass
class ReceivedInstance:
    """A parsed instance: its header dataset (no Pixel Data) and where its Pixel Data lies."""

    ds: Dataset
    transfer_syntax: UID
    source: Path
    pixel_span: tuple[int, int] | None  # [start, end) of the whole Pixel Data element in source
    inline: bool  # True when the dataset was read whole (deflated): Pixel Data is in ds

    @property
    def little_endian(self) -> bool:
        return self.transfer_syntax.is_little_endian

    @property
    def implicit_vr(self) -> bool:
        return self.transfer_syntax.is_implicit_VR


class _WholeReads(io.BufferedReader):
    """A file whose reads come back short only exactly at its end. pydicom stops quietly where a
    file ends inside an element (or past it, after skipping a deferred value), which would pass a
    truncated header off as a complete dataset. A read of a regular file returns fewer bytes than
    asked only when the end falls inside it; a seek past the end means a skipped value is cut."""

    def __init__(self, path: Path) -> None:
        super().__init__(io.FileIO(os.fspath(path)))
        self._size = os.fstat(self.fileno()).st_size

    def seek(self, offset: int, whence: int = 0, /) -> int:
        pos = super().seek(offset, whence)
        if pos > self._size:  # pydicom skipped a deferred value that the file does not hold
            raise MalformedInstance("the dataset is truncated")
        return pos

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        if data and size is not None and 0 <= size and len(data) < size:
            raise MalformedInstance("the dataset is truncated")
        return data


def _pixel_span(f: BinaryIO, start: int, size: int, little: bool, implicit: bool) -> tuple[int, int]:
    """Bounds of the Pixel Data element starting at ``start``; raises MalformedInstance if it is
    truncated or its encapsulation is broken."""
    en = "<" if little else ">"
    f.seek(start)
    head = f.read(12)
    if len(head) < 8:
        raise MalformedInstance("the dataset ends inside the Pixel Data element header")
    group, elem = struct.unpack(en + "HH", head[:4])
    if (group << 16 | elem) != PIXEL_DATA:
        raise MalformedInstance("Pixel Data element not where the header ends")
    if implicit:
        (length,) = struct.unpack(en + "I", head[4:8])
        value_start = start + 8
    else:
        if len(head) < 12:
            raise MalformedInstance("the dataset ends inside the Pixel Data element header")
        (length,) = struct.unpack(en + "I", head[8:12])
        value_start = start + 12
    if length != 0xFFFFFFFF:
        end = value_start + length
        if end > size:
            raise MalformedInstance(f"Pixel Data is truncated: {size - value_start} of {length} bytes present")
        return start, end
    # Encapsulated (PS3.5 A.4): items of known length, then a sequence delimiter.
    pos = value_start
    for _ in range(10_000_000):
        f.seek(pos)
        item = f.read(8)
        if len(item) < 8:
            raise MalformedInstance("encapsulated Pixel Data is truncated (no sequence delimiter)")
        group, elem, ilen = struct.unpack(en + "HHI", item)
        tag = group << 16 | elem
        if tag == SEQ_DELIM:
            return start, pos + 8
        if tag != ITEM or ilen == 0xFFFFFFFF:
            raise MalformedInstance("encapsulated Pixel Data has a malformed item")
        pos += 8 + ilen
        if pos > size:
            raise MalformedInstance("encapsulated Pixel Data is truncated")
    raise MalformedInstance("encapsulated Pixel Data has too many fragments")


def read_received(path: Path) -> ReceivedInstance:
    """Parse a received instance (DICOM file format: preamble, file meta, dataset)."""
    size = path.stat().st_size
    try:
        with _WholeReads(path) as header:
            ds = dcmread(header, defer_size=DEFER_BYTES, stop_before_pixels=True)
            pixel_start = header.tell()
        with open(path, "rb") as f:
            ts = UID(ds.file_meta.get("TransferSyntaxUID", ""))
            if not ts or not ts.is_transfer_syntax:
                raise MalformedInstance("the transfer syntax is missing or unknown")
            if ts == DeflatedExplicitVRLittleEndian or ts.is_deflated:
                f.seek(0)
                full = dcmread(f)  # offsets refer to the inflated stream: read it all
                full.PixelData if "PixelData" in full else None  # noqa: B018 - force parse now
                return ReceivedInstance(full, ts, path, None, True)
            span = None
            if pixel_start < size:
                f.seek(pixel_start)
                peek = f.read(4)
                if len(peek) == 4:
                    en = "<" if ts.is_little_endian else ">"
                    g, e = struct.unpack(en + "HH", peek)
                    if (g << 16 | e) == PIXEL_DATA:
                        span = _pixel_span(f, pixel_start, size, ts.is_little_endian, ts.is_implicit_VR)
                    else:  # Float/Double Float Pixel Data (7FE0,0008/0009): rare, read it whole
                        with _WholeReads(path) as whole:
                            return ReceivedInstance(dcmread(whole), ts, path, None, True)
    except MalformedInstance:
        raise
    except InvalidDicomError as e:
        raise MalformedInstance("not a DICOM dataset") from e
    except (EOFError, struct.error) as e:
        raise MalformedInstance("the dataset is truncated") from e
    except Exception as e:  # pydicom raises many types on garbage; never echo its message (PHI)
        raise MalformedInstance(f"the dataset cannot be parsed ({type(e).__name__})") from e
    return ReceivedInstance(ds, ts, path, span, False)


def build_file_meta(ds: Dataset, transfer_syntax: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    return meta


def write_instance(inst: ReceivedInstance, out: BinaryIO) -> None:
    """Write ``inst.ds`` (already de-identified) in the DICOM file format, in the transfer syntax
    it came in, followed by the original Pixel Data bytes. Elements after Pixel Data (trailing
    padding, digital signatures, which modification invalidates anyway) are not carried over."""
    meta = build_file_meta(inst.ds, inst.transfer_syntax)
    if inst.inline:
        inst.ds.file_meta = meta
        dcmwrite(out, inst.ds, enforce_file_format=True)
        return
    for tag in [t for t in inst.ds.keys() if t >= PIXEL_DATA]:
        del inst.ds[tag]
    fp = DicomFileLike(out)
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    fp.is_little_endian = inst.little_endian
    fp.is_implicit_VR = inst.implicit_vr
    write_dataset(fp, inst.ds)
    if inst.pixel_span is not None:
        start, end = inst.pixel_span
        with open(inst.source, "rb") as src:
            src.seek(start)
            remaining = end - start
            while remaining:
                chunk = src.read(min(COPY_CHUNK, remaining))
                if not chunk:
                    raise MalformedInstance("the source changed while it was being copied")
                out.write(chunk)
                remaining -= len(chunk)



class _Mapping(mmap.mmap):
    """A read-only file mapping that says a seek past its end (pydicom skipping a deferred value
    the file does not hold) is a truncated dataset, as ``_WholeReads`` does for a file."""

    def seek(self, pos: int, whence: int = 0) -> None:  # type: ignore[override]
        try:
            super().seek(pos, whence)
        except ValueError:
            raise MalformedInstance("the dataset is truncated") from None


class _Buffer(io.BytesIO):
    """Bytes read as a file, with the same rule as ``_Mapping``."""

    def seek(self, pos: int, whence: int = 0, /) -> int:
        at = super().seek(pos, whence)
        if at > len(self.getbuffer()):
            raise MalformedInstance("the dataset is truncated")
        return at


def map_stored(source: bytes | str) -> bytes | mmap.mmap:
    """A stored object's bytes: its file (a path) mapped read-only, or the bytes themselves.
    Raises MemoryError when the file cannot be mapped within the process's address-space limit."""
    if isinstance(source, bytes):
        return source
    with open(source, "rb") as f:
        if not os.fstat(f.fileno()).st_size:
            return b""  # an empty file cannot be mapped
        try:
            return _Mapping(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            if e.errno == errno.ENOMEM:
                raise MemoryError("the object cannot be mapped within the memory limit") from None
            raise


def locate_stored(source: bytes | str) -> tuple[Dataset, int | None]:
    """A stored object (the path of its file, or its bytes) parsed for rendering, and where the
    value of its Pixel Data lies in it when that was left in place (else None).

    A file is mapped, not read (``map_stored``): its uncompressed pixel data (Pixel Data, Float or
    Double Float Pixel Data of defined length above ``MAPPED_BYTES``) stays a ``memoryview`` of the
    mapping, so rendering one frame touches only that frame's pages, and a parsed dataset kept
    for the next render holds no copy of the pixels. Bytes are parsed the same way. Other values
    above ``MAPPED_BYTES`` are read by pydicom when first used; encapsulated (compressed) pixel
    data is read now. A deflated dataset (its offsets refer to the inflated stream) is read whole.
    A value the file or bytes end inside of raises MalformedInstance; otherwise raises what
    ``dcmread`` raises, and MemoryError as ``map_stored``.
    """
    buf = map_stored(source)
    fp = buf if isinstance(buf, _Mapping) else _Buffer(buf)
    ds = dcmread(fp, defer_size=MAPPED_BYTES)
    ts = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) is not None else None
    if ts is not None and (ts == DeflatedExplicitVRLittleEndian or UID(str(ts)).is_deflated):
        fp.seek(0)
        return dcmread(fp), None
    offset = None
    for tag in PIXEL_TAGS:
        if tag not in ds:
            continue
        elem = ds.get_item(tag, keep_deferred=True)
        if not isinstance(elem, RawDataElement) or elem.value is not None or not elem.length:
            continue
        if elem.length == UNDEFINED_LENGTH:  # encapsulated: pydicom finds its end and reads it
            ds[tag]  # noqa: B018
            continue
        ds[tag] = elem._replace(value=memoryview(buf)[elem.value_tell : elem.value_tell + elem.length])
        if tag == PIXEL_DATA:
            offset = elem.value_tell
    return ds, offset


def read_stored(source: bytes | str) -> Dataset:
    """``locate_stored``'s dataset."""
    return locate_stored(source)[0]
