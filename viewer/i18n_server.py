"""Server-side locale and time-zone handling: which language and zone a caller reads in, and
Babel formatting of dates, date-times and numbers for them.

- Languages: English, Russian and Chinese (``en``, ``ru``, ``zh``); Kazakh and Kyrgyz readers get
  Russian (``kk``, ``ky`` -> ``ru``). Negotiation order: an explicit ``?locale=``, the user's saved
  locale, the browser's ``Accept-Language`` (RFC 9110 12.5.4), else English.
- Zones: IANA names, loaded from the ``tzdata`` package first, so a host whose system data predates
  Kazakhstan's move to a single zone (UTC+5 since 1 March 2024) still shows Almaty right. The
  viewer's zone is the user's saved zone, else the browser's (sent as ``?tz=``), else
  :data:`DEFAULT_ZONE` (the service runs in Urumqi). A partner without a zone is in Urumqi too.
- A time shown to a person carries its UTC offset ("UTC+6"), never an abbreviation alone: the
  abbreviations of this region are either absent from the zone data ("+06") or ambiguous ("CST"
  is both China and the US Central zone).
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib.resources
import re
from dataclasses import dataclass
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel import Locale
from babel.dates import format_date as _babel_date
from babel.dates import format_time as _babel_time
from babel.numbers import format_decimal
from fastapi import Depends, Request

SUPPORTED_LOCALES = ("en", "ru", "zh")
DEFAULT_LOCALE = "en"
FALLBACK_LOCALES = {"kk": "ru", "ky": "ru"}
DEFAULT_ZONE = "Asia/Urumqi"

_ZONE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+){0,2}$")


class UnknownZone(ValueError):
    """A time-zone name that is not an IANA zone."""


# -- zones ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``, from the ``tzdata`` package's data when it has it (it is kept
    current with the package), else from the system's. Raises UnknownZone."""
    if not isinstance(name, str) or not _ZONE_NAME.match(name) or ".." in name:
        raise UnknownZone(f"{name!r} is not a time-zone name; use an IANA name such as Asia/Almaty")
    try:
        resource = importlib.resources.files("tzdata.zoneinfo").joinpath(*name.split("/"))
        if resource.is_file():
            with resource.open("rb") as f:
                return ZoneInfo.from_file(f, key=name)
    except (ModuleNotFoundError, ValueError, OSError):
        pass
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise UnknownZone(
            f"{name!r} is not a known time zone; use an IANA name such as Asia/Almaty"
        ) from None


def check_zone(name: str) -> str:
    """``name`` if it is an IANA zone (raises UnknownZone otherwise)."""
    zone(name)
    return name


def utc_offset_label(when: dt.datetime) -> str:
    """The UTC offset of an aware date-time as people read it: UTC+6, UTC+5:30, UTC-3, UTC."""
    off = when.utcoffset() or dt.timedelta(0)
    minutes = int(off.total_seconds()) // 60
    if minutes == 0:
        return "UTC"
    sign = "+" if minutes > 0 else "-"
    h, m = divmod(abs(minutes), 60)
    return f"UTC{sign}{h}" + (f":{m:02d}" if m else "")


# -- locales --------------------------------------------------------------------------------------
def normal_locale(code: str | None) -> str | None:
    """One of :data:`SUPPORTED_LOCALES` for a language tag (``ru-RU``, ``zh_Hans_CN``, ``kk``), or
    None when the language is not one we speak."""
    if not code:
        return None
    lang = re.split(r"[-_]", code.strip().lower(), maxsplit=1)[0]
    lang = FALLBACK_LOCALES.get(lang, lang)
    return lang if lang in SUPPORTED_LOCALES else None


def _accept_language(header: str) -> str | None:
    ranked: list[tuple[float, int, str]] = []
    for i, part in enumerate(header.split(",")):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        m = re.search(r"q\s*=\s*([0-9.]+)", params)
        if m:
            try:
                q = float(m.group(1))
            except ValueError:
                q = 0.0
        found = normal_locale(tag)
        if found and q > 0:
            ranked.append((-q, i, found))
    return min(ranked)[2] if ranked else None


def negotiate_locale(
    requested: str | None = None, saved: str | None = None, accept_language: str | None = None
) -> str:
    """The locale to answer in: ``requested`` (``?locale=``), else ``saved`` (the user's), else
    the best supported language of ``accept_language``, else English."""
    return (
        normal_locale(requested)
        or normal_locale(saved)
        or (_accept_language(accept_language) if accept_language else None)
        or DEFAULT_LOCALE
    )


def viewer_zone(saved: str | None = None, browser: str | None = None) -> str:
    """The zone a person reads times in: their saved zone, else their browser's, else Urumqi's.
    A name that is not a zone is passed over."""
    for name in (saved, browser):
        if name:
            try:
                return check_zone(name)
            except UnknownZone:
                continue
    return DEFAULT_ZONE


