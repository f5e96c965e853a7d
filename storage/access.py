"""Rows of people and their work: user accounts, sessions, API tokens, the audit log, share links
and consultations (schema revision 0004).

Like the rest of ``storage/``, these are bytes and rows; who may do what is decided in
``viewer/auth.py`` and the routes. Secrets (session ids, API tokens, share-link tokens) are kept
only as SHA-256 hashes, passwords only as argon2 hashes.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Boolean, DateTime, ForeignKey, Integer, String, Text, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Mapped, mapped_column

from storage.index import Base, Index, utcnow

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

    def update_user(self, user_id: int, **values: object) -> None:
        with self.index.write() as s:
            s.execute(update(User).where(User.id == user_id).values(**values))

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

    def session(self, secret_hash: str) -> tuple[WebSession, User] | None:
        """The live session with this secret and its active user, or None."""
        now = utcnow()
        with self.index.read() as s:
            row = s.execute(
                select(WebSession, User)
                .join(User, User.id == WebSession.user_id)
                .where(
                    WebSession.secret_hash == secret_hash,
                    WebSession.revoked_at.is_(None),
                    WebSession.expires_at > now,
                    User.active.is_(True),
                )
            ).first()
        return (row[0], row[1]) if row else None

    def revoke_session(self, secret_hash: str) -> None:
        with self.index.write() as s:
            s.execute(update(WebSession).where(WebSession.secret_hash == secret_hash).values(revoked_at=utcnow()))

    def revoke_sessions_of(self, user_id: int) -> None:
        with self.index.write() as s:
            s.execute(
                update(WebSession)
                .where(WebSession.user_id == user_id, WebSession.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )

    # API tokens
    def add_token(self, user_id: int, label: str, secret_hash: str, expires_at: dt.datetime | None) -> int:
        with self.index.write() as s:
            tok = ApiToken(user_id=user_id, label=label, secret_hash=secret_hash, expires_at=expires_at)
            s.add(tok)
            s.flush()
            return tok.id

    def token(self, secret_hash: str) -> tuple[ApiToken, User] | None:
        now = utcnow()
        with self.index.read() as s:
            row = s.execute(
                select(ApiToken, User)
                .join(User, User.id == ApiToken.user_id)
                .where(
                    ApiToken.secret_hash == secret_hash,
                    ApiToken.revoked_at.is_(None),
                    (ApiToken.expires_at.is_(None)) | (ApiToken.expires_at > now),
                    User.active.is_(True),
                )
            ).first()
        return (row[0], row[1]) if row else None

    def revoke_token(self, token_id: int, user_id: int | None = None) -> bool:
        with self.index.write() as s:
            q = update(ApiToken).where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
            if user_id is not None:
                q = q.where(ApiToken.user_id == user_id)
            return s.execute(q.values(revoked_at=utcnow())).rowcount > 0

    def tokens_of(self, user_id: int) -> list[ApiToken]:
        with self.index.read() as s:
            return list(s.scalars(select(ApiToken).where(ApiToken.user_id == user_id).order_by(ApiToken.id)))
