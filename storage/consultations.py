"""Consultations, the worklist and the study list: rows and the rules that keep them consistent.

A consultation is one partner's request for an opinion on one pseudonymous patient's studies:
the studies must all come from that partner and that patient. Its status moves

    requested -> images_complete -> in_review -> answered

(see :data:`TRANSITIONS`); ``answered`` needs a written opinion, and recording an opinion answers
it. A requested consultation whose images are ready moves to ``images_complete`` by itself, when
it is next read.

Images are *ready* (``images_ready``) when every study of the consultation has at least one
visible (not quarantined) instance and no visible instance still waits in the preview queue
(``preview_status`` NULL): by then thumbnails, previews and WADO-RS metadata exist, so a viewer
opens every series at once. An instance found unrenderable counts as settled.

Who reads what (the routes decide who may write):

- admins: every consultation and study;
- a partner's users: their partner's consultations and studies;
- specialists: the consultations assigned to them (every one when granted ``all_studies``).

Times are naive UTC in the index (``scheduled_at``); ``time_zone`` is the IANA zone the
consultation was requested in. Storage formats nothing: the routes do (viewer/i18n_server.py).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import and_, delete, exists, func, insert, or_, select, update
from sqlalchemy.sql import Select

from storage.access import (
    CONSULTATION_STATUSES,
    Consultation,
    ConsultationSpecialist,
    ConsultationStudy,
    User,
)
from storage.index import Index, Instance, Partner, Patient, Series, Study, utcnow
from storage.query import Scope, scoped

DEFAULT_ZONE = "Asia/Urumqi"
QUESTION_MAX = 4000
OPINION_MAX = 20000
MAX_STUDIES = 50
PAGE_MAX = 500

TRANSITIONS: dict[str, frozenset[str]] = {
    "requested": frozenset({"images_complete", "in_review"}),
    "images_complete": frozenset({"requested", "in_review"}),
    "in_review": frozenset({"images_complete", "answered"}),
    "answered": frozenset({"in_review"}),  # reopened to revise the opinion
}
"""Allowed moves of a consultation's status (the key to any of its values)."""


class ConsultationError(ValueError):
    """A request that cannot be carried out as asked; the message says why, in plain words."""


class NotFound(LookupError):
    """No such consultation or study, or none the caller may see."""


class Reader(Protocol):
    """Who reads: ``viewer.auth.Principal`` fits."""

    user_id: int | None
    role: str
    partner_id: int | None
    all_studies: bool


@dataclass(frozen=True)
class StudySummary:
    id: int
    study_uid: str
    partner_id: int
    patient_id: int
    date: str | None
    time: str | None
    description: str | None
    modalities: list[str]
    num_series: int
    num_instances: int  # visible


# -- who sees what ---------------------------------------------------------------------------------
def _visible_consultations(q: Select, who: Reader) -> Select:
    if who.role == "admin":
        return q
    if who.role == "partner" and who.partner_id is not None:
        return q.where(Consultation.partner_id == who.partner_id)
    if who.role == "specialist" and who.user_id is not None:
        if who.all_studies:
            return q
        assigned = select(ConsultationSpecialist.consultation_id).where(
            ConsultationSpecialist.user_id == who.user_id
        )
        return q.where(Consultation.id.in_(assigned))
    return q.where(Consultation.id.is_(None))  # anyone else (a share link) sees none


def _held_per_study():  # type: ignore[no-untyped-def]
    """(study_id, n) of quarantined instances; reads the partial index over quarantined rows."""
    return (
        select(Series.study_id.label("study_id"), func.count(Instance.id).label("n"))
        .join(Instance, Instance.series_id == Series.id)
        .where(Instance.quarantine.is_not(None))
        .group_by(Series.study_id)
        .subquery()
    )


def _modalities(value: str | None) -> list[str]:
    return [m for m in (value or "").split("\\") if m]


