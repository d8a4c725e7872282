"""Lip-sync calibration accuracy on synthetic talking videos (espeak-ng speech + the astronaut photo whose mouth
opens with the phonemes; see tests/talking.py), and the calibration of MOUTH_AUDIO_BIAS_S.

    python3 benchmarks/lipsync_accuracy.py [--fps 25]

Needs Debian's espeak-ng (apt-get install espeak-ng) and scikit-image. Prints:
- the raw offset measured on synced clips (the bias between acoustic energy and mouth opening),
- the error of recovered offsets relative to the synced clip over -200..+200 ms (frame and sub-frame offsets),
  still and with head sway,
- the confidence of working clips against failing ones (still mouth, another sentence's mouth, random mouth).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from talking import FACE_BOX, SENTENCES, mouth_track, render, synthesize  # noqa: E402

from sonic.post import lipsync  # noqa: E402

OFFSETS_MS = (-200, -150, -97, -60, -33, -13, 0, 7, 21, 40, 77, 120, 163, 200)


def _chunks(frames, size=32):
    return (frames[i : i + size] for i in range(0, len(frames), size))


def _measure(speech, frames, fps):
    return lipsync.measure(_chunks(frames), fps, speech.samples, speech.sample_rate, FACE_BOX)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fps", type=float, default=25.0)
    args = parser.parse_args()
    fps = args.fps
    speeches = [synthesize(text) for text in SENTENCES]
    frames_of = [int(len(s.samples) / s.sample_rate * fps) for s in speeches]

    print(f"MOUTH_AUDIO_BIAS_S in use: {lipsync.MOUTH_AUDIO_BIAS_S * 1000:.1f} ms; fps {fps}")
    raws, good = [], []
    for i, speech in enumerate(speeches):
        for seed in range(3):
            estimate = _measure(speech, render(mouth_track(speech), frames_of[i], fps, 0.0, seed=seed), fps)
            raws.append(estimate.raw_offset_s * 1000)
            good.append(estimate.confidence)
    print(f"synced clips: raw offset {np.mean(raws):.1f} ms mean, {np.std(raws):.1f} ms std "
          f"(min {np.min(raws):.1f}, max {np.max(raws):.1f}) over {len(raws)} clips")

    for sway in (0.0, 3.0):
        errors = []
        for i, speech in enumerate(speeches):
            track = mouth_track(speech)
            synced = _measure(speech, render(track, frames_of[i], fps, 0.0, sway_px=sway, seed=i), fps)
            for offset in OFFSETS_MS:
                estimate = _measure(speech, render(track, frames_of[i], fps, offset / 1000, sway_px=sway, seed=i), fps)
                errors.append((estimate.offset_s - synced.offset_s) * 1000 - offset)
                good.append(estimate.confidence)
        errors = np.abs(errors)
        print(f"relative offsets, head sway {sway:.0f} px: mean error {errors.mean():.2f} ms, worst {errors.max():.2f} ms "
              f"over {len(errors)} clips ({len(OFFSETS_MS)} offsets x {len(speeches)} sentences)")

    bad = []
    rng = np.random.default_rng(0)
    for i, speech in enumerate(speeches):
        bad.append(_measure(speech, render(np.zeros(8), frames_of[i], fps, seed=10 + i), fps).confidence)
        other = speeches[(i + 1) % len(speeches)]
        bad.append(_measure(speech, render(mouth_track(other), frames_of[i], fps, seed=20 + i), fps).confidence)
        noise = np.convolve(rng.random(20000), np.ones(80) / 80, mode="same")
        noise = (noise - noise.min()) / (noise.max() - noise.min())
        bad.append(_measure(speech, render(noise, frames_of[i], fps, seed=30 + i), fps).confidence)
    print(f"confidence: working clips {min(good):.2f}..{max(good):.2f} ({len(good)}), failing clips "
          f"{min(bad):.2f}..{max(bad):.2f} ({len(bad)}); threshold {lipsync.DEFAULT_MIN_CONFIDENCE}")


if __name__ == "__main__":
    main()
