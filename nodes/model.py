"""SonicModelLoader: the Sonic networks from the `sonic` model folder, managed by ComfyUI's model management.

SVD's VAE and CLIP image encoder come either from the folder's diffusers copy or from ComfyUI's own `VAE` and
`CLIP_VISION` (e.g. `ImageOnlyCheckpointLoader` on svd_xt.safetensors), so no second copy of SVD is needed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import comfy

log = logging.getLogger(__name__)

UNET_NAMES = ("unet.safetensors", "unet.pth")
SVD_LATENT_SCALE = 0.18215  # SD1.x latent format, used by SVD; ComfyUI's VAE returns unscaled latents


class _Stage:
    """The patchers the running stage uses and its working memory.

    ComfyUI evicts the smallest models first when memory is short, at every load: its own VAE and CLIP vision
    calls load their model themselves and may push out Whisper, the audio MLPs or RIFE. So every request names the
    whole stage, and after a ComfyUI call that loaded one model the stage is requested again (a no-op when nothing
    was evicted)."""

    def __init__(self):
        self.patchers: list = []
        self.memory_required = 0

    def load(self, *more, memory_required: int = 0) -> None:
        comfy.load_to_gpu([*self.patchers, *more], max(self.memory_required, memory_required))


class ComfyVAE:
    """ComfyUI's `VAE` (temporal SVD decoder) with the engine's VAE interface."""

    scaling_factor = SVD_LATENT_SCALE

    def __init__(self, vae, stage: _Stage | None = None):
        self.vae = vae
        self.stage = stage or _Stage()

    @property
    def dtype(self):
        """ComfyUI's choice (`model_management.vae_dtype`): fp32 on cards without fast fp16 or bf16, whatever the
        UNet's dtype."""
        return self.vae.vae_dtype

    def encode_mean(self, image):
        """[B, 3, H, W] in [-1, 1] -> unscaled latents (ComfyUI's VAE returns the distribution's mode = mean)."""
        pixels = ((image.float() + 1) / 2).clamp(0, 1).movedim(1, -1)
        latents = self.vae.encode(pixels)  # ComfyUI loads the VAE alone for it
        self.stage.load()
        return latents

    def decode(self, latents):
        """One temporal chunk of unscaled latents -> [n, 3, H, W] float32 in [0, 1], decoded in one piece.

        ComfyUI's `VAE.decode` splits a batch into as many frames as its own estimate says fit (about 1.1 GB per
        512x512 frame in half precision); for SVD's temporal decoder a split chunk is another video than the
        official one. So ComfyUI loads the VAE with our measured working memory for the chunk (sonic/engine/memory.py)
        and the chunk goes through its decoder network whole."""
        import torch

        from ..sonic.engine import memory

        vae = self.vae
        n, _, latent_h, latent_w = latents.shape
        scale = vae.upscale_ratio
        self.stage.load(vae.patcher, memory_required=memory.vae_decode_bytes(n, latent_h * scale, latent_w * scale,
                                                                              vae.vae_dtype))  # with RIFE
        with torch.no_grad():
            frames = vae.first_stage_model.decode(latents.to(vae.device, vae.vae_dtype))
        return vae.process_output(frames.float())


class ComfyImageEncoder:
    """ComfyUI's `CLIP_VISION` with the engine's image-encoder interface.

    The engine gives a 224x224 LANCZOS squash in [0, 1]; at that size ComfyUI's preprocessing does no resize and
    only quantises to 1/255 (a no-op for these pixels) before the CLIP mean/std, i.e. the official input."""

    def __init__(self, clip_vision, stage: _Stage | None = None):
        self.clip_vision = clip_vision
        self.stage = stage or _Stage()

    def embed(self, image):
        embeds = self.clip_vision.encode_image(image.float().movedim(1, -1))["image_embeds"]  # loads CLIP alone
        self.stage.load()
        return embeds


@dataclass
class ComfySonicModel:
    """The SONIC_MODEL value: the engine's models plus the ComfyUI patchers that move them on and off the GPU."""

    models: Any  # sonic.engine.loader.SonicModels, weights on the offload device until a stage loads them
    audio_patcher: Any
    unet_patcher: Any
    image_patchers: list  # [VAE, CLIP] of the folder's diffusers copies; [] when ComfyUI supplies its own
    rife_patcher: Any
    stage: _Stage = dataclasses.field(default_factory=_Stage)  # what the running stage uses

    def with_svd(self, vae, clip_vision) -> "ComfySonicModel":
        """The same Sonic networks with ComfyUI's VAE and CLIP_VISION (nothing heavy is copied)."""
        stage = _Stage()
        models = dataclasses.replace(self.models, vae=ComfyVAE(vae, stage),
                                     image_encoder=ComfyImageEncoder(clip_vision, stage))
        return dataclasses.replace(self, models=models, stage=stage)

    def _patchers(self, module: str) -> list:
        if module in ("vae", "clip") and not self.image_patchers:  # ComfyUI's VAE / CLIP_VISION and their patchers
            return [self.models.vae.vae.patcher if module == "vae" else self.models.image_encoder.clip_vision.patcher]
        return {"audio": [self.audio_patcher], "vae": self.image_patchers[:1], "clip": self.image_patchers[1:],
                "unet": [self.unet_patcher], "rife": [self.rife_patcher]}[module]

    def load(self, *modules: str, memory_required: int = 0) -> None:
        """Bring everything a stage runs ('audio' = Whisper and the audio MLPs, 'clip', 'vae', 'unet', 'rife') onto
        the compute device in one request, with `memory_required` bytes of working memory beyond the weights
        (sonic/engine/memory.py): ComfyUI evicts other models, the UNet included when decoding on a short card,
        until that much is free. Later loads within the stage (ComfyUI's VAE and CLIP vision calls) name the same
        set again, so that ComfyUI, which evicts the smallest models first, never pushes out one the stage runs."""
        self.stage.patchers = [p for module in modules for p in self._patchers(module) if p is not None]
        self.stage.memory_required = memory_required
        self.stage.load()


