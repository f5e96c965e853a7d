"""The one query layer behind both query doors: C-FIND (``dicom_node``) and QIDO-RS (``viewer``).

Both doors translate their protocol into ``search(index, level, query, scope)`` and, for
retrieves (C-MOVE, C-GET, WADO-RS), ``instances(index, scope, ...)``, so the two can never
disagree on what matches.

Matching follows PS3.4 C.2.2.2 (attribute matching):

- an empty value (or a value of only ``*``) is universal matching: the key is returned, not matched
  (C.2.2.2.3);
- single value matching (C.2.2.2.1), case-sensitive, for every key;
- wildcard matching with ``*`` and ``?`` (C.2.2.2.4) on string VRs that allow it (PN, LO, SH, CS);
- range matching ``a-b``, ``a-``, ``-b`` on DA and TM (C.2.2.2.5), and the combined date-time
  range when StudyDate and StudyTime are both ranges (C.2.2.2.5.1 note on combined matching);
- list of UID matching ``u1\\u2`` (C.2.2.2.2); a comma is accepted as separator too (PS3.18 8.3.4.1);
- ModalitiesInStudy matches a study having a (visible) series of any of the listed modalities.

``fuzzy`` (PS3.18 8.3.4.5 fuzzymatching) makes person name matching case-insensitive and lets a
value match the start of any name component.

Everything runs in SQL on indexed columns; only the rows of the requested page come back.
Quarantined instances never match and never count; a study or series whose every instance is
quarantined does not appear. The index's counters (``num_instances``...) include quarantined
instances, so visible counts subtract those held back, read from the partial index over the
(rare) quarantined rows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    case,
    exists,
    false,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.sql import Select

from storage.access import ConsultationSpecialist, ConsultationStudy
from storage.index import Index, Instance, Patient, Series, Study


class Level(StrEnum):
    """Query/Retrieve levels (PS3.4 C.3)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


@dataclass(frozen=True)
class Scope:
    """Whose studies a query may see; every given restriction applies.

    ``partner_id``: only the studies that partner sent (a partner over DIMSE, a partner's users);
    ``specialist_id``: only the studies of consultations assigned to that user;
    ``study_id``: only that one study (a share link). All None: every study (admins)."""

    partner_id: int | None
    specialist_id: int | None = None
    study_id: int | None = None


class QueryError(ValueError):
    """A query key or value this layer cannot match; the message names the key (never its value,
    which may be identifying)."""


@dataclass(frozen=True)
class StoredInstance:
    """What a retrieve sends for one instance: where its object is and how it is encoded."""

    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    study_uid: str
    series_uid: str
    object_key: str
    location: str
    size_bytes: int
    frames: int | None
    rows: int | None
    columns: int | None


# -- the keys -------------------------------------------------------------------------------------
# kind of matching per key: "pn" person name, "str" wildcard-capable string, "uid", "date", "time",
# "int", "mod" (ModalitiesInStudy)
_PATIENT_KEYS: dict[str, tuple[str, Any]] = {
    "PatientID": ("str", Patient.pseudonym),
    "PatientName": ("pn", Patient.pseudonym),
    "PatientSex": ("str", Patient.sex),
    "PatientBirthDate": ("date", Patient.birth_date),
}
_STUDY_KEYS: dict[str, tuple[str, Any]] = {
    "StudyInstanceUID": ("uid", Study.study_uid),
    "StudyDate": ("date", Study.study_date),
    "StudyTime": ("time", Study.study_time),
    "AccessionNumber": ("str", Study.accession),
    "StudyID": ("str", Study.study_id),
    "StudyDescription": ("str", Study.description),
    "ModalitiesInStudy": ("mod", None),
}
_SERIES_KEYS: dict[str, tuple[str, Any]] = {
    "SeriesInstanceUID": ("uid", Series.series_uid),
    "Modality": ("str", Series.modality),
    "SeriesNumber": ("int", Series.series_number),
    "SeriesDescription": ("str", Series.description),
    "BodyPartExamined": ("str", Series.body_part),
}
_IMAGE_KEYS: dict[str, tuple[str, Any]] = {
    "SOPInstanceUID": ("uid", Instance.sop_uid),
    "SOPClassUID": ("uid", Instance.sop_class_uid),
    "InstanceNumber": ("int", Instance.instance_number),
    "Rows": ("int", Instance.rows),
    "Columns": ("int", Instance.columns),
    "NumberOfFrames": ("int", Instance.frames),
}

