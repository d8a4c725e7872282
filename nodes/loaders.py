"""Image and audio loaders: ComfyUI's upload widgets, plus a local path (inside ComfyUI's folders) or a URL."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from . import comfy

IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
AUDIO_TYPES = (".wav", ".mp3", ".flac", ".m4a", ".aac", ".ogg", ".opus")
MAX_DOWNLOAD_BYTES = 200 * 2**20
PATH_TOOLTIP = ("Optional: a file inside ComfyUI's input/output folders, or an http(s) URL. "
                "When set, it is used instead of the upload.")


def _input_files(suffixes: tuple[str, ...]) -> list[str]:
    try:
        folder = comfy.folder_paths().get_input_directory()
    except ImportError:
        return []
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(suffixes) and os.path.isfile(os.path.join(folder, f)))


def _is_url(text: str) -> bool:
    return urllib.parse.urlparse(text).scheme in ("http", "https")


def download(url: str) -> Path:
    """Fetch an http(s) URL into ComfyUI's temp folder (cached by URL), at most 200 MB."""
    if not _is_url(url):
        raise ValueError(f"{url!r} is not an http(s) URL")
    folder = Path(comfy.folder_paths().get_temp_directory()) / "sonic-downloads"
    folder.mkdir(parents=True, exist_ok=True)
    suffix = Path(urllib.parse.urlparse(url).path).suffix[:8]
    target = folder / (hashlib.sha256(url.encode()).hexdigest()[:32] + suffix)
    if target.is_file():
        return target
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, os.fdopen(fd, "wb") as out:  # noqa: S310 (http/https only)
            size = 0
            while chunk := response.read(1 << 20):
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES:
                    raise ValueError(f"{url} is larger than {MAX_DOWNLOAD_BYTES >> 20} MB")
                out.write(chunk)
        os.replace(tmp, target)
    except OSError as exc:
        raise ValueError(f"could not download {url}: {exc}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def resolve(upload: str, path_or_url: str) -> Path:
    text = (path_or_url or "").strip()
    if text:
        return download(text) if _is_url(text) else comfy.user_file(text)
    if not upload:
        raise ValueError("no file selected: upload one or give a path or URL")
    return comfy.user_file(upload)


def _fingerprint(upload: str, path_or_url: str) -> str:
    text = (path_or_url or "").strip()
    if _is_url(text):
        return text
    try:
        digest = hashlib.sha256(resolve(upload, text).read_bytes()).hexdigest()
    except (OSError, ValueError):
        return f"missing:{upload}:{text}"
    return digest


def _validate(upload: str, path_or_url: str) -> bool | str:
    text = (path_or_url or "").strip()
    if _is_url(text):
        return True
    try:
        resolve(upload, text)
    except (OSError, ValueError) as exc:
        return str(exc)
    return True


class SonicLoadImage:
    DESCRIPTION = "Load the portrait to animate (upload, a file in ComfyUI's folders, or a URL)."
    CATEGORY = "Sonic"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    OUTPUT_TOOLTIPS = ("The photo as a 1-image batch, RGB in [0, 1].", "1 - alpha (zeros without alpha).")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"image": (_input_files(IMAGE_TYPES), {"image_upload": True,
                                                              "tooltip": "A portrait in ComfyUI's input folder."})},
            "optional": {"path_or_url": ("STRING", {"default": "", "tooltip": PATH_TOOLTIP})},
        }

    @classmethod
    def IS_CHANGED(cls, image, path_or_url=""):
        return _fingerprint(image, path_or_url)

    @classmethod
    def VALIDATE_INPUTS(cls, image, path_or_url=""):
        return _validate(image, path_or_url)

    def load(self, image, path_or_url=""):
        import numpy as np
        import torch
        from PIL import Image, ImageOps

        from ..sonic.image import load_image

        path = resolve(image, path_or_url)
        rgb = load_image(path)
        with Image.open(path) as raw:
            raw = ImageOps.exif_transpose(raw)
            alpha = np.asarray(raw.getchannel("A"), np.float32) / 255 if "A" in raw.getbands() else None
        pixels = torch.from_numpy(np.asarray(rgb, np.float32) / 255)[None]
        mask = torch.from_numpy(1 - alpha)[None] if alpha is not None else torch.zeros(1, *pixels.shape[1:3])
        return (pixels, mask)


class SonicLoadAudio:
    DESCRIPTION = "Load the speech (wav, mp3, flac, m4a/aac, ogg) as ComfyUI AUDIO, at its own rate and channels."
    CATEGORY = "Sonic"
    RETURN_TYPES = ("AUDIO",)
    RETURN_NAMES = ("audio",)
    OUTPUT_TOOLTIPS = ("{'waveform': [1, channels, samples], 'sample_rate': rate}",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "audio": (_input_files(AUDIO_TYPES), {"audio_upload": True,
                                                      "tooltip": "A speech recording in ComfyUI's input folder."}),
                "trim_silence": ("BOOLEAN", {"default": False, "tooltip":
                                 "Cut leading and trailing silence (the video then starts with the first word)."}),
                "silence_db": ("FLOAT", {"default": 40.0, "min": 10.0, "max": 90.0, "step": 1.0, "tooltip":
                               "With trim_silence: what is quieter than this many dB below the peak counts as silence."}),
            },
            "optional": {"path_or_url": ("STRING", {"default": "", "tooltip": PATH_TOOLTIP})},
        }

    @classmethod
    def IS_CHANGED(cls, audio, trim_silence=False, silence_db=40.0, path_or_url=""):
        return _fingerprint(audio, path_or_url)

    @classmethod
    def VALIDATE_INPUTS(cls, audio, path_or_url=""):
        return _validate(audio, path_or_url)

    def load(self, audio, trim_silence=False, silence_db=40.0, path_or_url=""):
        import torch

        from ..sonic.audio import read_audio, trim_silence as trim

        samples, rate = read_audio(resolve(audio, path_or_url))
        if trim_silence:
            samples = trim(samples, rate, silence_db)
        return ({"waveform": torch.from_numpy(samples)[None].contiguous(), "sample_rate": int(rate)},)
