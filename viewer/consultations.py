"""Routes of consultations, the worklist and the study lists (JSON; every route needs a caller).

    GET  /api/worklist?status=&partner=&modality=&from=&to=&limit=&offset=
    GET  /api/consultations/{id}                 + ``original`` for the sending partner's users
    POST /api/consultations                      {study_uids, question, scheduled_at, time_zone}
    POST /api/consultations/{id}/assign          {specialists: [names]}        (admin)
    POST /api/consultations/{id}/status          {status}
    POST /api/consultations/{id}/opinion         {text}     (an assigned specialist, or an admin)
    POST /api/consultations/{id}/studies         {study_uid}      add a study of the same patient
    DELETE /api/consultations/{id}/studies/{uid}
    GET  /api/studies?limit&offset&partner&modality&q     (the admin study list; scoped for others)
    GET  /api/studies/{uid}                      the study and its series, with thumbnail URLs
    GET  /api/studies/{uid}/priors               other studies of the same pseudonymous patient
    GET  /api/studies/{uid}/identity             originals (the sending partner's users; audited)
    GET  /api/partners                           names and time zones (for filters)

Who may: admins everything; a partner's users create and read their partner's consultations and
re-identify their own patients; specialists read the consultations assigned to them (all with
``all_studies``) and, when assigned, write opinions and move them to in review. A consultation
or study the caller may not see is answered 404, as if it did not exist.

Display strings (``display`` fields) are formatted here with Babel in the caller's locale and
zone (viewer/i18n_server.py); ``iso`` fields carry the same moment for programs.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field

from imx.ingest import Archive
from imx.reid import VaultIntegrityError
from storage.consultations import (
    DEFAULT_ZONE,
    ConsultationError,
    Consultations,
    NotFound,
    StudySummary,
)
from storage.index import Partner
from viewer.auth import CurrentUser, Principal, audit
from viewer.i18n_server import (
    Display,
    UnknownZone,
    check_zone,
    display_for,
    parse_moment,
    zone,
)

log = logging.getLogger("imx.http")

_GONE = "No consultation with that id that you can see."
_NO_STUDY = "No study with that UID that you can see."


class NewConsultation(BaseModel):
    study_uids: list[str] = Field(min_length=1, max_length=50)
    question: str = Field(min_length=1, max_length=4000)
    scheduled_at: str | None = Field(None, max_length=64)
    time_zone: str | None = Field(None, max_length=64)


class Assignment(BaseModel):
    specialists: list[str] = Field(max_length=50)


class StatusChange(BaseModel):
    status: str = Field(max_length=32)


class Opinion(BaseModel):
    text: str = Field(min_length=1, max_length=20000)


class StudyRef(BaseModel):
    study_uid: str = Field(min_length=1, max_length=64)


def _iso_utc(t: dt.datetime | None) -> str | None:
    return None if t is None else t.replace(tzinfo=dt.UTC).isoformat().replace("+00:00", "Z")


def _study_json(st: StudySummary, d: Display) -> dict[str, Any]:
    return {
        "study_uid": st.study_uid,
        "date": st.date,
        "date_display": d.date(st.date),
        "description": st.description,
        "modalities": st.modalities,
        "num_series": st.num_series,
        "num_instances": st.num_instances,
    }


def _item_json(item: dict[str, Any], d: Display, who: Principal) -> dict[str, Any]:
    partner_zone = item["partner"]["time_zone"]
    scheduled = None
    if item["scheduled_at"] is not None:
        scheduled = {
            "viewer": d.moment(item["scheduled_at"]),
            "partner": d.moment(item["scheduled_at"], partner_zone),
        }
    out: dict[str, Any] = {
        "id": item["id"],
        "partner": {"name": item["partner"]["name"], "time_zone": partner_zone},
        "patient": {
            **item["patient"],
            "birth_date_display": d.date(item["patient"]["birth_date"]),
        },
        "studies": [_study_json(st, d) for st in item["studies"]],
        "question": item["question"],
        "scheduled_at": _iso_utc(item["scheduled_at"]),
        "scheduled": scheduled,
        "time_zone": item["time_zone"],
        "status": item["status"],
        "specialists": item["specialists"],
        "images_ready": item["images_ready"],
        "created": d.moment(item["created_at"]),
        "updated": d.moment(item["updated_at"]),
    }
    # the sending partner reads the opinion once it answers; specialists and admins always
    if item["opinion"] is not None and (who.role != "partner" or item["status"] == "answered"):
        out["opinion"] = item["opinion"]
        out["answered_by"] = item["answered_by"]
        out["answered"] = d.moment(item["answered_at"]) if item["answered_at"] else None
    return out


def _bad(e: Exception) -> HTTPException:
    text = str(e)
    return HTTPException(400, text[:1].upper() + text[1:] + ("" if text.endswith(".") else "."))


def _date_bound(text: str, zone_name: str, end: bool) -> dt.datetime:
    """A worklist bound: a date (the start of that day, or of the next one for ``end``, in the
    viewer's zone) or an ISO date-time (with an offset, or local to the viewer's zone)."""
    text = text.strip()
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        return parse_moment(text, zone_name)[0]
    if end:
        day += dt.timedelta(days=1)
    local = dt.datetime.combine(day, dt.time(0), tzinfo=zone(zone_name))
    return local.astimezone(dt.UTC).replace(tzinfo=None)


def consultations_router(archive: Archive) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["consultations"])
    store = Consultations(archive.index)
    index = archive.index

    def _get(cid: int, who: Principal) -> dict[str, Any]:
        try:
            return store.get(cid, who)
        except NotFound:
            raise HTTPException(404, _GONE) from None

    def _changed(request: Request, who: Principal, cid: int, what: str, **detail: Any) -> None:
        audit(
            request,
            who,
            "consultation_changed",
            "consultation",
            str(cid),
            detail={"change": what, **detail},
        )

    # -- the worklist ----------------------------------------------------------------------------
    @router.get("/worklist")
    def worklist(
        request: Request,
        who: CurrentUser,
        status: Annotated[str | None, Query(max_length=200)] = None,
        partner: Annotated[str | None, Query(max_length=64)] = None,
        modality: Annotated[str | None, Query(max_length=16)] = None,
        from_: Annotated[str | None, Query(alias="from", max_length=64)] = None,
        to: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict:
        """Consultations the caller may see, soonest first. ``status``: one or more, comma
        separated; ``from``/``to``: dates (whole days, inclusive, in the caller's zone) or ISO
        date-times bounding the scheduled time."""
        d = display_for(request, who)
        statuses = [s.strip() for s in (status or "").split(",") if s.strip()]
        try:
            lo = _date_bound(from_, d.zone, end=False) if from_ else None
            hi = _date_bound(to, d.zone, end=True) if to else None
            items, total = store.list(
                who,
                status=statuses,
                partner=partner or None,
                modality=modality or None,
                scheduled_from=lo,
                scheduled_before=hi,
                limit=limit,
                offset=offset,
            )
        except (ConsultationError, ValueError) as e:
            raise _bad(e) from None
        return {
            "items": [_item_json(i, d, who) for i in items],
            "total": total,
            "limit": limit,
            "offset": offset,
            "locale": d.locale,
            "time_zone": d.zone,
        }

    # -- one consultation ------------------------------------------------------------------------
    @router.get("/consultations/{cid}")
    def consultation(cid: int, request: Request, who: CurrentUser) -> dict:
        item = _get(cid, who)
        d = display_for(request, who)
        out = _item_json(item, d, who)
        out["can"] = {
            "assign": who.role == "admin",
            "opinion": who.role == "admin"
            or (who.role == "specialist" and store.is_assigned(cid, who.user_id)),
        }
        if who.role == "partner" and who.partner_id == item["partner"]["id"]:
            out["original"] = _reveal(
                request, who, "consultation", str(cid), [s.study_uid for s in item["studies"]]
            )
        return out

    def _reveal(
        request: Request, who: Principal, kind: str, target: str, study_uids: list[str]
    ) -> dict[str, Any]:
        """The originals of the caller's own partner's studies, from the identity vault; audited
        (the audit row names only our own ids)."""
        assert who.partner_id is not None
        first: dict[str, Any] = {}
        accessions: dict[str, str | None] = {}
        try:
            for uid in study_uids:
                found = archive.vault.reveal(who.partner_id, uid)
                if found is None:
                    continue
                accessions[uid] = found.get("accession")
                if not first:
                    first = found
        except VaultIntegrityError:
            audit(
                request,
                who,
                "reidentify",
                kind,
                target,
                outcome="failed",
                detail={"reason": "integrity"},
            )
            raise HTTPException(
                500,
                "An identity record failed its integrity check, so nothing was revealed. "
                "Tell the operator.",
            ) from None
        audit(request, who, "reidentify", kind, target, detail={"studies": len(study_uids)})
        return {
            "patient_id": first.get("patient_id"),
            "patient_name": first.get("patient_name"),
            "accession": first.get("accession"),
            "accessions": accessions,
        }

    @router.post("/consultations", status_code=201)
    def create(body: NewConsultation, request: Request, who: CurrentUser) -> dict:
        if who.role not in ("partner", "admin"):
            raise HTTPException(
                403, "Only a partner hospital's users or an admin request consultations."
            )
        scope = who.scope
        try:
            first = store.study(body.study_uids[0].strip(), scope)
        except NotFound:
            raise HTTPException(404, _NO_STUDY) from None
        try:
            tz = check_zone(body.time_zone) if body.time_zone else None
            when = None
            if body.scheduled_at:
                when, _ = parse_moment(body.scheduled_at, tz or first["partner"]["time_zone"])
            cid = store.create(
                study_uids=body.study_uids,
                question=body.question,
                scheduled_at=when,
                time_zone=tz,
                created_by=who.user_id,
                scope=scope,
            )
        except (ConsultationError, UnknownZone, ValueError) as e:
            raise _bad(e) from None
        audit(
            request,
            who,
            "consultation_created",
            "consultation",
            str(cid),
            detail={"studies": len(body.study_uids)},
        )
        return _item_json(_get(cid, who), display_for(request, who), who)

    @router.post("/consultations/{cid}/assign")
    def assign(cid: int, body: Assignment, request: Request, who: CurrentUser) -> dict:
        _get(cid, who)
        if who.role != "admin":
            raise HTTPException(403, "Only an admin assigns specialists.")
        try:
            names = store.assign(cid, body.specialists)
        except ConsultationError as e:
            raise _bad(e) from None
        _changed(request, who, cid, "assign", specialists=names)
        return _item_json(_get(cid, who), display_for(request, who), who)

    @router.post("/consultations/{cid}/status")
    def status(cid: int, body: StatusChange, request: Request, who: CurrentUser) -> dict:
        _get(cid, who)
        allowed = who.role == "admin" or (
            who.role == "specialist"
            and store.is_assigned(cid, who.user_id)
            and body.status in ("in_review", "answered")
        )
        if not allowed:
            raise HTTPException(403, "Your role does not allow this change of status.")
        try:
            old, new = store.set_status(cid, body.status)
        except ConsultationError as e:
            raise _bad(e) from None
        if old != new:
            _changed(request, who, cid, "status", old=old, new=new)
        return _item_json(_get(cid, who), display_for(request, who), who)

    @router.post("/consultations/{cid}/opinion")
    def opinion(cid: int, body: Opinion, request: Request, who: CurrentUser) -> dict:
        _get(cid, who)
        if not (
            who.role == "admin"
            or (who.role == "specialist" and store.is_assigned(cid, who.user_id))
        ):
            raise HTTPException(
                403, "Only a specialist assigned to this consultation writes its opinion."
            )
        try:
            store.record_opinion(cid, body.text, who.user_id)
        except ConsultationError as e:
            raise _bad(e) from None
        _changed(request, who, cid, "opinion", status="answered")
        return _item_json(_get(cid, who), display_for(request, who), who)

    def _may_edit_studies(cid: int, who: Principal) -> None:
        item = _get(cid, who)
        if not (
            who.role == "admin"
            or (who.role == "partner" and who.partner_id == item["partner"]["id"])
        ):
            raise HTTPException(
                403, "Only the requesting hospital or an admin changes the studies."
            )

    @router.post("/consultations/{cid}/studies")
    def add_study(cid: int, body: StudyRef, request: Request, who: CurrentUser) -> dict:
        _may_edit_studies(cid, who)
        try:
            store.study(body.study_uid, who.scope)
            store.add_study(cid, body.study_uid)
        except NotFound:
            raise HTTPException(404, _NO_STUDY) from None
        except ConsultationError as e:
            raise _bad(e) from None
        _changed(request, who, cid, "study_added", study=body.study_uid)
        return _item_json(_get(cid, who), display_for(request, who), who)

    @router.delete("/consultations/{cid}/studies/{study_uid}")
    def remove_study(cid: int, study_uid: str, request: Request, who: CurrentUser) -> dict:
        _may_edit_studies(cid, who)
        try:
            store.remove_study(cid, study_uid)
        except ConsultationError as e:
            raise _bad(e) from None
        _changed(request, who, cid, "study_removed", study=study_uid)
        return _item_json(_get(cid, who), display_for(request, who), who)

    # -- studies ---------------------------------------------------------------------------------
    @router.get("/studies")
    def studies(
        request: Request,
        who: CurrentUser,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
        partner: Annotated[str | None, Query(max_length=64)] = None,
        modality: Annotated[str | None, Query(max_length=16)] = None,
        q: Annotated[str | None, Query(max_length=64)] = None,
    ) -> dict:
        """Studies the caller may see, newest received first (pseudonymous fields only)."""
        d = display_for(request, who)
        rows = store.study_list(
            who.scope,
            partner=partner or None,
            modality=modality or None,
            text=q or None,
            limit=limit,
            offset=offset,
        )
        for r in rows:
            r["study_date_display"] = d.date(r["study_date"])
        return {"studies": rows, "limit": limit, "offset": offset}

    def _study(uid: str, who: Principal) -> dict[str, Any]:
        try:
            return store.study(uid, who.scope)
        except NotFound:
            raise HTTPException(404, _NO_STUDY) from None

    @router.get("/studies/{study_uid}")
    def study(study_uid: str, request: Request, who: CurrentUser) -> dict:
        found = _study(study_uid, who)
        d = display_for(request, who)
        st: StudySummary = found["study"]
        audit(request, who, "study_viewed", "study", st.study_uid, once=True)
        base = f"/dicomweb/studies/{st.study_uid}/series"
        return {
            **_study_json(st, d),
            "time": st.time,
            "patient": {
                **found["patient"],
                "birth_date_display": d.date(found["patient"]["birth_date"]),
            },
            "partner": found["partner"],
            "series": [
                {**se, "thumbnail_url": f"{base}/{se['series_uid']}/thumbnail"}
                for se in found["series"]
            ],
        }

    @router.get("/studies/{study_uid}/priors")
    def priors(study_uid: str, request: Request, who: CurrentUser) -> dict:
        try:
            found = store.priors(study_uid, who.scope)
        except NotFound:
            raise HTTPException(404, _NO_STUDY) from None
        d = display_for(request, who)
        return {"study_uid": study_uid, "priors": [_study_json(st, d) for st in found]}

    @router.get("/studies/{study_uid}/identity")
    def identity(study_uid: str, request: Request, who: CurrentUser) -> dict:
        _study(study_uid, who)
        if who.role != "partner" or who.partner_id is None:
            raise HTTPException(
                403, "Only the sending hospital's users can see the original identifiers."
            )
        original = _reveal(request, who, "study", study_uid, [study_uid])
        return {"study_uid": study_uid, **original}

    @router.get("/partners")
    def partners(who: CurrentUser) -> dict:
        if who.role == "share":
            raise HTTPException(403, "A share link gives access to one study only.")
        rows = index.partners()
        if who.role == "partner":
            rows = [p for p in rows if p.id == who.partner_id]
        return {"partners": [_partner_json(p) for p in rows]}

    return router


def _partner_json(p: Partner) -> dict[str, Any]:
    return {"name": p.name, "time_zone": p.time_zone or DEFAULT_ZONE}
