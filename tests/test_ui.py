"""The web UI shell through Debian's headless chromium: login, worklist, consultation page,
languages, partner isolation, admin pages, and that nothing is fetched from outside the app.
Screenshots of each test are kept under test-artifacts/screenshots/."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser import (
    ADMIN,
    SCREENSHOTS,
    ViewerServer,
    canvas_pixels,
    login,
    record_requests,
    server_rendered,
    wait_ready,
)

from viewer.i18n_server import format_datetime

STATIC = Path(__file__).resolve().parent.parent / "viewer" / "static"
PASSWORD = "correct-horse-7"


class World:
    """What the module's tests share: users, two hospitals' studies, one consultation."""

    server: ViewerServer
    demo_study: Any
    osh_study: Any
    prior_study: Any
    consultation: dict
    scheduled_utc: dt.datetime


@pytest.fixture(scope="module")
def world(viewer_server: ViewerServer) -> World:
    w = World()
    w.server = s = viewer_server
    s.set_partner_time_zone("DEMO", "Asia/Almaty")
    s.add_partner("OSH-CITY", "OSHPACS", time_zone="Asia/Bishkek")
    s.add_user("dr-li", PASSWORD, "specialist")
    s.add_user("dr-ru", PASSWORD, "specialist")
    s.add_user("dr-zh", PASSWORD, "specialist")
    s.add_user("demo-rad", PASSWORD, "partner", partner="DEMO")
    s.add_user("osh-rad", PASSWORD, "partner", partner="OSH-CITY")
    w.demo_study = s.send_ct(2, patient="Doe^Jane", patient_id="DEMO-0001")
    w.prior_study = s.send_ct(1, patient="Doe^Jane", patient_id="DEMO-0001")
    w.osh_study = s.send_ct(
        2, aet="OSHPACS", partner="OSH-CITY", patient="Ivanov^Ivan", patient_id="OSH-0042"
    )
    # 09:00 in Almaty (UTC+5) a month from now: 10:00 in Urumqi (UTC+6)
    day = dt.date.today() + dt.timedelta(days=30)
    w.scheduled_utc = dt.datetime.combine(day, dt.time(4, 0))
    partner = s.api("demo-rad", PASSWORD)
    try:
        w.consultation = partner.post(
            "/api/consultations",
            {
                "study_uids": [w.demo_study.study_uid],
                "question": "Nodule in the right upper lobe: malignant?",
                "scheduled_at": f"{day.isoformat()}T09:00",
                "time_zone": "Asia/Almaty",
            },
        )
    finally:
        partner.close()
    admin = s.admin_api()
    try:
        admin.post(
            f"/api/consultations/{w.consultation['id']}/assign",
            {"specialists": ["dr-li", "dr-ru", "dr-zh"]},
        )
    finally:
        admin.close()
    return w


def worklist_row(page: Any, cid: int) -> Any:
    return page.locator(f"#worklist tbody tr[data-id='{cid}']")


# -- pages without a browser -------------------------------------------------------------------
def test_pages_need_login_and_carry_security_headers(world: World) -> None:
    with httpx.Client(base_url=world.server.base_url) as http:
        for path, nxt in [
            ("/", "%2F"),
            ("/consultations/1", "%2Fconsultations%2F1"),
            ("/viewer?study=1.2.3", "%2Fviewer%3Fstudy%3D1.2.3"),
            ("/admin/users", "%2Fadmin%2Fusers"),
        ]:
            r = http.get(path)
            assert r.status_code == 303, path
            assert r.headers["location"] == f"/login?next={nxt}"
        r = http.get("/login")
        assert r.status_code == 200
        csp = r.headers["content-security-policy"]
        assert (
            "default-src 'self'" in csp
            and "frame-ancestors 'none'" in csp
            and "unsafe-inline" not in csp
        )
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"]
        assert "<script>" not in r.text and "style=" not in r.text  # no inline script or style
        # static URLs carry the version; with it they are immutable
        m = re.search(r'src="(/static/js/pages/login\.js\?v=([0-9a-f]+))"', r.text)
        assert m, r.text
        js = http.get(m[1])
        assert js.status_code == 200 and "immutable" in js.headers["cache-control"]
        assert js.headers["content-type"].startswith("text/javascript")
        assert f'from "../shell.js?v={m[2]}"' in js.text  # module imports carry it too
        assert "immutable" not in http.get("/static/js/pages/login.js").headers["cache-control"]
        assert http.get("/static/../ui.py").status_code == 404
        assert http.get("/static/%2e%2e/ui.py").status_code == 404


def test_every_i18n_key_exists_in_every_language() -> None:
    """Every key used in markup or scripts (data-i18n*, t("..."), i18n: "...") is in en, ru and
    zh; the three files hold the same keys; the viewer's pages may also use its own bundles."""
    maps = {
        lang: json.loads((STATIC / "i18n" / f"{lang}.json").read_text("utf-8"))
        for lang in ("en", "ru", "zh")
    }
    assert maps["en"].keys() == maps["ru"].keys() == maps["zh"].keys()
    for lang, m in maps.items():
        assert all(isinstance(v, str) and v.strip() for v in m.values()), lang
    # Russian and Chinese are really translated, not copied
    assert sum(maps["ru"][k] == maps["en"][k] for k in maps["en"]) < 5
    assert sum(maps["zh"][k] == maps["en"][k] for k in maps["en"]) < 5
    viewer = {}
    for lang in ("en", "ru", "zh"):
        p = STATIC / "i18n" / f"viewer-{lang}.json"
        viewer[lang] = json.loads(p.read_text("utf-8")) if p.exists() else {}
    patterns = [
        r'data-i18n(?:-title|-placeholder|-aria-label)?="([^"]+)"',
        r"""\btn?\(\s*["']([^"']+)["']""",
        r"""\bi18n(?:Title|AriaLabel|Placeholder)?:\s*["']([^"']+)["']""",
    ]
    namespaces = {k.split(".")[0] for k in maps["en"]} | {k.split(".")[0] for k in viewer["en"]}
    literal = re.compile(r"""["']((?:[a-z_]+)(?:\.[a-z0-9_]+)+)["']""")
    missing: list[str] = []
    files = [p for p in STATIC.rglob("*") if p.suffix in (".html", ".js")]
    assert len(files) >= 10
    for f in files:
        text = f.read_text("utf-8")
        keys = {k for pat in patterns for k in re.findall(pat, text)}
        # keys kept in tables (STATUS_KEYS and the like): any dotted literal in a known namespace
        keys |= {
            k
            for k in literal.findall(text)
            if k.split(".")[0] in namespaces and not re.search(r"\.(js|json|html|css|png)$", k)
        }
        in_viewer = "viewer" in f.relative_to(STATIC).parts
        for lang in ("en", "ru", "zh"):
            known = maps[lang].keys() | (viewer[lang].keys() if in_viewer else set())
            # tn("key", n) picks "key.<plural form>": "key.other" must exist
            missing += [
                f"{f.relative_to(STATIC)}: {k} ({lang})"
                for k in sorted(keys)
                if k not in known and f"{k}.other" not in known
            ]
    assert not missing, "\n".join(missing)


