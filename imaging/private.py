"""The allow-list of safe private attributes for the Retain Safe Private Option (PS3.15 E.3.10).

A private data element (gggg,xxee), gggg odd, belongs to the block whose Private Creator is in
(gggg,00xx) (PS3.5 Section 7.8.1). It is kept only when (creator, gggg, ee) is listed in
``imaging/data/safe_private.json`` or in an operator's file of the same format.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path


class SafePrivateError(ValueError):
    pass


class SafePrivate:
    def __init__(self, entries: set[tuple[str, int, int]]) -> None:
        self.entries = entries

    @staticmethod
    def parse(data: dict, source: str) -> set[tuple[str, int, int]]:
        out: set[tuple[str, int, int]] = set()
        rows = data.get("attributes") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise SafePrivateError(f"{source}: expected an object with an 'attributes' list")
        for i, row in enumerate(rows):
            try:
                creator = str(row["creator"]).strip()
                group = int(str(row["group"]), 16)
                element = int(str(row["element"]), 16)
            except (KeyError, TypeError, ValueError):
                raise SafePrivateError(f"{source}: entry {i} needs 'creator', hex 'group' and hex 'element'") from None
            if not group & 1 or not 0 <= element <= 0xFF or not creator:
                raise SafePrivateError(f"{source}: entry {i} is not a private attribute (odd group, element 00-FF)")
            out.add((creator, group, element))
        return out

    @classmethod
    def load(cls, extra: Path | None = None) -> SafePrivate:
        text = resources.files("imaging").joinpath("data/safe_private.json").read_text("utf-8")
        entries = cls.parse(json.loads(text), "safe_private.json")
        if extra is not None:
            try:
                entries |= cls.parse(json.loads(extra.read_text("utf-8")), str(extra))
            except json.JSONDecodeError as e:
                raise SafePrivateError(f"{extra}: not valid JSON ({e.msg}, line {e.lineno})") from None
        return cls(entries)

    def allows(self, creator: str, group: int, element_offset: int) -> bool:
        return (creator.strip(), group, element_offset) in self.entries


@cache
def default_safe_private() -> SafePrivate:
    return SafePrivate.load()
