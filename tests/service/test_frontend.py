"""The web page in a real browser (Playwright driving Debian's Chromium, `scripts/ensure-browser.sh`),
against the real API server (uvicorn in a thread of this process, so it shares the test database) and
a real worker: sign in with the `#token=` link, submit a job from the page, follow it to the end on
its detail page, download a checkpoint, see a field error for a bad spec, and compare two jobs; and the
README's two screenshots, of real SmolLM2 jobs."""

import re
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from helpers import make_user, tiny_spec, wait_for

from distill_client.status import JobStatus
from worker.engine.data import read_records

playwright_sync = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Screenshots of every page go to runs/screenshots/ (not tracked). The README's two, docs/job-detail.png and
# docs/compare.png, show real SmolLM2 jobs: test_readme_screenshots_of_real_smollm2_jobs, run by
# `make screenshots` (not by make test: minutes of real jobs), writes them there.
ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "runs/screenshots"


def shot(page, name: str, *, docs: bool = False, clip: dict | None = None) -> None:
    """The whole page (or `clip` of it) at the context's viewport width; `docs`: also docs/NAME."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name), full_page=True, clip=clip)
    if docs:
        shutil.copyfile(SHOTS / name, ROOT / "docs" / name)


ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("no_leftover_jobs"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no chromium: run scripts/ensure-browser.sh"),
]


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


def test_the_page_runs_no_script_but_its_own(server, browser_page):
    """The page's Content-Security-Policy, enforced by the browser: the page works under it (no violation
    while it starts), and a script written into it, as an injection would, does not run."""
    page, problems = browser_page
    headers = page.goto(server).headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert (headers["x-frame-options"], headers["x-content-type-options"]) == ("DENY", "nosniff")
    playwright_sync.expect(page.get_by_label("API token")).to_be_visible()  # its script ran
    assert problems == []
    injected = page.evaluate(
        """() => { const s = document.createElement("script"); s.textContent = "window.injected = 1";
                   document.head.append(s); return window.injected ?? null; }"""
    )
    assert injected is None
    assert problems and all("Content Security Policy" in p for p in problems), problems


@pytest.mark.usefixtures("no_leftover_jobs")  # else its worker would first run earlier tests' queued jobs
def test_sign_in_submit_follow_download_compare(server, worker, dataset, browser_page):
    page, problems = browser_page
    user = make_user()
    expect = playwright_sync.expect

    # Sign in with the link `distill up` prints; the token leaves the URL.
    page.goto(f"{server}/#token={token_of(user)}")
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    assert "token" not in page.url
    expect(page.locator("#jobs")).to_contain_text("No jobs yet")
    # The status filter offers the statuses the API's schema defines (JobStatus), in its order.
    expect(page.locator("#status-filter option")).to_have_text(["All", *(s.value for s in JobStatus)])

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
    expect(page.locator("#form-errors")).to_have_text(
        re.compile(r"^The API refused this spec \(2 problems\)[^\n]*field\.$")
    )
    shot(page, "new-job.png")
    # Every method is offered, GKD's fields among them; a yes/no field is sent as a boolean.
    expect(page.locator("#f-method option")).to_have_text(["minillm", "gkd", "kd", "seqkd", "sft"])
    page.locator("#f-gkd-lmbda").fill("1.5")
    page.locator("#f-gkd-seq_kd").select_option("true")
    page.get_by_role("button", name="Submit job").click()
    expect(page.locator("#err-f-gkd-lmbda")).to_contain_text("less than or equal to 1")
    page.get_by_text("Advanced: edit the full YAML spec").click()
    expect(page.locator("#f-yaml")).to_have_value(re.compile(r"seq_kd: true"))  # a boolean; the string would be quoted
    assert yaml.safe_load(page.locator("#f-yaml").input_value())["gkd"] == {
        "beta": 0.5,
        "lmbda": 1.5,
        "seq_kd": True,
        "temperature": 0.9,
    }
    page.get_by_text("Advanced: edit the full YAML spec").click()
    page.locator("#f-gkd-lmbda").fill("0.5")
    page.locator("#f-gkd-seq_kd").select_option("false")

    # The tiny job, through the form's fields; its training set is uploaded from the page.
    spec = tiny_spec(dataset, name="tiny-ui")
    for path, value in [
        ("name", spec["name"]),
        ("teacher", spec["teacher"]),
        ("student.model", spec["student"]["model"]),
        ("data.eval", spec["data"]["eval"]),
    ] + [
        (f"{section}.{key}", value)
        for section in ("data", "training", "minillm", "eval", "checkpoints")
        for key, value in spec[section].items()
        if section != "data" or key not in ("train", "eval", "prompt_format")
    ]:
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
    expect(page.locator("#placement")).to_have_text(re.compile(r"^\S+:\d+, cpu 0$"))  # the worker, its one CPU slot
    expect(page.locator("#evals tbody tr").first).to_be_visible(timeout=10_000)
    assert page.locator("#evals tbody tr").count() >= 2
    expect(page.locator("#events li").first).to_be_visible()
    expect(page.locator("#events")).to_contain_text("succeeded")
    expect(page.locator("#checkpoints .tag", has_text="best")).to_be_visible()
    expect(page.locator("#checkpoints .tag", has_text="latest")).to_be_visible()
    for key in ("loss", "reward", "reverse_kl", "lr", "tokens_per_s"):
        assert canvas_drawn(page, f"#chart-{key} canvas"), key
    assert canvas_drawn(page, "#chart-eval canvas")
    # Sample generations: the test set's first 3 prompts, answered by the teacher, the initial and the final student.
    first_prompt = read_records(spec["data"]["eval"])[0].message
    expect(page.locator("#samples-test thead th")).to_contain_text(
        ["Prompt", "Reference", "Teacher", "Initial student", "Final"]
    )
    expect(page.locator("#samples-test tbody tr")).to_have_count(3)
    expect(page.locator("#samples-test tbody tr").first.locator("td").first).to_have_text(first_prompt)
    expect(page.locator("#samples-selection tbody tr")).to_have_count(3)

    # A checkpoint archive downloads (the page fetches it with the token, then saves it).
    with page.expect_response(lambda r: "/archive" in r.url) as response, page.expect_download() as download:
        page.locator("#checkpoints button.archive").first.click()
    assert response.value.status == 200
    assert download.value.suggested_filename.endswith(".tar")
    assert Path(download.value.path()).stat().st_size > 0

    # Compare the two jobs once the second has ended.
    wait_for(
        lambda: (
            httpx.get(f"{server}/api/v1/jobs/{second_id}", headers=user).json()["status"] in ("succeeded", "failed")
        ),
        timeout=300,
        interval=1,
        what="the second job to end",
    )
    page.goto(f"{server}/#/jobs")
    page.get_by_role("checkbox", name="Compare tiny-ui").check()
    page.get_by_role("checkbox", name="Compare tiny-kd").check()
    page.get_by_role("button", name="Compare selected").click()
    expect(page.get_by_role("heading", name="Compare jobs")).to_be_visible()
    expect(page.locator("#compare-evals thead th")).to_have_count(3)
    expect(page.locator("#compare-evals")).to_contain_text("rouge_l")
    assert canvas_drawn(page, "#compare-loss canvas")
    assert canvas_drawn(page, "#compare-eval_rouge_l canvas")
    # Both jobs answered the same 3 test prompts: a row each, a column per job.
    expect(page.locator("#compare-samples thead th")).to_have_count(4)
    for name in ("tiny-ui", "tiny-kd"):
        expect(page.locator("#compare-samples thead")).to_contain_text(name)
    expect(page.locator("#compare-samples tbody tr")).to_have_count(3)
    expect(page.locator("#compare-samples tbody tr").first.locator("td").first).to_have_text(first_prompt)
    expect(page.locator("#compare-samples tbody td", has_text=re.compile(r"^—$"))).to_have_count(0)  # none missing

    # Sign out returns to the sign-in screen.
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("API token")).to_be_visible()
    assert page.evaluate("localStorage.getItem('distill.token')") is None
    shot(page, "sign-in.png")

    # Chromium logs every non-2xx response as a console error: the two 422s are the bad specs above.
    expected = [p for p in problems if "status of 422" in p]
    assert len(expected) == 2 and [p for p in problems if p not in expected] == [], problems


def test_a_queued_job_shows_its_place_and_what_it_waits_for(server, dataset, browser_page):
    """A job for a queue no worker serves says so on its page, until a worker for it registers (the
    page looks again every few seconds while the job is queued: no event on the job announces it).
    Cancelled, it can be resumed and deleted from its page."""
    import httpx

    from app import worker_registry
    from app.core.db import session_factory

    page, problems = browser_page
    user = make_user()
    expect = playwright_sync.expect
    response = httpx.post(
        f"{server}/api/v1/jobs",
        headers=user,
        json={
            **tiny_spec(dataset, name="tiny-gpu", method="kd", resources={"accelerator": "gpu", "devices": 9}),
            "metadata": {"commit": "0123abc"},
        },
    )
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]

    page.goto(f"{server}/#token={token_of(user)}")
    page.goto(f"{server}/#/jobs/{job_id}")
    expect(page.locator("#job-status")).to_have_attribute("data-status", "queued")
    expect(page.locator("#queue-position")).to_have_text("gpu-9: 0 jobs ahead")
    expect(page.locator("#metadata")).to_have_text("commit=0123abc")
    expect(page.locator("#waiting-for")).to_have_text(
        "no worker serves queue gpu-9; start one with `distill worker --queues gpu-9`"
    )
    shot(page, "job-waiting.png")

    with session_factory()() as session:
        worker_registry.register(session, "browser-test:1", ["gpu-9"])
    expect(page.locator("#waiting-for")).to_be_hidden(timeout=15_000)
    with session_factory()() as session:
        worker_registry.unregister(session, "browser-test:1")
    expect(page.locator("#delete")).to_be_hidden()  # not while it is queued
    expect(page.locator("#resume")).to_be_hidden()
    assert httpx.post(f"{server}/api/v1/jobs/{job_id}/cancel", headers=user).status_code == 200
    # Cancelled, it can go on: resumed from the page, which follows it again (here to its second cancel).
    page.locator("#resume").click()
    expect(page.locator("#job-status")).to_have_attribute("data-status", "queued")
    assert httpx.post(f"{server}/api/v1/jobs/{job_id}/cancel", headers=user).status_code == 200
    expect(page.locator("#job-status")).to_have_attribute("data-status", "cancelled")
    # Once it has ended, its page offers to delete it, and asks first.
    asked = []
    page.once("dialog", lambda dialog: asked.append(dialog.message) or dialog.accept())
    page.locator("#delete").click()
    expect(page).to_have_url(re.compile(r"#/jobs$"))
    assert asked and asked[0].startswith("Delete tiny-gpu with its checkpoints")
    assert httpx.get(f"{server}/api/v1/jobs/{job_id}", headers=user).status_code == 404
    assert problems == []


def test_stages_smoothing_spec_log_and_clone_on_a_jobs_page(server, worker, dataset, browser_page):
    """A job with a recovery stage: its curves mark where MiniLLM takes over and smooth as the slider
    says; its page shows its spec, downloads its training log and clones it into the new-job form."""
    import httpx

    from app.core.config import get_settings
    from app.job_paths import job_dir

    page, problems = browser_page
    user = make_user()
    expect = playwright_sync.expect
    response = httpx.post(
        f"{server}/api/v1/jobs",
        headers=user,
        json=tiny_spec(dataset, name="tiny-stages", recovery={"method": "sft", "steps": 2}),
    )
    assert response.status_code == 201, response.text
    job = response.json()
    page.goto(f"{server}/#token={token_of(user)}")
    api = f"/api/v1/jobs/{job['id']}"
    fetched = []  # what the job's page asks the API for, beside the event stream
    page.on("request", lambda r: fetched.append(urlsplit(r.url).path.removeprefix(api)) if api in r.url else None)
    page.goto(f"{server}/#/jobs/{job['id']}")
    expect(page.locator("#job-status")).to_have_attribute("data-status", "succeeded", timeout=300_000)

    # The curves, evaluations and samples came once, in the event stream, and were appended: never fetched
    # (again). The checkpoints are fetched at first, after each checkpoint event at most, and at the end.
    events = httpx.get(f"{server}{api}/events", params={"limit": 1000}, headers=user).json()["data"]
    assert not {"/metrics", "/evals", "/samples"} & set(fetched), fetched
    assert fetched.count("/checkpoints") <= 2 + sum(e["type"] == "checkpoint" for e in events)
    series = httpx.get(f"{server}{api}/metrics", headers=user).json()["loss"]  # stored once, with their stage
    assert [p["stage"] for p in series] == ["recovery-sft"] * 2 + ["minillm"] * 6

    # The stages, from the metrics events: said in words, and a line between steps 2 and 3 of each curve.
    expect(page.locator("#stages")).to_have_text("Stages: recovery-sft from step 1, minillm from step 3.")
    assert column_drawn(page, "#chart-loss canvas", 2.5)

    # Smoothing: none draws the series as it is; 0.9 draws it faintly under its moving average, which
    # starts again at the stage change (another loss).
    slider = page.get_by_label("Smoothing")
    slider.fill("0")
    raw = chart_series(page, "#chart-loss canvas")
    assert len(raw) == 1 and raw[0]["data"] == pytest.approx([p["value"] for p in series])
    slider.fill("0.9")
    expect(page.locator("output[for=smoothing]")).to_have_text("0.90")
    faint, smoothed = chart_series(page, "#chart-loss canvas")
    assert faint["faint"] and faint["data"] == raw[0]["data"]
    assert smoothed["data"] != raw[0]["data"]
    for step in (1, 3):  # the first point of each stage is its own value
        assert smoothed["data"][step - 1] == pytest.approx(raw[0]["data"][step - 1])
    assert len(chart_series(page, "#chart-lr canvas")) == 1  # a schedule, not a measurement: never smoothed
    assert page.evaluate("localStorage.getItem('distill.smoothing')") == "0.9"  # kept for the next page

    # The spec, collapsed until asked for.
    expect(page.locator("#spec pre")).to_be_hidden()
    page.locator("#spec summary").click()
    assert yaml.safe_load(page.locator("#spec pre").text_content()) == job["spec"]
    shot(page, "job-stages.png")

    # The training process's log, as the API answers it: the server's folders hidden.
    folder = job_dir(get_settings(), job["id"])
    with (folder / "attempt-1.log").open("a") as log:
        log.write(f"wrote {folder}/checkpoints/step-8\n")
    with page.expect_download() as download:
        page.get_by_role("button", name="Download log").click()
    assert download.value.suggested_filename == f"{job['id']}-attempt-1.log"
    text = Path(download.value.path()).read_text()
    assert text.endswith("wrote checkpoints/step-8\n") and str(folder) not in text

    # Clone: the new-job form with the whole spec, renamed; submitted as it is, the same job again.
    page.get_by_role("link", name="Clone").click()
    expect(page.locator("#f-name")).to_have_value("tiny-stages-copy")
    expect(page.locator("#f-training-steps")).to_have_value("6")
    expect(page.locator("#f-minillm-rollouts_per_phase")).to_have_value("4")
    expect(page.locator("#f-student-model")).to_have_value("builtin:tiny-student")
    expect(page.locator("#f-yaml")).to_be_visible()  # the form holds the main fields; the editor all of them
    assert yaml.safe_load(page.locator("#f-yaml").input_value()) == {**job["spec"], "name": "tiny-stages-copy"}
    shot(page, "new-job-clone.png")
    page.get_by_role("button", name="Submit job").click()
    page.wait_for_url(re.compile(r"#/jobs/job-"))
    copy_id = page.url.rsplit("/", 1)[-1]
    copy = httpx.get(f"{server}/api/v1/jobs/{copy_id}", headers=user).json()
    assert copy_id != job["id"] and copy["spec"] == {**job["spec"], "name": "tiny-stages-copy"}
    httpx.post(f"{server}/api/v1/jobs/{copy_id}/cancel", headers=user)
    wait_for(
        lambda: httpx.get(f"{server}/api/v1/jobs/{copy_id}", headers=user).json()["status"] == "cancelled",
        timeout=120,
        interval=1,
        what="the copy to be cancelled",
    )
    assert problems == []


def test_compare_lists_the_settings_that_differ(server, dataset, browser_page):
    """Two queued jobs (no worker runs here): the compare page lists exactly the spec fields in which
    they differ; the rest only when asked for."""
    import httpx

    page, problems = browser_page
    user = make_user()
    expect = playwright_sync.expect
    specs = [
        tiny_spec(dataset, name="lr-high"),
        tiny_spec(dataset, name="lr-low", method="kd", training={"learning_rate": 1e-4}, checkpoints={"keep": 3}),
    ]
    ids = []
    for spec in specs:
        response = httpx.post(f"{server}/api/v1/jobs", headers=user, json=spec)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])

    page.goto(f"{server}/#token={token_of(user)}")
    page.goto(f"{server}/#/compare?ids={','.join(ids)}")
    rows = page.locator("#compare-settings tbody tr")
    expect(rows.locator("visible=true")).to_have_count(4)
    shown = [rows.nth(i).get_attribute("data-path") for i in range(rows.count()) if rows.nth(i).is_visible()]
    assert shown == ["name", "method", "training.learning_rate", "checkpoints.keep"]  # in the spec's order
    expect(
        rows.filter(has=page.locator("th", has_text=re.compile(r"^training\.learning_rate$"))).locator("td")
    ).to_have_text(["0.001", "0.0001"])
    page.get_by_label(re.compile(r"Show the \d+ settings that are the same")).check()
    expect(rows.locator("visible=true")).to_have_count(rows.count())
    expect(rows.filter(has=page.locator("th", has_text=re.compile(r"^training\.steps$"))).locator("td")).to_have_text(
        ["6", "6"]
    )
    shot(page, "compare-settings.png")
    for job_id in ids:
        assert httpx.post(f"{server}/api/v1/jobs/{job_id}/cancel", headers=user).status_code == 200
    assert problems == []


# The README's screenshots: a short real job (SmolLM2-135M-Instruct distilled into 10 of its layers: KD
# recovery, then MiniLLM) and, to compare it with, word-level KD for the same number of steps on the same data.
SMOLLM2_MINILLM = {
    "name": "smollm2-minillm",
    "method": "minillm",
    "teacher": "builtin:smollm2-135m-instruct",
    "student": {"init_from_teacher": {"num_layers": 10, "strategy": "even"}},
    "data": {
        "train": "builtin:demo",
        "prompt_format": "chat",
        "max_prompt_tokens": 192,
        "max_response_tokens": 48,
        "max_train_records": 32,
    },
    "recovery": {"method": "kd", "steps": 16, "learning_rate": 5e-4, "lr_schedule": "cosine"},
    "training": {"steps": 8, "batch_size": 4, "learning_rate": 2e-5, "warmup_steps": 0},
    "minillm": {"rollouts_per_phase": 8, "rollout_batch_size": 8, "ppo_epochs": 2},
    "eval": {"every_steps": 8, "num_prompts": 4, "seeds": [10], "selection_num_prompts": 4, "batch_size": 4},
    "checkpoints": {"every_steps": 8, "keep": 2},
}
SMOLLM2_KD = {
    **SMOLLM2_MINILLM,
    "name": "smollm2-kd",
    "method": "kd",
    "recovery": None,
    "training": {"steps": 24, "batch_size": 4, "learning_rate": 5e-4, "lr_schedule": "cosine", "warmup_steps": 0},
}


@pytest.mark.smollm2
@pytest.mark.screenshots
def test_readme_screenshots_of_real_smollm2_jobs(server, worker, browser_page):
    """The two jobs above run on the real worker; the job page and the compare page show what they did, and
    are the README's docs/job-detail.png and docs/compare.png. 135 s on 2 cores with native bf16 (about a
    minute per job); 183 s with an empty cache, which adds the teacher's conversion from its GGUF file, its
    reference answers and its test-set scores (cached in .cache/); 11 minutes with an empty cache on
    2 cores with AVX2 only, where the teacher runs in fp32 and the suite gives each process one thread."""
    import httpx

    page, problems = browser_page
    user = make_user()
    expect = playwright_sync.expect
    ids = []
    for spec in (SMOLLM2_MINILLM, SMOLLM2_KD):  # the worker runs them one after the other
        response = httpx.post(f"{server}/api/v1/jobs", headers=user, json=spec)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])

    # The MiniLLM job's page, followed live to the end.
    page.goto(f"{server}/#token={token_of(user)}")
    page.goto(f"{server}/#/jobs/{ids[0]}")
    expect(page.locator("#job-status")).to_have_attribute("data-status", "succeeded", timeout=600_000)
    expect(page.locator("#stages")).to_have_text("Stages: recovery-kd from step 1, minillm from step 17.")
    for key in ("loss", "reward", "reverse_kl", "lr", "tokens_per_s"):
        assert canvas_drawn(page, f"#chart-{key} canvas"), key
    assert canvas_drawn(page, "#chart-eval canvas")
    # The evaluation table: the teacher, the initial student and the best checkpoint on the test set, with scores.
    expect(page.locator("#evals tbody tr", has_text="best")).to_be_visible(timeout=10_000)
    heads = page.locator("#evals thead th").all_text_contents()
    rouge = heads.index("rouge_l")
    scores = {}
    for label in ("teacher", "initial", "final", "best"):
        row = page.locator("#evals tbody tr").filter(has=page.locator("td", has_text=re.compile(f"^{label}$")))
        scores[label] = float(row.first.locator("td").nth(rouge).text_content())
    assert scores["teacher"] > 5 and scores["best"] > scores["initial"], scores  # the short job did learn something
    # Sample generations with real text: the teacher's answers are sentences.
    expect(page.locator("#samples-test thead th")).to_contain_text(
        ["Prompt", "Reference", "Teacher", "Initial student"]
    )
    expect(page.locator("#samples-test thead")).to_contain_text("Final")
    rows = page.locator("#samples-test tbody tr")
    expect(rows).to_have_count(3)
    teacher = page.locator("#samples-test thead th").all_text_contents().index("Teacher")
    for i in range(3):
        cells = rows.nth(i).locator("td").all_text_contents()
        assert "—" not in cells and len(cells[teacher].split()) >= 5, cells
    page.mouse.move(0, 0)  # no tooltip in the picture
    time.sleep(1)  # the charts' animations end
    # The meaningful part: status, summary, curves, evaluations and the test set's sample generations (not the
    # selection set's, the checkpoints and the event log).
    box = page.locator("#samples-test").bounding_box()
    shot(
        page, "job-detail.png", docs=True, clip={"x": 0, "y": 0, "width": 1280, "height": box["y"] + box["height"] + 16}
    )

    # The two jobs compared, once the KD job has ended.
    ended = ("succeeded", "failed", "cancelled")
    wait_for(
        lambda: httpx.get(f"{server}/api/v1/jobs/{ids[1]}", headers=user).json()["status"] in ended,
        timeout=600,
        interval=1,
        what="the KD job to end",
    )
    assert httpx.get(f"{server}/api/v1/jobs/{ids[1]}", headers=user).json()["status"] == "succeeded"
    page.goto(f"{server}/#/compare?ids={','.join(ids)}")
    expect(page.get_by_role("heading", name="Compare jobs")).to_be_visible()
    differ = page.locator("#compare-settings tbody tr").locator("visible=true")
    expect(differ.first).to_be_visible()
    shown = [differ.nth(i).get_attribute("data-path") for i in range(differ.count())]
    assert shown[:2] == ["name", "method"] and "recovery.method" in shown, shown
    expect(page.locator("#compare-evals thead th")).to_have_count(3)
    expect(page.locator("#compare-evals tbody")).to_contain_text("rouge_l")
    for key in ("loss", "lr", "tokens_per_s", "eval_rouge_l"):
        assert canvas_drawn(page, f"#compare-{key} canvas"), key
    expect(page.locator("#compare-samples tbody tr")).to_have_count(3)
    expect(page.locator("#compare-samples tbody td", has_text=re.compile(r"^—$"))).to_have_count(0)
    page.mouse.move(0, 0)
    time.sleep(1)
    shot(page, "compare.png", docs=True)
    assert problems == []


def chart_series(page, selector: str) -> list[dict]:
    """The datasets the chart on that canvas draws: label, faint (the raw series under a smoothed one), y values."""
    return page.evaluate(
        """(sel) => window.Chart.getChart(document.querySelector(sel)).data.datasets.map(
             (d) => ({ label: d.label, faint: !!d.faint, data: d.data.map((p) => p.y) }))""",
        selector,
    )


def column_drawn(page, selector: str, step: float) -> bool:
    """Most of the chart area's height is drawn at `step` on the x axis: a vertical line there."""
    return page.evaluate(
        """([sel, step]) => { const c = document.querySelector(sel), chart = window.Chart.getChart(c);
             const a = chart.chartArea, r = chart.currentDevicePixelRatio;
             const x = Math.round(chart.scales.x.getPixelForValue(step) * r), h = Math.round((a.bottom - a.top) * r);
             const d = c.getContext('2d').getImageData(x - 1, Math.round(a.top * r), 3, h).data;
             let rows = 0; for (let i = 0; i < d.length; i += 12) if (d[i + 3] || d[i + 7] || d[i + 11]) rows++;
             return rows > 0.4 * d.length / 12; }""",
        [selector, step],
    )


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
