"""Previews (imx/previews.py, viewer/previews.py): thumbnails and previews rendered after the ack by
render workers with memory and time limits, kept in the object store, served over HTTP.

Instances go in with dcmtk's storescu to a real ``imx serve``; images come out over real HTTP."""

from __future__ import annotations

import copy
import io
import json
import os
import resource
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from dicomfiles import expected_uid, make_ct_series, storescu
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from services import ImxServer, echoscu
from sqlalchemy import select

from imx.previews import JobFailed, RenderPool
from storage.index import Index, Instance, Rendition, Series, Study

DEMO_AE = "DEMOPACS"
STRICT_AE = "STRICTPACS"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)

    def image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.body))


def http(server: ImxServer, path: str, headers: dict[str, str] | None = None) -> Reply:
    """GET as the tests' admin (an API token) once the server has one."""
    auth = server.auth_headers() if server.admin_token else {}
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}{path}", headers={**auth, **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def renamed(src: Path, dest: Path, **attrs: object) -> Path:
    """A copy of ``src`` with new UIDs (never a duplicate of another test's) and ``attrs`` set."""
    ds = dcmread(src)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(dest, enforce_file_format=True)
    return dest


@dataclass
class Sent:
    ct: list[str]  # the node's UIDs of a five-instance CT series
    ct_series: str
    multiframe: str  # two-frame RGB, RLE
    too_short: str  # Rows x Columns far beyond its pixel data
    rle_bomb: str  # an RLE frame claiming 8000 x 8000 pixels
    good_after: str  # sent after the two bad ones
    report: str  # a structured report: no pixels
    quarantined: str
    refused_original: str  # the original SOP Instance UID of an instance the node refused
    strict_partner_id: int


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ImxServer, Sent]]:
    base = tmp_path_factory.mktemp("previews")
    server = ImxServer(
        base / "data",
        env={"IMX_PREVIEW_WORKERS": "1", "IMX_THUMBNAIL_SIZE": "64", "IMX_PREVIEW_TIMEOUT": "30"},
        workers=1,
    )
    server.start()
    try:
        data = server.data_dir
        uid = lambda original: expected_uid(data, 1, original)  # noqa: E731 (DEMO is partner 1)

        ct_paths = make_ct_series(base / "ct", 5)
        assert storescu(server.dicom_port, ct_paths).returncode == 0
        ct = [uid(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)) for p in ct_paths]

        multi = renamed(
            Path(get_testdata_file("SC_rgb_rle_2frame.dcm")),
            base / "multi.dcm",
            BurnedInAnnotation="NO",
        )
        ct_small = Path(get_testdata_file("CT_small.dcm"))
        short = renamed(ct_small, base / "short.dcm", Rows=4096, Columns=4096)
        bomb = renamed(
            Path(get_testdata_file("MR_small_RLE.dcm")), base / "bomb.dcm", Rows=8000, Columns=8000
        )
        r = storescu(server.dicom_port, [multi, short, bomb], extra=["-xr"])
        assert r.returncode == 0, r.stderr
        report = renamed(Path(get_testdata_file("test-SR.dcm")), base / "sr.dcm")
        good = renamed(ct_small, base / "good.dcm")
        assert storescu(server.dicom_port, [report, good]).returncode == 0

        held = renamed(
            Path(get_testdata_file("SC_rgb_small_odd.dcm")),
            base / "held.dcm",
            BurnedInAnnotation="YES",
        )
        assert storescu(server.dicom_port, [held]).returncode == 0

        # a partner whose policy refuses burned-in objects: the node refuses the instance
        assert server.imx("partner", "add", "STRICT", "--ae", STRICT_AE).returncode == 0
        policy = base / "strict.toml"
        policy.write_text('options = []\nburned_in = "reject"\n')
        set_policy = server.imx("partner", "policy", "STRICT", "--set", str(policy))
        assert set_policy.returncode == 0, set_policy.stderr
        refused = renamed(ct_small, base / "refused.dcm", BurnedInAnnotation="YES")
        storescu(server.dicom_port, [refused], aet=STRICT_AE)
        index = Index(f"sqlite:///{data / 'index.sqlite3'}")
        strict_id = index.partner_by_name("STRICT").id  # type: ignore[union-attr]
        with index.read() as s:
            ct_series = s.scalar(
                select(Series.series_uid)
                .join(Instance, Instance.series_id == Series.id)
                .where(Instance.sop_uid == ct[0])
            )
        index.close()

        sent = Sent(
            ct=ct,
            ct_series=str(ct_series),
            multiframe=uid(str(dcmread(multi, stop_before_pixels=True).SOPInstanceUID)),
            too_short=uid(str(dcmread(short, stop_before_pixels=True).SOPInstanceUID)),
            rle_bomb=uid(str(dcmread(bomb, stop_before_pixels=True).SOPInstanceUID)),
            good_after=uid(str(dcmread(good, stop_before_pixels=True).SOPInstanceUID)),
            report=uid(str(dcmread(report, stop_before_pixels=True).SOPInstanceUID)),
            quarantined=uid(str(dcmread(held, stop_before_pixels=True).SOPInstanceUID)),
            refused_original=str(dcmread(refused, stop_before_pixels=True).SOPInstanceUID),
            strict_partner_id=strict_id,
        )
        yield server, sent
    finally:
        server.stop()


@pytest.fixture(scope="module")
def index(served: tuple[ImxServer, Sent]) -> Iterator[Index]:
    server, _ = served
    ix = Index(f"sqlite:///{server.data_dir / 'index.sqlite3'}")
    yield ix
    ix.close()


def status_of(index: Index, sop_uid: str) -> tuple[str | None, str | None]:
    with index.read() as s:
        row = s.execute(
            select(Instance.preview_status, Instance.preview_reason).where(
                Instance.sop_uid == sop_uid
            )
        ).first()
    assert row is not None, "the instance is not in the index"
    return row[0], row[1]


