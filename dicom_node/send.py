"""The sending side of ``imx send``: push DICOM files to a partner's storage SCP (PS3.4 B.2).

Built for slow, flaky cross-border links:

- Files are recognised by content, in folders (recursively) and inside zip files (members are
  read into memory one at a time, never extracted to disk).
- Each file is offered in its own transfer syntax and sent in its original encoding: files in
  the DICOM File Format go straight from disk (pynetdicom's chunked sending, no decoding);
  datasets without usable file meta and zip members are read in full and sent as a Dataset,
  still in the encoding they were read in and without decoding pixel data.
- Files are grouped into associations of at most ``batch`` files and 128 presentation contexts.
- Every acknowledgement is committed to a small SQLite file at once, so a rerun after Ctrl-C, a
  crash or a dropped link only sends what the receiver has not confirmed. The file holds
  SHA-256 hashes only, never UIDs or file names.
- Rejections, refused connections and dropped associations are retried with exponential
  backoff; a permanent rejection stops at once.
- Nothing printed names a patient or a UID: files are shown by their path relative to the
  argument given, SOP classes and transfer syntaxes by name.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import logging
import os
import re
import socket
import sqlite3
import sys
import threading
import time
import warnings
import zipfile
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from tqdm import tqdm

__all__ = ["SendSummary", "default_state_path", "describe_status", "send"]

MAX_CONTEXTS = 128  # PS3.8 9.3.2: presentation context IDs are the odd numbers 1..255
MAX_ZIP_MEMBER = 2 * 1024**3  # zip members are read into memory; larger ones are skipped
MAX_LISTED_FAILURES = 20
HEAD_BYTES = 1 << 20  # enough to hold the file meta and group 0008 up to the SOP Instance UID
POISON_LIMIT = 3  # a file in flight at this many connection losses is given up on for this run
MIB = 1_000_000  # MB/s as users read it: decimal megabytes

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UID_LIKE_RE = re.compile(r"\b\d+(?:\.\d+){4,}\b")  # five or more parts: not an IPv4 address
_SOP_INSTANCE_UID_TAG = 0x00080018

# PS3.8 7.1.1.9 and 9.3.4: A-ASSOCIATE-RJ (result source, reason/diagnostic)
_REJECT_REASONS: dict[tuple[int, int], str] = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (2, 1): "no reason given (ACSE)",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}

# PS3.7 Annex C and PS3.4 B.2.3: C-STORE statuses with a fixed meaning
_STATUS_MEANINGS: dict[int, str] = {
    0x0000: "success",
    0x0001: "warning",
    0x0105: "no such attribute",
    0x0106: "invalid attribute value",
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0112: "no such object instance",
    0x0117: "invalid SOP instance",
    0x0118: "no such SOP class",
    0x0119: "class-instance conflict",
    0x0120: "missing attribute",
    0x0121: "missing attribute value",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0x0210: "duplicate invocation",
    0x0211: "unrecognized operation",
    0x0212: "mistyped argument",
    0x0213: "resource limitation",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "dataset does not match SOP class",
    0xFE00: "cancelled",
}

# (first, last, meaning) for the ranges PS3.4 B.2.3 reserves
_STATUS_RANGES: tuple[tuple[int, int, str], ...] = (
    (0xA700, 0xA7FF, "out of resources"),
    (0xA900, 0xA9FF, "dataset does not match SOP class"),
    (0xB000, 0xBFFF, "warning"),
    (0xC000, 0xCFFF, "cannot understand"),
)

# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass
class SendSummary:
    """What one ``send`` did.

    ``found`` counts the DICOM files recognised; ``sent`` those the receiver acknowledged in this
    run (success or warning), ``already`` those acknowledged in an earlier run (or earlier in this
    run, for a second copy of the same instance). ``failed`` lists ``(display name, reason)`` for
    files not acknowledged, files that could not be read and paths that do not exist.
    ``skipped_non_dicom`` counts files that are not DICOM instances (including DICOMDIR indexes).
    """

    found: int = 0
    sent: int = 0
    already: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped_non_dicom: int = 0


def default_state_path(host: str, port: int, aec: str) -> Path:
    """Return where the acknowledgement state for one destination lives.

    ``$XDG_STATE_HOME/imx/`` (or ``~/.local/state/imx/``), one SQLite file per host, port and
    called AE title; the name is readable and ends in a short hash so distinct destinations never
    share a file.
    """
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "state"
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", f"{host.strip()}_{port}_{aec.strip()}").strip("_")[:80]
    digest = hashlib.sha256(_destination(host, port, aec).encode()).hexdigest()[:10]
    return base / "imx" / f"send-{slug}-{digest}.sqlite3"


def describe_status(code: int, comment: str | None = None) -> str:
    """Return a C-STORE status as ``0xA900 dataset does not match SOP class[: comment]``.

    UID-like strings in the peer's comment are masked, since the comment is shown to the user.
    """
    meaning = _STATUS_MEANINGS.get(code)
    if meaning is None:
        meaning = next((m for lo, hi, m in _STATUS_RANGES if lo <= code <= hi), "unknown status")
    text = f"0x{code:04X} {meaning}"
    if comment and comment.strip():
        text += ": " + _UID_LIKE_RE.sub("<UID>", comment.strip())
    return text


def send(
    host: str,
    port: int,
    paths: list[Path],
    *,
    aec: str,
    aet: str,
    state_path: Path | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    progress: bool = True,
    batch: int = 200,
    timeout: float = 30.0,
    out: IO[str] = sys.stderr,
) -> SendSummary:
    """Send every DICOM file under ``paths`` to the storage SCP ``aec`` at ``host:port``.

    ``paths`` may be files, folders (walked recursively) and zip files. Files the receiver already
    acknowledged (according to the state file) are not sent again. ``retries`` is the number of
    further attempts after a failed association, waiting ``backoff`` seconds and doubling; the
    count restarts whenever the receiver acknowledges something. ``timeout`` bounds connecting,
    association negotiation and any silence while a file is in flight. Progress and a summary are
    written to ``out``; the returned summary has the counts. ``found == 0`` means no DICOM files
    were found (already reported on ``out``).
    """
    aec, aet = _check_ae_title(aec, "called"), _check_ae_title(aet, "calling")
    if not 0 < int(port) < 65536:
        raise ValueError(f"port must be between 1 and 65535, not {port}")
    if batch < 1:
        raise ValueError("batch must be at least 1")
    if retries < 0:
        raise ValueError("retries must not be negative")

    summary = SendSummary()
    with _quiet_libraries(), _chunked_file_sending():
        key_of = functools.partial(_instance_key, host, int(port), aec)
        items = _Scanner(summary, key_of).scan(paths, out, progress)
        summary.found = len(items)
        if not items:
            print("No DICOM files found in the given path(s).", file=out)
            _print_summary(summary, out)
            return summary

        state = _State(state_path or default_state_path(host, port, aec))
        try:
            pending = [item for item in items if not state.has(item.key)]
            summary.already = len(items) - len(pending)
            if pending:
                sender = _Sender(
                    host=host, port=int(port), aec=aec, aet=aet, state=state, summary=summary,
                    retries=retries, backoff=backoff, batch=batch, timeout=timeout, out=out,
                    progress=progress,
                )
                try:
                    sender.run(pending)
                except KeyboardInterrupt:
                    print(
                        f"\nInterrupted after sending {summary.sent} file(s); what was acknowledged "
                        "is remembered: run the same command again to send the rest.",
                        file=out,
                    )
                    raise
        finally:
            state.close()
    _print_summary(summary, out)
    return summary


# --------------------------------------------------------------------------------------------
# Finding DICOM files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """One DICOM instance to send. Holds the hash of its SOP Instance UID, not the UID."""

    display: str
    path: Path
    member: str | None  # zip member name, or None for a plain file
    size: int
    sop_class: str
    transfer_syntax: str
    key: str  # hex SHA-256 of the destination and the SOP Instance UID (see _instance_key)
    from_file: bool  # pynetdicom can send it straight from the file (complete, consistent meta)

    @property
    def context(self) -> tuple[str, str]:
        """The presentation context this file needs: (SOP class, its own transfer syntax)."""
        return self.sop_class, self.transfer_syntax


@dataclass(frozen=True)
class _Header:
    """What a header parse found out about a candidate file."""

    sop_class: str
    sop_instance: str
    transfer_syntax: str
    meta_complete: bool


class _NotAnInstance(Exception):
    """A DICOM file that is not a storable instance (e.g. a DICOMDIR)."""


class _Scanner:
    """Walks the given paths and collects the DICOM instances in them, in a stable order.

    Non-DICOM files are counted in ``summary.skipped_non_dicom``; unreadable files, damaged
    zips, unusable DICOM headers and missing paths go to ``summary.failed``.
    """

    def __init__(self, summary: SendSummary, key_of: Callable[[str], str]) -> None:
        self.summary = summary
        self.key_of = key_of  # SOP Instance UID -> state key; the UID is not kept
        self.items: list[_Item] = []

    def scan(self, paths: list[Path], out: IO[str], progress: bool) -> list[_Item]:
        """Scan ``paths`` (files, folders, zip files) and return the instances found."""
        seen: set[Path] = set()
        with tqdm(desc="Scanning", unit=" files", file=out, disable=not progress, leave=False) as bar:
            for arg in map(Path, paths):
                if not arg.exists():
                    self.summary.failed.append((str(arg), "no such file or folder"))
                    continue
                if arg.is_dir():
                    files: Iterator[tuple[Path, str]] = (
                        (p, p.relative_to(arg).as_posix()) for p in _walk(arg)
                    )
                else:
                    files = iter([(arg, arg.name)])
                for path, display in files:
                    real = path.resolve()
                    if real not in seen:
                        seen.add(real)
                        bar.update(1)
                        self._file(path, display)
        return self.items

    def _file(self, path: Path, display: str) -> None:
        """Classify one file on disk: a DICOM instance, a zip to look into, or something else."""
        try:
            size = path.stat().st_size
            with path.open("rb") as fh:
                head = fh.read(HEAD_BYTES)
            if head[:4] == b"PK\x03\x04" and zipfile.is_zipfile(path):
                self._zip(path, display)
                return
            header = _inspect(head, complete=size <= len(head), reopen=lambda: path.open("rb"))
        except _NotAnInstance:
            self.summary.skipped_non_dicom += 1
        except _Unusable as exc:
            self.summary.failed.append((display, str(exc)))
        except OSError as exc:
            self.summary.failed.append((display, f"cannot read the file: {_os_reason(exc)}"))
        else:
            if header is None:
                self.summary.skipped_non_dicom += 1
            else:
                # Straight from the file only when its bytes are fit for the wire as they are:
                # deflated streams and odd lengths need the padding pynetdicom's encoder adds.
                from_file = (
                    header.meta_complete
                    and size % 2 == 0
                    and header.transfer_syntax != DeflatedExplicitVRLittleEndian
                )
                self._add(display, path, None, size, header, from_file=from_file)

    def _zip(self, path: Path, display: str) -> None:
        """Look at every member of a zip file, reading at most ``HEAD_BYTES`` of each."""
        try:
            with zipfile.ZipFile(path) as zf:
                for info in sorted(zf.infolist(), key=lambda i: i.filename):
                    if not info.is_dir():
                        self._member(zf, path, info, f"{display}/{info.filename}")
        except (OSError, zipfile.BadZipFile) as exc:
            self.summary.failed.append((display, f"damaged or unreadable zip file: {_zip_reason(exc)}"))

    def _member(self, zf: zipfile.ZipFile, path: Path, info: zipfile.ZipInfo, name: str) -> None:
        """Classify one zip member."""
        try:
            with zf.open(info) as fh:
                head = fh.read(HEAD_BYTES)
            header = _inspect(head, complete=info.file_size <= len(head), reopen=lambda: zf.open(info))
        except _NotAnInstance:
            self.summary.skipped_non_dicom += 1
        except _Unusable as exc:
            self.summary.failed.append((name, str(exc)))
        except (OSError, RuntimeError, NotImplementedError, zipfile.BadZipFile, EOFError) as exc:
            # RuntimeError: an encrypted member; NotImplementedError: unsupported compression
            self.summary.failed.append((name, f"cannot read from the zip file: {_zip_reason(exc)}"))
        else:
            if header is None:
                self.summary.skipped_non_dicom += 1
            elif info.file_size > MAX_ZIP_MEMBER:
                reason = "larger than 2 GiB inside a zip file: unzip it and send the file"
                self.summary.failed.append((name, reason))
            else:
                self._add(name, path, info.filename, info.file_size, header, from_file=False)

    def _add(
        self, display: str, path: Path, member: str | None, size: int, header: _Header, *, from_file: bool
    ) -> None:
        self.items.append(
            _Item(
                display=display,
                path=path,
                member=member,
                size=size,
                sop_class=header.sop_class,
                transfer_syntax=header.transfer_syntax,
                key=self.key_of(header.sop_instance),
                from_file=from_file,
            )
        )


def _walk(folder: Path) -> Iterator[Path]:
    """Yield the files under ``folder``, sorted, without following directory symlinks."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if path.is_file():
                yield path


