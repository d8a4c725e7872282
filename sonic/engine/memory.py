"""How much working memory (beyond the weights) each Sonic stage needs on the compute device, in bytes.

ComfyUI frees memory for a stage only as far as it is told (`load_models_gpu(..., memory_required=...)`); these
estimates are what the nodes tell it, and what the run plan (`plan.py`) chooses the memory mode from. Each is
linear in the work of one call, with coefficients measured on the real architectures (random weights; activation
memory does not depend on the values) by `benchmarks/stage_memory.py` at several sizes, fp32 on the CPU, rounded
up; half precision halves them. PyTorch's attention kernels on the CPU and on CUDA are both flash-style (no N x N
matrix), so the pattern measured on the CPU is the GPU's. `benchmarks/README.md` has the measurements; re-measure
on a GPU with `bench_stages.py --device cuda`.

Attention is where devices differ (issue #19; the kernels per device are documented in `models/attention.py`):

* ``fused`` (CUDA, CPU): online-softmax kernels, O(n) per head - inside the measured coefficients, nothing added;
* ``math`` (SDPA on a device without a fused kernel, e.g. MPS unchunked): each attention layer materialises its
  whole [batch, heads, queries, keys] score tensor, its softmax and, in half precision, an fp32 copy
  (`score_working_bytes` per score), one layer at a time: the largest layer's come on top;
* ``chunked`` (what Sonic runs on MPS): the same, but for the largest score block the chunk plan allows
  (`score_chunks`, at most the block budget per block).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator

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

# Attention layers of the SVD UNet (configs/svd-xt/unet/config.json) as (heads, downsampling factor): the three
# CrossAttn down blocks (320/640/1280 channels, 5/10/20 heads; the up blocks mirror them) and the mid block (factor
# 8, 20 heads). Sonic's audio adds AUDIO_TOKENS keys per frame (audio2token's context_tokens).
SVD_ATTENTION_LEVELS = ((5, 1), (10, 2), (20, 4), (20, 8))
AUDIO_TOKENS = 32
ATTENTION_BACKENDS = ("fused", "math", "chunked")
# One chunk's score block, at most: 256 MiB, a 16th of MPS's 2**32-byte limit per array (the fp32 copy of half-
# precision scores is twice the block); the chunk's working memory (`score_working_bytes`, 5 times the block in
# half precision) stays near 1.3 GB, and at 512 px one chunk is still a whole frame's attention (5 x 4096^2 scores).
# SONIC_ATTENTION_BLOCK_MB overrides it.
DEFAULT_SCORE_BLOCK_BYTES = 256 * MiB
SCORE_BLOCK_ENV = "SONIC_ATTENTION_BLOCK_MB"


def dtype_bytes(dtype) -> int:
    """2 for fp16/bf16, 4 for fp32 (a torch.dtype or its name)."""
    name = str(dtype).replace("torch.", "")
    return 2 if name in ("float16", "bfloat16", "fp16", "bf16", "half") else 4


def unet_call_bytes(rows: int, frames: int, latent_h: int, latent_w: int, dtype, attention: str = "fused") -> int:
    """One UNet call: `rows` batch rows (3 guidance rows x windows per call, or 1 row in low-VRAM mode) of
    `frames` latent frames of latent_h x latent_w, with the `attention` backend's scores on top (`attention_bytes`)."""
    elements = rows * frames * latent_h * latent_w
    measured = math.ceil((UNET_FIXED_BYTES + elements * UNET_BYTES_PER_ELEMENT * dtype_bytes(dtype) / 4) * SLACK)
    return measured + attention_bytes(rows, frames, latent_h, latent_w, dtype, attention)


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
             sequential_guidance: bool = False, attention: str = "fused") -> int:
    rows = windows_per_call * (1 if sequential_guidance else 3)
    return unet_call_bytes(rows, frames, latent_h, latent_w, dtype, attention)


