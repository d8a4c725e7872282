"""Peak RAM of the shipped long-audio template on long speech (tiny reference models, CPU).

    python benchmarks/long_audio_memory.py --minutes 10 --min-resolution 128 --steps 1

Runs workflows/api/sonic_long_audio.json through the test harness (ComfyUI's validation and execution order,
with the tests' ComfyUI stand-in) on the reference speech looped to the requested length, and prints the peak
resident memory, the time and the MP4's frame count. Speed does not matter here, so use few steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT.parent / "shared" / "reference" / "sonic-tiny"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--min-resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--tiny", type=Path, default=TINY)
    args = parser.parse_args()

    import soundfile

    base = Path(tempfile.mkdtemp(prefix="sonic-long-"))
    try:
        for sub in ("input", "output", "temp", "models"):
            (base / sub).mkdir()
        (base / "models" / "sonic").symlink_to(args.tiny / "models", target_is_directory=True)
        shutil.copy(args.tiny / "inputs" / "portrait.png", base / "input" / "portrait.png")
        speech, rate = soundfile.read(args.tiny / "inputs" / "speech.wav", dtype="float32")
        n = int(args.minutes * 60 * rate)
        soundfile.write(base / "input" / "speech.wav", np.tile(speech, n // len(speech) + 1)[:n], rate)

        os.environ["SONIC_TEST_COMFY_BASE"] = str(base)
        sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "comfy_stub")]
        from comfy_harness import execute_prompt, load_pack

        pack = load_pack(ROOT)
        prompt = json.loads((ROOT / "workflows" / "api" / "sonic_long_audio.json").read_text())
        for node in prompt.values():
            if node["class_type"] == "SonicPreData":
                node["inputs"]["min_resolution"] = args.min_resolution
            if node["class_type"] == "SonicSampler":
                node["inputs"]["steps"] = args.steps
        start = time.perf_counter()
        results, ui = execute_prompt(prompt, pack.NODE_CLASS_MAPPINGS)
        seconds = time.perf_counter() - start
        entry = next(v for v in ui.values() if v)["images"][0]
        video = base / "output" / entry["subfolder"] / entry["filename"]
        import av

        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            frames, size = stream.frames, (stream.codec_context.width, stream.codec_context.height)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps({"minutes": args.minutes, "size": size, "frames": frames, "steps": args.steps,
                          "seconds": round(seconds, 1), "peak_rss_gib": round(peak, 2),
                          "mp4_mb": round(video.stat().st_size / 2**20, 1)}))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