# -- in the browser ----------------------------------------------------------------------------
def test_login_wrong_then_right_and_worklist(world: World, page: Any) -> None:
    base = world.server.base_url
    page.goto(base + "/")
    page.wait_for_url(re.compile(r"/login\?next=%2F$"))
    wait_ready(page)
    assert page.locator("#login-title").inner_text() == "Log in"
    page.fill("#login-name", "dr-li")
    page.fill("#login-password", "not-the-password")
    page.click("#login-submit")
    error = page.locator("#login-error")
    error.wait_for(state="visible")
    assert error.inner_text() == "Wrong user name or password."
    assert "/login" in page.url
    page.fill("#login-password", PASSWORD)
    page.click("#login-submit")
    page.wait_for_url(base + "/")
    wait_ready(page)
    row = worklist_row(page, world.consultation["id"])
    assert row.count() == 1
    text = row.inner_text()
    assert "Nodule in the right upper lobe" in text
    assert (
        "DEMO" in text and "Images complete" in text and "dr-li" in text
    )  # all its images arrived
    cells = row.locator("td")
    assert re.search(r"10:00\sAM UTC\+6", cells.nth(0).inner_text())  # Urumqi
    assert re.search(r"9:00\sAM UTC\+5", cells.nth(1).inner_text())  # Almaty, the partner's zone
    assert expected_time(world, "Asia/Urumqi", "en") in cells.nth(0).inner_text()
    assert page.locator("#who").inner_text().startswith("dr-li")
    # open it
    row.locator("a.open").click()
    page.wait_for_url(f"{base}/consultations/{world.consultation['id']}")
    wait_ready(page)
    assert page.locator("#c-question").inner_text() == "Nodule in the right upper lobe: malignant?"
    assert page.locator("#c-original").is_hidden()  # a specialist sees pseudonyms only
    assert (
        page.locator(f".study[data-study='{world.demo_study.study_uid}'] .thumbs img").count() == 1
    )
    href = page.locator(".study a.open-viewer").first.get_attribute("href")
    assert href == f"/viewer?study={world.demo_study.study_uid}"
    # the prior is in no consultation of hers: a specialist is not offered it
    assert page.locator(f"#c-priors li[data-study='{world.prior_study.study_uid}']").count() == 0
    assert page.locator("#opinion-form").is_visible()  # assigned: may answer
    # open the study in the viewer: the canvas shows the server's rendering of the same window
    page.locator(".study a.open-viewer").first.click()
    page.wait_for_url(re.compile(r"/viewer\?study="))
    wait_ready(page)
    page.wait_for_function(
        "() => window.__imx && window.__imx.state && window.__imx.state().lossless", timeout=30_000
    )
    page.evaluate("() => window.__imx.actualSize()")
    state = page.evaluate("() => window.__imx.state()")
    win = state["window"]
    got = canvas_pixels(page)
    want = server_rendered(
        page,
        f"/dicomweb/studies/{world.demo_study.study_uid}/series/{state['series_uid']}"
        f"/instances/{state['sop_uid']}/frames/1/rendered?window={win['center']},{win['width']}",
    )
    assert got.shape == want.shape
    assert (abs(got.astype(int) - want.astype(int)) <= 2).mean() >= 0.99
    assert got.std() > 10  # an image, not a blank canvas
    page.go_back()
    page.wait_for_url(f"{base}/consultations/{world.consultation['id']}")
    wait_ready(page)
    # log out: back to the login page, and / needs a login again
    page.click("#logout")
    page.wait_for_url(re.compile(r"/login$"))
    page.goto(base + "/")
    page.wait_for_url(re.compile(r"/login\?next="))


