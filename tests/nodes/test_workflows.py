"""Every shipped template: valid for ComfyUI's frontend and executor, and runs end to end on the tiny models."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import av
import pytest

from comfy_harness import UI_ONLY_NODES, execute_prompt, reset_stub_records, ui_to_api, validate_prompt
from helpers import audio_delay_s, ui_template_path, workflow_templates

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
NAMES = sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json"))
UI_FILE = {name: ui_template_path(name) for name in workflow_templates()}
FAST = {"SonicPreData": {"min_resolution": 128, "duration": 1.0}, "SonicSampler": {"steps": 1}}


def load_build():
    """workflows/_build.py, the generator of every file derived from the node classes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("workflows_build", WORKFLOWS / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _fresh_stub_records():
    """The ComfyUI stand-in records model loads, memory requests and progress: none carried over between tests."""
    reset_stub_records()
    yield
    reset_stub_records()


def test_templates_and_api_twins_are_paired_and_pictured():
    from PIL import Image

    assert NAMES == ["sonic_batch_api", "sonic_hq_1024", "sonic_long_audio", "sonic_quick_512"] == sorted(UI_FILE)
    assert sorted(WORKFLOWS.glob("*.json")) == sorted(UI_FILE.values())  # nothing else shows in the browser
    for name, path in UI_FILE.items():
        # the browser shows a custom template by its file name (title and description, "-" and "_" turned into
        # spaces) with "<name>.jpg" as its picture
        assert "-" not in path.stem and "_" not in path.stem and path.stem.startswith("Sonic ")
        with Image.open(path.with_suffix(".jpg")) as picture:
            assert picture.format == "JPEG" and picture.size == (512, 384)
        ui = json.loads(path.read_text())
        assert ui["extra"]["title"] == path.stem


def test_generated_files_match_the_node_classes(comfy_env):
    """The templates and sonic/jobs/sonic_nodes.json are derived from the nodes' INPUT_TYPES / RETURN_TYPES: what
    the generator writes now is what is committed."""
    build = load_build()
    files = build.generate(comfy_env["mappings"], comfy_env["pack"].NODE_DISPLAY_NAME_MAPPINGS)
    root = WORKFLOWS.parent
    assert build.SNAPSHOT in files and len(files) == 2 * len(NAMES) + 1
    stale = [str(path.relative_to(root)) for path, text in files.items()
             if not path.is_file() or path.read_text() != text]
    assert not stale, (f"generated from the node classes but out of date: {stale}. Run `python workflows/_build.py` "
                       "and commit the files it writes.")


def test_node_table_is_read_off_the_classes(comfy_env):
    """Sockets, outputs, the frontend's widget order and a fresh node's values come from INPUT_TYPES / RETURN_TYPES
    (spot checks of what the frontend 1.35.9 serialises: seed's control mode follows it, upload widgets come
    last)."""
    table = load_build().node_table(comfy_env["mappings"])
    assert set(table) == set(comfy_env["mappings"])
    sockets, outputs, widgets, defaults, keys = table["SonicSampler"]
    assert sockets == [("sonic_model", "SONIC_MODEL"), ("predata", "SONIC_PREDATA")]
    assert outputs == [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT"), ("frames", "SONIC_FRAMES")]
    assert widgets[:3] == ["seed", None, "steps"] and keys[:3] == ["seed", "control_after_generate", "steps"]
    assert defaults[:3] == [72589, "randomize", 25]
    _, _, widgets, defaults, keys = table["SonicLoadAudio"]
    assert widgets == ["audio", "trim_silence", "silence_db", "path_or_url", None, None] and keys[-2:] == [None, None]
    assert defaults[1:] == [False, 40.0, "", None, ""]
    assert table["SonicVideoEncode"][0][0] == ("fps", "FLOAT")  # forceInput: a socket, not a widget


def test_templates_preselect_the_example_inputs_that_the_pack_copies(comfy_env):
    api = json.loads((WORKFLOWS / "api" / "sonic_quick_512.json").read_text())
    image = next(n for n in api.values() if n["class_type"] == "SonicLoadImage")["inputs"]["image"]
    audio = next(n for n in api.values() if n["class_type"] == "SonicLoadAudio")["inputs"]["audio"]
    examples = Path(__file__).resolve().parents[2] / "example_inputs"
    for name in (image, audio):
        copied = comfy_env["base"] / "input" / name
        assert copied.read_bytes() == (examples / name).read_bytes()  # copied when the pack loaded
    listed = comfy_env["mappings"]["SonicLoadImage"].INPUT_TYPES()["required"]["image"][0]
    assert image in listed


@pytest.mark.parametrize("name", NAMES)
def test_ui_template_matches_its_api_twin(comfy_env, name):
    mappings = comfy_env["mappings"]
    ui = json.loads(UI_FILE[name].read_text())
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    assert ui["version"] == 0.4 and any(n["type"] == "Note" for n in ui["nodes"])
    for node in ui["nodes"]:
        assert node["type"] in mappings or node["type"] in UI_ONLY_NODES
    nodes = {n["id"]: n for n in ui["nodes"]}
    for link_id, origin, slot, target, target_slot, kind in ui["links"]:
        assert mappings[nodes[origin]["type"]].RETURN_TYPES[slot] == kind
        socket = nodes[target]["inputs"][target_slot]
        assert socket["type"] == kind and socket["link"] == link_id
    strip = lambda prompt: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}  # noqa: E731
    assert strip(ui_to_api(ui, mappings)) == strip(api)
    validate_prompt(copy.deepcopy(api), mappings)  # widget values valid as shipped


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_on_the_tiny_models(comfy_env, name):
    prompt = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    for node in prompt.values():
        node["inputs"].update(FAST.get(node["class_type"], {}))
    results, ui = execute_prompt(prompt, comfy_env["mappings"])
    sampler = next(k for k, v in prompt.items() if v["class_type"] == "SonicSampler")
    encoder = next(k for k, v in prompt.items() if v["class_type"] == "SonicVideoEncode")
    images, audio, fps, frames = results[sampler]
    assert fps == 25.0 and len(frames.store) == 23  # 1 s -> 12 generated frames -> 23 after RIFE
    assert images.shape[0] == (1 if prompt[sampler]["inputs"]["output"] == "frames file" else 23)
    # the default chain: sampler -> lip-sync calibration -> smoothing -> encoder, the calibrated audio encoded
    calibrate = next(k for k, v in prompt.items() if v["class_type"] == "SonicLipSyncCalibrate")
    smooth = next(k for k, v in prompt.items() if v["class_type"] == "SonicSmoothMotion")
    _, _, corrected, _, confidence = results[calibrate]
    # random tiny weights make no readable mouth: the low confidence is flagged and the audio passed on as it came
    # (the correction itself: test_template_lip_sync_corrects_a_known_offset)
    report = ui[calibrate]["lipsync"][0]
    threshold = prompt[calibrate]["inputs"]["min_confidence"]
    assert confidence < threshold and report["confidence"] < threshold
    assert report["warning"] is True and report["applied_s"] == 0.0 and "NOT corrected" in report["message"]
    assert audio_delay_s(corrected, results[sampler][1]) == 0.0
    assert prompt[encoder]["inputs"]["audio"] == [calibrate, 2]
    smoothed_images, smoothed_frames = results[smooth]
    if "frames" in prompt[smooth]["inputs"]:  # the frames-file chain
        assert len(smoothed_frames.store) == 23 and smoothed_frames.fps == 25.0
    else:  # IMAGE in, IMAGE out (no frames file with a guessed fps)
        assert smoothed_images.shape[0] == 23 and smoothed_frames is None
    entry = ui[encoder]["images"][0]
    path = comfy_env["base"] / "output" / entry["subfolder"] / entry["filename"]
    assert Path(results[encoder][0]) == path
    with av.open(str(path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 23
        assert container.streams.video[0].average_rate == 25
        assert container.streams.audio[0].codec_context.name == "aac"


KNOWN_OFFSET_S = 0.12  # the picture of the talking clip below is 120 ms late (3 frames at 25 fps)


@pytest.fixture(scope="module")
def late_talking_clip(espeak):
    """(speech, uint8 frames at 25 fps): espeak-ng speech and a face whose mouth follows it KNOWN_OFFSET_S late."""
    speech = espeak.synthesize(espeak.SENTENCES[1])
    return speech, espeak.talking_clip(speech, 25.0, KNOWN_OFFSET_S, seed=5)


@pytest.mark.parametrize("name", NAMES)
def test_template_lip_sync_corrects_a_known_offset(comfy_env, espeak, late_talking_clip, name):
    """Each template's chain after the sampler (lip-sync calibration -> smoothing -> encoder), with its shipped
    widget values, on a talking clip whose picture is known to be 120 ms late: the measurement is trusted, the
    audio passed on is delayed by those 120 ms and the report says so. The sampler's and PreData's outputs are
    given as ComfyUI's cache would hold them (the tiny models make no readable mouth)."""
    import importlib
    from types import SimpleNamespace

    import torch

    pack = comfy_env["pack"]
    prompt = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    node_of = {v["class_type"]: k for k, v in prompt.items()}
    sampler, calibrate, encoder = node_of["SonicSampler"], node_of["SonicLipSyncCalibrate"], node_of["SonicVideoEncode"]
    widgets = prompt[calibrate]["inputs"]
    assert widgets["mode"] == "auto+manual" and widgets["lip_sync_offset"] == 0.0  # the correction is the measurement

    speech, clip = late_talking_clip
    audio = {"waveform": torch.from_numpy(speech.samples)[None, None], "sample_rate": speech.sample_rate}
    store = importlib.import_module(f"{pack.__name__}.sonic.post.frames").FrameStore(
        256, 256, len(clip), 25.0, folder=comfy_env["base"] / "temp")
    store.append(clip)
    images = store.images() if prompt[sampler]["inputs"]["output"] != "frames file" else store.images(0, 1)
    frames = pack.nodes.types.SonicFrames(store=store, audio=audio, fps=25.0)
    predata = pack.nodes.types.SonicPreData(cond=SimpleNamespace(video_face_box=espeak.FACE_BOX), audio=audio)
    results, ui = execute_prompt(prompt, comfy_env["mappings"],
                                 cached={sampler: (images, audio, 25.0, frames), node_of["SonicPreData"]: (predata,)})
    assert node_of["SonicModelLoader"] not in results  # only the post-processing ran

    corrected = results[calibrate][2]
    delay = audio_delay_s(corrected, audio)  # from the waveforms; 10 ms is the measurement's accuracy
    assert delay == pytest.approx(KNOWN_OFFSET_S, abs=0.01)
    report = ui[calibrate]["lipsync"][0]
    assert report["warning"] is False and "NOT corrected" not in report["message"]
    assert report["offset_s"] == pytest.approx(KNOWN_OFFSET_S, abs=0.01)
    assert report["confidence"] >= widgets["min_confidence"]
    assert report["applied_s"] == pytest.approx(delay, abs=1e-4)  # what was done to the audio (0.1 ms resolution)
    if "frames" in prompt[node_of["SonicSmoothMotion"]]["inputs"]:  # the frames file carries the corrected audio
        assert results[calibrate][1].audio is corrected
    assert prompt[encoder]["inputs"]["audio"] == [calibrate, 2]
    with av.open(results[encoder][0]) as container:
        assert sum(1 for _ in container.decode(video=0)) == len(clip)
        assert container.streams.audio[0].codec_context.name == "aac"
