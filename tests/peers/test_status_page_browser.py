"""The status page in a real browser against a running node fed through real DIMSE.

`nodal serve` with a token and one destination, an Orthanc PACS. dcmtk's storescu sends three
studies, each with an accession number and the phantom's patient name and ID: a phantom CT
that is analysed and delivered, a short series that routing skips, and a phantom CT analysed
while the PACS is down (its deliveries fail). Debian's headless chromium, driven over the
DevTools protocol (Playwright), logs in with the token, reads the page (health, figures, the
three studies with their accession numbers and states, no patient name or ID anywhere in the
page or its data, the refusal of an unknown caller), opens the failed study, presses its retry
button once the PACS is back and sees the results delivered, then presses the delivered
study's reprocess button and sees a new job analyse it again from the spool. Screenshots go to
var/status/ (the README's come from there).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
import requests

from inference import phantoms
from inference.ct_series import PatientInfo
from tests.helpers.ohif import CHROMIUM_ARGS, chromium_binary
from tests.helpers.peers import Nodal, Orthanc, free_port, model_dir, node_config, skip_reason, wait_until

pytestmark = [pytest.mark.peers, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "var" / "status"
SPEC = phantoms.PhantomSpec(rows=256, columns=256, pixel_spacing_mm=1.45, slices=48, slice_spacing_mm=2.5)
SHORT = phantoms.PhantomSpec(
    rows=64, columns=64, pixel_spacing_mm=6.0, slices=12, slice_spacing_mm=5.0, nodes=(0, 0)
)
TOKEN = "tok-status-page-0b7e41"
VIEWER = "http://viewer.invalid/viewer?StudyInstanceUIDs={StudyInstanceUID}"


def _missing() -> str | None:
    why = skip_reason("storescu")
    if why:
        return why
    if chromium_binary() is None:
        return "chromium not installed (Debian package chromium; `make test` installs it)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright (Python) missing: `pip install -e '.[dev]'`"
    return None


if (_why := _missing()) is not None:
    pytest.skip(_why, allow_module_level=True)


PATIENT = (PatientInfo().name, PatientInfo().id)  # what the phantoms carry, never to be shown


def accession(seed: int) -> str:
    return f"ACC{seed}"


def phantom(root: Path, seed: int, spec=SPEC) -> tuple[list[Path], str]:
    paths = phantoms.write_phantom(phantoms.generate(seed, spec), root / f"ct-{seed}")
    for path in paths:  # as a RIS would have it: the accession number of the order
        ds = pydicom.dcmread(path)
        ds.AccessionNumber = accession(seed)
        ds.save_as(path)
    return paths, str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def send(paths: list[Path], port: int, calling: str = "MODALITY") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["storescu", "-aet", calling, "-aec", "NODAL", "127.0.0.1", str(port), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def api(nodal: Nodal, path: str) -> dict:
    r = requests.get(nodal.http + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    r.raise_for_status()
    return r.json()


def deliveries(nodal: Nodal, study_uid: str) -> dict | None:
    jobs = [j for j in api(nodal, f"/api/jobs?study={study_uid}")["jobs"] if j["state"] == "done"]
    return api(nodal, f"/api/jobs/{jobs[0]['id']}")["deliveries"].get("pacs") if jobs else None


def jobs_of(nodal: Nodal, study_uid: str) -> dict[int, str]:
    return {j["id"]: j["state"] for j in api(nodal, f"/api/jobs?study={study_uid}")["jobs"]}


def thumbnails_loaded(page) -> None:
    """Every result thumbnail of the page scrolled into view (they load lazily) and decoded."""
    from playwright.sync_api import expect

    thumbs = page.locator(".thumbs img")
    expect(thumbs.first).to_be_visible()
    for i in range(thumbs.count()):
        thumbs.nth(i).scroll_into_view_if_needed()
    widths = "imgs => imgs.map(i => i.complete ? i.naturalWidth : -1)"  # the CSP forbids eval
    loaded = wait_until(lambda: (w := thumbs.evaluate_all(widths)) and min(w) >= 0 and w, 30, "thumbnails")
    assert min(loaded) > 0, f"a thumbnail did not decode: {loaded}"


def test_status_page_in_chromium(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    pacs = Orthanc(tmp_path / "pacs", aet="PACS").start()
    (tmp_path / "token").write_text(TOKEN + "\n")
    port = free_port()
    cfg = node_config(
        tmp_path / "var",
        port,
        model_dir(),
        allowed_callers=[{"ae_title": "MODALITY", "host": "127.0.0.1"}],
        destinations=[
            {
                "name": "pacs",
                "kind": "dimse",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs.dicom_port,
            }
        ],
        # results the PACS did not take within 20 s are marked failed (the retry button's case)
        delivery={
            "retry_initial_seconds": 1.0,
            "retry_max_seconds": 2.0,
            "check_interval_seconds": 0.5,
            "expire_hours": 20 / 3600,
        },
        status_page={"viewer_url": VIEWER, "refresh_seconds": 2},
    )
    cfg["node"]["http_auth"] = {"token_file": str(tmp_path / "token")}
    nodal = Nodal(tmp_path, cfg).start()
    try:
        # 1. analysed and delivered
        paths, delivered_uid = phantom(tmp_path, 1_800_001)
        assert send(paths, port).returncode == 0
        wait_until(
            lambda: (d := deliveries(nodal, delivered_uid)) and d["delivered"] and not d["pending"] and d,
            400,
            "the first study analysed and delivered",
        )
        # 2. skipped by routing (12 slices of 5 mm), and a refused caller
        paths, skipped_uid = phantom(tmp_path, 1_800_002, SHORT)
        assert send(paths, port).returncode == 0
        assert send(paths[:1], port, calling="STRANGER").returncode != 0
        # 3. analysed while the PACS is down: deliveries fail
        pacs.stop()
        paths, failed_uid = phantom(tmp_path, 1_800_003)
        assert send(paths, port).returncode == 0
        wait_until(
            lambda: (d := deliveries(nodal, failed_uid)) and d["failed"] and not d["pending"] and d,
            400,
            "the third study's deliveries failed while the PACS is down",
        )
        wait_until(
            lambda: api(nodal, f"/api/studies/{skipped_uid}")["jobs"].get("skipped"),
            60,
            "the short series skipped",
        )

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_binary(), args=CHROMIUM_ARGS)
            try:
                errors: list[str] = []
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.set_default_timeout(30_000)
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(nodal.http + "/")
                assert page.url.endswith("/status/login")  # no session: the login form
                page.fill("#token", "not-the-token")
                page.click("form[action='/status/login'] button")
                expect(page.locator("[role=alert]")).to_contain_text("not the node's token")
                page.fill("#token", TOKEN)
                page.click("form[action='/status/login'] button")
                page.wait_for_url(nodal.http + "/")
                assert TOKEN not in page.url
                cookie = next(c for c in page.context.cookies() if c["name"] == "nodal_session")
                assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]

                expect(page.locator("#ready")).to_have_text("ready")
                rows = page.locator("#studies tr")
                expect(rows).to_have_count(3)
                row = {uid: rows.filter(has_text=uid) for uid in (delivered_uid, skipped_uid, failed_uid)}
                for uid, seed in (
                    (delivered_uid, 1_800_001),
                    (skipped_uid, 1_800_002),
                    (failed_uid, 1_800_003),
                ):
                    expect(row[uid].locator(".acc")).to_have_text(accession(seed))
                data = page.request.get(nodal.http + "/status/data.json").text()
                for value in PATIENT:  # neither in the page nor in what it polls
                    assert value not in page.content() and value not in data, value
                expect(row[delivered_uid]).to_contain_text("pacs: delivered")
                expect(row[delivered_uid].locator(".state-done").first).to_be_visible()
                expect(row[skipped_uid]).to_contain_text("skipped")
                expect(row[failed_uid]).to_contain_text("pacs: failed")
                expect(page.locator("#refusals")).to_contain_text("STRANGER")
                expect(page.locator("#refusals")).to_contain_text("wrong token on the login form")
                expect(page.locator("#refusals")).not_to_contain_text("favicon")
                expect(page.locator('[data-live="deliveries_failed"]')).not_to_have_text("0")
                page.wait_for_timeout(2500)  # one poll: the table is rebuilt from data.json
                expect(page.locator("#studies tr")).to_have_count(3)
                page.screenshot(path=str(SCREENSHOTS / "status.png"), full_page=True)
                page.emulate_media(color_scheme="dark")
                page.screenshot(path=str(SCREENSHOTS / "status-dark.png"))
                page.emulate_media(color_scheme="light")

                # the failed study: its error, the viewer link, the retry button once the PACS is back
                row[failed_uid].locator("a.uid").click()
                page.wait_for_url(f"**/status/studies/{failed_uid}")
                expect(page.locator("a.button")).to_have_attribute(
                    "href", VIEWER.replace("{StudyInstanceUID}", failed_uid)
                )
                expect(page.locator("section.job")).to_contain_text("failed")
                thumbnails_loaded(page)
                page.screenshot(path=str(SCREENSHOTS / "study-failed.png"), full_page=True)
                pacs.start()
                page.locator("button.retry").first.click()
                expect(page.locator("[role=status]")).to_contain_text("retried")
                wait_until(
                    lambda: (
                        (d := deliveries(nodal, failed_uid))
                        and d["delivered"]
                        and not d["pending"]
                        and not d["failed"]
                        and d
                    ),
                    60,
                    "the retried deliveries delivered",
                )
                page.reload()
                expect(page.locator("section.job")).not_to_contain_text("failed")
                expect(page.locator("section.job .state-delivered").first).to_be_visible()
                page.screenshot(path=str(SCREENSHOTS / "study-retried.png"), full_page=True)

                # the delivered study: its result images as thumbnails
                page.goto(f"{nodal.http}/status/studies/{delivered_uid}")
                thumbnails_loaded(page)
                page.screenshot(path=str(SCREENSHOTS / "study-delivered.png"), full_page=True)

                # the delivered study analysed again from the spool: a new job, the first one kept
                expect(page.locator("#accession")).to_have_text(accession(1_800_001))
                assert all(value not in page.content() for value in PATIENT)
                before = jobs_of(nodal, delivered_uid)
                page.locator("button.reprocess").click()
                expect(page.locator("[role=status]")).to_contain_text("reprocessing")
                new = wait_until(
                    lambda: (
                        (added := set(jobs_of(nodal, delivered_uid)) - set(before))
                        and jobs_of(nodal, delivered_uid)[max(added)] == "done"
                        and max(added)
                    ),
                    400,
                    "the reprocessed study's new job done",
                )
                assert jobs_of(nodal, delivered_uid)[max(before)] == "superseded"
                page.reload()
                expect(page.locator(f"#job-{new} .state-done").first).to_be_visible()
                expect(page.locator(f"#job-{max(before)}")).to_contain_text(f"superseded by #{new}")
                page.screenshot(path=str(SCREENSHOTS / "study-reprocessed.png"), full_page=True)

                page.set_viewport_size({"width": 390, "height": 844})
                page.goto(nodal.http + "/")
                expect(page.locator("#studies tr")).to_have_count(3)
                width = page.evaluate("document.documentElement.scrollWidth")
                assert width <= 400, f"the page scrolls sideways on a phone: {width} px"
                page.screenshot(path=str(SCREENSHOTS / "status-narrow.png"), full_page=True)
                assert errors == []
            finally:
                browser.close()
        audit = api(nodal, "/api/audit?event=user_action")["events"]
        assert [(e["outcome"], e["detail"]["action"]) for e in audit] == [
            ("success", "reprocess"),
            ("success", "retry"),
        ]
    finally:
        assert nodal.stop() == 0
        pacs.stop()
