"""Image and audio loaders: ComfyUI's upload widgets, plus a local path (inside ComfyUI's folders) or a URL."""

from __future__ import annotations

import contextlib
import hashlib
import os
import urllib.parse
from pathlib import Path

from . import comfy
from ..sonic.params import AUDIO_SUFFIXES, IMAGE_SUFFIXES

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


def resolve(upload: str, path_or_url: str) -> Path:
    """A local file named by the widgets: path_or_url when set, else the upload."""
    text = (path_or_url or "").strip()
    if text:
        return comfy.user_file(text)
    if not upload:
        raise ValueError("no file selected: upload one or give a path or URL")
    return comfy.user_file(upload)


@contextlib.contextmanager
def opened(upload: str, path_or_url: str):
    """The file to read: a URL is downloaded (address rules: sonic/inputs/urls.py) into ComfyUI's temp folder and
    deleted after reading. ComfyUI runs the loader again only when `_fingerprint` changes, which for a URL is the URL
    itself: a file replaced behind the same URL is fetched again only once the URL changes (a query string will do)."""
    text = (path_or_url or "").strip()
    if not _is_url(text):
        yield resolve(upload, text)
        return
    from ..sonic.inputs.urls import fetch

    path = fetch(text, Path(comfy.folder_paths().get_temp_directory()) / "sonic-downloads")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _fingerprint(upload: str, path_or_url: str) -> str:
    text = (path_or_url or "").strip()
    if _is_url(text):
        return text
    try:
        digest = hashlib.sha256(resolve(upload, text).read_bytes()).hexdigest()
    except (OSError, ValueError):
        return f"missing:{upload}:{text}"
    return digest


def _validate(widget: str, upload: str, path_or_url: str) -> bool | str:
    """ComfyUI lists this message under every argument of VALIDATE_INPUTS (both widgets), so it names the one at
    fault itself."""
    text = (path_or_url or "").strip()
    if _is_url(text):
        return True
    try:
        resolve(upload, text)
    except (OSError, ValueError) as exc:
        if text:
            return f"path_or_url {text!r}: {exc}"
        if not upload:
            return f"no {widget} chosen: upload one with the {widget} widget (or set path_or_url)"
        if isinstance(exc, FileNotFoundError):
            return f"the {widget} widget's file {upload!r} is not in ComfyUI's input folder: upload it or pick another"
        return f"the {widget} widget: {exc}"
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
            "required": {"image": (_input_files(IMAGE_SUFFIXES), {"image_upload": True,
                                                              "tooltip": "A portrait in ComfyUI's input folder."})},
            "optional": {"path_or_url": ("STRING", {"default": "", "tooltip": PATH_TOOLTIP})},
        }

    @classmethod
    def IS_CHANGED(cls, image, path_or_url=""):
        return _fingerprint(image, path_or_url)

    @classmethod
    def VALIDATE_INPUTS(cls, image, path_or_url=""):
        return _validate("image", image, path_or_url)

    def load(self, image, path_or_url=""):
        import numpy as np
        import torch
        from PIL import Image, ImageOps

        from ..sonic.inputs.image import load_image

        with opened(image, path_or_url) as path:
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
                "audio": (_input_files(AUDIO_SUFFIXES), {"audio_upload": True,
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
        return _validate("audio", audio, path_or_url)

    def load(self, audio, trim_silence=False, silence_db=40.0, path_or_url=""):
        import torch

        from ..sonic.inputs.audio import read_audio, trim_silence as trim

        with opened(audio, path_or_url) as path:
            samples, rate = read_audio(path)
        if trim_silence:
            samples = trim(samples, rate, silence_db)
        return ({"waveform": torch.from_numpy(samples)[None].contiguous(), "sample_rate": int(rate)},)
