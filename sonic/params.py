"""User-facing settings with the official defaults (spec §3, §4). Validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_SEED = 72589  # the official default seed
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # what the image loaders read
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".m4a", ".aac", ".ogg", ".opus")  # what the audio loaders read


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class PrepareOptions:
    """How the portrait and the audio are turned into conditioning (the SONIC_PreData stage)."""

    min_resolution: int = 512  # short side of the video, rounded to a multiple of 64
    crop: bool = False  # animate a square crop around the face instead of the whole photo
    expand_ratio: float = 0.5  # crop margin around the face box, in face sizes (official demo: 0.5)
    face_box: tuple[float, float, float, float] | None = None  # x, y, w, h in pixels; None = detect
    duration: float | None = None  # seconds; None = the whole audio; shorter trims; longer is an error

    def __post_init__(self) -> None:
        _check(64 <= self.min_resolution <= 4096, f"min_resolution must be between 64 and 4096, got {self.min_resolution}")
        _check(0 <= self.expand_ratio <= 5, f"expand_ratio must be between 0 and 5, got {self.expand_ratio}")
        if self.face_box is not None:
            _check(len(self.face_box) == 4, f"face_box must be x, y, w, h; got {self.face_box}")
        if self.duration is not None:
            _check(math.isfinite(self.duration) and self.duration > 0, f"duration must be positive seconds, got {self.duration}")


@dataclass
class SampleOptions:
    """Denoising, decoding and interpolation settings (the sampler stage)."""

    inference_steps: int = 25
    seed: int = DEFAULT_SEED
    dynamic_scale: float = 1.0  # multiplies both motion buckets (official "dynamic_scale")
    motion_scale: float = 1.0  # extra factor on the head-motion bucket only; 1.0 = official
    ip_audio_scale: float = 1.0  # strength of the audio cross-attention
    min_appearance_guidance: float = 2.0
    max_appearance_guidance: float = 2.0
    audio_guidance: float = 7.5
    shift_offset: int = 7  # frames the windows move per step
    frames_per_window: int = 25
    overlap: int = 0
    noise_strength: float = 1.0  # official i2i_noise_strength: < 1 skips the noisiest steps
    decode_chunk_size: int = 8  # frames per temporal VAE decode (official 8; changes the output)
    interpolation: bool = True  # RIFE x2: 12.5 -> 25 fps
    windows_per_call: int = 1  # windows batched into one UNet call (same result, more memory)
    interpolation_batch: int = 4  # frame pairs per RIFE call
    sequential_guidance: bool = False  # low-VRAM: the three guidance rows one after another (same result)
    compile: bool = False  # torch.compile the UNet (kept for later runs; compiles again only for new shapes)
    stream_unet: bool = False  # the UNet's weights stay in host memory, one block at a time on the device

    def __post_init__(self) -> None:
        _check(1 <= self.inference_steps <= 1000, f"inference_steps must be between 1 and 1000, got {self.inference_steps}")
        _check(0 <= self.seed < 2**64, f"seed must be between 0 and 2^64-1, got {self.seed}")
        for name in ("dynamic_scale", "motion_scale", "ip_audio_scale", "min_appearance_guidance",
                     "max_appearance_guidance", "audio_guidance"):
            value = getattr(self, name)
            _check(math.isfinite(value) and 0 <= value <= 100, f"{name} must be between 0 and 100, got {value}")
        _check(2 <= self.frames_per_window <= 256, f"frames_per_window must be 2..256, got {self.frames_per_window}")
        _check(0 <= self.overlap < self.frames_per_window, f"overlap must be 0..frames_per_window-1, got {self.overlap}")
        _check(0 <= self.shift_offset <= 1000, f"shift_offset must be 0..1000, got {self.shift_offset}")
        _check(0 < self.noise_strength <= 1, f"noise_strength must be in (0, 1], got {self.noise_strength}")
        _check(self.decode_chunk_size >= 1, f"decode_chunk_size must be at least 1, got {self.decode_chunk_size}")
        _check(self.windows_per_call >= 1, f"windows_per_call must be at least 1, got {self.windows_per_call}")
        _check(self.interpolation_batch >= 1, f"interpolation_batch must be at least 1, got {self.interpolation_batch}")
        _check(not (self.compile and self.stream_unet),
               "compile and stream_unet cannot be combined (streaming swaps the weights the compiled graph reads); "
               "turn one off")
