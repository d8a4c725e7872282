"""SonicPreData (portrait + audio -> conditioning) and SonicSampler (conditioning -> frames, audio, fps)."""

from __future__ import annotations

import logging

from . import comfy
from .types import SonicFrames, SonicPreData, image_to_pil, parse_face_box, trim_audio

log = logging.getLogger(__name__)

_FACE_CACHE = None  # sonic.inputs.face.FaceCache, made on first use (importing the engine here would import torch)


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
        from ..sonic.engine.plan import prepare_bytes

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
        # one request for everything prepare runs (the face detector stays on the offload device)
        sonic_model.load("audio", "vae", "clip", memory_required=prepare_bytes(pil.size, options, models.vae.dtype))
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
        from ..sonic.engine.plan import DeviceMemory, plan_run
        from ..sonic.post.frames import FrameStore, as_image_batch
        from ..sonic.params import SampleOptions

        models, cond = sonic_model.models, predata.cond
        options = SampleOptions(inference_steps=steps, seed=seed, dynamic_scale=dynamic_scale,
                                motion_scale=motion_scale, audio_guidance=audio_guidance,
                                min_appearance_guidance=appearance_guidance, max_appearance_guidance=appearance_guidance,
                                ip_audio_scale=ip_audio_scale, compile=compile)
        device = models.device
        plan = plan_run(models, cond, options, DeviceMemory(usable_bytes=comfy.usable_memory(device),
                                                            force_low_vram=comfy.low_vram_forced(),
                                                            force_stream_unet=comfy.unet_streaming_forced()))
        if plan.options.stream_unet:  # the UNet's weights stay in RAM; one block at a time visits the GPU
            comfy.make_room(plan.unet_call_bytes(), device)
        else:
            sonic_model.load("unet", memory_required=plan.unet_call_bytes())
            measured = plan.with_free_memory(comfy.free_memory(device))
            if measured is not plan:  # low-VRAM rows after all: ComfyUI is asked for what they need
                plan = measured
                sonic_model.load("unet", memory_required=plan.unet_call_bytes())
        if plan.note:
            log.info("Sonic Sampler: %s", plan.note)
        options = plan.options
        bar = comfy.progress_bar(1)
        latents = pipeline.sample(models, cond, options, progress=lambda done, total: bar.update_absolute(done, total),
                                  cancel=comfy.check_interrupt)

        fps, count = plan.fps, plan.output_frames
        width, height = plan.width, plan.height
        store = FrameStore(height, width, count, fps, folder=comfy.folder_paths().get_temp_directory())
        sonic_model.load("vae", *(("rife",) if plan.rife else ()), memory_required=plan.decode_bytes)
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