_KEYS_BY_LEVEL: dict[Level, dict[str, tuple[str, Any]]] = {
    Level.PATIENT: dict(_PATIENT_KEYS),
    Level.STUDY: {**_PATIENT_KEYS, **_STUDY_KEYS},
    Level.SERIES: {**_PATIENT_KEYS, **_STUDY_KEYS, **_SERIES_KEYS},
    Level.IMAGE: {**_PATIENT_KEYS, **_STUDY_KEYS, **_SERIES_KEYS, **_IMAGE_KEYS},
}

SUPPORTED_KEYS: dict[Level, frozenset[str]] = {level: frozenset(keys) for level, keys in _KEYS_BY_LEVEL.items()}
"""The matching keys per level. A level accepts its own keys and those of the levels above
(relational matching, which QIDO-RS needs and hierarchical C-FIND tolerates)."""

# keys that carry no matching and are accepted anywhere (a C-FIND identifier has them)
_IGNORED_KEYS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "TimezoneOffsetFromUTC"})

_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


# -- visibility (quarantine) -----------------------------------------------------------------------
def _held_per_series():  # type: ignore[no-untyped-def]
    """(series_id, n) of quarantined instances: reads the partial index on quarantined rows."""
    # Grouping by ``series_id + 0`` rather than the column keeps SQLite from walking the whole
    # series_id index to satisfy the GROUP BY (every instance row: 35 ms at 100,000 instances);
    # it then reads only the partial index of quarantined rows (0.06 ms). PostgreSQL is unaffected.
    sid = (Instance.series_id + 0).label("series_id")
    return (
        select(sid, func.count(Instance.id).label("n"))
        .where(Instance.quarantine.is_not(None))
        .group_by(sid)
        .subquery()
    )


def _held_per_study():  # type: ignore[no-untyped-def]
    """(study_id, n held, n dead series) where dead series have every instance quarantined."""
    held = _held_per_series()
    return (
        select(
            Series.study_id.label("study_id"),
            func.sum(held.c.n).label("n"),
            func.sum(case((held.c.n >= Series.num_instances, 1), else_=0)).label("dead"),
        )
        .join(held, held.c.series_id == Series.id)
        .group_by(Series.study_id)
        .subquery()
    )


def _dead_series_ids() -> Select:
    held = _held_per_series()
    return select(held.c.series_id).join(Series, Series.id == held.c.series_id).where(held.c.n >= Series.num_instances)


# -- value matching ---------------------------------------------------------------------------------
def _is_universal(value: str) -> bool:
    v = value.strip()
    return v == "" or set(v) == {"*"}


def _like_pattern(value: str) -> str:
    """DICOM wildcards to a LIKE pattern with backslash as escape character."""
    out = []
    for ch in value:
        if ch in "\\%_":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def _glob_pattern(value: str) -> str:
    """DICOM wildcards to a SQLite GLOB pattern (case-sensitive, unlike SQLite's LIKE)."""
    return "".join("[[]" if ch == "[" else ch for ch in value)


def _wildcard(col: Any, value: str, sqlite: bool) -> ColumnElement[bool]:
    if "*" not in value and "?" not in value:
        return col == value
    if sqlite:
        return col.op("GLOB")(_glob_pattern(value))
    return col.like(_like_pattern(value), escape="\\")


def _fuzzy_pn(col: Any, value: str) -> ColumnElement[bool]:
    """Case-insensitive; the value may match the start of the name or of any of its components."""
    pat = _like_pattern(value.lower())
    if not pat.endswith("%"):
        pat += "%"
    low = func.lower(col)
    return or_(
        low.like(pat, escape="\\"),
        low.like("%^" + pat, escape="\\"),
        low.like("% " + pat, escape="\\"),
        low.like("%=" + pat, escape="\\"),
    )


def _split_range(key: str, value: str) -> tuple[str | None, str | None] | None:
    """(lower, upper) of a range value, None if it is a single value."""
    if "-" not in value:
        return None
    if value.count("-") != 1:
        raise QueryError(f"{key}: a range has the form a-b, a- or -b")
    lo, hi = (p.strip() for p in value.split("-"))
    if not lo and not hi:
        raise QueryError(f"{key}: a range needs at least one bound")
    return lo or None, hi or None


