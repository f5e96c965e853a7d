"""Shared fixtures: real PostgreSQL and S3 (moto's standalone server) on loopback, and a running
``imx serve``. Services start once per session and stop at its end; nothing is mocked."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from services import ImxServer, MotoServer, start_moto, start_postgres  # noqa: E402
from sqlalchemy import text  # noqa: E402

from storage.index import Base, Index  # noqa: E402

pytest_plugins = ["browser"]  # Playwright fixtures (browser, page, viewer_server): tests/browser.py

os.environ.setdefault("TCP_NODELAY", "1")  # dcmtk stalls 40 ms per C-STORE without it


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL database: IMX_TEST_DATABASE_URL if given, else a cluster started here."""
    given = os.environ.get("IMX_TEST_DATABASE_URL")
    if given:
        yield given
        return
    url, stop = start_postgres()
    try:
        yield url
    finally:
        stop()


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    server = start_moto()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def imx_server(tmp_path: Path) -> Iterator[ImxServer]:
    """A running ``imx serve`` on free ports with its own data folder (filesystem store, SQLite)."""
    server = ImxServer(tmp_path / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Index]:
    """An empty, migrated index on SQLite and on PostgreSQL (tests using it run on both)."""
    if request.param == "sqlite":
        idx = Index(f"sqlite:///{tmp_path}/i.sqlite3")
    else:
        idx = Index(request.getfixturevalue("pg_url"))
        Base.metadata.drop_all(idx.engine)  # each test starts from an empty database
        with idx.engine.begin() as c:
            c.execute(text("DROP TABLE IF EXISTS alembic_version"))
    idx.migrate()
    try:
        yield idx
    finally:
        idx.close()
