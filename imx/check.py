"""``imx check``: does every index row point at an intact object, and every object at a row?

Used by operators after a crash or a storage incident, and by the crash tests.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field

from imx.config import Settings
from storage.index import LOCATION_SPOOL


@dataclass
class Report:
    instances: int = 0
    missing: list[str] = field(default_factory=list)  # object keys
    damaged: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.damaged)


def verify(archive) -> Report:  # type: ignore[no-untyped-def]
    rep = Report()
    # list the store before reading the rows: an object written (and indexed) meanwhile is then
    # known, not mistaken for an orphan that --repair would delete
    stored = list(archive.store.list())
    known: set[str] = set()
    for _uid, key, sha, location in archive.index.all_instances():
        rep.instances += 1
        known.add(key)
        if location == LOCATION_SPOOL:
            payload = archive.spool.payload(key)
            data = payload.path.read_bytes() if payload else None
        else:
            try:
                data = archive.store.get(key)
            except KeyError:
                data = None
        if data is None:
            rep.missing.append(key)
        elif hashlib.sha256(data).hexdigest() != sha:
            rep.damaged.append(key)
    known.update(archive.index.rendition_keys())  # previews and thumbnails are not orphans
    rep.orphans = [k for k in stored if k not in known]
    return rep


def check(settings: Settings, repair: bool = False) -> int:
    from imx.ingest import Archive

    archive = Archive(settings)
    archive.index.migrate()
    rep = verify(archive)
    print(f"{rep.instances} instances indexed")
    print(f"{len(rep.missing)} missing objects, {len(rep.damaged)} damaged objects, {len(rep.orphans)} objects without an index row")
    for k in rep.missing[:20]:
        print(f"  missing: {k}")
    for k in rep.damaged[:20]:
        print(f"  damaged: {k}")
    if repair and rep.orphans:
        for k in rep.orphans:
            archive.store.delete(k)
        print(f"removed {len(rep.orphans)} objects without an index row")
    archive.close()
    if not rep.ok:
        print("imx check: the archive is NOT consistent", file=sys.stderr)
        return 1
    return 0
