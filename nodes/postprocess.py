"""SonicSmoothMotion: remove head/camera jitter without delaying the motion (see sonic/smoothing.py)."""

from __future__ import annotations

from . import comfy
from .sampling import SonicFrames, parse_face_box
from .video import CHUNK, image_chunks


class SonicSmoothMotion:
    DESCRIPTION = ("Remove frame-to-frame jitter by moving whole frames along a zero-phase smoothed trajectory "
                   "(no delay, so lip-sync is kept; pixels are moved, never blended, so the mouth cannot ghost).")
    CATEGORY = "Sonic"
    RETURN_TYPES = ("IMAGE", "SONIC_FRAMES")
    RETURN_NAMES = ("images", "frames")
    OUTPUT_TOOLTIPS = ("Smoothed frames as an IMAGE batch (one preview frame when a frames file came in).",
                       "Smoothed frames file (when a frames file came in), for Sonic Video Encode.")
    FUNCTION = "smooth"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "alpha": ("FLOAT", {"default": 0.3, "min": 0.02, "max": 1.0, "step": 0.01, "tooltip":
                          "EMA weight of each new frame: lower = smoother (0.3 mild, 0.1 strong, 1 = off)."}),
                "region": (["frame", "face", "face without mouth"], {"default": "face without mouth", "tooltip":
                           "Where motion is measured: the whole frame, the face, or the face without its mouth "
                           "(so speaking is not mistaken for head motion). The whole frame is moved."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Frames as an IMAGE batch (used when no frames file is connected)."}),
                "frames": ("SONIC_FRAMES", {"tooltip": "The sampler's frames file (long videos); preferred."}),
                "predata": ("SONIC_PREDATA", {"tooltip": "Supplies the face box for the face regions."}),
                "face_box": ("STRING", {"default": "", "tooltip": "Face box x,y,w,h in video pixels (overrides predata)."}),
            },
        }

    def smooth(self, alpha=0.3, region="face without mouth", images=None, frames=None, predata=None, face_box=""):
        import torch

        from ..sonic.frames import FrameStore
        from ..sonic.smoothing import mask_box, smooth_video

        box = parse_face_box(face_box)
        if box is None and predata is not None:
            box = mask_box(predata.cond.face_mask[0, 0].numpy())  # the face mask is in video pixels
        if region != "frame" and box is None:
            raise ValueError(f"region '{region}' needs the face: connect predata or give face_box, or use region 'frame'")
        if frames is not None:
            store = frames.store
            height, width, count = store.height, store.width, len(store)
            read = lambda: store.chunks(CHUNK)  # noqa: E731
        elif images is not None:
            count, height, width = images.shape[0], images.shape[1], images.shape[2]
            read = lambda: image_chunks(images)  # noqa: E731
        else:
            raise ValueError("connect images or frames (from Sonic Sampler) to Sonic Smooth Motion")
        if count == 0:
            raise ValueError("there are no frames to smooth (empty batch)")
        fps = frames.fps if frames is not None else 25.0
        out = FrameStore(height, width, count, fps, folder=comfy.folder_paths().get_temp_directory())
        bar = comfy.progress_bar(count)
        for chunk in smooth_video(read, height, width, alpha, region, box):
            comfy.check_interrupt()
            out.append(chunk)
            bar.update(chunk.shape[0])
        out.flush()
        _, _, intermediate = comfy.devices()
        result = out.images() if frames is None else out.images(0, 1)
        handle = SonicFrames(store=out, audio=frames.audio if frames is not None else None, fps=fps)
        return (result.to(intermediate, torch.float32), handle)