def streamed_unet_bytes(largest_unit_bytes: int, windows_per_call: int, frames: int, latent_h: int, latent_w: int,
                  dtype, attention: str = "fused", unet_config: dict | None = None) -> int:
    """Block streaming (sonic/engine/offload.py) with low-VRAM rows: one UNet call runs the three guidance rows, each
    block running them in turn while its weights are on the device. The working memory inside a block is one row's
    (the low-VRAM call's); what lives from block to block (`kept_elements`) is there for the other two rows as well;
    and the largest block's weights, twice (the block in use and the next one arriving). `unet_config`: the UNet's
    diffusers config (default: SVD-xt's, configs/svd-xt/unet/config.json)."""
    call = sampling_bytes(windows_per_call, frames, latent_h, latent_w, dtype, sequential_guidance=True,
                          attention=attention)
    kept = kept_elements(latent_h, latent_w, unet_config or svd_unet_config())
    return call + 2 * windows_per_call * frames * kept * dtype_bytes(dtype) + 2 * largest_unit_bytes


def svd_unet_config() -> dict:
    """The released SVD-xt UNet's diffusers config (configs/svd-xt/unet/config.json)."""
    import json
    from pathlib import Path

    return json.loads((Path(__file__).parent / "configs" / "svd-xt" / "unet" / "config.json").read_text())