def _check(key: str, pattern: re.Pattern[str], v: str | None, what: str) -> None:
    if v is not None and not pattern.match(v):
        raise QueryError(f"{key}: expected a {what}")


def _time_upper(t: str) -> str:
    """The last instant a partial time covers, for lexical comparison: 18 -> 185959.999999,
    1800 -> 180059.999999, 180000.5 -> 180000.599999."""
    whole, _, frac = t.partition(".")
    whole += "5959"[len(whole) - 2 :] if len(whole) < 6 else ""
    return whole + "." + frac + "9" * (6 - len(frac))


def _date_cond(key: str, col: Any, value: str) -> ColumnElement[bool]:
    rng = _split_range(key, value)
    if rng is None:
        _check(key, _DATE, value, "date YYYYMMDD")
        return col == value
    lo, hi = rng
    _check(key, _DATE, lo, "date range YYYYMMDD-YYYYMMDD")
    _check(key, _DATE, hi, "date range YYYYMMDD-YYYYMMDD")
    conds = []
    if lo:
        conds.append(col >= lo)
    if hi:
        conds.append(col <= hi)
    return and_(*conds)


def _time_cond(key: str, col: Any, value: str) -> ColumnElement[bool]:
    rng = _split_range(key, value)
    if rng is None:
        _check(key, _TIME, value, "time HHMMSS")
        return col.like(_like_pattern(value) + "%", escape="\\")  # 1015 matches 101530
    lo, hi = rng
    _check(key, _TIME, lo, "time range HHMMSS-HHMMSS")
    _check(key, _TIME, hi, "time range HHMMSS-HHMMSS")
    conds = []
    if lo:
        conds.append(col >= lo)
    if hi:
        conds.append(col <= _time_upper(hi))
    return and_(*conds)


def _combined_datetime(date_value: str, time_value: str) -> ColumnElement[bool] | None:
    """StudyDate and StudyTime both ranges: one date-time range (PS3.4 C.2.2.2.5.1)."""
    drng = _split_range("StudyDate", date_value)
    trng = _split_range("StudyTime", time_value)
    if drng is None or trng is None:
        return None
    (dlo, dhi), (tlo, thi) = drng, trng
    for d in (dlo, dhi):
        _check("StudyDate", _DATE, d, "date range YYYYMMDD-YYYYMMDD")
    for t in (tlo, thi):
        _check("StudyTime", _TIME, t, "time range HHMMSS-HHMMSS")
    date, time = Study.study_date, func.coalesce(Study.study_time, "")
    conds: list[ColumnElement[bool]] = []
    # a time bound without a date on its side is open-ended across days, so it adds nothing
    if dlo:
        conds.append(or_(date > dlo, and_(date == dlo, time >= (tlo or ""))))
    if dhi:
        conds.append(or_(date < dhi, and_(date == dhi, time <= (_time_upper(thi) if thi else "~"))))
    if not conds:
        return None
    return and_(*conds)


def _uid_list(key: str, value: str) -> list[str]:
    uids = [u.strip() for u in re.split(r"[\\,]", value) if u.strip()]
    for u in uids:
        if len(u) > 64 or not re.match(r"^[0-9.]+$", u):
            raise QueryError(f"{key}: expected UIDs (digits and dots, separated by \\ or ,)")
    if not uids:
        raise QueryError(f"{key}: expected at least one UID")
    return uids


def _condition(
    key: str, kind: str, col: Any, value: str, *, fuzzy: bool, sqlite: bool
) -> ColumnElement[bool]:
    if kind == "uid":
        uids = _uid_list(key, value)
        return col == uids[0] if len(uids) == 1 else col.in_(uids)
    if kind == "date":
        return _date_cond(key, col, value)
    if kind == "time":
        return _time_cond(key, col, value)
    if kind == "int":
        try:
            return col == int(value)
        except ValueError:
            raise QueryError(f"{key}: expected an integer") from None
    if kind == "pn" and fuzzy:
        return _fuzzy_pn(col, value)
    if kind in ("str", "pn"):
        return _wildcard(col, value, sqlite)
    raise AssertionError(kind)