# -- formatting -----------------------------------------------------------------------------------
def _as_utc(value: dt.datetime) -> dt.datetime:
    """Naive date-times in the index are UTC."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def format_datetime(value: dt.datetime, zone_name: str, locale: str) -> str:
    """Date and time (to the minute) in ``zone_name``, as ``locale`` writes them, with the UTC
    offset: "Dec 1, 2026, 9:00 AM UTC+6", "1 дек. 2026 г., 09:00 UTC+6", "2026年12月1日 09:00 UTC+6"."""
    local = _as_utc(value).astimezone(zone(zone_name))
    loc = Locale.parse(normal_locale(locale) or DEFAULT_LOCALE)
    pattern = str(loc.datetime_formats["medium"]).replace("'", "")
    text = pattern.format(
        _babel_time(local, "short", locale=loc), _babel_date(local, "medium", locale=loc)
    )
    return f"{text} {utc_offset_label(local)}"


def format_date(value: dt.date | str | None, locale: str) -> str | None:
    """A calendar date (a ``date`` or DICOM DA ``YYYYMMDD``) as ``locale`` writes it; None for
    None or a value that is not a date."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.strptime(value.strip(), "%Y%m%d").date()
        except ValueError:
            return None
    return _babel_date(value, "medium", locale=normal_locale(locale) or DEFAULT_LOCALE)


def format_number(value: float | int, locale: str) -> str:
    """A number with ``locale``'s grouping and decimal signs (12,345.5; 12 345,5)."""
    return format_decimal(value, locale=normal_locale(locale) or DEFAULT_LOCALE)


def moment(value: dt.datetime, zone_name: str, locale: str) -> dict[str, str]:
    """A moment for the JSON API: ``iso`` (local time with its offset), ``display`` (formatted
    for ``locale``) and ``zone`` (the IANA name)."""
    local = _as_utc(value).astimezone(zone(zone_name))
    return {
        "iso": local.isoformat(timespec="minutes"),
        "display": format_datetime(value, zone_name, locale),
        "zone": zone_name,
    }


def parse_moment(text: str, zone_name: str | None) -> tuple[dt.datetime, str | None]:
    """An ISO 8601 date-time: with an offset (``2026-12-01T09:00+06:00``, ``...Z``), or local
    to ``zone_name``. Returns (naive UTC, the zone name used for a local time or None). Raises
    ValueError with a plain message."""
    try:
        value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            "the time must be ISO 8601, such as 2026-12-01T09:00+06:00 or 2026-12-01T09:00 "
            "with a time zone"
        ) from None
    if value.tzinfo is None:
        if not zone_name:
            raise ValueError("a time without a UTC offset needs its time zone")
        value = value.replace(tzinfo=zone(zone_name))
        # a local time that does not exist or exists twice (a clock change) is refused
        back = value.astimezone(dt.UTC).astimezone(value.tzinfo)
        if (
            back.replace(tzinfo=None) != value.replace(tzinfo=None)
            or value.utcoffset() != value.replace(fold=1).utcoffset()
        ):
            raise ValueError(
                "that local time is skipped or repeated by a clock change; give its UTC offset"
            )
        return value.astimezone(dt.UTC).replace(tzinfo=None), zone_name
    return value.astimezone(dt.UTC).replace(tzinfo=None), None


# -- the dependency for routes --------------------------------------------------------------------
@dataclass(frozen=True)
class Display:
    """How to show things to the caller of one request: locale and time zone."""

    locale: str
    zone: str

    def datetime(self, value: dt.datetime | None, zone_name: str | None = None) -> str | None:
        return (
            None if value is None else format_datetime(value, zone_name or self.zone, self.locale)
        )

    def date(self, value: dt.date | str | None) -> str | None:
        return format_date(value, self.locale)

    def number(self, value: float | int) -> str:
        return format_number(value, self.locale)

    def moment(self, value: dt.datetime, zone_name: str | None = None) -> dict[str, str]:
        return moment(value, zone_name or self.zone, self.locale)


def display_for(request: Request, principal: Any | None = None) -> Display:
    """The caller's Display: ``?locale=`` / saved locale / Accept-Language, and saved zone /
    ``?tz=`` / Urumqi. ``principal`` is the caller (anything with ``locale`` and ``time_zone``)."""
    q = request.query_params
    return Display(
        locale=negotiate_locale(
            q.get("locale"),
            getattr(principal, "locale", None),
            request.headers.get("accept-language"),
        ),
        zone=viewer_zone(getattr(principal, "time_zone", None), q.get("tz")),
    )


async def _display(request: Request) -> Display:
    return display_for(request, getattr(request.state, "principal", None))


DisplayOf = Annotated[Display, Depends(_display)]
"""A route parameter: the caller's Display. Declare it after ``CurrentUser`` so that the
authenticated caller's saved settings apply."""
