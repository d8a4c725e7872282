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
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F


class AudioConditioning:
    """The audio inputs of one UNet call, shared by every audio cross-attention processor."""

    def __init__(self) -> None:
        self.audio_tokens: torch.Tensor | None = None  # [rows * frames, tokens, dim]
        self.num_frames = 0
        self.face_mask: torch.Tensor | None = None  # [1, 1, H, W]
        self.scale = 1.0
        self._window_mean: torch.Tensor | None = None
        self._masks: dict[int, torch.Tensor] = {}

    @contextmanager
    def bind(
        self,
        audio_tokens: torch.Tensor,
        num_frames: int,
        face_mask: torch.Tensor | None,
        scale: float,
    ) -> Iterator["AudioConditioning"]:
        if audio_tokens.shape[0] % num_frames:
            raise ValueError(f"audio tokens batch {audio_tokens.shape[0]} is not a multiple of {num_frames} frames")
        self.audio_tokens, self.num_frames, self.face_mask, self.scale = audio_tokens, num_frames, face_mask, scale
        try:
            yield self
        finally:
            self.audio_tokens, self.face_mask = None, None
            self._window_mean = None
            self._masks = {}

    @property
    def active(self) -> bool:
        return self.audio_tokens is not None and self.scale != 0

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


def _attend(attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Multi-head SDPA on [b, n, inner] projections; returns [b, n, inner] in the query's dtype."""
    batch, heads = query.shape[0], attn.heads
    head_dim = key.shape[-1] // heads
    q = query.view(batch, -1, heads, head_dim).transpose(1, 2)
    k = key.view(key.shape[0], -1, heads, head_dim).transpose(1, 2)
    v = value.view(value.shape[0], -1, heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)


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
                out = out + cond.scale * audio.reshape(out.shape)
            else:
                tokens = cond.audio_tokens  # [rows * frames, T, D], one per spatial batch item
                audio = _attend(attn, query, self.to_k_ip[0](tokens), self.to_v_ip[0](tokens))
                mask = cond.mask_for_queries(query.shape[1])
                if mask is not None:
                    audio = audio * mask.to(audio.dtype)
                out = out + cond.scale * audio

        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def attach_audio_attention(unet: nn.Module, audio_dim: int) -> AudioConditioning:
    """Give every `attn2` of a diffusers SVD UNet an audio processor; returns their shared conditioning."""
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
    if count == 0:
        raise ValueError("no cross-attention layers found: is this an SVD UNet?")
    return conditioning
