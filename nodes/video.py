"""SonicVideoEncode: frames (IMAGE batch or the sampler's frames file) + AUDIO -> an H.264/AAC MP4 in ComfyUI's
output folder, shown in the node as a playable video, and given on as its path and as ComfyUI's core VIDEO."""

from __future__ import annotations

import os
import re

from . import comfy
from .types import audio_to_numpy, video_source

# in an http(s) URL anywhere in a text, what signed links keep their secrets in (X-Amz-Signature, X-Amz-Credential,
# tokens): the query, and a user:password@ before the host
_URL_QUERY = re.compile(r"(?i)\b(https?://[^\s?#\"'<>]*)\?[^\s#\"'<>]+")
_URL_USERINFO = re.compile(r"(?i)\b(https?://)[^\s/?#@\"'<>]+@")


def redact_url_queries(value):
    """`value` (JSON-like) with the query of every http(s) URL in its texts replaced by `<redacted>` (a
    user:password@ too); everything else, structure included, as it was."""
    if isinstance(value, str):
        if "://" not in value:
            return value
        return _URL_USERINFO.sub(r"\1<redacted>@", _URL_QUERY.sub(r"\1?<redacted>", value))
    if isinstance(value, dict):
        return {key: redact_url_queries(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_url_queries(item) for item in value]
    return value


def generation_metadata(prompt, extra_pnginfo) -> dict[str, str]:
    """ComfyUI's prompt and workflow (dropping the MP4 on ComfyUI restores the graph) and the Sonic settings, with
    the queries of URLs in them redacted: a signed link typed into a loader does not travel with the video."""
    import json

    meta = {}
    if prompt:
        prompt = redact_url_queries(prompt)
        meta["prompt"] = json.dumps(prompt)
        sonic = {node["class_type"]: {k: v for k, v in node.get("inputs", {}).items() if not isinstance(v, list)}
                 for node in prompt.values() if str(node.get("class_type", "")).startswith("Sonic")}
        if sonic:
            meta["sonic_parameters"] = json.dumps(sonic)
    for key, value in (extra_pnginfo or {}).items():
        meta[key] = json.dumps(redact_url_queries(value))
    return meta


class SonicVideoEncode:
    DESCRIPTION = "Write an MP4 (H.264 + AAC, plays in the browser) to ComfyUI's output folder."
    CATEGORY = "Sonic"
    RETURN_TYPES = ("STRING", "VIDEO")  # new outputs are appended: saved workflows link outputs by slot number
    RETURN_NAMES = ("path", "video")
    OUTPUT_TOOLTIPS = ("Absolute path of the written MP4.",
                       "The written MP4 as ComfyUI's VIDEO, for its Save Video, Preview Video and other VIDEO inputs "
                       "(empty on a ComfyUI without the VIDEO type).")
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
            "optional": {  # added after 0.1 as optional, so saved workflows keep validating
                "preset": (["ultrafast", "veryfast", "fast", "medium", "slow", "veryslow"], {"default": "medium",
                           "tooltip": "x264 speed/size trade-off: slower presets give smaller files at the same quality."}),
                "audio_policy": (["match", "shortest", "keep"], {"default": "match", "tooltip":
                                 "match: cut or pad the audio with silence to the video's length. shortest: only cut. "
                                 "keep: keep all the audio, holding the last frame if it is longer."}),
                "watermark": ("STRING", {"default": "", "tooltip":
                              "Optional visible text in the bottom-left corner (e.g. 'AI-generated')."}),
                "images": ("IMAGE", {"tooltip": "Frames as an IMAGE batch (used when no frames file is connected)."}),
                "frames": ("SONIC_FRAMES", {"tooltip": "The sampler's frames file (long videos); preferred."}),
                "audio": ("AUDIO", {"tooltip": "Sound track (see audio_policy)."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def encode(self, fps, filename_prefix="Sonic/sonic", crf=18, preset="medium", audio_policy="match", watermark="",
               images=None, frames=None, audio=None, prompt=None, extra_pnginfo=None):
        from ..sonic.post.video_io import write_mp4

        count, height, width, read = video_source(images, frames, "Sonic Video Encode")
        if frames is not None and audio is None:
            audio = frames.audio
        fp = comfy.folder_paths()
        folder, name, counter, subfolder, _ = fp.get_save_image_path(filename_prefix, fp.get_output_directory(),
                                                                     width, height)
        os.makedirs(folder, exist_ok=True)
        filename = f"{name}_{counter:05}_.mp4"

        path = write_mp4(os.path.join(folder, filename), comfy.watched(read()), fps, width, height, count,
                         audio=audio_to_numpy(audio), crf=crf, preset=preset, audio_policy=audio_policy,
                         metadata=generation_metadata(prompt, extra_pnginfo), watermark=watermark.strip() or None)
        ui = {"images": [{"filename": filename, "subfolder": subfolder, "type": "output"}], "animated": [True]}
        return {"ui": ui, "result": (str(path), comfy.core_video(str(path)))}
