"""Routes of accounts: log in and out, who am I."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, Field

from viewer.auth import (
    SESSION_COOKIE,
    SESSION_HOURS,
    Auth,
    CurrentUser,
    Principal,
    client_address,
    secret_hash,
    verify_password,
)


class Credentials(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


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


def accounts_router(auth: Auth) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["accounts"])

    @router.post("/login")
    def login(body: Credentials, request: Request, response: Response) -> dict:
        user = auth.accounts.user_by_name(body.name)
        if user is None or not user.active or not verify_password(user.password_hash, body.password):
            raise HTTPException(status_code=401, detail="Wrong user name or password.")
        secret, csrf = auth.open_session(user, client_address(request))
        response.set_cookie(
            SESSION_COOKIE,
            secret,
            max_age=SESSION_HOURS * 3600,
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
            path="/",
        )
        return me_json(Principal.of(user, "session", csrf))

    @router.post("/logout")
    def logout(request: Request, response: Response, user: CurrentUser) -> dict:
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            auth.accounts.revoke_session(secret_hash(cookie))
        response.delete_cookie(SESSION_COOKIE, path="/")
        return {"ok": True}

    @router.get("/me")
    def me(user: CurrentUser) -> dict:
        return me_json(user)

    return router