def wait_settled(index: Index, sop_uids: list[str], timeout: float = 90.0) -> None:
    """Poll until the background workers have settled every one (bounded wait, not a timing test)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(status_of(index, u)[0] is not None for u in sop_uids):
            return
        time.sleep(0.2)
    raise AssertionError(
        f"not rendered after {timeout} s: {[status_of(index, u) for u in sop_uids]}"
    )


def renditions(index: Index, sop_uid: str) -> list[tuple[str, int, str, str]]:
    with index.read() as s:
        return [
            tuple(r)  # type: ignore[misc]
            for r in s.execute(
                select(Rendition.kind, Rendition.frame, Rendition.object_key, Rendition.media_type)
                .join(Instance, Rendition.instance_id == Instance.id)
                .where(Instance.sop_uid == sop_uid)
            )
        ]


# -- background rendering --------------------------------------------------------------------------
@pytest.mark.peer
@pytest.mark.slow
def test_previews_and_the_series_thumbnail_are_made_in_the_background_and_kept(
    served, index: Index
) -> None:
    server, sent = served
    wait_settled(index, sent.ct)
    assert all(status_of(index, u) == ("ok", None) for u in sent.ct)
    objects = server.data_dir / "objects"
    for u in sent.ct:
        kinds = renditions(index, u)
        preview = [r for r in kinds if r[0] == "preview"]
        assert [(k, f, mt) for k, f, _, mt in preview] == [("preview", 1, "image/jpeg")]
        key = preview[0][2]
        assert key.startswith("r/") and u not in key  # a generated key, never the UID
        assert Image.open(objects / key).format == "JPEG"
    # the thumbnail settles on the middle instance (instance number 3 of 5) once the series is done
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
        r[0] == "thumbnail" for r in renditions(index, sent.ct[2])
    ):
        time.sleep(0.2)
    thumbs = [r for u in sent.ct for r in renditions(index, u) if r[0] == "thumbnail"]
    assert [r[:2] for r in thumbs] == [("thumbnail", 1)]
    assert any(r[0] == "thumbnail" for r in renditions(index, sent.ct[2]))
    assert Image.open(objects / thumbs[0][2]).size == (64, 64)  # IMX_THUMBNAIL_SIZE


@pytest.mark.peer
@pytest.mark.slow
def test_default_answers_come_from_the_kept_renditions_with_etag_and_immutable_caching(
    served, index: Index
) -> None:
    server, sent = served
    wait_settled(index, sent.ct)
    r = http(server, f"/api/instances/{sent.ct[0]}/rendered")
    assert r.status == 200 and r.headers["content-type"] == "image/jpeg"
    key = next(k for kind, _, k, _ in renditions(index, sent.ct[0]) if kind == "preview")
    assert r.body == (server.data_dir / "objects" / key).read_bytes()
    assert r.headers["cache-control"] == "private, max-age=31536000, immutable"
    etag = r.headers["etag"]
    assert etag.startswith('"') and not etag.startswith("W/")
    again = http(server, f"/api/instances/{sent.ct[0]}/rendered", {"If-None-Match": etag})
    assert again.status == 304 and again.body == b"" and again.headers["etag"] == etag
    assert (
        http(server, f"/api/instances/{sent.ct[0]}/rendered", {"If-None-Match": '"other"'}).status
        == 200
    )
    assert r.image().size == (128, 128)  # CT_small: already inside the 512 px preview box

    t = http(server, f"/api/series/{sent.ct_series}/thumbnail")
    assert (
        t.status == 200 and t.headers["content-type"] == "image/jpeg" and t.image().size == (64, 64)
    )
    assert "etag" in t.headers and "cache-control" in t.headers
    assert (
        http(
            server, f"/api/series/{sent.ct_series}/thumbnail", {"If-None-Match": t.headers["etag"]}
        ).status
        == 304
    )


@pytest.mark.peer
@pytest.mark.slow
def test_formats_by_parameter_and_accept_header(served) -> None:
    server, sent = served
    u = sent.ct[1]
    magic = {"png": b"\x89PNG", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}
    tags = set()
    for fmt, media in (("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")):
        r = http(server, f"/api/instances/{u}/rendered?format={fmt}")
        assert (
            r.status == 200 and r.headers["content-type"] == media and r.body.startswith(magic[fmt])
        )
        assert r.headers["cache-control"] == "private, max-age=31536000, immutable"
        tags.add(r.headers["etag"])
        assert (
            http(
                server,
                f"/api/instances/{u}/rendered?format={fmt}",
                {"If-None-Match": r.headers["etag"]},
            ).status
            == 304
        )
    assert len(tags) == 3
    png = http(server, f"/api/instances/{u}/rendered", {"Accept": "image/png"})
    assert png.headers["content-type"] == "image/png"
    webp = http(server, f"/api/instances/{u}/rendered", {"Accept": "image/webp, image/png;q=0.5"})
    assert webp.headers["content-type"] == "image/webp"
    browser = http(
        server, f"/api/instances/{u}/rendered", {"Accept": "image/avif,image/webp,*/*;q=0.8"}
    )
    assert browser.headers["content-type"] == "image/webp"
    anything = http(server, f"/api/instances/{u}/rendered", {"Accept": "image/*"})
    assert anything.headers["content-type"] == "image/jpeg"
    refused = http(server, f"/api/instances/{u}/rendered", {"Accept": "application/json"})
    assert refused.status == 406 and refused.headers["content-type"] == "application/problem+json"


@pytest.mark.peer
@pytest.mark.slow
def test_a_window_changes_the_pixels_and_a_viewport_the_size(served) -> None:
    server, sent = served
    u = sent.ct[1]
    soft = np.asarray(http(server, f"/api/instances/{u}/rendered?format=png&window=40,400").image())
    bone = np.asarray(
        http(server, f"/api/instances/{u}/rendered?format=png&window=600,2800").image()
    )
    narrow = np.asarray(
        http(server, f"/api/instances/{u}/rendered?format=png&window=40,10").image()
    )
    assert soft.shape == bone.shape == (128, 128)
    assert not np.array_equal(soft, bone) and not np.array_equal(soft, narrow)
    assert (
        set(np.unique(narrow)) <= set(range(256)) and (narrow == 255).mean() > (soft == 255).mean()
    )
    small = http(server, f"/api/instances/{u}/rendered?size=32x32&format=png")
    assert small.image().size == (32, 32)
    assert http(server, f"/api/instances/{u}/rendered?viewport=48,48").image().size == (48, 48)
    a = http(server, f"/api/instances/{u}/rendered?window=40,400").headers["etag"]
    b = http(server, f"/api/instances/{u}/rendered?window=600,2800").headers["etag"]
    assert a != b


@pytest.mark.peer
@pytest.mark.slow
def test_frame_n_of_a_multiframe_instance(served, index: Index) -> None:
    server, sent = served
    wait_settled(index, [sent.multiframe])
    assert status_of(index, sent.multiframe) == ("ok", None)
    one = http(server, f"/api/instances/{sent.multiframe}/frames/1/rendered?format=png")
    two = http(server, f"/api/instances/{sent.multiframe}/frames/2/rendered?format=png")
    assert one.status == two.status == 200
    assert one.image().size == two.image().size == (100, 100)
    assert not np.array_equal(np.asarray(one.image()), np.asarray(two.image()))
    assert one.headers["etag"] != two.headers["etag"]
    # the default of frame 2 is rendered on first request, then kept
    assert not [r for r in renditions(index, sent.multiframe) if r[:2] == ("preview", 2)]
    kept = http(server, f"/api/instances/{sent.multiframe}/frames/2/rendered")
    assert kept.status == 200 and kept.headers["content-type"] == "image/jpeg"
    assert [r for r in renditions(index, sent.multiframe) if r[:2] == ("preview", 2)]
    assert http(server, f"/api/instances/{sent.multiframe}/frames/2/rendered").body == kept.body
    missing = http(server, f"/api/instances/{sent.multiframe}/frames/3/rendered")
    assert missing.status == 404 and "has 2" in missing.json()["detail"]


@pytest.mark.peer
@pytest.mark.slow
def test_bad_parameters_and_unknown_uids_get_problem_documents(served) -> None:
    server, sent = served
    u = sent.ct[0]
    for query in (
        "window=40",
        "window=a,b",
        "window=40,0",
        "size=0x10",
        "size=big",
        "format=gif",
        "quality=0",
        "quality=x",
        "viewport=1,2,3,4,5,6",
    ):
        r = http(server, f"/api/instances/{u}/rendered?{query}")
        assert r.status == 422, query
        assert r.headers["content-type"] == "application/problem+json" and r.json()["detail"], query
    assert http(server, f"/api/instances/{u}/frames/zero/rendered").status == 422
    for path in (
        "/api/instances/2.25.1/rendered",
        "/api/instances/2.25.1/frames/1/rendered",
        "/api/series/2.25.1/thumbnail",
    ):
        r = http(server, path)
        assert r.status == 404 and r.headers["content-type"] == "application/problem+json", path


# -- hostile objects -------------------------------------------------------------------------------
@pytest.mark.peer
@pytest.mark.slow
def test_objects_that_cannot_be_rendered_are_marked_with_a_reason_and_others_go_on(
    served, index: Index
) -> None:
    server, sent = served
    wait_settled(index, [sent.too_short, sent.rle_bomb, sent.good_after])
    status, reason = status_of(index, sent.too_short)
    assert status == "unrenderable" and "4096" in reason and "bytes" in reason
    status, reason = status_of(index, sent.rle_bomb)
    assert status == "unrenderable" and "RLE" in reason and "8000" in reason
    assert renditions(index, sent.too_short) == [] and renditions(index, sent.rle_bomb) == []
    wait_settled(index, [sent.report])
    assert status_of(index, sent.report) == (
        "unrenderable",
        "the instance has no pixel data (it is not an image)",
    )
    # the instance sent after them was rendered, and the node still answers
    assert status_of(index, sent.good_after) == ("ok", None)
    assert http(server, f"/api/instances/{sent.good_after}/rendered").status == 200
    assert echoscu(server.dicom_port, DEMO_AE).returncode == 0
    for u, word in ((sent.too_short, "4096"), (sent.rle_bomb, "RLE")):
        for q in ("", "?format=png&window=40,400"):
            r = http(server, f"/api/instances/{u}/rendered{q}")
            assert (
                r.status == 422
                and r.json()["title"] == "Unrenderable instance"
                and word in r.json()["detail"]
            )
    assert server.proc is not None and server.proc.poll() is None


@pytest.mark.peer
@pytest.mark.slow
def test_quarantined_instances_are_not_rendered(served, index: Index) -> None:
    server, sent = served
    wait_settled(index, sent.ct + [sent.good_after])
    assert status_of(index, sent.quarantined) == (None, None)  # waits for release; never rendered
    assert renditions(index, sent.quarantined) == []
    for path in (
        f"/api/instances/{sent.quarantined}/rendered",
        f"/api/instances/{sent.quarantined}/rendered?format=png",
    ):
        r = http(server, path)
        assert r.status == 403 and "quarantined" in r.json()["detail"]
    assert renditions(index, sent.quarantined) == []


@pytest.mark.peer
@pytest.mark.slow
def test_previews_are_never_made_before_the_ack(served, index: Index) -> None:
    server, sent = served
    wait_settled(index, sent.ct)
    refused = expected_uid(server.data_dir, sent.strict_partner_id, sent.refused_original)
    assert index.get_instance(refused) is None  # the node refused it: no row, so nothing queued
    assert renditions(index, refused) == []
    # every rendition object in the store belongs to a recorded rendition of an acknowledged instance
    with index.read() as s:
        recorded = {str(k) for (k,) in s.execute(select(Rendition.object_key))}
    on_disk = {
        p.relative_to(server.data_dir / "objects").as_posix()
        for p in (server.data_dir / "objects" / "r").rglob("*")
        if p.is_file()
    }
    assert on_disk == recorded and recorded


# -- the worker pool -------------------------------------------------------------------------------
@pytest.fixture
def pool() -> Iterator[RenderPool]:
    p = RenderPool(workers=1, memory_mb=512, timeout=20).start()
    yield p
    p.close()


def test_workers_run_under_the_memory_limit_and_one_that_exceeds_it_is_replaced(
    pool: RenderPool,
) -> None:
    soft, _hard = pool.call(resource.getrlimit, resource.RLIMIT_AS)
    assert soft == 512 * 1024 * 1024
    before = pool.pids()
    assert len(pool.call(bytearray, 64 * 1024 * 1024)) == 64 * 1024 * 1024  # within the limit
    with pytest.raises(JobFailed) as e:
        pool.call(bytearray, 1024 * 1024 * 1024)
    assert e.value.kind == "memory" and "512 MiB" in e.value.reason
    assert pool.replaced == 1 and pool.pids() != before and len(pool.pids()) == 1
    assert pool.call(len, b"abc") == 3  # the new worker works


def test_a_worker_that_overruns_its_time_or_dies_is_replaced(pool: RenderPool) -> None:
    first = pool.pids()
    with pytest.raises(JobFailed) as e:
        pool.call(time.sleep, 60, timeout=0.5)
    assert e.value.kind == "timeout"
    second = pool.pids()
    assert second != first
    with pytest.raises(JobFailed) as e:
        pool.call(os._exit, 7)
    assert e.value.kind == "crashed" and "exit code 7" in e.value.reason
    assert pool.pids() != second and pool.replaced == 2
    assert pool.call(sum, [1, 2, 3]) == 6


def test_the_renderer_refuses_dimensions_beyond_the_data_in_a_worker(
    pool: RenderPool, tmp_path: Path
) -> None:
    from imx.previews import render_job

    ds = dcmread(get_testdata_file("CT_small.dcm"))
    huge = copy.deepcopy(ds)
    huge.Rows = huge.Columns = 60000  # 3.6 G pixels: refused before anything is decoded
    buf = io.BytesIO()
    huge.save_as(buf, enforce_file_format=True)
    with pytest.raises(JobFailed) as e:
        pool.call(render_job, buf.getvalue(), [(1, None, None, "png", 90)], 192 * 1024 * 1024)
    assert e.value.kind == "unrenderable" and "60000" in e.value.reason
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    (png,) = pool.call(render_job, buf.getvalue(), [(1, None, None, "png", 90)], 192 * 1024 * 1024)
    assert Image.open(io.BytesIO(png)).size == (128, 128)


def test_a_worker_started_by_a_thread_that_ended_keeps_serving(pool: RenderPool) -> None:
    """Regression: PR_SET_PDEATHSIG follows the parent *thread*; a worker replaced by an HTTP
    thread that then ended was killed under its next job."""

    def crash() -> None:
        with pytest.raises(JobFailed):
            pool.call(os._exit, 1)

    t = threading.Thread(target=crash)
    t.start()
    t.join()
    (pid,) = pool.pids()
    pool.call(time.sleep, 0.5)  # time for a death signal, had one been sent at the thread's end
    assert pool.call(os.getpid) == pid and pool.replaced == 1


def test_images_need_credentials_from_any_host(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from imx.config import Settings, ensure_layout
    from imx.ingest import Archive
    from viewer.app import create_app

    settings = Settings.load(data_dir=tmp_path / "data")
    ensure_layout(settings)
    archive = Archive(settings)
    archive.index.migrate()
    try:
        app = create_app(archive)
        for path in (
            "/api/instances/2.25.1/rendered",
            "/api/instances/2.25.1/frames/1/rendered",
            "/api/series/2.25.1/thumbnail",
            # answered ahead of the router (viewer.previews.FastImages): the same 401
            "/dicomweb/studies/2.25.1/series/2.25.2/instances/2.25.3/rendered",
            "/dicomweb/studies/2.25.1/series/2.25.2/instances/2.25.3/frames/1/rendered",
        ):
            for host in ("127.0.0.1", "203.0.113.9"):
                r = TestClient(app, client=(host, 40000)).get(path)
                assert r.status_code == 401 and r.headers["www-authenticate"], (host, path)
                assert r.json()["detail"].startswith("Log in first"), path
                assert r.headers["x-content-type-options"] == "nosniff", path  # security headers
            bad = {"Authorization": "Bearer not-a-token"}
            assert TestClient(app).get(path, headers=bad).status_code == 401, path
        # a script's request loses the Basic challenge, as on every other route (viewer.ui)
        r = TestClient(app).get(
            "/dicomweb/studies/2.25.1/series/2.25.2/instances/2.25.3/rendered",
            headers={"Sec-Fetch-Mode": "cors"},
        )
        assert r.status_code == 401 and "Basic" not in r.headers["www-authenticate"]
    finally:
        archive.close()


def test_the_fast_image_paths_are_exactly_routes_of_the_app(tmp_path: Path) -> None:
    """FastImages answers only paths the router has a GET route for (the same path pattern), and
    sits inside the security headers."""
    from fastapi.routing import APIRoute

    from imx.config import Settings, ensure_layout
    from imx.ingest import Archive
    from viewer.app import create_app
    from viewer.previews import FastImages, route
    from viewer.ui import SecurityHeaders

    settings = Settings.load(data_dir=tmp_path / "data")
    ensure_layout(settings)
    archive = Archive(settings)
    try:
        app = create_app(archive)
        classes = [m.cls for m in app.user_middleware]
        assert classes.index(SecurityHeaders) < classes.index(FastImages)  # outer first
        (fast,) = [m for m in app.user_middleware if m.cls is FastImages]
        patterns = [p.pattern for p, _ in fast.kwargs["routes"]]

        def get_paths(routes: list) -> set[str]:  # included routers are kept whole, or flattened
            out = set()
            for r in routes:
                if isinstance(r, APIRoute) and "GET" in r.methods:
                    out.add(route(r.path).pattern)
                elif getattr(r, "original_router", None) is not None:
                    out |= get_paths(r.original_router.routes)
            return out

        gets = get_paths(app.routes)
        assert len(patterns) == 4 and set(patterns) <= gets
        assert route("/api/instances/{sop_uid}/frames/{n}/rendered").fullmatch(
            "/api/instances/2.25.1/frames/3/rendered"
        )
        assert not route("/api/instances/{sop_uid}/rendered").fullmatch(
            "/api/instances/2.25.1/x/rendered"
        )
    finally:
        archive.close()


def test_previews_started_on_demand_stop_their_workers_when_detached(tmp_path: Path) -> None:
    from imx import previews
    from imx.config import Settings, ensure_layout
    from imx.ingest import Archive

    settings = Settings.load(data_dir=tmp_path / "data")
    ensure_layout(settings)
    archive = Archive(settings)
    archive.index.migrate()
    try:
        svc = previews.for_archive(archive)
        assert previews.for_archive(archive) is svc
        workers = list(svc.pool._all)
        assert len(workers) == 1 and workers[0].alive
        with pytest.raises(previews.NotFound):
            previews.rendered(
                archive, "2.25.1", None, window=None, size=None, fmt="png", quality=90
            )
        previews.detach(archive)
        assert not workers[0].alive
        assert previews.for_archive(archive) is not svc  # a new one, started again
        previews.detach(archive)
    finally:
        archive.close()


def test_on_demand_renders_from_an_s3_store_follow_the_frame_plan(moto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With the production object store (S3 through minio, here moto on loopback) a worker gets
    the object's bytes, not a path: the job after the ack still keeps a frame plan from them, and
    on-demand renders over /api and DICOMweb give the pixels of the object read whole."""
    from authn import bearer
    from fastapi.testclient import TestClient

    from imaging.render import FramePlan, Window, render_frame
    from imx import previews
    from imx.config import Settings, ensure_layout
    from imx.ingest import Archive, PartnerRef
    from storage.query import Scope, instances
    from viewer.app import create_app

    settings = Settings.load(
        data_dir=tmp_path / "data",
        s3_endpoint=moto.endpoint,
        s3_access_key=moto.access_key,
        s3_secret_key=moto.secret_key,
        s3_bucket="render-plans",
    )
    ensure_layout(settings)
    archive = Archive(settings)
    archive.index.migrate()
    try:
        partner = PartnerRef.of(archive.index.add_partner("OSH", "OSHPACS", []))
        sops = [archive.ingest_file(partner, p).sop_instance_uid for p in make_ct_series(tmp_path / "ct", 2)]
        assert previews.for_archive(archive).run_pending() == 2
        client = TestClient(create_app(archive), client=("127.0.0.1", 40000), headers=bearer(archive.index))
        for sop in sops:
            target = archive.index.preview_target(sop)
            assert target is not None and FramePlan.from_json(target["render_plan"] or "") is not None
            expected = render_frame(dcmread(io.BytesIO(archive.store.get(target["object_key"]))), 1, window=Window(40, 400))
            (inst,) = instances(archive.index, Scope(None), sop_uids=[sop])
            for url in (
                f"/api/instances/{sop}/rendered?format=png&window=40,400",
                f"/dicomweb/studies/{inst.study_uid}/series/{inst.series_uid}/instances/{sop}/rendered?window=40,400",
            ):
                r = client.get(url, headers={"Accept": "image/png"})
                assert r.status_code == 200, r.text
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), expected), url
    finally:
        previews.detach(archive)
        archive.close()


