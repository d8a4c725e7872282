"""Write frames + audio to an H.264/AAC MP4 with imageio-ffmpeg's bundled ffmpeg.

Frames are streamed to ffmpeg's stdin (no temporary images); the file is written under a temporary name in
the destination folder and renamed when complete, so a failed or interrupted run leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import numpy as np


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def fps_fraction(fps: float | Fraction) -> Fraction:
    """12.5 -> 25/2, 29.97002997 -> 30000/1001."""
    return Fraction(fps).limit_denominator(1001)


def _write_wav(samples: np.ndarray, sample_rate: int, folder: str) -> str:
    import soundfile

    path = os.path.join(folder, "audio.wav")
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:  # [channels, samples] -> soundfile's [samples, channels]
        samples = samples.T
    soundfile.write(path, samples, sample_rate, subtype="FLOAT")
    return path


def write_mp4(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    fps: float,
    width: int,
    height: int,
    num_frames: int,
    audio: str | os.PathLike | tuple[np.ndarray, int] | None = None,
    crf: int = 18,
    preset: str = "medium",
) -> Path:
    """Encode uint8 [n, H, W, 3] frame chunks; the audio (a file, or (samples [T] or [C, T], rate)) is trimmed
    to the video."""
    path = Path(path)
    if num_frames < 1:
        raise ValueError("there are no frames to write")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist; create it first")
    rate = fps_fraction(fps)
    duration = num_frames / float(rate)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial.mp4")
    workdir = tempfile.mkdtemp(prefix="sonic-")
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", str(rate), "-i", "pipe:0"]
    if audio is not None:
        audio_file = _write_wav(*audio, workdir) if isinstance(audio, tuple) else str(audio)
        cmd += ["-t", f"{duration:.6f}", "-i", audio_file, "-map", "0:v:0", "-map", "1:a:0",
                "-c:a", "aac", "-b:a", "192k"]
    # yuv420p needs even sides: crop the odd row/column (Sonic's sizes are multiples of 64 anyway).
    cmd += ["-vf", "crop=trunc(iw/2)*2:trunc(ih/2)*2", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            "-crf", str(crf), "-preset", preset, "-r", str(rate), "-t", f"{duration:.6f}",
            "-movflags", "+faststart", "-f", "mp4", str(tmp)]
    log_path = os.path.join(workdir, "ffmpeg.log")  # a file, not a pipe: a full pipe would stall ffmpeg
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=log_file)
    written = 0
    try:
        try:
            for chunk in frames:
                chunk = np.ascontiguousarray(chunk, dtype=np.uint8)
                if chunk.ndim != 4 or chunk.shape[1:] != (height, width, 3):
                    raise ValueError(f"frame chunk has shape {chunk.shape}, expected [n, {height}, {width}, 3]")
                proc.stdin.write(chunk.tobytes())
                written += chunk.shape[0]
        except BrokenPipeError:
            pass  # ffmpeg exited early; its error message is reported below
        finally:
            proc.stdin.close()
        code = proc.wait()
        log_file.flush()
        stderr = Path(log_path).read_text(errors="replace").strip()
        if code != 0:
            raise RuntimeError(f"ffmpeg failed writing {path}: {stderr.splitlines()[-1] if stderr else 'no message'}")
        if written != num_frames:
            raise RuntimeError(f"expected {num_frames} frames for {path} but got {written}")
        os.replace(tmp, path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_file.close()
        tmp.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return path
