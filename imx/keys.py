"""The service's secret key: generated once at first start, kept in the data folder with mode 0600.

Every pseudonym and remapped UID is an HMAC under this key, so the same input always gives the
same output on this installation and nobody without the key can reverse or predict it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

KEY_BYTES = 32


def load_or_create_key(path: Path) -> bytes:
    """Return the key in ``path``, creating it atomically (O_EXCL, mode 0600) if absent."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        key = secrets.token_bytes(KEY_BYTES)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, key.hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process created it first
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        data = path.read_bytes()
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    key = bytes.fromhex(data.decode().strip())
    if len(key) != KEY_BYTES:
        raise RuntimeError(f"the key file {path} is damaged: expected {KEY_BYTES} bytes")
    return key

