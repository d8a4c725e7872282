"""The service's upload page (sonic/service/static/index.html) used as a person uses it, end to end: a real ComfyUI
0.8.0 with this pack and the tiny reference models, `python -m sonic serve` in embedded mode in front of it (SQLite,
a folder store, its own signed /v1/files links) and Debian's headless chromium driven by Playwright.

With a saved API key, a portrait and a recording chosen and the `quick` preset (made tiny by the operator's
SONIC_PRESETS), Generate uploads to 100 %, the job is followed from queued/running (denoising steps) to done, the
video plays in the page, the download is the stored MP4 byte for byte, its link answers range requests, and the
recent jobs list it as done. A key the service does not know and a photo that is not an image are refused on the
page, and no job is made.

Needs COMFYUI_DIR, `chromium` (apt-get install chromium) and the `playwright` package; skips with the reason when
one is missing, fails in CI (SONIC_REQUIRE_COMFYUI=1)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from servers import ROOT, ComfyUI, comfyui_dir, need, wait_listening

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
# The operator's presets: `quick` as a 2-step, 128 px, 1 s render, seconds on a CPU.
PRESETS = {"quick": {"steps": 2, "min_resolution": 128, "duration": 1.0}}
RENDER_TIMEOUT_S = 240
SCREENSHOT_COPY = Path("/tmp/sonic-page.png")

# Everything the page shows about the job, recorded at each change of the page (a MutationObserver), so states
# shown only for a moment between two polls of the test are seen too.
RECORD_PAGE = """() => {
    const $ = (id) => document.getElementById(id);
    window.seen = [];
    const note = () => {
        const bar = $("denoise-progress");
        const row = {
            state: $("job-state").dataset.state || "", stateText: $("job-state").textContent,
            denoiseVisible: bar.checkVisibility(), denoiseValue: bar.hasAttribute("value") ? bar.value : null,
            denoiseMax: bar.max, denoiseText: $("denoise-text").textContent,
            upload: $("upload-progress").value, uploadText: $("upload-percent").textContent,
        };
        const last = window.seen[window.seen.length - 1];
        if (!last || JSON.stringify(last) !== JSON.stringify(row)) window.seen.push(row);
    };
    new MutationObserver(note).observe(document.querySelector("main"),
        {subtree: true, attributes: true, childList: true, characterData: true});
    note();
}"""


class PageService:
    """`python -m sonic serve` in embedded mode on a port of its own: jobs in SQLite, objects in a store folder,
    jobs run on the ComfyUI at `comfyui`."""

    def __init__(self, folder: Path, comfyui: str):
        self.folder = folder
        self.database = f"sqlite:///{folder / 'jobs.db'}"
        self.store = folder / "store"
        self.log_path = folder / "service.log"
        self.log = open(self.log_path, "a")  # noqa: SIM115 (the server's output while it runs; closed by stop)
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "SONIC_URL_ALLOW": "127.0.0.1",
                    "SONIC_PRESETS": json.dumps(PRESETS)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sonic", "serve", "--listen", "127.0.0.1:0", "--database", self.database,
             "--store", str(self.store), "--comfyui", comfyui],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=folder)
        port = wait_listening(self.process, 0, self.log_path, 0, 60, "sonic serve")
        self.url = f"http://127.0.0.1:{port}"

    def key(self, tenant: str) -> str:
        made = subprocess.run([sys.executable, "-m", "sonic", "serve", "keys", "create", "--tenant", tenant,
                               "--database", self.database], capture_output=True, text=True, timeout=120,
                              cwd=self.folder, env=self.env, check=False)
        assert made.returncode == 0, made.stderr
        return dict(line.split(": ", 1) for line in made.stdout.splitlines())["api_key"]

    def get(self, path: str, key: str) -> dict:
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def log_tail(self, size: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-size:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_dir):
    """The ComfyUI, the service in front of it with one tenant's key, and chromium; all stopped afterwards."""
    executable = need("chromium", shutil.which("chromium") or shutil.which("chromium-browser"),
                      "apt-get install chromium (tests/run.sh does)", "SONIC_REQUIRE_COMFYUI")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need("playwright", None, "pip install playwright (the test extra)", "SONIC_REQUIRE_COMFYUI")
    pytest.importorskip("fastapi")
    comfyui_dir()
    top = tmp_path_factory.mktemp("page")
    comfy, service = None, None
    try:
        comfy = ComfyUI(top / "comfyui", tiny_dir, threads=2).start().wait()
        (top / "service").mkdir()
        service = PageService(top / "service", comfy.url)
        key = service.key("portraits")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
            try:
                yield SimpleNamespace(comfy=comfy, service=service, key=key, browser=browser, top=top)
            finally:
                browser.close()
    finally:
        if service is not None:
            service.stop()
        if comfy is not None:
            comfy.stop()


