"""The shared query layer (storage/query.py) on SQLite and on a real PostgreSQL: every matching rule
of PS3.4 C.2.2.2 it implements, partner scoping, quarantine exclusion and paging."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
from hypothesis import strategies as st
from sqlalchemy import create_engine, text

from storage.index import Index, InstanceRecord
from storage.objects import make_key
from storage.query import SUPPORTED_KEYS, Level, QueryError, Scope, instances, search

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SR = "1.2.840.10008.5.1.4.1.1.88.22"
US = "1.2.840.10008.5.1.4.1.1.6.1"


def rec(partner: int, patient: str, study: int, series: int, n: int, **kw: object) -> InstanceRecord:
    sop = f"2.25.{study}.{series}.{n}"
    digest = hashlib.sha256(sop.encode()).hexdigest()
    fields: dict = dict(
        partner_id=partner,
        patient_pseudonym=patient,
        study_uid=f"2.25.{study}",
        series_uid=f"2.25.{study}.{series}",
        sop_uid=sop,
        sop_class_uid=CT,
        transfer_syntax="1.2.840.10008.1.2.1",
        object_key=make_key("i", digest),
        sha256=digest,
        size_bytes=1000 + n,
        modality="CT",
        patient_sex="F",
        series_number=series,
        instance_number=n,
        accession=f"ACC{study}",
        rows=4,
        columns=4,
        frames=1,
    )
    fields.update(kw)
    return InstanceRecord(**fields)


def populate(index: Index) -> tuple[int, int]:
    a = index.add_partner("Hospital A", "HOSPA").id
    b = index.add_partner("Hospital B", "HOSPB").id
    s1 = dict(study_date="20240105", study_time="101500", study_description="CT CHEST")
    records = [
        # S1: a CT series (instances sent out of order, plus a quarantined one) and an SR series
        rec(a, "SMITH^ANNA", 1, 1, 3, **s1),
        rec(a, "SMITH^ANNA", 1, 1, 1, **s1),
        rec(a, "SMITH^ANNA", 1, 1, 2, **s1),
        rec(a, "SMITH^ANNA", 1, 1, 4, quarantine="burned-in annotation declared", **s1),
        rec(a, "SMITH^ANNA", 1, 2, 1, modality="SR", sop_class_uid=SR, **s1),
        # S2: MR
        *(
            rec(a, "SMITHSON^BOB", 2, 1, n, modality="MR", sop_class_uid=MR, study_date="20240110",
                study_time="083000", study_description="MR BRAIN", series_description="T1 axial")
            for n in (1, 2)
        ),
        # S3: CT plus a US series whose only instance is quarantined
        rec(a, "JONES^CAROL", 3, 1, 1, study_date="20240110", study_time="170000.123", study_description="ct abdomen"),
        rec(a, "JONES^CAROL", 3, 2, 1, modality="US", sop_class_uid=US, study_date="20240110",
            study_time="170000.123", quarantine="burned-in annotation likely"),
        # S4: every instance quarantined: never appears
        rec(a, "SMITH^ANNA", 4, 1, 1, study_date="20240301", quarantine="burned-in annotation declared"),
        # S5: no date
        rec(a, "ZED^ZULU", 5, 1, 1, patient_sex="M"),
        # S6: partner B
        *(rec(b, "SMITH^DAVE", 6, 1, n, study_date="20240107", study_time="120000") for n in (1, 2)),
    ]
    for r in records:
        assert index.add_instance(r)
    return a, b


def fresh_index(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, name: str) -> Index:
    """An empty, migrated index on the backend of ``request.param`` (a database of its own on
    PostgreSQL: other modules drop tables in theirs)."""
    if request.param == "sqlite":
        idx = Index(f"sqlite:///{tmp_path_factory.mktemp(name)}/i.sqlite3")
    else:
        base = request.getfixturevalue("pg_url")
        admin = create_engine(base, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f"DROP DATABASE IF EXISTS {name}"))
            c.execute(text(f"CREATE DATABASE {name}"))
        admin.dispose()
        idx = Index(base.rsplit("/", 1)[0] + "/" + name)
    idx.migrate()
    return idx


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Index, int, int]]:
    """One populated index per backend, shared by the read-only tests of this module."""
    idx = fresh_index(request, tmp_path_factory, "imx_query")
    a, b = populate(idx)
    try:
        yield idx, a, b
    finally:
        idx.close()


def uids(rows: list[dict], key: str = "StudyInstanceUID") -> list[str]:
    return [r[key] for r in rows]


ALL = Scope(None)


def studies(db: tuple[Index, int, int], scope: Scope = ALL, **query: str) -> list[str]:
    return uids(search(db[0], Level.STUDY, query, scope))


# -- scoping, quarantine, order ------------------------------------------------------------------------
def test_study_order_newest_first_without_fully_quarantined(db) -> None:
    index, a, b = db
    assert studies(db) == ["2.25.3", "2.25.2", "2.25.6", "2.25.1", "2.25.5"]
    assert studies(db, Scope(a)) == ["2.25.3", "2.25.2", "2.25.1", "2.25.5"]
    assert studies(db, Scope(b)) == ["2.25.6"]


def test_partner_never_sees_another_partners_studies(db) -> None:
    index, a, b = db
    for level, q in [
        (Level.STUDY, {"StudyInstanceUID": "2.25.1"}),
        (Level.SERIES, {"StudyInstanceUID": "2.25.1"}),
        (Level.IMAGE, {"SOPInstanceUID": "2.25.1.1.1"}),
        (Level.PATIENT, {"PatientID": "SMITH^ANNA"}),
    ]:
        assert search(index, level, q, Scope(b)) == []
        assert search(index, level, q, Scope(a)) != []
    assert instances(index, Scope(b), study_uid="2.25.1") == []
    assert instances(index, Scope(a), study_uid="2.25.6") == []
    assert len(instances(index, Scope(b), study_uid="2.25.6")) == 2


def test_computed_study_attributes_exclude_quarantined(db) -> None:
    index = db[0]
    by_uid = {r["StudyInstanceUID"]: r for r in search(index, Level.STUDY, {}, ALL)}
    s1 = by_uid["2.25.1"]
    assert s1["NumberOfStudyRelatedSeries"] == 2
    assert s1["NumberOfStudyRelatedInstances"] == 4  # the quarantined fifth does not count
    assert s1["ModalitiesInStudy"] == ["CT", "SR"]
    assert s1["SOPClassesInStudy"] == sorted([CT, SR])
    assert (s1["PatientID"], s1["PatientName"], s1["AccessionNumber"]) == ("SMITH^ANNA", "SMITH^ANNA", "ACC1")
    assert (s1["StudyDate"], s1["StudyTime"], s1["StudyDescription"]) == ("20240105", "101500", "CT CHEST")
    s3 = by_uid["2.25.3"]  # its US series holds only a quarantined instance
    assert (s3["NumberOfStudyRelatedSeries"], s3["NumberOfStudyRelatedInstances"]) == (1, 1)
    assert s3["ModalitiesInStudy"] == ["CT"] and s3["SOPClassesInStudy"] == [CT]


def test_quarantined_instances_never_match(db) -> None:
    index = db[0]
    assert search(index, Level.IMAGE, {"SOPInstanceUID": "2.25.1.1.4"}, ALL) == []
    assert search(index, Level.SERIES, {"SeriesInstanceUID": "2.25.3.2"}, ALL) == []
    assert search(index, Level.STUDY, {"StudyInstanceUID": "2.25.4"}, ALL) == []
    assert studies(db, ModalitiesInStudy="US") == []
    assert instances(index, ALL, study_uid="2.25.4") == []
    assert instances(index, ALL, sop_uids=["2.25.1.1.4", "2.25.1.1.1"])[0].sop_uid == "2.25.1.1.1"
    assert len(instances(index, ALL, sop_uids=["2.25.1.1.4", "2.25.1.1.1"])) == 1


# -- matching rules (PS3.4 C.2.2.2) --------------------------------------------------------------------
def test_single_value_matching(db) -> None:
    assert studies(db, PatientID="SMITH^ANNA") == ["2.25.1"]
    assert studies(db, AccessionNumber="ACC2") == ["2.25.2"]
    assert studies(db, StudyDate="20240110") == ["2.25.3", "2.25.2"]
    assert studies(db, PatientSex="M") == ["2.25.5"]
    assert studies(db, PatientName="smith^anna") == []  # case-sensitive without fuzzy matching


def test_universal_matching(db) -> None:
    everything = studies(db)
    assert studies(db, PatientName="", StudyDate="", AccessionNumber="*") == everything
    # a return key this level does not hold is accepted and ignored (the door answers it empty)
    assert studies(db, ReferringPhysicianName="", QueryRetrieveLevel="STUDY") == everything


def test_wildcard_matching_is_case_sensitive_on_both_backends(db) -> None:
    assert studies(db, PatientName="SMITH*") == ["2.25.2", "2.25.6", "2.25.1"]
    assert studies(db, PatientName="SMITH^????") == ["2.25.6", "2.25.1"]
    assert studies(db, PatientName="smith*") == []
    assert studies(db, StudyDescription="ct*") == ["2.25.3"]
    assert studies(db, StudyDescription="*CHEST") == ["2.25.1"]
    assert studies(db, StudyDescription="?R BRAIN") == ["2.25.2"]
    # LIKE/GLOB metacharacters in a value are literal
    assert studies(db, StudyDescription="CT%") == []
    assert studies(db, StudyDescription="[C]T*") == []
    assert studies(db, StudyDescription="CT_CHEST") == []


def test_fuzzy_person_name_matching(db) -> None:
    index = db[0]

    def fuzzy(name: str) -> list[str]:
        return uids(search(index, Level.STUDY, {"PatientName": name}, ALL, fuzzy=True))

    assert fuzzy("smith") == ["2.25.2", "2.25.6", "2.25.1"]
    assert fuzzy("anna") == ["2.25.1"]  # any name component
    assert fuzzy("Bo") == ["2.25.2"]
    assert fuzzy("nna") == []  # prefixes, not substrings
    # fuzzy matching concerns person names only
    assert uids(search(index, Level.STUDY, {"AccessionNumber": "acc1"}, ALL, fuzzy=True)) == []


def test_date_range_matching(db) -> None:
    assert studies(db, StudyDate="20240106-20240110") == ["2.25.3", "2.25.2", "2.25.6"]
    assert studies(db, StudyDate="-20240105") == ["2.25.1"]
    assert studies(db, StudyDate="20240108-") == ["2.25.3", "2.25.2"]
    assert studies(db, StudyDate="20240111-20240201") == []


def test_time_range_matching(db) -> None:
    assert studies(db, StudyTime="1000-1800") == ["2.25.3", "2.25.6", "2.25.1"]
    assert studies(db, StudyTime="-0900") == ["2.25.2"]
    assert studies(db, StudyTime="1700-1700") == ["2.25.3"]  # 17:00:00.123 lies within 17:00
    assert studies(db, StudyTime="170001-") == []
    assert studies(db, StudyTime="1015") == ["2.25.1"]


def test_combined_date_time_range(db) -> None:
    # from 5 January 12:00 to 10 January 10:00 (PS3.4 C.2.2.2.5.1), not "12:00-10:00 each day"
    assert studies(db, StudyDate="20240105-20240110", StudyTime="1200-1000") == ["2.25.2", "2.25.6"]
    assert studies(db, StudyDate="20240105-20240110", StudyTime="1000-") == ["2.25.3", "2.25.2", "2.25.6", "2.25.1"]
    # a single date and a time range match separately
    assert studies(db, StudyDate="20240110", StudyTime="1200-") == ["2.25.3"]


def test_uid_list_matching(db) -> None:
    assert studies(db, StudyInstanceUID="2.25.1\\2.25.2") == ["2.25.2", "2.25.1"]
    assert studies(db, StudyInstanceUID="2.25.1,2.25.6") == ["2.25.6", "2.25.1"]
    assert studies(db, StudyInstanceUID="2.25.99") == []


def test_modalities_in_study(db) -> None:
    assert studies(db, ModalitiesInStudy="MR") == ["2.25.2"]
    assert studies(db, ModalitiesInStudy="MR\\SR") == ["2.25.2", "2.25.1"]


def test_series_level(db) -> None:
    index = db[0]
    rows = search(index, Level.SERIES, {"StudyInstanceUID": "2.25.1"}, ALL)
    assert uids(rows, "SeriesInstanceUID") == ["2.25.1.1", "2.25.1.2"]
    assert [r["NumberOfSeriesRelatedInstances"] for r in rows] == [3, 1]
    assert [r["Modality"] for r in rows] == ["CT", "SR"]
    assert rows[0]["StudyDate"] == "20240105" and rows[0]["SeriesNumber"] == 1
    mr = search(index, Level.SERIES, {"SeriesDescription": "T1*", "Modality": "MR"}, ALL)
    assert uids(mr, "SeriesInstanceUID") == ["2.25.2.1"]
    # study-level keys restrict series searches across studies (QIDO-RS /series)
    assert uids(search(index, Level.SERIES, {"StudyDate": "20240110", "Modality": "CT"}, ALL), "SeriesInstanceUID") == [
        "2.25.3.1"
    ]
    assert search(index, Level.SERIES, {"SeriesNumber": "2", "StudyInstanceUID": "2.25.1"}, ALL)[0]["Modality"] == "SR"


def test_image_level(db) -> None:
    index = db[0]
    rows = search(index, Level.IMAGE, {"StudyInstanceUID": "2.25.1", "SeriesInstanceUID": "2.25.1.1"}, ALL)
    assert uids(rows, "SOPInstanceUID") == ["2.25.1.1.1", "2.25.1.1.2", "2.25.1.1.3"]
    r = rows[0]
    assert (r["SOPClassUID"], r["InstanceNumber"], r["Rows"], r["Columns"], r["NumberOfFrames"]) == (CT, 1, 4, 4, 1)
    assert r["AvailableTransferSyntaxUID"] == "1.2.840.10008.1.2.1"
    assert (r["StudyInstanceUID"], r["SeriesInstanceUID"]) == ("2.25.1", "2.25.1.1")
    assert uids(search(index, Level.IMAGE, {"InstanceNumber": "2", "SeriesInstanceUID": "2.25.1.1"}, ALL), "SOPInstanceUID") == [
        "2.25.1.1.2"
    ]
    assert uids(search(index, Level.IMAGE, {"SOPClassUID": SR}, ALL), "SOPInstanceUID") == ["2.25.1.2.1"]


def test_patient_level(db) -> None:
    index, a, _ = db
    rows = search(index, Level.PATIENT, {}, Scope(a))
    # code point order, the same on both backends ("S" < "^")
    assert uids(rows, "PatientID") == ["JONES^CAROL", "SMITHSON^BOB", "SMITH^ANNA", "ZED^ZULU"]
    anna = rows[2]
    # her study S4 is entirely quarantined
    assert (anna["NumberOfPatientRelatedStudies"], anna["NumberOfPatientRelatedSeries"], anna["NumberOfPatientRelatedInstances"]) == (1, 2, 4)
    assert uids(search(index, Level.PATIENT, {"PatientName": "SMITH*"}, ALL), "PatientID") == [
        "SMITHSON^BOB",
        "SMITH^ANNA",
        "SMITH^DAVE",
    ]


def test_paging_is_stable_and_complete(db) -> None:
    index = db[0]
    for level, key in [(Level.STUDY, "StudyInstanceUID"), (Level.SERIES, "SeriesInstanceUID"), (Level.IMAGE, "SOPInstanceUID")]:
        full = uids(search(index, level, {}, ALL), key)
        paged: list[str] = []
        for offset in range(0, len(full) + 2, 2):
            paged += uids(search(index, level, {}, ALL, limit=2, offset=offset), key)
        assert paged == full
        assert uids(search(index, level, {}, ALL, limit=0), key) == []
        assert uids(search(index, level, {}, ALL, offset=len(full)), key) == []


def test_instances_for_retrieve(db) -> None:
    index = db[0]
    got = instances(index, ALL, study_uid="2.25.1")
    assert [i.sop_uid for i in got] == ["2.25.1.1.1", "2.25.1.1.2", "2.25.1.1.3", "2.25.1.2.1"]
    first = got[0]
    assert (first.study_uid, first.series_uid, first.sop_class_uid, first.location) == ("2.25.1", "2.25.1.1", CT, "store")
    assert (first.size_bytes, first.frames, first.rows, first.columns) == (1001, 1, 4, 4)
    assert first.object_key.startswith("i")
    assert [i.sop_uid for i in instances(index, ALL, study_uid="2.25.1", series_uid="2.25.1.2")] == ["2.25.1.2.1"]
    assert instances(index, ALL, study_uid="2.25.2", series_uid="2.25.1.2") == []
    assert instances(index, ALL, sop_uids=[]) == []
    with pytest.raises(QueryError):
        instances(index, ALL)


@pytest.mark.parametrize(
    "level,query,names",
    [
        (Level.STUDY, {"Modality": "CT"}, "Modality"),
        (Level.PATIENT, {"StudyDate": "20240101"}, "StudyDate"),
        (Level.STUDY, {"StudyDate": "2024-01-01-2024"}, "StudyDate"),
        (Level.STUDY, {"StudyDate": "Jan 2024"}, "StudyDate"),
        (Level.STUDY, {"StudyTime": "25h"}, "StudyTime"),
        (Level.SERIES, {"SeriesNumber": "one"}, "SeriesNumber"),
        (Level.STUDY, {"StudyInstanceUID": "DOE^JOHN"}, "UID"),
        (Level.SERIES, {"SeriesInstanceUID": "\\,"}, "SeriesInstanceUID"),
    ],
)
def test_bad_keys_and_values_are_refused_without_echoing_them(db, level: Level, query: dict, names: str) -> None:
    with pytest.raises(QueryError) as e:
        search(db[0], level, query, ALL)
    assert names in str(e.value)
    assert "DOE" not in str(e.value) and "Jan" not in str(e.value)


def test_supported_keys() -> None:
    assert "PatientName" in SUPPORTED_KEYS[Level.PATIENT]
    assert {"StudyDate", "ModalitiesInStudy", "PatientID"} <= SUPPORTED_KEYS[Level.STUDY]
    assert "Modality" not in SUPPORTED_KEYS[Level.STUDY]
    assert {"StudyInstanceUID", "SeriesInstanceUID", "Modality"} <= SUPPORTED_KEYS[Level.SERIES]
    assert SUPPORTED_KEYS[Level.SERIES] < SUPPORTED_KEYS[Level.IMAGE]


def test_matching_runs_in_sql_with_paging(tmp_path: Path) -> None:
    """A page of a large index comes back without reading every row into Python: the row limit
    reaches the database (checked through the statements SQLAlchemy sends)."""
    from sqlalchemy import event

    index = Index(f"sqlite:///{tmp_path}/big.sqlite3")
    index.migrate()
    pid = index.add_partner("Big", "BIG").id
    for study in range(60):
        for n in range(3):
            index.add_instance(rec(pid, f"P{study % 7}", 100 + study, 1, n, study_date=f"202401{study % 28 + 1:02d}"))
    statements: list[str] = []
    event.listen(index.engine, "before_cursor_execute", lambda c, cur, stmt, *a: statements.append(stmt))
    rows = search(index, Level.STUDY, {"PatientName": "P3", "StudyDate": "20240101-20240131"}, ALL, limit=5)
    assert len(rows) == 5
    main = next(st for st in statements if "FROM study" in st and "JOIN patient" in st)
    assert "LIMIT" in main and "GLOB" not in main and "study_date >=" in main
    index.close()


# -- wildcard matching agrees with a reference on both backends ----------------------------------------
TRICKY_NAMES = [
    "AB", "ABA", "A%B", "A_B", "A[B]", "[AB]", "A\\B", "a^b", "A^B", "B*A", "A?B", "%", "_", "ABBA",
    "BA%", "A B", "AAB_", "[", "]", "\\", "ab", "Ab", "aB", "A^B^A",
]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def names_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Index, int]]:
    """An index (either backend) whose patients have names full of LIKE and GLOB metacharacters."""
    index = fresh_index(request, tmp_path_factory, "imx_query_names")
    pid = index.add_partner("Tricky", "TRICKY").id
    for n, name in enumerate(TRICKY_NAMES):
        assert index.add_instance(rec(pid, name, 900 + n, 1, 1))
    try:
        yield index, pid
    finally:
        index.close()


def reference_match(pattern: str, value: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


@hypothesis.settings(max_examples=150, deadline=None, suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(pattern=st.text(alphabet="AaBb%_[]\\^ *?", min_size=1, max_size=6))
def test_wildcards_match_like_the_standard_says(names_db: tuple[Index, int], pattern: str) -> None:
    """PS3.4 C.2.2.2.4: * any sequence, ? one character, everything else literal and
    case-sensitive, on SQLite (GLOB) and PostgreSQL (LIKE) alike."""
    index, pid = names_db
    if not pattern.strip() or set(pattern.strip()) == {"*"}:
        return  # universal matching
    got = {r["PatientID"] for r in search(index, Level.STUDY, {"PatientID": pattern}, Scope(pid))}
    expected = {n for n in TRICKY_NAMES if reference_match(pattern.strip(), n)}
    assert got == expected
