"""Long videos without giant float tensors: uint8 frames in a file on disk, written as they are decoded.

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


MAX_IMAGE_BATCH_BYTES = 4 * 2**30  # output "auto": above this a float32 frame batch becomes a frames file
OUTPUT_MODES = ("auto", "images", "frames file")


def as_image_batch(output: str, count: int, height: int, width: int) -> bool:
    """Whether a video of `count` frames is handed on as a float32 frame batch ('images') or left in its frames
    file with one preview frame ('frames file'); 'auto' keeps batches up to 4 GB."""
    if output not in OUTPUT_MODES:
        raise ValueError(f"output {output!r} is not one of {', '.join(OUTPUT_MODES)}")
    return output == "images" or (output == "auto" and count * height * width * 3 * 4 <= MAX_IMAGE_BATCH_BYTES)


class FrameStore:
    """Append-only uint8 frames [N, H, W, 3] in a file (plain writes and positioned reads: no mapping, so the
    process's memory does not grow with the video). The file is removed with the store."""

    def __init__(self, height: int, width: int, capacity: int, fps: float, folder: str | os.PathLike | None = None):
        if capacity < 1:
            raise ValueError("a frame store needs room for at least one frame")
        folder = Path(folder or tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"sonic-frames-{uuid.uuid4().hex}.u8"
        self.height, self.width, self.capacity, self.fps = height, width, capacity, float(fps)
        self.frame_bytes = height * width * 3
        self._file = open(self.path, "w+b")
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
        self._file.seek(self.count * self.frame_bytes)
        self._file.write(np.ascontiguousarray(frames).tobytes())
        self.count += n

    def flush(self) -> None:
        self._file.flush()

    def uint8(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames [start, stop) as a uint8 array [n, H, W, 3] read from the file."""
        stop = self.count if stop is None else min(stop, self.count)
        n = max(stop - start, 0)
        self._file.flush()
        data = os.pread(self._file.fileno(), n * self.frame_bytes, start * self.frame_bytes)
        return np.frombuffer(data, np.uint8).reshape(n, self.height, self.width, 3)

    def chunks(self, size: int = 64) -> Iterator[np.ndarray]:
        for start in range(0, self.count, size):
            yield self.uint8(start, start + size)

    def images(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Float32 [n, H, W, 3] in [0, 1] (ComfyUI's IMAGE) for a range of frames."""
        return torch.from_numpy(self.uint8(start, stop).copy()).float().div_(255)

    def close(self) -> None:
        handle, self._file = getattr(self, "_file", None), None
        if handle is not None:
            handle.close()
            Path(self.path).unlink(missing_ok=True)

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass
