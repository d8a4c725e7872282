"""Long videos without giant float tensors: uint8 frames in a memory-mapped file, written as they are decoded.

10 minutes at 25 fps and 512x512 is 15,000 frames: 11 GB as uint8 on disk (not in RAM), where a float32 frame
batch would need 47 GB of memory. Readers take it chunk by chunk.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


class FrameStore:
    """Append-only uint8 frames [N, H, W, 3] backed by a file; the file is removed with the store."""

    def __init__(self, height: int, width: int, capacity: int, fps: float, folder: str | os.PathLike | None = None):
        if capacity < 1:
            raise ValueError("a frame store needs room for at least one frame")
        folder = Path(folder or tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"sonic-frames-{uuid.uuid4().hex}.u8"
        self.height, self.width, self.capacity, self.fps = height, width, capacity, float(fps)
        self._data = np.memmap(self.path, dtype=np.uint8, mode="w+", shape=(capacity, height, width, 3))
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"FrameStore({self.count} frames {self.width}x{self.height} @ {self.fps:g} fps, {self.path.name})"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.count, self.height, self.width, 3)

    def append(self, frames: torch.Tensor | np.ndarray) -> None:
        """Add uint8 frames [n, H, W, 3]."""
        frames = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        n = frames.shape[0]
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames must be uint8 [n, {self.height}, {self.width}, 3], got {frames.dtype} {frames.shape}")
        if self.count + n > self.capacity:
            raise ValueError(f"frame store is full ({self.capacity} frames)")
        self._data[self.count : self.count + n] = frames
        self.count += n

    def flush(self) -> None:
        self._data.flush()

    def uint8(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """A read-only view [n, H, W, 3] (memory-mapped; nothing is loaded until touched)."""
        view = self._data[start : self.count if stop is None else min(stop, self.count)]
        view.flags.writeable = False
        return view

    def chunks(self, size: int = 64) -> Iterator[np.ndarray]:
        for start in range(0, self.count, size):
            yield np.array(self.uint8(start, start + size))

    def images(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Float32 [n, H, W, 3] in [0, 1] (ComfyUI's IMAGE) for a range of frames."""
        return torch.from_numpy(np.array(self.uint8(start, stop))).float().div_(255)

    def close(self) -> None:
        data, self._data = getattr(self, "_data", None), None
        if data is not None:
            del data
        Path(self.path).unlink(missing_ok=True)

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass
