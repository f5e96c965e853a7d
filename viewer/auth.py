"""Who is asking: passwords, browser sessions, API tokens and HTTP Basic, and the scope each gets.

Every route but ``/healthz``, ``/metrics`` (when public) and the login page depends on
:func:`Auth.current_user` (``CurrentUser`` in a route's signature). Three ways in:

- a browser session: ``POST /api/login`` sets the ``imx_session`` cookie (HttpOnly, SameSite=Lax,
  Secure when the request came over HTTPS); state-changing requests made with it must carry the
  session's CSRF token in ``X-CSRF-Token`` (the token is returned by login and ``GET /api/me``);
- ``Authorization: Bearer <token>`` with an API token (``imx user token``), for scripts and
  DICOMweb tools;
- ``Authorization: Basic`` with a user's name and password, for DICOMweb tools that know only it.

A share link (``GET /s/{token}``) sets the ``imx_share`` cookie: read-only access to one study.

Secrets are kept as SHA-256 hashes; passwords as argon2id hashes. Repeated failed logins (form or
Basic) are slowed down per user name and per client address (:class:`LoginThrottle`). What people
do is written to the append-only audit log through :func:`audit`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import hashlib
import hmac
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Row

from imx.logs import event
from storage.access import Accounts, User
from storage.index import utcnow
from storage.query import Scope

log = logging.getLogger("imx.auth")

SESSION_COOKIE = "imx_session"
SHARE_COOKIE = "imx_share"
CSRF_HEADER = "X-CSRF-Token"
SESSION_HOURS = 12
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
BASIC_CACHE_SECONDS = 60.0  # a verified Basic credential is trusted this long (argon2 costs ~50 ms)
TOKEN_TOUCH_INTERVAL = dt.timedelta(minutes=10)  # how stale an API token's last_used_at may be
AUDIT_REPEAT_SECONDS = 300.0  # audit(..., once=True): one row per caller, action and target this often
AUDIT_ACTIONS = frozenset(
    {
        "login",
        "login_failed",
        "logout",
        "study_viewed",
        "instance_downloaded",
        "frame_downloaded",
        "reidentify",
        "consultation_created",
        "consultation_changed",
        "partner_changed",
        "user_changed",
        "share_created",
        "share_revoked",
        "token_created",
        "token_revoked",
    }
)

_hasher = PasswordHasher()  # argon2id, the library's RFC 9106 low-memory defaults


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


@functools.cache
def _dummy_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))


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
    share_id: int | None = None

    @classmethod
    def of(cls, user: User | Row, via: str, csrf_token: str | None = None) -> Principal:
        """From a User, or a row of the user's columns (``Accounts.session``/``token``)."""
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


