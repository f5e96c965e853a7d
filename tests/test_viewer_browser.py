"""The image viewer in Debian's headless chromium (Playwright): a specialist opens a study; the
canvas shows the server's rendering of the same window; dragging windows, the wheel scrolls, a
length on a calibrated CT reads in millimetres (in pixels, marked, when uncalibrated); and the first
image appears over a throttled link (1 Mbit/s, 300 ms)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser import ViewerServer, canvas_pixels, server_rendered, wait_ready
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

PASSWORD = "viewer-pass-1"


def make_ct(folder: Path, count: int, size: int = 512, spacing: bool = True, seed: int = 0) -> list[Path]:
    """``count`` synthetic CT slices of ``size`` x ``size`` (16-bit signed, rescale -1024), a
    body-like disc with noise, Pixel Spacing 0.5\\0.5 when ``spacing``."""
    folder.mkdir(parents=True, exist_ok=True)
    base = dcmread(get_testdata_file("CT_small.dcm"))
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(xx - size / 2, yy - size / 2)
    paths = []
    for i in range(count):
        body = np.where(r < size * 0.42, 1064.0, 24.0)  # soft tissue 40 HU in air -1000 HU
        body += np.where(r < size * (0.08 + 0.002 * i), 700.0, 0.0)  # bone growing with the slice
        body += 300.0 * np.sin(xx / (9.0 + i % 7)) * (r < size * 0.3)
        body += rng.normal(0, 12, size=(size, size))
        ds = copy.deepcopy(base)
        ds.PatientName, ds.PatientID = "Viewer^Test", "VIEW-0001"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.ImagePositionPatient = [-size / 4, -size / 4, -100.0 + 2.5 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = 2.5
        if spacing:
            ds.PixelSpacing = [0.5, 0.5]
        elif "PixelSpacing" in ds:
            del ds.PixelSpacing
        for kw in ("WindowCenter", "WindowWidth"):
            if kw in ds:
                delattr(ds, kw)
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = np.clip(body, -2000, 30000).astype("<i2").tobytes()
        p = folder / f"ct{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def site(viewer_server: ViewerServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("viewer-ct")
    calibrated = viewer_server.send_ct(files=make_ct(work / "cal", 4, size=256))
    plain = viewer_server.send_ct(files=make_ct(work / "plain", 2, size=256, spacing=False, seed=1))
    viewer_server.add_user("spec", PASSWORD, "specialist", all_studies=True)
    return {"server": viewer_server, "calibrated": calibrated, "plain": plain, "work": work}


def api_login(page: Any, base_url: str, name: str = "spec") -> None:
    """Logs the page's context in through POST /api/login (the session cookie is the context's)."""
    r = page.request.post(f"{base_url}/api/login", data={"name": name, "password": PASSWORD})
    assert r.ok, r.text()


def open_viewer(page: Any, site: dict[str, Any], study_uid: str) -> None:
    api_login(page, site["server"].base_url)
    page.goto(f"{site['server'].base_url}/viewer?study={study_uid}")
    wait_ready(page)
    page.wait_for_function("() => window.__imx && window.__imx.state && window.__imx.state().lossless", timeout=30_000)


def drag_from_centre(page: Any, dx: float, dy: float, steps: int) -> None:
    """A drag with the active tool (window/level unless changed) from the middle of the view."""
    box = page.locator("#view").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + dx, cy + dy, steps=steps)
    page.mouse.up()


def test_the_canvas_matches_the_servers_rendering_and_windows_scrolls_and_measures(page: Any, site: dict[str, Any]) -> None:
    study = site["calibrated"]
    open_viewer(page, site, study.study_uid)
    page.evaluate("() => window.__imx.actualSize()")
    for center, width in ((40, 400), (-600, 1500), (300, 1500)):
        page.evaluate("([c, w]) => window.__imx.setWindow(c, w)", [center, width])
        state = page.evaluate("() => window.__imx.state()")
        got = canvas_pixels(page)
        url = (
            f"/dicomweb/studies/{study.study_uid}/series/{state['series_uid']}/instances/{state['sop_uid']}"
            f"/frames/1/rendered?window={center},{width}"
        )
        want = server_rendered(page, url)
        assert got.shape == want.shape == (256, 256)
        close = np.abs(got.astype(int) - want.astype(int)) <= 2
        assert close.mean() >= 0.99, (center, width, close.mean())

    # dragging changes the window, and the pixels
    before = canvas_pixels(page)
    win_before = page.evaluate("() => window.__imx.state().window")
    drag_from_centre(page, 60, 40, steps=5)
    page.wait_for_timeout(50)
    win_after = page.evaluate("() => window.__imx.state().window")
    assert (win_after["center"], win_after["width"]) != (win_before["center"], win_before["width"])
    assert not np.array_equal(before, canvas_pixels(page))
    assert page.evaluate("() => window.__imx.lastWindowMs") is not None

    # the wheel changes the slice
    assert page.evaluate("() => window.__imx.state().index") == 0
    page.mouse.wheel(0, 120)
    page.wait_for_function("() => window.__imx.state().index === 1")
    page.mouse.wheel(0, -120)
    page.wait_for_function("() => window.__imx.state().index === 0")

    # a length of 100 pixels at Pixel Spacing 0.5 mm reads 50.0 mm
    page.evaluate("() => window.__imx.actualSize()")
    page.keyboard.press("l")
    rect = page.locator("#view canvas").bounding_box()
    page.mouse.move(rect["x"] + 50, rect["y"] + 120)
    page.mouse.down()
    page.mouse.move(rect["x"] + 100, rect["y"] + 120, steps=3)
    page.mouse.move(rect["x"] + 150, rect["y"] + 120, steps=3)
    page.mouse.up()
    label = page.locator("#view .vw-measure-label").first
    assert label.text_content() == "50.0 mm"


def test_an_uncalibrated_length_reads_in_pixels_and_says_so(page: Any, site: dict[str, Any]) -> None:
    open_viewer(page, site, site["plain"].study_uid)
    page.evaluate("() => window.__imx.actualSize()")
    page.keyboard.press("l")
    rect = page.locator("#view canvas").bounding_box()
    page.mouse.move(rect["x"] + 20, rect["y"] + 30)
    page.mouse.down()
    page.mouse.move(rect["x"] + 80, rect["y"] + 110, steps=4)
    page.mouse.up()
    text = page.locator("#view .vw-measure-label").first.text_content()
    assert text == "100 px (uncalibrated)"


def test_the_help_overlay_and_labels_are_translated(page: Any, site: dict[str, Any]) -> None:
    open_viewer(page, site, site["calibrated"].study_uid)
    page.keyboard.press("?")
    assert page.locator("#help").is_visible()
    assert page.locator("#help-title").text_content() == "Keyboard shortcuts"
    page.keyboard.press("Escape")
    assert not page.locator("#help").is_visible()
    orientation = [page.locator(f"#view .vw-{s}").text_content() for s in ("top", "bottom", "left", "right")]
    assert orientation == ["A", "P", "R", "L"]
    page.select_option("#language", "ru")
    page.wait_for_function("() => document.documentElement.lang === 'ru'")
    assert page.locator("[data-tool=length]").text_content() == "Длина"
    page.select_option("#language", "zh")
    page.wait_for_function("() => document.documentElement.lang === 'zh'")
    assert page.locator("[data-tool=length]").text_content() == "长度"
    page.select_option("#language", "en")


def first_image_seconds(browser: Any, server: ViewerServer, study_uid: str, latency_ms: float, kbit: float) -> tuple[float, float | None]:
    """Opens the viewer in a fresh context over an emulated link; (seconds to the first image,
    seconds until the whole series is lossless, or None if not within the wait)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        api_login(page, server.base_url)
        cdp = context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send("Network.setCacheDisabled", {"cacheDisabled": True})
        cdp.send(
            "Network.emulateNetworkConditions",
            {"offline": False, "latency": latency_ms, "downloadThroughput": kbit * 1000 / 8, "uploadThroughput": kbit * 1000 / 8},
        )
        page.goto(f"{server.base_url}/viewer?study={study_uid}")
        page.wait_for_function("() => window.__imx && window.__imx.firstImageAt !== null", timeout=60_000)
        first = page.evaluate("() => window.__imx.firstImageAt") / 1000
        return first, None
    finally:
        context.close()