def kept_elements(latent_h: int, latent_w: int, unet_config: dict) -> int:
    """Elements per frame of one guidance row that a diffusers spatio-temporal UNet's forward keeps across its blocks
    (streaming units) at its worst point, found by walking the architecture of `unet_config`: the skip activations
    still waiting for the up blocks (the input convolution's output, each down resnet's, each downsampler's), the up
    block's input (held by the UNet's loop while the block runs), and the unit's input (an up resnet's is the
    concatenation with its skip) and output. A unit's own working memory is not in it (the one-row call covers it).
    Grids halve rounding up, as the stride-2 convolutions do."""
    channels = list(unet_config["block_out_channels"])
    layers = unet_config["layers_per_block"]
    sizes = [latent_h * latent_w]
    h, w = latent_h, latent_w
    for _ in channels[1:]:
        h, w = -(-h // 2), -(-w // 2)
        sizes.append(h * w)
    skips = [channels[0] * sizes[0]]  # the input convolution's output
    worst = 0
    for i, c in enumerate(channels):  # down blocks: each unit's input and output beside the skips so far
        for _ in range(layers):
            worst = max(worst, sum(skips) + 2 * c * sizes[i])
            skips.append(c * sizes[i])
        if i < len(channels) - 1:
            worst = max(worst, sum(skips) + c * sizes[i] + c * sizes[i + 1])
            skips.append(c * sizes[i + 1])
    hidden = channels[-1] * sizes[-1]
    worst = max(worst, sum(skips) + 2 * hidden)  # the mid block
    for j, c in enumerate(reversed(channels)):  # up blocks: layers + 1 resnets, each taking the last skip
        level = len(channels) - 1 - j
        block_input, current, alive = hidden, hidden, sum(skips)
        for _ in range(layers + 1):
            out = c * sizes[level]
            worst = max(worst, alive + block_input + current + skips[-1] + out)
            skips.pop()
            current = out
        if level > 0:  # the upsampler
            worst = max(worst, alive + block_input + current + c * sizes[level - 1])
            current = c * sizes[level - 1]
        hidden = current
    return worst


def score_block_budget() -> int:
    """Bytes one chunk's score block may take: SONIC_ATTENTION_BLOCK_MB (MiB, a positive number) or 256 MiB."""
    value = os.environ.get(SCORE_BLOCK_ENV, "").strip()
    if not value:
        return DEFAULT_SCORE_BLOCK_BYTES
    try:
        mib = float(value)
    except ValueError:
        mib = 0.0
    if not mib > 0:
        raise ValueError(f"{SCORE_BLOCK_ENV}={value!r} is not a positive number of MiB")
    return int(mib * MiB)


@dataclass(frozen=True)
class ScoreChunks:
    """How one attention call of [batch, heads, queries] x keys is cut: the sizes of one chunk along batch, heads and
    queries (the last chunk along each may be smaller), and the bytes of one score item."""

    batch: int
    heads: int
    queries: int
    keys: int
    item_bytes: int

    @property
    def block_bytes(self) -> int:
        """The largest score block one chunk materialises: [batch, heads, queries, keys]."""
        return self.batch * self.heads * self.queries * self.keys * self.item_bytes


def score_chunks(batch: int, heads: int, queries: int, keys: int, dtype, budget: int) -> ScoreChunks:
    """Chunks as large as `budget` bytes of scores allows: as many whole batch items as fit, else as many whole
    heads of one item, else as many query rows of one head. Raises ValueError where one query row of one head
    (`keys` scores) is already above the budget: that would need the keys cut too (online softmax), which Sonic's
    shapes never need (4,096 keys at 512 px are 8 KiB in fp16)."""
    item = dtype_bytes(dtype)
    row = keys * item
    if row > budget:
        raise ValueError(f"one attention row of {keys} keys ({row} B) is above the score block budget of {budget} B")
    per_head = queries * row
    per_item = heads * per_head
    if per_item <= budget:
        return ScoreChunks(min(batch, budget // per_item), heads, queries, keys, item)
    if per_head <= budget:
        return ScoreChunks(1, budget // per_head, queries, keys, item)
    return ScoreChunks(1, 1, budget // row, keys, item)


def attention_levels(unet_config: dict) -> tuple[tuple[int, int], ...]:
    """(heads, downsampling factor) of the attention levels of a diffusers SVD UNet config (the up blocks mirror
    the down blocks; the mid block attends at the lowest resolution with the last level's heads)."""
    blocks = unet_config["down_block_types"]
    heads = unet_config["num_attention_heads"]
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(blocks)
    levels = [(heads[i], 2**i) for i, kind in enumerate(blocks) if kind.startswith("CrossAttn")]
    return tuple(levels) + ((heads[-1], 2 ** (len(blocks) - 1)),)


def attention_score_shapes(rows: int, frames: int, latent_h: int, latent_w: int,
                           levels=SVD_ATTENTION_LEVELS, audio_tokens: int = AUDIO_TOKENS
                           ) -> Iterator[tuple[int, int, int, int]]:
    """(batch, heads, queries, keys) of every kind of attention call in one UNet call of `rows` guidance rows x
    `frames` frames: spatial self-attention, CLIP (one token) and audio cross-attention per frame, temporal
    self-attention and CLIP cross-attention per pixel, and the temporal audio attention (pixels folded into the
    queries, `attention.py`). Each level's grid is the latent's, halved (rounding up, as the stride-2 convolutions
    do) once per factor of 2."""
    for heads, factor in levels:
        h, w = latent_h, latent_w
        for _ in range(int(math.log2(factor))):
            h, w = -(-h // 2), -(-w // 2)
        n, images = h * w, rows * frames
        yield images, heads, n, n
        yield images, heads, n, 1
        yield images, heads, n, audio_tokens
        yield rows * n, heads, frames, frames
        yield rows * n, heads, frames, 1
        yield rows, heads, n * frames, audio_tokens


def score_working_bytes(dtype) -> int:
    """Bytes alive per attention score while a kernel that materialises them runs: the scores and their softmax
    in fp32 (8 B), and in half precision the result cast back (2 B more): PyTorch's CPU math kernel computes half
    precision in fp32 (measured in tests/engine/test_attention.py: 8.0 B per score in fp32, 8.9 B in bf16), and
    MPS's graph (`sdpa_general_mps`) scales the scores in fp32 before its softmax."""
    return 8 if dtype_bytes(dtype) == 4 else 10


def attention_bytes(rows: int, frames: int, latent_h: int, latent_w: int, dtype, backend: str = "fused",
                    budget: int | None = None, levels=SVD_ATTENTION_LEVELS) -> int:
    """Attention memory on top of the measured UNet coefficients (which include the fused kernels' O(n) work):
    0 for `fused`; for `math` the largest layer's whole score tensor, for `chunked` its largest chunk block (within
    `budget`, default `score_block_budget()`), `score_working_bytes` per score."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    if backend == "fused":
        return 0
    shapes = attention_score_shapes(rows, frames, latent_h, latent_w, levels)
    if backend == "math":
        scores = max(b * h * q * k for b, h, q, k in shapes)
    else:
        budget = score_block_budget() if budget is None else budget
        scores = max(score_chunks(*shape, dtype, budget).block_bytes for shape in shapes) // dtype_bytes(dtype)
    return scores * score_working_bytes(dtype)
