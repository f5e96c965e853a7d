"""The identity vault (imx/reid.py) over a real index, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import event, select, update

from imaging.pseudonym import KeyedHash
from imx.reid import IdentityVault, VaultError, VaultIntegrityError
from storage.index import Identity, Index, InstanceRecord
from storage.objects import make_key

KEYED = KeyedHash(bytes(range(32)))


@pytest.fixture
def vault(index: Index, tmp_path: Path) -> IdentityVault:
    return IdentityVault(index, KEYED, tmp_path / "vault.key")


@dataclass
class Sent:
    study_uid: str  # the pseudonymous UIDs and pseudonyms the index holds
    patient: str
    accession: str


def send(
    vault: IdentityVault,
    partner_id: int,
    *,
    patient_id: str,
    patient_name: str,
    accession: str,
    study_uid: str,
    instances: int = 1,
) -> Sent:
    """What the ingest path does for one study: pseudonyms from the vault, rows via add_instance."""
    scope = f"partner:{partner_id}"
    patient = vault.pseudonym(
        partner_id,
        scope,
        "patient",
        patient_id,
        {"patient_id": patient_id, "patient_name": patient_name},
        lambda i: KEYED.pseudonym("patient", scope, f"{patient_id.strip()}#{i}", prefix="P", length=16),
    )
    acc = vault.pseudonym(
        partner_id,
        scope,
        "accession",
        accession,
        {"accession": accession},
        lambda i: KEYED.pseudonym("accession", scope, f"{accession.strip()}#{i}", prefix="A", length=15),
    )
    new_study = vault.pseudonym(
        partner_id,
        scope,
        "study",
        study_uid,
        {"study_uid": study_uid},
        lambda i: KEYED.uid(scope, study_uid if i == 0 else f"{study_uid}#{i}"),
    )
    for n in range(instances):
        sop = KEYED.uid(scope, f"{study_uid}.1.{n}")
        digest = hashlib.sha256(sop.encode()).hexdigest()
        assert vault.index.add_instance(
            InstanceRecord(
                partner_id=partner_id,
                patient_pseudonym=patient,
                study_uid=new_study,
                series_uid=KEYED.uid(scope, f"{study_uid}.1"),
                sop_uid=sop,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax="1.2.840.10008.1.2.1",
                object_key=make_key("i", digest),
                sha256=digest,
                size_bytes=100,
                accession=acc,
                modality="CT",
            )
        )
    return Sent(new_study, patient, acc)


def test_reveal_round_trip(vault: IdentityVault, index: Index, tmp_path: Path) -> None:
    p = index.add_partner("Osh City", "OSHPACS").id
    sent = send(
        vault,
        p,
        patient_id="KG-0042 ",  # DICOM pads to an even length
        patient_name="Асанов^Бакыт",
        accession="OSH-2024-17",
        study_uid="1.2.826.0.1.3680043.2.1125.77",
    )
    assert sent.study_uid.startswith("2.25.") and sent.patient.startswith("P") and len(sent.accession) == 16
    assert vault.reveal(p, sent.study_uid) == {
        "patient_id": "KG-0042 ",
        "patient_name": "Асанов^Бакыт",
        "accession": "OSH-2024-17",
        "study_uid": "1.2.826.0.1.3680043.2.1125.77",
    }
    assert vault.reveal(p, "2.25.404") is None

    key = tmp_path / "vault.key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(bytes.fromhex(key.read_text())) == 32
    # another process (a new vault on the same key file) finds the same rows and opens them
    again = IdentityVault(index, KEYED, key)
    scope = f"partner:{p}"
    assert again.pseudonym(p, scope, "patient", "KG-0042", {}, lambda i: "P-UNUSED") == sent.patient
    assert again.reveal(p, sent.study_uid)["patient_name"] == "Асанов^Бакыт"
    # a vault under another key cannot open them
    with pytest.raises(VaultIntegrityError, match="failed authentication"):
        IdentityVault(index, KEYED, tmp_path / "other.key").reveal(p, sent.study_uid)


def test_reveal_without_accession_or_vault_rows(vault: IdentityVault, index: Index) -> None:
    p = index.add_partner("A", "A").id
    scope = f"partner:{p}"
    patient = vault.pseudonym(p, scope, "patient", "X1", {"patient_id": "X1", "patient_name": "N"}, lambda i: f"PX{i}")
    digest = hashlib.sha256(b"s").hexdigest()
    index.add_instance(
        InstanceRecord(p, patient, "2.25.5", "2.25.5.1", "2.25.5.1.1", "1.2", "1.2.840.10008.1.2.1",
                       make_key("i", digest), digest, 10)  # fmt: skip
    )  # no accession, and a study UID the vault never allocated (received before it existed)
    assert vault.reveal(p, "2.25.5") == {"patient_id": "X1", "patient_name": "N", "accession": None, "study_uid": None}


def test_find_studies(vault: IdentityVault, index: Index) -> None:
    p = index.add_partner("A", "A").id
    scope = f"partner:{p}"
    first = send(vault, p, patient_id="X", patient_name="X^X", accession="ACC1", study_uid="1.2.3.1")
    second = send(vault, p, patient_id="X", patient_name="X^X", accession="ACC2", study_uid="1.2.3.2", instances=3)
    other = send(vault, p, patient_id="Y", patient_name="Y^Y", accession="ACC3", study_uid="1.2.3.3")
    assert first.patient == second.patient != other.patient

    assert vault.find_studies(p, scope, patient_id="X") == [second.study_uid, first.study_uid]  # newest first
    assert vault.find_studies(p, scope, patient_id=" X ") == [second.study_uid, first.study_uid]
    assert vault.find_studies(p, scope, accession="ACC2") == [second.study_uid]
    assert vault.find_studies(p, scope, accession="ACC3", patient_id="Y") == [other.study_uid]
    assert vault.find_studies(p, scope, accession="ACC3", patient_id="X") == []  # both must match
    assert vault.find_studies(p, scope, accession="ACC9") == []
    assert vault.find_studies(p, scope, patient_id="Z") == []
    with pytest.raises(ValueError):
        vault.find_studies(p, scope)


def test_partners_never_see_each_other(vault: IdentityVault, index: Index) -> None:
    a = index.add_partner("A", "A").id
    b = index.add_partner("B", "B").id
    same = dict(patient_id="SAME-ID", patient_name="Same^Name", accession="SAME-ACC")
    sent_a = send(vault, a, **same, study_uid="1.2.3.100")
    sent_b = send(vault, b, **same, study_uid="1.2.3.200")
    assert sent_a.patient != sent_b.patient and sent_a.accession != sent_b.accession

    scope_a, scope_b = f"partner:{a}", f"partner:{b}"
    assert vault.find_studies(a, scope_a, accession="SAME-ACC") == [sent_a.study_uid]
    assert vault.find_studies(b, scope_b, accession="SAME-ACC") == [sent_b.study_uid]
    assert vault.find_studies(b, scope_b, patient_id="SAME-ID") == [sent_b.study_uid]
    assert vault.find_studies(b, scope_a, accession="SAME-ACC", patient_id="SAME-ID") == []  # A's scope, B's id
    assert vault.reveal(b, sent_a.study_uid) is None and vault.reveal(a, sent_b.study_uid) is None
    assert vault.reveal(b, sent_b.study_uid)["study_uid"] == "1.2.3.200"


def test_tampered_records_are_refused(vault: IdentityVault, index: Index) -> None:
    a = index.add_partner("A", "A").id
    b = index.add_partner("B", "B").id
    x = send(vault, a, patient_id="X", patient_name="X^X", accession="AX", study_uid="1.2.3.1")
    y = send(vault, a, patient_id="Y", patient_name="Y^Y", accession="AY", study_uid="1.2.3.2")

    def patient_row(pseudonym: str) -> tuple[int, bytes]:
        with index.read() as s:
            row = s.execute(
                select(Identity.id, Identity.ciphertext).where(Identity.kind == "patient", Identity.pseudonym == pseudonym)
            ).one()
        return row[0], bytes(row[1])

    def set_row(row_id: int, **values: object) -> None:
        with index.write() as s:
            s.execute(update(Identity).where(Identity.id == row_id).values(**values))

    x_id, x_sealed = patient_row(x.patient)
    y_id, y_sealed = patient_row(y.patient)

    flipped = bytearray(x_sealed)
    flipped[-20] ^= 0x01
    set_row(x_id, ciphertext=bytes(flipped))
    with pytest.raises(VaultIntegrityError, match="failed authentication"):
        vault.reveal(a, x.study_uid)

    set_row(x_id, ciphertext=y_sealed)  # Y's record swapped onto X's row: would reveal the wrong patient
    with pytest.raises(VaultIntegrityError):
        vault.reveal(a, x.study_uid)

    set_row(x_id, ciphertext=x_sealed[:10])
    with pytest.raises(VaultIntegrityError, match="malformed"):
        vault.reveal(a, x.study_uid)

    set_row(x_id, ciphertext=x_sealed)
    assert vault.reveal(a, x.study_uid)["patient_id"] == "X"

    set_row(y_id, partner_id=b)  # Y's record moved onto partner B
    with pytest.raises(VaultIntegrityError, match="another partner"):
        vault.reveal(a, y.study_uid)


def test_pseudonym_collisions_and_limits(vault: IdentityVault, index: Index) -> None:
    p = index.add_partner("A", "A").id
    scope = f"partner:{p}"
    fixed = lambda i: f"P-FIXED-{i}"  # noqa: E731
    assert vault.pseudonym(p, scope, "patient", "X", {"patient_id": "X"}, fixed) == "P-FIXED-0"
    assert vault.pseudonym(p, scope, "patient", "Y", {"patient_id": "Y"}, fixed) == "P-FIXED-1"
    assert vault.pseudonym(p, scope, "patient", "X", {"patient_id": "ignored"}, fixed) == "P-FIXED-0"

    tries: list[int] = []

    def always_taken(i: int) -> str:
        tries.append(i)
        return "P-FIXED-0"

    with pytest.raises(VaultError, match="no free patient pseudonym"):
        vault.pseudonym(p, scope, "patient", "Z", {"patient_id": "Z"}, always_taken)
    assert tries == list(range(64))
    with pytest.raises(ValueError, match="longer than 16"):
        vault.pseudonym(p, scope, "accession", "ACC", {"accession": "ACC"}, lambda i: "A" * 17)
    with pytest.raises(ValueError, match="empty"):
        vault.pseudonym(p, scope, "patient", " \x00", {"patient_id": ""}, fixed)
    with pytest.raises(ValueError, match="kind"):
        vault.pseudonym(p, scope, "name", "X", {}, fixed)


def test_a_series_costs_one_round_trip(index: Index, tmp_path: Path) -> None:
    p = index.add_partner("A", "A").id
    scope = f"partner:{p}"
    vault = IdentityVault(index, KEYED, tmp_path / "vault.key", cache_size=2)
    statements: list[str] = []

    def count(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        if "identity" in statement:
            statements.append(statement)

    for engine in {index.engine, index.write_engine}:
        event.listen(engine, "before_cursor_execute", count)
    originals = {"patient_id": "X", "patient_name": "X^X"}
    first = vault.pseudonym(p, scope, "patient", "X", originals, lambda i: f"PX{i}")
    on_miss = len(statements)
    for _ in range(499):  # the other slices of the series
        assert vault.pseudonym(p, scope, "patient", "X", originals, lambda i: f"PX{i}") == first
    assert len(statements) == on_miss

    vault.pseudonym(p, scope, "patient", "Y", originals, lambda i: f"PY{i}")
    vault.pseudonym(p, scope, "patient", "Z", originals, lambda i: f"PZ{i}")  # evicts X (least recent)
    before = len(statements)
    assert vault.pseudonym(p, scope, "patient", "X", originals, lambda i: f"PX-NEW{i}") == first
    assert len(statements) == before + 1  # one look-up, nothing written


def test_the_database_holds_no_original(tmp_path: Path) -> None:
    db = tmp_path / "i.sqlite3"
    index = Index(f"sqlite:///{db}")
    index.migrate()
    vault = IdentityVault(index, KEYED, tmp_path / "vault.key")
    p = index.add_partner("A", "A").id
    originals = {
        "patient_id": "KGPATID7731",
        "patient_name": "Toktogulova^Ainura",
        "accession": "ACCNO55190",
        "study_uid": "1.2.826.0.1.3680043.8.498.12345678901",
    }
    sent = send(vault, p, **originals, instances=5)
    assert vault.reveal(p, sent.study_uid) == originals
    vault_key = bytes.fromhex((tmp_path / "vault.key").read_text())
    files = sorted(tmp_path.glob("i.sqlite3*"))
    assert db in files and len(files) >= 2  # the WAL is read too, before any checkpoint
    content = b"".join(f.read_bytes() for f in files)
    assert sent.patient.encode() in content  # the search does see what is stored
    for value in [*originals.values(), "Toktogulova", "Ainura", "KGPATID7731"]:
        for encoding in ("utf-8", "utf-16-le", "utf-16-be"):
            assert value.encode(encoding) not in content, value
    assert vault_key not in content and vault_key.hex().encode() not in content
    index.close()
    assert not any(value.encode() in db.read_bytes() for value in originals.values())  # after the checkpoint


def test_vault_key_is_separate_and_kept(tmp_path: Path, index: Index) -> None:
    key = tmp_path / "vault.key"
    IdentityVault(index, KEYED, key)
    first = key.read_bytes()
    IdentityVault(index, KEYED, key)
    assert key.read_bytes() == first and os.stat(key).st_mode & 0o077 == 0
