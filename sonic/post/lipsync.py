"""Lip-sync calibration without a trained sync model: how far the mouth runs behind (or ahead of) the voice.

1. Mouth signal, one number per frame: the lower face (from the face box) is tracked against the first frame
   (phase correlation on the upper face, so head motion does not move the region), cut out, shrunk to a small
   grey patch, and the patches' first principal component over time is taken as the mouth's opening (its
   sign set so that "open" is the darker direction: an open mouth shows its dark inside).
2. Audio envelope: RMS amplitude in 20 ms windows every millisecond, then averaged over one frame's duration
   around each frame time shifted by a candidate lag.
3. Pearson correlation of the two for every lag on a 1 ms grid in the search range; the peak, refined by a
   parabola through its neighbours, is the offset and the peak correlation is the confidence.

`offset_s` > 0 means the picture is late against the sound (the mouth opens after the sound): it is
corrected by delaying the audio that much (silence padded in front); < 0 by cutting the audio's start. The
frames are never dropped or duplicated.

Acoustic energy and visible opening are not simultaneous in speech (the mouth opens before the vowel is
loud and closes after), so a perfectly synced video measures a small non-zero raw lag: `MOUTH_AUDIO_BIAS_S`,
calibrated on synced material (benchmarks/lipsync_accuracy.py), is subtracted from every measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

# Raw offset of synced clips: 18.4 ms mean, 1.5 ms std over 9 synthetic clips (3 espeak-ng sentences x 3 noise
# seeds, mouth keyed to the phonemes; benchmarks/lipsync_accuracy.py). The picture reads late because the
# loudness of a syllable peaks before the mouth's widest opening in that material.
MOUTH_AUDIO_BIAS_S = 0.018
ENVELOPE_RATE = 1000  # envelope samples per second (the lag grid is 1 ms)
ENVELOPE_WINDOW_S = 0.02
PATCH_SIZE = (32, 24)  # width, height of the mouth patch the signal is computed on
DEFAULT_SEARCH_S = 0.4
DEFAULT_MIN_CONFIDENCE = 0.4
DEFAULT_TOLERANCE_S = 0.01
MODES = ("auto", "manual", "auto+manual")


@dataclass
class LipSyncEstimate:
    offset_s: float  # picture late against sound by this much (bias removed); the audio delay that fixes it
    confidence: float  # peak correlation between mouth signal and audio envelope, in [-1, 1]
    raw_offset_s: float  # before removing MOUTH_AUDIO_BIAS_S
    at_edge: bool = False  # the peak is at the end of the search range: the true offset may lie beyond it
    lags_s: np.ndarray = field(repr=False, default=None)  # candidate offsets (picture lateness)
    correlation: np.ndarray = field(repr=False, default=None)  # correlation at each candidate


def mouth_region(face_box, width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the lower face - mouth, lips and jaw - from a face box (x, y, w, h)."""
    x, y, w, h = face_box
    if w <= 0 or h <= 0:
        raise ValueError(f"face box {face_box} has no area; give x, y, w, h with positive w and h")
    x0, x1 = int(round(x + 0.15 * w)), int(round(x + 0.85 * w))
    y0, y1 = int(round(y + 0.55 * h)), int(round(y + 1.05 * h))
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x1 - x0 < 8 or y1 - y0 < 6:
        raise ValueError(f"the mouth region of face box {face_box} is outside the {width}x{height} frames or "
                         "too small: check the face box (x, y, w, h in pixels of the video)")
    return x0, y0, x1, y1


def mouth_features(chunks: Iterable[np.ndarray], face_box, track: bool = True) -> np.ndarray:
    """[N, P] float32 grey mouth patches (PATCH_SIZE) from uint8 [n, H, W, 3] chunks, read once."""
    import cv2

    from .smoothing import region_weights

    rows, reference, weights, region = [], None, None, None
    for chunk in chunks:
        if chunk.ndim != 4 or chunk.shape[-1] != 3:
            raise ValueError(f"frames must be [n, H, W, 3], got {chunk.shape}")
        for frame in chunk:
            gray = frame.astype(np.float32).mean(axis=2)
            if region is None:
                height, width = gray.shape
                region = mouth_region(face_box, width, height)
                weights = region_weights(height, width, "face without mouth", face_box) if track else None
                reference = gray * weights if track else None
            dx = dy = 0.0
            if track and reference is not None:
                (dx, dy), _ = cv2.phaseCorrelate(reference, gray * weights)
            x0, y0, x1, y1 = region
            centre = ((x0 + x1 - 1) / 2 + dx, (y0 + y1 - 1) / 2 + dy)
            patch = cv2.getRectSubPix(gray, (x1 - x0, y1 - y0), centre)
            rows.append(cv2.resize(patch, PATCH_SIZE, interpolation=cv2.INTER_AREA).ravel())
    if not rows:
        raise ValueError("there are no frames to measure lip-sync on (empty video)")
    return np.stack(rows)


