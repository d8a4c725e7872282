"""The working-memory estimates that the nodes pass to ComfyUI (sonic/engine/memory.py), against the peaks measured on
the real architectures by benchmarks/stage_memory.py (recorded in benchmarks/results/stage_memory.json), and against
what the tiny UNet's calls allocate, measured here. Nothing here recomputes memory.py's formulas from its constants:
a wrong coefficient, a dtype not halved, or rows that do not count should fail against a measurement."""

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


def test_unet_estimate_grows_with_the_work_as_the_measured_peaks_do():
    """The per-element cost, seen apart from the fixed part: between recorded UNet sizes far enough apart (3,840
    latent elements or more), the estimate grows by at least what the measured peak grew by (else a long video
    gets too little freed) and by at most 1.5 times it."""
    rows = sorted(recorded("unet"), key=lambda r: r["elements"])
    pairs = [(a, b) for i, a in enumerate(rows) for b in rows[i + 1:]
             if b["elements"] - a["elements"] >= 3840 and a["elements"] >= 3840]
    assert pairs

    def estimate(r):
        return memory.unet_call_bytes(r["rows"], r["frames"], *r["latent"], torch.float32)

    for a, b in pairs:
        ratio = (estimate(b) - estimate(a)) / ((b["measured_mib"] - a["measured_mib"]) * MiB)
        assert 1.0 <= ratio <= 1.5, (a["latent"], a["frames"], b["latent"], b["frames"], ratio)


@pytest.fixture(scope="module")
def unet_activations(tiny_dir, tiny_models, expected):
    """Peak bytes of the tensors one tiny-UNet call creates (LiveTensorBytes), by (guidance rows, dtype), for the
    official run's first call: 1 row (the low-VRAM call), 2 rows (2 windows, low-VRAM) and 3 (the batched call)."""
    from helpers import LiveTensorBytes
    from sonic.engine.checkpoints import ModelLayout
    from sonic.engine.loader import load_unet

    sample = expected["unet_call0.sample"]
    all_rows, frames = sample.shape[:2]
    unets = {torch.float32: (tiny_models.unet, tiny_models.audio_conditioning),
             torch.bfloat16: load_unet(ModelLayout(tiny_dir / "models"), tiny_models.audio_to_tokens.token_dim,
                                       torch.device("cpu"), torch.bfloat16)}
    peaks = {}
    for dtype, rows in ((torch.float32, 1), (torch.float32, 2), (torch.float32, 3), (torch.bfloat16, 1),
                        (torch.bfloat16, 3)):
        unet, conditioning = unets[dtype]
        tokens = expected["unet_call0.audio_tokens"].unflatten(0, (all_rows, frames))[:rows].flatten(0, 1)
        clip = expected["unet_call0.image_embeds"].reshape(all_rows, frames, -1)[:rows, :1]
        tracker = LiveTensorBytes()
        mask = expected["unet_call0.face_mask"].to(dtype)
        with torch.no_grad(), conditioning.bind(tokens.to(dtype), frames, mask, 1.0), tracker:
            tracker.mark()
            unet(sample[:rows].to(dtype), expected["unet_call0.timestep"], encoder_hidden_states=clip.to(dtype),
                 added_time_ids=expected["unet_call0.added_time_ids"][:rows].to(dtype), return_dict=False)
        peaks[rows, dtype] = tracker.peak - tracker.at_mark
    return peaks, frames, tuple(sample.shape[-2:])


def test_low_vram_rows_and_half_precision_change_the_estimate_as_they_change_measured_activations(
        unet_activations):
    """Measured here (tiny UNet, every tensor the call creates): activations grow in proportion to the guidance
    rows and halve in bf16 (measured: 40.7 / 84.7 / 127.0 MiB for 1 / 2 / 3 rows in fp32; 20.3 / 63.5 MiB for 1
    / 3 rows in bf16). The estimate's low-VRAM (1 row), two-window low-VRAM (2 rows) and batched (3 rows) calls,
    in fp32 and in half precision, must differ from each other in the same proportions within 10%: differences,
    so the fixed part plays no role and none of memory.py's constants is read here."""
    peaks, frames, (h, w) = unet_activations
    fp32, bf16 = torch.float32, torch.bfloat16

    def estimate(windows, dtype, low_vram):
        return memory.sampling_bytes(windows, frames, h, w, dtype, sequential_guidance=low_vram)

    def close(estimated, measured):
        assert estimated == pytest.approx(measured, rel=0.1), (estimated, measured)

    # rows: 1 -> 3 grows twice as much as 1 -> 2
    close((estimate(1, fp32, False) - estimate(1, fp32, True)) / (estimate(2, fp32, True) - estimate(1, fp32, True)),
          (peaks[3, fp32] - peaks[1, fp32]) / (peaks[2, fp32] - peaks[1, fp32]))
    # half precision: the same step from 1 to 3 rows costs half as much
    close((estimate(1, bf16, False) - estimate(1, bf16, True)) / (estimate(1, fp32, False) - estimate(1, fp32, True)),
          (peaks[3, bf16] - peaks[1, bf16]) / (peaks[3, fp32] - peaks[1, fp32]))
    # fp16: measured once the same as bf16 (20.3 MiB for 1 row), but ten times slower on a CPU than measuring bf16
    close((estimate(1, "fp16", False) - estimate(1, "fp16", True)) / (estimate(1, fp32, False)
                                                                       - estimate(1, fp32, True)),
          (peaks[3, bf16] - peaks[1, bf16]) / (peaks[3, fp32] - peaks[1, fp32]))


