"""Portrait -> reference image, face mask and CLIP input (spec §3.3)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .face import FaceBox

MASK_AREA = 1.1  # the face mask is the face box scaled by this factor
CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class PortraitTensors:
    ref_image: torch.Tensor  # [3, H, W] in [-1, 1]
    face_mask: torch.Tensor  # [3, H, W] in [0, 1] (soft edges from the LANCZOS resize)
    clip_image: torch.Tensor  # [3, 224, 224] in [0, 1] (the CLIP encoder normalises it)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the generated video."""
        return self.ref_image.shape[2], self.ref_image.shape[1]


def load_image(path: str | os.PathLike) -> Image.Image:
    """An RGB PIL image, with EXIF orientation applied (phone photos)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"image file {path} could not be read ({exc}); use a PNG, JPEG or WebP photo") from exc


def output_size(width: int, height: int, min_resolution: int) -> tuple[int, int]:
    """Short side -> min_resolution, both sides rounded to multiples of 64 (Python round: half to even)."""
    scale = min_resolution / min(width, height)
    new_w = round(width * scale / 64) * 64
    new_h = round(height * scale / 64) * 64
    if new_w == 0 or new_h == 0:
        raise ValueError(
            f"a {width}x{height} image at min_resolution {min_resolution} rounds to a zero side; "
            "crop the image closer to square or raise min_resolution"
        )
    return new_w, new_h


def face_mask_image(width: int, height: int, face: FaceBox, area: float = MASK_AREA) -> np.ndarray:
    """uint8 [H, W, 3]: 255 inside the face box scaled by `area` around its centre, 0 elsewhere."""
    x1, y1, bw, bh = face
    x2, y2 = x1 + bw, y1 + bh
    mw, mh = bw * area, bh * area
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2  # floor division on floats, as official
    left, top = max(cx - mw // 2, 0), max(cy - mh // 2, 0)
    right, bottom = min(cx + mw // 2, width), min(cy + mh // 2, height)
    mask = np.zeros((height, width, 3), np.uint8)
    mask[int(top) : int(bottom), int(left) : int(right)] = 255
    return mask


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def clip_input(img: Image.Image) -> torch.Tensor:
    """LANCZOS squash to 224x224 (no aspect preservation), in [0, 1]."""
    return _to_tensor(img.resize((CLIP_SIZE, CLIP_SIZE), Image.LANCZOS))


def normalize_clip(image: torch.Tensor) -> torch.Tensor:
    """CLIP mean/std normalisation of [..., 3, H, W] pixels in [0, 1]."""
    mean = torch.tensor(CLIP_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=image.device).view(3, 1, 1)
    return (image.float() - mean) / std


def prepare_portrait(img: Image.Image, face: FaceBox, min_resolution: int) -> PortraitTensors:
    width, height = img.size
    mask = Image.fromarray(face_mask_image(width, height, face))
    size = output_size(width, height, min_resolution)
    if size != (width, height):
        img = img.resize(size, Image.LANCZOS)
        mask = mask.resize(size, Image.LANCZOS)
    return PortraitTensors(
        ref_image=_to_tensor(img) * 2.0 - 1.0,
        face_mask=_to_tensor(mask),
        clip_image=clip_input(img),
    )
