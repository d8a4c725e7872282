"""SonicPreData (portrait + audio -> conditioning) and SonicSampler (conditioning -> frames, audio, fps)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from . import comfy

log = logging.getLogger(__name__)

_FACE_CACHE = None  # sonic.face.FaceCache, made on first use (importing the engine here would import torch)


@dataclass
class SonicPreData:
    """The SONIC_PREDATA value: the engine's conditioning plus the AUDIO it was made from."""

    cond: Any  # sonic.pipeline.SonicConditioning
    audio: dict  # ComfyUI AUDIO, trimmed to the requested duration

    def __repr__(self) -> str:
        w, h = self.cond.size
        return f"SonicPreData({self.cond.num_frames} frames at 12.5 fps, {w}x{h})"


@dataclass
class SonicFrames:
    """The SONIC_FRAMES value: the video as uint8 frames in a file on disk, plus its audio and fps."""

    store: Any  # sonic.frames.FrameStore
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


class SonicPreDataNode:
    DESCRIPTION = ("Analyse the portrait (face, mask, CLIP, reference latents) and the speech (Whisper, audio "
                   "tokens, motion buckets). The same portrait with new audio reuses the face analysis.")
    CATEGORY = "Sonic"
    RETURN_TYPES = ("SONIC_PREDATA",)
    RETURN_NAMES = ("predata",)
    OUTPUT_TOOLTIPS = ("Everything the sampler needs; independent of the seed.",)
    FUNCTION = "prepare"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "sonic_model": ("SONIC_MODEL", {"tooltip": "From Sonic Model Loader."}),
                "image": ("IMAGE", {"tooltip": "The portrait (first image of the batch is used)."}),
                "audio": ("AUDIO", {"tooltip": "The speech, from Sonic Load Audio or ComfyUI's Load Audio."}),
                "min_resolution": ("INT", {"default": 512, "min": 128, "max": 2048, "step": 64, "tooltip":
                                   "Short side of the video; both sides are rounded to multiples of 64. "
                                   "Higher is sharper and much slower (1024 costs ~5x 512)."}),
                "duration": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 36000.0, "step": 0.1, "tooltip":
                             "Seconds of audio to animate. 0 = the whole audio; shorter trims it; longer than the "
                             "audio is an error."}),
                "crop": ("BOOLEAN", {"default": False, "tooltip":
                         "Animate a square crop around the face (official demo) instead of the whole photo."}),
                "expand_ratio": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 3.0, "step": 0.05, "tooltip":
                                 "With crop: margin around the face, in face sizes."}),
            },
            "optional": {
                "face_box": ("STRING", {"default": "", "tooltip":
                             "Optional x,y,w,h of the face in image pixels; empty = detect it."}),
            },
        }

    def prepare(self, sonic_model, image, audio, min_resolution=512, duration=0.0, crop=False, expand_ratio=0.5,
                face_box=""):
        from ..sonic.inputs.audio import SAMPLE_RATE
        from ..sonic.inputs.face import FaceCache, NoFaceError
        from ..sonic.params import PrepareOptions
        from ..sonic.engine.pipeline import load_speech, locate_face, prepare

        options = PrepareOptions(min_resolution=min_resolution, crop=crop, expand_ratio=expand_ratio,
                                 face_box=parse_face_box(face_box), duration=duration or None)
        speech = load_speech(audio, options.duration)  # checks first (empty, too short, duration > audio)
        pil = image_to_pil(image)
        models = sonic_model.models
        detector = getattr(models.face_detector, "name", "none")
        global _FACE_CACHE
        if _FACE_CACHE is None:
            _FACE_CACHE = FaceCache()

        def analyse():
            try:
                return locate_face(models, pil, options)
            except NoFaceError as exc:
                raise exc.with_hint("type the face box into Sonic PreData's face_box widget as x,y,w,h "
                                    "(pixels of the photo)") from None

        located = _FACE_CACHE.get(FaceCache.key(pil, options.face_box, crop, expand_ratio, detector), analyse)
        comfy.check_interrupt()
        from ..sonic.engine import memory
        from ..sonic.inputs.image import output_size

        width, height = output_size(*(pil.size if not crop else (1, 1)), min_resolution)  # a crop is square
        sonic_model.load("audio", "image", memory_required=memory.prepare(height, width, models.dtype))
        cond = prepare(models, pil, (speech, SAMPLE_RATE), options, located=located)
        seconds = len(cond.audio_samples) / SAMPLE_RATE
        return (SonicPreData(cond=cond, audio=trim_audio(audio, seconds)),)


