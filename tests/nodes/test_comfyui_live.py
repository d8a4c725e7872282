"""The pack inside a real ComfyUI 0.8.0, driven over HTTP and WebSocket (tests/servers.py starts it; CI installs it
with ../shared/comfyui/install.sh and sets COMFYUI_DIR).

Uploads the inputs, queues every API workflow, waits on the websocket, downloads the MP4 through /view and checks
it; then checks that /interrupt cancels a run.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from helpers import ui_template_path
from servers import COMFYUI_VERSIONS, PACK, ROOT, ComfyUI

FAST = {"SonicPreData": {"min_resolution": 128, "duration": 1.0}, "SonicSampler": {"steps": 1}}


class Client:
    def __init__(self, url: str):
        self.url, self.client_id = url, uuid.uuid4().hex

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read()

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read()
            return json.loads(data) if data else {}

    def upload(self, path: Path) -> str:
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + \
               f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(self.url + "/upload/image", body,
                                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["name"]

    def run(self, prompt: dict, on_progress=None, timeout: float = 600, workflow: dict | None = None) -> tuple[str, dict]:
        """Queue a prompt and follow it on the websocket until it ends -> (outcome, history entry)."""
        import websocket

        ws = websocket.create_connection(f"ws://{self.url.split('://')[1]}/ws?clientId={self.client_id}", timeout=timeout)
        try:
            prompt_id = uuid.uuid4().hex
            body = {"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id}
            if workflow is not None:  # what the frontend sends: the UI graph, stored in the output's metadata
                body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
            reply = self.post("/prompt", body)
            assert not reply.get("node_errors"), reply
            deadline = time.time() + timeout
            while time.time() < deadline:
                message = ws.recv()
                if isinstance(message, bytes):
                    continue  # previews
                event = json.loads(message)
                data = event.get("data", {})
                if data.get("prompt_id") != prompt_id:
                    continue
                if event["type"] == "progress" and on_progress:
                    on_progress(data)
                if event["type"] in ("execution_error", "execution_interrupted"):
                    outcome = event["type"]
                    break
                if event["type"] == "executing" and data.get("node") is None:
                    outcome = "success"
                    break
            else:
                raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")
        finally:
            ws.close()
        history = json.loads(self.get(f"/history/{prompt_id}"))
        return outcome, history.get(prompt_id, {})


@pytest.fixture(scope="module", params=list(COMFYUI_VERSIONS))
def comfyui(request, tmp_path_factory, tiny_dir):
    """ComfyUI with the pack, once per tested version (the module's tests run on each)."""
    server = ComfyUI(tmp_path_factory.mktemp("comfyui"), tiny_dir, version=request.param).start()
    try:
        server.wait()
        yield Client(server.url), server.base
    finally:
        server.stop()


def test_pack_loads_in_comfyui(comfyui):
    client, base = comfyui
    info = json.loads(client.get("/object_info/SonicSampler"))["SonicSampler"]
    assert info["category"] == "Sonic" and info["output"] == ["IMAGE", "AUDIO", "FLOAT", "SONIC_FRAMES"]
    assert "Sonic/unet.pth" in json.dumps(json.loads(client.get("/object_info/SonicModelLoader")))
    ours = [line for line in (base / "comfyui.log").read_text().splitlines() if PACK in line]
    assert ours and not any("IMPORT FAILED" in line or "Cannot import" in line for line in ours), ours
    assert f"/extensions/{PACK}/sonic_audio_upload.js" in json.loads(client.get("/extensions"))
    templates = json.loads(client.get("/workflow_templates"))
    assert sorted(templates[PACK]) == sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
    assert len(templates[PACK]) == 4


@pytest.mark.parametrize("name", ["sonic_quick_512", "sonic_hq_1024", "sonic_long_audio", "sonic_batch_api"])
def test_api_workflow_over_http(comfyui, tiny_dir, name):
    import av

    client, base = comfyui
    portrait = client.upload(tiny_dir / "inputs" / "portrait.png")
    speech = client.upload(tiny_dir / "inputs" / "speech.wav")
    prompt = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    for node in prompt.values():
        node["inputs"].update(FAST.get(node["class_type"], {}))
        if node["class_type"] == "SonicLoadImage":
            node["inputs"]["image"] = portrait
        if node["class_type"] == "SonicLoadAudio":
            node["inputs"]["audio"] = speech
        if node["class_type"] == "SonicSampler":  # a new seed per job, or ComfyUI reuses the cached result
            node["inputs"]["seed"] = sum(map(ord, name))
    progress = []
    workflow = json.loads(ui_template_path(name).read_text())
    outcome, history = client.run(prompt, on_progress=progress.append, workflow=workflow)
    assert outcome == "success", json.dumps(history.get("status"), indent=1)[-3000:]
    encoder = next(k for k, v in prompt.items() if v["class_type"] == "SonicVideoEncode")
    entry = history["outputs"][encoder]["images"][0]
    assert history["outputs"][encoder]["animated"] == [True]
    data = client.get(f"/view?filename={entry['filename']}&subfolder={entry['subfolder']}&type={entry['type']}")
    video = base / f"{name}.mp4"
    video.write_bytes(data)
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 23
        assert container.streams.audio[0].codec_context.name == "aac"
        assert json.loads(container.metadata["prompt"]).keys() == prompt.keys()
        assert json.loads(container.metadata["workflow"]) == workflow  # dropping the MP4 restores the graph
    assert progress, "no progress messages were sent"


def _quick_prompt(client: Client, tiny_dir, seed: int) -> dict:
    """The quick template's API prompt, shortened (FAST), on the uploaded tiny inputs, with `seed`."""
    prompt = json.loads((ROOT / "workflows" / "api" / "sonic_quick_512.json").read_text())
    for node in prompt.values():
        node["inputs"].update(FAST.get(node["class_type"], {}))
        if node["class_type"] == "SonicLoadImage":
            node["inputs"]["image"] = client.upload(tiny_dir / "inputs" / "portrait.png")
        if node["class_type"] == "SonicLoadAudio":
            node["inputs"]["audio"] = client.upload(tiny_dir / "inputs" / "speech.wav")
        if node["class_type"] == "SonicSampler":
            node["inputs"]["seed"] = seed
    return prompt


# UNet streaming (SONIC_STREAM_UNET / --novram -> sequential guidance rows): tests/engine/test_plan.py


def test_interrupt_cancels_the_sampler(comfyui):
    client, _ = comfyui
    prompt = json.loads((ROOT / "workflows" / "api" / "sonic_quick_512.json").read_text())
    for node in prompt.values():
        node["inputs"].update(FAST.get(node["class_type"], {}))
        if node["class_type"] == "SonicSampler":
            node["inputs"].update(steps=50, seed=123)
    sent = []

    def interrupt_once(progress):
        if not sent and progress.get("node") == "5":
            sent.append(client.post("/interrupt", {}))

    outcome, history = client.run(prompt, on_progress=interrupt_once)
    assert sent and outcome == "execution_interrupted"
    assert json.loads(client.get("/system_stats"))  # ComfyUI keeps running


def test_sampler_outputs_feed_core_create_and_save_video(comfyui, tiny_dir):
    """IMAGE + AUDIO + fps from Sonic Sampler -> ComfyUI's own CreateVideo -> SaveVideo."""
    import av

    client, base = comfyui
    prompt = _quick_prompt(client, tiny_dir, 4242)
    del prompt["6"]  # our encoder, replaced by the core nodes
    prompt["7"] = {"class_type": "CreateVideo", "inputs": {"images": ["5", 0], "fps": ["5", 2], "audio": ["5", 1]}}
    prompt["8"] = {"class_type": "SaveVideo", "inputs": {"video": ["7", 0], "filename_prefix": "core/sonic",
                                                         "format": "mp4", "codec": "h264"}}
    outcome, history = client.run(prompt)
    assert outcome == "success", json.dumps(history.get("status"), indent=1)[-3000:]
    entry = history["outputs"]["8"]["images"][0]
    video = base / "core.mp4"
    video.write_bytes(client.get(f"/view?filename={entry['filename']}&subfolder={entry['subfolder']}&type=output"))
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 23
        assert container.streams.video[0].average_rate == 25
        assert len(container.streams.audio) == 1


def _decoded(path: Path):
    """(video frames as RGB arrays, audio samples, audio rate) of an MP4."""
    import av
    import numpy as np

    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        container.seek(0)
        stream = container.streams.audio[0]
        audio = np.concatenate([frame.to_ndarray().reshape(-1) for frame in container.decode(audio=0)])
        return frames, audio, stream.rate


def test_video_encode_video_output_feeds_core_save_video(comfyui, tiny_dir):
    """Sonic Video Encode's `video` output (ComfyUI's core VIDEO: the MP4 it wrote) -> ComfyUI's own SaveVideo:
    the saved file plays with the same frames and sound as the encoder's MP4 (SaveVideo copies the streams)."""
    import numpy as np

    client, base = comfyui
    info = json.loads(client.get("/object_info/SonicVideoEncode"))["SonicVideoEncode"]
    assert info["output"] == ["STRING", "VIDEO"] and info["output_name"] == ["path", "video"]
    prompt = _quick_prompt(client, tiny_dir, 5151)
    prompt["9"] = {"class_type": "SaveVideo", "inputs": {"video": ["6", 1], "filename_prefix": "core/encoded",
                                                         "format": "mp4", "codec": "h264"}}
    outcome, history = client.run(prompt)
    assert outcome == "success", json.dumps(history.get("status"), indent=1)[-3000:]
    files = {}
    for node, name in (("6", "encoded.mp4"), ("9", "saved.mp4")):
        entry = history["outputs"][node]["images"][0]
        files[node] = base / name
        files[node].write_bytes(client.get(f"/view?filename={entry['filename']}&subfolder={entry['subfolder']}"
                                           f"&type={entry['type']}"))
    assert history["outputs"]["9"]["images"][0]["subfolder"] == "core"
    ours, saved = _decoded(files["6"]), _decoded(files["9"])
    assert len(saved[0]) == len(ours[0]) == 23
    assert all(np.array_equal(a, b) for a, b in zip(ours[0], saved[0]))
    assert saved[2] == ours[2] and np.array_equal(saved[1], ours[1]) and np.abs(saved[1]).max() > 0