@pytest.mark.peer
@pytest.mark.slow
def test_a_series_that_grows_gets_its_thumbnail_from_the_new_middle(
    served, index: Index, tmp_path: Path
) -> None:
    server, _ = served
    paths = make_ct_series(tmp_path / "grow", 5)
    first = paths[:1]
    assert storescu(server.dicom_port, first).returncode == 0
    uids = [
        expected_uid(server.data_dir, 1, str(dcmread(p, stop_before_pixels=True).SOPInstanceUID))
        for p in paths
    ]
    wait_settled(index, uids[:1])
    with index.read() as s:
        series_uid = s.scalar(
            select(Series.series_uid)
            .join(Instance, Instance.series_id == Series.id)
            .where(Instance.sop_uid == uids[0])
        )
    before = http(server, f"/api/series/{series_uid}/thumbnail")
    assert before.status == 200
    assert [r[0] for r in renditions(index, uids[0])].count("thumbnail") == 1

    assert storescu(server.dicom_port, paths[1:]).returncode == 0
    wait_settled(index, uids)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
        r[0] == "thumbnail" for r in renditions(index, uids[2])
    ):
        time.sleep(0.2)
    assert [u for u in uids if any(r[0] == "thumbnail" for r in renditions(index, u))] == [uids[2]]
    after = http(
        server, f"/api/series/{series_uid}/thumbnail", {"If-None-Match": before.headers["etag"]}
    )
    assert after.status == 200 and after.headers["etag"] != before.headers["etag"]
    assert after.headers["cache-control"] == "private, no-cache"  # it may change: revalidated


