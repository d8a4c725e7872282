"""Real-size modules, built on the meta device from the SVD-xt configs and Sonic's published constructor arguments,
accept the released checkpoints strictly: same tensor names, same shapes (manifest of the real files).

The expected counts are not read from the manifest: they are the published numbers of the official files and
networks (../shared/spec/sonic-inference.md §1.2-§1.6: "1,428 stock SVD keys + 64 new IP keys = 1,492 keys", the
parameter table, the official constructors `AudioProjModel(...)`, `Audio2bucketModel(...)`, `IFBlock(11, c=90)`),
and each is checked twice: against the network built here and against the manifest. A network that grew or lost
a layer, or a manifest read wrongly (a key dropped, a prefix not stripped), fails one of them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sonic.engine.checkpoints import check_state_dict
from sonic.engine.models.audio_proj import AudioToBucket, AudioToTokens
from sonic.engine.models.rife import IFNet
from sonic.engine.models.unet import build_sonic_unet

REAL_WHISPER_WIDTH = 384  # whisper-tiny d_model
REAL_CLIP_DIM = 1024  # SVD-xt image_encoder projection_dim
# spec §1.2 / §1.6 (the official files and networks)
UNET_KEYS, UNET_STOCK_KEYS, UNET_IP_KEYS = 1_492, 1_428, 64  # 2 IP projections x 32 attn2 (16 spatial, 16 temporal)
UNET_PARAMS, UNET_IP_PARAMS = 1_575_741_162, 51_118_080  # Sonic's UNet, of which its IP projections
AUDIO2TOKEN_PARAMS = 54_300_672  # AudioProjModel(seq_len=10, blocks=5, channels=384, intermediate_dim=1024,
#                                                 output_dim=1024, context_tokens=32)
AUDIO2BUCKET_PARAMS = 21_762_050  # Audio2bucketModel(seq_len=50, blocks=1, channels=384, clip_channels=1024,
#                                                     intermediate_dim=1024, output_dim=1, context_tokens=2)
RIFE_KEYS, RIFE_PARAMS = 160, 3_038_015  # IFNet_HDv3: block0/1/2 = IFBlock(11, c=90), block_tea = IFBlock(14, c=90)


@pytest.fixture(scope="module")
def manifest(reference_dir):
    return json.loads((reference_dir / "sonic_checkpoints_manifest.json").read_text())


def _meta_state(entries: dict, strip: str = "") -> dict[str, torch.Tensor]:
    return {k[len(strip):] if k.startswith(strip) else k: torch.empty(shape, device="meta")
            for k, (shape, _dtype) in entries.items()}


def _params(state: dict[str, torch.Tensor]) -> int:
    return sum(math.prod(t.shape) for t in state.values())


def test_unet_matches_real_checkpoint(manifest, reference_dir):
    config = json.loads((reference_dir / "svd-xt" / "unet" / "config.json").read_text())
    unet, _ = build_sonic_unet(config, audio_dim=config["cross_attention_dim"])
    built = unet.state_dict()
    ip_keys = [k for k in built if ".processor.to_" in k]
    assert (len(built), len(ip_keys)) == (UNET_KEYS, UNET_IP_KEYS)
    assert sum(".temporal_transformer_blocks." in k for k in ip_keys) == UNET_IP_KEYS // 2
    assert sum(p.numel() for p in unet.parameters()) == UNET_PARAMS
    assert sum(built[k].numel() for k in ip_keys) == UNET_IP_PARAMS
    state = _meta_state(manifest["unet.pth"])
    assert (len(state), _params(state)) == (UNET_KEYS, UNET_PARAMS)
    assert sum(".processor.to_" not in k for k in state) == UNET_STOCK_KEYS
    check_state_dict(unet, state, reference_dir / "unet.pth")  # raises on any difference
    unet.load_state_dict(state, strict=True, assign=True)


def test_audio_mlps_match_real_checkpoints(manifest, reference_dir):
    """Built from the official constructor arguments, not from the checkpoint shapes; then the loader's own
    reading of the shapes (`from_state_dict_shapes`) must give the same networks."""
    with torch.device("meta"):
        tokens = AudioToTokens(in_features=10 * 5 * REAL_WHISPER_WIDTH, hidden=1024, num_tokens=32, token_dim=1024)
        bucket = AudioToBucket(in_features=50 * 1 * REAL_WHISPER_WIDTH + REAL_CLIP_DIM, hidden=1024, num_outputs=2)
    for net, name, params in ((tokens, "audio2token.pth", AUDIO2TOKEN_PARAMS),
                              (bucket, "audio2bucket.pth", AUDIO2BUCKET_PARAMS)):
        state = _meta_state(manifest[name])
        assert sum(p.numel() for p in net.parameters()) == _params(state) == params, name
        check_state_dict(net, state, reference_dir / name)
        net.load_state_dict(state, strict=True, assign=True)
        with torch.device("meta"):
            inferred = type(net).from_state_dict_shapes(state)
        assert {k: v.shape for k, v in inferred.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert (tokens.audio_channels, tokens.num_tokens, tokens.token_dim) == (REAL_WHISPER_WIDTH, 32, 1024)


def test_rife_matches_real_checkpoint(manifest, reference_dir):
    entries = manifest["RIFE/flownet.pkl"]
    assert all(k.startswith("module.") for k in entries)
    state = _meta_state(entries, strip="module.")
    assert (len(state), _params(state)) == (RIFE_KEYS, RIFE_PARAMS)
    with torch.device("meta"):
        net = IFNet(channels=90)  # the official width, not read from the file
    assert (len(net.state_dict()), sum(p.numel() for p in net.parameters())) == (RIFE_KEYS, RIFE_PARAMS)
    check_state_dict(net, state, reference_dir / "flownet.pkl")
    net.load_state_dict(state, strict=True, assign=True)
    with torch.device("meta"):
        assert IFNet.from_state_dict_shapes(state).block0.conv0[1][0].out_channels == 90