def open_page(site):
    """A fresh browser profile (no saved key) on the service's page -> (page, errors, refused): the page's script
    errors, and the requests the service refused (status, method, path)."""
    context = site.browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    errors, refused = [], []
    page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
    # "Failed to load resource" repeats a refused request, which `refused` records
    page.on("console", lambda message: errors.append(f"console: {message.text}") if message.type == "error"
            and not message.text.startswith("Failed to load resource") else None)
    page.on("response", lambda r: refused.append((r.status, r.request.method, r.url.removeprefix(site.service.url)))
            if r.status >= 400 else None)
    page.goto(site.service.url + "/", wait_until="networkidle")
    return page, errors, refused


def save_key(page, key: str) -> None:
    page.fill("#api-key", key)
    page.click("#save-key")


def job_shown(page) -> str:
    return (f"#job-state {page.get_attribute('#job-state', 'data-state')!r}: {page.inner_text('#job-state')!r}; "
            f"#error: {page.inner_text('#error')!r}")


def test_a_portrait_and_a_recording_become_a_video_that_plays_and_downloads(site, tiny_dir):
    page, errors, refused = open_page(site)
    save_key(page, site.key)
    page.wait_for_selector("#key-status:has-text('Saved in this browser.')")
    page.set_input_files("#photo", str(tiny_dir / "inputs" / "portrait.png"))
    page.set_input_files("#recording", str(tiny_dir / "inputs" / "speech.wav"))
    assert page.inner_text("#photo-info").startswith("portrait.png · ")
    assert page.inner_text("#recording-info").startswith("speech.wav · ")
    assert page.input_value("#preset") == "quick"
    assert page.is_enabled("#generate")
    page.evaluate(RECORD_PAGE)
    started = time.monotonic()
    page.click("#generate")

    # the upload reaches 100 %, then the job is followed until it is done
    page.wait_for_selector("#job-id:not(:empty)", timeout=60000)
    job_id = page.inner_text("#job-id")
    assert job_id.startswith("j_")
    deadline = time.monotonic() + RENDER_TIMEOUT_S
    while page.get_attribute("#job-state", "data-state") != "done":
        state = page.get_attribute("#job-state", "data-state")
        if state in ("failed", "cancelled") or time.monotonic() > deadline:
            pytest.fail(f"job {job_id} not done after {time.monotonic() - started:.0f} s: {job_shown(page)}\n"
                        f"service log:\n{site.service.log_tail()}\nComfyUI log:\n"
                        f"{site.comfy.log_path.read_text(errors='replace')[-2000:]}")
        page.wait_for_timeout(200)
    rendered_s = time.monotonic() - started
    seen = page.evaluate("() => window.seen")
    assert page.get_attribute("#upload-progress", "value") == "100"
    assert page.inner_text("#upload-percent") == "Uploaded"
    assert max(row["upload"] for row in seen) == 100
    states = [row["state"] for row in seen]
    assert {"queued", "running"} & set(states), seen
    assert states.index("done") > max(states.index(s) for s in ("queued", "running") if s in states)
    job = site.service.get(f"/v1/jobs/{job_id}", site.key)
    assert job["state"] == "done" and job["params"] == PRESETS["quick"], job
    assert page.is_hidden("#denoise")  # gone once the job is done
    assert page.inner_text("#job-state") == "Done"
    assert page.inner_text("#error") == ""

    # the video plays in the page
    output = job["output"]
    assert page.is_visible("#result")
    assert page.inner_text("#result-job-id") == job_id
    page.wait_for_function("() => { const v = document.getElementById('result');"
                           " return v.readyState >= 2 && v.duration > 0; }", timeout=30000)
    duration_s = page.evaluate("() => document.getElementById('result').duration")
    assert 0.5 <= duration_s <= 1.5, duration_s  # the preset's 1 s of speech
    page.evaluate("async () => { const v = document.getElementById('result'); v.currentTime = 0; await v.play(); }")
    page.wait_for_function("() => document.getElementById('result').currentTime > 0", timeout=15000)
    assert page.evaluate("() => document.getElementById('result').error") is None

    # the download is the stored MP4, byte for byte
    link = urllib.parse.urlsplit(output["url"])
    shown = urllib.parse.urlsplit(page.get_attribute("#download", "href"))  # signed when the page got the job
    assert link.path.startswith("/v1/files/") and shown.path == link.path and "signature=" in shown.query
    key = urllib.parse.unquote(link.path.removeprefix("/v1/files/"))
    assert key.startswith(f"portraits/jobs/{job_id}/") and key.endswith(".mp4"), key
    stored = (site.service.store / key).read_bytes()
    assert hashlib.sha256(stored).hexdigest() == output["sha256"] and len(stored) == output["bytes"]
    with page.expect_download() as started_download:
        page.click("#download")
    download = started_download.value
    assert Path(download.path()).read_bytes() == stored
    assert page.get_attribute("#result-sha256", "title") == output["sha256"]
    assert page.inner_text("#result-sha256") == output["sha256"][:12] + "…"
    number, unit = page.inner_text("#result-size").split()
    scale = {"bytes": 1, "KB": 1e3, "MB": 1e6}[unit]
    assert abs(float(number) * scale - output["bytes"]) <= scale / 2, (number, unit, output["bytes"])

    # the link answers range requests (players and resumed downloads ask for slices)
    request = urllib.request.Request(output["url"], headers={"Range": "bytes=100-299"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 206
        assert response.headers["Content-Type"] == "video/mp4"
        assert response.headers["Content-Range"] == f"bytes 100-299/{len(stored)}"
        assert response.read() == stored[100:300]

    # the recent jobs list it as done, with Play
    row = page.locator(f"#recent li[data-job-id='{job_id}']")
    row.wait_for(timeout=15000)
    assert row.locator(".job-state").inner_text() == "Done"
    assert "state-done" in row.locator(".job-state").get_attribute("class")
    assert row.locator("a.play").get_attribute("href").startswith(site.service.url + "/v1/files/")

    shot = site.top / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    shutil.copyfile(shot, SCREENSHOT_COPY)
    print(f"\n{job_id}: done {rendered_s:.1f} s after Generate, a {duration_s:.2f} s video; the page showed "
          f"{[(r['state'], r['denoiseValue'], r['denoiseText']) for r in seen if r['state']]}; screenshot {shot} "
          f"(and {SCREENSHOT_COPY})")
    assert errors == [] and refused == [], (errors, refused)

    # Denoising as the page and the API tell it: the preset's 2 steps, one by one while they run (a render too
    # quick for the page to show a step skips that part), all of them once done; and the download saved under the
    # name the page gives it (the job's id), not under one name for every job. Checked together, last, so that one
    # wrong answer does not hide the others.
    steps_shown = [row["denoiseText"] for row in seen if row["state"] == "running" and row["denoiseVisible"]
                   and (row["denoiseValue"] or 0) > 0]
    assert {"steps shown while running": [text for text in steps_shown if text not in ("step 1 of 2", "step 2 of 2")],
            "progress once done": job["progress"], "downloaded as": download.suggested_filename} == {
            "steps shown while running": [], "progress once done": {"value": 2, "max": 2},
            "downloaded as": f"{job_id}.mp4"}
    page.context.close()


def test_a_bad_key_and_a_photo_that_is_no_image_are_refused_and_make_no_job(site, tiny_dir):
    key = site.service.key("refusals")
    page, errors, refused = open_page(site)

    save_key(page, "sk_not-a-key")
    page.wait_for_selector("#key-error:has-text('This API key is not valid')", timeout=15000)
    assert page.get_attribute("#api-key", "aria-invalid") == "true"
    assert page.inner_text("#recent-status") == "Save a valid API key to see your jobs."

    save_key(page, key)
    page.wait_for_selector("#recent-status:has-text('No jobs yet.')", timeout=15000)
    assert page.inner_text("#key-error") == "" and page.get_attribute("#api-key", "aria-invalid") is None

    # a text file is refused as soon as it is chosen
    page.set_input_files("#recording", str(tiny_dir / "inputs" / "speech.wav"))
    page.set_input_files("#photo", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a photo\n"})
    assert page.inner_text("#error") == "notes.txt is not a PNG, JPEG or WebP image."
    assert "invalid" in page.get_attribute("#photo-zone", "class")
    assert page.is_disabled("#generate") and page.inner_text("#photo-info") == "No photo chosen"

    # one named .png that is no image gets past the page; the service looks at its bytes and refuses it
    page.set_input_files("#photo", {"name": "fake.png", "mimeType": "image/png", "buffer": b"GIF89a, not a PNG"})
    page.click("#generate")
    page.wait_for_selector("#error:has-text('image: not an image')", timeout=30000)
    assert "fake.png" in page.inner_text("#error")
    assert "invalid" in page.get_attribute("#photo-zone", "class")
    assert page.is_hidden("#job") and page.is_enabled("#generate")
    assert site.service.get("/v1/jobs", key)["jobs"] == []
    assert not (site.service.store / "inputs" / "refusals").exists()  # nothing of the refused upload was kept
    assert errors == [] and sorted(refused) == [(401, "GET", "/v1/jobs?limit=10"), (401, "GET", "/v1/presets"),
                                          (422, "POST", "/v1/jobs")], (errors, refused)  # the two GETs race
    page.context.close()