def test_too_many_failed_logins_say_how_long_to_wait(make_viewer_server: Any, page: Any) -> None:
    server = make_viewer_server()  # its own: the throttle also counts per address, 127.0.0.1 here
    base = server.base_url
    server.add_user("slow-typist", PASSWORD, "specialist")
    page.goto(base + "/login")
    wait_ready(page)
    error = page.locator("#login-error")
    seen = []
    for _ in range(12):
        page.fill("#login-name", "slow-typist")
        page.fill("#login-password", "wrong-password")
        with page.expect_response("**/api/login") as answer:
            page.click("#login-submit")
        seen.append(answer.value.status)
        if answer.value.status == 429:
            break
    assert seen[-1] == 429, seen
    page.wait_for_function(
        "() => /Try again in \\d+\\s+s\\./.test(document.getElementById('login-error').textContent)"
    )
    assert (
        page.locator("#login-submit").is_disabled() or error.is_hidden()
    )  # refused while counting down


def expected_time(world: World, zone: str, locale: str) -> str:
    return format_datetime(world.scheduled_utc, zone, locale)


@pytest.mark.parametrize(
    ("user", "code", "labels"),
    [
        (
            "dr-ru",
            "ru",
            {
                "nav a[href='/']": "Рабочий список",
                "h1": "Предстоящие консультации",
                "#logout": "Выйти",
            },
        ),
        (
            "dr-zh",
            "zh",
            {"nav a[href='/']": "工作列表", "h1": "即将进行的会诊", "#logout": "退出登录"},
        ),
    ],
)
def test_switching_language_changes_labels_and_times_and_persists(
    world: World, page: Any, browser: Any, user: str, code: str, labels: dict[str, str]
) -> None:
    base = world.server.base_url
    login(page, base, user, PASSWORD)
    assert page.locator("h1").inner_text() == "Upcoming consultations"
    row = worklist_row(page, world.consultation["id"])
    assert expected_time(world, "Asia/Urumqi", "en") in row.locator("td").nth(0).inner_text()
    page.select_option("#language", code)
    page.wait_for_function(f"() => document.documentElement.lang === '{code}'")
    for selector, text in labels.items():
        page.wait_for_function(
            "([s, t]) => document.querySelector(s) && document.querySelector(s).textContent.trim() === t",
            arg=[selector, text],
        )
    status = {"ru": "Снимки получены", "zh": "影像已齐全"}[code]
    viewer_time, partner_time = (
        expected_time(world, "Asia/Urumqi", code),
        expected_time(world, "Asia/Almaty", code),
    )
    marker = {"ru": "г.", "zh": "年"}[code]
    assert marker in viewer_time  # the server's Babel formatting in that language
    page.wait_for_function(
        "([id, t]) => { const r = document.querySelector(`#worklist tr[data-id='${id}'] td`); return r && r.textContent.includes(t); }",
        arg=[world.consultation["id"], viewer_time],
    )
    cells = worklist_row(page, world.consultation["id"]).locator("td")
    assert partner_time in cells.nth(1).inner_text()
    assert status in cells.nth(7).inner_text()
    # the choice survives a reload ...
    page.reload()
    wait_ready(page)
    assert page.evaluate("document.documentElement.lang") == code
    assert page.locator("h1").inner_text() == labels["h1"]
    assert page.locator("#language").input_value() == code
    # ... and follows the user to another browser (saved in the preferences)
    other = browser.new_context(locale="en-US", timezone_id="Asia/Urumqi")
    try:
        p2 = other.new_page()
        login(p2, base, user, PASSWORD)
        assert p2.evaluate("document.documentElement.lang") == code
        assert p2.locator("h1").inner_text() == labels["h1"]
        # and the consultation page in that language, with CJK or Cyrillic text laid out
        p2.goto(f"{base}/consultations/{world.consultation['id']}")
        wait_ready(p2)
        assert viewer_time in p2.locator("#c-time-viewer").inner_text()
        assert partner_time in p2.locator("#c-time-partner").inner_text()
        p2.screenshot(path=str(SCREENSHOTS / f"test_ui-consultation-{code}.png"), full_page=True)
    finally:
        other.close()