class Consultations:
    """Reads and writes of consultations and the study lists, over the index."""

    def __init__(self, index: Index) -> None:
        self.index = index

    # -- studies -----------------------------------------------------------------------------------
    def _studies(
        self, s: Any, where: Iterable[Any], scope: Scope | None = None
    ) -> list[StudySummary]:
        held = _held_per_study()
        n_vis = Study.num_instances - func.coalesce(held.c.n, 0)
        q = (
            select(Study, n_vis)
            .outerjoin(held, held.c.study_id == Study.id)
            .where(n_vis > 0, *where)
            .order_by(Study.study_date.desc().nulls_last(), Study.id.desc())
        )
        if scope is not None:
            q = scoped(q, scope)
        return [
            StudySummary(
                id=st.id,
                study_uid=st.study_uid,
                partner_id=st.partner_id,
                patient_id=st.patient_id,
                date=st.study_date,
                time=st.study_time,
                description=st.description,
                modalities=_modalities(st.modalities),
                num_series=st.num_series,
                num_instances=int(n),
            )
            for st, n in s.execute(q).all()
        ]

    def study_list(
        self,
        scope: Scope,
        *,
        partner: str | None = None,
        modality: str | None = None,
        text: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Studies within ``scope``, newest received first, without those whose every instance
        is quarantined. ``partner``: its name; ``modality``: studies with a series of it;
        ``text``: part of the pseudonym, accession, description or study UID (any case).
        Counts include quarantined instances; ``quarantined`` says how many of them there are."""
        held = _held_per_study()
        n_held = func.coalesce(held.c.n, 0)
        q = (
            select(Study, Patient.pseudonym, Patient.sex, Partner.name, n_held)
            .join(Patient, Study.patient_id == Patient.id)
            .join(Partner, Study.partner_id == Partner.id)
            .outerjoin(held, held.c.study_id == Study.id)
            .where(n_held < Study.num_instances)
        )
        if partner:
            q = q.where(Partner.name == partner)
        if modality:
            q = q.where(
                exists(
                    select(Series.id).where(
                        Series.study_id == Study.id, Series.modality == modality.upper()
                    )
                )
            )
        if text:
            pat = (
                "%"
                + text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                + "%"
            )
            q = q.where(
                or_(
                    *(
                        func.lower(col).like(pat, escape="\\")
                        for col in (
                            Patient.pseudonym,
                            Study.accession,
                            Study.description,
                            Study.study_uid,
                        )
                    )
                )
            )
        q = (
            scoped(q, scope)
            .order_by(Study.received_at.desc(), Study.id.desc())
            .limit(limit)
            .offset(offset)
        )
        with self.index.read() as s:
            rows = s.execute(q).all()
        return [
            {
                "study_uid": st.study_uid,
                "patient": pseudonym,
                "patient_sex": sex,
                "partner": partner_name,
                "study_date": st.study_date,
                "study_time": st.study_time,
                "accession": st.accession,
                "description": st.description,
                "modalities": _modalities(st.modalities),
                "num_series": st.num_series,
                "num_instances": st.num_instances,
                "size_bytes": st.size_bytes,
                "received_at": st.received_at.isoformat() + "Z",
                "quarantined": int(n),
            }
            for st, pseudonym, sex, partner_name, n in rows
        ]

    def study(self, study_uid: str, scope: Scope) -> dict[str, Any]:
        """One visible study within ``scope`` with its patient (pseudonymous), partner and visible
        series (ordered by number). Raises NotFound."""
        with self.index.read() as s:
            found = self._studies(s, [Study.study_uid == study_uid], scope)
            if not found:
                raise NotFound("no such study")
            st = found[0]
            patient = s.get(Patient, st.patient_id)
            partner = s.get(Partner, st.partner_id)
            held = (
                select(Instance.series_id.label("series_id"), func.count(Instance.id).label("n"))
                .where(Instance.quarantine.is_not(None))
                .group_by(Instance.series_id)
                .subquery()
            )
            n_vis = Series.num_instances - func.coalesce(held.c.n, 0)
            series = s.execute(
                select(Series, n_vis)
                .outerjoin(held, held.c.series_id == Series.id)
                .where(Series.study_id == st.id, n_vis > 0)
                .order_by(Series.series_number.asc().nulls_last(), Series.series_uid)
            ).all()
        assert patient is not None and partner is not None
        return {
            "study": st,
            "patient": {
                "pseudonym": patient.pseudonym,
                "sex": patient.sex,
                "birth_date": patient.birth_date,
            },
            "partner": {"name": partner.name, "time_zone": partner.time_zone or DEFAULT_ZONE},
            "series": [
                {
                    "series_uid": se.series_uid,
                    "modality": se.modality,
                    "number": se.series_number,
                    "description": se.description,
                    "body_part": se.body_part,
                    "num_instances": int(n),
                }
                for se, n in series
            ],
        }

    def priors(self, study_uid: str, scope: Scope) -> list[StudySummary]:
        """The other visible studies of the same (pseudonymous) patient within ``scope``, newest
        first. Raises NotFound if the study itself is not visible in ``scope``."""
        with self.index.read() as s:
            found = self._studies(s, [Study.study_uid == study_uid], scope)
            if not found:
                raise NotFound("no such study")
            st = found[0]
            return self._studies(s, [Study.patient_id == st.patient_id, Study.id != st.id], scope)

    def images_ready(self, study_ids: Sequence[int]) -> dict[int, bool]:
        """For each study id: has visible instances and none of them waits for its preview."""
        ids = list(set(study_ids))
        if not ids:
            return {}
        with self.index.read() as s:
            visible = {
                sid: n > 0
                for sid, n in (
                    (x.id, x.num_instances) for x in self._studies(s, [Study.id.in_(ids)])
                )
            }
            pending = set(
                s.scalars(
                    select(Series.study_id)
                    .join(Instance, Instance.series_id == Series.id)
                    .where(
                        Series.study_id.in_(ids),
                        Instance.preview_status.is_(None),
                        Instance.quarantine.is_(None),
                    )
                    .distinct()
                )
            )
        return {sid: visible.get(sid, False) and sid not in pending for sid in ids}

    # -- consultations: writes ---------------------------------------------------------------------
    def create(
        self,
        *,
        study_uids: Sequence[str],
        question: str,
        scheduled_at: dt.datetime | None,
        time_zone: str | None,
        created_by: int | None,
        scope: Scope,
    ) -> int:
        """A new consultation on ``study_uids`` (visible within ``scope``: a partner user's scope
        is their partner), all of one partner and one patient. ``scheduled_at`` naive UTC;
        ``time_zone`` defaults to the partner's. Returns its id. Raises ConsultationError."""
        uids = list(dict.fromkeys(u.strip() for u in study_uids if u and u.strip()))
        if not uids:
            raise ConsultationError("name at least one study")
        if len(uids) > MAX_STUDIES:
            raise ConsultationError(f"a consultation takes at most {MAX_STUDIES} studies")
        question = (question or "").strip()
        if not question:
            raise ConsultationError("write the clinical question")
        if len(question) > QUESTION_MAX:
            raise ConsultationError(
                f"the clinical question is longer than {QUESTION_MAX} characters"
            )
        with self.index.write() as s:
            studies = self._studies(s, [Study.study_uid.in_(uids)], scope)
            if len(studies) != len(uids):
                raise ConsultationError("a study was not found (or has no visible images yet)")
            if len({st.partner_id for st in studies}) != 1:
                raise ConsultationError("the studies come from more than one partner hospital")
            if len({st.patient_id for st in studies}) != 1:
                raise ConsultationError("the studies belong to more than one patient")
            partner = s.get(Partner, studies[0].partner_id)
            assert partner is not None
            now = utcnow()
            c = Consultation(
                partner_id=partner.id,
                patient_id=studies[0].patient_id,
                question=question,
                scheduled_at=scheduled_at,
                time_zone=time_zone or partner.time_zone or DEFAULT_ZONE,
                status="requested",
                created_by=created_by,
                created_at=now,
                updated_at=now,
            )
            s.add(c)
            s.flush()
            s.execute(
                insert(ConsultationStudy),
                [{"consultation_id": c.id, "study_id": st.id} for st in studies],
            )
            return c.id

    def _row(self, s: Any, cid: int) -> Consultation:
        c = s.get(Consultation, cid)
        if c is None:
            raise NotFound("no such consultation")
        return c

    def add_study(self, cid: int, study_uid: str) -> None:
        """Add a study of the same partner and patient. A consultation whose images were complete
        goes back to ``requested`` until the new study's are ready. Raises ConsultationError."""
        with self.index.write() as s:
            c = self._row(s, cid)
            found = self._studies(s, [Study.study_uid == study_uid], Scope(c.partner_id))
            if not found or found[0].patient_id != c.patient_id:
                raise ConsultationError("the study is not one of this patient's at this partner")
            st = found[0]
            if s.get(ConsultationStudy, (cid, st.id)) is None:
                s.add(ConsultationStudy(consultation_id=cid, study_id=st.id))
                if c.status == "images_complete":
                    c.status = "requested"
                c.updated_at = utcnow()

    def remove_study(self, cid: int, study_uid: str) -> None:
        """Take a study out; the last one cannot be. Raises ConsultationError."""
        with self.index.write() as s:
            c = self._row(s, cid)
            sid = s.scalar(select(Study.id).where(Study.study_uid == study_uid))
            linked = s.scalars(
                select(ConsultationStudy.study_id).where(ConsultationStudy.consultation_id == cid)
            ).all()
            if sid is None or sid not in linked:
                raise ConsultationError("the study is not part of this consultation")
            if len(linked) == 1:
                raise ConsultationError("a consultation keeps at least one study")
            s.execute(
                delete(ConsultationStudy).where(
                    ConsultationStudy.consultation_id == cid, ConsultationStudy.study_id == sid
                )
            )
            c.updated_at = utcnow()

    def assign(self, cid: int, names: Sequence[str]) -> list[str]:
        """Make ``names`` (active users with the specialist role) the assigned specialists,
        replacing those before. Returns the names, sorted. Raises ConsultationError."""
        wanted = sorted(set(n.strip() for n in names if n and n.strip()))
        with self.index.write() as s:
            c = self._row(s, cid)
            users = s.scalars(select(User).where(User.name.in_(wanted))).all() if wanted else []
            ok = {u.name: u for u in users if u.role == "specialist" and u.active}
            missing = [n for n in wanted if n not in ok]
            if missing:
                raise ConsultationError(f"not an active specialist: {', '.join(missing)}")
            s.execute(
                delete(ConsultationSpecialist).where(ConsultationSpecialist.consultation_id == cid)
            )
            if ok:
                s.execute(
                    insert(ConsultationSpecialist),
                    [{"consultation_id": cid, "user_id": u.id} for u in ok.values()],
                )
            c.updated_at = utcnow()
        return wanted

    def set_status(self, cid: int, status: str) -> tuple[str, str]:
        """Move to ``status`` along :data:`TRANSITIONS`; ``answered`` only with an opinion.
        Returns (old, new). Raises ConsultationError."""
        if status not in CONSULTATION_STATUSES:
            raise ConsultationError(f"unknown status; one of {', '.join(CONSULTATION_STATUSES)}")
        with self.index.write() as s:
            c = self._row(s, cid)
            old = c.status
            if status == old:
                return old, old
            if status not in TRANSITIONS.get(old, frozenset()):
                raise ConsultationError(f"a consultation cannot go from {old} to {status}")
            if status == "answered" and not (c.opinion or "").strip():
                raise ConsultationError("write the opinion first: it answers the consultation")
            if status == "images_complete":
                ready = self._ready_in(s, [cid]).get(cid, False)
                if not ready:
                    raise ConsultationError("the images are not all ready yet")
            c.status = status
            c.updated_at = utcnow()
            return old, status

    def record_opinion(self, cid: int, text: str, user_id: int | None) -> None:
        """Record the specialist's written opinion; the consultation is then answered."""
        text = (text or "").strip()
        if not text:
            raise ConsultationError("the opinion is empty")
        if len(text) > OPINION_MAX:
            raise ConsultationError(f"the opinion is longer than {OPINION_MAX} characters")
        with self.index.write() as s:
            c = self._row(s, cid)
            now = utcnow()
            c.opinion = text
            c.answered_at = now
            c.answered_by = user_id
            c.status = "answered"
            c.updated_at = now

    # -- consultations: reads ----------------------------------------------------------------------
    def _ready_in(self, s: Any, cids: Sequence[int]) -> dict[int, bool]:
        links = s.execute(
            select(ConsultationStudy.consultation_id, ConsultationStudy.study_id).where(
                ConsultationStudy.consultation_id.in_(list(cids))
            )
        ).all()
        ready = self.images_ready([sid for _, sid in links])
        out = {cid: True for cid in cids}
        for cid, sid in links:
            out[cid] = out[cid] and ready.get(sid, False)
        return out

    def visible(self, cid: int, who: Reader) -> bool:
        with self.index.read() as s:
            q = _visible_consultations(select(Consultation.id).where(Consultation.id == cid), who)
            return s.scalar(q) is not None

    def is_assigned(self, cid: int, user_id: int | None) -> bool:
        if user_id is None:
            return False
        with self.index.read() as s:
            return s.get(ConsultationSpecialist, (cid, user_id)) is not None

    def get(self, cid: int, who: Reader) -> dict[str, Any]:
        """One consultation the reader may see (as :meth:`list` items). Raises NotFound."""
        items, _ = self._load(who, [Consultation.id == cid], limit=1, offset=0)
        if not items:
            raise NotFound("no such consultation")
        return items[0]

    def list(
        self,
        who: Reader,
        *,
        status: Sequence[str] = (),
        partner: str | None = None,
        modality: str | None = None,
        scheduled_from: dt.datetime | None = None,
        scheduled_before: dt.datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[dict[str, Any]], int]:
        """The reader's consultations, soonest scheduled first (unscheduled last), filtered by
        status (any of), partner name, modality (a study with a visible series of it) and
        scheduled time (``scheduled_from`` <= t < ``scheduled_before``, naive UTC). Returns
        (page, total)."""
        for st in status:
            if st not in CONSULTATION_STATUSES:
                raise ConsultationError(
                    f"unknown status; one of {', '.join(CONSULTATION_STATUSES)}"
                )
        where: list[Any] = []
        if status:
            where.append(Consultation.status.in_(list(status)))
        if partner:
            where.append(
                Consultation.partner_id.in_(select(Partner.id).where(Partner.name == partner))
            )
        if modality:
            where.append(
                exists(
                    select(ConsultationStudy.study_id)
                    .join(Series, Series.study_id == ConsultationStudy.study_id)
                    .where(
                        ConsultationStudy.consultation_id == Consultation.id,
                        Series.modality == modality.strip().upper(),
                    )
                )
            )
        if scheduled_from is not None:
            where.append(Consultation.scheduled_at >= scheduled_from)
        if scheduled_before is not None:
            where.append(Consultation.scheduled_at < scheduled_before)
        return self._load(who, where, limit=limit, offset=offset)

    def _load(
        self, who: Reader, where: list[Any], *, limit: int, offset: int
    ) -> tuple[list[dict[str, Any]], int]:
        limit = max(0, min(limit, PAGE_MAX))
        base = _visible_consultations(select(Consultation.id).where(*where), who)
        with self.index.read() as s:
            total = int(s.scalar(select(func.count()).select_from(base.subquery())) or 0)
            rows = s.execute(
                _visible_consultations(
                    select(Consultation, Partner, Patient)
                    .join(Partner, Partner.id == Consultation.partner_id)
                    .join(Patient, Patient.id == Consultation.patient_id)
                    .where(*where),
                    who,
                )
                .order_by(Consultation.scheduled_at.asc().nulls_last(), Consultation.id.asc())
                .limit(limit)
                .offset(offset)
            ).all()
            cids = [c.id for c, _, _ in rows]
            links = s.execute(
                select(ConsultationStudy.consultation_id, ConsultationStudy.study_id).where(
                    ConsultationStudy.consultation_id.in_(cids)
                )
            ).all()
            study_ids = {sid for _, sid in links}
            studies = (
                {st.id: st for st in self._studies(s, [Study.id.in_(study_ids)])}
                if study_ids
                else {}
            )
            specialists: dict[int, list[str]] = {cid: [] for cid in cids}
            for cid, name in s.execute(
                select(ConsultationSpecialist.consultation_id, User.name)
                .join(User, User.id == ConsultationSpecialist.user_id)
                .where(ConsultationSpecialist.consultation_id.in_(cids))
                .order_by(User.name)
            ):
                specialists[cid].append(name)
            answered_by = {
                uid: name
                for uid, name in s.execute(
                    select(User.id, User.name).where(
                        User.id.in_([c.answered_by for c, _, _ in rows if c.answered_by])
                    )
                )
            }
        ready = self.images_ready(list(study_ids))
        by_c: dict[int, list[StudySummary]] = {cid: [] for cid in cids}
        for cid, sid in links:
            if sid in studies:  # a study wholly quarantined since is not shown
                by_c[cid].append(studies[sid])
        items = []
        to_complete = []
        for c, partner, patient in rows:
            mine = sorted(by_c[c.id], key=lambda st: (st.date or "", st.id), reverse=True)
            links_of = [sid for cid, sid in links if cid == c.id]
            is_ready = bool(links_of) and all(ready.get(sid, False) for sid in links_of)
            status = c.status
            if status == "requested" and is_ready:
                status = "images_complete"
                to_complete.append(c.id)
            items.append(
                {
                    "id": c.id,
                    "partner": {
                        "id": partner.id,
                        "name": partner.name,
                        "time_zone": partner.time_zone or DEFAULT_ZONE,
                    },
                    "patient": {
                        "pseudonym": patient.pseudonym,
                        "sex": patient.sex,
                        "birth_date": patient.birth_date,
                    },
                    "studies": mine,
                    "question": c.question,
                    "scheduled_at": c.scheduled_at,
                    "time_zone": c.time_zone,
                    "status": status,
                    "specialists": specialists[c.id],
                    "images_ready": is_ready,
                    "opinion": c.opinion,
                    "answered_at": c.answered_at,
                    "answered_by": answered_by.get(c.answered_by) if c.answered_by else None,
                    "created_at": c.created_at,
                    "updated_at": c.updated_at,
                }
            )
        if to_complete:
            self._complete(to_complete)
        return items, total

    def _complete(self, cids: list[int]) -> None:
        """requested -> images_complete for these (their images were found ready)."""
        with self.index.write() as s:
            s.execute(
                update(Consultation)
                .where(and_(Consultation.id.in_(cids), Consultation.status == "requested"))
                .values(status="images_complete", updated_at=utcnow())
            )
