"""Who is asking: passwords, browser sessions, API tokens and HTTP Basic, and the scope each gets.

Every route but ``/healthz``, ``/metrics`` (when public) and the login page depends on
:func:`Auth.current_user` (``CurrentUser`` in a route's signature). Three ways in:

- a browser session: ``POST /api/login`` sets the ``imx_session`` cookie (HttpOnly, SameSite=Lax,
  Secure when the request came over HTTPS); state-changing requests made with it must carry the
  session's CSRF token in ``X-CSRF-Token`` (the token is returned by login and ``GET /api/me``);
- ``Authorization: Bearer <token>`` with an API token (``imx user token``), for scripts and
  DICOMweb tools;
- ``Authorization: Basic`` with a user's name and password, for DICOMweb tools that know only it.

Secrets are kept as SHA-256 hashes; passwords as argon2id hashes.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Annotated

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import Depends, HTTPException, Request

from storage.access import Accounts, User
from storage.index import utcnow
from storage.query import Scope

SESSION_COOKIE = "imx_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_HOURS = 12
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
BASIC_CACHE_SECONDS = 60.0  # a verified Basic credential is trusted this long (argon2 costs ~50 ms)

_hasher = PasswordHasher()  # argon2id, the library's RFC 9106 low-memory defaults


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def new_secret() -> str:
    """A URL-safe random secret of 256 bits."""
    return secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    user_id: int | None
    name: str
    role: str  # 'admin' | 'specialist' | 'partner' | 'share' (a share link: one study, read-only)
    partner_id: int | None = None
    all_studies: bool = False
    locale: str | None = None
    time_zone: str | None = None
    via: str = "session"  # 'session' | 'token' | 'basic' | 'share'
    csrf_token: str | None = None
    share_study_id: int | None = None

    @classmethod
    def of(cls, user: User, via: str, csrf_token: str | None = None) -> Principal:
        return cls(
            user_id=user.id,
            name=user.name,
            role=user.role,
            partner_id=user.partner_id,
            all_studies=bool(user.all_studies),
            locale=user.locale,
            time_zone=user.time_zone,
            via=via,
            csrf_token=csrf_token,
        )

    @property
    def scope(self) -> Scope:
        """Which studies this caller may see, for the one query layer."""
        if self.role == "admin" or (self.role == "specialist" and self.all_studies):
            return Scope(None)
        if self.role == "partner":
            return Scope(self.partner_id)
        if self.role == "share":
            return Scope(None, study_id=self.share_study_id)
        return Scope(None, specialist_id=self.user_id)

    @property
    def read_only(self) -> bool:
        return self.role == "share"


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None


class Auth:
    """Authentication for one app: holds the accounts store and a short cache of Basic logins."""

    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts
        self._basic_cache: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    # -- sessions ---------------------------------------------------------------------------------
    def open_session(self, user: User, address: str | None) -> tuple[str, str]:
        """A new browser session for ``user``: (cookie secret, CSRF token)."""
        secret, csrf = new_secret(), new_secret()
        expires = utcnow() + dt.timedelta(hours=SESSION_HOURS)
        self.accounts.add_session(user.id, secret_hash(secret), csrf, address, expires)
        return secret, csrf

    # -- the dependency ---------------------------------------------------------------------------
    def authenticate(self, request: Request) -> Principal | None:
        """The caller of ``request``, or None when it carries no valid credential."""
        header = request.headers.get("authorization")
        if header:
            scheme, _, value = header.partition(" ")
            scheme = scheme.lower()
            if scheme == "bearer":
                found = self.accounts.token(secret_hash(value.strip()))
                return Principal.of(found[1], "token") if found else None
            if scheme == "basic":
                return self._basic(value.strip())
            return None
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            found = self.accounts.session(secret_hash(cookie))
            if found:
                session, user = found
                return Principal.of(user, "session", session.csrf_token)
        return None

    def _basic(self, value: str) -> Principal | None:
        try:
            name, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if not sep:
            return None
        key = (name, hashlib.sha256(password.encode()).hexdigest())
        now = time.monotonic()
        with self._lock:
            hit = self._basic_cache.get(key)
        if hit and hit[0] > now:
            user = self.accounts.user_by_id(hit[1])
            return Principal.of(user, "basic") if user and user.active else None
        user = self.accounts.user_by_name(name)
        if user is None or not user.active or not verify_password(user.password_hash, password):
            return None
        with self._lock:
            if len(self._basic_cache) > 1000:
                self._basic_cache.clear()
            self._basic_cache[key] = (now + BASIC_CACHE_SECONDS, user.id)
        return Principal.of(user, "basic")

    async def current_user(self, request: Request) -> Principal:
        """FastAPI dependency: the caller, or 401; for session callers, a state-changing request
        without the session's CSRF token is refused (403)."""
        principal = self.authenticate(request)
        if principal is None:
            raise HTTPException(
                status_code=401,
                detail="Log in first, or send an API token (Bearer) or a user name and password (Basic).",
                headers={"WWW-Authenticate": 'Basic realm="imaging-exchange", Bearer realm="imaging-exchange"'},
            )
        if principal.via == "session" and request.method not in SAFE_METHODS:
            sent = request.headers.get(CSRF_HEADER, "")
            if not principal.csrf_token or not hmac.compare_digest(sent, principal.csrf_token):
                raise HTTPException(status_code=403, detail="The request lacks this session's CSRF token; reload the page and try again.")
        if principal.read_only and request.method not in SAFE_METHODS:
            raise HTTPException(status_code=403, detail="A share link gives read-only access.")
        request.state.principal = principal
        return principal


async def current_user(request: Request) -> Principal:
    """The dependency routes use (``CurrentUser``); delegates to the app's :class:`Auth`."""
    return await request.app.state.auth.current_user(request)


CurrentUser = Annotated[Principal, Depends(current_user)]


def require_role(*roles: str):  # type: ignore[no-untyped-def]
    """A dependency refusing (403) callers whose role is not among ``roles``."""

    async def check(principal: CurrentUser) -> Principal:
        if principal.role not in roles:
            raise HTTPException(status_code=403, detail="Your role does not allow this.")
        return principal

    return check