DEFAULT_UNET = "Sonic/unet.pth"  # where `python -m sonic download` / download_missing put it


def _unet_files() -> list[str]:
    """The Sonic UNets in models/sonic; the standard name when there is none yet (so that download_missing can
    fetch it and the validation error can say how)."""
    try:
        names = comfy.folder_paths().get_filename_list(comfy.SONIC_FOLDER)
    except (ImportError, KeyError):
        return []
    return [n for n in names if Path(n).name in UNET_NAMES] or [DEFAULT_UNET]


def model_report(unet: str | None, interpolation: bool, svd_weights: bool) -> dict:
    """The UNets in models/sonic, and what a run with this UNet and these settings would lack (relative names)."""
    from ..sonic.engine.checkpoints import ModelLayout

    fp = comfy.folder_paths()
    names = [n for n in fp.get_filename_list(comfy.SONIC_FOLDER) if Path(n).name in UNET_NAMES]
    found = fp.get_full_path(comfy.SONIC_FOLDER, unet) if unet else None
    root = Path(found).parent.parent if found else _sonic_root()
    missing = [text.replace(str(root) + os.sep, "") for text in ModelLayout(root).missing(interpolation, svd_weights)]
    if unet and found is None and not any(text.startswith(unet) for text in missing):
        missing.insert(0, f"{unet} (no such file in models/sonic)")
    return {"unets": names, "missing": missing}


def _sonic_root() -> Path:
    """The first models/sonic folder (the user's extra_model_paths entry first): where downloads go."""
    return Path(comfy.folder_paths().get_folder_paths(comfy.SONIC_FOLDER)[0])


def _how_to_download(root: Path) -> str:
    return (f"set download_missing to true on Sonic Model Loader to fetch them from Hugging Face, or run "
            f"`python -m sonic download --models {root}` (see the pack's README, 'Model files')")


def _download_missing(root: Path, interpolation: bool, external: bool, dtype: str) -> None:
    """Fetch what the chosen setup lacks into `root`, with ComfyUI's progress bar (bytes) and Cancel. SVD's
    half-precision files when the compute dtype is not fp32 (exactly what runs then, half the download)."""
    import torch

    from ..sonic.engine import download
    from ..sonic.engine.checkpoints import ModelLayout

    layout = ModelLayout(root)
    if not layout.missing(interpolation, svd_weights=not external):
        return
    components = ("sonic", "whisper") + (("rife",) if interpolation else ()) + (() if external else ("svd",))
    bar = {}

    def on_start(files: int, total: int) -> None:
        bar["bar"] = comfy.progress_bar(max(total, 1))

    from tqdm import tqdm

    class Progress(tqdm):  # huggingface_hub's per-file bar, silent, forwarded to ComfyUI's; Cancel stops it
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

        def update(self, n=1):
            comfy.check_interrupt()
            if "bar" in bar and n:
                bar["bar"].update(n)

    log.info("Sonic: downloading %s into %s", ", ".join(components), root)
    half = _resolve_dtype(dtype, comfy.devices()[0]) != torch.float32
    download.download(root, components, fp16=half, tqdm_class=Progress, on_start=on_start, log=log.info)


def _resolve_dtype(choice: str, device):
    import torch

    if choice != "auto":
        from ..sonic.engine.loader import DTYPES, check_dtype_supported

        return check_dtype_supported(DTYPES[choice], device)
    mm = comfy.model_management()
    if device.type == "cpu":
        return torch.float32
    if mm.should_use_fp16(device):
        return torch.float16  # the official default
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32


_CACHE: dict = {}  # one Sonic at a time, keyed by what its files are (never by the VAE/CLIP objects passed in)


class _FromComfyUI:
    """Stands in for the VAE / CLIP image encoder in the cached Sonic when ComfyUI supplies them per run."""

    def __getattr__(self, name):
        raise RuntimeError("connect vae and clip_vision to Sonic Model Loader")