def test_kazakh_and_kyrgyz_fall_back_to_russian(world: World, page: Any) -> None:
    page.goto(world.server.base_url + "/login")
    wait_ready(page)
    page.select_option("#language", "kk")
    page.wait_for_function("() => document.documentElement.lang === 'kk'")
    assert page.locator("#login-title").inner_text() == "Вход в систему"
    page.reload()
    wait_ready(page)
    assert page.evaluate("document.documentElement.lang") == "kk"
    assert page.locator("#login-submit").inner_text() == "Войти"


def test_partner_user_sees_only_their_hospitals_studies(world: World, page: Any) -> None:
    base = world.server.base_url
    login(page, base, "osh-rad", PASSWORD)
    assert worklist_row(page, world.consultation["id"]).count() == 0  # DEMO's consultation
    page.goto(base + "/studies")
    wait_ready(page)
    shown = page.locator("#studies tbody tr").evaluate_all("rows => rows.map(r => r.dataset.study)")
    assert shown == [world.osh_study.study_uid]
    assert page.locator("#studies tbody tr").first.get_attribute("data-partner") == "OSH-CITY"
    # a direct URL to the other hospital's consultation shows nothing of it
    page.goto(f"{base}/consultations/{world.consultation['id']}")
    wait_ready(page)
    assert page.locator("#c-error").is_visible()
    assert page.locator("#c-body").is_hidden()
    assert "Nodule" not in page.content()
    # nor do the admin pages open
    page.goto(base + "/admin/users")
    page.wait_for_url(base + "/")