class _Unusable(Exception):
    """A file that is DICOM (it has the DICM prefix) but cannot be sent; the message says why."""


def _inspect(head: bytes, complete: bool, reopen: Callable[[], BinaryIO]) -> _Header | None:
    """Return the header facts of a DICOM instance, or None if the bytes are not DICOM.

    ``head`` is the start of the file (all of it when ``complete``). A file with the DICM prefix
    whose header cannot be read from ``head`` alone is read again from ``reopen()``. Raises
    ``_NotAnInstance`` for DICOMDIRs, ``_Unusable`` for DICM files without usable UIDs, and
    whatever ``reopen()`` and reading raise for I/O errors.
    """
    is_dicm = len(head) >= 132 and head[128:132] == b"DICM"
    if not is_dicm and not _may_be_raw_dataset(head):
        return None
    parsed = _parse_header(io.BytesIO(head))
    if is_dicm and not complete and (parsed is None or "SOPInstanceUID" not in parsed[0]):
        with reopen() as fh:
            parsed = _parse_header(fh)
    if parsed is None:
        if is_dicm:
            raise _Unusable("unreadable DICOM header")
        return None
    ds, saw_directory = parsed

    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    media_class = _uid_value(meta.get("MediaStorageSOPClassUID"))
    if saw_directory or media_class == MediaStorageDirectoryStorage:
        raise _NotAnInstance
    sop_class = _uid_value(ds.get("SOPClassUID"))
    sop_instance = _uid_value(ds.get("SOPInstanceUID"))
    if not sop_class or not sop_instance:
        if is_dicm:
            raise _Unusable("not a storable DICOM instance (no SOP Class or SOP Instance UID)")
        return None

    implicit, little = ds.original_encoding
    actual = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    )
    meta_ts = _uid_value(meta.get("TransferSyntaxUID"))
    ts = meta_ts if meta_ts and _encoding_matches(meta_ts, bool(implicit), bool(little)) else actual
    meta_complete = (
        is_dicm
        and meta_ts == ts
        and media_class == sop_class
        and _uid_value(meta.get("MediaStorageSOPInstanceUID")) == sop_instance
    )
    return _Header(sop_class, sop_instance, str(ts), meta_complete)


