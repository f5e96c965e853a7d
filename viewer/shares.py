"""Share links: expiring, revocable, read-only access to one study.

    POST   /api/studies/{study_uid}/share {hours}   -> {id, url: "/s/<token>", expires_at}
    GET    /api/shares[?study=UID]                  the caller's links (an admin's: all)
    DELETE /api/share/{id}                          revoke (its creator or an admin)
    GET    /s/{token}                               sets the imx_share cookie, 303 to the viewer

Whoever may see a study (an admin, a specialist assigned to it or granted all studies, a user of
the sending partner) may share it. The token is shown once and kept as its SHA-256; the cookie it
sets gives ``Scope(study_id=...)`` and no state-changing request (``Principal.read_only``).
"""

from __future__ import annotations

import datetime as dt
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from storage.index import utcnow
from storage.query import Level, search
from viewer.auth import SHARE_COOKIE, Auth, CurrentUser, Principal, audit, new_secret, secret_hash

MAX_SHARE_HOURS = 24 * 30


class NewShare(BaseModel):
    hours: int = Field(72, ge=1, le=MAX_SHARE_HOURS)


def _iso(t: dt.datetime) -> str:
    return t.replace(tzinfo=dt.UTC).isoformat().replace("+00:00", "Z")


def shares_router(auth: Auth) -> APIRouter:
    router = APIRouter(tags=["shares"])
    accounts = auth.accounts
    index = accounts.index

    @router.post("/api/studies/{study_uid}/share", status_code=201)
    def create_share(study_uid: str, body: NewShare, request: Request, user: CurrentUser) -> dict:
        if user.role not in ("admin", "specialist", "partner") or user.user_id is None:
            raise HTTPException(403, "Your role does not allow sharing.")
        visible = search(index, Level.STUDY, {"StudyInstanceUID": study_uid}, user.scope, limit=1) if len(study_uid) <= 64 else []
        study_id = accounts.study_id_of(study_uid) if visible else None
        if study_id is None:
            raise HTTPException(404, "No study with that UID that you can see.")
        secret = new_secret()
        expires = utcnow() + dt.timedelta(hours=body.hours)
        share_id = accounts.add_share(secret_hash(secret), study_id, user.user_id, expires)
        audit(request, user, "share_created", "study", study_uid, detail={"share_id": share_id, "hours": body.hours})
        return {"id": share_id, "url": f"/s/{secret}", "expires_at": _iso(expires)}

    @router.get("/api/shares")
    def list_shares(user: CurrentUser, study: str | None = None) -> dict:
        """The caller's share links (an admin's: everyone's), newest first; ``?study=UID`` narrows."""
        if user.user_id is None:
            raise HTTPException(403, "A share link cannot list share links.")
        study_id = accounts.study_id_of(study) if study else None
        if study and study_id is None:
            return {"shares": []}
        now = utcnow()
        rows = accounts.shares(created_by=None if user.role == "admin" else user.user_id, study_id=study_id)
        return {
            "shares": [
                {
                    "id": link.id,
                    "study_uid": uid,
                    "created_at": _iso(link.created_at),
                    "expires_at": _iso(link.expires_at),
                    "revoked": link.revoked_at is not None,
                    "active": link.revoked_at is None and link.expires_at > now,
                }
                for link, uid in rows
            ]
        }

    @router.delete("/api/share/{share_id}")
    def revoke_share(share_id: int, request: Request, user: CurrentUser) -> dict:
        link = accounts.share_by_id(share_id)
        if link is None or (user.role != "admin" and link.created_by != user.user_id):
            raise HTTPException(404, "No share link with that id that you created.")
        if not accounts.revoke_share(share_id):
            raise HTTPException(409, "That share link was already revoked.")
        audit(request, user, "share_revoked", "share", str(share_id))
        return {"ok": True}

    @router.get("/s/{token}", include_in_schema=False)
    def open_share(token: str, request: Request) -> Response:
        live = accounts.share(secret_hash(token)) if len(token) <= 128 else None
        if live is None:
            return HTMLResponse(
                "<!doctype html><meta charset=utf-8><title>Link not valid</title>"
                "<p>This link has expired or was revoked. Ask whoever sent it for a new one.</p>",
                status_code=404,
            )
        link, study_uid = live
        remaining = int((link.expires_at - utcnow()).total_seconds())
        response = RedirectResponse(f"/viewer?study={quote(study_uid)}", status_code=303)
        response.set_cookie(
            SHARE_COOKIE,
            token,
            max_age=max(1, remaining),
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
            path="/",
        )
        who = Principal(user_id=None, name=f"share-link-{link.id}", role="share", via="share", share_study_id=link.study_id, share_id=link.id)
        audit(request, who, "login", "share", str(link.id))
        return response

    return router
