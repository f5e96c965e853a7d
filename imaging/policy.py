"""A partner's de-identification policy: which PS3.15 options apply on top of the Basic Profile,
and what happens to objects that may carry burned-in text.

The operator sets a default (``Policy.default()`` unless configured); each partner may have its
own, stored with the partner as JSON. A policy file is JSON or TOML::

    options = ["retain_patient_characteristics", "retain_longitudinal_modified_dates",
               "clean_descriptors", "clean_structured_content", "clean_graphics"]
    burned_in = "quarantine"   # or "mask" or "reject"

Option names are the lower-case names of :class:`imaging.profile.Option`.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from imaging.profile import Option


class BurnedInAction(StrEnum):
    """What to do with an object that declares, or probably carries, burned-in annotation."""

    QUARANTINE = "quarantine"  # store it, show it to nobody until an operator releases or masks it
    MASK = "mask"  # black out the regions the rules give for the device, then store it
    REJECT = "reject"  # refuse it


class PolicyError(ValueError):
    """A policy that cannot be used; the message says which part and why."""


# PS3.16 CID 7050 "De-identification Method": the code for each option (0012,0064).
OPTION_CODES: dict[Option, tuple[str, str]] = {
    Option.CLEAN_GRAPHICS: ("113103", "Clean Graphics Option"),
    Option.CLEAN_STRUCTURED_CONTENT: ("113104", "Clean Structured Content Option"),
    Option.CLEAN_DESCRIPTORS: ("113105", "Clean Descriptors Option"),
    Option.RETAIN_LONG_FULL_DATES: ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    Option.RETAIN_LONG_MODIFIED_DATES: ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    Option.RETAIN_PATIENT_CHARACTERISTICS: ("113108", "Retain Patient Characteristics Option"),
    Option.RETAIN_DEVICE_IDENTITY: ("113109", "Retain Device Identity Option"),
    Option.RETAIN_UIDS: ("113110", "Retain UIDs Option"),
    Option.RETAIN_SAFE_PRIVATE: ("113111", "Retain Safe Private Option"),
    Option.RETAIN_INSTITUTION_IDENTITY: ("113112", "Retain Institution Identity Option"),
}
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
CLEAN_PIXEL_DATA_CODE = ("113101", "Clean Pixel Data Option")

# Options a policy may not switch on here: the exchange's promise is that UIDs are always
# remapped (a partner's own UIDs never reach another partner's specialists).
FORBIDDEN = frozenset({Option.RETAIN_UIDS})

# The order in which options are consulted when more than one gives an action for one attribute:
# retaining options first (they name exceptions to removal), then cleaning ones.
PRECEDENCE: tuple[Option, ...] = (
    Option.RETAIN_SAFE_PRIVATE,
    Option.RETAIN_UIDS,
    Option.RETAIN_DEVICE_IDENTITY,
    Option.RETAIN_INSTITUTION_IDENTITY,
    Option.RETAIN_PATIENT_CHARACTERISTICS,
    Option.RETAIN_LONG_FULL_DATES,
    Option.RETAIN_LONG_MODIFIED_DATES,
    Option.CLEAN_DESCRIPTORS,
    Option.CLEAN_STRUCTURED_CONTENT,
    Option.CLEAN_GRAPHICS,
)


def _option(name: str) -> Option:
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    for opt in Option:
        if key in (opt.name.lower(), opt.value):
            return opt
    aliases = {
        "retain_longitudinal_modified_dates": Option.RETAIN_LONG_MODIFIED_DATES,
        "retain_longitudinal_full_dates": Option.RETAIN_LONG_FULL_DATES,
    }
    if key in aliases:
        return aliases[key]
    known = ", ".join(o.name.lower() for o in Option if o not in FORBIDDEN)
    raise PolicyError(f"unknown de-identification option {name!r}; known options: {known}")


@dataclass(frozen=True)
class Policy:
    options: frozenset[Option] = field(default_factory=frozenset)
    burned_in: BurnedInAction = BurnedInAction.QUARANTINE

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", frozenset(self.options))
        try:
            object.__setattr__(self, "burned_in", BurnedInAction(self.burned_in))
        except ValueError:
            raise PolicyError("'burned_in' must be one of quarantine, mask, reject") from None
        bad = self.options & FORBIDDEN
        if bad:
            raise PolicyError(
                f"option {', '.join(o.name.lower() for o in bad)} is not allowed: the exchange always replaces UIDs"
            )
        if {Option.RETAIN_LONG_FULL_DATES, Option.RETAIN_LONG_MODIFIED_DATES} <= self.options:
            raise PolicyError("choose one of retain_long_full_dates and retain_long_modified_dates, not both")

    @classmethod
    def basic(cls) -> Policy:
        return cls(frozenset())

    @classmethod
    def default(cls) -> Policy:
        """The exchange's default: Basic Profile with Retain Patient Characteristics, Retain
        Longitudinal Temporal Information with Modified Dates, Clean Descriptors, Clean Structured
        Content and Clean Graphics; burned-in annotation quarantined."""
        return cls(
            frozenset(
                {
                    Option.RETAIN_PATIENT_CHARACTERISTICS,
                    Option.RETAIN_LONG_MODIFIED_DATES,
                    Option.CLEAN_DESCRIPTORS,
                    Option.CLEAN_STRUCTURED_CONTENT,
                    Option.CLEAN_GRAPHICS,
                }
            )
        )

    @property
    def ordered_options(self) -> tuple[Option, ...]:
        return tuple(o for o in PRECEDENCE if o in self.options)

    @property
    def shifts_dates(self) -> bool:
        return Option.RETAIN_LONG_MODIFIED_DATES in self.options

    def has(self, option: Option) -> bool:
        return option in self.options

    # -- serialisation ---------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> Policy:
        if not isinstance(data, dict):
            raise PolicyError("a policy must be a table/object with 'options' and 'burned_in'")
        unknown = set(data) - {"options", "burned_in"}
        if unknown:
            raise PolicyError(f"unknown policy keys: {', '.join(sorted(unknown))}")
        raw = data.get("options", [])
        if not isinstance(raw, list):
            raise PolicyError("'options' must be a list of option names")
        burned = str(data.get("burned_in", BurnedInAction.QUARANTINE.value)).strip().lower()
        try:
            action = BurnedInAction(burned)
        except ValueError:
            raise PolicyError(f"'burned_in' must be one of quarantine, mask, reject (not {burned!r})") from None
        return cls(frozenset(_option(o) for o in raw), action)

    def to_mapping(self) -> dict[str, Any]:
        return {"options": [o.name.lower() for o in self.ordered_options], "burned_in": self.burned_in.value}

    def to_json(self) -> str:
        return json.dumps(self.to_mapping(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        try:
            return cls.from_mapping(json.loads(text))
        except json.JSONDecodeError as e:
            raise PolicyError(f"the policy is not valid JSON: {e.msg} at line {e.lineno}") from None

    @classmethod
    def load(cls, path: Path) -> Policy:
        """A policy file: TOML (``.toml``) or JSON."""
        try:
            text = path.read_text("utf-8")
        except OSError as e:
            raise PolicyError(f"cannot read the policy file {path}: {e.strerror}") from None
        if path.suffix.lower() == ".toml":
            try:
                return cls.from_mapping(tomllib.loads(text))
            except tomllib.TOMLDecodeError as e:
                raise PolicyError(f"{path}: not valid TOML ({e})") from None
        try:
            return cls.from_json(text)
        except PolicyError as e:
            raise PolicyError(f"{path}: {e}") from None

    # -- what gets recorded in the object (0012,0063) and (0012,0064) ----------------------------
    def method_codes(self, *, pixels_cleaned: bool = False) -> list[tuple[str, str]]:
        codes = [BASIC_PROFILE_CODE]
        if pixels_cleaned:
            codes.append(CLEAN_PIXEL_DATA_CODE)
        codes.extend(OPTION_CODES[o] for o in sorted(self.options, key=lambda o: OPTION_CODES[o][0]))
        return codes
