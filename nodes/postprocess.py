"""SonicSmoothMotion: remove head/camera jitter without delaying the motion (see sonic/post/smoothing.py)."""

from __future__ import annotations

from . import comfy
from .types import SonicFrames, audio_to_numpy, face_box_in_video, video_source


class SonicSmoothMotion:
    DESCRIPTION = ("Remove frame-to-frame jitter by moving whole frames along a zero-phase smoothed trajectory "
                   "(no delay, so lip-sync is kept; pixels are moved, never blended, so the mouth cannot ghost).")
    CATEGORY = "Sonic"
    RETURN_TYPES = ("IMAGE", "SONIC_FRAMES")
    RETURN_NAMES = ("images", "frames")
    OUTPUT_TOOLTIPS = ("Smoothed frames as an IMAGE batch (one preview frame when a frames file came in).",
                       "Smoothed frames file (only when a frames file came in; None for IMAGE input), for Sonic Video Encode.")
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

        from ..sonic.post.frames import FrameStore
        from ..sonic.post.smoothing import smooth_video

        box = face_box_in_video(face_box, predata, "Sonic Smooth Motion")
        if region != "frame" and box is None:
            raise ValueError(f"region '{region}' needs the face: connect predata or give face_box, or use region 'frame'")
        count, height, width, read = video_source(images, frames, "Sonic Smooth Motion")
        # the frames file carries its fps; IMAGE input has none here, so no frames file comes out for it (one
        # stamped with a guessed rate would override the fps the next node is given)
        fps = frames.fps if frames is not None else 25.0
        out = FrameStore(height, width, count, fps, folder=comfy.folder_paths().get_temp_directory())
        for chunk in comfy.watched(smooth_video(read, height, width, alpha, region, box), comfy.progress_bar(count)):
            out.append(chunk)
        out.flush()
        _, _, intermediate = comfy.devices()
        if frames is None:
            result = out.images()
            out.close()
            return (result.to(intermediate, torch.float32), None)
        handle = SonicFrames(store=out, audio=frames.audio, fps=fps)
        return (out.images(0, 1).to(intermediate, torch.float32), handle)


