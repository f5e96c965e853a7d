"""The metadata index on SQLite and on a real PostgreSQL, through the parametrized ``index`` fixture."""

from __future__ import annotations

import datetime as dt
import hashlib
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, text

import storage.index
from storage.index import (
    LOCATION_SPOOL,
    Base,
    Index,
    InstanceRecord,
    Partner,
    PartnerExists,
    Patient,
    Series,
    Study,
)
from storage.objects import make_key

HEAD = ScriptDirectory(str(Path(storage.index.__file__).parent / "migrations")).get_current_head()


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Index]:
    if request.param == "sqlite":
        idx = Index(f"sqlite:///{tmp_path}/i.sqlite3")
    else:
        idx = Index(request.getfixturevalue("pg_url"))
        Base.metadata.drop_all(idx.engine)  # each test starts from an empty database
        with idx.engine.begin() as c:
            c.execute(text("DROP TABLE IF EXISTS alembic_version"))
    idx.migrate()
    try:
        yield idx
    finally:
        idx.close()


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
                           "size_bytes", "received_at"}  # fmt: skip
    assert (newest["patient"], newest["patient_sex"], newest["partner"]) == ("PSEUDO-1", "F", "Hospital A")
    assert (newest["study_date"], newest["accession"], newest["description"]) == ("20240131", "ACC3", "study 3")
    assert studies[1]["modalities"] == ["CT", "MR"] and studies[1]["num_series"] == 2
    assert (studies[1]["num_instances"], studies[1]["size_bytes"], studies[1]["patient"]) == (2, 100, "PSEUDO-0")
    received = dt.datetime.fromisoformat(newest["received_at"].removesuffix("Z"))
    assert newest["received_at"].endswith("Z") and abs(storage.index.utcnow() - received) < dt.timedelta(minutes=5)

    assert [s["study_uid"] for s in index.list_studies(limit=2)] == ["2.25.3", "2.25.2"]
    assert [s["study_uid"] for s in index.list_studies(limit=2, offset=2)] == ["2.25.1"]
    assert index.list_studies(offset=3) == []
