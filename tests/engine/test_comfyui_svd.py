"""ComfyUI's own SVD VAE and CLIP vision classes (real ComfyUIs, 0.8.0 and 0.18.2, not a stand-in) give the pack the same
image latents, decoded frames and image embedding as the diffusers / transformers copies it loads itself.

The check runs in a child process inside ComfyUI (tests/engine/comfyui_svd_check.py): this process holds the tests'
`comfy` stand-in package, which would shadow the real one. Full-size networks with random weights (ComfyUI
recognises SVD's VAE and CLIP-H only at their released sizes); about 30 s and 6 GB of RAM.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from servers import COMFYUI_VERSIONS, ROOT, comfyui_dir, comfyui_python


@pytest.fixture(scope="module", params=list(COMFYUI_VERSIONS))
def report(request, reference_dir) -> dict:
    version = request.param
    result = subprocess.run([comfyui_python(version), str(Path(__file__).with_name("comfyui_svd_check.py")),
                             str(ROOT), str(reference_dir / "svd-xt")], cwd=comfyui_dir(version),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_comfyui_reads_every_weight_of_the_svd_vae(report):
    assert report["vae_keys_missing"] == [] and report["vae_keys_unused"] == []
    assert report["vae_dtype"] == "torch.float32"  # ComfyUI's choice on a CPU


def test_comfyui_vae_encodes_and_decodes_like_the_diffusers_vae(report):
    # measured: encode 4e-7, decode 9e-6 (float32 summation order; the temporal layers change a frame by 0.77)
    assert report["vae_encode_rel"] < 1e-5
    assert report["vae_decode_rel"] < 1e-4
    assert report["vae_decode_shape"] == [3, 3, *report["size"]]
    assert report["vae_decode_temporal_effect"] > 0.1  # the chunk is decoded as one clip, not frame by frame


def test_a_short_card_does_not_split_the_temporal_chunk(report):
    """ComfyUI's VAE.decode would decode the chunk as 2 + 1 frames where it estimates room for two (another
    video: 0.79 relative measured); the pack's adapter decodes it whole."""
    assert report["short_card_comfy_decode_rel"] > 0.05
    assert report["short_card_sonic_decode_rel"] < 1e-4


def test_comfyui_clip_vision_embeds_like_transformers(report):
    assert report["clip_config"] == "ClipVisionModel" and report["clip_embeds_shape"] == [1, 1024]
    assert report["clip_dtype"] == "torch.float16"  # ComfyUI keeps CLIP vision in float16 on a CPU
    assert report["clip_embeds_rel"] < 1e-5  # measured 9.5e-7 (weights made float16-exact)
    assert report["clip_other_image_rel"] > 1e-2  # a mirrored portrait moves the embedding 100x more
