"""Synthetic talking videos for lip-sync tests: real speech from espeak-ng and a real face photo whose mouth
opens in time with that speech's phonemes.

espeak-ng's C API (libespeak-ng) synthesises the speech and reports when each phoneme starts. The mouth
opening is a function of time built from those phonemes alone (open vowels wide, rounded/close vowels less,
lips shut on m/b/p, pauses closed, eased between phoneme centres the way lips coarticulate), never from the
audio signal, so the audio/mouth relation in these clips is as indirect as in real speech. A frame shown at
time t draws the mouth as it is at t - offset, with the offset in continuous time (any fraction of a frame).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

import numpy as np

FACE_BOX = (72.0, 57.0, 109.0, 109.0)  # x, y, w, h of the face in the 256x256 frames (dlib on the photo)
_CROP = (94, 10)  # left, top of the 256x256 frame in skimage's 512x512 astronaut photo
_MOUTH = (128.0, 136.0)  # mouth centre in the frame
_HALF_WIDTH = 15.0

SENTENCES = (
    "Hello there, this is a short test of the talking head. We measure how well the lips follow the voice.",
    "Please bring me the map of the old harbour, and maybe a cup of warm tea before we go.",
    "My father always said that a good story needs a beginning, a middle, and a surprising end.",
)


@dataclass
class Speech:
    samples: np.ndarray  # float32 mono
    sample_rate: int
    phonemes: list[tuple[float, str]]  # (start time s, espeak phoneme mnemonic)


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _EventId)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))
_SYNCHRONOUS, _PHONEME_EVENTS, _EVENT_PHONEME, _POS_CHARACTER = 2, 1, 7, 1
_LIB = None


def espeak_library():
    """The loaded libespeak-ng, or None when Debian's espeak-ng is not installed."""
    global _LIB
    if _LIB is None:
        name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            return None
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        rate = lib.espeak_Initialize(_SYNCHRONOUS, 0, None, _PHONEME_EVENTS)
        if rate <= 0:
            return None
        lib.sample_rate = rate
        _LIB = lib
    return _LIB


def synthesize(text: str, voice: str = "en") -> Speech:
    lib = espeak_library()
    if lib is None:
        raise RuntimeError("libespeak-ng not found: apt-get install espeak-ng")
    chunks, phonemes = [], []

    def on_audio(wav, count, events):
        if count > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        i = 0
        while events[i].type != 0:
            if events[i].type == _EVENT_PHONEME:
                phonemes.append((events[i].sample / lib.sample_rate, events[i].id.string.decode()))
            i += 1
        return 0

    callback = _CALLBACK(on_audio)
    lib.espeak_SetSynthCallback(callback)
    lib.espeak_SetVoiceByName(voice.encode())
    data = text.encode()
    lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, 0, None, None)
    lib.espeak_Synchronize()
    samples = np.concatenate(chunks).astype(np.float32) / 32768.0
    return Speech(samples, lib.sample_rate, phonemes)


_WIDE = ("a", "A", "0", "O", "V", "Q", "aI", "aU", "a#", "O@", "O:", "A:", "A@", "e@", "aI@", "aU@")
_MID = ("E", "e", "eI", "@", "3", "3:", "@L", "@2", "@5", "I@", "U@", "oU", "OI")
_CLOSE = ("i", "i:", "I", "I2", "u", "u:", "U", "i@")


def openness(phoneme: str) -> float:
    """How far the jaw/lips open for an espeak-ng phoneme (0 shut, 1 wide)."""
    name = phoneme.strip("'%,=")
    if name in _WIDE:
        return 1.0
    if name in _MID:
        return 0.7
    if name in _CLOSE:
        return 0.45
    if name in ("m", "b", "p"):
        return 0.0
    if name in ("f", "v", "w"):
        return 0.1
    if name.startswith("_") or not name:
        return 0.0
    return 0.25


