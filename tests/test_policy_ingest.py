"""De-identification in the service: per-partner policies, readable pseudonyms, re-identification
for the sender only, burned-in annotation (quarantine, mask, reject), and ``imx anonymize`` giving
the same objects as ingest."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from imaging.policy import Policy
from imx.config import Settings, ensure_layout
from imx.ingest import Archive, PartnerRef, Result

TEST_FILES = Path(DATA_ROOT, "test_files")
PATIENT_ID = "PID-ZAREMA-4471"
PATIENT_NAME = "Zaremova^Aigerim"
ACCESSION = "ACC-ZX-99812"


def planted(src: str, dst: Path, **values: object) -> Path:
    ds = dcmread(TEST_FILES / src)
    ds.PatientID, ds.PatientName, ds.AccessionNumber = PATIENT_ID, PATIENT_NAME, ACCESSION
    ds.StudyDate, ds.StudyTime = "20240311", "101112"
    # pydicom's MR_small variants share one SOP Instance UID: give each input its own
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[src, dst.name])
    for k, v in values.items():
        setattr(ds, k, v)
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.fixture
def archive(tmp_path: Path):
    settings = Settings.load(data_dir=tmp_path / "data")
    ensure_layout(settings)
    a = Archive(settings)
    a.index.migrate()
    yield a
    a.close()


def partner(archive: Archive, name: str, ae: str, policy: Policy | None = None) -> PartnerRef:
    archive.index.add_partner(name, ae)
    if policy is not None:
        archive.index.set_partner_policy(name, policy.to_json())
    return PartnerRef.of(archive.index.partner_by_name(name))


def stored(archive: Archive, sop_uid: str) -> Dataset:
    data = archive.read_object(sop_uid)
    assert data is not None
    return dcmread(io.BytesIO(data))


def codes(ds: Dataset) -> set[str]:
    return {i.CodeValue for i in ds.DeidentificationMethodCodeSequence}


def test_each_partner_gets_its_own_policy(archive: Archive, tmp_path: Path) -> None:
    osh = partner(archive, "OSH-CITY", "OSHPACS")  # the operator's default
    bish = partner(archive, "BISHKEK-1", "BISHPACS", Policy.basic())
    src = planted("CT_small.dcm", tmp_path / "ct.dcm")

    a = archive.ingest_file(osh, src)
    b = archive.ingest_file(bish, src)
    assert a.result is b.result is Result.STORED and a.sop_instance_uid != b.sop_instance_uid
    da, db = stored(archive, a.sop_instance_uid), stored(archive, b.sop_instance_uid)

    # default: dates shifted (kept, but not the original), patient characteristics kept
    assert da.StudyDate and da.StudyDate != "20240311" and da.LongitudinalTemporalInformationModified == "MODIFIED"
    assert da.PatientSex == dcmread(src).PatientSex
    assert codes(da) == {"113100", "113103", "113104", "113105", "113107", "113108"}
    assert len(da.DeidentificationMethod) == 6
    # basic: dates emptied, nothing retained
    assert not db.StudyDate and db.LongitudinalTemporalInformationModified == "REMOVED"
    assert not db.get("PatientSex")
    assert codes(db) == {"113100"}
    for ds in (da, db):
        assert ds.SpecificCharacterSet == "ISO_IR 192" and ds.PatientIdentityRemoved == "YES"


def test_pseudonyms_are_readable_stable_and_name_the_partner(archive: Archive, tmp_path: Path) -> None:
    osh = partner(archive, "OSH-CITY", "OSHPACS")
    first = archive.ingest_file(osh, planted("CT_small.dcm", tmp_path / "1.dcm"))
    second = archive.ingest_file(osh, planted("MR_small.dcm", tmp_path / "2.dcm"))
    d1, d2 = stored(archive, first.sop_instance_uid), stored(archive, second.sop_instance_uid)
    assert re.fullmatch(r"OSHC-[0-9A-F]{6}", d1.PatientID)
    assert d1.PatientID == d2.PatientID == str(d1.PatientName)
    assert re.fullmatch(r"OSHC-A-[0-9A-F]{8}", d1.AccessionNumber) and d1.AccessionNumber == d2.AccessionNumber
    assert "OtherPatientIDsSequence" not in d1


def test_only_the_sender_can_reidentify(archive: Archive, tmp_path: Path) -> None:
    osh = partner(archive, "OSH-CITY", "OSHPACS")
    other = partner(archive, "ALMATY-2", "ALMPACS")
    out = archive.ingest_file(osh, planted("CT_small.dcm", tmp_path / "1.dcm"))
    study = stored(archive, out.sop_instance_uid).StudyInstanceUID
    original_study = dcmread(tmp_path / "1.dcm").StudyInstanceUID

    vault = archive.vault
    assert vault.find_studies(osh.id, osh.scope, accession=ACCESSION) == [study]
    assert vault.find_studies(osh.id, osh.scope, patient_id=PATIENT_ID) == [study]
    revealed = vault.reveal(osh.id, study)
    assert revealed["patient_id"] == PATIENT_ID and revealed["patient_name"] == PATIENT_NAME
    assert revealed["accession"] == ACCESSION and revealed["study_uid"] == original_study
    assert vault.find_studies(other.id, other.scope, accession=ACCESSION) == []
    assert vault.reveal(other.id, study) is None
    db = Path(archive.settings.data_dir, "index.sqlite3").read_bytes()
    wal = Path(archive.settings.data_dir, "index.sqlite3-wal")
    db += wal.read_bytes() if wal.exists() else b""
    assert [s for s in (PATIENT_ID, PATIENT_NAME, ACCESSION, "Zaremova") if s.encode() in db] == []


# -- burned-in annotation -----------------------------------------------------------------------
def burned_in(tmp_path: Path, name: str = "sc.dcm") -> Path:
    """A secondary capture that declares burned-in annotation (RGB, uncompressed)."""
    return planted("SC_rgb_small_odd.dcm", tmp_path / name, BurnedInAnnotation="YES", Manufacturer="QUORVEX MEDICAL", ManufacturerModelName="QX-9")


def test_burned_in_objects_are_quarantined_by_default(archive: Archive, tmp_path: Path) -> None:
    osh = partner(archive, "OSH-CITY", "OSHPACS")
    out = archive.ingest_file(osh, burned_in(tmp_path))
    assert out.result is Result.STORED and out.quarantine and "burned-in" in out.quarantine
    held = archive.index.quarantined()
    assert [r["sop_uid"] for r in held] == [out.sop_instance_uid]
    assert archive.index.list_studies() == []  # shown to no specialist
    ds = stored(archive, out.sop_instance_uid)
    assert ds.BurnedInAnnotation == "YES"  # not masked: it says so
    assert archive.index.release(out.sop_instance_uid)
    assert [s["quarantined"] for s in archive.index.list_studies()] == [0]


def test_burned_in_objects_are_refused_when_the_policy_says_reject(archive: Archive, tmp_path: Path) -> None:
    strict = partner(archive, "DUSHANBE", "DUSHPACS", Policy(Policy.default().options, burned_in="reject"))
    out = archive.ingest_file(strict, burned_in(tmp_path))
    assert out.result is Result.REFUSED and "burned-in" in out.reason
    assert archive.index.counts()["instances"] == 0


def test_burned_in_objects_are_masked_by_matching_rules(tmp_path: Path) -> None:
    src = burned_in(tmp_path)
    orig = dcmread(src)
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"source": "test", "rules": [
        {"name": "QX-9 banner", "manufacturer": "quorvex.*", "model": "QX-9", "rows": int(orig.Rows), "columns": int(orig.Columns), "regions": [[0, 0, int(orig.Columns), 2]]}
    ]}))
    settings = Settings.load(data_dir=tmp_path / "data", burnin_rules_file=rules)
    ensure_layout(settings)
    archive = Archive(settings)
    archive.index.migrate()
    try:
        masker = partner(archive, "KASHGAR", "KASHPACS", Policy(Policy.default().options, burned_in="mask"))
        out = archive.ingest_file(masker, src)
        assert out.result is Result.STORED and out.quarantine is None
        ds = stored(archive, out.sop_instance_uid)
        assert ds.BurnedInAnnotation == "NO" and "113101" in codes(ds)  # Clean Pixel Data Option
        before, after = orig.pixel_array, ds.pixel_array
        assert np.all(after[:2] == 0)
        assert np.array_equal(after[2:], before[2:])
        # without a rule for the device, a burned-in object is quarantined rather than stored unmasked
        other = burned_in(tmp_path, "other.dcm")
        o = dcmread(other)
        o.Manufacturer = "ANOTHER VENDOR"
        o.save_as(other)
        held = archive.ingest_file(masker, other)
        assert held.result is Result.STORED and held.quarantine and "no mask rule" in held.quarantine
    finally:
        archive.close()


# -- imx anonymize ------------------------------------------------------------------------------
def imx(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "IMX_DATA_DIR": str(data_dir)}
    return subprocess.run([sys.executable, "-m", "imx.cli", *args], env=env, capture_output=True, text=True, timeout=300)


def test_imx_anonymize_matches_ingest_byte_for_byte(archive: Archive, tmp_path: Path) -> None:
    osh = partner(archive, "OSH-CITY", "OSHPACS")
    src = tmp_path / "src"
    (src / "Zaremova_Aigerim").mkdir(parents=True)
    inputs = [
        planted("CT_small.dcm", src / "Zaremova_Aigerim" / "ct.dcm"),
        planted("MR_small_implicit.dcm", src / "Zaremova_Aigerim" / "mr.dcm"),
        planted("MR_small_jp2klossless.dcm", src / "jpeg2000.dcm"),
    ]
    burned_in(src, "screenshot.dcm")
    with zipfile.ZipFile(src / "more.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(planted("MR_small.dcm", tmp_path / "zipped.dcm"), "Zaremova/zipped.dcm")
        zf.writestr("bomb.bin", b"\0" * (64 * 1024 * 1024))
    inputs.append(tmp_path / "zipped.dcm")
    shutil.copytree(TEST_FILES / "dicomdirtests", src / "fileset")
    archive.close()  # the CLI opens the same data folder

    dst = tmp_path / "dst"
    run = imx(archive.settings.data_dir, "anonymize", str(src), str(dst), "--partner", "OSH-CITY", "--no-progress")
    assert run.returncode == 1, run.stderr  # the bomb is reported as not processed
    assert "zip bomb" in run.stdout and "DICOMDIR left out" in run.stdout
    assert "quarantined, not written: 1" in run.stdout and "screenshot.dcm" in run.stdout

    written = sorted(dst.rglob("*.dcm"))
    names = {p.name for p in written}
    assert all(re.fullmatch(r"2\.25\.\d+\.dcm", n) for n in names)
    assert not any("Zaremova" in str(p) or "ct.dcm" in str(p) for p in dst.rglob("*"))

    again = Archive(archive.settings)
    try:
        for path in inputs:
            out = again.ingest_file(osh, path)
            assert out.result is Result.STORED, out.reason
            assert f"{out.sop_instance_uid}.dcm" in names
            out_file = next(p for p in written if p.name == f"{out.sop_instance_uid}.dcm")
            assert again.read_object(out.sop_instance_uid) == out_file.read_bytes()
    finally:
        again.close()


def test_operator_masks_a_quarantined_object(archive: Archive, tmp_path: Path) -> None:
    osh = partner(archive, "OSH-CITY", "OSHPACS")
    src = burned_in(tmp_path)
    out = archive.ingest_file(osh, src)
    assert out.quarantine
    old_key = archive.index.get_instance(out.sop_instance_uid).object_key
    data_dir = archive.settings.data_dir
    archive.close()

    no_rule = imx(data_dir, "quarantine", "mask", out.sop_instance_uid)
    assert no_rule.returncode == 1 and "give --region" in no_rule.stderr
    cols = int(dcmread(src).Columns)
    masked = imx(data_dir, "quarantine", "mask", out.sop_instance_uid, "--region", f"0,0,{cols},3")
    assert masked.returncode == 0, masked.stderr
    assert "nothing is quarantined" in imx(data_dir, "quarantine", "list").stdout
    check = imx(data_dir, "check")
    assert check.returncode == 0, check.stdout + check.stderr

    again = Archive(archive.settings)
    try:
        row = again.index.get_instance(out.sop_instance_uid)
        assert row.quarantine is None and row.object_key != old_key
        assert not (data_dir / "objects" / old_key).exists()
        ds = stored(again, out.sop_instance_uid)
        assert ds.BurnedInAnnotation == "NO" and "113101" in codes(ds)
        assert np.all(ds.pixel_array[:3] == 0)
        assert np.array_equal(ds.pixel_array[3:], dcmread(src).pixel_array[3:])
        assert [s["quarantined"] for s in again.index.list_studies()] == [0]
    finally:
        again.close()


def test_partner_list_shows_destination_and_policy(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert imx(data, "partner", "add", "OSH-CITY", "--ae", "OSHPACS", "--dest", "pacs.osh.example:104").returncode == 0
    assert imx(data, "partner", "add", "BISHKEK-1", "--ae", "BISHPACS").returncode == 0
    policy = tmp_path / "basic.toml"
    policy.write_text('options = []\nburned_in = "reject"\n')
    assert imx(data, "partner", "policy", "BISHKEK-1", "--set", str(policy)).returncode == 0
    lines = imx(data, "partner", "list").stdout.splitlines()
    osh = next(line for line in lines if line.startswith("OSH-CITY"))
    bish = next(line for line in lines if line.startswith("BISHKEK-1"))
    assert "pacs.osh.example:104" in osh and " default " in osh
    assert " own " in bish and "pacs.osh.example" not in bish
