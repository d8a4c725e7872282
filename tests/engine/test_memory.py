"""The working-memory estimates that the nodes pass to ComfyUI (sonic/engine/memory.py), against the peaks measured on
the real architectures by benchmarks/stage_memory.py (recorded in benchmarks/results/stage_memory.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sonic.engine import memory

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "stage_memory.json"
MiB = 2**20


def recorded(stage: str) -> list[dict]:
    rows = [r for r in json.loads(RESULTS.read_text())["results"] if r["stage"] == stage]
    assert rows, f"no {stage} measurements in {RESULTS}"
    return rows


def test_estimates_cover_every_measured_peak_without_gross_waste():
    """Never below a measured peak (ComfyUI would free too little), never more than twice it (it would evict
    models for nothing, or choose the low-VRAM mode needlessly)."""
    checks, lower_only = [], []
    for r in recorded("unet"):
        checks.append((memory.unet_call_bytes(r["rows"], r["frames"], *r["latent"], torch.float32), r["measured_mib"]))
    for r in recorded("vae"):
        checks.append((memory.vae_decode_bytes(r["chunk"], *r["size"], torch.float32), r["decode_measured_mib"]))
        # PreData's request also covers Whisper and CLIP (a fixed 512 MiB): only a lower bound for the encode
        lower_only.append((memory.prepare_bytes(*r["size"], torch.float32), r["encode_measured_mib"]))
    for r in recorded("rife"):
        if r["measured_mib"] > 1:
            checks.append((memory.rife_bytes(r["batch"], *r["size"]), r["measured_mib"]))
    for estimate, measured in checks + lower_only:
        assert measured * MiB <= estimate, (estimate / MiB, measured)
    ratios = [estimate / (measured * MiB) for estimate, measured in checks if measured > 100]
    assert max(ratios) < 2.0, ratios


def test_half_precision_halves_the_activations_and_rows_scale_linearly():
    fixed = memory.UNET_FIXED_BYTES * memory.SLACK
    full = memory.unet_call_bytes(3, 25, 64, 64, torch.float32) - fixed
    half = memory.unet_call_bytes(3, 25, 64, 64, torch.float16) - fixed
    assert half == pytest.approx(full / 2, rel=1e-6)
    assert memory.unet_call_bytes(3, 25, 64, 64, "bf16") == memory.unet_call_bytes(3, 25, 64, 64, torch.float16)
    one_row = memory.sampling_bytes(1, 25, 64, 64, torch.float16, sequential_guidance=True) - fixed
    assert one_row * 3 == pytest.approx(half, rel=1e-6)


def _sampling_growth(models, cond, frames: int) -> tuple[int, int]:
    """Bytes the sampler allocates beyond what is alive at its first UNet call, at its worst, for a `frames`-long
    video (the tiny cond's audio repeated); and the bytes of one frame's latents."""
    import dataclasses

    from sonic.engine import pipeline
    from sonic.params import SampleOptions
    from sonic.engine.sampler import sample_windows, schedule_from_config

    from helpers import LiveTensorBytes

    reps = -(-frames // cond.num_frames)
    cond = dataclasses.replace(cond, audio_tokens=cond.audio_tokens.repeat(reps, 1, 1)[:frames],
                               motion_buckets=cond.motion_buckets.repeat(reps, 1)[:frames])
    sigmas, timesteps = schedule_from_config(models.scheduler_config, 2)
    denoiser = pipeline.SonicDenoiser(models, cond, SampleOptions(inference_steps=2), len(timesteps))
    latents = torch.randn(frames, *cond.image_latents.shape[1:])
    tracker, shapes = LiveTensorBytes(), set()

    def denoise(x_in, frame_index, step, timestep):
        if not shapes:
            tracker.mark()  # the host buffers exist by now
        shapes.add(tuple(x_in.shape))
        return denoiser(x_in, frame_index, step, timestep)

    with tracker:
        sample_windows(denoise, latents, sigmas, timesteps, device=models.device)
    assert shapes == {(1, 25, *latents.shape[1:])}  # the UNet only ever sees one window
    return tracker.peak - tracker.at_mark, latents[0].nbytes


def test_sampling_memory_does_not_grow_with_the_video(tiny_models, tiny_cond):
    """Everything the sampler allocates after setting up (UNet activations, windows on their way to and from
    the device) is the same for 30 and 120 frames: the full-length latents live in two host buffers made
    before the loop. Measured: 4 bytes more per frame (the coverage counts, on the host); the sampler before
    this design allocated a full-length buffer per step on the device (+1 frame of latents per frame)."""
    short, frame_bytes = _sampling_growth(tiny_models, tiny_cond, 30)
    long, _ = _sampling_growth(tiny_models, tiny_cond, 120)
    assert short > 10 * 25 * frame_bytes  # it did measure the UNet's activations
    assert long - short < 0.02 * (120 - 30) * frame_bytes
