"""Time and peak RAM of the post-processing chain on a long 512x512 frames file (no models needed).

    python benchmarks/postprocess_long.py --minutes 10 [--size 512] [--offset-ms 70]

Builds a talking clip of the requested length as the sampler's frames file would hold it: the synthetic talking
clips of tests/talking.py (espeak-ng speech, the astronaut's mouth opening with the phonemes, the picture late by
--offset-ms), upscaled to --size and repeated, with their speech as the sound track. Then runs the template's
chain on it through the ComfyUI nodes (the tests' ComfyUI stand-in): Sonic Lip-Sync Calibrate (frames file) ->
Sonic Smooth Motion -> Sonic Video Encode, and prints per-stage seconds, the peak resident memory of the chain
(the peak is reset after building the input) and the measured offset. Needs espeak-ng and scikit-image.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FPS = 25.0


def _peak_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--offset-ms", type=float, default=70.0)
    args = parser.parse_args()

    import cv2
    import torch

    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "comfy_stub")]
    import talking

    base = Path(tempfile.mkdtemp(prefix="sonic-post-"))
    try:
        for sub in ("input", "output", "temp", "models"):
            (base / sub).mkdir()
        os.environ["SONIC_TEST_COMFY_BASE"] = str(base)
        from comfy_harness import load_pack

        pack = load_pack(ROOT)
        frame_store = importlib.import_module(f"{pack.__name__}.sonic.post.frames").FrameStore
        sonic_frames = importlib.import_module(f"{pack.__name__}.nodes.sampling").SonicFrames

        pieces = []
        for text in talking.SENTENCES:
            speech = talking.synthesize(text)
            clip = talking.talking_clip(speech, FPS, args.offset_ms / 1000, seed=len(pieces))
            clip = np.stack([cv2.resize(f, (args.size, args.size), interpolation=cv2.INTER_LINEAR) for f in clip])
            samples = speech.samples[: round(len(clip) / FPS * speech.sample_rate)]  # exactly the clip's length
            pieces.append((clip, samples, speech.sample_rate))
        total = int(args.minutes * 60 * FPS)
        store = frame_store(args.size, args.size, total, FPS, folder=base / "temp")
        sound, index = [], 0
        while len(store) < total:
            clip, samples, rate = pieces[index % len(pieces)]
            take = min(len(clip), total - len(store))
            store.append(clip[:take])
            sound.append(samples[: round(take / FPS * rate)])
            index += 1
        store.flush()
        waveform = torch.from_numpy(np.concatenate(sound))[None, None]
        audio = {"waveform": waveform, "sample_rate": rate}
        frames = sonic_frames(store=store, audio=audio, fps=FPS)
        box = ",".join(str(v * args.size / 256) for v in talking.FACE_BOX)
        del pieces, clip, sound
        _reset_peak()

        mappings, report = pack.NODE_CLASS_MAPPINGS, {"frames": total, "size": args.size}
        start = time.perf_counter()
        _, calibrated, corrected, offset, confidence = mappings["SonicLipSyncCalibrate"]().calibrate(
            FPS, mode="auto", frames=frames, face_box=box)
        report.update(calibrate_s=round(time.perf_counter() - start, 1), offset_ms=round(offset * 1000, 1),
                      confidence=round(confidence, 3), calibrate_peak_gib=round(_peak_gib(), 2))
        start = time.perf_counter()
        _, smoothed = mappings["SonicSmoothMotion"]().smooth(alpha=0.3, region="face without mouth",
                                                             frames=calibrated, face_box=box)
        report.update(smooth_s=round(time.perf_counter() - start, 1), smooth_peak_gib=round(_peak_gib(), 2))
        start = time.perf_counter()
        result = mappings["SonicVideoEncode"]().encode(FPS, filename_prefix="long/post", crf=23, preset="veryfast",
                                                       frames=smoothed, audio=corrected)
        report.update(encode_s=round(time.perf_counter() - start, 1), peak_rss_gib=round(_peak_gib(), 2))
        path = Path(result["result"][0])
        report["mp4_mb"] = round(path.stat().st_size / 2**20, 1)
        print(json.dumps(report))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
