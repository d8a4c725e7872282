"""Model files: clear errors for missing, truncated and mismatched files; safetensors conversion."""

from __future__ import annotations

import shutil

import pytest
import torch

from sonic.engine.checkpoints import ModelLayout, convert_to_safetensors, read_state_dict
from sonic.engine.loader import load_audio_mlps, load_rife


def _copy_models(tiny_dir, tmp_path):
    dst = tmp_path / "models"
    shutil.copytree(tiny_dir / "models", dst)
    return dst


def test_missing_files_are_listed_with_their_source(tmp_path):
    (tmp_path / "Sonic").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        ModelLayout(tmp_path).require()
    text = str(err.value)
    for name in ("unet.pth", "audio2token.pth", "whisper-tiny", "image_encoder", "flownet.pkl"):
        assert name in text
    assert "huggingface.co/LeonJoe13/Sonic" in text and "stable-video-diffusion-img2vid-xt" in text


def test_rife_is_only_required_with_interpolation(tiny_dir, tmp_path):
    models = _copy_models(tiny_dir, tmp_path)
    (models / "RIFE" / "flownet.pkl").unlink()
    ModelLayout(models).require(interpolation=False)
    with pytest.raises(FileNotFoundError, match="flownet.pkl"):
        ModelLayout(models).require(interpolation=True)


def test_truncated_checkpoint_names_the_file_and_the_fix(tiny_dir, tmp_path):
    path = tmp_path / "audio2token.pth"
    data = (tiny_dir / "models" / "Sonic" / "audio2token.pth").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as err:
        read_state_dict(path)
    assert str(path) in str(err.value) and "download it again" in str(err.value)


def test_mismatched_checkpoint_names_the_keys(tiny_dir, tmp_path):
    models = _copy_models(tiny_dir, tmp_path)
    path = models / "Sonic" / "audio2token.pth"
    state = torch.load(path, weights_only=True)
    del state["norm.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_audio_mlps(ModelLayout(models), torch.device("cpu"))
    text = str(err.value)
    assert "audio2token.pth" in text and "norm.bias" in text and "extra.weight" in text


def test_pickles_that_are_not_plain_tensors_are_refused(tmp_path):
    path = tmp_path / "unet.pth"
    torch.save({"weights": torch.zeros(1), "note": "x"}, path)
    with pytest.raises(ValueError, match="not a plain tensor dictionary"):
        read_state_dict(path)


def test_convert_writes_equal_safetensors_that_are_then_preferred(tiny_dir, tmp_path):
    models = _copy_models(tiny_dir, tmp_path)
    written = convert_to_safetensors(models)
    assert sorted(p.name for p in written) == ["audio2bucket.safetensors", "audio2token.safetensors",
                                               "flownet.safetensors", "unet.safetensors"]
    layout = ModelLayout(models)
    assert layout.unet.suffix == ".safetensors" and layout.rife.suffix == ".safetensors"
    for pickled, safe in ((models / "Sonic/unet.pth", layout.unet), (models / "RIFE/flownet.pkl", layout.rife)):
        a, b = read_state_dict(pickled), read_state_dict(safe)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    load_rife(layout.rife, torch.device("cpu"))  # loads strictly from the converted file
    assert convert_to_safetensors(models) == []  # nothing left to do
    assert not list(models.rglob("*.partial"))


def test_bf16_is_refused_on_a_gpu_that_would_only_emulate_it(monkeypatch):
    """(This machine has no GPU: the card's answers are played by monkeypatching torch.cuda's two queries.)"""
    from sonic.engine.loader import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ValueError, match="Tesla T4 has no native bf16 .* choose fp16"):
        resolve_dtype("bf16", torch.device("cuda"))
    assert resolve_dtype("fp16", torch.device("cuda")) is torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16  # the CPU computes bf16 itself
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_dtype("bf16", torch.device("cuda")) is torch.bfloat16