@pytest.mark.peer
@pytest.mark.slow
def test_a_kept_preview_lost_from_the_store_is_rendered_again_on_request(
    served, index: Index
) -> None:
    server, sent = served
    wait_settled(index, sent.ct)
    (old,) = [k for kind, frame, k, _ in renditions(index, sent.ct[4]) if kind == "preview"]
    (server.data_dir / "objects" / old).unlink()  # e.g. removed by imx check --repair as an orphan
    r = http(server, f"/api/instances/{sent.ct[4]}/rendered")
    assert r.status == 200 and r.headers["content-type"] == "image/jpeg"
    (new,) = [k for kind, frame, k, _ in renditions(index, sent.ct[4]) if kind == "preview"]
    assert new != old and (server.data_dir / "objects" / new).read_bytes() == r.body


@pytest.mark.peer
@pytest.mark.slow
def test_imx_check_knows_renditions_and_repair_keeps_them(served, index: Index) -> None:
    """Previews and thumbnails have rendition rows, not instance rows: `imx check --repair` must
    not take them for orphans and delete them."""
    server, sent = served
    wait_settled(index, sent.ct)
    kept = [k for uid in sent.ct for _, _, k, _ in renditions(index, uid)]
    assert kept
    run = server.imx("check", "--repair")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 objects without an index row" in run.stdout, run.stdout
    assert all((server.data_dir / "objects" / k).exists() for k in kept)