def _modalities_cond(value: str, sqlite: bool) -> ColumnElement[bool]:
    mods = [m.strip() for m in value.split("\\") if m.strip()]
    if not mods:
        return literal(True)
    match = or_(*(_wildcard(Series.modality, m, sqlite) for m in mods))
    return exists(
        select(Series.id).where(Series.study_id == Study.id, match, Series.id.not_in(_dead_series_ids()))
    )


def _filters(
    level: Level, query: Mapping[str, str], *, fuzzy: bool, sqlite: bool
) -> list[ColumnElement[bool]]:
    keys = _KEYS_BY_LEVEL[level]
    values: dict[str, str] = {}
    for key, raw in query.items():
        value = "" if raw is None else str(raw)
        if key in _IGNORED_KEYS:
            continue
        if key not in keys:
            if _is_universal(value):
                continue  # a return key this level does not hold: the door answers it empty
            raise QueryError(f"{key} cannot be matched at the {level.value} level")
        if not _is_universal(value):
            values[key] = value.strip()
    conds: list[ColumnElement[bool]] = []
    if "StudyDate" in values and "StudyTime" in values:
        combined = _combined_datetime(values["StudyDate"], values["StudyTime"])
        if combined is not None:
            conds.append(combined)
            del values["StudyDate"], values["StudyTime"]
    for key, value in values.items():
        kind, col = keys[key]
        if kind == "mod":
            conds.append(_modalities_cond(value, sqlite))
        else:
            conds.append(_condition(key, kind, col, value, fuzzy=fuzzy, sqlite=sqlite))
    return conds


# -- the searches --------------------------------------------------------------------------------------
def _patient_attrs(pseudonym: str, sex: str | None, birth: str | None) -> dict[str, Any]:
    return {"PatientID": pseudonym, "PatientName": pseudonym, "PatientSex": sex, "PatientBirthDate": birth}


def _study_attrs(st: Study) -> dict[str, Any]:
    return {
        "StudyInstanceUID": st.study_uid,
        "StudyDate": st.study_date,
        "StudyTime": st.study_time,
        "AccessionNumber": st.accession,
        "StudyID": st.study_id,
        "StudyDescription": st.description,
    }


def _series_attrs(se: Series) -> dict[str, Any]:
    return {
        "SeriesInstanceUID": se.series_uid,
        "Modality": se.modality,
        "SeriesNumber": se.series_number,
        "SeriesDescription": se.description,
        "BodyPartExamined": se.body_part,
    }


def _bytewise(col: Any, sqlite: bool) -> Any:
    """Order strings by code point on both backends (SQLite's BINARY; PostgreSQL's "C", whatever
    the database's locale), so a page holds the same rows whichever database answers."""
    return col if sqlite else col.collate("C")


def _study_order(sqlite: bool) -> list[Any]:
    return [
        _bytewise(Study.study_date, sqlite).desc().nulls_last(),
        _bytewise(Study.study_time, sqlite).desc().nulls_last(),
        _bytewise(Study.study_uid, sqlite),
    ]


def _series_order(sqlite: bool) -> list[Any]:
    return [Series.series_number.asc().nulls_last(), _bytewise(Series.series_uid, sqlite)]


def _instance_order(sqlite: bool) -> list[Any]:
    return [Instance.instance_number.asc().nulls_last(), _bytewise(Instance.sop_uid, sqlite)]


