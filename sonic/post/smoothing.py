"""Motion smoothing without delay: remove frame-to-frame jitter by moving frames, not by blending them.

1. Estimate each frame's global translation relative to the first frame (phase correlation) on a region: the
   whole frame, the face box, or the face box without its mouth (so speaking does not read as head motion).
   This is the camera/head trajectory.
2. Smooth the trajectory with an EMA run forwards and then backwards: the combined filter is symmetric, so it
   has zero phase - a one-sided EMA would shift motion late by (1 - alpha) / alpha frames and break lip-sync.
3. Shift every frame rigidly (sub-pixel, reflected borders) by smoothed - raw. Pixels are moved, never mixed,
   so the mouth cannot ghost.

Both passes work chunk by chunk (only the first frame and two numbers per frame are kept), so a frames file
of any length can be smoothed.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

REGIONS = ("frame", "face", "face without mouth")


def _gray(frame: np.ndarray) -> np.ndarray:
    return frame.astype(np.float32).mean(axis=2)


def region_weights(height: int, width: int, region: str, face_box=None) -> np.ndarray:
    """[H, W] float32 weights (a Hann window over the region) for phase correlation."""
    import cv2

    if region not in REGIONS:
        raise ValueError(f"region {region!r} is not one of {', '.join(REGIONS)}")
    weights = np.zeros((height, width), np.float32)
    if region == "frame" or face_box is None:
        if region != "frame":
            raise ValueError(f"region {region!r} needs a face box (x, y, w, h)")
        return cv2.createHanningWindow((width, height), cv2.CV_32F)
    x, y, w, h = (int(round(v)) for v in face_box)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    if x1 - x0 < 8 or y1 - y0 < 8:
        raise ValueError(f"face box {face_box} is too small or outside the {width}x{height} frames")
    weights[y0:y1, x0:x1] = cv2.createHanningWindow((x1 - x0, y1 - y0), cv2.CV_32F)
    if region == "face without mouth":
        weights[y0 + (y1 - y0) * 3 // 5 : y1, x0:x1] = 0  # lower two fifths of the face: mouth and jaw
    return weights


def estimate_trajectory(chunks: Iterable[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """[N, 2] (dx, dy) of every frame relative to the first, from uint8 [n, H, W, 3] chunks.

    Each frame is registered against the first one (a talking head stays close to its portrait), not against
    its predecessor: chained frame-to-frame estimates accumulate their errors into a drift."""
    import cv2

    reference, positions = None, []
    for chunk in chunks:
        for frame in chunk:
            gray = _gray(frame) * weights
            if reference is None:
                reference = gray
                positions.append((0.0, 0.0))
            else:
                (dx, dy), _ = cv2.phaseCorrelate(reference, gray)
                positions.append((dx, dy))
    return np.asarray(positions, np.float64).reshape(-1, 2)


def zero_phase_ema(values: np.ndarray, alpha: float) -> np.ndarray:
    """EMA forwards then backwards along axis 0 (alpha = weight of the new sample; 1 = no smoothing).

    Both ends are extended by odd reflection (as scipy's filtfilt does) so that neither end starts from a
    lagging state: the result has no delay anywhere, edges included."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    n = len(values)
    pad = min(n - 1, int(np.ceil(6 / alpha)))
    if pad > 0:
        head = 2 * values[0] - values[pad:0:-1]
        tail = 2 * values[-1] - values[-2 : -pad - 2 : -1]
        values = np.concatenate([head, values, tail])
    forward = np.empty_like(values)
    state = values[0]
    for i, v in enumerate(values):
        state = alpha * v + (1 - alpha) * state
        forward[i] = state
    out = np.empty_like(values)
    state = forward[-1]
    for i in range(len(values) - 1, -1, -1):
        state = alpha * forward[i] + (1 - alpha) * state
        out[i] = state
    return out[pad : pad + n]


def shift_frames(chunks: Iterable[np.ndarray], shifts: np.ndarray) -> Iterator[np.ndarray]:
    """Move every frame by its (dx, dy) shift (sub-pixel, reflected borders); yields uint8 chunks."""
    import cv2

    index = 0
    for chunk in chunks:
        out = np.empty_like(chunk)
        for j, frame in enumerate(chunk):
            dx, dy = shifts[index]
            matrix = np.float32([[1, 0, dx], [0, 1, dy]])
            out[j] = cv2.warpAffine(frame, matrix, (frame.shape[1], frame.shape[0]), flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_REFLECT)
            index += 1
        yield out


def smoothing_shifts(trajectory: np.ndarray, alpha: float) -> np.ndarray:
    """Per-frame (dx, dy) that moves each frame from its raw to its smoothed position."""
    return zero_phase_ema(trajectory, alpha) - trajectory


def smooth_video(read_chunks, height: int, width: int, alpha: float = 0.3, region: str = "frame",
                 face_box=None) -> Iterator[np.ndarray]:
    """Smoothed uint8 chunks of a video given as `read_chunks()` (a callable returning a fresh iterator of uint8
    [n, H, W, 3] chunks; it is read twice: once to measure the motion, once to shift the frames)."""
    weights = region_weights(height, width, region, face_box)
    trajectory = estimate_trajectory(read_chunks(), weights)
    return shift_frames(read_chunks(), smoothing_shifts(trajectory, alpha))

