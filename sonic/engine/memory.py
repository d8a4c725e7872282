"""How much working memory (beyond the weights) each Sonic stage needs on the compute device, in bytes.

ComfyUI frees memory for a stage only as far as it is told (`load_models_gpu(..., memory_required=...)`); these
estimates are what the nodes tell it, and what the run plan (`plan.py`) chooses the memory mode from. Each is
linear in the work of one call, with coefficients measured on the real architectures (random weights; activation
memory does not depend on the values) by `benchmarks/stage_memory.py` at several sizes, fp32 on the CPU, rounded
up; half precision halves them. PyTorch's attention kernels on CPU and GPU are both flash-style (no N x N
matrix), so the pattern measured on the CPU is the GPU's. `benchmarks/README.md` has the measurements; re-measure
on a GPU with `bench_stages.py --device cuda`.
"""

from __future__ import annotations

import math

MiB = 2**20

# Measured (benchmarks/results/stage_memory.json, fp32): the UNet call 33-36 KB per latent element (rows x frames
# x h x w) above a fixed ~100 MiB; the temporal VAE decode 4,090-4,130 B per output pixel of the chunk, its encode
# 2,560-2,600 B per pixel; RIFE 302-306 B per pixel of each frame pair. Linear in the size at every point measured.
UNET_FIXED_BYTES = 96 * MiB
UNET_BYTES_PER_ELEMENT = 34_500
VAE_DECODE_BYTES_PER_PIXEL = 4_200
VAE_ENCODE_BYTES_PER_PIXEL = 2_650
RIFE_BYTES_PER_PIXEL = 320
# Whisper-tiny on 30 s chunks, the audio MLPs on TOKEN_BATCH windows and CLIP at 224 px: small and fixed
AUDIO_AND_CLIP_BYTES = 512 * MiB
# allocator slack and the sampler's own window buffers, per call
SLACK = 1.2


def dtype_bytes(dtype) -> int:
    """2 for fp16/bf16, 4 for fp32 (a torch.dtype or its name)."""
    name = str(dtype).replace("torch.", "")
    return 2 if name in ("float16", "bfloat16", "fp16", "bf16", "half") else 4


def unet_call_bytes(rows: int, frames: int, latent_h: int, latent_w: int, dtype) -> int:
    """One UNet call: `rows` batch rows (3 guidance rows x windows per call, or 1 row in low-VRAM mode) of
    `frames` latent frames of latent_h x latent_w."""
    elements = rows * frames * latent_h * latent_w
    return math.ceil((UNET_FIXED_BYTES + elements * UNET_BYTES_PER_ELEMENT * dtype_bytes(dtype) / 4) * SLACK)


def vae_decode_bytes(chunk: int, height: int, width: int, dtype) -> int:
    return math.ceil(chunk * height * width * VAE_DECODE_BYTES_PER_PIXEL * dtype_bytes(dtype) / 4 * SLACK)


def rife_bytes(batch: int, height: int, width: int) -> int:
    return math.ceil(batch * height * width * RIFE_BYTES_PER_PIXEL * SLACK)


def prepare_bytes(height: int, width: int, dtype) -> int:
    """Sonic PreData: the reference image's VAE encode, Whisper, the audio MLPs, CLIP."""
    encode = height * width * VAE_ENCODE_BYTES_PER_PIXEL * dtype_bytes(dtype) / 4
    return math.ceil(max(encode, AUDIO_AND_CLIP_BYTES) * SLACK)


def decode_bytes(chunk: int, rife_batch: int, height: int, width: int, dtype, interpolation: bool) -> int:
    """Decoding stage: the VAE chunk and the RIFE batch run one after the other on frames of H x W."""
    need = vae_decode_bytes(chunk, height, width, dtype)
    return max(need, rife_bytes(rife_batch, height, width)) if interpolation else need


def sampling_bytes(windows_per_call: int, frames: int, latent_h: int, latent_w: int, dtype,
             sequential_guidance: bool = False) -> int:
    rows = windows_per_call * (1 if sequential_guidance else 3)
    return unet_call_bytes(rows, frames, latent_h, latent_w, dtype)


def streamed_unet_bytes(largest_unit_bytes: int, windows_per_call: int, frames: int, latent_h: int, latent_w: int,
                  dtype) -> int:
    """Block streaming (sonic/engine/offload.py): the low-VRAM UNet call plus the largest block's weights, twice (the
    block in use and the allocator's copy of the next while the last is freed)."""
    call = sampling_bytes(windows_per_call, frames, latent_h, latent_w, dtype, sequential_guidance=True)
    return call + 2 * largest_unit_bytes