def search(
    index: Index,
    level: Level,
    query: Mapping[str, str],
    scope: Scope,
    *,
    fuzzy: bool = False,
    limit: int | None = None,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Match ``query`` (DICOM keyword -> value, PS3.4 C.2.2.2) at ``level`` within ``scope``.

    Returns one dict per match (keyword -> value; None where the index holds nothing) with every
    attribute the index holds for that level and above, plus the computed counts of PS3.4 C.3
    (NumberOf...Related..., ModalitiesInStudy, SOPClassesInStudy). Sorted stably (newest study
    first, then UIDs; series and instances by number) so ``limit``/``offset`` page consistently.
    Raises QueryError for a key or value that cannot be matched."""
    level = Level(level)
    if offset < 0 or (limit is not None and limit < 0):
        raise QueryError("limit and offset must not be negative")
    conds = _filters(level, query, fuzzy=fuzzy, sqlite=index.is_sqlite)
    if limit == 0:
        return []
    if level is Level.PATIENT:
        return _search_patients(index, conds, scope, limit, offset)
    if level is Level.STUDY:
        return _search_studies(index, conds, scope, limit, offset)
    if level is Level.SERIES:
        return _search_series(index, conds, scope, limit, offset)
    return _search_instances(index, conds, scope, limit, offset)


def scoped(q: Select, scope: Scope) -> Select:
    """``q`` (a select joining Study) narrowed to the studies ``scope`` may see."""
    if scope.partner_id is not None:
        q = q.where(Study.partner_id == scope.partner_id)
    if scope.study_id is not None:
        q = q.where(Study.id == scope.study_id)
    if scope.specialist_id is not None:
        assigned = (
            select(ConsultationStudy.study_id)
            .join(
                ConsultationSpecialist,
                ConsultationSpecialist.consultation_id == ConsultationStudy.consultation_id,
            )
            .where(ConsultationSpecialist.user_id == scope.specialist_id)
        )
        q = q.where(Study.id.in_(assigned))
    return q


def _page(q: Select, limit: int | None, offset: int) -> Select:
    if limit is not None:
        q = q.limit(limit)
    if offset:
        q = q.offset(offset)
    return q


def _search_patients(index: Index, conds: list, scope: Scope, limit: int | None, offset: int) -> list[dict[str, Any]]:
    held = _held_per_study()
    n_vis = Study.num_instances - func.coalesce(held.c.n, 0)
    ser_vis = Study.num_series - func.coalesce(held.c.dead, 0)
    q = (
        select(
            Patient.pseudonym,
            Patient.sex,
            Patient.birth_date,
            func.count(Study.id),
            func.sum(ser_vis),
            func.sum(n_vis),
        )
        .join(Study, Study.patient_id == Patient.id)
        .outerjoin(held, held.c.study_id == Study.id)
        .where(n_vis > 0, *conds)
        .group_by(Patient.id, Patient.pseudonym, Patient.sex, Patient.birth_date, Patient.partner_id)
        .order_by(_bytewise(Patient.pseudonym, index.is_sqlite), Patient.partner_id)
    )
    q = _page(scoped(q, scope), limit, offset)
    with index.read() as s:
        rows = s.execute(q).all()
    out = []
    for pseudonym, sex, birth, n_studies, n_series, n_inst in rows:
        d = _patient_attrs(pseudonym, sex, birth)
        d["NumberOfPatientRelatedStudies"] = int(n_studies)
        d["NumberOfPatientRelatedSeries"] = int(n_series or 0)
        d["NumberOfPatientRelatedInstances"] = int(n_inst or 0)
        out.append(d)
    return out


def _search_studies(index: Index, conds: list, scope: Scope, limit: int | None, offset: int) -> list[dict[str, Any]]:
    held = _held_per_study()
    n_vis = Study.num_instances - func.coalesce(held.c.n, 0)
    ser_vis = Study.num_series - func.coalesce(held.c.dead, 0)
    q = (
        select(Study, Patient.pseudonym, Patient.sex, Patient.birth_date, n_vis, ser_vis)
        .join(Patient, Study.patient_id == Patient.id)
        .outerjoin(held, held.c.study_id == Study.id)
        .where(n_vis > 0, *conds)
        .order_by(*_study_order(index.is_sqlite))
    )
    q = _page(scoped(q, scope), limit, offset)
    with index.read() as s:
        rows = s.execute(q).all()
        ids = [r[0].id for r in rows]
        mods: dict[int, set[str]] = {i: set() for i in ids}
        classes: dict[int, set[str]] = {i: set() for i in ids}
        if ids:
            for sid, mod in s.execute(
                select(Series.study_id, Series.modality)
                .where(Series.study_id.in_(ids), Series.modality.is_not(None), Series.id.not_in(_dead_series_ids()))
                .distinct()
            ):
                mods[sid].add(mod)
            for sid, cls in s.execute(
                select(Series.study_id, Instance.sop_class_uid)
                .join(Instance, Instance.series_id == Series.id)
                .where(Series.study_id.in_(ids), Instance.quarantine.is_(None))
                .distinct()
            ):
                classes[sid].add(cls)
    out = []
    for st, pseudonym, sex, birth, n_inst, n_series in rows:
        d = _patient_attrs(pseudonym, sex, birth)
        d.update(_study_attrs(st))
        d["ModalitiesInStudy"] = sorted(mods[st.id])
        d["SOPClassesInStudy"] = sorted(classes[st.id])
        d["NumberOfStudyRelatedSeries"] = int(n_series)
        d["NumberOfStudyRelatedInstances"] = int(n_inst)
        out.append(d)
    return out


def _search_series(index: Index, conds: list, scope: Scope, limit: int | None, offset: int) -> list[dict[str, Any]]:
    held = _held_per_series()
    n_vis = Series.num_instances - func.coalesce(held.c.n, 0)
    q = (
        select(Series, Study, Patient.pseudonym, Patient.sex, Patient.birth_date, n_vis)
        .join(Study, Series.study_id == Study.id)
        .join(Patient, Study.patient_id == Patient.id)
        .outerjoin(held, held.c.series_id == Series.id)
        .where(n_vis > 0, *conds)
        .order_by(*_study_order(index.is_sqlite), *_series_order(index.is_sqlite))
    )
    q = _page(scoped(q, scope), limit, offset)
    with index.read() as s:
        rows = s.execute(q).all()
    out = []
    for se, st, pseudonym, sex, birth, n_inst in rows:
        d = _patient_attrs(pseudonym, sex, birth)
        d.update(_study_attrs(st))
        d.update(_series_attrs(se))
        d["NumberOfSeriesRelatedInstances"] = int(n_inst)
        out.append(d)
    return out


def _search_instances(index: Index, conds: list, scope: Scope, limit: int | None, offset: int) -> list[dict[str, Any]]:
    q = (
        select(Instance, Series, Study, Patient.pseudonym, Patient.sex, Patient.birth_date)
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .join(Patient, Study.patient_id == Patient.id)
        .where(Instance.quarantine.is_(None), *conds)
        .order_by(*_study_order(index.is_sqlite), *_series_order(index.is_sqlite), *_instance_order(index.is_sqlite))
    )
    q = _page(scoped(q, scope), limit, offset)
    with index.read() as s:
        rows = s.execute(q).all()
    out = []
    for inst, se, st, pseudonym, sex, birth in rows:
        d = _patient_attrs(pseudonym, sex, birth)
        d.update(_study_attrs(st))
        d.update(_series_attrs(se))
        d.update(
            {
                "SOPInstanceUID": inst.sop_uid,
                "SOPClassUID": inst.sop_class_uid,
                "InstanceNumber": inst.instance_number,
                "Rows": inst.rows,
                "Columns": inst.columns,
                "NumberOfFrames": inst.frames,
                "AvailableTransferSyntaxUID": inst.transfer_syntax,
            }
        )
        out.append(d)
    return out


# -- retrieves -------------------------------------------------------------------------------------------
def instances(
    index: Index,
    scope: Scope,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uids: Sequence[str] | None = None,
) -> list[StoredInstance]:
    """The instances a retrieve sends (WADO-RS PS3.18 10.4, C-MOVE PS3.4 C.4.2, C-GET C.4.3):
    those of the study, series or listed SOP instances, visible (not quarantined) and within
    ``scope``, ordered by series then instance number. At least one selector must be given."""
    if study_uid is None and series_uid is None and sop_uids is None:
        raise QueryError("a retrieve names a study, a series or instances")
    q = (
        select(
            Instance.sop_uid,
            Instance.sop_class_uid,
            Instance.transfer_syntax,
            Study.study_uid,
            Series.series_uid,
            Instance.object_key,
            Instance.location,
            Instance.size_bytes,
            Instance.frames,
            Instance.rows,
            Instance.columns,
        )
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .where(Instance.quarantine.is_(None))
    )
    if study_uid is not None:
        q = q.where(Study.study_uid == study_uid)
    if series_uid is not None:
        q = q.where(Series.series_uid == series_uid)
    if sop_uids is not None:
        uids = list(sop_uids)
        q = q.where(Instance.sop_uid.in_(uids) if uids else false())
    q = scoped(q, scope).order_by(_bytewise(Study.study_uid, index.is_sqlite), *_series_order(index.is_sqlite), *_instance_order(index.is_sqlite))
    with index.read() as s:
        return [StoredInstance(*row) for row in s.execute(q)]
