"""Attention per device (sonic/engine/models/attention.py, issue #19): one fused SDPA call where the device has a
fused kernel (CUDA, CPU), query chunks under a byte budget where it has none (MPS). The chunked path is forced on
the CPU here (`chunked_attention`) and compared with plain SDPA; the score blocks it creates are measured by counting
what every kernel call receives."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from sonic.engine import memory
from sonic.engine.models import attention


class BlockCounter:
    """Calls the real SDPA and records the score block each call materialises at most: [b, h, queries, keys]."""

    def __init__(self) -> None:
        self.blocks: list[int] = []
        self.real = attention._sdpa

    def __call__(self, q, k, v, **kwargs):
        self.blocks.append(math.prod(q.shape[:-1]) * k.shape[-2] * q.element_size())
        return self.real(q, k, v, **kwargs)


@pytest.fixture
def counter(monkeypatch) -> BlockCounter:
    spy = BlockCounter()
    monkeypatch.setattr(attention, "_sdpa", spy)
    return spy


# (batch, heads, queries, keys, head_dim) of the kinds of attention call the UNet makes, at a small latent grid
# (16 x 16, 25 frames, 1 guidance row; 5 heads of 64 as the SVD UNet's first level)
UNET_SHAPES = {
    "spatial self-attention": (25, 5, 256, 256, 64),
    "spatial CLIP cross-attention": (25, 5, 256, 1, 64),
    "spatial audio cross-attention": (25, 5, 256, 32, 64),
    "temporal self-attention": (256, 5, 25, 25, 64),
    "temporal audio (pixels folded into queries)": (1, 5, 256 * 25, 32, 64),
}


@pytest.mark.parametrize("kind", list(UNET_SHAPES))
@pytest.mark.parametrize("budget", [64 * 1024, 2 * 1024 * 1024])
def test_chunked_attention_computes_what_plain_sdpa_does(counter, kind, budget):
    """The forced chunked path against one plain SDPA call: the same numbers (fp32, within 1e-6), in several
    kernel calls whose score blocks all stay within the budget (64 KiB cuts query rows of one head; 2 MiB whole
    heads or batch items)."""
    batch, heads, queries, keys, dim = UNET_SHAPES[kind]
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, queries, heads, dim, generator=generator).transpose(1, 2)  # strided as in `_attend`
    k = torch.randn(batch, keys, heads, dim, generator=generator).transpose(1, 2)
    v = torch.randn(batch, keys, heads, dim, generator=generator).transpose(1, 2)
    plain = F.scaled_dot_product_attention(q, k, v)
    with attention.chunked_attention(budget):
        assert attention.attention_backend("cpu") == "chunked"
        chunked = attention.multihead_attention(q, k, v)
    assert attention.attention_backend("cpu") == "fused"  # the context restores the device's own choice
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    whole = batch * heads * queries * keys * 4
    assert max(counter.blocks) <= budget
    if whole > budget:
        assert len(counter.blocks) >= math.ceil(whole / budget)  # it did cut
    else:
        assert counter.blocks == [whole]


def test_score_chunks_at_512px_stay_under_the_mps_array_limit():
    """The issue's case: the batched call at 512 px (3 rows x 25 frames, 64 x 64 latents) in fp16. The first
    level's self-attention scores are [75, 5, 4096, 4096] = 12.6 GB whole (above 2**32 bytes); the default budget
    (256 MiB) cuts them into 75 calls of one frame (168 MB each)."""
    whole = 75 * 5 * 4096 * 4096 * 2
    assert whole == 12_582_912_000 > 2**32
    plan = memory.score_chunks(75, 5, 4096, 4096, torch.float16, memory.DEFAULT_SCORE_BLOCK_BYTES)
    assert (plan.batch, plan.heads, plan.queries) == (1, 5, 4096)
    assert plan.block_bytes == 5 * 4096 * 4096 * 2 == 167_772_160 <= 256 * 2**20 < 2**32
    assert 2 * 167_772_160 > 256 * 2**20  # (two frames would not fit)
    # a 1 GiB budget: 6 frames per call, 13 calls
    plan = memory.score_chunks(75, 5, 4096, 4096, torch.float16, 2**30)
    assert (plan.batch, plan.heads, plan.queries, math.ceil(75 / plan.batch)) == (6, 5, 4096, 13)
    # a small budget cuts heads, then query rows
    assert memory.score_chunks(75, 5, 4096, 4096, "fp16", 20 * 2**20) == memory.ScoreChunks(1, 1, 2560, 4096, 2)
    assert memory.score_chunks(75, 5, 4096, 4096, "fp16", 100 * 2**20) == memory.ScoreChunks(1, 3, 4096, 4096, 2)
    with pytest.raises(ValueError, match="4096 keys"):
        memory.score_chunks(1, 1, 10, 4096, "fp32", 1000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_memory_estimates_cover_what_a_materialising_kernel_allocates(dtype):
    """PyTorch's math kernel (forced on the CPU) materialises the scores as MPS's does: every tensor one call
    creates is counted (LiveTensorBytes). Unchunked, beyond the output, it allocates what memory.py estimates for
    the `math` backend within 15% and never more (measured: 8.0 B per score in fp32, 8.9 B in bf16, against 8 and
    10); chunked with a 1 MiB budget, at most the `chunked` estimate - a 40th of it - beside one chunk's own
    output (the kernel's result, copied into the whole output; queries x head_dim, 1/64 of the scores here)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from helpers import LiveTensorBytes

    batch, heads, queries, dim = 4, 5, 1024, 64
    q, k, v = (torch.randn(batch, queries, heads, dim, dtype=dtype).transpose(1, 2) for _ in range(3))
    output = batch * heads * queries * dim * q.element_size()
    shapes = [(batch, heads, queries, queries)]

    def measured(budget=None):
        tracker = LiveTensorBytes()
        with sdpa_kernel(SDPBackend.MATH), tracker:
            tracker.mark()
            if budget is None:
                attention.multihead_attention(q, k, v)
            else:
                with attention.chunked_attention(budget):
                    attention.multihead_attention(q, k, v)
        return tracker.peak - tracker.at_mark - output

    scores = batch * heads * queries * queries
    math_estimate = scores * memory.score_working_bytes(dtype)
    assert 0.85 * math_estimate <= measured() <= math_estimate
    budget = 2**20
    plan = memory.score_chunks(*shapes[0], dtype, budget)
    chunked_estimate = plan.block_bytes // q.element_size() * memory.score_working_bytes(dtype)
    chunk_output = plan.batch * plan.heads * plan.queries * dim * q.element_size()
    assert measured(budget) - chunk_output <= chunked_estimate <= math_estimate / 40


def test_the_block_budget_is_configurable(monkeypatch):
    monkeypatch.delenv(memory.SCORE_BLOCK_ENV, raising=False)
    assert memory.score_block_budget() == 256 * 2**20
    monkeypatch.setenv(memory.SCORE_BLOCK_ENV, "256")
    assert memory.score_block_budget() == 256 * 2**20
    with attention.chunked_attention():
        assert attention._forced_budget == 256 * 2**20
    for bad in ("0", "-3", "lots"):
        monkeypatch.setenv(memory.SCORE_BLOCK_ENV, bad)
        with pytest.raises(ValueError, match=memory.SCORE_BLOCK_ENV):
            memory.score_block_budget()


def test_fused_devices_and_the_kernel_the_cpu_runs():
    """CUDA and the CPU keep one SDPA call, MPS (and devices Sonic knows nothing of) chunk. The CPU's claim is
    checked: the profiler shows PyTorch's flash kernel for the CPU in fp32, bf16 and fp16, not the math path."""
    from torch.profiler import ProfilerActivity, profile

    assert [attention.attention_backend(d) for d in ("cuda", "cuda:1", "cpu", "mps", "xpu")] == [
        "fused", "fused", "fused", "chunked", "chunked"]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q = torch.randn(2, 5, 256, 64, dtype=dtype)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            attention.multihead_attention(q, q, q)
        names = {event.name for event in prof.events()}
        assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names, (dtype, names)
        assert "aten::_softmax" not in names and "aten::softmax" not in names


def test_self_attention_processor_matches_diffusers_sdpa_processor():
    """`SelfAttention` (every attn1) gives what diffusers' stock SDPA processor gives, plain and chunked."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    layer = Attention(query_dim=64, heads=4, dim_head=16).eval()
    hidden = torch.randn(3, 100, 64)
    with torch.no_grad():
        layer.set_processor(AttnProcessor2_0())
        stock = layer(hidden)
        layer.set_processor(attention.SelfAttention())
        ours = layer(hidden)
        with attention.chunked_attention(4 * 1024):
            chunked = layer(hidden)
    torch.testing.assert_close(ours, stock, rtol=0, atol=0)
    torch.testing.assert_close(chunked, stock, rtol=1e-6, atol=1e-6)


def test_every_attention_layer_of_the_unet_goes_through_sonic(tiny_models):
    from diffusers.models.attention_processor import Attention

    processors = {name: type(module.processor).__name__ for name, module in tiny_models.unet.named_modules()
                  if isinstance(module, Attention)}
    assert processors and all(p == ("AudioCrossAttention" if n.endswith("attn2") else "SelfAttention")
                              for n, p in processors.items()), processors


def _unet_call(models, expected, rows: int):
    sample = expected["unet_call0.sample"]
    all_rows, frames = sample.shape[:2]
    tokens = expected["unet_call0.audio_tokens"].unflatten(0, (all_rows, frames))[:rows].flatten(0, 1)
    clip = expected["unet_call0.image_embeds"].reshape(all_rows, frames, -1)[:rows, :1]
    with torch.no_grad(), models.audio_conditioning.bind(tokens, frames, expected["unet_call0.face_mask"], 1.0):
        return models.unet(sample[:rows], expected["unet_call0.timestep"], encoder_hidden_states=clip,
                           added_time_ids=expected["unet_call0.added_time_ids"][:rows], return_dict=False)[0]


def test_a_chunked_unet_call_equals_the_fused_one_and_keeps_its_blocks_in_budget(tiny_models, expected, counter,
                                                                                 monkeypatch):
    """The tiny UNet (2 guidance rows, 25 frames, 32 x 16 latents), first with the CPU's fused kernel, then with
    its attention forced into 1 MiB blocks: the same output (within 1e-5), every kernel call's score block within
    the budget, though its largest attention (spatial self-attention: 50 x 2 heads x 512 x 512 in fp32 = 105 MB)
    is 100 times that. The calls' shapes, as (batch, heads, queries, keys), are exactly the kinds memory.py plans
    with for the UNet's config, and memory.py's chunked estimate is the largest block counted, at 8 bytes per fp32
    score (scores and softmax)."""
    budget = 2**20
    shapes = []
    real = counter.real

    def record(q, k, v, **kwargs):
        shapes.append((*q.shape[:3], k.shape[2]))
        return counter(q, k, v, **kwargs)

    monkeypatch.setattr(attention, "_sdpa", record)
    fused = _unet_call(tiny_models, expected, rows=2)
    levels = memory.attention_levels(tiny_models.unet.config)
    assert levels == ((2, 1), (4, 2), (4, 4), (4, 8))
    assert set(shapes) == set(memory.attention_score_shapes(2, 25, 32, 16, levels, audio_tokens=32))
    calls, whole = len(counter.blocks), max(counter.blocks)
    assert whole == 50 * 2 * 512 * 512 * 4
    assert memory.attention_bytes(2, 25, 32, 16, torch.float32, "math", levels=levels) == whole // 4 * 8

    counter.blocks.clear()
    monkeypatch.setattr(attention, "_sdpa", counter)
    with attention.chunked_attention(budget):
        chunked = _unet_call(tiny_models, expected, rows=2)
    torch.testing.assert_close(chunked, fused, rtol=1e-5, atol=1e-5)
    assert max(counter.blocks) <= budget < whole
    assert len(counter.blocks) > calls
    estimate = memory.attention_bytes(2, 25, 32, 16, torch.float32, "chunked", budget, levels=levels)
    assert estimate == max(counter.blocks) // 4 * 8
    assert real is F.scaled_dot_product_attention
