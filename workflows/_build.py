"""Writes the workflow templates: UI format (workflows/*.json, shown in ComfyUI's template browser) and their
API-format twins (workflows/api/*.json, for the queue API and tests). Run after changing a template:

    python workflows/_build.py

Each template is data: nodes with their widget values in the frontend's order (a seed's control_after_generate
mode follows it; upload widgets come last: an image upload adds "image", an audio upload null and "") and links. tests/nodes/test_workflows.py checks
both files against the nodes' real definitions and executes every API twin.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# type: (input sockets [(name, type)], outputs [(name, type)], widget names in order (None = UI-only value))
NODES = {
    "SonicLoadImage": ([], [("image", "IMAGE"), ("mask", "MASK")], ["image", "path_or_url", None]),
    "SonicLoadAudio": ([], [("audio", "AUDIO")], ["audio", "trim_silence", "silence_db", "path_or_url", None, None]),
    "SonicModelLoader": ([("vae", "VAE"), ("clip_vision", "CLIP_VISION")], [("sonic_model", "SONIC_MODEL")],
                         ["sonic_unet", "dtype", "interpolation", "face_detector", "download_missing"]),
    "SonicPreData": ([("sonic_model", "SONIC_MODEL"), ("image", "IMAGE"), ("audio", "AUDIO")],
                     [("predata", "SONIC_PREDATA")],
                     ["min_resolution", "duration", "crop", "expand_ratio", "face_box"]),
    "SonicSampler": ([("sonic_model", "SONIC_MODEL"), ("predata", "SONIC_PREDATA")],
                     [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT"), ("frames", "SONIC_FRAMES")],
                     ["seed", None, "steps", "dynamic_scale", "motion_scale", "audio_guidance", "appearance_guidance",
                      "ip_audio_scale", "output", "compile"]),
    "SonicLipSyncCalibrate": ([("fps", "FLOAT"), ("images", "IMAGE"), ("frames", "SONIC_FRAMES"), ("audio", "AUDIO"),
                               ("predata", "SONIC_PREDATA")],
                              [("images", "IMAGE"), ("frames", "SONIC_FRAMES"), ("audio", "AUDIO"), ("offset", "FLOAT"),
                               ("confidence", "FLOAT")],
                              ["mode", "lip_sync_offset", "search_range", "tolerance", "min_confidence", "face_box"]),
    "SonicSmoothMotion": ([("images", "IMAGE"), ("frames", "SONIC_FRAMES"), ("predata", "SONIC_PREDATA")],
                          [("images", "IMAGE"), ("frames", "SONIC_FRAMES")], ["alpha", "region", "face_box"]),
    "SonicVideoEncode": ([("fps", "FLOAT"), ("images", "IMAGE"), ("frames", "SONIC_FRAMES"), ("audio", "AUDIO")],
                         [("path", "STRING")], ["filename_prefix", "crf", "preset", "audio_policy", "watermark"]),
}


# the pack's example inputs (example_inputs/), copied into ComfyUI's input folder when the pack loads, so that a
# template runs as is on a fresh install
EXAMPLE_IMAGE = "sonic_example_portrait.jpg"
EXAMPLE_AUDIO = "sonic_example_speech.wav"

SIZES = {"SonicLoadImage": (340, 420), "SonicLoadAudio": (340, 250), "SonicModelLoader": (340, 220),
         "SonicPreData": (340, 230), "SonicSampler": (340, 340), "SonicLipSyncCalibrate": (340, 330),
         "SonicSmoothMotion": (340, 200), "SonicVideoEncode": (340, 340)}


def template(title, note, *, min_resolution=512, steps=25, output="auto", crf=18, prefix="Sonic/sonic",
             seed_mode="randomize", use_frames=False):
    """The default graph: loaders -> model -> PreData -> sampler -> lip-sync -> smoothing -> encoder (+ a note).
    Frames travel as IMAGE batches, or as the sampler's frames file when `use_frames`."""
    nodes = [
        (1, "SonicLoadImage", (40, 40), [EXAMPLE_IMAGE, "", "image"]),
        (2, "SonicLoadAudio", (40, 500), [EXAMPLE_AUDIO, False, 40.0, "", None, ""]),
        (3, "SonicModelLoader", (420, 40), ["Sonic/unet.pth", "auto", True, "auto", False]),
        (4, "SonicPreData", (420, 300), [min_resolution, 0.0, False, 0.5, ""]),
        (5, "SonicSampler", (800, 40), [72589, seed_mode, steps, 1.0, 1.0, 7.5, 2.0, 1.0, output, False]),
        (7, "SonicLipSyncCalibrate", (1180, 40), ["auto+manual", 0.0, 0.4, 0.01, 0.4, ""]),
        (8, "SonicSmoothMotion", (1180, 420), [0.3, "face without mouth", ""]),
        (6, "SonicVideoEncode", (1560, 40), [prefix, crf, "medium", "match", ""]),
    ]
    video = 3 if use_frames else 0  # output slot of the sampler (frames / images)
    carried = 1 if use_frames else 0  # output slot of calibration and smoothing
    name = "frames" if use_frames else "images"
    links = [(3, 0, 4, "sonic_model"), (1, 0, 4, "image"), (2, 0, 4, "audio"), (3, 0, 5, "sonic_model"),
             (4, 0, 5, "predata"),
             (5, 2, 7, "fps"), (5, video, 7, name), (5, 1, 7, "audio"), (4, 0, 7, "predata"),
             (7, carried, 8, name), (4, 0, 8, "predata"),
             (5, 2, 6, "fps"), (8, carried, 6, name), (7, 2, 6, "audio")]
    facts = [] if seed_mode == "fixed" else ["new seed each run"]
    return {"title": title, "note": note, "nodes": nodes, "links": links, "facts": facts}


