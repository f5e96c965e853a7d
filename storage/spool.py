"""The local spool: where a de-identified object waits, durably, while the object store is
unreachable. Files are named by the object key (service-generated), never by anything a peer sent."""

from __future__ import annotations

from pathlib import Path

from storage.objects import Payload, check_key, write_durably


class Spool:
    def __init__(self, root: Path, tmp_dir: Path) -> None:
        self.root = root
        self.tmp = tmp_dir
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, key: str) -> Path:
        return self.root / check_key(key).replace("/", "_")

    def put(self, key: str, payload: Payload) -> None:
        """Durable on return (fsync of file and directory); raises OSError (e.g. ENOSPC) if not."""
        write_durably(self.path(key), payload, self.tmp)

    def payload(self, key: str) -> Payload | None:
        p = self.path(key)
        return Payload(path=p) if p.exists() else None

    def remove(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def __len__(self) -> int:
        return sum(1 for p in self.root.iterdir() if p.is_file())
