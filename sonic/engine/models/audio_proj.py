"""Sonic's two audio MLPs (spec §1.4, §1.5).

Both are built from the shapes of their checkpoints, so the same code loads the real files
(whisper width 384, token width 1024) and the tiny reference ones (64 / 64).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# Window sizes are part of the algorithm, not of the checkpoint (spec §3.5):
TOKEN_WINDOW = 10  # whisper frames per token window (0.2 s)
TOKEN_STATES = 5  # stacked whisper hidden states
BUCKET_WINDOW = 50  # whisper frames per bucket window (~1 s)


class AudioToTokens(nn.Module):
    """audio2token: a [B, f, 10, 5, C] whisper window -> [B, f, tokens, D] audio context tokens."""

    def __init__(self, in_features: int, hidden: int, num_tokens: int, token_dim: int):
        super().__init__()
        self.num_tokens, self.token_dim = num_tokens, token_dim
        self.proj1 = nn.Linear(in_features, hidden)
        self.proj2 = nn.Linear(hidden, hidden)
        self.proj3 = nn.Linear(hidden, num_tokens * token_dim)
        self.norm = nn.LayerNorm(token_dim)

    @classmethod
    def from_state_dict_shapes(cls, state_dict: dict[str, torch.Tensor]) -> "AudioToTokens":
        in_features = state_dict["proj1.weight"].shape[1]
        hidden = state_dict["proj1.weight"].shape[0]
        token_dim = state_dict["norm.weight"].shape[0]
        num_tokens = state_dict["proj3.weight"].shape[0] // token_dim
        return cls(in_features, hidden, num_tokens, token_dim)

    @property
    def audio_channels(self) -> int:
        return self.proj1.in_features // (TOKEN_WINDOW * TOKEN_STATES)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        batch, frames = windows.shape[:2]
        x = windows.reshape(batch * frames, -1)  # window-major, then state, then channel
        x = F.relu(self.proj1(x))
        x = F.relu(self.proj2(x))
        x = self.proj3(x).reshape(batch * frames, self.num_tokens, self.token_dim)
        return self.norm(x).reshape(batch, frames, self.num_tokens, self.token_dim)


class AudioToBucket(nn.Module):
    """audio2bucket: a [B, f, 50, 1, C] last-state window + CLIP embedding -> [B, f, 2, 1] raw buckets."""

    def __init__(self, in_features: int, hidden: int, num_outputs: int):
        super().__init__()
        self.proj1 = nn.Linear(in_features, hidden)
        self.proj2 = nn.Linear(hidden, hidden)
        self.proj3 = nn.Linear(hidden, num_outputs)

    @classmethod
    def from_state_dict_shapes(cls, state_dict: dict[str, torch.Tensor]) -> "AudioToBucket":
        hidden, in_features = state_dict["proj1.weight"].shape
        return cls(in_features, hidden, state_dict["proj3.weight"].shape[0])

    def forward(self, windows: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """windows [B, f, 50, 1, C]; image_embeds [B, clip_dim] (one per batch row)."""
        batch, frames = windows.shape[:2]
        audio = windows.reshape(batch * frames, -1)
        clip = image_embeds.to(audio.dtype).repeat_interleave(frames, dim=0)
        x = torch.cat([audio, clip], dim=-1)
        x = F.silu(self.proj1(x))
        x = F.silu(self.proj2(x))
        return self.proj3(x).reshape(batch, frames, -1, 1)