# -- WADO-RS metadata made by the same job, after the ack ------------------------------------------
def kept_metadata(index: Index, sop_uid: str) -> tuple[str, str, bytes] | None:
    """(the instance's object key, the key the kept metadata was made from, the DICOM JSON)."""
    from imaging.dicomjson import unpack
    from storage.index import InstanceMetadata

    with index.read() as s:
        row = s.execute(
            select(Instance.object_key, InstanceMetadata.object_key, InstanceMetadata.dicom_json)
            .join(InstanceMetadata, InstanceMetadata.instance_id == Instance.id)
            .where(Instance.sop_uid == sop_uid)
        ).first()
    return (row[0], row[1], unpack(row[2])) if row is not None else None


def wado_metadata(server: ImxServer, index: Index, sop_uid: str) -> tuple[str, bytes]:
    """(the instance's metadata URL, the WADO-RS answer's body)."""
    with index.read() as s:
        study, series = s.execute(
            select(Study.study_uid, Series.series_uid)
            .join(Series, Series.study_id == Study.id)
            .join(Instance, Instance.series_id == Series.id)
            .where(Instance.sop_uid == sop_uid)
        ).one()
    path = f"/dicomweb/studies/{study}/series/{series}/instances/{sop_uid}"
    r = http(server, path + "/metadata")
    assert r.status == 200 and r.headers["content-type"] == "application/dicom+json"
    return f"http://127.0.0.1:{server.http_port}{path}", r.body


