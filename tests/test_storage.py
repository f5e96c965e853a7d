"""Object stores and the spool against a real filesystem and a real S3 server (moto on loopback).
The same tests run on both stores through the parametrized ``store`` fixture."""

from __future__ import annotations

import hashlib
import os
import stat
import time
import uuid
from pathlib import Path

import pytest
from services import MotoServer

from storage.objects import (
    FileSystemStore,
    ObjectInfo,
    ObjectStore,
    Payload,
    S3Store,
    StoreError,
    StoreUnavailable,
    make_key,
)
from storage.spool import Spool

MiB = 1024 * 1024
BAD_KEYS = [
    "../x",
    "/etc/passwd",
    "1.2.3",
    "obj/ab/cd/1.2.840.113619.2.1.dcm",  # a raw UID where the digest belongs
    "obj/../../../x",
    "",
    "OBJ/ab/cd/" + "0" * 16 + ".dcm",
    make_key("obj", "ab" * 16) + "\n",
    make_key("obj", "ab" * 16) + "/../../x",
]


def key(n: int, kind: str = "obj") -> str:
    return make_key(kind, hashlib.sha256(str(n).encode()).hexdigest())


def s3_store(moto: MotoServer, timeout: float = 3.0) -> S3Store:
    bucket = f"imx-{uuid.uuid4().hex[:20]}"
    return S3Store(moto.endpoint, moto.access_key, moto.secret_key, bucket=bucket, timeout=timeout)


@pytest.fixture(params=["filesystem", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "filesystem":
        return FileSystemStore(tmp_path / "objects")
    return s3_store(request.getfixturevalue("moto"))


def test_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    a, b, empty = key(1), key(2, "thumb"), key(3)
    data = os.urandom(1000)
    src = tmp_path / "src.bin"
    src.write_bytes(b"from a file " * 1000)
    store.put(a, Payload(data=data))
    store.put(b, Payload(path=src))
    store.put(empty, Payload(data=b""))

    assert store.get(a) == data
    with store.open(b) as f:
        assert f.read() == src.read_bytes()
    assert store.get(empty) == b""
    assert store.stat(a) == ObjectInfo(a, 1000)
    assert store.stat(b) == ObjectInfo(b, 12000)
    assert sorted(store.list()) == sorted([a, b, empty])
    assert list(store.list("thumb/")) == [b]

    store.put(a, Payload(data=b"replaced"))
    assert store.get(a) == b"replaced"
    store.delete(a)
    store.delete(a)  # deleting what is gone is not an error
    assert store.stat(a) is None
    assert sorted(store.list()) == sorted([b, empty])
    store.check()


def test_large_object_multipart(store: ObjectStore, tmp_path: Path) -> None:
    if isinstance(store, S3Store):
        store.PART_SIZE = 5 * MiB  # the S3 minimum: 11 MiB go up in 3 parts, ETag "<md5>-3"
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 * MiB))
    k = key(11)
    store.put(k, Payload(path=src))  # raises IntegrityError if the ETag does not verify
    assert store.stat(k) == ObjectInfo(k, 11 * MiB)
    assert hashlib.sha256(store.get(k)).digest() == hashlib.sha256(src.read_bytes()).digest()
    if isinstance(store, S3Store):
        etag = store.client.stat_object(store.bucket, k).etag.strip('"')
        assert etag.endswith("-3") and etag == store._expected_etag(Payload(path=src))


def test_missing_key(store: ObjectStore) -> None:
    store.put(key(1), Payload(data=b"x"))  # the bucket exists; only the key is missing
    with pytest.raises(KeyError):
        store.get(key(2))
    with pytest.raises(KeyError):
        store.open(key(2))
    assert store.stat(key(2)) is None


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_malformed_keys_refused(store: ObjectStore, bad: str, tmp_path: Path) -> None:
    for verb in (
        lambda: store.put(bad, Payload(data=b"x")),
        lambda: store.get(bad),
        lambda: store.open(bad),
        lambda: store.stat(bad),
        lambda: store.delete(bad),
    ):
        with pytest.raises(ValueError):
            verb()
    assert list(store.list()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == (["objects"] if store.name == "filesystem" else [])


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_filesystem_durable_layout(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    fs = FileSystemStore(root)
    k = key(5)
    fs.put(k, Payload(data=b"dicom"))
    assert list(fs.tmp.iterdir()) == []
    assert mode(root / k) == 0o600
    kind, a, b, _ = k.split("/")
    for d in (root, fs.tmp, root / kind, root / kind / a, root / kind / a / b):
        assert mode(d) == 0o700, d
    # a write that fails half-way leaves neither a partial file nor an object
    with pytest.raises(StoreError):
        fs.put(key(6), Payload(path=tmp_path / "vanished"))
    assert list(fs.tmp.iterdir()) == [] and fs.stat(key(6)) is None


def test_filesystem_clean_partial(tmp_path: Path) -> None:
    fs = FileSystemStore(tmp_path / "objects")
    fs.put(key(1), Payload(data=b"whole"))
    (fs.tmp / "0123456789abcdef01234567.part").write_bytes(b"half")
    (fs.tmp / key(2).replace("/", "_")).write_bytes(b"half")
    assert list(fs.list()) == [key(1)]
    assert fs.clean_partial() == 2
    assert list(fs.tmp.iterdir()) == []
    assert list(fs.list()) == [key(1)] and fs.get(key(1)) == b"whole"


def test_s3_outage_and_recovery(moto: MotoServer) -> None:
    s3 = s3_store(moto, timeout=2)
    s3.put(key(1), Payload(data=b"before"))
    moto.pause()
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            s3.put(key(2), Payload(data=b"during"))
        assert time.monotonic() - t0 < 10
    finally:
        moto.resume()
    s3.put(key(3), Payload(data=b"after"))
    assert s3.get(key(3)) == b"after" and s3.get(key(1)) == b"before"


def test_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", tmp_path / "tmp")
    src = tmp_path / "..evil name; rm -rf.dcm"
    src.write_bytes(b"waiting object")
    k = key(7)
    spool.put(k, Payload(path=src))
    assert [p.name for p in spool.root.iterdir()] == [k.replace("/", "_")]
    assert list(spool.tmp.iterdir()) == [] and mode(spool.path(k)) == 0o600
    assert len(spool) == 1
    p = spool.payload(k)
    assert p is not None and p.path == spool.path(k) and p.data is None
    assert p.open().read() == b"waiting object"
    assert p.size == 14 and p.sha256 == hashlib.sha256(b"waiting object").hexdigest()
    assert spool.payload(key(8)) is None

    spool.remove(k)
    spool.remove(k)
    assert len(spool) == 0 and spool.payload(k) is None
    for bad in BAD_KEYS:
        with pytest.raises(ValueError):
            spool.put(bad, Payload(data=b"x"))
        with pytest.raises(ValueError):
            spool.payload(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, "spool", "tmp"])
