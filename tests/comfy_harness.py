"""Runs the pack the way ComfyUI 0.8.0 does, without ComfyUI: loading (nodes.py: load_custom_node), prompt
validation (execution.py: validate_prompt / validate_inputs) and execution (only output nodes and their
ancestors, each node once, kwargs of the inputs present, inside torch.inference_mode). Plus the frontend's
UI-workflow -> API-prompt conversion (graphToPrompt) for checking the UI templates.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
UI_ONLY_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def load_pack(root: Path):
    """Import <root>/__init__.py as ComfyUI does: module named after the absolute path, relative imports."""
    name = str(root).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def node_inputs(cls) -> dict[str, tuple]:
    """A V1 node's required and optional inputs, in declaration order (the frontend's order)."""
    types = cls.INPUT_TYPES()
    return {**types.get("required", {}), **types.get("optional", {})}


def is_widget(spec: tuple) -> bool:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def widget_slots(cls) -> list[str | None]:
    """Names of the frontend's serialised widget values, in order (None = a UI-only extra value), as read off
    frontend 1.35.9: a seed's control_after_generate follows it; upload widgets come after all other widgets
    (image: the button, value "image"; audio: the player, null, and the button, "")."""
    slots, extras = [], []
    for name, spec in node_inputs(cls).items():
        if not is_widget(spec):
            continue
        opts = spec[1] if len(spec) > 1 else {}
        slots.append(name)
        if opts.get("control_after_generate"):
            slots.append(None)
        if opts.get("image_upload"):
            extras.append(None)
        if opts.get("audio_upload"):
            extras += [None, None]
    return slots + extras


def widget_defaults(cls) -> list:
    """The values a freshly added node serialises, in widget_slots order: each widget's default (a combo without
    one: its first choice; text: ""), "randomize" after a control_after_generate widget, the upload widgets'
    values ("image"; null and "" for audio)."""
    values, extras = [], []
    for name, spec in node_inputs(cls).items():
        if not is_widget(spec):
            continue
        kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
        if "default" in opts:
            values.append(opts["default"])
        else:
            values.append(kind[0] if isinstance(kind, list) and kind else
                          {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind))
        if opts.get("control_after_generate"):
            values.append("randomize")
        if opts.get("image_upload"):
            extras.append("image")
        if opts.get("audio_upload"):
            extras += [None, ""]
    return values + extras


def ui_to_api(workflow: dict, mappings: dict) -> dict:
    """A UI-format (version 0.4) workflow -> API prompt, like the frontend's graphToPrompt."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in UI_ONLY_NODES or node.get("mode", 0) in (2, 4):
            continue
        cls = mappings[node["type"]]
        inputs = {}
        values = node.get("widgets_values", [])
        for slot, value in zip(widget_slots(cls), values):
            if slot is not None:
                inputs[slot] = value
        for item in node.get("inputs", []):
            if item.get("link") is not None:
                _, origin, origin_slot, _, _, _ = links[item["link"]]
                inputs[item["name"]] = [str(origin), origin_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": node.get("title", node["type"])}}
    return prompt


class ValidationError(Exception):
    def __init__(self, errors: dict):
        super().__init__("; ".join(f"node {k}: {', '.join(v)}" for k, v in errors.items()))
        self.errors = errors


def validate_prompt(prompt: dict, mappings: dict) -> None:
    errors: dict[str, list[str]] = {}
    for node_id, node in prompt.items():
        problems = errors.setdefault(node_id, [])
        cls = mappings.get(node["class_type"])
        if cls is None:
            problems.append(f"node type {node['class_type']} does not exist")
            continue
        types = cls.INPUT_TYPES()
        validate_fn = getattr(cls, "VALIDATE_INPUTS", None)
        custom = set(inspect.signature(validate_fn).parameters) if validate_fn else set()
        given = node["inputs"]
        for name in types.get("required", {}):
            if name not in given:
                problems.append(f"required input {name} missing")
        constants = {}
        for name, value in given.items():
            spec = node_inputs(cls).get(name)
            if spec is None:
                continue
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
                source = prompt.get(value[0])
                if source is None or source["class_type"] not in mappings:
                    problems.append(f"{name} is linked to missing node {value[0]}")
                    continue
                out_type = mappings[source["class_type"]].RETURN_TYPES[value[1]]
                if kind != "*" and out_type != "*" and out_type != kind:
                    problems.append(f"{name}: return type mismatch {out_type} -> {kind}")
                continue
            if name in custom:
                constants[name] = value
                continue
            try:
                if kind == "INT":
                    value = int(value)
                elif kind == "FLOAT":
                    value = float(value)
                elif kind == "STRING":
                    value = str(value)
                elif kind == "BOOLEAN":
                    value = bool(value)
            except (TypeError, ValueError):
                problems.append(f"{name}: invalid input type {value!r}")
                continue
            if kind in ("INT", "FLOAT"):
                if "min" in opts and value < opts["min"]:
                    problems.append(f"{name}: value {value} smaller than min {opts['min']}")
                if "max" in opts and value > opts["max"]:
                    problems.append(f"{name}: value {value} bigger than max {opts['max']}")
            if isinstance(kind, list) and value not in kind:
                problems.append(f"{name}: value {value!r} not in list")
            constants[name] = value
            given[name] = value
        if validate_fn:
            args = {k: constants.get(k) for k in custom if k in given}
            result = validate_fn(**args)
            if result is not True:
                problems.append(f"custom validation failed: {result}")
    errors = {k: v for k, v in errors.items() if v}
    if errors:
        raise ValidationError(errors)


def reset_stub_records() -> None:
    """Empty the ComfyUI stand-in's recorders (tests/comfy_stub: model loads, memory requests, frees, progress
    updates) and clear a pending Cancel, where those modules are loaded; test modules run it before each test."""
    for name in ("comfy.model_management", "comfy.utils"):
        module = sys.modules.get(name)
        if module is not None:
            module.reset_records()


def execute_prompt(prompt: dict, mappings: dict, cached: dict | None = None) -> tuple[dict, dict]:
    """Validate, then run the output nodes and their ancestors. Returns (results, ui) per node id.

    `cached` maps node ids to output tuples that ComfyUI's execution cache already holds: those nodes do not run,
    nor do their ancestors unless another node needs them (as when ComfyUI re-runs a prompt whose upstream part
    is unchanged)."""
    import torch

    validate_prompt(prompt, mappings)
    results, ui = {}, {}
    for node_id, out in (cached or {}).items():
        cls = mappings[prompt[node_id]["class_type"]]
        assert isinstance(out, tuple) and len(out) == len(cls.RETURN_TYPES), f"cached {node_id}: {out!r}"
        results[node_id] = out

    def run(node_id: str):
        if node_id in results:
            return results[node_id]
        node = prompt[node_id]
        cls = mappings[node["class_type"]]
        kwargs = {}
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                kwargs[name] = run(value[0])[value[1]]
            else:
                kwargs[name] = value
        if hasattr(cls, "IS_CHANGED"):
            cls.IS_CHANGED(**{k: v for k, v in kwargs.items() if k in inspect.signature(cls.IS_CHANGED).parameters})
        out = getattr(cls(), cls.FUNCTION)(**kwargs)
        if isinstance(out, dict):
            ui[node_id] = out.get("ui")
            out = out.get("result", ())
        assert isinstance(out, tuple) and len(out) == len(cls.RETURN_TYPES), f"{node['class_type']} returned {out!r}"
        results[node_id] = out
        return out

    outputs = [k for k, v in prompt.items() if getattr(mappings[v["class_type"]], "OUTPUT_NODE", False)]
    if not outputs:
        raise ValidationError({"prompt": ["prompt has no output nodes"]})
    with torch.inference_mode():
        for node_id in outputs:
            run(node_id)
    return results, ui