def on_request(server: ImxServer, sop_uid: str, url: str) -> bytes:
    """What WADO-RS makes from the stored object when the index keeps nothing."""
    from imaging.dicomjson import encode_metadata, with_bulk_base
    from imx.config import Settings
    from imx.ingest import make_store

    ix = Index(f"sqlite:///{server.data_dir / 'index.sqlite3'}")
    try:
        row = ix.get_instance(sop_uid)
        assert row is not None
        data = make_store(Settings.load(data_dir=server.data_dir)).get(row.object_key)
    finally:
        ix.close()
    ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
    return b"[" + with_bulk_base(encode_metadata(ds), url + "/bulkdata") + b"]"


@pytest.mark.peer
@pytest.mark.slow
def test_metadata_is_made_after_the_ack_by_the_render_job_and_served_from_the_index(
    served, index: Index
) -> None:
    server, sent = served
    images, broken = sent.ct + [sent.multiframe], [sent.report, sent.too_short]
    wait_settled(index, images + broken)
    assert status_of(index, sent.report)[0] == "unrenderable"  # not an image: metadata all the same
    for uid in images + broken:
        kept = kept_metadata(index, uid)
        assert kept is not None, "no metadata kept for an instance the workers settled"
        key, made_from, encoded = kept
        assert made_from == key
        if uid in images:  # the pixel data by URI, under a placeholder for the request's base URL
            assert b'"7FE00010":{"vr":"O' in encoded and b"@@imx-bulkdata@@" in encoded
        url, body = wado_metadata(server, index, uid)
        assert (
            body == b"[" + encoded.replace(b"@@imx-bulkdata@@", (url + "/bulkdata").encode()) + b"]"
        )
        assert body == on_request(server, uid, url)  # byte for byte what was made on request
        assert json.loads(body)[0]["00080018"]["Value"] == [uid]
    # nothing of a quarantined instance is made or served
    assert kept_metadata(index, sent.quarantined) is None


@pytest.mark.peer
@pytest.mark.slow
def test_metadata_missing_from_the_index_is_made_on_request_and_kept(served, index: Index) -> None:
    """Instances stored before schema 0005, or whose job died, have no kept metadata: WADO-RS
    makes it from the object (the same bytes) and keeps it; a row made from another object (one
    replaced after masking) is not used."""
    from sqlalchemy import delete, update

    from imaging.dicomjson import pack
    from storage.index import InstanceMetadata

    server, sent = served
    uid = sent.ct[1]
    wait_settled(index, [uid])
    _, _, before = kept_metadata(index, uid)  # type: ignore[misc]
    with index.write() as s:
        iid = s.scalar(select(Instance.id).where(Instance.sop_uid == uid))
        s.execute(delete(InstanceMetadata).where(InstanceMetadata.instance_id == iid))
    url, body = wado_metadata(server, index, uid)
    assert body == on_request(server, uid, url)
    deadline = time.monotonic() + 30  # kept by a background thread after the answer
    while kept_metadata(index, uid) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    key, made_from, again = kept_metadata(index, uid)  # type: ignore[misc]
    assert made_from == key and again == before
    # kept for another object (as after masking replaced it): ignored, made again and replaced
    with index.write() as s:
        s.execute(
            update(InstanceMetadata)
            .where(InstanceMetadata.instance_id == iid)
            .values(object_key="i/elsewhere", dicom_json=pack(b'[{"not":"this"}]'))
        )
    assert wado_metadata(server, index, uid)[1] == body
    deadline = time.monotonic() + 30
    while kept_metadata(index, uid)[1] == "i/elsewhere" and time.monotonic() < deadline:  # type: ignore[index]
        time.sleep(0.1)
    key, made_from, again = kept_metadata(index, uid)  # type: ignore[misc]
    assert made_from == key and again == before


def test_the_workers_metadata_is_byte_for_byte_what_wado_rs_makes_on_request(
    pool: RenderPool,
) -> None:
    """For every object among pydicom's test files that pydicom reads: the metadata the render
    job makes from the whole object (read with pixels, in a worker) equals what WADO-RS makes from
    the object read without its pixels, renderable or not."""
    import glob

    import pydicom.data

    from imaging.dicomjson import encode_metadata, unpack
    from imx.previews import preview_job

    folder = Path(pydicom.data.__file__).parent / "test_files"
    compared = unrenderable = planned = 0
    for path in sorted(glob.glob(str(folder / "**" / "*.dcm"), recursive=True)):
        try:
            expected = encode_metadata(dcmread(path, stop_before_pixels=True))
        except Exception:
            continue  # deliberately broken files pydicom cannot read
        packed, plan, out = pool.call(
            preview_job, path, [(1, None, (32, 32), "jpeg", 90)], 256 * 1024 * 1024
        )
        assert packed is not None and unpack(packed) == expected, Path(path).name
        compared += 1
        unrenderable += isinstance(out, str)
        planned += plan is not None
        assert plan is None or not isinstance(out, str)
    assert compared > 60 and unrenderable > 0 and planned > 0