def test_streamed_estimate_covers_the_rows_kept_across_blocks(tiny_models, expected):
    """A streamed UNet call with low-VRAM rows (pipeline._streamed_rows): every block runs the three guidance rows in
    turn, so the working memory inside a block is one row's, but the skip activations, the up block's input and the
    units' inputs and outputs are there for all three rows. Measured on the tiny UNet (fp32, 32 x 16 latents, every
    tensor the call creates), 3.76 MiB above the one-row call for 5 frames (18.8 MiB for all 25: 59.5 against 40.7),
    the peak of both in the last up block's transformer: its input and output, the block's input and its two skips,
    192 channels at full resolution, for two more rows (3.75 MiB). The estimate above the one-row call, computed from
    the tiny UNet's config, must cover that and stay under 1.5 times it: it adds the worst point of what is kept (the
    last up block's first resnet, 256 channels: 5.0 MiB, 1.33 times) to the worst point of the one-row call's
    working memory, which are not the same point. The estimate before (the one-row call and the weights) added 0."""
    from helpers import LiveTensorBytes

    from sonic.engine import offload

    unet, conditioning = tiny_models.unet, tiny_models.audio_conditioning
    frames = 5  # of the first call's 25 (a fifth of the time; the kept rows are per frame)
    sample = expected["unet_call0.sample"][:, :frames]
    rows, (h, w) = sample.shape[0], sample.shape[-2:]
    assert rows == 3
    tokens = expected["unet_call0.audio_tokens"].unflatten(0, (rows, -1))[:, :frames].flatten(0, 1)
    per_row = tokens.shape[0] // rows
    clip = expected["unet_call0.image_embeds"].unflatten(0, (rows, -1))[:, :1].contiguous()
    mask = expected["unet_call0.face_mask"]

    def each(row: int):
        return conditioning.bind(tokens[row * per_row: (row + 1) * per_row], frames, mask, 1.0)

    def peak(streamed: bool) -> int:
        """The streamed three-row call, or the first row's low-VRAM call."""
        tracker = LiveTensorBytes()
        n = rows if streamed else 1
        with (torch.no_grad(), offload.streamed(offload.unet_units(unet), "cpu") as streaming,
              streaming.split(rows, each) if streamed else each(0), tracker):
            tracker.mark()
            unet(sample[:n], expected["unet_call0.timestep"], encoder_hidden_states=clip[:n],
                 added_time_ids=expected["unet_call0.added_time_ids"][:n], return_dict=False)
        return tracker.peak - tracker.at_mark

    measured = peak(streamed=True) - peak(streamed=False)

    estimate = (memory.streamed_unet_bytes(0, 1, frames, h, w, torch.float32, unet_config=dict(unet.config))
                - memory.sampling_bytes(1, frames, h, w, torch.float32, sequential_guidance=True))
    assert measured > 2 * MiB  # it did measure the kept rows
    assert measured <= estimate <= 1.5 * measured, (estimate / MiB, measured / MiB)
    # the released UNet at 512 px (64 x 64 latents), 25 frames, fp16: the last up block's first resnet keeps three
    # 320-channel skips, its 640-channel input, the 960-channel concatenation and its 320-channel output at full
    # resolution: 2,880 channels, 0.59 GB per extra row
    assert memory.kept_elements(64, 64, memory.svd_unet_config()) == 2880 * 64 * 64
    assert memory.streamed_unet_bytes(0, 1, 25, 64, 64, torch.float16) - memory.sampling_bytes(
        1, 25, 64, 64, torch.float16, sequential_guidance=True) == 2 * 25 * 2880 * 64 * 64 * 2


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


