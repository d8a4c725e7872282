"""The one generator of what is derived from the node classes (nodes/*.py INPUT_TYPES / RETURN_TYPES, the only
place a node's inputs and outputs are written down). Run after changing a node's inputs or outputs or a template:

    python workflows/_build.py

It loads the pack as ComfyUI does, with the ComfyUI stand-in of tests/comfy_stub, and writes
- the workflow templates: UI format (workflows/*.json, shown in ComfyUI's template browser, with a .jpg picture)
  and their API-format twins (workflows/api/*.json, for the queue API and tests);
- sonic/jobs/sonic_nodes.json: the nodes' schema that batch, fleet and service check jobs against without ComfyUI.

Each template is data: nodes with their widget values in the frontend's order (a seed's control_after_generate
mode follows it; upload widgets come last: an image upload adds "image", an audio upload null and "") and links;
the sockets, outputs and widget order come from the classes (node_table). tests/nodes/test_workflows.py fails
when a committed file differs from what this writes, checks the templates against ComfyUI's validation and
executes every API twin.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

ROOT = HERE.parent
SNAPSHOT = ROOT / "sonic" / "jobs" / "sonic_nodes.json"  # the nodes' schema for batch/fleet checks without ComfyUI
# combos whose choices are files of one install: the snapshot types them STRING (the workers' ComfyUI checks them)
FILE_CHOICES = {"image", "audio", "sonic_unet"}


def _harness():
    """tests/comfy_harness.py: ComfyUI's loading of the pack and the frontend's widget order."""
    import sys

    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import comfy_harness

    return comfy_harness


def node_table(mappings: dict) -> dict:
    """type -> (input sockets [(name, type)], outputs [(name, type)], widget names in the frontend's order (None =
    a UI-only value), the values a fresh node has for them, the names a template sets them by), read off the
    node classes."""
    harness = _harness()
    table = {}
    for name, cls in mappings.items():
        inputs = harness.node_inputs(cls)
        sockets = [(n, spec[0]) for n, spec in inputs.items() if not harness.is_widget(spec)]
        outputs = list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES))
        widgets = harness.widget_slots(cls)
        # what a template may set: a widget by name, the value after a seed by "control_after_generate"
        keys = [slot if slot is not None else "control_after_generate"
                if i and widgets[i - 1] and inputs[widgets[i - 1]][1].get("control_after_generate") else None
                for i, slot in enumerate(widgets)]
        table[name] = (sockets, outputs, widgets, harness.widget_defaults(cls), keys)
    return table


def node_snapshot(mappings: dict) -> dict:
    """/object_info of the pack's nodes as batch/fleet check jobs without a ComfyUI: input types and limits."""
    schema = {}
    for name, cls in sorted(mappings.items()):
        parts = {}
        for part, inputs in cls.INPUT_TYPES().items():
            if part == "hidden":
                continue
            specs = {}
            for input_name, spec in inputs.items():
                opts = spec[1] if len(spec) > 1 else {}
                kept = {k: opts[k] for k in ("min", "max", "forceInput") if k in opts}
                file_choice = input_name in FILE_CHOICES and isinstance(spec[0], list)
                specs[input_name] = ["STRING", {}] if file_choice else [spec[0], kept]
            parts[part] = specs
        schema[name] = {"input": parts}
    return schema


# the pack's example inputs (example_inputs/), copied into ComfyUI's input folder when the pack loads, so that a
# template runs as is on a fresh install
EXAMPLE_IMAGE = "sonic_example_portrait.jpg"
EXAMPLE_AUDIO = "sonic_example_speech.wav"

SIZES = {"SonicLoadImage": (340, 420), "SonicLoadAudio": (340, 250), "SonicModelLoader": (340, 220),
         "SonicPreData": (340, 230), "SonicSampler": (340, 340), "SonicLipSyncCalibrate": (340, 330),
         "SonicSmoothMotion": (340, 200), "SonicVideoEncode": (340, 340)}