def test_a_job_handed_over_from_the_event_loop_gives_what_a_thread_gets(pool: RenderPool) -> None:
    """RenderPool.call_async (the on-demand render route's path): the value, the same failures
    and replacements as call(), and a caller that goes away leaves no reply for the next one."""
    import asyncio

    async def scenario() -> None:
        assert await pool.call_async(sum, [1, 2, 3]) == 6
        with pytest.raises(JobFailed) as e:
            await pool.call_async(time.sleep, 60, timeout=0.5)
        assert e.value.kind == "timeout" and pool.replaced == 1
        with pytest.raises(JobFailed) as e:
            await pool.call_async(os._exit, 3)
        assert e.value.kind == "crashed" and "exit code 3" in e.value.reason
        abandoned = asyncio.ensure_future(pool.call_async(time.sleep, 0.5))
        await asyncio.sleep(0.1)
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        # the next caller waits for the worker and gets its own answer, not the abandoned one's
        assert await pool.call_async(len, b"four") == 4
        both = await asyncio.gather(pool.call_async(len, b"ab"), pool.call_async(len, b"abc"))
        assert both == [2, 3]  # the second found no idle worker and waited in a thread

    asyncio.run(scenario())


def test_a_worker_keeps_parsed_objects_for_the_next_render_and_renders_the_same(
    pool: RenderPool,
) -> None:
    from imx.previews import render_job

    path = str(get_testdata_file("CT_small.dcm"))
    spec = [(1, (40.0, 400.0), None, "png", 90)]
    cold = pool.call(render_job, path, spec, 192 * 1024 * 1024)
    first = pool.call(render_job, path, spec, 192 * 1024 * 1024, "k:1")
    # a render under the same key comes from what the worker kept: it does not read the source
    again = pool.call(render_job, "/nonexistent/object.dcm", spec, 192 * 1024 * 1024, "k:1")
    assert cold == first == again
    with pytest.raises(JobFailed) as e:  # another key is read afresh
        pool.call(render_job, "/nonexistent/object.dcm", spec, 192 * 1024 * 1024, "k:2")
    assert e.value.kind == "unrenderable"


def test_a_worker_renders_from_a_frame_plan_what_it_renders_from_a_parse(pool: RenderPool) -> None:
    """planned_job: the same image as render_job; the mapping is kept under the key like a
    parsed object; a plan that does not fit the object, or of another version, falls back to
    a parse."""
    from dataclasses import replace

    from imaging.dicomio import locate_stored
    from imaging.render import FramePlan, plan_frames
    from imx.previews import planned_job, render_job

    path = str(get_testdata_file("CT_small.dcm"))
    plan = plan_frames(*locate_stored(path))
    assert plan is not None
    budget = 192 * 1024 * 1024
    for spec in ([(1, (40.0, 400.0), None, "png", 90)], [(1, None, (64, 64), "jpeg", 80)]):
        parsed = pool.call(render_job, path, spec, budget)
        assert pool.call(planned_job, path, plan.to_json(), spec, budget) == parsed
        assert pool.call(planned_job, path, plan.to_json(), spec, budget, "p:1") == parsed
        assert pool.call(planned_job, "/nonexistent/object.dcm", plan.to_json(), spec, budget, "p:1") == parsed
        misfit = replace(plan, offset=10**9).to_json()
        assert pool.call(planned_job, path, misfit, spec, budget) == parsed
        assert pool.call(planned_job, path, plan.to_json().replace('"v":1', '"v":99'), spec, budget) == parsed
    with pytest.raises(JobFailed) as e:
        pool.call(planned_job, "/nonexistent/object.dcm", plan.to_json(), spec, budget, "p:2")
    assert e.value.kind == "unrenderable" and FramePlan.from_json(plan.to_json()) == plan


def test_a_reply_larger_than_the_pipe_buffer_reaches_an_event_loop_of_uvloop(
    pool: RenderPool,
) -> None:
    """uvloop makes the descriptor it watches non-blocking: a reply arriving in pieces then made
    ``Connection.recv`` fail ('the renderer process died (exit code None)') until call_async
    gave the pipe back its blocking mode."""
    import uvloop

    async def scenario() -> None:
        for n in (10, 4 * 1024 * 1024, 300_000, 4 * 1024 * 1024):
            assert len(await pool.call_async(os.urandom, n)) == n
        assert pool.replaced == 0
        assert pool.call(len, b"x" * 5_000_000) == 5_000_000  # and call() after it

    uvloop.run(scenario())


