"""Where the weights live (the official folder layout) and how they are read: safely and verified.

Layout of a models folder (same as the official `checkpoints/`)::

    Sonic/unet.pth | unet.safetensors
    Sonic/audio2token.pth | audio2token.safetensors
    Sonic/audio2bucket.pth | audio2bucket.safetensors
    whisper-tiny/                          (openai/whisper-tiny, transformers folder)
    stable-video-diffusion-img2vid-xt/     (diffusers folder: unet/config.json, vae/, image_encoder/, scheduler/)
    RIFE/flownet.pkl | flownet.safetensors (only for frame interpolation)
    yoloface_v5m.pt                        (optional; TorchScript face detector)

Pickled files are only ever read with `torch.load(weights_only=True)`; `.safetensors` twins are preferred
when present, and `convert_to_safetensors` writes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..hub import SONIC_URL, SVD_URL, WHISPER_URL

SVD_DIR = "stable-video-diffusion-img2vid-xt"
# SVD-xt's UNet and scheduler configs (public JSON), used when the models folder has no SVD folder: with
# ComfyUI's own VAE and CLIP_VISION nothing else from SVD is needed.
BUNDLED_SVD = Path(__file__).resolve().parent / "configs" / "svd-xt"
WHISPER_DIR = "whisper-tiny"
YOLO_FILE = "yoloface_v5m.pt"


@dataclass(frozen=True)
class ModelLayout:
    """Paths of every Sonic component inside one models folder."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser())

    @property
    def unet(self) -> Path:
        return self._pick("Sonic/unet", ".pth")

    @property
    def audio2token(self) -> Path:
        return self._pick("Sonic/audio2token", ".pth")

    @property
    def audio2bucket(self) -> Path:
        return self._pick("Sonic/audio2bucket", ".pth")

    @property
    def rife(self) -> Path:
        return self._pick("RIFE/flownet", ".pkl")

    @property
    def yolo(self) -> Path:
        return self.root / YOLO_FILE

    @property
    def whisper(self) -> Path:
        return self.root / WHISPER_DIR

    @property
    def svd(self) -> Path:
        return self.root / SVD_DIR

    def _pick(self, stem: str, pickle_suffix: str) -> Path:
        safe = self.root / f"{stem}.safetensors"
        return safe if safe.is_file() else self.root / f"{stem}{pickle_suffix}"

    def svd_config(self, relative: str) -> Path:
        """An SVD-xt config file: the models folder's copy if present, else the bundled one."""
        path = self.svd / relative
        return path if path.is_file() else BUNDLED_SVD / relative

    def missing(self, interpolation: bool = True, svd_weights: bool = True) -> list[str]:
        """Human-readable list of required files that are absent (empty when everything is there).

        `svd_weights=False` when the VAE and CLIP image encoder come from elsewhere (ComfyUI's own)."""
        svd = self.svd
        required: list[tuple[tuple[Path, ...], str]] = [
            ((self.unet,), SONIC_URL),
            ((self.audio2token,), SONIC_URL),
            ((self.audio2bucket,), SONIC_URL),
            ((self.whisper / "config.json",), WHISPER_URL),
            ((self.whisper / "model.safetensors",), WHISPER_URL),
            ((self.whisper / "preprocessor_config.json",), WHISPER_URL),
        ]
        if svd_weights:
            required += [
                ((svd / "vae" / "config.json",), SVD_URL),
                (tuple(svd / "vae" / f"diffusion_pytorch_model{v}.safetensors" for v in (".fp16", "")), SVD_URL),
                ((svd / "image_encoder" / "config.json",), SVD_URL),
                (tuple(svd / "image_encoder" / f"model{v}.safetensors" for v in (".fp16", "")), SVD_URL),
            ]
        if interpolation:
            required.append(((self.rife,), SONIC_URL))
        return [" or ".join(str(p) for p in paths) + f" (from {url})"
                for paths, url in required if not any(p.is_file() for p in paths)]

    def require(self, interpolation: bool = True, svd_weights: bool = True) -> None:
        missing = self.missing(interpolation, svd_weights)
        if missing:
            raise FileNotFoundError(
                f"Sonic models folder {self.root} is incomplete; missing: " + "; ".join(missing)
                + f". Run `python -m sonic download --models {self.root}` to fetch them (see README, 'Model files')."
            )


def source_of(path: Path) -> str:
    text = str(path)
    if SVD_DIR in text:
        return SVD_URL
    if WHISPER_DIR in text:
        return WHISPER_URL
    return SONIC_URL


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, read without executing code (safetensors, or weights_only pickle).

    A DataParallel `module.` prefix (RIFE's flownet.pkl) and a `state_dict` wrapper are removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; download it from {source_of(path)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # legacy (non-zip) pickles cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, KeyError) as exc:
        size = path.stat().st_size
        raise ValueError(
            f"checkpoint {path} ({size:,} bytes) could not be read: {type(exc).__name__}: {exc}. "
            f"It is probably truncated or not the right file; download it again from {source_of(path)}"
        ) from exc
    if isinstance(state, dict) and set(state) == {"state_dict"}:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} is not a plain tensor dictionary; download it from {source_of(path)}")
    if any(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}
    return state


def check_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Raise a ValueError naming the file when `state` does not fit `module` exactly (strict keys and shapes)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} with wrong shapes (e.g. {k}: file {tuple(state[k].shape)}, model {expected[k]})")
    raise ValueError(
        f"checkpoint {path} does not match the model built from its configs: " + ", ".join(parts)
        + f". Use the official file from {source_of(path)} together with matching config files."
    )


def load_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> torch.nn.Module:
    check_state_dict(module, state, path)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def convert_to_safetensors(models_dir: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """Write `.safetensors` twins of the pickled Sonic and RIFE files; returns the files written."""
    from safetensors.torch import save_file

    root = Path(models_dir)
    written = []
    for rel in ("Sonic/unet.pth", "Sonic/audio2token.pth", "Sonic/audio2bucket.pth", "RIFE/flownet.pkl"):
        src = root / rel
        dst = src.with_suffix(".safetensors")
        if not src.is_file() or (dst.is_file() and not overwrite):
            continue
        state = {k: v.contiguous() for k, v in read_state_dict(src).items()}
        tmp = dst.with_name(f".{dst.name}.partial")
        try:
            save_file(state, str(tmp), metadata={"format": "pt", "converted_from": src.name})
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(dst)
    return written