class SonicLipSyncCalibrate:
    DESCRIPTION = ("Measure how far the mouth runs behind or ahead of the voice (mouth region against the audio "
                   "envelope, no sync model) and correct it by shifting the audio; frames are never dropped or "
                   "duplicated. Positive offset = the picture is late, fixed by delaying the audio.")
    CATEGORY = "Sonic"
    RETURN_TYPES = ("IMAGE", "SONIC_FRAMES", "AUDIO", "FLOAT", "FLOAT")
    RETURN_NAMES = ("images", "frames", "audio", "offset", "confidence")
    OUTPUT_TOOLTIPS = (
        "The frames, unchanged (one preview frame when a frames file came in).",
        "The frames file with the corrected audio attached (when a frames file came in).",
        "The corrected audio (delayed or advanced by the applied offset).",
        "Measured offset in seconds: positive = the mouth moves after the sound (0 in manual mode).",
        "Confidence of the measurement: the peak correlation of mouth and audio (0 in manual mode).",
    )
    FUNCTION = "calibrate"

    @classmethod
    def INPUT_TYPES(cls):
        from ..sonic.post import lipsync

        return {
            "required": {
                "fps": ("FLOAT", {"default": 25.0, "min": 1.0, "max": 240.0, "step": 0.001, "forceInput": True,
                        "tooltip": "Frame rate of the images (the sampler's fps); a frames file brings its own."}),
                "mode": (list(lipsync.MODES), {"default": "auto+manual", "tooltip":
                         "auto: measure and correct. manual: only apply lip_sync_offset. auto+manual: both added."}),
                "lip_sync_offset": ("FLOAT", {"default": 0.0, "min": -2.0, "max": 2.0, "step": 0.005, "tooltip":
                                    "Extra audio delay in seconds (e.g. +0.03 to make up for a playback chain that "
                                    "shows the picture 30 ms late). Positive = audio later."}),
                "search_range": ("FLOAT", {"default": lipsync.DEFAULT_SEARCH_S, "min": 0.05, "max": 2.0,
                                 "step": 0.05, "tooltip": "Largest offset searched, in seconds either way."}),
                "tolerance": ("FLOAT", {"default": lipsync.DEFAULT_TOLERANCE_S, "min": 0.0, "max": 0.5,
                              "step": 0.005, "tooltip": "Measured offsets this small (seconds) are left alone."}),
                "min_confidence": ("FLOAT", {"default": lipsync.DEFAULT_MIN_CONFIDENCE, "min": 0.0, "max": 1.0,
                                   "step": 0.05, "tooltip": "Below this confidence the measurement is not applied "
                                   "(a warning is logged)."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Frames as an IMAGE batch (used when no frames file is connected)."}),
                "frames": ("SONIC_FRAMES", {"tooltip": "The sampler's frames file (long videos); preferred."}),
                "audio": ("AUDIO", {"tooltip": "The sound track to align (default: the frames file's audio)."}),
                "predata": ("SONIC_PREDATA", {"tooltip": "Supplies the face box (where the mouth is)."}),
                "face_box": ("STRING", {"default": "", "tooltip": "Face box x,y,w,h in video pixels (overrides "
                             "predata); empty = from predata, else detected on the first frame."}),
            },
        }

    def calibrate(self, fps=25.0, mode="auto+manual", lip_sync_offset=0.0, search_range=0.4, tolerance=0.01,
                  min_confidence=0.4, images=None, frames=None, audio=None, predata=None, face_box=""):
        import logging

        import torch

        from ..sonic.post import lipsync

        count, _, _, read = video_source(images, frames, "Sonic Lip-Sync Calibrate")
        fps = frames.fps if frames is not None else fps
        audio = audio if audio is not None else (frames.audio if frames is not None else None)
        if audio is None:
            raise ValueError("connect the audio to align (Sonic Sampler's audio output) to Sonic Lip-Sync Calibrate")
        waveform, rate = audio_to_numpy(audio)

        box = None
        if mode != "manual":
            box = face_box_in_video(face_box, predata, "Sonic Lip-Sync Calibrate")
            if box is None:
                from ..sonic.inputs.face import DlibFaceDetector, NoFaceError, largest_face

                try:
                    box = largest_face(DlibFaceDetector(), next(read())[0], "the video's first frame")[:4]
                except NoFaceError as exc:
                    raise exc.with_hint("connect predata, or type the face box into the face_box widget as "
                                        "x,y,w,h (video pixels)") from None
        correction, shifted = lipsync.calibrate(
            comfy.watched(read(), comfy.progress_bar(count)) if mode != "manual" else None, fps, waveform, rate, box,
            mode=mode, manual_s=lip_sync_offset, search_s=search_range, tolerance_s=tolerance,
            min_confidence=min_confidence)
        log = logging.getLogger("sonic")
        log.log(logging.WARNING if correction.warn else logging.INFO, "Sonic Lip-Sync Calibrate: %s", correction.message)
        measured = correction.measured
        corrected = {"waveform": torch.from_numpy(shifted)[None].to(audio["waveform"].dtype), "sample_rate": rate}
        _, _, intermediate = comfy.devices()
        if frames is not None:
            preview = frames.store.images(0, 1).to(intermediate, torch.float32)
            handle = SonicFrames(store=frames.store, audio=corrected, fps=fps)
        else:
            preview, handle = images, None
        offset = float(measured.offset_s) if measured is not None else 0.0
        confidence = float(measured.confidence) if measured is not None else 0.0
        # in the prompt's history (batch manifests read it) and in the node's UI message
        ui = {"lipsync": [{"offset_s": round(offset, 4), "confidence": round(confidence, 4),
                           "applied_s": round(float(correction.delay_s), 4), "warning": bool(correction.warn),
                           "message": correction.message}]}
        return {"ui": ui, "result": (preview, handle, corrected, offset, confidence)}