def _parse_header(fh: BinaryIO) -> tuple[FileDataset, bool] | None:
    """Parse file meta and the dataset up to the SOP Instance UID; None if it is not DICOM.

    Also returns whether a directory (group 0004) element was met, which marks a DICOMDIR;
    parsing stops there rather than reading its records. I/O errors propagate.
    """
    saw_directory = False

    def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
        nonlocal saw_directory
        if tag.group == 0x0004:
            saw_directory = True
            return True
        return int(tag) > _SOP_INSTANCE_UID_TAG

    try:
        ds = read_partial(fh, stop_when=stop, force=True)
    except OSError:
        raise
    except Exception:  # pydicom raises many kinds of error on data that is not DICOM
        return None
    return ds, saw_directory


def _may_be_raw_dataset(head: bytes) -> bool:
    """Whether bytes without the DICM prefix could start a DICOM dataset (groups 0000-0008)."""
    if len(head) < 8:
        return False
    little = int.from_bytes(head[:2], "little")
    big = int.from_bytes(head[:2], "big")
    return little in (0x0000, 0x0002, 0x0004, 0x0008) or big in (0x0002, 0x0008)


def _encoding_matches(ts: str, implicit: bool, little: bool) -> bool:
    """Whether transfer syntax ``ts`` agrees with the encoding the dataset was read in."""
    uid = UID(ts)
    if not uid.is_transfer_syntax:
        return True  # a private transfer syntax: nothing to check it against
    return (uid.is_implicit_VR, uid.is_little_endian) == (implicit, little)


