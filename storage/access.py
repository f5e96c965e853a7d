"""Rows of people and their work: user accounts, sessions, API tokens, the audit log, share links
and consultations (schema revision 0004).

Like the rest of ``storage/``, these are bytes and rows; who may do what is decided in
``viewer/auth.py`` and the routes. Secrets (session ids, API tokens, share-link tokens) are kept
only as SHA-256 hashes, passwords only as argon2 hashes.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    Row,
    String,
    Text,
    bindparam,
    select,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Mapped, mapped_column

from storage.index import Base, Index, Study, utcnow

ROLES = ("admin", "specialist", "partner")
CONSULTATION_STATUSES = ("requested", "images_complete", "in_review", "answered")


class User(Base):
    """A person who logs in to the viewer or calls DICOMweb.

    ``role`` is one of :data:`ROLES`; a ``partner`` user belongs to one partner hospital
    (``partner_id``); a ``specialist`` sees the studies of consultations assigned to them, or every
    study when ``all_studies`` is granted by an admin."""

    __tablename__ = "user_account"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str | None] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    partner_id: Mapped[int | None] = mapped_column(ForeignKey("partner.id"), index=True)
    all_studies: Mapped[bool] = mapped_column(Boolean, default=False)
    password_hash: Mapped[str] = mapped_column(String(256))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    locale: Mapped[str | None] = mapped_column(String(16))
    time_zone: Mapped[str | None] = mapped_column(String(64))
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    last_failed_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class WebSession(Base):
    """A browser session: the cookie carries the secret, the row its SHA-256 and a CSRF token."""

    __tablename__ = "web_session"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id"), index=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    address: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class ApiToken(Base):
    """A Bearer token for DICOMweb tools and scripts; shown once, kept as SHA-256."""

    __tablename__ = "api_token"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id"), index=True)
    label: Mapped[str] = mapped_column(String(64))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class AuditEvent(Base):
    """One line of the append-only audit log (database triggers refuse UPDATE and DELETE).

    ``target`` holds only identifiers the service generated or pseudonyms (a study's new UID, a
    consultation id), never an original identifier; ``detail`` is a small JSON object."""

    __tablename__ = "audit_event"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(Integer, index=True)
    username: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(48), index=True)
    target_kind: Mapped[str | None] = mapped_column(String(32))
    target: Mapped[str | None] = mapped_column(String(128))
    address: Mapped[str | None] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16), default="ok")
    detail: Mapped[str | None] = mapped_column(Text)


class ShareLink(Base):
    """A read-only link to one study, expiring and revocable; the token is kept as SHA-256."""

    __tablename__ = "share_link"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    created_by: Mapped[int] = mapped_column(ForeignKey("user_account.id"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class Consultation(Base):
    """A partner's request for a specialist's opinion on one pseudonymous patient's studies.

    ``scheduled_at`` is UTC; ``time_zone`` is the IANA zone it was requested in (the partner's),
    so it can be shown both there and in the viewer's zone. ``status`` is one of
    :data:`CONSULTATION_STATUSES`."""

    __tablename__ = "consultation"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    partner_id: Mapped[int] = mapped_column(ForeignKey("partner.id"), index=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    question: Mapped[str] = mapped_column(Text)
    scheduled_at: Mapped[dt.datetime | None] = mapped_column(DateTime, index=True)
    time_zone: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="requested", index=True)
    opinion: Mapped[str | None] = mapped_column(Text)
    answered_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    answered_by: Mapped[int | None] = mapped_column(ForeignKey("user_account.id"))
    created_by: Mapped[int | None] = mapped_column(ForeignKey("user_account.id"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ConsultationStudy(Base):
    __tablename__ = "consultation_study"
    consultation_id: Mapped[int] = mapped_column(ForeignKey("consultation.id"), primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), primary_key=True, index=True)


class ConsultationSpecialist(Base):
    __tablename__ = "consultation_specialist"
    consultation_id: Mapped[int] = mapped_column(ForeignKey("consultation.id"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id"), primary_key=True, index=True)


# -- reads and writes ------------------------------------------------------------------------------
# What a request's credential resolves to: the user's columns that make a Principal.
_USER_COLUMNS = (User.id, User.name, User.role, User.partner_id, User.all_studies, User.locale, User.time_zone)
_SESSION_LOOKUP = (
    select(*_USER_COLUMNS, WebSession.csrf_token)
    .join(User, User.id == WebSession.user_id)
    .where(
        WebSession.secret_hash == bindparam("secret"),
        WebSession.revoked_at.is_(None),
        WebSession.expires_at > bindparam("now"),
        User.active.is_(True),
    )
)
_TOKEN_LOOKUP = (
    select(*_USER_COLUMNS, ApiToken.id.label("token_id"), ApiToken.last_used_at)
    .join(User, User.id == ApiToken.user_id)
    .where(
        ApiToken.secret_hash == bindparam("secret"),
        ApiToken.revoked_at.is_(None),
        ApiToken.expires_at.is_(None) | (ApiToken.expires_at > bindparam("now")),
        User.active.is_(True),
    )
)


class UserExists(ValueError):
    pass


class Accounts:
    """Reads and writes of accounts, sessions and tokens, over the index's engine."""

    def __init__(self, index: Index) -> None:
        self.index = index

    # users
    def add_user(
        self,
        name: str,
        role: str,
        password_hash: str,
        *,
        partner_id: int | None = None,
        display_name: str | None = None,
        all_studies: bool = False,
    ) -> User:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        if (role == "partner") != (partner_id is not None):
            raise ValueError("a partner user needs its partner, and only a partner user has one")
        try:
            with self.index.write() as s:
                user = User(
                    name=name,
                    role=role,
                    password_hash=password_hash,
                    partner_id=partner_id,
                    display_name=display_name,
                    all_studies=all_studies,
                    active=True,
                    failed_logins=0,
                )
                s.add(user)
                s.flush()
                return user
        except sa_exc.IntegrityError as e:
            raise UserExists(f"a user named {name!r} exists") from e

    def user_by_name(self, name: str) -> User | None:
        with self.index.read() as s:
            return s.scalar(select(User).where(User.name == name))

    def user_by_id(self, user_id: int) -> User | None:
        with self.index.read() as s:
            return s.get(User, user_id)

    def users(self) -> list[User]:
        with self.index.read() as s:
            return list(s.scalars(select(User).order_by(User.name)))

    def update_user(self, user_id: int, **values: object) -> int:
        """Change a user's columns. Disabling (``active=False``) ends the user's sessions and
        revokes its API tokens, a new ``password_hash`` ends its sessions, in the same
        transaction: the one place that rule lives. Returns how many tokens were revoked."""
        now = utcnow()
        with self.index.write() as s:
            s.execute(update(User).where(User.id == user_id).values(**values))
            if values.get("active") is False or "password_hash" in values:
                s.execute(
                    update(WebSession)
                    .where(WebSession.user_id == user_id, WebSession.revoked_at.is_(None))
                    .values(revoked_at=now)
                )
            if values.get("active") is False:
                live = update(ApiToken).where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
                return s.execute(live.values(revoked_at=now)).rowcount
        return 0

    # browser sessions
    def add_session(self, user_id: int, secret_hash: str, csrf_token: str, address: str | None, expires_at: dt.datetime) -> None:
        with self.index.write() as s:
            s.add(
                WebSession(
                    user_id=user_id,
                    secret_hash=secret_hash,
                    csrf_token=csrf_token,
                    address=address,
                    expires_at=expires_at,
                )
            )

    def session(self, secret_hash: str) -> Row | None:
        """The live session with this secret, joined with its active user: a row with the
        user's columns (id, name, role, partner_id, all_studies, locale, time_zone) and the
        session's ``csrf_token``; or None. Every request asks this, so it is one Core SELECT by a
        unique key (a fifth of what the ORM takes)."""
        with self.index.engine.connect() as conn:
            return conn.execute(_SESSION_LOOKUP, {"secret": secret_hash, "now": utcnow()}).first()

    def revoke_session(self, secret_hash: str) -> None:
        with self.index.write() as s:
            s.execute(update(WebSession).where(WebSession.secret_hash == secret_hash).values(revoked_at=utcnow()))

    # API tokens
    def add_token(self, user_id: int, label: str, secret_hash: str, expires_at: dt.datetime | None) -> int:
        with self.index.write() as s:
            tok = ApiToken(user_id=user_id, label=label, secret_hash=secret_hash, expires_at=expires_at)
            s.add(tok)
            s.flush()
            return tok.id

    def token(self, secret_hash: str) -> Row | None:
        """The live API token with this secret, joined with its active user: a row with the
        user's columns (as :meth:`session`), ``token_id`` and ``last_used_at``; or None."""
        with self.index.engine.connect() as conn:
            return conn.execute(_TOKEN_LOOKUP, {"secret": secret_hash, "now": utcnow()}).first()

    def revoke_token(self, token_id: int, user_id: int | None = None) -> bool:
        with self.index.write() as s:
            q = update(ApiToken).where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
            if user_id is not None:
                q = q.where(ApiToken.user_id == user_id)
            return s.execute(q.values(revoked_at=utcnow())).rowcount > 0

    def tokens_of(self, user_id: int) -> list[ApiToken]:
        with self.index.read() as s:
            return list(s.scalars(select(ApiToken).where(ApiToken.user_id == user_id).order_by(ApiToken.id)))

    # the audit log (append-only: rows are only ever inserted)
    def add_audit(
        self,
        action: str,
        *,
        user_id: int | None,
        username: str | None,
        address: str | None,
        target_kind: str | None = None,
        target: str | None = None,
        outcome: str = "ok",
        detail: str | None = None,
    ) -> None:
        with self.index.write() as s:
            s.add(
                AuditEvent(
                    at=utcnow(),
                    user_id=user_id,
                    username=username[:64] if username else username,
                    action=action[:48],
                    target_kind=target_kind[:32] if target_kind else target_kind,
                    target=target[:128] if target else target,
                    address=address[:64] if address else address,
                    outcome=outcome[:16],
                    detail=detail,
                )
            )

    def audit_events(
        self,
        *,
        limit: int | None = 100,
        before: int | None = None,
        username: str | None = None,
        action: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
    ) -> list[AuditEvent]:
        """Audit rows, newest first; ``before`` is an event id (paging backwards)."""
        q = select(AuditEvent).order_by(AuditEvent.id.desc())
        if before is not None:
            q = q.where(AuditEvent.id < before)
        if username:
            q = q.where(AuditEvent.username == username)
        if action:
            q = q.where(AuditEvent.action == action)
        if since is not None:
            q = q.where(AuditEvent.at >= since)
        if until is not None:
            q = q.where(AuditEvent.at < until)
        if limit is not None:
            q = q.limit(limit)
        with self.index.read() as s:
            return list(s.scalars(q))

    # share links
    def add_share(self, secret_hash: str, study_id: int, created_by: int, expires_at: dt.datetime) -> int:
        with self.index.write() as s:
            link = ShareLink(secret_hash=secret_hash, study_id=study_id, created_by=created_by, expires_at=expires_at)
            s.add(link)
            s.flush()
            return link.id

    def share(self, secret_hash: str) -> tuple[ShareLink, str] | None:
        """The live (unexpired, unrevoked) share link with this secret and its study's UID."""
        now = utcnow()
        with self.index.read() as s:
            row = s.execute(
                select(ShareLink, Study.study_uid)
                .join(Study, Study.id == ShareLink.study_id)
                .where(
                    ShareLink.secret_hash == secret_hash,
                    ShareLink.revoked_at.is_(None),
                    ShareLink.expires_at > now,
                )
            ).first()
        return (row[0], row[1]) if row else None

    def share_by_id(self, share_id: int) -> ShareLink | None:
        with self.index.read() as s:
            return s.get(ShareLink, share_id)

    def revoke_share(self, share_id: int) -> bool:
        with self.index.write() as s:
            q = update(ShareLink).where(ShareLink.id == share_id, ShareLink.revoked_at.is_(None))
            return s.execute(q.values(revoked_at=utcnow())).rowcount > 0

    def shares(self, *, created_by: int | None = None, study_id: int | None = None) -> list[tuple[ShareLink, str]]:
        """Share links (newest first) with their study's UID, optionally of one creator or study."""
        q = select(ShareLink, Study.study_uid).join(Study, Study.id == ShareLink.study_id).order_by(ShareLink.id.desc())
        if created_by is not None:
            q = q.where(ShareLink.created_by == created_by)
        if study_id is not None:
            q = q.where(ShareLink.study_id == study_id)
        with self.index.read() as s:
            return [(row[0], row[1]) for row in s.execute(q.limit(1000))]

    def touch_token(self, token_id: int) -> None:
        with self.index.write() as s:
            s.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=utcnow()))

    def study_id_of(self, study_uid: str) -> int | None:
        with self.index.read() as s:
            return s.scalar(select(Study.id).where(Study.study_uid == study_uid))