KNOBS = """Knobs (Sonic Sampler):
- steps: 25 is the official quality; 10-15 for a quick look.
- dynamic_scale: overall head and face motion (0.5 calm, 1 official, 2 lively).
- motion_scale: head motion only.
- audio_guidance 7.5 / appearance_guidance 2.0: lip-sync strength vs. keeping the portrait's look.
- seed: change it for a different performance of the same audio.
Sonic PreData: min_resolution is the video's short side (512 official); crop animates a square around the face.
Sonic Lip-Sync Calibrate: measures the mouth against the voice and shifts the audio (the result shows on the node);
lip_sync_offset adds a fixed delay, e.g. +0.03 for a player that shows the picture 30 ms late.
Sonic Smooth Motion: removes head jitter without delay (alpha 0.3 mild, 0.1 strong, 1 off).
Models: Sonic's files in models/sonic (see the pack's README)."""

START = ("It runs as is on the pack's example portrait and speech (sonic_example_*): press Run. Then pick your "
         "own photo and recording with the upload buttons of the two loaders.\n")

# API name (workflows/api/<name>.json, for the queue API) -> the template. Its "title" is also the UI file's name:
# ComfyUI's template browser shows custom templates by file name only (title and description), with
# "<file name>.jpg" beside it as the picture, so the name is the sentence that says when to pick it.
TEMPLATES = {
    "sonic_quick_512": template(
        "Sonic quick preview (start here, 512px, 15 steps)",
        "Quick preview at 512 px with 15 steps. " + START + "\n" + KNOBS,
        steps=15, crf=23, prefix="Sonic/preview"),
    "sonic_hq_1024": template(
        "Sonic high quality (1024px, 25 steps, large GPU)",
        "1024 px, 25 steps (official quality). Needs a large GPU (about 4x the time and memory of 512). " + START
        + "\n" + KNOBS, min_resolution=1024, crf=16, prefix="Sonic/hq"),
    "sonic_long_audio": template(
        "Sonic long audio (minutes of speech, frames on disk)",
        "For minutes of audio: the sampler writes uint8 frames to a file on disk (output = frames file) and the "
        "encoder streams them, so RAM stays small whatever the length. The IMAGE output is only a preview frame. "
        + START + "\n" + KNOBS, output="frames file", use_frames=True, prefix="Sonic/long"),
    "sonic_batch_api": template(
        "Sonic batch template (queue API, fixed seed)",
        "For studios driving ComfyUI over HTTP: set node 1 path_or_url (portrait), node 2 path_or_url (speech; "
        "files in ComfyUI's input/output folders or http(s) URLs), node 5 seed and node 6 filename_prefix per job, "
        "then POST the API twin (workflows/api/sonic_batch_api.json) to /prompt. The seed is fixed so a job is "
        "reproducible.\n\n" + KNOBS, seed_mode="fixed", output="frames file", use_frames=True, prefix="Sonic/batch/job"),
}


