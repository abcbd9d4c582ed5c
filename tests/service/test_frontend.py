"""The web page in a real browser (Playwright driving Debian's Chromium, `scripts/ensure-browser.sh`),
against the real API server (uvicorn in a thread of this process, so it shares the test database) and
a real worker: sign in with the `#token=` link, submit a job from the page, follow it to the end on
its detail page, download a checkpoint, see a field error for a bad spec, and compare two jobs."""

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from worker.engine.launch import free_port
from helpers import make_user, tiny_spec, wait_for

playwright_sync = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Screenshots of every page go to runs/screenshots/ (not tracked). The two shown in the README are
# refreshed under docs/ only when asked: UPDATE_DOCS_SCREENSHOTS=1 make test.
ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / ("docs" if os.environ.get("UPDATE_DOCS_SCREENSHOTS") == "1" else "runs/screenshots")


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name), full_page=True)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]  # fmt: skip

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("no_leftover_jobs"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no chromium: run scripts/ensure-browser.sh"),
]


@pytest.fixture(scope="module")
def server():
    from app.main import app

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True, name="uvicorn")
    thread.start()
    wait_for(lambda: srv.started, timeout=30, interval=0.1, what="uvicorn to start")
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def browser_page():
    with playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(30_000)
        problems: list[str] = []
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        yield page, problems
        context.close()
        browser.close()


def token_of(headers: dict) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def test_vendor_libraries_are_served(server):
    import httpx

    for path in ("/", "/static/js/app.js", "/static/app.css", "/vendor/chart.umd.js", "/vendor/js-yaml.mjs"):
        assert httpx.get(server + path).status_code == 200, path
    assert httpx.get(server + "/api/v1/jobs").status_code == 401  # the API keeps its routes
    assert httpx.get(server + "/healthz").status_code == 200