def test_partner_requests_a_consultation_and_reads_the_answer_with_its_identifiers(
    world: World, page: Any, browser: Any
) -> None:
    base = world.server.base_url
    login(page, base, "demo-rad", PASSWORD)
    page.click("#new-consultation")
    page.wait_for_url(base + "/consultations/new")
    wait_ready(page)
    assert page.locator("#studies-title").inner_text() == "Request a consultation"
    uids = page.locator("#studies tbody tr").evaluate_all("rows => rows.map(r => r.dataset.study)")
    assert set(uids) == {world.demo_study.study_uid, world.prior_study.study_uid}
    page.check(f"#studies tbody tr[data-study='{world.prior_study.study_uid}'] input.pick")
    page.fill("#nc-question", "Follow-up: any change?")
    page.fill("#nc-when", (dt.date.today() + dt.timedelta(days=40)).isoformat() + "T15:30")
    page.select_option("#nc-zone", "Asia/Almaty")
    page.click("#nc-submit")
    page.wait_for_url(re.compile(r"/consultations/\d+$"))
    wait_ready(page)
    cid = int(page.url.rsplit("/", 1)[1])
    assert page.locator("#c-question").inner_text() == "Follow-up: any change?"
    assert re.search(r"3:30\sPM UTC\+5", page.locator("#c-time-partner").inner_text())
    # its own patient's original identifiers, for the sending hospital only
    assert page.locator("#c-original").is_visible()
    assert page.locator("#c-orig-id").inner_text() == "DEMO-0001"
    assert page.locator("#c-orig-name").inner_text() == "Jane Doe"  # from the DICOM name Doe^Jane
    # the other study of the same patient is offered as a prior, to compare with
    prior = page.locator(f"#c-priors li[data-study='{world.demo_study.study_uid}']")
    assert prior.count() == 1
    compare = prior.locator("a").nth(1).get_attribute("href")
    assert (
        compare == f"/viewer?study={world.prior_study.study_uid}&prior={world.demo_study.study_uid}"
    )
    assert page.locator("#opinion-form").is_hidden()
    # an admin assigns a specialist, who answers
    admin = world.server.admin_api()
    try:
        admin.post(f"/api/consultations/{cid}/assign", {"specialists": ["dr-li"]})
    finally:
        admin.close()
    other = browser.new_context(locale="en-US", timezone_id="Asia/Urumqi")
    try:
        sp = other.new_page()
        login(sp, base, "dr-li", PASSWORD, next_path=f"/consultations/{cid}")
        assert sp.url == f"{base}/consultations/{cid}"
        assert sp.locator("#c-original").is_hidden()
        assert "DEMO-0001" not in sp.content()
        sp.fill("#opinion-text", "No change since the prior study.")
        sp.click("#opinion-submit")
        sp.locator("#opinion-msg.ok").wait_for()
        assert sp.locator("#c-status").inner_text() == "Answered"
    finally:
        other.close()
    page.reload()
    wait_ready(page)
    assert page.locator("#c-opinion").inner_text() == "No change since the prior study."
    assert page.locator("#c-status").inner_text() == "Answered"
    assert page.locator("#c-orig-id").inner_text() == "DEMO-0001"