def template(title, note, *, min_resolution=None, steps=None, output=None, crf=None, prefix="Sonic/sonic",
             seed_mode="randomize", use_frames=False):
    """The default graph: loaders -> model -> PreData -> sampler -> lip-sync -> smoothing -> encoder (+ a note).
    Frames travel as IMAGE batches, or as the sampler's frames file when `use_frames`. Each node has its widgets'
    defaults (the classes') except the values given here (None: the default); a seed's control mode is the
    value after it ("control_after_generate")."""
    def set_(**values):
        return {k: v for k, v in values.items() if v is not None}

    nodes = [
        (1, "SonicLoadImage", (40, 40), {"image": EXAMPLE_IMAGE}),
        (2, "SonicLoadAudio", (40, 500), {"audio": EXAMPLE_AUDIO}),
        (3, "SonicModelLoader", (420, 40), {"sonic_unet": "Sonic/unet.pth"}),
        (4, "SonicPreData", (420, 300), set_(min_resolution=min_resolution)),
        (5, "SonicSampler", (800, 40), set_(control_after_generate=seed_mode, steps=steps, output=output)),
        (7, "SonicLipSyncCalibrate", (1180, 40), {}),
        (8, "SonicSmoothMotion", (1180, 420), {}),
        (6, "SonicVideoEncode", (1560, 40), set_(filename_prefix=prefix, crf=crf)),
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


def build(spec: dict, table: dict, titles: dict) -> tuple[dict, dict]:
    """A template -> (UI workflow, API prompt), with the sockets, outputs and widget order of `table`
    (node_table); a node's title in the API prompt is its display name (`titles`), as the frontend writes it."""
    by_id = {nid: (ntype, pos, values) for nid, ntype, pos, values in spec["nodes"]}
    ui_nodes, ui_links, api = [], [], {}
    link_ids = {}
    for number, (src, slot, dst, name) in enumerate(spec["links"], start=1):
        link_ids[(dst, name)] = number
        ui_links.append([number, src, slot, dst, [n for n, _ in table[by_id[dst][0]][0]].index(name),
                         table[by_id[src][0]][1][slot][1]])
    for order, (nid, ntype, pos, overrides) in enumerate(spec["nodes"]):
        sockets, outputs, widgets, defaults, keys = table[ntype]
        values = [overrides.get(key, default) if key else default for key, default in zip(keys, defaults)]
        unknown = set(overrides) - set(keys)
        assert not unknown, f"{spec['title']}: {ntype} has no widget {sorted(unknown)}"
        inputs = {name: value for name, value in zip(widgets, values) if name is not None}
        for (dst, name), number in link_ids.items():
            if dst == nid:
                link = next(link for link in ui_links if link[0] == number)
                inputs[name] = [str(link[1]), link[2]]
        api[str(nid)] = {"class_type": ntype, "inputs": inputs, "_meta": {"title": titles.get(ntype, ntype)}}
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


def generate(mappings: dict, titles: dict) -> dict[Path, str]:
    """Every file derived from the node classes `mappings` (NODE_CLASS_MAPPINGS) and their display names `titles`
    (NODE_DISPLAY_NAME_MAPPINGS): path -> its text."""
    table = node_table(mappings)
    files = {}
    for name, spec in TEMPLATES.items():
        ui, api = build(spec, table, titles)
        files[HERE / f"{spec['title']}.json"] = json.dumps(ui, indent=1) + "\n"
        files[HERE / "api" / f"{name}.json"] = json.dumps(api, indent=1) + "\n"
    files[SNAPSHOT] = json.dumps(node_snapshot(mappings), indent=1) + "\n"
    return files


def load_mappings(base: Path) -> tuple[dict, dict]:
    """The pack's NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS, loaded as ComfyUI loads it, with the ComfyUI stand-in of tests/comfy_stub
    rooted at the empty folder `base` (nothing of a real ComfyUI install leaks into the files)."""
    import os
    import sys

    for sub in ("input", "output", "temp", "models"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    os.environ["SONIC_TEST_COMFY_BASE"] = str(base)
    sys.path.insert(0, str(ROOT / "tests" / "comfy_stub"))
    pack = _harness().load_pack(ROOT)
    return pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sonic-build-") as base:
        files = generate(*load_mappings(Path(base)))
    (HERE / "api").mkdir(exist_ok=True)
    for old in HERE.glob("*.json"):  # UI files are named by title: remove those of renamed templates
        old.unlink()
    for path, text in files.items():
        path.write_text(text)
        print("wrote", path.relative_to(ROOT))
    for spec in TEMPLATES.values():
        thumbnail(spec).save(HERE / f"{spec['title']}.jpg", quality=88)


if __name__ == "__main__":
    main()
