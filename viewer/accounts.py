"""Routes of accounts: log in and out, who am I and my preferences, my API tokens, the users
(admins) and the audit log (admins).

    POST   /api/login {name, password}       sets the imx_session cookie; returns /api/me's JSON
    POST   /api/logout
    GET    /api/me                           {name, role, partner_id, all_studies, locale, time_zone, csrf_token}
    PUT    /api/me/preferences {locale?, time_zone?}
    GET    /api/tokens | POST /api/tokens {label, days?} | DELETE /api/tokens/{id}
    GET    /api/users | POST /api/users | PATCH /api/users/{name}            (admin)
    GET    /api/audit?limit&before&user&action&from&to | GET /api/audit.jsonl (admin)
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import zoneinfo
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from storage.access import ROLES, AuditEvent, User, UserExists
from storage.index import utcnow
from viewer.auth import (
    SESSION_COOKIE,
    SESSION_HOURS,
    Auth,
    CurrentUser,
    Principal,
    TooManyAttempts,
    audit,
    client_address,
    hash_password,
    new_secret,
    require_role,
    secret_hash,
    too_many,
)

LOCALES = ("en", "ru", "zh", "kk", "ky")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MAX_TOKEN_DAYS = 3650
AUDIT_PAGE_MAX = 1000
PASSWORD_ALPHABET = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
AdminUser = Annotated[Principal, Depends(require_role("admin"))]


class Credentials(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class Preferences(BaseModel):
    locale: str | None = None
    time_zone: str | None = None


class NewToken(BaseModel):
    label: str = Field("api", min_length=1, max_length=64)
    days: int | None = Field(None, ge=1, le=MAX_TOKEN_DAYS)


class NewUser(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    role: Literal["admin", "specialist", "partner"]
    partner: str | None = None
    display_name: str | None = Field(None, max_length=128)
    password: str | None = Field(None, min_length=8, max_length=1024)
    all_studies: bool = False


class UserChange(BaseModel):
    active: bool | None = None
    all_studies: bool | None = None
    role: Literal["admin", "specialist", "partner"] | None = None
    partner: str | None = None
    display_name: str | None = Field(None, max_length=128)
    password: str | None = Field(None, min_length=8, max_length=1024)


def me_json(p: Principal) -> dict:
    return {
        "name": p.name,
        "role": p.role,
        "partner_id": p.partner_id,
        "all_studies": p.all_studies,
        "locale": p.locale,
        "time_zone": p.time_zone,
        "csrf_token": p.csrf_token,
    }


def valid_user_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ValueError("a user name is 1 to 64 letters, digits, dots, dashes, underscores or @, starting with a letter or digit")
    return name


def valid_time_zone(name: str) -> str:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError("unknown time zone; use an IANA name such as Asia/Urumqi or Asia/Almaty") from None
    return name


def generate_password() -> str:
    """A random password of about 114 bits (20 characters without look-alikes), in groups of 5."""
    raw = "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(20))
    return "-".join(raw[i : i + 5] for i in range(0, len(raw), 5))


def _iso(t: dt.datetime | None) -> str | None:
    return t.replace(tzinfo=dt.UTC).isoformat().replace("+00:00", "Z") if t else None


def audit_json(e: AuditEvent) -> dict[str, Any]:
    try:
        detail = json.loads(e.detail) if e.detail else None
    except ValueError:
        detail = None
    return {
        "id": e.id,
        "at": _iso(e.at),
        "user": e.username,
        "user_id": e.user_id,
        "action": e.action,
        "target_kind": e.target_kind,
        "target": e.target,
        "address": e.address,
        "outcome": e.outcome,
        "detail": detail,
    }


def _parse_time(value: str | None, what: str) -> dt.datetime | None:
    if not value:
        return None
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise HTTPException(400, f"{what} must be an ISO date or date-time, e.g. 2026-11-30T08:00:00Z.") from None
    return t.astimezone(dt.UTC).replace(tzinfo=None) if t.tzinfo else t


def accounts_router(auth: Auth) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["accounts"])
    accounts = auth.accounts
    index = accounts.index
    admin_only = Depends(require_role("admin"))

    def partner_names() -> dict[int, str]:
        return {p.id: p.name for p in index.partners()}

    def user_json(u: User, partners: dict[int, str]) -> dict[str, Any]:
        return {
            "name": u.name,
            "display_name": u.display_name,
            "role": u.role,
            "partner": partners.get(u.partner_id) if u.partner_id else None,
            "all_studies": bool(u.all_studies),
            "active": bool(u.active),
            "locale": u.locale,
            "time_zone": u.time_zone,
            "created_at": _iso(u.created_at),
            "last_login_at": _iso(u.last_login_at),
            "failed_logins": u.failed_logins or 0,
        }

    # -- sessions -----------------------------------------------------------------------------------
    @router.post("/login")
    def login(body: Credentials, request: Request, response: Response) -> dict:
        address = client_address(request)
        try:
            user = auth.check_password(body.name, body.password, address)
        except TooManyAttempts as e:
            known = accounts.user_by_name(body.name) is not None
            who = body.name if known else "unknown"
            if auth.first_time(("throttled", who, address)):  # one row per pause, not one per attempt
                audit(request, None, "login_failed", outcome="throttled", username=who)
            raise too_many(e) from None
        if user is None:
            known = accounts.user_by_name(body.name) is not None
            audit(request, None, "login_failed", outcome="refused", username=body.name if known else "unknown")
            raise HTTPException(status_code=401, detail="Wrong user name or password.")
        secret, csrf = auth.open_session(user, address)
        response.set_cookie(
            SESSION_COOKIE,
            secret,
            max_age=SESSION_HOURS * 3600,
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
            path="/",
        )
        principal = Principal.of(user, "session", csrf)
        audit(request, principal, "login")
        return me_json(principal)

    @router.post("/logout")
    def logout(request: Request, response: Response, user: CurrentUser) -> dict:
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            accounts.revoke_session(secret_hash(cookie))
        response.delete_cookie(SESSION_COOKIE, path="/")
        audit(request, user, "logout")
        return {"ok": True}

    @router.get("/me")
    def me(user: CurrentUser) -> dict:
        return me_json(user)

    @router.put("/me/preferences")
    def preferences(body: Preferences, user: CurrentUser) -> dict:
        if user.user_id is None:
            raise HTTPException(403, "A share link has no preferences to save.")
        values: dict[str, Any] = {}
        if body.locale is not None:
            if body.locale not in LOCALES:
                raise HTTPException(400, f"The locale must be one of {', '.join(LOCALES)}.")
            values["locale"] = body.locale
        if body.time_zone is not None:
            try:
                values["time_zone"] = valid_time_zone(body.time_zone)
            except ValueError as e:
                raise HTTPException(400, f"{str(e)[0].upper()}{str(e)[1:]}.") from None
        if values:
            accounts.update_user(user.user_id, **values)
        fresh = accounts.user_by_id(user.user_id)
        assert fresh is not None
        return me_json(Principal.of(fresh, user.via, user.csrf_token))

    # -- API tokens ---------------------------------------------------------------------------------
    def own(user: Principal) -> int:
        if user.user_id is None:
            raise HTTPException(403, "A share link cannot hold API tokens.")
        return user.user_id

    @router.get("/tokens")
    def list_tokens(user: CurrentUser) -> dict:
        now = utcnow()
        return {
            "tokens": [
                {
                    "id": t.id,
                    "label": t.label,
                    "created_at": _iso(t.created_at),
                    "expires_at": _iso(t.expires_at),
                    "last_used_at": _iso(t.last_used_at),
                    "revoked": t.revoked_at is not None,
                    "expired": t.expires_at is not None and t.expires_at <= now,
                }
                for t in accounts.tokens_of(own(user))
            ]
        }

    @router.post("/tokens", status_code=201)
    def create_token(body: NewToken, request: Request, user: CurrentUser) -> dict:
        secret = new_secret()
        expires = utcnow() + dt.timedelta(days=body.days) if body.days else None
        token_id = accounts.add_token(own(user), body.label, secret_hash(secret), expires)
        audit(request, user, "token_created", "token", str(token_id), detail={"label": body.label})
        return {"id": token_id, "label": body.label, "token": secret, "expires_at": _iso(expires)}

    @router.delete("/tokens/{token_id}")
    def revoke_token(token_id: int, request: Request, user: CurrentUser) -> dict:
        if not accounts.revoke_token(token_id, own(user)):
            raise HTTPException(404, "You have no live token with that id.")
        audit(request, user, "token_revoked", "token", str(token_id))
        return {"ok": True}

    # -- users (admin) ------------------------------------------------------------------------------
    @router.get("/users", dependencies=[admin_only])
    def list_users() -> dict:
        partners = partner_names()
        return {"users": [user_json(u, partners) for u in accounts.users()]}

    def partner_id_of(name: str | None) -> int | None:
        if name is None:
            return None
        p = index.partner_by_name(name)
        if p is None or not p.active:
            raise HTTPException(400, "No active partner is registered under that name.")
        return p.id

    @router.post("/users", status_code=201)
    def create_user(body: NewUser, request: Request, admin: AdminUser) -> dict:
        try:
            valid_user_name(body.name)
        except ValueError as e:
            raise HTTPException(400, f"The name is not valid: {e}.") from None
        if (body.role == "partner") != (body.partner is not None):
            raise HTTPException(400, "A partner user needs --partner (its hospital), and only a partner user has one.")
        password = body.password or generate_password()
        try:
            user = accounts.add_user(
                body.name,
                body.role,
                hash_password(password),
                partner_id=partner_id_of(body.partner),
                display_name=body.display_name,
                all_studies=body.all_studies and body.role == "specialist",
            )
        except UserExists:
            raise HTTPException(409, "A user with that name exists.") from None
        audit(request, admin, "user_changed", "user", user.name, detail={"created": True, "role": body.role})
        out = user_json(user, partner_names())
        if body.password is None:
            out["password"] = password  # shown once
        return out

    @router.patch("/users/{name}")
    def change_user(name: str, body: UserChange, request: Request, admin: AdminUser) -> dict:
        user = accounts.user_by_name(name)
        if user is None:
            raise HTTPException(404, "No user with that name.")
        values: dict[str, Any] = {}
        role = body.role or user.role
        if body.role is not None:
            values["role"] = body.role
        if body.partner is not None or body.role is not None:
            partner_id = partner_id_of(body.partner) if body.partner is not None else user.partner_id
            if role != "partner":
                partner_id = None
            if (role == "partner") != (partner_id is not None):
                raise HTTPException(400, "A partner user needs its partner, and only a partner user has one.")
            values["partner_id"] = partner_id
        if body.all_studies is not None:
            if body.all_studies and role != "specialist":
                raise HTTPException(400, "Only a specialist can be granted all studies.")
            values["all_studies"] = body.all_studies
        elif role != "specialist" and user.all_studies:
            values["all_studies"] = False
        if body.active is not None:
            values["active"] = body.active
        if body.display_name is not None:
            values["display_name"] = body.display_name
        if body.password is not None:
            values["password_hash"] = hash_password(body.password)
        if user.id == admin.user_id and (values.get("active") is False or values.get("role", "admin") != "admin"):
            raise HTTPException(400, "You cannot disable yourself or take away your own admin role.")
        if values:
            accounts.update_user(user.id, **values)  # disabling or a new password ends its access
        changed = sorted(k if k != "password_hash" else "password" for k in values)
        audit(request, admin, "user_changed", "user", user.name, detail={"changed": changed})
        fresh = accounts.user_by_id(user.id)
        assert fresh is not None
        return user_json(fresh, partner_names())

    # -- the audit log (admin) ----------------------------------------------------------------------
    @router.get("/audit", dependencies=[admin_only])
    def audit_log(
        limit: Annotated[int, Query(ge=1, le=AUDIT_PAGE_MAX)] = 100,
        before: Annotated[int | None, Query(ge=1)] = None,
        user: str | None = None,
        action: str | None = None,
        from_: Annotated[str | None, Query(alias="from")] = None,
        to: str | None = None,
    ) -> dict:
        rows = accounts.audit_events(
            limit=limit,
            before=before,
            username=user,
            action=action,
            since=_parse_time(from_, "from"),
            until=_parse_time(to, "to"),
        )
        items = [audit_json(e) for e in rows]
        return {"items": items, "next_before": items[-1]["id"] if len(items) == limit else None}

    @router.get("/audit.jsonl", dependencies=[admin_only])
    async def audit_export(
        user: str | None = None,
        action: str | None = None,
        from_: Annotated[str | None, Query(alias="from")] = None,
        to: str | None = None,
    ) -> StreamingResponse:
        """The audit log as JSON lines (one event per line, newest first), for archiving."""
        since, until = _parse_time(from_, "from"), _parse_time(to, "to")

        def page(before: int | None) -> list[AuditEvent]:
            return accounts.audit_events(limit=AUDIT_PAGE_MAX, before=before, username=user, action=action, since=since, until=until)

        async def lines() -> AsyncIterator[bytes]:
            before = None
            while True:
                rows = await run_in_threadpool(page, before)
                for e in rows:
                    yield (json.dumps(audit_json(e), ensure_ascii=False, separators=(",", ":")) + "\n").encode()
                if len(rows) < AUDIT_PAGE_MAX:
                    return
                before = rows[-1].id

        stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
        return StreamingResponse(
            lines(),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": f'attachment; filename="audit-{stamp}.jsonl"', "Cache-Control": "no-store"},
        )

    return router


__all__ = ["ROLES", "accounts_router", "generate_password", "me_json", "valid_time_zone", "valid_user_name"]
