"""The values that travel between the Sonic nodes (SONIC_PREDATA, SONIC_FRAMES) and the conversions every node
shares: ComfyUI IMAGE / AUDIO to and from the engine's inputs, frames sources, the face_box widget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CHUNK = 32  # frames per chunk read from a frames file or an IMAGE batch


@dataclass
class SonicPreData:
    """The SONIC_PREDATA value: the engine's conditioning plus the AUDIO it was made from."""

    cond: Any  # sonic.engine.pipeline.SonicConditioning
    audio: dict  # ComfyUI AUDIO, trimmed to the requested duration

    def __repr__(self) -> str:
        w, h = self.cond.size
        return f"SonicPreData({self.cond.num_frames} frames at 12.5 fps, {w}x{h})"


@dataclass
class SonicFrames:
    """The SONIC_FRAMES value: the video as uint8 frames in a file on disk, plus its audio and fps."""

    store: Any  # sonic.post.frames.FrameStore
    audio: dict
    fps: float

    def __repr__(self) -> str:
        return repr(self.store)


def parse_face_box(text: str, node: str = "Sonic PreData"):
    """The face_box widget: '' -> None (detect), 'x,y,w,h' -> a tuple; anything else names the widget."""
    from ..sonic.inputs.face import parse_face_box as parse

    try:
        return parse(text)
    except ValueError:
        raise ValueError(f"{node}'s face_box {text.strip()!r} must be four numbers x,y,w,h in pixels, or empty "
                         "to detect the face") from None


def face_box_in_video(face_box: str, predata, node: str):
    """(x, y, w, h) in video pixels: the face_box text, else predata's face box, else None."""
    box = parse_face_box(face_box, node)
    if box is None and predata is not None:
        box = predata.cond.video_face_box
    return box


def image_to_pil(image):
    """First image of a ComfyUI IMAGE batch -> RGB PIL image."""
    import numpy as np
    from PIL import Image

    if image.ndim != 4 or image.shape[0] < 1 or image.shape[-1] < 3:
        raise ValueError(f"image must be an IMAGE batch [B, H, W, 3], got shape {tuple(image.shape)}")
    pixels = (image[0, :, :, :3].float().clamp(0, 1) * 255).round().byte().cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(pixels))


def trim_audio(audio: dict, seconds: float) -> dict:
    """AUDIO cut (or zero-padded) to exactly `seconds`, batch item 0."""
    import torch

    waveform, rate = audio["waveform"], int(audio["sample_rate"])
    n = int(round(seconds * rate))
    out = waveform[:1, :, :n]
    if out.shape[-1] < n:
        out = torch.nn.functional.pad(out, (0, n - out.shape[-1]))
    return {"waveform": out.contiguous(), "sample_rate": rate}


def audio_to_numpy(audio):
    """ComfyUI AUDIO -> (float32 [channels, samples] of its first item, sample rate); None stays None."""
    if audio is None:
        return None
    waveform = audio["waveform"][0].float().cpu().numpy()  # [channels, samples]
    if waveform.shape[-1] == 0:
        raise ValueError("the audio is empty (0 samples); connect the sampler's audio output or remove the link")
    return waveform, int(audio["sample_rate"])


def image_chunks(images):
    """An IMAGE batch [N, H, W, C] -> uint8 [n, H, W, 3] numpy chunks (NaN/inf frames are an error)."""
    import torch

    for start in range(0, images.shape[0], CHUNK):
        chunk = images[start : start + CHUNK, :, :, :3].float()
        if not torch.isfinite(chunk).all():
            raise ValueError(f"frames {start}..{start + chunk.shape[0] - 1} contain NaN or infinite values; "
                             "the upstream node produced broken images")
        yield (chunk.clamp(0, 1) * 255).round().byte().cpu().numpy()


def video_source(images, frames, node: str):
    """-> (count, height, width, read): `read()` gives a fresh iterator of uint8 [n, H, W, 3] chunks of the frames
    file (preferred) or of the IMAGE batch."""
    if frames is not None:
        store = frames.store
        count, height, width = len(store), store.height, store.width
        read = lambda: store.chunks(CHUNK)  # noqa: E731
    elif images is not None:
        count, height, width = images.shape[0], images.shape[1], images.shape[2]
        read = lambda: image_chunks(images)  # noqa: E731
    else:
        raise ValueError(f"connect images or frames (from Sonic Sampler) to {node}")
    if count == 0:
        raise ValueError(f"there are no frames for {node} (empty batch)")
    return count, height, width, read
