"""The image-side networks behind the small interface the pipeline uses.

The pipeline needs three things from SVD's parts: the VAE latent mean of the reference image, a temporal decode
of latent chunks, and the CLIP image embedding. Wrapping them here lets other implementations of the same
weights stand in (the ComfyUI nodes plug in ComfyUI's own `VAE` and `CLIP_VISION` this way).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..inputs.image import normalize_clip


class VAE(Protocol):
    """What the pipeline asks of SVD's VAE (this module's `DiffusersVAE`, the nodes' `ComfyVAE`)."""

    scaling_factor: float  # latents are multiplied by it before sampling (SVD: 0.18215)
    dtype: torch.dtype  # what it computes in (its working memory scales with it; ComfyUI's may differ from the UNet's)

    def encode_mean(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> unscaled latent mean [B, 4, H/8, W/8]."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [n, 4, h, w], one temporal chunk -> [n, 3, H, W] float32 in [0, 1]."""


class ImageEncoder(Protocol):
    """What the pipeline asks of the CLIP image encoder (`TransformersImageEncoder`, the nodes' `ComfyImageEncoder`)."""

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, 224, 224] in [0, 1] (already squashed to 224) -> the projected embedding [B, D]."""


class DiffusersVAE:
    """SVD's `AutoencoderKLTemporalDecoder` (diffusers), run in its own dtype (no fp32 upcast, as official)."""

    def __init__(self, model):
        self.model = model

    @property
    def scaling_factor(self) -> float:
        return float(self.model.config.scaling_factor)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.no_grad()
    def encode_mean(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> unscaled latent mean [B, 4, H/8, W/8] (on the VAE's device)."""
        return self.model.encode(image.to(self.model.device, self.model.dtype)).latent_dist.mean

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [n, 4, h, w], decoded as one temporal chunk -> [n, 3, H, W] float32 in [0, 1]."""
        latents = latents.to(self.model.device, self.model.dtype)
        frames = self.model.decode(latents, num_frames=latents.shape[0]).sample
        return (frames.float() * 0.5 + 0.5).clamp(0, 1)


class TransformersImageEncoder:
    """`CLIPVisionModelWithProjection` (transformers): the un-normalised projected `image_embeds`."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, 224, 224] in [0, 1] -> [B, D]."""
        pixels = normalize_clip(image).to(self.model.device, self.model.dtype)
        return self.model(pixel_values=pixels).image_embeds