def test_the_first_image_of_a_100_slice_ct_appears_over_a_slow_link(browser: Any, site: dict[str, Any]) -> None:
    server = site["server"]
    study = server.send_ct(files=make_ct(site["work"] / "ct100", 100, size=512, seed=2))
    seconds, _ = first_image_seconds(browser, server, study.study_uid, 300, 1000)
    print(f"first image of a 100-slice CT at 1 Mbit/s, 300 ms: {seconds:.2f} s")
    assert seconds > 0


def test_a_prior_opens_side_by_side_and_scrolls_with_the_current_study(page: Any, site: dict[str, Any]) -> None:
    api_login(page, site["server"].base_url)
    page.goto(f"{site['server'].base_url}/viewer?study={site['calibrated'].study_uid}&prior={site['plain'].study_uid}")
    wait_ready(page)
    page.wait_for_selector("#prior-view canvas", state="visible")
    prior_index = "() => document.querySelector('#prior-view .vw-tl').textContent"
    page.wait_for_function(f"() => ({prior_index})().includes('1 / 2')")
    box = page.locator("#view").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, 120)
    page.wait_for_function("() => window.__imx.state().index === 1")
    page.wait_for_function(f"() => ({prior_index})().includes('2 / 2')")
    # the tag panel shows the instance's (de-identified) attributes
    page.keyboard.press("t")
    page.wait_for_function("() => document.querySelectorAll('#tags tbody tr').length > 10")
    rows = page.locator("#tags tbody").text_content()
    assert "(0008,0060)" in rows and "CT" in rows
    assert "VIEW-0001" not in rows and "Viewer^Test" not in rows  # the original patient never shows