def _file_identity(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


class SonicModelLoader:
    DESCRIPTION = ("Load Sonic (UNet, audio encoders, RIFE, face detector) from models/sonic. Connect VAE and "
                   "CLIP_VISION from an SVD checkpoint loader, or keep the diffusers SVD folder in models/sonic.")
    CATEGORY = "Sonic"
    RETURN_TYPES = ("SONIC_MODEL",)
    RETURN_NAMES = ("sonic_model",)
    OUTPUT_TOOLTIPS = ("Sonic's networks, loaded once and kept between runs.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "sonic_unet": (_unet_files(), {"tooltip": "Sonic/unet.pth (or .safetensors) inside models/sonic; "
                               "audio2token, audio2bucket, whisper-tiny and RIFE are read from the same folder."}),
                "dtype": (["auto", "fp16", "bf16", "fp32"], {"default": "auto", "tooltip":
                          "Compute precision. auto: fp16 on GPUs (official), fp32 on the CPU."}),
                "interpolation": ("BOOLEAN", {"default": True, "tooltip":
                                  "RIFE x2: 25 fps output instead of 12.5 fps (needs RIFE/flownet.pkl)."}),
                "face_detector": (["auto", "yolo", "dlib"], {"default": "auto", "tooltip":
                                  "auto: the official yoloface_v5m.pt when present, else dlib's built-in detector."}),
            },
            "optional": {  # optional, so that API prompts written before it existed stay valid
                "download_missing": ("BOOLEAN", {"default": False, "tooltip":
                                     "Fetch missing model files from Hugging Face into models/sonic when the "
                                     "workflow runs (about 9 GB the first time; HF_TOKEN for SVD's files)."}),
                "vae": ("VAE", {"tooltip": "SVD's VAE from ComfyUI (e.g. ImageOnlyCheckpointLoader on svd_xt)."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "SVD's CLIP image encoder from ComfyUI."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, sonic_unet, download_missing=False):
        if comfy.folder_paths().get_full_path(comfy.SONIC_FOLDER, sonic_unet) is None and not (
                download_missing and sonic_unet == DEFAULT_UNET):
            return f"{sonic_unet} not found in models/sonic ({_sonic_root()}): " + _how_to_download(_sonic_root())
        return True

    def load(self, sonic_unet, dtype="auto", interpolation=True, face_detector="auto", download_missing=False,
             vae=None, clip_vision=None):
        if (vae is None) != (clip_vision is None):
            raise ValueError("connect both vae and clip_vision (from the same SVD checkpoint), or neither to use "
                             "the diffusers SVD folder in models/sonic")
        external = vae is not None
        found = comfy.folder_paths().get_full_path(comfy.SONIC_FOLDER, sonic_unet)
        # the official layout: <root>/Sonic/unet.pth
        root = Path(found).parent.parent if found else _sonic_root()
        if download_missing:
            _download_missing(root, interpolation, external, dtype)
        from ..sonic.engine.checkpoints import ModelLayout

        missing = ModelLayout(root).missing(interpolation, svd_weights=not external)
        if missing:
            raise FileNotFoundError(f"models/sonic ({root}) lacks " + "; ".join(missing) + ". "
                                    + _how_to_download(root))
        unet_path = Path(comfy.folder_paths().get_full_path_or_raise(comfy.SONIC_FOLDER, sonic_unet))
        # a re-run upstream loader gives new VAE objects for the same files: that must not reload the 6 GB UNet
        key = (_file_identity(unet_path), dtype, interpolation, face_detector, external)
        if key not in _CACHE:
            _CACHE.clear()  # release the previous Sonic before loading another: two would only waste memory
            _CACHE[key] = self._build(root, dtype, interpolation, face_detector, external)
        sonic = _CACHE[key]
        return (sonic.with_svd(vae, clip_vision) if external else sonic,)

    @staticmethod
    def _build(root, dtype, interpolation, face_detector, external: bool) -> ComfySonicModel:
        import torch

        from ..sonic.engine.loader import load_models

        device, offload, _ = comfy.devices()
        compute_dtype = _resolve_dtype(dtype, device)
        models = load_models(root, device=offload, dtype=compute_dtype, interpolation=interpolation,
                             face_detector=face_detector, vae=_FromComfyUI() if external else None,
                             image_encoder=_FromComfyUI() if external else None)
        models.device = device  # where the stages run; the patchers move the weights there
        if models.face_detector is not None and hasattr(models.face_detector, "net"):
            models.face_detector.device = offload  # the TorchScript detector is small: it stays off the GPU

        def patcher(module):
            return comfy.model_patcher(module, device, offload) if module is not None else None

        audio = torch.nn.ModuleDict({"whisper": models.whisper_encoder, "tokens": models.audio_to_tokens,
                                     "bucket": models.audio_to_bucket})
        image = [] if external else [patcher(models.vae.model), patcher(models.image_encoder.model)]
        return ComfySonicModel(models=models, audio_patcher=patcher(audio), unet_patcher=patcher(models.unet),
                          image_patchers=image, rife_patcher=patcher(models.rife))