def test_prepare_for_consultation_loads_every_image_and_nothing_leaves_the_app(
    world: World, page: Any
) -> None:
    base = world.server.base_url
    urls = record_requests(page)
    login(page, base, "dr-li", PASSWORD)
    page.goto(f"{base}/consultations/{world.consultation['id']}")
    wait_ready(page)
    page.click("#prepare")
    page.wait_for_function("() => document.body.dataset.prepared", timeout=60_000)
    assert page.evaluate("document.body.dataset.prepared") == "1", page.locator(
        "#prepare-status"
    ).inner_text()
    assert page.locator("#prepare-bar").evaluate("b => b.value === b.max && b.max > 0")
    pixels = [u for u in urls if "/api/pixels/" in u]
    assert len(pixels) == len(world.demo_study.sop_uids)  # one frame each
    assert any("/thumbnail" in u for u in urls) and any("/api/viewer/series/" in u for u in urls)
    page.goto(base + "/studies")
    wait_ready(page)
    assert urls and all(u.startswith(base + "/") for u in urls), [
        u for u in urls if not u.startswith(base + "/")
    ]


def test_admin_pages_users_audit_studies_and_share_links(world: World, page: Any) -> None:
    base = world.server.base_url
    urls = record_requests(page)
    login(page, base, *ADMIN)
    nav = page.locator("nav a").all_inner_texts()
    assert nav == ["Worklist", "Studies", "Users", "Audit log"]
    # users: add one, disable it
    page.click("nav a[href='/admin/users']")
    wait_ready(page)
    page.fill("#u-name", "dr-new")
    page.select_option("#u-role", "specialist")
    page.fill("#u-password", "a-long-password")
    page.click("#add-user button[type=submit]")
    row = page.locator("#users tbody tr[data-user='dr-new']")
    row.wait_for()
    row.locator("button.toggle-active").click()
    page.wait_for_function(
        "() => document.querySelector(\"#users tr[data-user='dr-new'] td:nth-child(5)\").textContent === 'disabled'"
    )
    with httpx.Client(base_url=base) as http:
        assert (
            http.post(
                "/api/login", json={"name": "dr-new", "password": "a-long-password"}
            ).status_code
            == 401
        )
    # audit: logins are there, the export link exports
    page.click("nav a[href='/admin/audit']")
    wait_ready(page)
    assert page.locator("#audit tbody tr[data-action='login']").count() >= 1
    assert page.locator("#audit tbody tr[data-action='user_changed']").count() >= 1
    page.select_option("#a-action", "login_failed")
    page.click("#audit-filters button[type=submit]")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#audit tbody tr')].every(r => r.dataset.action === 'login_failed')"
    )
    href = page.locator("#audit-export").get_attribute("href")
    assert href == "/api/audit.jsonl?action=login_failed"
    # studies: every hospital's, and a share link for one
    page.click("nav a[href='/studies']")
    wait_ready(page)
    shown = set(
        page.locator("#studies tbody tr").evaluate_all("rows => rows.map(r => r.dataset.study)")
    )
    assert {
        world.demo_study.study_uid,
        world.osh_study.study_uid,
        world.prior_study.study_uid,
    } <= shown
    row = page.locator(f"#studies tbody tr[data-study='{world.osh_study.study_uid}']")
    row.locator("button.share").click()
    link = row.locator("input.share-url")
    link.wait_for()
    assert re.fullmatch(re.escape(base) + r"/s/[A-Za-z0-9_-]+", link.input_value())
    assert all(u.startswith(base + "/") for u in urls)


def test_a_share_link_opens_the_viewer_of_its_study_only(world: World, page: Any) -> None:
    base = world.server.base_url
    admin = world.server.admin_api()
    try:
        made = admin.post(f"/api/studies/{world.osh_study.study_uid}/share", {"hours": 2})
    finally:
        admin.close()
    page.goto(base + made["url"])  # someone without an account opens the link
    page.wait_for_url(f"{base}/viewer?study={world.osh_study.study_uid}")
    wait_ready(page, 30_000)
    page.goto(base + "/")  # the link opens nothing else
    page.wait_for_url(re.compile(r"/login\?next=%2F$"))
    page.goto(f"{base}/consultations/{world.consultation['id']}")
    page.wait_for_url(re.compile(r"/login\?next="))