@pytest.mark.peer
@pytest.mark.slow
def test_on_demand_renders_follow_the_frame_plan_kept_for_the_current_object(
    served, index: Index
) -> None:
    """The job after the ack keeps a frame plan for an uncompressed greyscale CT (none for an
    RGB RLE object), and on-demand renders are made from it without a parse: the pixels the
    parsed object gives; the worker follows the plan the index keeps (a doctored one inverts
    the image), and a plan made from another object than the instance's current one is not
    used. (DICOMweb /rendered reads the instance's row on every request.)"""
    from sqlalchemy import update

    from imaging.render import FramePlan, Window, render_frame
    from imx.config import Settings
    from imx.ingest import make_store
    from storage.index import InstanceMetadata

    server, sent = served
    u = sent.ct[3]
    wait_settled(index, [u, sent.multiframe])
    target = index.preview_target(u)
    assert target is not None and index.preview_target(sent.multiframe)["render_plan"] is None  # type: ignore[index]
    plan = FramePlan.from_json(target["render_plan"] or "")
    assert plan is not None and (plan.rows, plan.cols, plan.bits_allocated) == (128, 128, 16)
    stored = dcmread(io.BytesIO(make_store(Settings.load(data_dir=server.data_dir)).get(target["object_key"])))
    expected = render_frame(stored, 1, window=Window(40, 400))
    with index.read() as s:
        study, series = s.execute(
            select(Study.study_uid, Series.series_uid)
            .join(Series, Series.study_id == Study.id)
            .where(Series.id == target["series_id"])
        ).one()
    path = f"/dicomweb/studies/{study}/series/{series}/instances/{u}/rendered?window=40,400"

    def pixels() -> np.ndarray:
        r = http(server, path, {"Accept": "image/png"})
        assert r.status == 200, r.body
        return np.asarray(r.image())

    def set_row(**values: object) -> None:
        with index.write() as s:
            s.execute(update(InstanceMetadata).where(InstanceMetadata.instance_id == target["id"]).values(**values))

    assert np.array_equal(pixels(), expected)
    doctored = FramePlan(**{**plan.__dict__, "inverted": not plan.inverted})
    try:
        set_row(render_plan=doctored.to_json())
        assert np.array_equal(pixels(), 255 - expected)  # the plan, not the header, was followed
        set_row(object_key="obj/another-object")  # a plan of another object: the object is parsed
        assert np.array_equal(pixels(), expected)
    finally:
        set_row(object_key=target["object_key"], render_plan=target["render_plan"])


@pytest.mark.peer
@pytest.mark.slow
def test_visible_target_is_the_retrieve_rule_in_one_prepared_select(served, index: Index) -> None:
    """viewer.previews.visible_target answers what storage.query.instances finds, for every
    scope shape, study and series given or not, and its row is the renderer's own look-up's."""
    from storage.query import Scope, instances
    from viewer.previews import visible_target

    _, sent = served
    (si,) = instances(index, Scope(None), sop_uids=[sent.ct[0]])
    demo = Scope(1)
    for scope, expected in (
        (Scope(None), True),
        (demo, True),
        (Scope(sent.strict_partner_id), False),
        (Scope(None, study_id=-1), False),
        (Scope(None, specialist_id=-1), False),  # no consultation: nothing
    ):
        for study, series in ((None, None), (si.study_uid, None), (si.study_uid, si.series_uid)):
            got = visible_target(index, scope, sent.ct[0], study_uid=study, series_uid=series)
            assert (got is not None) is expected, (scope, study, series)
            found = instances(
                index, scope, study_uid=study, series_uid=series, sop_uids=[sent.ct[0]]
            )
            assert (got is not None) is bool(found)
            if got is not None:
                assert got == index.preview_target(sent.ct[0])
    other_series = instances(index, Scope(None), sop_uids=[sent.good_after])[0].series_uid
    assert visible_target(index, demo, sent.ct[0], series_uid=other_series) is None
    assert visible_target(index, demo, sent.ct[0], study_uid="2.25.1") is None
    assert visible_target(index, Scope(None), sent.quarantined) is None  # held back: as instances()
    assert visible_target(index, Scope(None), "2.25." + "1" * 70) is None  # no UID is that long
    assert visible_target(index, Scope(None), "2.25.1") is None


@pytest.mark.peer
@pytest.mark.slow
def test_dicomweb_rendered_frames_take_the_fast_path_with_the_routes_answers(
    served, index: Index
) -> None:
    """WADO-RS /rendered over a real server: the image, ETag and caching of the route, 304, the
    security headers, and 404 for an instance named under another series or study."""
    from storage.query import Scope, instances

    server, sent = served
    wait_settled(index, sent.ct)
    (si,) = instances(index, Scope(None), sop_uids=[sent.ct[1]])
    base = f"/dicomweb/studies/{si.study_uid}/series/{si.series_uid}/instances/{si.sop_uid}"
    r = http(server, f"{base}/frames/1/rendered?window=40,400")
    assert r.status == 200 and r.headers["content-type"] == "image/jpeg", r.body[:200]
    assert r.headers["cache-control"] == "private, max-age=31536000, immutable"
    assert r.headers["vary"] == "Accept" and r.headers["x-content-type-options"] == "nosniff"
    assert r.image().size == (si.columns, si.rows)
    again = http(server, f"{base}/frames/1/rendered?window=40,400")
    assert again.body == r.body and again.headers["etag"] == r.headers["etag"]
    first = http(server, f"{base}/rendered?window=40,400")
    assert first.headers["etag"] == r.headers["etag"]  # /rendered is frame 1
    cached = http(server, f"{base}/rendered?window=40,400", {"If-None-Match": r.headers["etag"]})
    assert cached.status == 304 and cached.headers["etag"] == r.headers["etag"]
    png = http(server, f"{base}/rendered", {"Accept": "image/png"})
    assert png.status == 200 and png.headers["content-type"] == "image/png"
    other = instances(index, Scope(None), sop_uids=[sent.good_after])[0]
    for path in (
        f"/dicomweb/studies/{si.study_uid}/series/{other.series_uid}/instances/{si.sop_uid}/rendered",
        f"/dicomweb/studies/{other.study_uid}/series/{si.series_uid}/instances/{si.sop_uid}/rendered",
        f"/dicomweb/studies/{si.study_uid}/series/{si.series_uid}/instances/2.25.1/rendered",
    ):
        assert http(server, path).status == 404, path
    assert http(server, f"{base}/frames/2/rendered").status == 404  # one frame only
    assert http(server, f"{base}/frames/1,1/rendered").status == 400
    assert http(server, f"{base}/rendered?window=wide").status == 400
    assert http(server, f"{base}/rendered", {"Accept": "image/gif"}).status == 406
    assert (
        http(server, f"/dicomweb/studies/{si.study_uid}/series/x!/instances/1/rendered").status
        == 400
    )
    # the same answer as the /api route for the same instance and parameters
    api = http(server, f"/api/instances/{si.sop_uid}/frames/1/rendered?window=40,400&format=jpeg")
    assert api.status == 200 and api.body == r.body
