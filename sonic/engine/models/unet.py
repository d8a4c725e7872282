"""Sonic's UNet: diffusers' stock `UNetSpatioTemporalConditionModel` plus the audio attention processors."""

from __future__ import annotations

from typing import Any

import torch

from .attention import AudioConditioning, attach_audio_attention


def build_sonic_unet(config: dict[str, Any], audio_dim: int, device: str | torch.device = "meta"):
    """The Sonic UNet topology from an SVD UNet config; weights are uninitialised on `meta` (load them next).

    `audio_dim` is the width of the audio tokens (audio2token's output; 1024 in the released model).
    """
    from diffusers import UNetSpatioTemporalConditionModel

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device(device):
        unet = UNetSpatioTemporalConditionModel.from_config(config)
    conditioning: AudioConditioning = attach_audio_attention(unet, audio_dim)
    return unet.eval().requires_grad_(False), conditioning
