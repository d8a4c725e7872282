"""The pack in ComfyUI's real frontend (1.35.9 served by ComfyUI 0.8.0, and 1.41.21 served by 0.18.2: every test
runs on each), in Debian's headless chromium driven by Playwright: the template browser shows our four templates with
their pictures, each opens as a graph that preselects the pack's example inputs (previews load), the frontend's own
graph-to-prompt turns each into its API twin, and the quick one runs as is on them (only made shorter) with the
lip-sync result shown on its node and the MP4 playing in the encoder's preview.

Needs `chromium` (apt-get install chromium; tests/run.sh installs it) and the `playwright` package (test extra);
Playwright's own browser downloads are never used. Skips with the reason when either is missing, fails in CI."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from helpers import ui_template_path, workflow_templates
from servers import COMFYUI_VERSIONS, PACK, ROOT, ComfyUI, need

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module", params=list(COMFYUI_VERSIONS))
def browser_page(request, tmp_path_factory, tiny_dir):
    executable = need("chromium", shutil.which("chromium") or shutil.which("chromium-browser"),
                      "apt-get install chromium (tests/run.sh does)", "SONIC_REQUIRE_COMFYUI")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need("playwright", None, "pip install playwright (the test extra)", "SONIC_REQUIRE_COMFYUI")
    server = ComfyUI(tmp_path_factory.mktemp("browser"), tiny_dir, version=request.param).start()
    try:
        server.wait()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            failures = []
            page.on("response", lambda r: failures.append(r.url) if r.status >= 400 and PACK in r.url else None)
            page.on("pageerror", lambda e: failures.append(f"page error: {e}"))
            page.goto(server.url, wait_until="networkidle")
            page.wait_for_function("() => window.app?.graph && window.app.extensionManager", timeout=60000)
            yield page, server, failures
            browser.close()
    finally:
        server.stop()


def open_templates(page):
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text(PACK, exact=True).click()
    page.wait_for_selector('[data-testid^="template-workflow-Sonic"]', timeout=30000)


def test_every_template_opens_with_its_picture_and_the_example_inputs(browser_page):
    page, server, failures = browser_page
    titles = sorted(spec["title"] for spec in workflow_templates().values())
    for title in titles:
        open_templates(page)
        card = page.locator(f'[data-testid="template-workflow-{title}"]')
        card.locator("img").first.wait_for()
        page.wait_for_function("(el) => el.complete && el.naturalWidth > 0",
                               arg=card.locator("img").first.element_handle(), timeout=30000)
        assert card.locator("img").first.evaluate("(el) => [el.naturalWidth, el.naturalHeight]") == [512, 384]
        assert title in card.inner_text()
        card.click()
        page.wait_for_function("(t) => app.graph.nodes.some(n => n.type === 'SonicSampler') && "
                               "document.title.includes(t.slice(0, 20))", arg=title, timeout=30000)
        widgets = page.evaluate("() => Object.fromEntries(app.graph.nodes.map(n => [n.type, "
                                "Object.fromEntries((n.widgets || []).map(w => [w.name, w.value]))]))")
        assert widgets["SonicLoadImage"]["image"] == "sonic_example_portrait.jpg"
        assert widgets["SonicLoadAudio"]["audio"] == "sonic_example_speech.wav"
        assert widgets["SonicModelLoader"]["download_missing"] is False
        # the example portrait's preview is loaded in the image loader (the file exists on a fresh install)
        page.wait_for_function("() => app.graph.nodes.find(n => n.type === 'SonicLoadImage').imgs?.[0]?.naturalWidth"
                               " === 512", timeout=30000)
    assert failures == []


def test_the_frontend_converts_every_template_to_its_api_twin(browser_page):
    """The real frontend's own graph-to-prompt conversion (app.graphToPrompt, what Run and "Export (API)" use) turns
    each UI template into exactly its API twin in workflows/api/ (tests/nodes/test_workflows.py checks the same with
    the harness's copy of the conversion; this is the frontend of the ComfyUI version under test)."""
    page, server, failures = browser_page
    names = sorted(workflow_templates())
    for name in names:
        workflow = json.loads(ui_template_path(name).read_text())
        twin = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
        output = page.evaluate("""async (workflow) => {
            await app.loadGraphData(workflow);
            return (await app.graphToPrompt()).output;
        }""", workflow)
        for node in output.values():
            # the audio upload widget's player URL (with a random query), which every frontend adds to prompts for
            # audio loaders (ComfyUI's own LoadAudio too) and the server ignores: not part of the node's contract
            node["inputs"].pop("audioUI", None)
        differences = [f"node {key}: frontend {output.get(key)} != twin {twin.get(key)}"
                       for key in sorted(set(output) | set(twin)) if output.get(key) != twin.get(key)]
        assert not differences, f"{name}: the frontend's conversion differs from workflows/api/{name}.json: " + \
            "\n".join(differences)
        assert {node["class_type"] for node in output.values()} >= {"SonicSampler", "SonicVideoEncode"}
    assert len(names) == 4 and failures == []


def test_quick_template_runs_and_shows_the_lip_sync_result_and_the_video(browser_page):
    page, server, failures = browser_page
    title = workflow_templates()["sonic_quick_512"]["title"]
    open_templates(page)
    page.locator(f'[data-testid="template-workflow-{title}"]').click()
    page.wait_for_function("() => app.graph.nodes.some(n => n.type === 'SonicSampler')", timeout=30000)
    # as shipped, only shorter for a 2-core CPU: 2 steps, 1.5 s of the example speech, 256 px
    page.evaluate("""() => {
        const set = (type, name, value) => { app.graph.nodes.find(n => n.type === type).widgets
            .find(w => w.name === name).value = value; };
        set('SonicSampler', 'steps', 2); set('SonicPreData', 'duration', 1.5); set('SonicPreData', 'min_resolution', 256);
    }""")
    page.get_by_role("button", name="Run", exact=True).first.click()
    result = page.locator(".sonic-lipsync-result")
    deadline = time.time() + 300
    while not result.is_visible():  # the result, or the server's own words about why it will not come
        history = page.evaluate("async () => (await (await fetch('/api/history?max_items=1')).json())")
        ended = [entry["status"] for entry in history.values() if entry.get("status", {}).get("status_str") == "error"]
        queue = page.evaluate("async () => (await (await fetch('/api/queue')).json())")
        assert not ended and time.time() < deadline, (ended, queue, server.log_path.read_text()[-3000:])
        page.wait_for_timeout(1000)
    text = result.inner_text()
    assert text.startswith("offset ") and "confidence" in text and "applied" in text
    video = page.locator("video[src*='.mp4']").first
    video.wait_for(timeout=300000)  # the encoder's preview: the prompt has finished
    page.wait_for_function("(v) => v.readyState >= 1 && v.duration > 1", arg=video.element_handle(), timeout=60000)
    assert 1.3 < video.evaluate("(v) => v.duration") <= 1.5  # 1.5 s of speech: 18 frames, 35 after RIFE = 1.4 s
    history = page.evaluate("async () => (await (await fetch('/api/history?max_items=1')).json())")
    (entry,) = history.values()
    calibrate = next(k for k, v in entry["prompt"][2].items() if v["class_type"] == "SonicLipSyncCalibrate")
    measured = entry["outputs"][calibrate]["lipsync"][0]
    # the node shows what the server measured, and the warning colour when the correction was not applied
    assert f"confidence {measured['confidence']:.2f}" in text and measured["message"] in text
    assert result.get_attribute("data-warning") == str(measured["warning"]).lower()
    # the result text is not saved with the workflow: the saved graph keeps the template's widget layout
    saved = page.evaluate("() => app.graph.serialize().nodes.find(n => n.type === 'SonicLipSyncCalibrate')"
                          ".widgets_values")
    assert len(saved) == 6
    page.screenshot(path=str(server.base / "quick-run.png"))
    assert failures == [], failures
