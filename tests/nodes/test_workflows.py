"""Every shipped template: valid for ComfyUI's frontend and executor, and runs end to end on the tiny models."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import av
import pytest

from comfy_harness import UI_ONLY_NODES, execute_prompt, ui_to_api, validate_prompt
from helpers import ui_template_path, workflow_templates

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
NAMES = sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json"))
UI_FILE = {name: ui_template_path(name) for name in workflow_templates()}
FAST = {"SonicPreData": {"min_resolution": 128, "duration": 1.0}, "SonicSampler": {"steps": 1}}


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
    _, _, corrected, offset, confidence = results[calibrate]
    # the node reports what it measured and did, and the audio it passes on is exactly that shift of its input
    report = ui[calibrate]["lipsync"][0]
    assert (report["offset_s"], report["confidence"]) == (round(offset, 4), round(confidence, 4))
    source = results[sampler][1]["waveform"].numpy()
    assert corrected["sample_rate"] == results[sampler][1]["sample_rate"]
    shift = round(report["applied_s"] * corrected["sample_rate"])
    wave = corrected["waveform"].numpy()
    if shift > 0:
        assert not wave[..., :shift].any() and (wave[..., shift:] == source).all()
    else:
        assert (wave == source[..., -shift:]).all()
    # random tiny weights make no readable mouth: the low confidence is flagged and nothing applied
    assert report["warning"] is True and report["applied_s"] == 0.0 and "NOT corrected" in report["message"]
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
