"""Real-size modules, built on the meta device from the SVD-xt configs and the checkpoint shapes, accept the
released checkpoints strictly: same tensor names, same shapes (manifest of the real files)."""

from __future__ import annotations

import json

import pytest
import torch

from sonic.engine.checkpoints import check_state_dict
from sonic.engine.models.audio_proj import AudioToBucket, AudioToTokens
from sonic.engine.models.rife import IFNet
from sonic.engine.models.unet import build_sonic_unet

REAL_WHISPER_WIDTH = 384  # whisper-tiny d_model
REAL_CLIP_DIM = 1024  # SVD-xt image_encoder projection_dim


@pytest.fixture(scope="module")
def manifest(reference_dir):
    return json.loads((reference_dir / "sonic_checkpoints_manifest.json").read_text())


def _meta_state(entries: dict, strip: str = "") -> dict[str, torch.Tensor]:
    return {k[len(strip):] if k.startswith(strip) else k: torch.empty(shape, device="meta")
            for k, (shape, _dtype) in entries.items()}


def test_unet_matches_real_checkpoint(manifest, reference_dir):
    config = json.loads((reference_dir / "svd-xt" / "unet" / "config.json").read_text())
    unet, _ = build_sonic_unet(config, audio_dim=config["cross_attention_dim"])
    state = _meta_state(manifest["unet.pth"])
    check_state_dict(unet, state, reference_dir / "unet.pth")  # raises on any difference
    unet.load_state_dict(state, strict=True, assign=True)
    assert len(state) == 1492
    assert sum(p.numel() for p in unet.parameters()) == 1_575_741_162
    ip_keys = [k for k in state if ".processor.to_" in k]
    assert len(ip_keys) == 64
    assert sum(".temporal_transformer_blocks." in k for k in ip_keys) == 32


def test_audio_mlps_match_real_checkpoints(manifest, reference_dir):
    for cls, name in ((AudioToTokens, "audio2token.pth"), (AudioToBucket, "audio2bucket.pth")):
        state = _meta_state(manifest[name])
        with torch.device("meta"):
            net = cls.from_state_dict_shapes(state)
        check_state_dict(net, state, reference_dir / name)
        net.load_state_dict(state, strict=True, assign=True)
    with torch.device("meta"):
        tokens = AudioToTokens.from_state_dict_shapes(_meta_state(manifest["audio2token.pth"]))
        bucket = AudioToBucket.from_state_dict_shapes(_meta_state(manifest["audio2bucket.pth"]))
    assert (tokens.audio_channels, tokens.num_tokens, tokens.token_dim) == (REAL_WHISPER_WIDTH, 32, 1024)
    assert bucket.proj1.in_features == 50 * REAL_WHISPER_WIDTH + REAL_CLIP_DIM
    assert bucket.proj3.out_features == 2


def test_rife_matches_real_checkpoint(manifest, reference_dir):
    entries = manifest["RIFE/flownet.pkl"]
    assert all(k.startswith("module.") for k in entries)
    state = _meta_state(entries, strip="module.")
    with torch.device("meta"):
        net = IFNet.from_state_dict_shapes(state)
    check_state_dict(net, state, reference_dir / "flownet.pkl")
    net.load_state_dict(state, strict=True, assign=True)
    assert len(state) == 160