def build(spec: dict) -> tuple[dict, dict]:
    by_id = {nid: (ntype, pos, values) for nid, ntype, pos, values in spec["nodes"]}
    ui_nodes, ui_links, api = [], [], {}
    link_ids = {}
    for number, (src, slot, dst, name) in enumerate(spec["links"], start=1):
        link_ids[(dst, name)] = number
        ui_links.append([number, src, slot, dst, [n for n, _ in NODES[by_id[dst][0]][0]].index(name),
                         NODES[by_id[src][0]][1][slot][1]])
    for order, (nid, ntype, pos, values) in enumerate(spec["nodes"]):
        sockets, outputs, widgets = NODES[ntype]
        assert len(values) == len(widgets), (ntype, values)
        inputs = {name: value for name, value in zip(widgets, values) if name is not None}
        for (dst, name), number in link_ids.items():
            if dst == nid:
                link = next(link for link in ui_links if link[0] == number)
                inputs[name] = [str(link[1]), link[2]]
        api[str(nid)] = {"class_type": ntype, "inputs": inputs, "_meta": {"title": ntype}}
        ui_nodes.append({
            "id": nid, "type": ntype, "pos": list(pos), "size": list(SIZES[ntype]), "flags": {}, "order": order,
            "mode": 0,
            "inputs": [{"name": n, "type": t, "link": link_ids.get((nid, n))} for n, t in sockets],
            "outputs": [{"name": n, "type": t, "slot_index": i,
                         "links": [link[0] for link in ui_links if link[1] == nid and link[2] == i] or None}
                        for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": ntype}, "widgets_values": values,
        })
    ui_nodes.append({"id": 99, "type": "Note", "pos": [420, 580], "size": [720, 330], "flags": {}, "order": len(ui_nodes),
                     "mode": 0, "inputs": [], "outputs": [], "properties": {}, "title": "How to use",
                     "widgets_values": [spec["note"]]})
    ui = {"last_node_id": 99, "last_link_id": len(ui_links), "nodes": ui_nodes, "links": ui_links, "groups": [],
          "config": {}, "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}, "title": spec["title"]}, "version": 0.4}
    return ui, api


def thumbnail(spec: dict):
    """The template browser's picture: the example portrait, the template's name and facts, the example speech's
    waveform (what the template turns into a video)."""
    import numpy as np
    import soundfile
    from PIL import Image, ImageDraw, ImageFont

    examples = HERE.parent / "example_inputs"
    card = Image.new("RGB", (512, 384), (24, 26, 38))
    with Image.open(examples / EXAMPLE_IMAGE) as photo:
        card.paste(photo.convert("RGB").crop((128, 0, 384, 256)).resize((224, 224)), (16, 16))
    draw = ImageDraw.Draw(card)
    title, detail = spec["title"].split(" (", 1)
    draw.text((256, 24), title, fill=(255, 255, 255), font=ImageFont.load_default(26))
    small, y = ImageFont.load_default(18), 70
    lines = [part.strip() for part in detail.rstrip(")").split(",")] + spec["facts"]
    for line in lines:
        draw.text((256, y), line, fill=(190, 200, 230), font=small)
        y += 28
    wave, _ = soundfile.read(examples / EXAMPLE_AUDIO, dtype="float32")
    columns = np.array_split(np.abs(wave), 480)
    peak = max(float(c.max()) for c in columns) or 1.0
    for x, column in enumerate(columns):
        h = 60 * float(column.max()) / peak
        draw.line([(16 + x, 310 - h), (16 + x, 310 + h)], fill=(110, 200, 160))
    return card


def main() -> None:
    (HERE / "api").mkdir(exist_ok=True)
    for old in HERE.glob("*.json"):  # UI files are named by title: remove those of renamed templates
        old.unlink()
    for name, spec in TEMPLATES.items():
        ui, api = build(spec)
        (HERE / f"{spec['title']}.json").write_text(json.dumps(ui, indent=1) + "\n")
        thumbnail(spec).save(HERE / f"{spec['title']}.jpg", quality=88)
        (HERE / "api" / f"{name}.json").write_text(json.dumps(api, indent=1) + "\n")
        print(name, "->", spec["title"])


if __name__ == "__main__":
    main()
