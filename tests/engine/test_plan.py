"""The run plan (sonic/engine/plan.py): one policy for every front end choosing the official batched call, low-VRAM
rows or UNet streaming from the device's memory and the user's choices, with the options validated again."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from sonic.engine import memory
from sonic.engine.encoders import DiffusersVAE
from sonic.engine.offload import unet_units
from sonic.engine.plan import DeviceMemory, plan_run, prepare_bytes, video_size
from sonic.params import PrepareOptions, SampleOptions


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@pytest.fixture(scope="module")
def sizes(tiny_models, tiny_cond):
    """What the plan must decide from, computed here without the plan: the UNet's weights, one low-VRAM and one
    batched UNet call at this video's latent size (memory.py's estimates, tested against measurements)."""
    _, _, latent_h, latent_w = tiny_cond.image_latents.shape
    dtype = tiny_models.dtype
    return {"unet": weight_bytes(tiny_models.unet),
            "low_vram_call": memory.sampling_bytes(1, 25, latent_h, latent_w, dtype, sequential_guidance=True),
            "batched_call": memory.sampling_bytes(1, 25, latent_h, latent_w, dtype)}


def test_unknown_memory_runs_the_official_batched_call(tiny_models, tiny_cond):
    options = SampleOptions(inference_steps=3)
    plan = plan_run(tiny_models, tiny_cond, options)
    assert plan.options == options and plan.note is None
    assert (plan.width, plan.height) == tiny_cond.size == (128, 256)
    assert plan.latent_size == tuple(tiny_cond.image_latents.shape[2:])
    assert plan.with_free_memory(None) is plan


def test_the_unet_streams_exactly_when_it_and_a_low_vram_call_do_not_fit(tiny_models, tiny_cond, sizes):
    enough = sizes["unet"] + sizes["low_vram_call"]
    fits = plan_run(tiny_models, tiny_cond, SampleOptions(), DeviceMemory(usable_bytes=enough))
    assert not fits.options.stream_unet and not fits.options.sequential_guidance and fits.note is None
    short = plan_run(tiny_models, tiny_cond, SampleOptions(), DeviceMemory(usable_bytes=enough - 1))
    assert short.options.stream_unet and short.options.sequential_guidance
    assert "UNet streaming" in short.note and "do not fit" in short.note
    assert short.unet_bytes == sizes["unet"]


def test_low_vram_rows_exactly_when_the_batched_call_does_not_fit_next_to_the_unet(tiny_models, tiny_cond, sizes):
    plan = plan_run(tiny_models, tiny_cond, SampleOptions(), DeviceMemory(usable_bytes=10**12))
    assert plan.unet_call_bytes() == sizes["batched_call"]  # what ComfyUI is asked to free before measuring
    assert plan.with_free_memory(sizes["batched_call"]) is plan
    low = plan.with_free_memory(sizes["batched_call"] - 1)
    assert low.options.sequential_guidance and not low.options.stream_unet
    assert low.unet_call_bytes() == sizes["low_vram_call"]
    assert "low-VRAM mode" in low.note and "GiB are free" in low.note
    assert not plan.options.sequential_guidance  # plans are values: the first one is unchanged


def test_the_users_stream_flag_means_streaming_with_low_vram_rows(tiny_models, tiny_cond, sizes):
    """What --stream-unet (CLI) and stream_unet (Python) mean, whatever the memory: the weights stay in host memory
    and the guidance rows run one after another; the user's own choice needs no note."""
    plan = plan_run(tiny_models, tiny_cond, SampleOptions(stream_unet=True), DeviceMemory(usable_bytes=10**12))
    assert plan.options.stream_unet and plan.options.sequential_guidance and plan.note is None
    largest = max(weight_bytes(unit) for unit in unet_units(tiny_models.unet))
    assert plan.largest_unit_bytes == largest
    # the block in use and the next one; what the blocks keep for the other two guidance rows (test_memory.py)
    _, _, latent_h, latent_w = tiny_cond.image_latents.shape
    kept = 2 * 25 * memory.kept_elements(latent_h, latent_w, memory.svd_unet_config()) * tiny_models.dtype.itemsize
    assert kept > 0
    assert plan.unet_call_bytes() == sizes["low_vram_call"] + 2 * largest + kept
    assert plan.with_free_memory(0) is plan  # a streamed UNet is already in low-VRAM mode


def test_the_hosts_settings_force_modes_but_compile_keeps_the_unet_whole(tiny_models, tiny_cond):
    forced = plan_run(tiny_models, tiny_cond, SampleOptions(), DeviceMemory(force_stream_unet=True))
    assert forced.options.stream_unet and "--novram" in forced.note
    compiled = plan_run(tiny_models, tiny_cond, SampleOptions(compile=True),
                        DeviceMemory(usable_bytes=1, force_stream_unet=True))
    assert not compiled.options.stream_unet and compiled.options.compile
    low = plan_run(tiny_models, tiny_cond, SampleOptions(), DeviceMemory(force_low_vram=True))
    assert low.options.sequential_guidance and not low.options.stream_unet and "--lowvram" in low.note
    users_own = plan_run(tiny_models, tiny_cond, SampleOptions(sequential_guidance=True), DeviceMemory(10**12))
    assert users_own.options.sequential_guidance and users_own.note is None


def test_output_fps_and_frame_count(tiny_models, tiny_cond):
    frames = tiny_cond.num_frames
    with_rife = plan_run(tiny_models, tiny_cond, SampleOptions())
    assert (with_rife.fps, with_rife.output_frames) == (25.0, 2 * frames - 1)
    without = plan_run(tiny_models, tiny_cond, SampleOptions(interpolation=False))
    assert (without.fps, without.output_frames) == (12.5, frames)
    no_rife = plan_run(dataclasses.replace(tiny_models, rife=None), tiny_cond, SampleOptions())
    assert (no_rife.fps, no_rife.output_frames) == (12.5, frames)
    height, width = tiny_cond.size[1], tiny_cond.size[0]
    assert with_rife.decode_bytes == max(memory.vae_decode_bytes(8, height, width, tiny_models.dtype),
                                         memory.rife_bytes(4, height, width))


def test_the_decode_estimate_is_in_the_vaes_dtype_not_the_unets(tiny_models, tiny_cond):
    """ComfyUI loads SVD's VAE in fp32 on cards without fast half precision while the UNet computes in fp16: the
    decode stage's working memory is the VAE's, twice an fp16 VAE's per pixel."""
    vaes = {torch.float32: tiny_models.vae, torch.float16: DiffusersVAE(copy.deepcopy(tiny_models.vae.model).half())}
    options = SampleOptions(interpolation=False)  # the VAE's chunk alone (RIFE runs in fp32 whatever the dtypes)
    decode = {dtype: plan_run(dataclasses.replace(tiny_models, dtype=torch.float16, vae=vae), tiny_cond,
                              options).decode_bytes for dtype, vae in vaes.items()}
    width, height = tiny_cond.size
    assert decode[torch.float32] == memory.vae_decode_bytes(8, height, width, torch.float32)
    assert decode[torch.float32] == pytest.approx(2 * decode[torch.float16], abs=2)


def test_the_predata_stage_is_planned_at_the_videos_size():
    # a 1000x600 photo at 512: the short side becomes 512, the long one 853 -> 832 (multiples of 64)
    assert video_size((1000, 600), PrepareOptions(min_resolution=512)) == (832, 512)
    assert video_size((1000, 600), PrepareOptions(min_resolution=512, crop=True)) == (512, 512)
    assert prepare_bytes((1000, 600), PrepareOptions(), torch.float16) == memory.prepare_bytes(512, 832, torch.float16)