def test_attention_memory_depends_on_the_backend(monkeypatch):
    """The batched call at 512 px in fp16 (3 guidance rows x 25 frames, 64 x 64 latents). Fused kernels (CUDA, the
    CPU) add nothing to the measured coefficients. The math kernel (MPS's SDPA) adds its largest layer's scores,
    the first level's self-attention [75, 5, 4096, 4096], at 10 bytes per score in half precision (scores and
    softmax in fp32, the result in fp16) and 8 in fp32. Chunked (Sonic on MPS) adds the largest chunk's scores:
    with the default 256 MiB budget that is 12 frames of the second level ([10, 1024, 1024] each, 252 MB in fp16)
    - more than one frame of the first (168 MB), fewer bytes than the budget."""
    monkeypatch.delenv(memory.SCORE_BLOCK_ENV, raising=False)
    fp16 = torch.float16

    def extra(backend, rows=3, dtype=fp16):
        return memory.unet_call_bytes(rows, 25, 64, 64, dtype, backend) - memory.unet_call_bytes(rows, 25, 64, 64, dtype)

    assert extra("fused") == 0
    assert extra("math") == 75 * 5 * 4096 * 4096 * 10 == 62_914_560_000
    assert extra("math", rows=1) == 25 * 5 * 4096 * 4096 * 10  # low-VRAM rows: a third
    assert extra("math", dtype=torch.float32) == 75 * 5 * 4096 * 4096 * 8
    assert extra("chunked") == 12 * 10 * 1024 * 1024 * 10 == 1_258_291_200
    assert 12 * 10 * 1024 * 1024 * 2 <= 256 * 2**20 < 13 * 10 * 1024 * 1024 * 2  # (a 13th frame would not fit)
    monkeypatch.setenv(memory.SCORE_BLOCK_ENV, "16")  # 16 MiB: less than one head of 4096 x 4096 (32 MiB)
    assert extra("chunked") == 1 * 1 * 2048 * 4096 * 10  # 2048 query rows of one head
    # the memory modes pass it through
    assert memory.sampling_bytes(1, 25, 64, 64, fp16, attention="math") == memory.unet_call_bytes(
        3, 25, 64, 64, fp16, "math")
    assert memory.streamed_unet_bytes(10, 1, 25, 64, 64, fp16, "math") - memory.streamed_unet_bytes(
        10, 1, 25, 64, 64, fp16) == extra("math", rows=1)  # blocks run one guidance row at a time
    with pytest.raises(ValueError, match="flash"):
        memory.attention_bytes(1, 25, 64, 64, fp16, "flash")


def test_the_attention_shapes_are_the_svd_unets():
    """The released UNet's config gives the levels memory.py plans with by default; the largest score tensor of
    each kind at 512 px, from the shapes: spatial self-attention (frames x heads x 4096^2), temporal self-attention
    (pixels x heads x 25^2), the temporal audio attention (rows x heads x 4096*25 queries x 32 tokens)."""
    import json

    config = json.loads((Path(memory.__file__).parent / "configs" / "svd-xt" / "unet" / "config.json").read_text())
    assert memory.attention_levels(config) == memory.SVD_ATTENTION_LEVELS == ((5, 1), (10, 2), (20, 4), (20, 8))
    shapes = list(memory.attention_score_shapes(3, 25, 64, 64))
    assert len(shapes) == 6 * 4
    assert shapes[:6] == [(75, 5, 4096, 4096), (75, 5, 4096, 1), (75, 5, 4096, 32), (3 * 4096, 5, 25, 25),
                          (3 * 4096, 5, 25, 1), (3, 5, 4096 * 25, 32)]
    assert shapes[-6] == (75, 20, 64, 64)  # the mid block: 64 x 64 latents halved three times
    assert list(memory.attention_score_shapes(1, 25, 9, 5))[-6] == (25, 20, 2, 2)  # odd sides round up


def test_the_run_plan_asks_for_the_attention_of_its_device(tiny_models, tiny_cond, monkeypatch):
    """The plan on the CPU (fused) and the same models on MPS (chunked): the UNet call's request differs by the
    chunked attention's bytes, in every memory mode."""
    import dataclasses

    from sonic.engine.plan import plan_run
    from sonic.params import SampleOptions

    monkeypatch.delenv(memory.SCORE_BLOCK_ENV, raising=False)
    cpu = plan_run(tiny_models, tiny_cond, SampleOptions())
    mps = plan_run(dataclasses.replace(tiny_models, device=torch.device("mps")), tiny_cond, SampleOptions())
    assert (cpu.attention, mps.attention) == ("fused", "chunked")
    h, w = cpu.latent_size
    frames = cpu.options.frames_per_window
    for rows, sequential in ((3, False), (1, True)):
        assert mps.unet_call_bytes(sequential) - cpu.unet_call_bytes(sequential) == memory.attention_bytes(
            rows, frames, h, w, cpu.dtype, "chunked") > 0
