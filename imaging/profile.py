"""PS3.15 Table E.1-1 (Application Level Confidentiality Profile Attributes), loaded from the
data file ``imaging/data/ps3_15_table_e1_1.json`` (its ``source`` key names the edition).

The table is data, not code: ``Profile.action(tag, options)`` answers which action applies to an
attribute under the Basic Profile plus the options a policy switches on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from importlib import resources


class Option(StrEnum):
    """The profile options of PS3.15 Table E.1-1, by their column in the data file."""

    RETAIN_SAFE_PRIVATE = "rtn_safe_priv"
    RETAIN_UIDS = "rtn_uids"
    RETAIN_DEVICE_IDENTITY = "rtn_dev_id"
    RETAIN_INSTITUTION_IDENTITY = "rtn_inst_id"
    RETAIN_PATIENT_CHARACTERISTICS = "rtn_pat_chars"
    RETAIN_LONG_FULL_DATES = "rtn_long_full_dates"
    RETAIN_LONG_MODIFIED_DATES = "rtn_long_modif_dates"
    CLEAN_DESCRIPTORS = "clean_desc"
    CLEAN_STRUCTURED_CONTENT = "clean_struct_cont"
    CLEAN_GRAPHICS = "clean_graph"


VALID_ACTIONS = {"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}


@dataclass(frozen=True)
class Entry:
    tag: str
    keyword: str
    basic: str
    options: dict[str, str]


class Profile:
    def __init__(self, data: dict) -> None:
        self.source: str = data["source"]
        self.edition: str = data.get("edition", "")
        self._exact: dict[int, Entry] = {}
        self._masked: list[tuple[int, int, Entry]] = []  # (mask, value, entry)
        for row in data["attributes"]:
            options = {o.value: row[o.value] for o in Option if row.get(o.value)}
            entry = Entry(row["tag"], row.get("keyword", ""), row["basic"], options)
            for action in [entry.basic, *options.values()]:
                if action not in VALID_ACTIONS:
                    raise ValueError(f"{self.source}: unknown action {action!r} for {row['tag']}")
            t = row["tag"].upper()
            if "X" in t:
                mask = int("".join("0" if c == "X" else "F" for c in t), 16)
                value = int(t.replace("X", "0"), 16)
                self._masked.append((mask, value, entry))
            else:
                self._exact[int(t, 16)] = entry

    def entry(self, tag: int) -> Entry | None:
        e = self._exact.get(tag)
        if e is not None:
            return e
        for mask, value, entry in self._masked:
            if tag & mask == value:
                return entry
        return None

    def action(self, tag: int, options: Iterable[Option] = ()) -> str | None:
        """The action for ``tag``: an enabled option's action wins over the Basic Profile's
        (the first of ``options``, in their order, that has one); None when the table does not
        list the attribute."""
        e = self.entry(tag)
        if e is None:
            return None
        for opt in options:
            a = e.options.get(opt.value)
            if a:
                return a
        return e.basic

    def __len__(self) -> int:
        return len(self._exact) + len(self._masked)


@cache
def basic_profile() -> Profile:
    text = resources.files("imaging").joinpath("data/ps3_15_table_e1_1.json").read_text("utf-8")
    return Profile(json.loads(text))