class SonicSamplerNode:
    DESCRIPTION = ("Generate the talking video: denoise with Sonic, decode chunk by chunk and interpolate to "
                   "25 fps. Outputs frames, the audio cut to them and the fps, for any video node.")
    CATEGORY = "Sonic"
    RETURN_TYPES = ("IMAGE", "AUDIO", "FLOAT", "SONIC_FRAMES")
    RETURN_NAMES = ("images", "audio", "fps", "frames")
    OUTPUT_TOOLTIPS = (
        "All frames as an IMAGE batch; in frames-file mode only the first frame (a preview).",
        "The input audio, cut to the video's length.",
        "Frames per second (25 with interpolation, 12.5 without).",
        "The frames as uint8 in a file on disk, for long videos (Sonic Video Encode reads it chunk by chunk).",
    )
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        from ..sonic.params import DEFAULT_SEED

        return {
            "required": {
                "sonic_model": ("SONIC_MODEL", {"tooltip": "From Sonic Model Loader."}),
                "predata": ("SONIC_PREDATA", {"tooltip": "From Sonic PreData."}),
                "seed": ("INT", {"default": DEFAULT_SEED, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "control_after_generate": True, "tooltip": "Random seed (official default 72589)."}),
                "steps": ("INT", {"default": 25, "min": 1, "max": 200, "tooltip":
                          "Denoising steps. 25 is official; 10-15 is a fast preview."}),
                "dynamic_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0, "step": 0.05, "tooltip":
                                  "Overall motion (head and expression): 0.5 calm, 1 official, 2 lively."}),
                "motion_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0, "step": 0.05, "tooltip":
                                 "Extra factor on head motion only; 1 = official."}),
                "audio_guidance": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip":
                                   "How strongly lips follow the audio (official 7.5)."}),
                "appearance_guidance": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 10.0, "step": 0.1, "tooltip":
                                        "How strongly the video keeps the portrait's look (official 2.0)."}),
                "ip_audio_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3.0, "step": 0.05, "tooltip":
                                   "Strength of the audio cross-attention inside the UNet (official 1.0)."}),
                "output": (["auto", "images", "frames file"], {"default": "auto", "tooltip":
                           "images: a normal IMAGE batch. frames file: uint8 frames on disk for long videos "
                           "(IMAGE output is then one preview frame). auto: frames file above 4 GB of IMAGE."}),
            },
            "optional": {  # optional, so that API prompts written before it existed stay valid
                "compile": ("BOOLEAN", {"default": False, "tooltip":
                            "torch.compile the UNet: the first run at a new video size compiles (minutes), later "
                            "runs at that size are faster. Same video within float noise."}),
            },
        }

    def sample(self, sonic_model, predata, seed, steps=25, dynamic_scale=1.0, motion_scale=1.0, audio_guidance=7.5,
               appearance_guidance=2.0, ip_audio_scale=1.0, output="auto", compile=False):
        from ..sonic.engine import pipeline
        from ..sonic.post.frames import FrameStore, as_image_batch
        from ..sonic.params import SampleOptions

        models, cond = sonic_model.models, predata.cond
        options = SampleOptions(inference_steps=steps, seed=seed, dynamic_scale=dynamic_scale,
                                motion_scale=motion_scale, audio_guidance=audio_guidance,
                                min_appearance_guidance=appearance_guidance, max_appearance_guidance=appearance_guidance,
                                ip_audio_scale=ip_audio_scale, compile=compile)
        from ..sonic.engine import memory, offload

        bar = comfy.progress_bar(1)
        _, _, latent_h, latent_w = cond.image_latents.shape
        shape = (options.windows_per_call, options.frames_per_window, latent_h, latent_w, models.dtype)
        unet_bytes = offload.unit_bytes(models.unet)
        options.stream_unet = not compile and memory.choose_unet_streaming(
            comfy.usable_memory(models.device), unet_bytes, *shape, forced=comfy.unet_streaming_forced())
        if options.stream_unet:  # the UNet's weights stay in RAM; one block at a time visits the GPU
            largest = max(offload.unit_bytes(unit) for unit in offload.unet_units(models.unet))
            log.info("Sonic Sampler: UNet streaming (%.1f GB of weights in RAM, blocks of up to %.2f GB on the "
                     "device) and low-VRAM mode", unet_bytes / 1e9, largest / 1e9)
            options.sequential_guidance = True
            comfy.make_room(memory.streamed_unet(largest, *shape), models.device)
        else:
            sonic_model.load("unet", memory_required=memory.sampling(*shape))
            options.sequential_guidance = memory.choose_sequential_guidance(
                comfy.free_memory(models.device), *shape, forced=comfy.low_vram_forced())
            if options.sequential_guidance:
                log.info("Sonic Sampler: low-VRAM mode (guidance rows one after another)")
                sonic_model.load("unet", memory_required=memory.sampling(*shape, sequential_guidance=True))
        latents = pipeline.sample(models, cond, options, progress=lambda done, total: bar.update_absolute(done, total),
                                  cancel=comfy.check_interrupt)

        fps = pipeline.output_fps(options, models, cond.num_frames)
        count = pipeline.output_frame_count(options, models, cond.num_frames)
        width, height = cond.size
        store = FrameStore(height, width, count, fps, folder=comfy.folder_paths().get_temp_directory())
        sonic_model.load("image", "rife", memory_required=memory.decode(
            options.decode_chunk_size, options.interpolation_batch, height, width, models.dtype,
            fps > pipeline.audio_lib.GENERATED_FPS))
        decode_bar = comfy.progress_bar(count)
        for chunk in pipeline.decode(models, latents, options, cancel=comfy.check_interrupt):
            store.append(pipeline.to_uint8_frames(chunk))
            decode_bar.update(chunk.shape[0])
        store.flush()
        del latents

        _, _, intermediate = comfy.devices()
        audio = trim_audio(predata.audio, count / fps)
        images = store.images() if as_image_batch(output, count, height, width) else store.images(0, 1)
        return (images.to(intermediate), audio, float(fps), SonicFrames(store=store, audio=audio, fps=float(fps)))