def mouth_track(speech: Speech, rate: float = 1000.0) -> np.ndarray:
    """Mouth opening sampled at `rate` Hz over the speech: targets at phoneme centres, eased in between."""
    duration = len(speech.samples) / speech.sample_rate
    starts = [t for t, _ in speech.phonemes] + [duration]
    centres = [0.5 * (starts[i] + starts[i + 1]) for i in range(len(speech.phonemes))]
    targets = [openness(p) for _, p in speech.phonemes]
    t = np.arange(int(duration * rate) + 1) / rate
    track = np.interp(t, [0.0] + centres + [duration], [0.0] + targets + [0.0])
    sigma = 0.02 * rate  # 20 ms of coarticulation smoothing
    kernel = np.exp(-0.5 * (np.arange(-4 * sigma, 4 * sigma + 1) / sigma) ** 2)
    return np.convolve(track, kernel / kernel.sum(), mode="same")


def _base_frame() -> np.ndarray:
    from skimage import data

    left, top = _CROP
    return data.astronaut()[top : top + 256, left : left + 256].astype(np.float32)


def render(track: np.ndarray, n_frames: int, fps: float, offset_s: float = 0.0, noise: float = 2.0,
           sway_px: float = 0.0, seed: int = 0, rate: float = 1000.0, jitter_px: float = 0.0) -> np.ndarray:
    """uint8 [n, 256, 256, 3]: frame k shows the mouth as it is at k / fps - offset_s (positive offset = the
    picture is late against the audio), plus camera noise, an optional slow head sway and an optional camera
    jitter (the whole frame moved jitter_px right on even frames, left on odd ones: 2 x jitter_px frame to frame).
    The noise does not depend on the motion: the same seed without sway or jitter gives the steady clip."""
    import cv2

    rng = np.random.default_rng(seed)
    base = _base_frame()
    cx, cy = _MOUTH
    # the mouth is drawn only inside this window: outside it (r > 1.75 for any opening) the frame is the photo
    y0, y1, x0, x1 = int(cy) - 20, int(cy) + 30, int(cx) - 30, int(cx) + 30
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    frames = np.empty((n_frames, 256, 256, 3), np.uint8)
    for k in range(n_frames):
        t = k / fps - offset_s
        amount = float(np.interp(t * rate, np.arange(len(track)), track, left=0.0, right=0.0))
        half_height = 1.0 + 9.0 * amount
        r = np.sqrt(((xs - cx) / _HALF_WIDTH) ** 2 + ((ys - cy - 0.4 * half_height) / half_height) ** 2)
        edge = np.clip((1.0 - r) * min(_HALF_WIDTH, half_height) + 0.5, 0.0, 1.0)[..., None]
        lips = np.clip((1.25 - r) * min(_HALF_WIDTH, half_height) + 0.5, 0.0, 1.0)[..., None] - edge
        frame = base.copy()
        frame[y0:y1, x0:x1] = (base[y0:y1, x0:x1] * (1 - edge - lips) + edge * np.float32([60, 20, 28])
                               + lips * np.float32([170, 80, 85]))
        if sway_px or jitter_px:
            dx, dy = sway_px * np.sin(2 * np.pi * 0.3 * k / fps), 0.5 * sway_px * np.sin(2 * np.pi * 0.2 * k / fps)
            dx += jitter_px * (-1.0) ** k
            frame = cv2.warpAffine(frame, np.float32([[1, 0, dx], [0, 1, dy]]), (256, 256),
                                   flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        frame = frame + rng.normal(0.0, noise, frame.shape)
        frames[k] = np.clip(np.round(frame), 0, 255).astype(np.uint8)
    return frames


def talking_clip(speech: Speech, fps: float = 25.0, offset_s: float = 0.0, **kwargs) -> np.ndarray:
    n_frames = int(len(speech.samples) / speech.sample_rate * fps)
    return render(mouth_track(speech), n_frames, fps, offset_s, **kwargs)
