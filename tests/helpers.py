"""Small helpers shared by the tests."""

from __future__ import annotations

import numpy as np
import torch


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    actual, reference = actual.float(), reference.float()
    return float((actual - reference).abs().max() / reference.abs().max())


def sine(seconds: float, rate: int, channels: int = 1, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([wave * (1 + 0.1 * c) for c in range(channels)], axis=1)