def _uid_value(value: Any) -> str | None:
    """A UID element value as a clean string, or None if absent or not a well-formed UID."""
    if value is None:
        return None
    text = str(value).strip("\x00 ")
    return text if len(text) <= 64 and _UID_RE.match(text) else None


# --------------------------------------------------------------------------------------------
# Acknowledgement state
# --------------------------------------------------------------------------------------------


def _destination(host: str, port: int, aec: str) -> str:
    """A destination (host, port, called AE title) as one normalised string."""
    return f"{host.strip().lower()}\n{int(port)}\n{aec.strip()}"


def _instance_key(host: str, port: int, aec: str, sop_instance: str) -> str:
    """The state key of an instance at a destination: SHA-256 of host, port, called AE title and
    SOP Instance UID. Only this hash is stored, so the state file lists no identifiers."""
    return hashlib.sha256(f"{_destination(host, port, aec)}\n{sop_instance}".encode()).hexdigest()


class _State:
    """SQLite record of the instances a destination acknowledged, keyed by hashes only."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._db = sqlite3.connect(path, timeout=30.0)
        with contextlib.suppress(OSError):
            path.chmod(0o600)
        # Each acknowledgement is committed on its own. In WAL mode with synchronous=NORMAL a
        # commit survives Ctrl-C and crashes of this program without an fsync per file; only a
        # power cut may forget the last few, which are then sent again (a duplicate is harmless).
        # Where WAL is not possible (some network file systems) SQLite keeps its rollback journal.
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS acknowledged ("
            " key TEXT PRIMARY KEY,"  # _instance_key(...)
            " at TEXT NOT NULL"  # when the receiver acknowledged it (UTC)
            ") WITHOUT ROWID"
        )
        self._db.commit()

    def has(self, key: str) -> bool:
        """Whether the destination acknowledged ``key`` in an earlier run."""
        return self._db.execute("SELECT 1 FROM acknowledged WHERE key = ?", (key,)).fetchone() is not None

    def add(self, key: str) -> None:
        """Record an acknowledgement and commit at once."""
        self._db.execute(
            "INSERT OR IGNORE INTO acknowledged (key, at) VALUES (?, ?)",
            (key, datetime.now(UTC).isoformat(timespec="seconds")),
        )
        self._db.commit()

    def close(self) -> None:
        """Close the database."""
        self._db.close()


# --------------------------------------------------------------------------------------------
# Sending
# --------------------------------------------------------------------------------------------


@dataclass
class _Attempt:
    """The outcome of one association: what is left to retry and why."""

    unsent: list[_Item] = field(default_factory=list)
    error: str | None = None
    permanent: bool = False
    progressed: bool = False
    in_flight: _Item | None = None  # the file being sent when the connection was lost


class _Sender:
    """Sends items in associations, with retries, recording acknowledgements as they come."""

    def __init__(
        self, *, host: str, port: int, aec: str, aet: str, state: _State, summary: SendSummary,
        retries: int, backoff: float, batch: int, timeout: float, out: IO[str], progress: bool,
    ) -> None:
        self.host, self.port, self.aec, self.aet = host, port, aec, aet
        self.state, self.summary = state, summary
        self.retries, self.backoff, self.batch, self.timeout = retries, backoff, batch, timeout
        self.out = out
        self.progress_enabled = progress
        self.acked: set[str] = set()
        self.losses: dict[str, int] = {}  # item key -> connection losses while it was in flight
        self._zips: dict[Path, zipfile.ZipFile] = {}
        self._bar: _Progress | None = None

    @property
    def where(self) -> str:
        """``host:port`` for messages."""
        return f"{self.host}:{self.port}"

    def run(self, items: list[_Item]) -> None:
        """Send ``items``; failures end up in the summary."""
        queue: deque[_Item] = deque(items)
        failures = 0  # consecutive attempts that acknowledged nothing
        self._bar = _Progress(len(items), sum(i.size for i in items), self.out, self.progress_enabled)
        try:
            while queue:
                batch = self._next_batch(queue)
                attempt = self._send_batch(batch)
                if not attempt.unsent:
                    failures = 0
                    continue
                if attempt.permanent:
                    self._say(f"Stopped: {attempt.error}. Retrying cannot help.")
                    self._give_up([*attempt.unsent, *queue], attempt.error or "")
                    queue.clear()
                    break
                if attempt.in_flight is not None and self._isolate(attempt):
                    failures = 0
                    queue.extendleft(reversed(attempt.unsent))
                    continue
                failures = 0 if attempt.progressed else failures
                failures += 1
                remaining = len(attempt.unsent) + len(queue)
                if failures > self.retries:
                    tries = failures
                    self._say(f"Giving up after {tries} attempt{'s' * (tries > 1)}: {attempt.error}.")
                    self._give_up([*attempt.unsent, *queue], attempt.error or "")
                    queue.clear()
                    break
                delay = self.backoff * 2 ** (failures - 1)
                self._say(
                    f"{_capitalize(attempt.error or 'association failed')}; retrying {remaining} "
                    f"file{'s' * (remaining != 1)} in {delay:.3g} s "
                    f"(attempt {failures + 1} of {self.retries + 1})."
                )
                time.sleep(delay)
                queue.extendleft(reversed(attempt.unsent))
        finally:
            self._bar.close()
            for zf in self._zips.values():
                zf.close()
            self._zips.clear()

    def _next_batch(self, queue: deque[_Item]) -> list[_Item]:
        """Take up to ``batch`` items needing at most ``MAX_CONTEXTS`` presentation contexts."""
        batch: list[_Item] = []
        contexts: set[tuple[str, str]] = set()
        while queue and len(batch) < self.batch:
            item = queue[0]
            if item.context not in contexts and len(contexts) >= MAX_CONTEXTS:
                break
            contexts.add(item.context)
            batch.append(queue.popleft())
        return batch

    def _isolate(self, attempt: _Attempt) -> bool:
        """Give up on a file that keeps being in flight when the connection drops.

        Returns True if it was taken out of ``attempt.unsent``, so the rest can go on.
        """
        item = attempt.in_flight
        assert item is not None
        count = self.losses.get(item.key, 0) + 1
        self.losses[item.key] = count
        if count < POISON_LIMIT:
            return False
        attempt.unsent = [i for i in attempt.unsent if i is not item]
        reason = f"the connection was lost each time this file was sent ({count} times)"
        self.summary.failed.append((item.display, reason))
        self._say(f"{item.display}: {reason}; going on with the others.")
        self._file_done()
        return True

    def _give_up(self, items: list[_Item], error: str) -> None:
        """Record ``items`` as not sent because of ``error``."""
        for item in items:
            self.summary.failed.append((item.display, f"not sent: {error}"))

    def _send_batch(self, batch: list[_Item]) -> _Attempt:
        """Send one batch over one association."""
        contexts: list[Any] = []
        for sop_class, ts in dict.fromkeys(item.context for item in batch):
            contexts.append(build_context(sop_class, [ts]))

        watch = _Watchdog(self.timeout, self._bar)
        ae = AE(ae_title=self.aet)
        ae.acse_timeout = self.timeout
        ae.connection_timeout = self.timeout
        ae.network_timeout = None  # between files; in-flight silence is the watchdog's job
        ae.dimse_timeout = None  # pynetdicom starts it when the file is queued, not sent
        try:
            assoc = ae.associate(
                self.host, self.port, contexts=contexts, ae_title=self.aec,
                evt_handlers=[
                    (evt.EVT_CONN_OPEN, watch.on_open),
                    (evt.EVT_DATA_SENT, watch.on_sent),
                    (evt.EVT_DATA_RECV, watch.on_recv),
                ],
            )
        except (socket.gaierror, UnicodeError):
            return _Attempt(unsent=batch, error=f"cannot find host {self.host} (name lookup failed)")

        if not assoc.is_established:
            return self._not_established(assoc, batch, connected=watch.connected)

        _tune_socket(assoc)
        watch.start(assoc)
        try:
            return self._store_all(assoc, batch, watch)
        except BaseException:
            with contextlib.suppress(Exception):
                assoc.abort()
            raise
        finally:
            watch.stop()

    def _not_established(self, assoc: Association, batch: list[_Item], connected: bool) -> _Attempt:
        """Explain why an association was not established and whether a retry may help."""
        if assoc.is_rejected:
            rj = assoc.acceptor.primitive
            result = int(getattr(rj, "result", 0) or 0)
            source = int(getattr(rj, "result_source", 0) or 0)
            diagnostic = int(getattr(rj, "diagnostic", 0) or 0)
            reason = _REJECT_REASONS.get((source, diagnostic), "no reason given")
            hint = ""
            if (source, diagnostic) == (1, 3):
                hint = f" (the receiver does not know this computer's AE title {self.aet})"
            elif (source, diagnostic) == (1, 7):
                hint = f" (the receiver is not called {self.aec}; check the called AE title)"
            permanent = result == 1
            kind = "permanently" if permanent else "for now"
            error = f"{self.where} rejected the association {kind}: {reason}{hint}"
            return _Attempt(unsent=batch, error=error, permanent=permanent)

        if assoc.rejected_contexts and not assoc.accepted_contexts:
            # Nothing we offered is acceptable; another attempt would offer the same.
            for item in batch:
                self.summary.failed.append((item.display, _not_accepted(item)))
                self._file_done()
            return _Attempt()

        if not connected:
            return _Attempt(unsent=batch, error=self._diagnose_connection())
        if assoc.is_aborted:
            error = f"{self.where} aborted the association request or closed the connection"
        else:
            error = f"{self.where} did not answer the association request within {self.timeout:g} s"
        return _Attempt(unsent=batch, error=error)

    def _diagnose_connection(self) -> str:
        """Find out in plain words why no association could be made (pynetdicom only logs it)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=min(self.timeout, 10.0)):
                pass
        except ConnectionRefusedError:
            return f"connection refused by {self.where} (is the DICOM receiver running on that port?)"
        except TimeoutError:
            return f"no answer from {self.where} (timed out; a firewall may be blocking the port)"
        except socket.gaierror:
            return f"cannot find host {self.host} (name lookup failed)"
        except OSError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN):
                return f"host unreachable: {self.host} (check the network or VPN)"
            return f"cannot connect to {self.where}: {_os_reason(exc)}"
        return f"the connection to {self.where} failed, although it works now"

    def _store_all(self, assoc: Association, batch: list[_Item], watch: _Watchdog) -> _Attempt:
        """C-STORE each file of ``batch`` on an established association."""
        accepted = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
        }
        progressed = False
        msg_id = 0
        for index, item in enumerate(batch):
            if item.key in self.acked:  # a second copy of an instance acknowledged this run
                self.summary.already += 1
                self._file_done()
                continue
            if item.context not in accepted:
                self.summary.failed.append((item.display, _not_accepted(item)))
                self._file_done()
                continue
            if not assoc.is_established:
                return _Attempt(batch[index:], self._lost(watch), progressed=progressed)
            try:
                payload = self._payload(item)
            except Exception as exc:
                self.summary.failed.append((item.display, _read_reason(exc)))
                self._file_done()
                continue

            msg_id = msg_id % 0xFFFF + 1
            watch.begin()
            try:
                status = assoc.send_c_store(payload, msg_id=msg_id)
            except Exception as exc:
                watch.end()
                if not assoc.is_established:
                    return _Attempt(batch[index:], self._lost(watch), progressed=progressed, in_flight=item)
                self.summary.failed.append((item.display, _read_reason(exc)))
                self._file_done()
                continue
            watch.end()
            del payload

            if "Status" not in status:
                with contextlib.suppress(Exception):
                    assoc.abort()
                return _Attempt(batch[index:], self._lost(watch), progressed=progressed, in_flight=item)
            self._record(item, status)
            progressed = True
            if watch.tripped:  # stale wake-up in the queue: do not reuse this association
                with contextlib.suppress(Exception):
                    assoc.abort()
                return _Attempt(batch[index + 1 :], self._lost(watch), progressed=True)

        with contextlib.suppress(Exception):
            assoc.release()
        return _Attempt(progressed=progressed)

    def _lost(self, watch: _Watchdog) -> str:
        """Why the association ended mid-batch."""
        return watch.reason or f"the connection to {self.where} was lost"

    def _record(self, item: _Item, status: Dataset) -> None:
        """Count a C-STORE response; acknowledgements are committed to the state at once.

        Success (0x0000) and warnings (0xBxxx, and the general warning 0x0001) mean the receiver
        stored the instance; anything else is a failure, reported with its code and meaning.
        """
        code = int(status.Status)
        if code == 0x0000 or code == 0x0001 or 0xB000 <= code <= 0xBFFF:
            self.state.add(item.key)
            self.acked.add(item.key)
            self.summary.sent += 1
        else:
            comment = status.get("ErrorComment")
            self.summary.failed.append((item.display, describe_status(code, str(comment or ""))))
        self._file_done()

    def _payload(self, item: _Item) -> Path | Dataset:
        """What to hand to ``send_c_store``: the path itself, or the dataset read in full."""
        if item.member is None and item.from_file:
            return item.path
        if item.member is None:
            with item.path.open("rb") as fh:
                ds = dcmread(fh, force=True)
        else:
            zf = self._zips.get(item.path)
            if zf is None:
                zf = self._zips[item.path] = zipfile.ZipFile(item.path)
            ds = dcmread(io.BytesIO(zf.read(item.member)), force=True)
        if not isinstance(getattr(ds, "file_meta", None), FileMetaDataset):
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = UID(item.transfer_syntax)
        return ds

    def _file_done(self) -> None:
        if self._bar is not None:
            self._bar.file_done()

    def _say(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, file=self.out)


