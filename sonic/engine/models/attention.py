"""Sonic's audio cross-attention, as attention processors for diffusers' stock SVD UNet (spec §2).

What Sonic changed in the UNet is confined to the 32 cross-attention (`attn2`) layers:

* every `attn2` - spatial and temporal - gets two bias-free projections `to_k_ip.0` / `to_v_ip.0`
  (audio token width -> layer width). They are children of the processor, so their state-dict names are
  `<block>.attn2.processor.to_k_ip.0.weight`, exactly as in the official `unet.pth`;
* spatial layers add `scale * face_mask * Attention(q, audio_tokens_of_this_frame)` to the CLIP attention;
* temporal layers add `scale * Attention(q, mean of the window's audio tokens)`, unmasked.

The per-call inputs (audio tokens, face mask, scale) do not travel through the UNet's forward signature:
the sampler puts them into one `AudioConditioning` object shared by all processors, for the duration of a
UNet call (`with conditioning.bind(...)`).

For the temporal context the UNet is given a per-row constant CLIP context, so diffusers' stock
"first frame" temporal context equals Sonic's window mean for CLIP; only the audio mean is computed here.

Every other attention layer (`attn1`, spatial and temporal self-attention) gets `SelfAttention`, diffusers' SDPA
processor's computation for the SVD layout, so that all attention goes through `multihead_attention`: PyTorch's
SDPA where the device has a fused kernel, query chunks under a byte budget where it has none (issue #19).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from .. import memory


class AudioConditioning:
    """The audio inputs of one UNet call, shared by every audio cross-attention processor."""

    def __init__(self) -> None:
        self.audio_tokens: torch.Tensor | None = None  # [rows * frames, tokens, dim]
        self.num_frames = 0
        self.face_mask: torch.Tensor | None = None  # [1, 1, H, W]
        self.scale: float | torch.Tensor = 1.0  # what the processors multiply by (see `bind`)
        self.scale_nonzero = True
        self._window_mean: torch.Tensor | None = None
        self._masks: dict[int, torch.Tensor] = {}

    @contextmanager
    def bind(
        self,
        audio_tokens: torch.Tensor,
        num_frames: int,
        face_mask: torch.Tensor | None,
        scale: float,
        scale_tensor: torch.Tensor | None = None,
    ) -> Iterator["AudioConditioning"]:
        """`scale_tensor`: the same value as a 0-dim float32 tensor, read by the processors instead of the float,
        so that a compiled UNet takes it as an input, not as a constant it would compile again for; it multiplies
        in float32 as the float does (`scaled`: the same numbers). Whether the audio attention runs at all
        (`scale` != 0) stays a plain bool."""
        if audio_tokens.shape[0] % num_frames:
            raise ValueError(f"audio tokens batch {audio_tokens.shape[0]} is not a multiple of {num_frames} frames")
        self.audio_tokens, self.num_frames, self.face_mask = audio_tokens, num_frames, face_mask
        self.scale = scale if scale_tensor is None else scale_tensor
        self.scale_nonzero = scale != 0
        try:
            yield self
        finally:
            self.audio_tokens, self.face_mask = None, None
            self._window_mean = None
            self._masks = {}

    @property
    def active(self) -> bool:
        return self.audio_tokens is not None and self.scale_nonzero

    def scaled(self, audio: torch.Tensor) -> torch.Tensor:
        """scale * audio, computed in float32 (opmath) and returned in audio's dtype, for a float or a tensor scale
        alike (a 0-dim tensor alone would be rounded to audio's dtype first)."""
        if isinstance(self.scale, torch.Tensor):
            return (audio.float() * self.scale).to(audio.dtype)
        return self.scale * audio

    def window_mean_tokens(self) -> torch.Tensor:
        """[rows, tokens, dim]: each batch row's audio tokens averaged over the window's frames."""
        if self._window_mean is None:
            tokens = self.audio_tokens
            rows = tokens.shape[0] // self.num_frames
            self._window_mean = tokens.reshape(rows, self.num_frames, *tokens.shape[1:]).mean(dim=1)
        return self._window_mean

    def mask_for_queries(self, num_queries: int) -> torch.Tensor | None:
        """The face mask resized to one UNet level's token grid, as [1, num_queries, 1]."""
        if self.face_mask is None:
            return None
        if num_queries not in self._masks:
            self._masks[num_queries] = downsample_mask(self.face_mask, num_queries)
        return self._masks[num_queries]


def downsample_mask(mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Resize a [1, 1, H, W] mask to the token grid of `num_queries` tokens (spec §2.3, diffusers' rule)."""
    height, width = mask.shape[-2:]
    ratio = width / height
    mask_h = int(math.sqrt(num_queries / ratio))
    mask_h += int(num_queries % mask_h != 0)
    mask_w = num_queries // mask_h
    resized = F.interpolate(mask, size=(mask_h, mask_w), mode="bicubic").flatten(1)
    area = mask_h * mask_w
    if area != num_queries:
        warnings.warn(
            f"face mask grid {mask_h}x{mask_w} does not match {num_queries} attention tokens; padding/truncating",
            stacklevel=2,
        )
        resized = F.pad(resized, (0, num_queries - area)) if area < num_queries else resized[:, :num_queries]
    return resized[..., None]


# Which attention kernel each device has, read from PyTorch's source (2.x; this was checked against 2.14):
#
# * CUDA: SDPA chooses flash (fp16/bf16), memory-efficient (fp32 too) or cuDNN attention - online softmax, no
#   score tensor: "fused".
# * CPU: SDPA runs `aten::_scaled_dot_product_flash_attention_for_cpu` for fp32, bf16 and fp16 alike (seen with the
#   profiler in tests/engine/test_attention.py): "fused".
# * MPS: SDPA runs `aten::_scaled_dot_product_attention_math_for_mps`. Its Metal vector kernels
#   (ATen/native/mps/kernels/DecodeAttention.h; aten/src/ATen/native/mps/operations/Attention.mm chooses them) serve
#   at most 8 queries - decoding, never a UNet's thousands; everything else goes to `sdpa_general_mps`, an MPSGraph
#   of matmul -> softmax -> matmul that also returns the [batch, heads, queries, keys] weights as its second output
#   (torch/_meta_registrations.py, meta__scaled_dot_product_attention_math_for_mps): the whole score tensor exists,
#   [75, 5, 4096, 4096] = 12.6 GB in fp16 for the batched call at 512 px, above MPS's 2**32-byte limit per array
#   (and the graph scales half-precision scores in fp32, a copy twice that size; the default block is 256 MiB).
#   Recent wheels also carry a flash prefill Metal kernel (kernels/PrefillAttention.h, MppAttention.h), but the
#   rules that pick it are not in the wheel and older PyTorch lacks it, so Sonic chunks on MPS whatever the
#   version: "chunked" (with a flash kernel underneath, chunking costs a few more kernel launches).
# * anything else: "chunked" (correct everywhere, and bounded).
FUSED_DEVICE_TYPES = ("cuda", "cpu")

_forced_budget: int | None = None  # set by `chunked_attention`: chunk on every device, with this budget
_sdpa = F.scaled_dot_product_attention  # every attention kernel call goes through here (tests count the blocks)


def attention_backend(device: str | torch.device) -> str:
    """"fused" or "chunked": how Sonic's attention runs on `device` (the names of `memory.attention_bytes`)."""
    if _forced_budget is None and torch.device(device).type in FUSED_DEVICE_TYPES:
        return "fused"
    return "chunked"


@contextmanager
def chunked_attention(budget_bytes: int | None = None) -> Iterator[None]:
    """Chunk attention on every device (with `budget_bytes` per score block, else `memory.score_block_budget()`),
    for as long as the context lasts: for tests and measurements."""
    global _forced_budget
    before = _forced_budget
    _forced_budget = memory.score_block_budget() if budget_bytes is None else budget_bytes
    try:
        yield
    finally:
        _forced_budget = before


def score_plan(query: torch.Tensor, key: torch.Tensor) -> memory.ScoreChunks:
    """How `multihead_attention` cuts the [b, h, n, d] query against these keys on the chunked path."""
    budget = memory.score_block_budget() if _forced_budget is None else _forced_budget
    return memory.score_chunks(*query.shape[:3], key.shape[2], query.dtype, budget)


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA of [b, h, n, d] tensors (keys and values with the same b and h): in one call where the device has a
    fused kernel; else in chunks of whole batch items, whole heads or query rows whose score block stays within the
    budget. Each query row's softmax is over all keys in either case, so the chunks compute the same numbers."""
    if attention_backend(q.device) == "fused":
        return _sdpa(q, k, v, dropout_p=0.0, is_causal=False)
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"keys {tuple(k.shape)} / values {tuple(v.shape)} do not match the queries {tuple(q.shape)}")
    plan = score_plan(q, k)
    batch, heads, queries = q.shape[:3]
    if (plan.batch, plan.heads, plan.queries) == (batch, heads, queries):
        return _sdpa(q, k, v, dropout_p=0.0, is_causal=False)
    out = q.new_empty(batch, heads, queries, v.shape[-1])
    for b in range(0, batch, plan.batch):
        for h in range(0, heads, plan.heads):
            items = (slice(b, b + plan.batch), slice(h, h + plan.heads))
            for n in range(0, queries, plan.queries):
                rows = (*items, slice(n, n + plan.queries))
                out[rows] = _sdpa(q[rows], k[items], v[items], dropout_p=0.0, is_causal=False)
    return out


def _attend(attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Multi-head attention on [b, n, inner] projections; returns [b, n, inner] in the query's dtype."""
    batch, heads = query.shape[0], attn.heads
    head_dim = key.shape[-1] // heads
    q = query.view(batch, -1, heads, head_dim).transpose(1, 2)
    k = key.view(key.shape[0], -1, heads, head_dim).transpose(1, 2)
    v = value.view(value.shape[0], -1, heads, head_dim).transpose(1, 2)
    out = multihead_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)


class SelfAttention:
    """Processor for one `attn1` of the SVD UNet: diffusers' `AttnProcessor2_0` for its layout (3-D hidden states,
    no mask, no norms, no residual inside), through `multihead_attention`."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if hidden_states.ndim != 3 or attention_mask is not None:
            raise ValueError("SelfAttention expects [batch, tokens, channels] hidden states and no attention mask")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out = _attend(attn, attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context))
        return attn.to_out[1](attn.to_out[0](out))


class AudioCrossAttention(nn.Module):
    """Processor for one `attn2`: CLIP cross-attention plus Sonic's decoupled audio cross-attention."""

    def __init__(self, hidden_size: int, audio_dim: int, conditioning: AudioConditioning, temporal: bool):
        super().__init__()
        self.to_k_ip = nn.ModuleList([nn.Linear(audio_dim, hidden_size, bias=False)])
        self.to_v_ip = nn.ModuleList([nn.Linear(audio_dim, hidden_size, bias=False)])
        self.temporal = temporal
        # A plain attribute (not a submodule): shared, stateless as far as state_dict is concerned.
        self.__dict__["conditioning"] = conditioning

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out = _attend(attn, query, attn.to_k(context), attn.to_v(context))

        cond = self.conditioning
        if cond.active:
            if self.temporal:
                tokens = cond.window_mean_tokens()  # [rows, T, D]
                # Every pixel of a row shares that row's mean context: fold pixels into the query axis
                # instead of repeating the context h*w times (same result, no [rows*h*w, T, D] tensor).
                rows_query = query.reshape(tokens.shape[0], -1, query.shape[-1])
                audio = _attend(attn, rows_query, self.to_k_ip[0](tokens), self.to_v_ip[0](tokens))
                out = out + cond.scaled(audio.reshape(out.shape))
            else:
                tokens = cond.audio_tokens  # [rows * frames, T, D], one per spatial batch item
                audio = _attend(attn, query, self.to_k_ip[0](tokens), self.to_v_ip[0](tokens))
                mask = cond.mask_for_queries(query.shape[1])
                if mask is not None:
                    audio = audio * mask.to(audio.dtype)
                out = out + cond.scaled(audio)

        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def attach_audio_attention(unet: nn.Module, audio_dim: int) -> AudioConditioning:
    """Give every `attn2` of a diffusers SVD UNet an audio processor and every other attention layer `SelfAttention`
    (both attend through `multihead_attention`); returns the audio processors' shared conditioning."""
    from diffusers.models.attention_processor import Attention

    conditioning = AudioConditioning()
    count = 0
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.endswith("attn2"):
            if module.spatial_norm is not None or module.group_norm is not None or module.norm_cross:
                raise ValueError(f"unexpected attention layout at {name}: not an SVD UNet")
            weight = module.to_k.weight
            processor = AudioCrossAttention(
                hidden_size=module.to_k.out_features,
                audio_dim=audio_dim,
                conditioning=conditioning,
                temporal=".temporal_transformer_blocks." in name,
            ).to(device=weight.device, dtype=weight.dtype)
            module.set_processor(processor)
            count += 1
        elif isinstance(module, Attention):
            if (module.spatial_norm is not None or module.group_norm is not None or module.norm_cross
                    or module.norm_q is not None or module.norm_k is not None or module.residual_connection
                    or module.rescale_output_factor != 1.0):
                raise ValueError(f"unexpected attention layout at {name}: not an SVD UNet")
            module.set_processor(SelfAttention())
    if count == 0:
        raise ValueError("no cross-attention layers found: is this an SVD UNet?")
    return conditioning
