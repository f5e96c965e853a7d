"""Test data built on pydicom's bundled files, and what we need to check a de-identified archive:
the original identifiers of what was sent, and the UID the node gave each instance."""

from __future__ import annotations

import copy
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom._uid_dict import UID_dictionary
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from imaging.pseudonym import KeyedHash
from imx.keys import load_or_create_key

# storescu's option proposing a given transfer syntax (plus the uncompressed ones)
STORESCU_TS_FLAG = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.100": "-xm",
    "1.2.840.10008.1.2.4.101": "-xh",
    "1.2.840.10008.1.2.4.102": "-xn",
    "1.2.840.10008.1.2.4.103": "-xl",
}


@dataclass
class SentFile:
    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str


def local_test_files() -> list[Path]:
    """pydicom's bundled test files that are on disk (get_testdata_files would try to download
    the rest, and this machine has no network)."""
    import pydicom.data

    folder = Path(pydicom.data.__file__).parent / "test_files"
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith((".py", ".pyc", ".txt", ".json", ".gz", ".bz2")))


def storage_files() -> list[SentFile]:
    """Every local pydicom test file whose header names a SOP class and instance (the deliberately
    broken ones included: the node must refuse those cleanly)."""
    out = []
    for p in local_test_files():
        try:
            ds = dcmread(p, stop_before_pixels=True)
            ts = str(ds.file_meta.TransferSyntaxUID)
            out.append(SentFile(p, str(ds.SOPClassUID), str(ds.SOPInstanceUID), ts))
        except Exception:
            continue
    return out


# UID attributes that name a class, syntax or coding scheme, which de-identification keeps
_CLASS_LIKE = ("ClassUID", "TransferSyntax", "CodingSchemeUID", "ContextUID", "MappingResourceUID", "ContextGroupExtensionCreatorUID")


def phi_strings(paths: list[Path], min_len: int = 8) -> set[bytes]:
    """Original identifiers in the files: patient names and ids, and every UID that is not a
    well-known one, as the bytes that would appear if they leaked."""
    found: set[str] = set()

    def walk(ds) -> None:  # type: ignore[no-untyped-def]
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.VR == "UI" and elem.value:
                vals = elem.value if elem.VM > 1 else [elem.value]
                for v in vals:
                    v = str(v).strip("\x00 ")
                    if v not in UID_dictionary and not any(k in elem.keyword for k in _CLASS_LIKE):
                        found.add(v)
            elif elem.keyword in ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthName", "PatientMotherBirthName"):
                if elem.value:
                    found.add(str(elem.value))

    for p in paths:
        try:
            ds = dcmread(p, stop_before_pixels=True)
            walk(ds)
        except Exception:
            continue
    return {s.encode("utf-8", "ignore") for s in found if len(s) >= min_len}


def grep_tree(root: Path, needles: set[bytes]) -> list[tuple[str, str]]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            for n in needles:
                if n in data:
                    hits.append((str(p.relative_to(root)), n.decode(errors="replace")))
    return hits


def expected_uid(data_dir: Path, partner_id: int, original_uid: str) -> str:
    """The UID the node must have given an instance: computed with the installation's key."""
    return KeyedHash(load_or_create_key(data_dir / "secret.key")).uid(f"partner:{partner_id}", original_uid)


def make_ct_series(folder: Path, count: int, patient: str = "Doe^Jane", patient_id: str = "HOSP-000123") -> list[Path]:
    """``count`` CT instances of one new study (CT_small.dcm's pixels, new UIDs)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = dcmread(get_testdata_file("CT_small.dcm"))
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        ds = copy.deepcopy(base)
        ds.PatientName, ds.PatientID = patient, patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        p = folder / f"ct{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def storescu(port: int, files: list[Path], aet: str = "DEMOPACS", aec: str = "IMX", extra: list[str] | None = None, **kw) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    from services import dcmtk_env

    return subprocess.run(
        ["storescu", "-aet", aet, "-aec", aec, "-nh", *(extra or []), "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=kw.get("timeout", 300),
    )
