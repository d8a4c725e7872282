"""Assemble every Sonic component from a models folder (official layout, see `checkpoints.py`).

Dimensions come from the configs and checkpoint shapes only, so the same code loads the released models
and the tiny reference ones.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoints import SVD_URL, WHISPER_URL, ModelLayout, load_checked, read_state_dict
from .encoders import VAE, DiffusersVAE, ImageEncoder, TransformersImageEncoder

if TYPE_CHECKING:  # the types of SonicModels' fields, without importing diffusers / transformers to load this module
    from diffusers import UNetSpatioTemporalConditionModel
    from transformers import WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from ..inputs.face import FaceDetector
    from .models.attention import AudioConditioning
    from .models.audio_proj import AudioToBucket, AudioToTokens
    from .models.rife import IFNet

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """'auto' = the first of an NVIDIA (CUDA) GPU, an Apple GPU (MPS) and the CPU that this PyTorch can use. (MPS
    has no fused attention kernel; Sonic's attention runs there in chunks under a byte budget, models/attention.py.)
    A GPU named but not usable is an error, not a silent CPU run."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but this PyTorch has no usable CUDA GPU; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        why = ("this PyTorch was built without MPS support" if not torch.backends.mps.is_built()
               else "no Apple GPU is usable here (MPS needs Apple silicon or an AMD GPU, macOS 12.3 or newer)")
        raise RuntimeError(f"device 'mps' was requested but {why}; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' = fp16 on a GPU (the official default) and fp32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type != "cpu" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return check_dtype_supported(DTYPES[dtype], device)


def check_dtype_supported(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """bf16 only where the GPU computes it natively (NVIDIA Ampere and newer); elsewhere PyTorch would emulate it
    many times slower."""
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError(f"{torch.cuda.get_device_name(device)} has no native bf16 (NVIDIA Ampere or newer has); "
                         "choose fp16 (the official precision) or auto")
    return dtype


@dataclass
class SonicModels:
    """Every network of one Sonic setup, on one device. Audio MLPs and Whisper stay fp32 (as official)."""

    unet: UNetSpatioTemporalConditionModel  # diffusers' stock SVD UNet with Sonic's audio attention processors
    audio_conditioning: AudioConditioning  # binds a call's audio tokens and face mask to those processors
    vae: VAE
    image_encoder: ImageEncoder
    whisper_encoder: WhisperEncoder
    feature_extractor: WhisperFeatureExtractor
    audio_to_tokens: AudioToTokens  # per-frame Whisper states -> audio tokens
    audio_to_bucket: AudioToBucket  # Whisper states + CLIP embedding -> the two motion buckets
    scheduler_config: dict
    rife: IFNet | None = None  # None: no interpolation (12.5 fps)
    face_detector: FaceDetector | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"config {path} could not be read ({exc}); download it again") from exc


def _pretrained_variant(folder: Path, stem: str, prefer_half: bool) -> str | None:
    """None for the full-precision safetensors file, 'fp16' for the `.fp16.` variant, whichever is present."""
    have_full = (folder / f"{stem}.safetensors").is_file()
    have_half = (folder / f"{stem}.fp16.safetensors").is_file()
    if not (have_full or have_half):
        raise FileNotFoundError(
            f"no weights in {folder} (expected {stem}.safetensors or {stem}.fp16.safetensors); "
            f"download them from {SVD_URL}"
        )
    if have_half and (prefer_half or not have_full):
        return "fp16"
    return None


def _complete(loaded, folder: Path, source: str):
    """`from_pretrained(..., output_loading_info=True)` -> the model; a weight missing from the file (which the
    libraries would silently fill with random numbers) or of the wrong shape is an error naming the folder."""
    model, info = loaded
    missing = sorted(info.get("missing_keys") or [])
    wrong = info.get("mismatched_keys") or []
    if missing or wrong:
        detail = (f"{len(missing)} weights missing (e.g. {missing[0]})" if missing
                  else f"{len(wrong)} weights of the wrong shape (e.g. {wrong[0]})")
        raise ValueError(f"{folder} does not hold the weights its config describes: {detail}. Download the "
                         f"folder again from {source}")
    return model


def load_vae(layout: ModelLayout, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKLTemporalDecoder

    folder = layout.svd / "vae"
    variant = _pretrained_variant(folder, "diffusion_pytorch_model", dtype != torch.float32)
    # The official pipeline runs the VAE in the compute dtype and ignores `force_upcast` (spec §1.2).
    # low_cpu_mem_usage=False: the VAE is small (0.2 GB), and diffusers' default wants `accelerate` and prints five
    # lines on every load when it is missing
    vae = _complete(AutoencoderKLTemporalDecoder.from_pretrained(
        folder, variant=variant, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False,
        output_loading_info=True), folder, SVD_URL)
    return DiffusersVAE(vae.to(device=device).eval().requires_grad_(False))


def load_image_encoder(layout: ModelLayout, device: torch.device, dtype: torch.dtype):
    from transformers import CLIPVisionModelWithProjection

    folder = layout.svd / "image_encoder"
    variant = _pretrained_variant(folder, "model", dtype != torch.float32)
    encoder = _complete(CLIPVisionModelWithProjection.from_pretrained(
        folder, variant=variant, local_files_only=True, output_loading_info=True), folder, SVD_URL)
    return TransformersImageEncoder(encoder.to(device=device, dtype=dtype).eval().requires_grad_(False))


def load_whisper(layout: ModelLayout, device: torch.device):
    from transformers import WhisperFeatureExtractor, WhisperModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model = _complete(WhisperModel.from_pretrained(layout.whisper, local_files_only=True, output_loading_info=True),
                      layout.whisper, WHISPER_URL)
    encoder = model.get_encoder().to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    extractor = WhisperFeatureExtractor.from_pretrained(layout.whisper, local_files_only=True)
    return encoder, extractor


def load_audio_mlp(cls, path: Path, device: torch.device):
    """One audio MLP (AudioToTokens / AudioToBucket), its size read off the checkpoint, checked strictly."""
    state = read_state_dict(path)
    try:
        with torch.device("meta"):
            net = cls.from_state_dict_shapes(state)
    except KeyError as exc:
        raise ValueError(f"checkpoint {path} lacks tensor {exc}; is it the official Sonic file?") from exc
    return load_checked(net, state, path).to(device=device, dtype=torch.float32).eval()


def load_audio_mlps(layout: ModelLayout, device: torch.device):
    from .models.audio_proj import AudioToBucket, AudioToTokens

    return [load_audio_mlp(AudioToTokens, layout.audio2token, device),
            load_audio_mlp(AudioToBucket, layout.audio2bucket, device)]


def load_unet(layout: ModelLayout, audio_dim: int, device: torch.device, dtype: torch.dtype):
    from .models.unet import build_sonic_unet

    config = _read_json(layout.svd_config("unet/config.json"))
    unet, conditioning = build_sonic_unet(config, audio_dim, device="meta")
    state = read_state_dict(layout.unet)
    load_checked(unet, state, layout.unet)
    # nn.Module.to: diffusers' ModelMixin.to only adds a warning about fp32-pinned modules (SVD has none).
    return torch.nn.Module.to(unet, device=device, dtype=dtype), conditioning


def load_rife(path: Path, device: torch.device):
    from .models.rife import IFNet

    state = read_state_dict(path)
    with torch.device("meta"):
        net = IFNet.from_state_dict_shapes(state)
    net = load_checked(net, state, path)
    return net.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def load_models(
    models_dir: str | Path,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    interpolation: bool = True,
    face_detector: str = "auto",
    vae=None,
    image_encoder=None,
    unet_device: str | torch.device | None = None,
) -> SonicModels:
    """Load a complete Sonic setup. `face_detector`: 'auto' (YOLO if present, else dlib), 'yolo', 'dlib', 'none'.

    `vae` / `image_encoder`: objects with the interface of `encoders.DiffusersVAE` / `TransformersImageEncoder`
    to use instead of the SVD folder's (then the SVD weights need not be present). `unet_device`: where the
    UNet's weights live when not on `device` ('cpu' for block streaming, SampleOptions.stream_unet)."""
    from ..inputs.face import make_face_detector

    layout = ModelLayout(Path(models_dir))
    layout.require(interpolation, svd_weights=vae is None or image_encoder is None)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)

    audio_to_tokens, audio_to_bucket = load_audio_mlps(layout, device)
    whisper_encoder, extractor = load_whisper(layout, device)
    unet_home = torch.device(unet_device) if unet_device is not None else device
    unet, conditioning = load_unet(layout, audio_to_tokens.token_dim, unet_home, dtype)
    scheduler_config = _read_json(layout.svd_config("scheduler/scheduler_config.json"))
    return SonicModels(
        unet=unet,
        audio_conditioning=conditioning,
        vae=vae if vae is not None else load_vae(layout, device, dtype),
        image_encoder=image_encoder if image_encoder is not None else load_image_encoder(layout, device, dtype),
        whisper_encoder=whisper_encoder,
        feature_extractor=extractor,
        audio_to_tokens=audio_to_tokens,
        audio_to_bucket=audio_to_bucket,
        scheduler_config=scheduler_config,
        rife=load_rife(layout.rife, device) if interpolation else None,
        face_detector=make_face_detector(face_detector, layout.yolo, device),
        device=device,
        dtype=dtype,
    )