def _tune_socket(assoc: Association) -> None:
    """Disable Nagle on the association's socket: without it every C-STORE waits ~40 ms for
    delayed ACKs. pynetdicom does not set it."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Watchdog:
    """Notices a lost or silent connection while a file is in flight and wakes the sender.

    pynetdicom waits for a C-STORE response on a queue that nothing fills when the peer aborts
    or the link dies, and its DIMSE timeout starts when a file is queued, not when it has been
    sent, so a large file on a slow link would time out while still moving. Instead, data sent
    and received is watched: after ``timeout`` seconds without either, the socket is shut down;
    on a lost connection the waiting sender is woken with an empty response.
    """

    def __init__(self, timeout: float, bar: _Progress | None) -> None:
        self.timeout = timeout
        self.bar = bar
        self.reason: str | None = None
        self.tripped = False
        self.connected = False
        self._assoc: Association | None = None
        self._last_io = time.monotonic()
        self._in_flight = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, assoc: Association) -> None:
        """Begin watching ``assoc``."""
        self._assoc = assoc
        self._thread = threading.Thread(target=self._run, name="imx-send-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def begin(self) -> None:
        """A C-STORE is about to be sent."""
        self._last_io = time.monotonic()
        self._in_flight = True

    def end(self) -> None:
        """The C-STORE call returned."""
        self._in_flight = False

    def on_open(self, event: evt.Event) -> None:
        """EVT_CONN_OPEN handler: the TCP connection was made."""
        self.connected = True

    def on_sent(self, event: evt.Event) -> None:
        """EVT_DATA_SENT handler (DUL thread)."""
        self._last_io = time.monotonic()
        if self.bar is not None:
            self.bar.add_bytes(len(event.data))

    def on_recv(self, event: evt.Event) -> None:
        """EVT_DATA_RECV handler (DUL thread)."""
        self._last_io = time.monotonic()

    def _run(self) -> None:
        assoc = self._assoc
        assert assoc is not None
        while not self._stop.wait(0.1):
            if not self._in_flight or self.tripped:
                continue
            if assoc.is_aborted or not assoc.dul.is_alive() or assoc.acse.is_aborted():
                self._trip("the receiver aborted the association or the connection dropped")
            elif time.monotonic() - self._last_io > self.timeout:
                self._trip(f"no progress for {self.timeout:g} s; the connection seems stuck")
                sock = getattr(assoc.dul.socket, "socket", None)
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

    def _trip(self, reason: str) -> None:
        assoc = self._assoc
        assert assoc is not None
        self.reason = reason
        self.tripped = True
        assoc.dimse.msg_queue.put((None, None))  # wakes send_c_store with "no response"


class _Progress:
    """The tqdm bar: files done, and MB and MB/s as data leaves the socket."""

    def __init__(self, files: int, total_bytes: int, out: IO[str], enabled: bool) -> None:
        self._out = out
        self._bar = tqdm(total=files, unit=" files", file=out, disable=not enabled, desc="Sending")
        self._total_mb = total_bytes / MIB
        self._bytes = 0
        self._start = time.monotonic()
        self._shown = 0.0
        self._lock = threading.Lock()

    def add_bytes(self, n: int) -> None:
        """Count bytes sent; refresh the rate at most twice a second."""
        with self._lock:
            self._bytes += n
            now = time.monotonic()
            if now - self._shown < 0.5:
                return
            self._shown = now
        self._bar.set_postfix_str(self._rate(), refresh=True)

    def file_done(self) -> None:
        """One more file dealt with."""
        self._bar.set_postfix_str(self._rate(), refresh=False)
        self._bar.update(1)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        self._bar.write(message, file=self._out)

    def close(self) -> None:
        self._bar.close()

    def _rate(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-6)
        mb = self._bytes / MIB
        return f"{mb:.1f}/{self._total_mb:.1f} MB, {mb / elapsed:.2f} MB/s"


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _print_summary(summary: SendSummary, out: IO[str]) -> None:
    """Print the counts and up to ``MAX_LISTED_FAILURES`` failures."""
    lines = [
        f"Found:         {summary.found} DICOM file{'s' * (summary.found != 1)}"
        + (f" ({summary.skipped_non_dicom} other files skipped)" if summary.skipped_non_dicom else ""),
        f"Sent:          {summary.sent}",
        f"Already there: {summary.already}",
        f"Failed:        {len(summary.failed)}",
    ]
    for name, reason in summary.failed[:MAX_LISTED_FAILURES]:
        lines.append(f"  {name}: {reason}")
    if len(summary.failed) > MAX_LISTED_FAILURES:
        lines.append(f"  ... and {len(summary.failed) - MAX_LISTED_FAILURES} more")
    print("\n".join(lines), file=out)
    with contextlib.suppress(Exception):
        out.flush()


def _check_ae_title(title: str, which: str) -> str:
    """Validate an AE title (PS3.5: up to 16 characters, no backslash or control characters)."""
    title = (title or "").strip()
    if not title or len(title) > 16 or "\\" in title or not title.isascii() or not title.isprintable():
        raise ValueError(f"the {which} AE title must be 1 to 16 plain characters without backslash")
    return title


def _not_accepted(item: _Item) -> str:
    """Why a file's presentation context was refused, by name (never by UID)."""
    return (
        f"the receiver does not accept {_uid_name(item.sop_class, 'this kind of object')} "
        f"encoded as {_uid_name(item.transfer_syntax, 'this private transfer syntax')}"
    )


