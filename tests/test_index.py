"""The metadata index on SQLite and on a real PostgreSQL, through the parametrized ``index`` fixture."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import multiprocessing
import random
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, inspect, select, text

import storage.index
from storage.index import (
    LOCATION_SPOOL,
    Base,
    Identity,
    Index,
    InstanceRecord,
    Partner,
    PartnerExists,
    Patient,
    PseudonymsExhausted,
    Series,
    Study,
)
from storage.objects import make_key

MIGRATIONS = Path(storage.index.__file__).parent / "migrations"
HEAD = ScriptDirectory(str(MIGRATIONS)).get_current_head()


def rec(partner_id: int, study: int, series: int, n: int, **kw: object) -> InstanceRecord:
    sop = f"2.25.{study}.{series}.{n}"
    digest = hashlib.sha256(sop.encode()).hexdigest()
    fields: dict = dict(
        partner_id=partner_id,
        patient_pseudonym=f"PSEUDO-{study % 2}",
        study_uid=f"2.25.{study}",
        series_uid=f"2.25.{study}.{series}",
        sop_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        object_key=make_key("obj", digest),
        sha256=digest,
        size_bytes=100,
        modality="CT",
        patient_sex="F",
        study_date="20240131",
        accession=f"ACC{study}",
        study_description=f"study {study}",
    )
    fields.update(kw)
    return InstanceRecord(**fields)


def row(index: Index, model: type, uid: str) -> tuple:
    col = Study.study_uid if model is Study else Series.series_uid
    with index.read() as s:
        o = s.scalar(select(model).where(col == uid))
        if model is Study:
            return (o.num_series, o.num_instances, o.size_bytes, o.modalities)
        return (o.num_instances, o.size_bytes, o.modality)


def test_migrate_is_idempotent(index: Index) -> None:
    p = index.add_partner("Hospital A", "HOSPA")
    index.migrate()
    index.migrate()
    with index.read() as s:
        assert s.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]
    assert {"partner", "patient", "study", "series", "instance"} <= set(inspect(index.engine).get_table_names())
    assert [x.id for x in index.partners()] == [p.id]


def test_sqlite_wal_full_and_begin_immediate(tmp_path: Path) -> None:
    db = tmp_path / "i.sqlite3"
    index = Index(f"sqlite:///{db}")
    index.migrate()
    for engine in (index.engine, index.write_engine):
        with engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    other = sqlite3.connect(db, timeout=0, isolation_level=None)
    with index.write() as s:
        s.execute(text("SELECT 1"))  # a write transaction holds the write lock from its start
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
    other.execute("BEGIN IMMEDIATE")  # released at commit
    other.execute("ROLLBACK")
    other.close()
    index.close()


def test_partners(index: Index) -> None:
    a = index.add_partner("Hospital A", "HOSPA", ["10.1.0.0/16", "192.168.1.5", "2001:db8::/32"])
    index.add_partner("Clinic B", "CLINB")
    assert [p.name for p in index.partners()] == ["Clinic B", "Hospital A"]
    found = index.partner_by_ae("HOSPA")
    assert found is not None and found.id == a.id and found.name == "Hospital A"
    assert found.host_list == ["10.1.0.0/16", "192.168.1.5", "2001:db8::/32"]
    assert index.partner_by_ae("NOPE") is None and index.partner_by_name("Clinic B").ae_title == "CLINB"

    with pytest.raises(PartnerExists):
        index.add_partner("Hospital A", "OTHER")
    with pytest.raises(PartnerExists):
        index.add_partner("Other", "HOSPA")
    for hosts in (["10.0.0.0/33"], ["not-an-address"]):
        with pytest.raises(ValueError) as e:
            index.add_partner("Bad", "BAD", hosts)
        assert not isinstance(e.value, PartnerExists)
    assert [p.name for p in index.partners()] == ["Clinic B", "Hospital A"]

    allowed = {"10.1.2.3": True, "10.2.0.1": False, "192.168.1.5": True, "192.168.1.6": False,
               "::ffff:10.1.200.7": True, "::ffff:10.2.0.1": False, "2001:db8::1": True,
               "2001:db9::1": False, "bogus": False}  # fmt: skip
    assert {ip: found.allows(ip) for ip in allowed} == allowed
    open_partner = index.partner_by_ae("CLINB")
    assert open_partner.allows("203.0.113.9") and open_partner.allows("::1")


def test_remove_partner(index: Index) -> None:
    idle = index.add_partner("Idle", "IDLE")
    busy = index.add_partner("Busy", "BUSY")
    assert index.add_instance(rec(busy.id, 1, 1, 1))

    assert index.remove_partner("Idle") == "deleted"
    assert index.remove_partner("Busy") == "deactivated"
    assert index.remove_partner("Busy") is None and index.remove_partner("Unknown") is None
    assert index.partners() == [] and index.partner_by_ae("BUSY") is None
    with index.read() as s:
        assert s.get(Partner, idle.id) is None
        kept = s.get(Partner, busy.id)
        assert kept is not None and kept.active is False
        assert s.scalar(select(Study.partner_id)) == busy.id
    again = index.add_partner("Busy", "BUSY")  # name and AE title are free again
    assert again.id != busy.id and index.partner_by_ae("BUSY").id == again.id


def test_add_instance_counters(index: Index) -> None:
    p = index.add_partner("A", "A").id
    for n, size in enumerate([100, 200, 300]):
        assert index.add_instance(rec(p, 1, 1, n, size_bytes=size, modality="MR")) is True
    for n in range(2):
        assert index.add_instance(rec(p, 1, 2, n, size_bytes=1000, modality="CT")) is True
    assert index.add_instance(rec(p, 1, 3, 0, size_bytes=1, modality="MR")) is True
    assert index.add_instance(rec(p, 3, 1, 0)) is True  # same patient (pseudonym), second study

    assert row(index, Study, "2.25.1") == (3, 6, 2601, "CT\\MR")
    assert row(index, Series, "2.25.1.1") == (3, 600, "MR")
    assert row(index, Series, "2.25.1.2") == (2, 2000, "CT")
    assert row(index, Study, "2.25.3") == (1, 1, 100, "CT")
    assert index.counts() == {"studies": 2, "series": 4, "instances": 7}
    with index.read() as s:
        assert s.scalar(select(func.count()).select_from(Patient)) == 1
    inst = index.get_instance("2.25.1.2.1")
    assert inst is not None and inst.size_bytes == 1000 and inst.location == "store"
    assert index.instance_exists("2.25.1.2.1") and not index.instance_exists("2.25.9")


def test_duplicate_sop_changes_nothing(index: Index) -> None:
    p = index.add_partner("A", "A").id
    first = rec(p, 1, 1, 1, size_bytes=500)
    assert index.add_instance(first) is True
    before = (row(index, Study, "2.25.1"), row(index, Series, "2.25.1.1"), index.counts())
    assert index.add_instance(first) is False
    other_copy = rec(p, 1, 2, 1, size_bytes=9, modality="MR", sop_uid=first.sop_uid, object_key=make_key("obj", "f" * 64))
    assert index.add_instance(other_copy) is False
    assert (row(index, Study, "2.25.1"), row(index, Series, "2.25.1.1"), index.counts()) == before
    assert before[0] == (1, 1, 500, "CT")


def test_concurrent_add_instance_of_one_new_study(index: Index) -> None:
    p = index.add_partner("A", "A").id
    records = [rec(p, 7, 1, n, size_bytes=10 + n) for n in range(40)]
    start = threading.Barrier(8)

    def worker(batch: list[InstanceRecord]) -> list[bool]:
        start.wait()
        return [index.add_instance(r) for r in batch]

    with ThreadPoolExecutor(8) as pool:
        # every instance is sent twice, by two different threads: exactly one call may win
        results = list(pool.map(worker, [records[i::8] + records[(i + 1) % 8 :: 8] for i in range(8)]))
    assert sum(ok for batch in results for ok in batch) == 40
    assert index.counts() == {"studies": 1, "series": 1, "instances": 40}
    assert row(index, Study, "2.25.7") == (1, 40, sum(10 + n for n in range(40)), "CT")
    assert row(index, Series, "2.25.7.1") == (40, sum(10 + n for n in range(40)), "CT")


def test_concurrent_series_keep_every_modality(index: Index) -> None:
    p = index.add_partner("A", "A").id
    modalities = ["CT", "MR", "PT", "SR", "SEG", "RTSTRUCT", "KO", "PR"]
    start = threading.Barrier(8)

    def worker(i: int) -> None:
        start.wait()
        for n in range(3):
            assert index.add_instance(rec(p, 8, i, n, modality=modalities[i]))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    assert row(index, Study, "2.25.8") == (8, 24, 2400, "\\".join(sorted(modalities)))


def test_spool_locations_and_all_instances(index: Index) -> None:
    p = index.add_partner("A", "A").id
    recs = [rec(p, 1, 1, n, location=LOCATION_SPOOL if n < 3 else "store") for n in range(4)]
    for r in recs:
        assert index.add_instance(r)
    spooled = index.spooled()
    assert [(key, sha) for _, key, sha in spooled] == [(r.object_key, r.sha256) for r in recs[:3]]
    assert index.spool_depth() == 3 and len(index.spooled(limit=2)) == 2

    index.mark_stored(spooled[0][0])
    assert index.spool_depth() == 2
    assert [key for _, key, _ in index.spooled()] == [r.object_key for r in recs[1:3]]
    assert index.get_instance(recs[0].sop_uid).location == "store"
    assert sorted(index.all_instances()) == sorted(
        (r.sop_uid, r.object_key, r.sha256, "store" if i in (0, 3) else "spool") for i, r in enumerate(recs)
    )


def test_list_studies(index: Index) -> None:
    p = index.add_partner("Hospital A", "HOSPA").id
    for study in (1, 2, 3):
        for series, modality in enumerate(["MR", "CT"] if study == 2 else ["MR"]):
            assert index.add_instance(rec(p, study, series, 0, modality=modality, size_bytes=50))
    studies = index.list_studies()
    assert [s["study_uid"] for s in studies] == ["2.25.3", "2.25.2", "2.25.1"]  # newest first
    newest = studies[0]
    assert set(newest) == {"study_uid", "patient", "patient_sex", "partner", "study_date", "study_time",
                           "accession", "description", "modalities", "num_series", "num_instances",
                           "size_bytes", "received_at", "quarantined"}  # fmt: skip
    assert (newest["patient"], newest["patient_sex"], newest["partner"]) == ("PSEUDO-1", "F", "Hospital A")
    assert (newest["study_date"], newest["accession"], newest["description"]) == ("20240131", "ACC3", "study 3")
    assert newest["quarantined"] == 0
    assert studies[1]["modalities"] == ["CT", "MR"] and studies[1]["num_series"] == 2
    assert (studies[1]["num_instances"], studies[1]["size_bytes"], studies[1]["patient"]) == (2, 100, "PSEUDO-0")
    received = dt.datetime.fromisoformat(newest["received_at"].removesuffix("Z"))
    assert newest["received_at"].endswith("Z") and abs(storage.index.utcnow() - received) < dt.timedelta(minutes=5)

    assert [s["study_uid"] for s in index.list_studies(limit=2)] == ["2.25.3", "2.25.2"]
    assert [s["study_uid"] for s in index.list_studies(limit=2, offset=2)] == ["2.25.1"]
    assert index.list_studies(offset=3) == []


# -- schema revision 0002: migration ------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database, not migrated."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/i.sqlite3"
    url = request.getfixturevalue("pg_url")
    idx = Index(url)
    Base.metadata.drop_all(idx.engine)
    with idx.engine.begin() as c:
        c.execute(text("DROP TABLE IF EXISTS alembic_version"))
    idx.close()
    return url


def alembic(index: Index, action: str, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with index.write_engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, action)(cfg, revision)


def columns(index: Index, table: str) -> set[str]:
    return {c["name"] for c in inspect(index.engine).get_columns(table)}


def test_models_match_the_migrations(index: Index) -> None:
    with index.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_upgrade_from_0001_keeps_rows(empty_url: str) -> None:
    idx = Index(empty_url)
    try:
        alembic(idx, "upgrade", "0001")
        assert "identity" not in inspect(idx.engine).get_table_names()
        assert "quarantine" not in columns(idx, "instance") and "policy" not in columns(idx, "partner")
        t = dt.datetime(2024, 1, 31, 12, 0)
        with idx.write_engine.begin() as c:  # written with 0001's columns only, as 0001 did
            run = lambda sql, **kw: c.execute(text(sql), {"t": t, **kw})  # noqa: E731
            run("INSERT INTO partner (name, ae_title, hosts, active, created_at) VALUES ('Old', 'OLDPACS', '[]', :yes, :t)", yes=True)
            partner = c.scalar(text("SELECT id FROM partner"))
            run("INSERT INTO patient (partner_id, pseudonym, created_at) VALUES (:p, 'P-OLD', :t)", p=partner)
            patient = c.scalar(text("SELECT id FROM patient"))
            run("INSERT INTO study (study_uid, partner_id, patient_id, accession, modalities, num_series, num_instances,"
                " size_bytes, received_at, updated_at) VALUES ('2.25.10', :p, :pt, 'A-OLD', 'CT', 1, 2, 200, :t, :t)",
                p=partner, pt=patient)  # fmt: skip
            study = c.scalar(text("SELECT id FROM study"))
            run("INSERT INTO series (series_uid, study_id, modality, num_instances, size_bytes)"
                " VALUES ('2.25.10.1', :s, 'CT', 2, 200)", s=study)  # fmt: skip
            series = c.scalar(text("SELECT id FROM series"))
            for n in (1, 2):
                run("INSERT INTO instance (sop_uid, series_id, partner_id, sop_class_uid, transfer_syntax, size_bytes,"
                    " object_key, sha256, location, received_at) VALUES (:sop, :se, :p, '1.2', '1.2.840.10008.1.2.1',"
                    " 100, :key, :sha, 'store', :t)",
                    sop=f"2.25.10.1.{n}", se=series, p=partner, key=f"k/{n}", sha=f"{n}" * 64)  # fmt: skip

        idx.migrate()

        with idx.read() as s:
            assert s.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]
        old = idx.partner_by_name("Old")
        assert old is not None and old.ae_title == "OLDPACS" and old.policy is None
        [study_row] = idx.list_studies()
        assert (study_row["study_uid"], study_row["patient"], study_row["accession"]) == ("2.25.10", "P-OLD", "A-OLD")
        assert (study_row["num_instances"], study_row["size_bytes"], study_row["quarantined"]) == (2, 200, 0)
        assert idx.get_instance("2.25.10.1.2").quarantine is None and idx.quarantined() == []
        assert sorted(sop for sop, *_ in idx.all_instances()) == ["2.25.10.1.1", "2.25.10.1.2"]
        # the upgraded database takes the new columns and table
        assert idx.add_instance(rec(old.id, 11, 1, 1, quarantine="burned-in annotation declared"))
        assert idx.claim_identity(old.id, "patient", "a" * 64, ["P-NEW"], b"sealed") == "P-NEW"
        assert idx.set_partner_policy("Old", "{}")

        # the downgrade refuses while it would make a quarantined instance visible, then works
        with pytest.raises(RuntimeError, match="quarantined"):
            alembic(idx, "downgrade", "0001")
        assert idx.release("2.25.11.1.1")
        alembic(idx, "downgrade", "0001")
        assert "identity" not in inspect(idx.engine).get_table_names()
        assert "quarantine" not in columns(idx, "instance") and "policy" not in columns(idx, "partner")
        idx.migrate()
        assert idx.counts() == {"studies": 2, "series": 2, "instances": 3}
    finally:
        idx.close()


# -- partner policy -----------------------------------------------------------------------------
def test_partner_policy(index: Index) -> None:
    index.add_partner("A", "A")
    assert index.partner_by_name("A").policy is None  # the operator's default
    policy = json.dumps({"options": ["retain-longitudinal-dates"], "burned_in": "quarantine"})
    assert index.set_partner_policy("A", policy) is True
    assert index.partner_by_name("A").policy == policy
    assert index.set_partner_policy("A", None) is True and index.partner_by_name("A").policy is None
    assert index.set_partner_policy("Nobody", policy) is False
    for bad in ("{not json", "[1, 2]", '"text"'):
        with pytest.raises(ValueError):
            index.set_partner_policy("A", bad)
    assert index.partner_by_name("A").policy is None


# -- quarantine ---------------------------------------------------------------------------------
def test_quarantine_hides_studies_until_released(index: Index) -> None:
    p = index.add_partner("Hospital A", "HOSPA").id
    burned = "burned-in annotation declared"
    # study 1: two visible instances, one quarantined; study 2: all quarantined; study 3: visible
    for r in (
        rec(p, 1, 1, 0),
        rec(p, 1, 1, 1),
        rec(p, 1, 2, 0, quarantine=burned),
        rec(p, 2, 1, 0, quarantine=burned),
        rec(p, 2, 1, 1, quarantine="secondary capture without consent"),
        rec(p, 3, 1, 0),
    ):
        assert index.add_instance(r)

    studies = index.list_studies()
    assert [s["study_uid"] for s in studies] == ["2.25.3", "2.25.1"]
    assert [(s["num_instances"], s["quarantined"]) for s in studies] == [(1, 0), (3, 1)]
    assert [s["study_uid"] for s in index.list_studies(limit=1, offset=1)] == ["2.25.1"]  # paged after the filter

    held = index.quarantined()
    assert [h["sop_uid"] for h in held] == ["2.25.1.2.0", "2.25.2.1.0", "2.25.2.1.1"]  # oldest first
    first = held[0]
    assert set(first) == {"sop_uid", "study_uid", "series_uid", "partner", "reason", "received_at"}
    assert (first["study_uid"], first["series_uid"], first["partner"], first["reason"]) == (
        "2.25.1", "2.25.1.2", "Hospital A", burned
    )  # fmt: skip
    assert first["received_at"].endswith("Z")
    assert held[2]["reason"] == "secondary capture without consent"
    assert len(index.quarantined(limit=2)) == 2
    assert index.get_instance("2.25.1.1.0").quarantine is None and index.get_instance("2.25.2.1.0").quarantine == burned

    assert index.release("2.25.2.1.0") is True
    assert index.release("2.25.2.1.0") is False  # already visible
    assert index.release("2.25.1.1.0") is False and index.release("2.25.404") is False
    assert index.get_instance("2.25.2.1.0").quarantine is None
    assert [h["sop_uid"] for h in index.quarantined()] == ["2.25.1.2.0", "2.25.2.1.1"]
    studies = index.list_studies()
    assert [(s["study_uid"], s["quarantined"]) for s in studies] == [("2.25.3", 0), ("2.25.2", 1), ("2.25.1", 1)]
    # a duplicate of a quarantined instance changes nothing
    assert index.add_instance(rec(p, 2, 1, 1)) is False
    assert index.get_instance("2.25.2.1.1").quarantine == "secondary capture without consent"


def test_long_quarantine_reason_is_clipped_not_refused(index: Index) -> None:
    p = index.add_partner("A", "A").id
    reason = "burned-in annotation declared; masking failed: " + "x" * 300
    assert index.add_instance(rec(p, 1, 1, 0, quarantine=reason))  # PostgreSQL enforces VARCHAR(200)
    assert index.get_instance("2.25.1.1.0").quarantine == reason[:200]


# -- identity vault rows ------------------------------------------------------------------------
def test_claim_identity(index: Index) -> None:
    a = index.add_partner("A", "A").id
    b = index.add_partner("B", "B").id
    one, two, three = "1" * 64, "2" * 64, "3" * 64
    assert index.claim_identity(a, "patient", one, ["P-ONE", "P-TWO"], b"sealed-1") == "P-ONE"
    assert index.claim_identity(a, "patient", one, ["P-OTHER"], b"other") == "P-ONE"  # same lookup
    assert index.identity(a, "patient", one) == ("P-ONE", b"sealed-1")
    # another original whose first candidate is taken gets the next, whichever partner holds it
    assert index.claim_identity(b, "patient", two, ["P-ONE", "P-TWO"], b"sealed-2") == "P-TWO"
    assert index.claim_identity(b, "patient", one, ["P-ONE", "P-TWO", "P-THREE"], b"sealed-3") == "P-THREE"
    assert index.identity_by_pseudonym("patient", "P-TWO") == (b, b"sealed-2")
    assert index.identity_by_pseudonym("patient", "P-NONE") is None
    # kinds are separate namespaces
    assert index.claim_identity(a, "accession", one, ["P-ONE"], b"acc") == "P-ONE"
    assert index.identity_by_pseudonym("accession", "P-ONE") == (a, b"acc")
    assert index.identity(a, "study", one) is None

    # a ciphertext function is given the chosen candidate, and called only when inserting
    sealed_for: list[str] = []

    def seal(pseudonym: str) -> bytes:
        sealed_for.append(pseudonym)
        return f"sealed for {pseudonym}".encode()

    assert index.claim_identity(a, "patient", three, iter(["P-ONE", "P-TWO", "P-4"]), seal) == "P-4"
    assert index.claim_identity(a, "patient", three, ["P-5"], seal) == "P-4"
    assert sealed_for == ["P-4"] and index.identity(a, "patient", three) == ("P-4", b"sealed for P-4")

    with pytest.raises(PseudonymsExhausted):
        index.claim_identity(a, "patient", "4" * 64, ["P-ONE", "P-TWO"], b"x")
    assert index.identity(a, "patient", "4" * 64) is None
    with pytest.raises(ValueError, match="kind"):
        index.claim_identity(a, "name", "5" * 64, ["N-1"], b"x")
    with pytest.raises(sa_exc.IntegrityError):  # an unknown partner is not a taken pseudonym
        index.claim_identity(a + b + 100, "patient", "6" * 64, ["P-NEW"], b"x")
    with index.read() as s:
        assert s.scalar(select(func.count()).select_from(Identity)) == 5


def _claim_worker(
    url: str, shared: list[tuple[int, str]], own: list[tuple[int, str]], seed: int, start: object, out: object
) -> None:
    """One receiver process: claims the originals every worker claims, in the same order as the
    others (so that they race for each), then its own in a random order, offering the same
    candidates for every original. Even and odd workers offer them from different starting
    points, so that concurrent claims race on both unique constraints: the pseudonym (another
    original took this candidate) and the lookup (another process took this original)."""
    idx = Index(url)
    try:
        order = list(own)
        random.Random(seed).shuffle(order)
        order = shared + order
        start.wait(120)  # type: ignore[attr-defined]
        got = {}
        for partner_id, lookup in order:
            got[f"{partner_id}:{lookup}"] = idx.claim_identity(
                partner_id,
                "patient",
                lookup,
                (f"P{(i + 100 * (seed % 2)) % 200:03d}" for i in range(200)),
                lambda p, key=f"{partner_id}:{lookup}": f"{key}:{p}".encode(),
            )
        out.put(got)  # type: ignore[attr-defined]
    finally:
        idx.close()


def test_concurrent_claims_from_processes(index: Index) -> None:
    a = index.add_partner("A", "A").id
    b = index.add_partner("B", "B").id
    workers = 4
    shared = [(p, hashlib.sha256(f"shared-{n}".encode()).hexdigest()) for p in (a, b) for n in range(10)]
    own = [[(a, hashlib.sha256(f"own-{w}-{n}".encode()).hexdigest()) for n in range(6)] for w in range(workers)]
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(workers), ctx.Queue()
    procs = [
        ctx.Process(target=_claim_worker, args=(index.url, shared, own[w], w, start, out)) for w in range(workers)
    ]
    for proc in procs:
        proc.start()
    try:
        results = [out.get(timeout=180) for _ in procs]
    finally:
        for proc in procs:
            proc.join(30)
    assert [proc.exitcode for proc in procs] == [0] * workers

    with index.read() as s:
        rows = s.execute(select(Identity.partner_id, Identity.lookup, Identity.pseudonym, Identity.ciphertext)).all()
    expected = {f"{p}:{lookup}" for p, lookup in shared} | {f"{p}:{lookup}" for batch in own for p, lookup in batch}
    in_db = {f"{p}:{lookup}": pseudonym for p, lookup, pseudonym, _ in rows}
    assert len(rows) == len(expected) == 44 and set(in_db) == expected  # one row per original
    assert len({pseudonym for *_, pseudonym, _ in rows}) == len(rows)  # no pseudonym shared
    assert all(bytes(ct) == f"{p}:{lookup}:{pseudonym}".encode() for p, lookup, pseudonym, ct in rows)
    for got in results:  # every process was told the pseudonym that is stored
        assert all(in_db[key] == pseudonym for key, pseudonym in got.items())
    assert sum(len(got) for got in results) == workers * (len(shared) + 6)


def test_remove_partner_with_identity_rows_is_deactivated(index: Index) -> None:
    p = index.add_partner("A", "A").id
    index.claim_identity(p, "patient", "1" * 64, ["P-1"], b"x")  # the instance itself was refused
    assert index.remove_partner("A") == "deactivated"
    assert index.identity(p, "patient", "1" * 64) == ("P-1", b"x")


def test_instance_metadata_is_kept_with_the_preview_status_and_tied_to_its_object(index: Index) -> None:
    """Schema 0005: the render workers' DICOM JSON, recorded in the transaction that settles the
    instance; a row made from another object (replaced after masking) is not returned."""
    p = index.add_partner("A", "A").id
    records = [rec(p, 1, 1, n) for n in range(3)]
    for r in records:
        index.add_instance(r)
    ids = {t["object_key"]: t["id"] for t in index.pending_previews(10)}
    a, b, c = (r.object_key for r in records)
    assert index.instance_metadata([a, b, c, "obj/none"]) == {k: (ids[k], None) for k in (a, b, c)}
    index.settle_previews(
        [
            (ids[a], "ok", None, ("r/1.jpg", "image/jpeg", 10), (a, b"json-a")),
            (ids[b], "unrenderable", "no pixel data", None, (b, b"json-b")),
        ]
    )
    assert index.pending_previews(10)[0]["id"] == ids[c]  # c is still queued
    assert index.rendition(ids[a], "preview", 1) == ("r/1.jpg", "image/jpeg")
    index.set_preview_status(ids[c], "ok", None, ("obj/masked-elsewhere", b"json-c"))
    got = index.instance_metadata([a, b, c])
    assert got == {a: (ids[a], b"json-a"), b: (ids[b], b"json-b"), c: (ids[c], None)}
    index.put_metadata([(ids[c], c, b"json-c2"), (ids[a], a, b"json-a2")])  # replaces
    assert index.instance_metadata([a, c]) == {a: (ids[a], b"json-a2"), c: (ids[c], b"json-c2")}
    # a batch whose preview was recorded meanwhile records nothing
    with pytest.raises(sa_exc.IntegrityError):
        index.settle_previews([(ids[a], "ok", None, ("r/2.jpg", "image/jpeg", 10), (a, b"x"))])
    assert index.instance_metadata([a])[a] == (ids[a], b"json-a2")


def test_a_frame_plan_is_kept_with_the_metadata_and_read_with_the_instance(index: Index) -> None:
    """Schema 0006: the render job's frame plan rides with the metadata row; the renderer's look-up
    (preview_target) returns it only while the row was made from the instance's current object."""
    p = index.add_partner("A", "A").id
    records = [rec(p, 1, 1, n) for n in range(2)]
    for r in records:
        index.add_instance(r)
    (a, sop_a), (b, sop_b) = ((r.object_key, r.sop_uid) for r in records)
    ids = {t["object_key"]: t["id"] for t in index.pending_previews(10)}
    assert index.preview_target(sop_a)["render_plan"] is None  # type: ignore[index]
    index.settle_previews([(ids[a], "ok", None, ("r/1.jpg", "image/jpeg", 10), (a, b"json-a", '{"v":1}'))])
    index.set_preview_status(ids[b], "ok", None, ("obj/another", b"json-b", '{"v":1}'))
    assert index.preview_target(sop_a)["render_plan"] == '{"v":1}'  # type: ignore[index]
    assert index.preview_target(sop_b)["render_plan"] is None  # type: ignore[index]  (another object's)
    index.put_metadata([(ids[a], a, b"json-a2")])  # made again on request, without a plan
    assert index.preview_target(sop_a)["render_plan"] is None  # type: ignore[index]