def mouth_signal(features: np.ndarray) -> np.ndarray:
    """[N] mouth opening: the patches' first principal component, oriented so that darker = more open."""
    centred = features - features.mean(axis=0)
    covariance = centred.T @ centred
    _, vectors = np.linalg.eigh(covariance)
    component = vectors[:, -1]
    score = centred @ component
    darkness = -centred.mean(axis=1)
    if float(score @ darkness) < 0:
        score = -score
    return score


def audio_envelope(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """RMS amplitude of mono audio in ENVELOPE_WINDOW_S windows, one value per 1 / ENVELOPE_RATE seconds
    (value i is centred on time i / ENVELOPE_RATE)."""
    samples = np.asarray(samples, np.float64)
    if samples.ndim != 1:
        raise ValueError(f"audio must be mono samples [n], got shape {samples.shape}")
    power = np.concatenate([[0.0], np.cumsum(samples**2)])
    half = max(1, int(round(ENVELOPE_WINDOW_S * sample_rate / 2)))
    centres = np.round(np.arange(int(len(samples) * ENVELOPE_RATE / sample_rate) + 1) * sample_rate
                       / ENVELOPE_RATE).astype(np.int64)
    lo, hi = np.clip(centres - half, 0, len(samples)), np.clip(centres + half, 0, len(samples))
    return np.sqrt((power[hi] - power[lo]) / (2 * half))


def _pearson_rows(x: np.ndarray, ys: np.ndarray) -> np.ndarray:
    x = x - x.mean()
    ys = ys - ys.mean(axis=1, keepdims=True)
    denominator = np.sqrt((x**2).sum() * (ys**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, ys @ x / np.maximum(denominator, 1e-30), 0.0)


def estimate_offset(mouth: np.ndarray, fps: float, samples: np.ndarray, sample_rate: int,
                    search_s: float = DEFAULT_SEARCH_S) -> LipSyncEstimate:
    """Offset of the picture against the sound from a per-frame mouth signal and mono audio."""
    mouth = np.asarray(mouth, np.float64)
    if len(mouth) < 8:
        raise ValueError(f"lip-sync needs at least 8 frames, got {len(mouth)}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not 0 < search_s <= 2:
        raise ValueError(f"the search range must be in (0, 2] seconds, got {search_s}")
    envelope = audio_envelope(samples, sample_rate)
    if not np.any(envelope > 0):
        raise ValueError("the audio is silent: lip-sync cannot be measured against it")
    # Mean envelope over one frame period around (frame time - lag), from a cumulative sum; silence outside.
    rate = ENVELOPE_RATE
    max_lag = int(round(search_s * rate))
    half = max(1, int(round(rate / fps / 2)))
    pad = max_lag + half + 2
    cumulative = np.concatenate([[0.0], np.cumsum(np.pad(envelope, (pad, pad + int(len(mouth) * rate / fps))))])
    frame_times = np.round(np.arange(len(mouth)) * rate / fps).astype(np.int64) + pad
    lags = np.arange(-max_lag, max_lag + 1)
    centres = frame_times[None, :] - lags[:, None]  # picture late by lag: its frame k shows audio time k/fps - lag
    windows = (cumulative[centres + half + 1] - cumulative[centres - half]) / (2 * half + 1)
    correlation = _pearson_rows(mouth, windows)
    best = int(np.argmax(correlation))
    refined = float(lags[best])
    if 0 < best < len(lags) - 1:
        a, b, c = correlation[best - 1 : best + 2]
        curvature = a - 2 * b + c
        if curvature < 0:
            refined += 0.5 * (a - c) / curvature
    raw = refined / rate
    return LipSyncEstimate(offset_s=raw - MOUTH_AUDIO_BIAS_S, confidence=float(correlation[best]), raw_offset_s=raw,
                           at_edge=best in (0, len(lags) - 1), lags_s=lags / rate, correlation=correlation)


def measure(chunks: Iterable[np.ndarray], fps: float, samples: np.ndarray, sample_rate: int, face_box,
            search_s: float = DEFAULT_SEARCH_S, track: bool = True) -> LipSyncEstimate:
    """Lip-sync offset of uint8 frame chunks against mono audio (see the module docstring)."""
    signal = mouth_signal(mouth_features(chunks, face_box, track=track))
    return estimate_offset(signal, fps, samples, sample_rate, search_s)


def shift_audio(waveform: np.ndarray, sample_rate: int, delay_s: float) -> np.ndarray:
    """Delay audio ([..., samples]) by `delay_s` seconds: silence in front when positive, its start cut when
    negative. Rounded to the nearest sample."""
    waveform = np.asarray(waveform)
    count = int(round(abs(delay_s) * sample_rate))
    if count == 0:
        return waveform.copy()
    if delay_s > 0:
        silence = np.zeros(waveform.shape[:-1] + (count,), waveform.dtype)
        return np.concatenate([silence, waveform], axis=-1)
    if count >= waveform.shape[-1]:
        raise ValueError(f"cannot advance the audio by {-delay_s:.3f} s: it is only "
                         f"{waveform.shape[-1] / sample_rate:.3f} s long")
    return waveform[..., count:].copy()


@dataclass
class Correction:
    delay_s: float  # applied to the audio (positive = later)
    measured: LipSyncEstimate | None
    applied_auto: bool
    message: str
    warn: bool = False  # a measurement was made but not trusted (low confidence, or the search range's end)


def plan_correction(mode: str, manual_s: float, estimate: LipSyncEstimate | None,
                    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
                    tolerance_s: float = DEFAULT_TOLERANCE_S) -> Correction:
    """The audio delay for a mode: auto (measured), manual (`manual_s` only) or auto+manual (their sum). The
    measurement is not applied when its confidence is below `min_confidence` or it is within `tolerance_s`."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    delay, applied, warn, notes = 0.0, False, False, []
    if mode != "manual":
        if estimate is None:
            raise ValueError(f"mode {mode!r} needs a measurement")
        if estimate.confidence < min_confidence:
            warn = True
            notes.append(f"lip-sync NOT corrected: confidence {estimate.confidence:.2f} is below {min_confidence:.2f} "
                         f"(measured offset {estimate.offset_s * 1000:+.1f} ms is unreliable; check the face box "
                         "or use mode 'manual')")
        elif estimate.at_edge:
            warn = True
            notes.append(f"lip-sync NOT corrected: the best match is at the end of the search range "
                         f"({estimate.offset_s * 1000:+.0f} ms), so the true offset may be larger; widen the search "
                         "range or use mode 'manual'")
        elif abs(estimate.offset_s) <= tolerance_s:
            notes.append(f"lip-sync within tolerance: {estimate.offset_s * 1000:+.1f} ms "
                         f"(confidence {estimate.confidence:.2f}), not corrected")
        else:
            delay, applied = estimate.offset_s, True
            notes.append(f"lip-sync offset {estimate.offset_s * 1000:+.1f} ms (confidence {estimate.confidence:.2f})")
    if mode != "auto" and manual_s:
        delay += manual_s
        notes.append(f"manual offset {manual_s * 1000:+.1f} ms")
    notes.append(f"audio delayed by {delay * 1000:+.1f} ms")
    return Correction(delay_s=delay, measured=estimate, applied_auto=applied, message="; ".join(notes),
                      warn=warn)


def mono(waveform: np.ndarray) -> np.ndarray:
    """[channels, samples] or [samples] -> [samples] (channel mean)."""
    waveform = np.asarray(waveform, np.float32)
    return waveform.mean(axis=0) if waveform.ndim == 2 else waveform


def calibrate(chunks: Iterable[np.ndarray] | None, fps: float, waveform: np.ndarray, sample_rate: int, face_box,
              mode: str = "auto", manual_s: float = 0.0, search_s: float = DEFAULT_SEARCH_S,
              tolerance_s: float = DEFAULT_TOLERANCE_S, min_confidence: float = DEFAULT_MIN_CONFIDENCE,
              track: bool = True) -> tuple[Correction, np.ndarray]:
    """Measure (unless mode is 'manual') and correct: -> (the correction, the shifted [..., samples] audio).

    `chunks` are the video's uint8 [n, H, W, 3] frames, read once (ignored in 'manual' mode)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if not abs(manual_s) <= 5:
        raise ValueError(f"the manual lip-sync offset must be within +-5 s, got {manual_s}")
    estimate = None
    if mode != "manual":
        if face_box is None:
            raise ValueError("automatic lip-sync needs the face box (x, y, w, h) of the video")
        estimate = measure(chunks, fps, mono(waveform), sample_rate, face_box, search_s, track=track)
    correction = plan_correction(mode, manual_s, estimate, min_confidence, tolerance_s)
    return correction, shift_audio(waveform, sample_rate, correction.delay_s)
