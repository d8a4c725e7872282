"""SonicVideoEncode: frames (IMAGE batch or the sampler's frames file) + AUDIO -> an H.264/AAC MP4 in ComfyUI's
output folder, shown in the node as a playable video."""

from __future__ import annotations

import os

from . import comfy

CHUNK = 32  # frames per write


def _image_chunks(images):
    for start in range(0, images.shape[0], CHUNK):
        yield (images[start : start + CHUNK, :, :, :3].float().clamp(0, 1) * 255).round().byte().cpu().numpy()


def _audio_arg(audio):
    if audio is None:
        return None
    waveform = audio["waveform"][0].float().cpu().numpy()  # [channels, samples]
    if waveform.shape[-1] == 0:
        raise ValueError("the audio is empty (0 samples); connect the sampler's audio output or remove the link")
    return waveform, int(audio["sample_rate"])


class SonicVideoEncode:
    DESCRIPTION = "Write an MP4 (H.264 + AAC, plays in the browser) to ComfyUI's output folder."
    CATEGORY = "Sonic"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Absolute path of the written MP4.",)
    OUTPUT_NODE = True
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "fps": ("FLOAT", {"default": 25.0, "min": 1.0, "max": 120.0, "step": 0.5, "forceInput": True,
                                  "tooltip": "Frame rate, from the sampler's fps output."}),
                "filename_prefix": ("STRING", {"default": "Sonic/sonic", "tooltip":
                                    "Name (and subfolder) in the output folder; a counter is appended."}),
                "crf": ("INT", {"default": 18, "min": 0, "max": 51, "tooltip": "H.264 quality: lower is better."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Frames as an IMAGE batch (used when no frames file is connected)."}),
                "frames": ("SONIC_FRAMES", {"tooltip": "The sampler's frames file (long videos); preferred."}),
                "audio": ("AUDIO", {"tooltip": "Sound track; cut to the video's length."}),
            },
        }

    def encode(self, fps, filename_prefix="Sonic/sonic", crf=18, images=None, frames=None, audio=None):
        from ..sonic.video_io import write_mp4

        if frames is not None:
            count, height, width = len(frames.store), frames.store.height, frames.store.width
            chunks = frames.store.chunks(CHUNK)
            audio = audio if audio is not None else frames.audio
        elif images is not None:
            count, height, width = images.shape[0], images.shape[1], images.shape[2]
            chunks = _image_chunks(images)
        else:
            raise ValueError("connect images or frames (from Sonic Sampler) to Sonic Video Encode")
        if count == 0:
            raise ValueError("there are no frames to encode (empty image batch)")
        fp = comfy.folder_paths()
        folder, name, counter, subfolder, _ = fp.get_save_image_path(filename_prefix, fp.get_output_directory(),
                                                                     width, height)
        os.makedirs(folder, exist_ok=True)
        filename = f"{name}_{counter:05}_.mp4"

        def checked(chunks):
            for chunk in chunks:
                comfy.check_interrupt()
                yield chunk

        path = write_mp4(os.path.join(folder, filename), checked(chunks), fps, width, height, count,
                         audio=_audio_arg(audio), crf=crf)
        ui = {"images": [{"filename": filename, "subfolder": subfolder, "type": "output"}], "animated": [True]}
        return {"ui": ui, "result": (str(path),)}
