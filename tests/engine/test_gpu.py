"""The engine on a CUDA GPU (tiny reference models): same result as the CPU, half precision, memory that does not
grow with the video, no host-device synchronisation inside the sampling loop. Skipped where no GPU is present
(this project's CI machines have none), failed instead where SONIC_REQUIRE_GPU=1 says one must be there
(`benchmarks/gpu_session.sh` sets it and runs these and the full-size benchmarks when one is lent)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from sonic.engine import pipeline
from sonic.params import SampleOptions

from helpers import record_streaming, rel_err
from servers import skip_or_fail

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="session", autouse=True)
def cuda_gpu():
    """Every test here needs CUDA: skip without it, or fail where SONIC_REQUIRE_GPU=1 (a lent GPU machine)."""
    if not torch.cuda.is_available():
        skip_or_fail("no CUDA GPU on this machine", "SONIC_REQUIRE_GPU")


@pytest.fixture(scope="module")
def tiny_models(tiny_dir):
    """The CPU reference, without a face detector (the lent GPU machines have no dlib; the face box is given)."""
    from sonic.engine.loader import load_models

    return load_models(tiny_dir / "models", device="cpu", dtype="fp32", face_detector="none")


@pytest.fixture(scope="module")
def tiny_cond(tiny_models, tiny_dir, tiny_params):
    from helpers import prepare_reference_inputs

    return prepare_reference_inputs(tiny_models, tiny_dir, tiny_params)


@pytest.fixture(scope="module")
def cuda_models(tiny_dir):
    from sonic.engine.loader import load_models

    return {dtype: load_models(tiny_dir / "models", device="cuda", dtype=dtype, face_detector="none")
            for dtype in ("fp32", "fp16", "bf16")}


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 convolutions (cuDNN's default) would be a precision change of their own; compare plain float32."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def longer(cond, frames: int):
    reps = -(-frames // cond.num_frames)
    return dataclasses.replace(cond, audio_tokens=cond.audio_tokens.repeat(reps, 1, 1)[:frames],
                               motion_buckets=cond.motion_buckets.repeat(reps, 1)[:frames])


def test_float32_on_the_gpu_matches_the_cpu(cuda_models, tiny_models, tiny_cond):
    noise = torch.randn(1, tiny_cond.num_frames, *tiny_cond.image_latents.shape[1:])
    options = SampleOptions(inference_steps=2)
    cpu = pipeline.sample(tiny_models, tiny_cond, options, noise=noise)
    gpu = pipeline.sample(cuda_models["fp32"], tiny_cond, options, noise=noise.cuda())
    assert gpu.device.type == "cpu"  # the sampler hands back host memory
    assert rel_err(gpu, cpu) < 1e-3  # the CPU's own thread-count noise is 1e-4 (test_pipeline.py)


@pytest.mark.parametrize("dtype, bound", [("fp16", 0.03), ("bf16", 0.16)])
def test_half_precision_on_the_gpu_stays_close_and_finite(cuda_models, tiny_models, tiny_cond, dtype, bound):
    """The CPU bounds of test_pipeline.py (fp16 1.4 %, bf16 11-13 % measured there)."""
    noise = torch.randn(1, tiny_cond.num_frames, *tiny_cond.image_latents.shape[1:])
    options = SampleOptions(inference_steps=2)
    reference = pipeline.sample(tiny_models, tiny_cond, options, noise=noise)
    models = cuda_models[dtype]
    latents = pipeline.sample(models, tiny_cond, options, noise=noise.cuda())
    assert rel_err(latents, reference) < bound
    frames = torch.cat([c.cpu() for c in pipeline.decode(models, latents, options)])
    assert torch.isfinite(frames).all() and frames.shape[0] == 2 * tiny_cond.num_frames - 1


def _sampling_peak(models, cond, frames: int, options: SampleOptions) -> int:
    cond = longer(cond, frames)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    noise = torch.randn(1, frames, *cond.image_latents.shape[1:])  # drawn on the host: only the sampler counts
    pipeline.sample(models, cond, options, noise=noise)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def test_gpu_memory_does_not_grow_with_the_video(cuda_models, tiny_cond):
    models, options = cuda_models["fp16"], SampleOptions(inference_steps=2)
    short, long = _sampling_peak(models, tiny_cond, 30, options), _sampling_peak(models, tiny_cond, 300, options)
    frame_bytes = tiny_cond.image_latents[0].numel() * 2
    assert long - short < 0.05 * (300 - 30) * frame_bytes, (short, long)


def test_low_vram_mode_needs_less_gpu_memory_for_the_same_latents(cuda_models, tiny_cond):
    models = cuda_models["fp32"]
    batched = _sampling_peak(models, tiny_cond, 57, SampleOptions(inference_steps=2))
    sequential = _sampling_peak(models, tiny_cond, 57, SampleOptions(inference_steps=2, sequential_guidance=True))
    assert sequential < 0.75 * batched, (sequential, batched)


def test_the_sampling_loop_never_waits_for_the_gpu_by_accident(cuda_models, tiny_cond):
    """CUDA's sync debug mode reports every implicit synchronisation (a .item(), a copy from pageable memory, a
    data-dependent shape); the loop's only waits are its explicit CUDA events, one call behind the GPU."""
    models, options = cuda_models["fp16"], SampleOptions(inference_steps=2)
    noise = torch.randn(1, tiny_cond.num_frames, *tiny_cond.image_latents.shape[1:])
    pipeline.sample(models, tiny_cond, options, noise=noise)  # warm-up: first-call allocations and kernels
    from sonic.engine.sampler import sample_windows, schedule_from_config

    sigmas, timesteps = schedule_from_config(models.scheduler_config, 2)
    denoiser = pipeline.SonicDenoiser(models, tiny_cond, options, len(timesteps))
    latents = noise[0].to(models.dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            sample_windows(denoiser, latents, sigmas, timesteps, device=models.device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert not syncs, syncs[:3]


@pytest.mark.parametrize("index", [0, 1])
def test_the_host_reads_each_windows_result_only_after_its_copy_from_the_samplers_gpu(index):
    """The sampler on cuda:`index` while the current device stays cuda:0, each window's result held back by a
    GPU sleep queued before it: the host must wait for the copy on that GPU's stream (an event on the current
    device's stream does not wait for cuda:1, and the host would add a half-filled buffer). v = 0 makes every
    window's update known exactly (tests/engine/test_sampler.py)."""
    from sonic.engine.sampler import euler_step, sample_windows

    if torch.cuda.device_count() <= index:
        pytest.skip(f"needs {index + 1} CUDA devices")
    latents, sigmas, timesteps = torch.randn(57, 4, 16, 16), torch.tensor([10.0, 5.0, 0.0]), torch.tensor([0.5, 0.4])

    def slow_zero_v(x_in, frame_index, step, timestep):
        with torch.cuda.device(x_in.device):
            torch.cuda._sleep(20_000_000)  # ~10 ms of the GPU's time before the result exists
        return torch.zeros_like(x_in)

    assert torch.cuda.current_device() == 0
    out = sample_windows(slow_zero_v, latents, sigmas, timesteps, device=f"cuda:{index}")
    expected = latents
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        expected = euler_step(expected, torch.zeros_like(expected), sigma, sigma_next)
    torch.testing.assert_close(out, expected)


@pytest.fixture(scope="module")
def host_unet_models(tiny_dir):
    """fp32 on CUDA with the UNet's weights left in host memory, as block streaming keeps them."""
    from sonic.engine.loader import load_models

    return load_models(tiny_dir / "models", device="cuda", dtype="fp32", face_detector="none", unet_device="cpu")


def test_the_streamed_unet_overlaps_its_copies_and_gives_the_resident_latents(host_unet_models, cuda_models, tiny_cond,
                                                                              monkeypatch):
    """UNet streaming on a GPU (low-VRAM rows, as the plan streams): the host weights are page-locked, every unit
    after the first pass was copied ahead on the side stream (its own CUDA stream, not the compute stream), the
    rows share one weight pass per call, and the latents are the resident UNet's."""
    from sonic.engine import offload

    seen = record_streaming(monkeypatch)
    noise = torch.randn(1, tiny_cond.num_frames, *tiny_cond.image_latents.shape[1:])
    options = dict(inference_steps=2, sequential_guidance=True)
    resident = pipeline.sample(cuda_models["fp32"], tiny_cond, SampleOptions(**options), noise=noise)
    streamed = pipeline.sample(host_unet_models, tiny_cond, SampleOptions(stream_unet=True, **options), noise=noise)
    assert rel_err(streamed, resident) < 1e-6  # the same kernels on the same values (bit-equal on the CPU)
    units = offload.unet_units(host_unet_models.unet)
    stats, streaming = seen[0].stats, seen[0]
    assert all(t.is_pinned() for u in units for t in [*u.parameters(), *u.buffers()])
    assert stats.pinned_bytes == offload.unit_bytes(host_unet_models.unet)
    assert streaming.copy_stream is not None and streaming.copy_stream != torch.cuda.current_stream()
    calls = stats.loads // len(units)
    assert stats.loads == calls * len(units) and calls == 2 * -(-tiny_cond.num_frames // 25)  # one pass per call
    assert stats.prefetched == stats.loads - len(units) - 1 and stats.discarded == 0
    assert next(host_unet_models.unet.parameters()).device.type == "cpu"  # the weights stay on the host