def _uid_name(uid: str, fallback: str) -> str:
    """The registered name of a UID, or ``fallback`` for private ones."""
    name = UID(uid).name
    return fallback if not name or name == uid else name


def _read_reason(exc: BaseException) -> str:
    """A plain reason for a file that could not be read or encoded at send time."""
    if isinstance(exc, OSError):
        return f"cannot read the file: {_os_reason(exc)}"
    if isinstance(exc, (zipfile.BadZipFile, RuntimeError, NotImplementedError)):
        return f"cannot read from the zip file: {_zip_reason(exc)}"
    return "cannot read or encode the dataset (is the file damaged?)"


def _os_reason(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()


def _zip_reason(exc: BaseException) -> str:
    if isinstance(exc, RuntimeError) and "encrypted" in str(exc).lower():
        return "the member is encrypted"
    if isinstance(exc, NotImplementedError):
        return "unsupported compression method"
    if isinstance(exc, OSError):
        return _os_reason(exc)
    return "damaged zip data"


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Keep pydicom and pynetdicom from printing: their warnings and logs may quote element
    values (patient names, UIDs) and would break the progress bar. ``send`` reports in plain
    words instead."""
    loggers = [logging.getLogger(name) for name in ("pynetdicom", "pydicom")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
        warnings.filterwarnings("ignore", module=r"pynetdicom(\.|$)")
        for lg in loggers:
            lg.setLevel(logging.CRITICAL + 1)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


@contextlib.contextmanager
def _chunked_file_sending() -> Iterator[None]:
    """Let ``send_c_store(path)`` stream the file's encoded dataset instead of decoding it."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