class TooManyAttempts(Exception):
    """Logins for this name or from this address are paused; ``retry_after`` in seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


class LoginThrottle:
    """Growing delays after failed logins, per user name and per client address.

    After ``after`` failures in a row for a name (``address_after`` from an address), every
    attempt (even with the right password) is refused for ``base * 2**(n - threshold)`` seconds
    after the n-th failure, at most ``cap``; a successful login resets both counters. An address
    gets more room than a name: a partner hospital's users often reach us through one NAT
    address, and three typos there must not lock out the whole hospital; guessing many names
    from one address is still slowed down. Kept in memory (one HTTP process); ``clock`` is
    injectable for tests."""

    MAX_KEYS = 20_000

    def __init__(
        self,
        after: int = 3,
        base: float = 1.0,
        cap: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
        address_after: int = 20,
    ) -> None:
        self.after, self.base, self.cap, self.clock = after, base, cap, clock
        self.address_after = address_after
        self._failures: dict[tuple[str, str], tuple[int, float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _keys(name: str | None, address: str | None) -> list[tuple[str, str]]:
        keys = []
        if name:
            keys.append(("name", name[:64].casefold()))
        if address:
            keys.append(("address", address))
        return keys

    def retry_after(self, name: str | None, address: str | None) -> float:
        """Seconds until an attempt for ``name`` from ``address`` is allowed; 0 when it is."""
        now = self.clock()
        wait = 0.0
        with self._lock:
            for key in self._keys(name, address):
                n, last = self._failures.get(key, (0, 0.0))
                threshold = self.after if key[0] == "name" else self.address_after
                if n >= threshold:
                    pause = min(self.cap, self.base * 2 ** (n - threshold))
                    wait = max(wait, last + pause - now)
        return wait

    def check(self, name: str | None, address: str | None) -> None:
        wait = self.retry_after(name, address)
        if wait > 0:
            raise TooManyAttempts(wait)

    def failed(self, name: str | None, address: str | None) -> None:
        now = self.clock()
        with self._lock:
            if len(self._failures) > self.MAX_KEYS:  # forget the oldest half
                for key, _ in sorted(self._failures.items(), key=lambda kv: kv[1][1])[: self.MAX_KEYS // 2]:
                    del self._failures[key]
            for key in self._keys(name, address):
                n, _ = self._failures.get(key, (0, 0.0))
                self._failures[key] = (n + 1, now)

    def succeeded(self, name: str | None, address: str | None) -> None:
        with self._lock:
            for key in self._keys(name, address):
                self._failures.pop(key, None)


def too_many(e: TooManyAttempts) -> HTTPException:
    return HTTPException(
        status_code=429,
        detail="Too many failed logins: wait before trying again.",
        headers={"Retry-After": str(max(1, math.ceil(e.retry_after)))},
    )


class Auth:
    """Authentication for one app: the accounts store, the login throttle, a short cache of Basic
    logins and the memory of recent audit rows (for ``audit(..., once=True)``)."""

    def __init__(self, accounts: Accounts, throttle: LoginThrottle | None = None) -> None:
        self.accounts = accounts
        self.throttle = throttle or LoginThrottle()
        self._basic_cache: dict[tuple[str, str], tuple[float, int]] = {}
        self._audited: dict[tuple[Any, ...], float] = {}
        self._lock = threading.Lock()

    # -- passwords ----------------------------------------------------------------------------------
    def check_password(self, name: str, password: str, address: str | None) -> User | None:
        """The active user with this name and password, or None (the failure counted and its
        time noted on the user row). Raises :class:`TooManyAttempts` while paused."""
        self.throttle.check(name, address)
        user = self.accounts.user_by_name(name)
        if user is None:  # as slow as a wrong password, so that timing does not tell who exists
            verify_password(_dummy_hash(), password)
        ok = user is not None and user.active and verify_password(user.password_hash, password)
        if not ok:
            self.throttle.failed(name, address)
            if user is not None:
                self.accounts.update_user(user.id, failed_logins=(user.failed_logins or 0) + 1, last_failed_at=utcnow())
            return None
        assert user is not None
        self.throttle.succeeded(name, address)
        self.accounts.update_user(user.id, failed_logins=0, last_login_at=utcnow())
        return user

    def first_time(self, key: tuple[Any, ...], window: float = AUDIT_REPEAT_SECONDS) -> bool:
        """True once per ``window`` seconds per ``key``."""
        now = time.monotonic()
        with self._lock:
            last = self._audited.get(key)
            if last is not None and now - last < window:
                return False
            if len(self._audited) > 50_000:
                self._audited = {k: t for k, t in self._audited.items() if now - t < window}
            self._audited[key] = now
            return True

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
                if found is None:
                    return None
                if found.last_used_at is None or utcnow() - found.last_used_at > TOKEN_TOUCH_INTERVAL:
                    self.accounts.touch_token(found.token_id)  # at most one write per token and interval
                return Principal.of(found, "token")
            if scheme == "basic":
                return self._basic(value.strip(), request)
            return None
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            found = self.accounts.session(secret_hash(cookie))
            if found:
                return Principal.of(found, "session", found.csrf_token)
        share = request.cookies.get(SHARE_COOKIE)
        if share:
            live = self.accounts.share(secret_hash(share))
            if live:
                link = live[0]
                return Principal(
                    user_id=None,
                    name=f"share-link-{link.id}",
                    role="share",
                    via="share",
                    share_study_id=link.study_id,
                    share_id=link.id,
                )
        return None

    def _audit_failed_login(self, request: Request, name: str, via: str) -> None:
        known = self.accounts.user_by_name(name) is not None
        audit(request, None, "login_failed", outcome="refused", detail={"via": via}, username=name if known else "unknown")

    def _basic(self, value: str, request: Request) -> Principal | None:
        try:
            name, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if not sep or not name or len(name) > 64:
            return None
        key = (name, hashlib.sha256(password.encode()).hexdigest())
        now = time.monotonic()
        with self._lock:
            hit = self._basic_cache.get(key)
        if hit and hit[0] > now:
            user = self.accounts.user_by_id(hit[1])
            return Principal.of(user, "basic") if user and user.active else None
        address = client_address(request)
        try:
            user = self.check_password(name, password, address)
        except TooManyAttempts as e:
            raise too_many(e) from None
        if user is None:
            self._audit_failed_login(request, name, "basic")
            return None
        with self._lock:
            if len(self._basic_cache) > 1000:
                self._basic_cache.clear()
            self._basic_cache[key] = (now + BASIC_CACHE_SECONDS, user.id)
        return Principal.of(user, "basic")

    async def current_user(self, request: Request) -> Principal:
        """FastAPI dependency: the caller, or 401; for session callers, a state-changing request
        without the session's CSRF token is refused (403)."""
        scheme = request.headers.get("authorization", "")[:6].lower()
        if scheme == "basic " or not self.accounts.index.is_sqlite:
            # an argon2 check (~50 ms), or a PostgreSQL round trip: never on the event loop
            principal = await run_in_threadpool(self.authenticate, request)
        else:  # a local SQLite read of one row by a unique key takes tens of microseconds
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


def audit(
    request: Request,
    principal: Principal | None,
    action: str,
    target_kind: str | None = None,
    target: str | None = None,
    outcome: str = "ok",
    detail: dict | None = None,
    *,
    username: str | None = None,
    once: bool = False,
) -> None:
    """Append one row to the audit log: who (``principal``, or ``username`` when nobody is
    authenticated), what (``action``, one of :data:`AUDIT_ACTIONS`, on ``target_kind``/``target``),
    when, from where (the client address) and how it ended (``outcome``).

    ``target`` and ``detail`` must hold only what the service generated (its own UIDs, pseudonyms,
    ids), never an original identifier or a name from a dataset. With ``once``, a repeat of the
    same caller, action and target within :data:`AUDIT_REPEAT_SECONDS` is not written again (a
    viewer fetching a study's hundred frames makes one row, not a hundred)."""
    if action not in AUDIT_ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    auth: Auth = request.app.state.auth
    who = principal.name if principal is not None else username
    if once:
        key = (principal.user_id if principal else None, principal.share_id if principal else None, who, action, target_kind, target)
        if not auth.first_time(key):
            return
    info = dict(detail or {})
    if principal is not None:
        info.setdefault("via", principal.via)
    auth.accounts.add_audit(
        action,
        user_id=principal.user_id if principal is not None else None,
        username=who,
        address=client_address(request),
        target_kind=target_kind,
        target=target,
        outcome=outcome,
        detail=json.dumps(info, sort_keys=True, separators=(",", ":")) if info else None,
    )
    event(log, "audit", action=action, outcome=outcome, target_kind=target_kind)
