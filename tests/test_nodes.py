"""The node pack as ComfyUI sees it: contracts of every node, and each node run through the harness."""

from __future__ import annotations

import pytest
import torch

from comfy_harness import ValidationError, execute_prompt, validate_prompt

NODE_IDS = ["SonicLoadImage", "SonicLoadAudio", "SonicModelLoader", "SonicPreData", "SonicSampler", "SonicVideoEncode"]


def test_every_node_has_a_complete_contract(comfy_env):
    mappings = comfy_env["mappings"]
    assert sorted(mappings) == sorted(NODE_IDS)
    assert sorted(comfy_env["pack"].NODE_DISPLAY_NAME_MAPPINGS) == sorted(NODE_IDS)
    for node_id, cls in mappings.items():
        types = cls.INPUT_TYPES()
        assert set(types) <= {"required", "optional", "hidden"}
        assert cls.CATEGORY == "Sonic" and cls.DESCRIPTION
        assert isinstance(cls.RETURN_TYPES, tuple) and callable(getattr(cls, cls.FUNCTION))
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
        for group in ("required", "optional"):
            for name, spec in types.get(group, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_combos_list_the_folders(comfy_env):
    mappings = comfy_env["mappings"]
    assert mappings["SonicModelLoader"].INPUT_TYPES()["required"]["sonic_unet"][0] == ["Sonic/unet.pth"]
    assert "portrait.png" in mappings["SonicLoadImage"].INPUT_TYPES()["required"]["image"][0]
    assert "speech.wav" in mappings["SonicLoadAudio"].INPUT_TYPES()["required"]["audio"][0]
    seed = mappings["SonicSampler"].INPUT_TYPES()["required"]["seed"][1]
    assert seed["control_after_generate"] and seed["default"] == 72589


def _graph(**overrides):
    sampler = {"sonic_model": ["3", 0], "predata": ["4", 0], "seed": 1, "steps": 1, "dynamic_scale": 1.0,
               "motion_scale": 1.0, "audio_guidance": 7.5, "appearance_guidance": 2.0, "ip_audio_scale": 1.0,
               "output": "auto"}
    prompt = {
        "1": {"class_type": "SonicLoadImage", "inputs": {"image": "portrait.png"}},
        "2": {"class_type": "SonicLoadAudio", "inputs": {"audio": "speech.wav", "trim_silence": False, "silence_db": 40.0}},
        "3": {"class_type": "SonicModelLoader", "inputs": {"sonic_unet": "Sonic/unet.pth", "dtype": "fp32",
                                                          "interpolation": True, "face_detector": "auto"}},
        "4": {"class_type": "SonicPreData", "inputs": {"sonic_model": ["3", 0], "image": ["1", 0], "audio": ["2", 0],
                                                      "min_resolution": 128, "duration": 1.0, "crop": False,
                                                      "expand_ratio": 0.5, "face_box": "37.25,37,76.25,76.25"}},
        "5": {"class_type": "SonicSampler", "inputs": sampler},
        "6": {"class_type": "SonicVideoEncode", "inputs": {"fps": ["5", 2], "filename_prefix": "test/sonic", "crf": 23,
                                                          "images": ["5", 0], "audio": ["5", 1]}},
    }
    for key, value in overrides.items():
        node, name = key.split(".")
        prompt[node]["inputs"][name] = value
    return prompt


def test_graph_runs_end_to_end(comfy_env):
    results, ui = execute_prompt(_graph(), comfy_env["mappings"])
    images, audio, fps, frames = results["5"]
    assert fps == 25.0 and images.shape == (23, 256, 128, 3) and images.dtype == torch.float32
    assert audio["waveform"].shape[-1] == round(23 / 25 * 16000) and audio["sample_rate"] == 16000
    assert len(frames.store) == 23
    entry = ui["6"]["images"][0]
    assert ui["6"]["animated"] == [True] and entry["type"] == "output" and entry["subfolder"] == "test"
    assert (comfy_env["base"] / "output" / "test" / entry["filename"]).is_file()


def test_validation_catches_bad_values(comfy_env):
    mappings = comfy_env["mappings"]
    for overrides, message in (({"4.min_resolution": 64}, "smaller than min"),
                               ({"3.dtype": "fp8"}, "not in list"),
                               ({"6.images": ["2", 0]}, "return type mismatch"),
                               ({"1.image": "missing.png"}, "custom validation failed")):
        with pytest.raises(ValidationError, match=message):
            validate_prompt(_graph(**overrides), mappings)