def test_sign_in_submit_follow_download_compare(server, worker, dataset, browser_page):
    page, problems = browser_page
    user = make_user()
    expect = playwright_sync.expect

    # Sign in with the link `distill up` prints; the token leaves the URL.
    page.goto(f"{server}/#token={token_of(user)}")
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    assert "token" not in page.url
    expect(page.locator("#jobs")).to_contain_text("No jobs yet")

    # A bad spec from the form: the API's 422 shows beside the field it names.
    page.get_by_role("link", name="New job").first.click()
    steps = page.locator("#f-training-steps")
    expect(steps).to_have_value("1000")  # the spec's default, from the API's schema
    steps.fill("0")
    page.get_by_role("button", name="Submit job").click()
    error = page.locator("#err-f-training-steps")
    expect(error).to_be_visible()
    expect(error).to_contain_text("greater than or equal to 1")
    expect(steps).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#form-errors")).to_have_text(re.compile(r"^The API refused this spec \(2 problems\)[^\n]*field\.$"))
    shot(page, "new-job.png")

    # The tiny job, through the form's fields; its training set is uploaded from the page.
    spec = tiny_spec(dataset, name="tiny-ui")
    for path, value in [("name", spec["name"]), ("teacher", spec["teacher"]), ("student.model", spec["student"]["model"]),
                        ("data.eval", spec["data"]["eval"])] + [
                       (f"{section}.{key}", value) for section in ("data", "training", "minillm", "eval", "checkpoints")
                       for key, value in spec[section].items() if section != "data" or key not in ("train", "eval", "prompt_format")]:  # fmt: skip
        page.locator("#f-" + path.replace(".", "-")).fill(str(value))
    page.locator("#f-data-prompt_format").select_option(spec["data"]["prompt_format"])
    page.locator("#f-deepspeed-precision").select_option(spec["deepspeed"]["precision"])
    page.locator("#f-data-train-file").set_input_files(spec["data"]["train"])
    expect(page.locator("#f-data-train")).to_have_value(re.compile(r"^dataset:ds-"))
    # The advanced editor starts from the form, so either way submits the same spec.
    page.get_by_text("Advanced: edit the full YAML spec").click()
    expect(page.locator("#f-yaml")).to_have_value(re.compile(r"rollouts_per_phase: 4"))
    page.get_by_text("Advanced: edit the full YAML spec").click()  # closed again: the form is submitted
    page.get_by_role("button", name="Submit job").click()
    page.wait_for_url(re.compile(r"#/jobs/"))
    job_id = page.url.rsplit("/", 1)[-1]
    import httpx

    submitted = httpx.get(f"{server}/api/v1/jobs/{job_id}", headers=user).json()["spec"]
    assert submitted["data"]["train"].startswith("dataset:") and submitted["minillm"]["rollouts_per_phase"] == 4

    # Meanwhile the jobs list shows it, and a second job (submitted through the API) appears live.
    page.goto(f"{server}/#/jobs")
    expect(page.locator(f'#jobs tr[data-id="{job_id}"]')).to_be_visible()
    shot(page, "jobs.png")

    second = httpx.post(f"{server}/api/v1/jobs", headers=user, json=tiny_spec(dataset, name="tiny-kd", method="kd"))
    assert second.status_code == 201, second.text
    second_id = second.json()["id"]
    expect(page.locator(f'#jobs tr[data-id="{second_id}"]')).to_be_visible(timeout=10_000)  # no reload

    # The detail page follows the job live to the end.
    page.locator(f'#jobs tr[data-id="{job_id}"] a').first.click()
    expect(page.locator("#job-status")).to_have_attribute("data-status", "succeeded", timeout=300_000)
    expect(page.locator("#cancel")).to_be_hidden()
    expect(page.locator("#evals tbody tr").first).to_be_visible(timeout=10_000)
    assert page.locator("#evals tbody tr").count() >= 2
    expect(page.locator("#events li").first).to_be_visible()
    expect(page.locator("#events")).to_contain_text("succeeded")
    expect(page.locator("#checkpoints .tag", has_text="best")).to_be_visible()
    expect(page.locator("#checkpoints .tag", has_text="latest")).to_be_visible()
    for key in ("loss", "reward", "reverse_kl", "lr", "tokens_per_s"):
        assert canvas_drawn(page, f"#chart-{key} canvas"), key
    assert canvas_drawn(page, "#chart-eval canvas")
    shot(page, "job-detail.png")

    # A checkpoint archive downloads (the page fetches it with the token, then saves it).
    with page.expect_response(lambda r: "/archive" in r.url) as response, page.expect_download() as download:
        page.locator("#checkpoints button.archive").first.click()
    assert response.value.status == 200
    assert download.value.suggested_filename.endswith(".tar")
    assert Path(download.value.path()).stat().st_size > 0

    # Compare the two jobs once the second has ended.
    wait_for(lambda: httpx.get(f"{server}/api/v1/jobs/{second_id}", headers=user).json()["status"] in ("succeeded", "failed"),
             timeout=300, interval=1, what="the second job to end")  # fmt: skip
    page.goto(f"{server}/#/jobs")
    page.get_by_role("checkbox", name="Compare tiny-ui").check()
    page.get_by_role("checkbox", name="Compare tiny-kd").check()
    page.get_by_role("button", name="Compare selected").click()
    expect(page.get_by_role("heading", name="Compare jobs")).to_be_visible()
    expect(page.locator("#compare-evals thead th")).to_have_count(3)
    expect(page.locator("#compare-evals")).to_contain_text("rouge_l")
    assert canvas_drawn(page, "#compare-loss canvas")
    assert canvas_drawn(page, "#compare-eval_rouge_l canvas")
    shot(page, "compare.png")

    # Sign out returns to the sign-in screen.
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("API token")).to_be_visible()
    assert page.evaluate("localStorage.getItem('distill.token')") is None
    shot(page, "sign-in.png")

    # Chromium logs every non-2xx response as a console error: the one 422 is the bad spec above.
    expected = [p for p in problems if "status of 422" in p]
    assert len(expected) == 1 and [p for p in problems if p not in expected] == [], problems


def canvas_drawn(page, selector: str) -> bool:
    """The canvas exists and has non-transparent pixels (Chart.js drew on it)."""
    page.locator(selector).wait_for()
    time.sleep(0.2)
    return page.evaluate(
        """(sel) => { const c = document.querySelector(sel); if (!c || !c.width || !c.height) return false;
             const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
             let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n > 500; }""",
        selector,
    )
