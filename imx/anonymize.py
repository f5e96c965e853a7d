"""``imx anonymize SRC DST``: offline de-identification of a folder, a zip file or a DICOMDIR
file-set, with the same engine, keys, partner policy and pseudonym vault as ingest, so the same
input gives byte-identical objects whichever way it came.

Output files are named by their new UIDs only (``DST/<study>/<series>/<instance>.dcm``), never by
input names. Objects the policy quarantines (burned-in annotation) are not written; they are
listed in the summary by their path under SRC, which only the operator holding the originals
sees. A source DICOMDIR is left out: its file IDs would name the input files, and its records
would carry the original identifiers; the summary says so.
"""

from __future__ import annotations

import os
import secrets
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from imaging.codecs import without_gdcm
from imaging.dicomio import MalformedInstance, read_received, write_instance
from imaging.policy import Policy
from imx.config import Settings
from imx.ingest import Anonymized, Archive, Outcome, PartnerRef

MAX_MEMBER_BYTES = 4 * 1024**3  # one zip member
MAX_RATIO = 200  # uncompressed / compressed: more than this is treated as a zip bomb
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


@dataclass
class Summary:
    written: int = 0
    duplicates: int = 0
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    refused: list[tuple[str, str]] = field(default_factory=list)
    invalid: list[tuple[str, str]] = field(default_factory=list)
    not_dicom: int = 0
    dicomdirs: int = 0

    def print(self, out: TextIO) -> None:
        print(f"written: {self.written}", file=out)
        if self.duplicates:
            print(f"same instance more than once (written once): {self.duplicates}", file=out)
        for title, rows in (("quarantined, not written", self.quarantined), ("refused", self.refused), ("not processed", self.invalid)):
            if rows:
                print(f"{title}: {len(rows)}", file=out)
                for src, reason in rows:
                    print(f"  {src}: {reason}", file=out)
        if self.not_dicom:
            print(f"not DICOM, skipped: {self.not_dicom}", file=out)
        if self.dicomdirs:
            print(f"DICOMDIR left out: {self.dicomdirs} (its records name the original files and patient)", file=out)


@dataclass
class _Source:
    display: str
    path: Path


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _walk(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            yield Path(root) / name


class Anonymizer:
    def __init__(self, archive: Archive, partner: PartnerRef, policy: Policy | None, dst: Path) -> None:
        self.archive = archive
        self.partner = partner
        self.policy = policy
        self.dst = dst
        self.tmp = archive.settings.tmp_dir
        self.summary = Summary()
        self._seen: set[str] = set()

    @contextmanager
    def _extracted(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[Path]:
        tmp = self.tmp / f"{secrets.token_hex(12)}.zip-member"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                total = 0
                while chunk := src.read(1 << 20):
                    total += len(chunk)
                    if total > MAX_MEMBER_BYTES:
                        raise ValueError("the member is larger than allowed")
                    out.write(chunk)
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)

    def sources(self, src: Path) -> Iterator[tuple[str, Path | tuple[zipfile.ZipFile, zipfile.ZipInfo]]]:
        """Every file under ``src``, and every member of every zip file among them (the zip stays
        open while its members are processed)."""
        paths = [src] if src.is_file() else list(_walk(src))
        for p in paths:
            display = str(p.relative_to(src)) if p != src else p.name
            if zipfile.is_zipfile(p) and not _is_dicom(p):
                try:
                    with zipfile.ZipFile(p) as zf:
                        for info in zf.infolist():
                            if not info.is_dir():
                                yield f"{display}!{info.filename}", (zf, info)
                except (zipfile.BadZipFile, OSError) as e:
                    self.summary.invalid.append((display, f"unreadable zip file ({type(e).__name__})"))
            else:
                yield display, p

    def run(self, src: Path, *, progress: bool = True) -> Summary:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(unit="file", file=sys.stderr, leave=False)
        for display, item in self.sources(src):
            if isinstance(item, tuple):
                zf, info = item
                if info.compress_size and info.file_size / max(1, info.compress_size) > MAX_RATIO:
                    self.summary.invalid.append((display, "the zip member expands too much (a zip bomb?)"))
                elif info.file_size > MAX_MEMBER_BYTES:
                    self.summary.invalid.append((display, "the zip member is too large"))
                else:
                    try:
                        with self._extracted(zf, info) as path:
                            self.one(display, path)
                    except (ValueError, zipfile.BadZipFile, OSError, RuntimeError) as e:
                        self.summary.invalid.append((display, f"cannot extract ({type(e).__name__})"))
            else:
                self.one(display, item)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return self.summary

    def one(self, display: str, path: Path) -> None:
        if not _is_dicom(path):
            self.summary.not_dicom += 1
            return
        try:
            inst = read_received(path)
        except MalformedInstance as e:
            self.summary.invalid.append((display, str(e)))
            return
        if "DirectoryRecordSequence" in inst.ds or str(inst.ds.file_meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_CLASS:
            self.summary.dicomdirs += 1
            return
        prepared = self.archive.anonymize(self.partner, inst, self.policy)
        if isinstance(prepared, Outcome):
            target = self.summary.refused if prepared.result.value == "refused" else self.summary.invalid
            target.append((display, prepared.reason))
            return
        self._write(display, prepared)

    def _write(self, display: str, a: Anonymized) -> None:
        if a.quarantine:
            self.summary.quarantined.append((display, a.quarantine))
            return
        if a.sop_uid in self._seen:
            self.summary.duplicates += 1
            return
        ds = a.inst.ds
        folder = self.dst / str(ds.get("StudyInstanceUID", "") or "nostudy") / str(ds.get("SeriesInstanceUID", "") or "noseries")
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{a.sop_uid}.dcm"
        tmp = folder / f".{a.sop_uid}.part"
        with open(tmp, "wb") as f:
            write_instance(a.inst, f)
        os.replace(tmp, final)
        self._seen.add(a.sop_uid)
        self.summary.written += 1


def anonymize(settings: Settings, src: Path, dst: Path, partner_name: str | None, policy_file: Path | None, *, progress: bool = True, out: TextIO = sys.stdout) -> int:
    from imx.config import ensure_layout
    from storage.index import Index

    if not src.exists():
        print(f"imx: {src} does not exist", file=sys.stderr)
        return 2
    ensure_layout(settings)
    index = Index(settings.effective_database_url)
    index.migrate()
    partners = [p for p in index.partners() if p.active]
    if partner_name:
        p = index.partner_by_name(partner_name)
        if p is None:
            print(f"imx: no partner named {partner_name!r} (see `imx partner list`)", file=sys.stderr)
            return 2
    elif len(partners) == 1:
        p = partners[0]
    else:
        print("imx: name the sending hospital with --partner NAME (see `imx partner list`)", file=sys.stderr)
        return 2
    policy = None
    if policy_file is not None:
        from imaging.policy import PolicyError

        try:
            policy = Policy.load(policy_file)
        except PolicyError as e:
            print(f"imx: {e}", file=sys.stderr)
            return 2
    dst.mkdir(parents=True, exist_ok=True)
    without_gdcm()  # as in the node: a hostile object fails cleanly instead of aborting the run
    archive = Archive(settings, index=index, offline=True)
    try:
        summary = Anonymizer(archive, PartnerRef.of(p), policy, dst).run(src, progress=progress)
    finally:
        archive.close()
    summary.print(out)
    return 0 if not summary.invalid and not summary.refused else 1