def test_worklist_filters_by_status_partner_modality_and_date(world: World, page: Any) -> None:
    base = world.server.base_url
    cid = world.consultation["id"]
    day = world.scheduled_utc.date()
    login(page, base, *ADMIN)

    def apply(**values: str) -> list[str]:
        page.click("#filters button[type=reset]")
        for name, value in values.items():
            if name in ("status", "partner", "modality"):
                page.select_option(f"#f-{name}", value)
            else:
                page.fill(f"#f-{name}", value)
        with page.expect_response(
            lambda r: "/api/worklist?" in r.url and all(f"{k}=" in r.url for k in values)
        ):
            page.click("#filters button[type=submit]")
        # the rows on screen answer the filters now in the address, not an earlier request's
        page.wait_for_function(
            "() => document.getElementById('worklist').dataset.shown === location.search.slice(1)"
        )
        return page.locator("#worklist tbody tr").evaluate_all(
            "rows => rows.map(r => r.dataset.id)"
        )

    assert str(cid) in apply(status="images_complete")
    assert str(cid) not in apply(status="answered")
    assert str(cid) in apply(partner="DEMO")
    assert apply(partner="OSH-CITY") == []
    assert page.locator("#worklist-empty").is_visible()
    assert str(cid) in apply(modality="CT")
    assert apply(modality="MR") == []
    assert str(cid) in apply(**{"from": day.isoformat(), "to": day.isoformat()})
    assert str(cid) not in apply(**{"from": (day + dt.timedelta(days=1)).isoformat()})
    # the filters are in the address, so a reload (or a bookmark) keeps them
    apply(status="images_complete", partner="DEMO")
    page.reload()
    wait_ready(page)
    assert page.locator("#f-status").input_value() == "images_complete"
    assert page.locator("#f-partner").input_value() == "DEMO"


def test_no_ui_text_is_hard_coded_in_the_pages() -> None:
    """The pages' markup holds keys, not words: every text node is empty, except DICOM
    modality codes (CT, MR, ...), which are not translated."""
    from html.parser import HTMLParser

    modalities = {"CT", "MR", "CR", "DX", "US", "MG", "PT", "NM", "XA", "RF", "OT"}

    class Texts(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.stack: list[str] = []
            self.found: list[str] = []

        def handle_starttag(self, tag: str, attrs: list) -> None:  # type: ignore[type-arg]
            if tag not in ("meta", "link", "input", "br", "img"):
                self.stack.append(tag)
            for name, value in attrs:
                if name in ("title", "placeholder", "aria-label", "alt") and value:
                    self.found.append(f"{tag}[{name}]={value}")

        def handle_endtag(self, tag: str) -> None:
            if self.stack and self.stack[-1] == tag:
                self.stack.pop()

        def handle_data(self, data: str) -> None:
            text = data.strip()
            if text and self.stack[-1:] != ["title"] and text not in modalities:
                self.found.append(text)

    pages = sorted((STATIC / "pages").glob("*.html"))
    assert len(pages) >= 6
    for p in pages:
        parser = Texts()
        parser.feed(p.read_text("utf-8"))
        assert not parser.found, f"{p.name}: {parser.found}"


def test_keyboard_alone_logs_in_and_reaches_a_consultation(world: World, page: Any) -> None:
    base = world.server.base_url
    page.goto(base + "/login")
    wait_ready(page)
    assert page.evaluate("document.activeElement.id") == "login-name"  # focus starts there
    page.keyboard.type("dr-li")
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url(base + "/")
    wait_ready(page)
    for _ in range(60):  # Tab along until the consultation's "Open" link has the focus
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.classList.contains('open')"):
            break
    else:
        pytest.fail("the Open link cannot be reached with the keyboard")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/consultations/\d+$"))
    wait_ready(page)