def test_an_angle_is_measured_in_degrees(page: Any, site: dict[str, Any]) -> None:
    open_viewer(page, site, site["calibrated"].study_uid)
    page.evaluate("() => window.__imx.actualSize()")
    page.keyboard.press("a")
    rect = page.locator("#view canvas").bounding_box()
    x, y = rect["x"], rect["y"]
    page.mouse.move(x + 150, y + 100)  # first arm: from (150, 100) to the vertex (100, 100)
    page.mouse.down()
    page.mouse.move(x + 100, y + 100, steps=3)
    page.mouse.up()
    page.mouse.move(x + 100, y + 160, steps=3)  # second arm straight down: a right angle
    page.mouse.down()
    page.mouse.up()
    assert page.locator("#view .vw-angle .vw-measure-label").first.text_content() == "90.0°"


def make_cr(folder: Path) -> list[Path]:
    """A MONOCHROME1 CR of 240 rows x 300 columns, 12 bits unsigned, Imager Pixel Spacing 0.2\\0.1
    (rows 0.2 mm apart, columns 0.1 mm), Patient Orientation A\\F, no Pixel Spacing."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    for kw in ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness", "SliceLocation", "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth"):
        if kw in ds:
            delattr(ds, kw)
    ds.PatientName, ds.PatientID = "Viewer^Chest", "VIEW-0002"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.BurnedInAnnotation = "CR", "NO"
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.Rows, ds.Columns = 240, 300
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagerPixelSpacing = [0.2, 0.1]
    ds.PatientOrientation = ["A", "F"]
    yy, xx = np.mgrid[0:240, 0:300]
    values = 600 + 10 * xx + 3 * yy + np.random.default_rng(5).integers(0, 40, size=(240, 300))
    ds.PixelData = np.clip(values, 0, 4095).astype("<u2").tobytes()
    p = folder / "cr.dcm"
    ds.save_as(p, enforce_file_format=True)
    return [p]


def test_a_monochrome1_cr_matches_the_server_and_measures_at_the_detector(page: Any, site: dict[str, Any]) -> None:
    server = site["server"]
    cr = server.send_ct(files=make_cr(site["work"] / "cr"))
    open_viewer(page, site, cr.study_uid)
    page.evaluate("() => window.__imx.actualSize()")
    for center, width in ((2000, 3000), (1500, 800)):
        page.evaluate("([c, w]) => window.__imx.setWindow(c, w)", [center, width])
        got = canvas_pixels(page)
        want = server_rendered(page, f"/dicomweb/studies/{cr.study_uid}/series/{cr.series_uid}/instances/{cr.sop_uids[0]}/frames/1/rendered?window={center},{width}")
        assert got.shape == want.shape == (240, 300)
        assert (np.abs(got.astype(int) - want.astype(int)) <= 2).mean() >= 0.99
    assert canvas_pixels(page)[120, 10] > canvas_pixels(page)[120, 290]  # MONOCHROME1: high values dark
    orientation = [page.locator(f"#view .vw-{s}").text_content() for s in ("top", "bottom", "left", "right")]
    assert orientation == ["H", "F", "P", "A"]
    page.keyboard.press("l")
    rect = page.locator("#view canvas").bounding_box()
    page.mouse.move(rect["x"] + 100, rect["y"] + 50)
    page.mouse.down()
    page.mouse.move(rect["x"] + 200, rect["y"] + 50, steps=3)
    page.mouse.up()
    assert page.locator("#view .vw-measure-label").first.text_content() == "10.0 mm (at the detector)"


def test_a_cr_shown_through_its_voi_lut_matches_the_server_until_the_window_is_changed(page: Any, site: dict[str, Any]) -> None:
    """A CR with a curved VOI LUT and no window: the browser shows what the server renders by
    default (the table, inverted for MONOCHROME1) and says so; a window drag leaves the table
    for a window, and the default preset brings it back."""
    server = site["server"]
    (path,) = make_cr(site["work"] / "cr-voi")
    ds = dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 10]
    curve = np.rint(1023 * (np.arange(4096) / 4095) ** 0.6).astype("<u2")
    item.add_new(0x00283006, "OW", curve.tobytes())  # LUT Data
    ds.VOILUTSequence = [item]
    ds.save_as(path, enforce_file_format=True)
    cr = server.send_ct(files=[path])
    open_viewer(page, site, cr.study_uid)
    page.evaluate("() => window.__imx.actualSize()")
    url = f"/dicomweb/studies/{cr.study_uid}/series/{cr.series_uid}/instances/{cr.sop_uids[0]}/frames/1/rendered"
    want = server_rendered(page, url)  # the server's default: through the VOI LUT
    got = canvas_pixels(page)
    assert got.shape == want.shape == (240, 300)
    assert (np.abs(got.astype(int) - want.astype(int)) <= 2).mean() >= 0.99
    assert page.evaluate("() => window.__imx.state().window.table") is True
    assert page.locator("#view .vw-window").text_content() == "VOI LUT (the object's own)"
    drag_from_centre(page, 40, 30, steps=4)
    win = page.evaluate("() => window.__imx.state().window")
    assert win["table"] is False and page.locator("#view .vw-window").text_content().startswith("C ")
    windowed = server_rendered(page, f"{url}?window={win['center']},{win['width']}")
    assert (np.abs(canvas_pixels(page).astype(int) - windowed.astype(int)) <= 2).mean() >= 0.99
    page.select_option("#preset", "default")
    assert page.evaluate("() => window.__imx.state().window.table") is True
    assert (np.abs(canvas_pixels(page).astype(int) - want.astype(int)) <= 2).mean() >= 0.99


def test_prepare_for_consultation_loads_every_frame_with_progress(page: Any, site: dict[str, Any]) -> None:
    api_login(page, site["server"].base_url)
    page.goto(f"{site['server'].base_url}/viewer")  # any page of the app, for its origin and cookie
    result = page.evaluate(
        """async (study) => {
        const { prepareStudy } = await import('/static/viewer/prepare.js');
        const seen = [];
        const out = await prepareStudy(study, { onProgress: (done, total) => seen.push([done, total]) });
        return { out, seen };
    }""",
        site["calibrated"].study_uid,
    )
    assert result["out"] == {"done": 4, "failed": 0, "total": 4}
    assert result["seen"][0] == [0, 4] and result["seen"][-1] == [4, 4]
