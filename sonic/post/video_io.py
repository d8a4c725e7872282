"""The MP4 encoder shared by the CLI and the ComfyUI node: frames + audio -> H.264/AAC MP4 with imageio-ffmpeg's
bundled ffmpeg.

* Frames are streamed to ffmpeg's stdin (no temporary images); odd sizes are padded by one edge-replicated
  row/column (yuv420p needs even sides; nothing is scaled).
* Exact frame rates: 12.5 is 25/2, 23.976 or 29.97 become 24000/1001 or 30000/1001.
* The audio is fitted to the video by a policy ('match': trim or pad with silence to the video's length;
  'shortest': trim only; 'keep': keep all of it, holding the last frame if the audio is longer).
* Metadata (e.g. ComfyUI's prompt and workflow, generation parameters) goes in through an ffmetadata file as
  MP4 metadata tags; every file is labelled AI-generated.
* The file is written under a temporary name in the destination folder and renamed when complete, so a failed
  or interrupted run leaves nothing behind. `+faststart` puts the index first (plays while downloading).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import numpy as np

AUDIO_POLICIES = ("match", "shortest", "keep")
PROVENANCE = "AI-generated video (Sonic talking-head model)"


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def fps_fraction(fps: float | Fraction | str) -> Fraction:
    """12.5 -> 25/2; 23.976 / 29.97 / 59.94 -> 24000/1001 / 30000/1001 / 60000/1001; '24000/1001' as given."""
    if isinstance(fps, (Fraction, str)):
        rate = Fraction(fps)
    else:
        fps = float(fps)
        if not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"fps must be a positive number, got {fps}")
        ntsc = round(fps * 1.001)
        if abs(fps - ntsc / 1.001) < 5e-4 and abs(fps - round(fps)) > 1e-6:
            return Fraction(ntsc * 1000, 1001)
        rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return rate


def _escape_ffmetadata(text: str) -> str:
    for ch in ("\\", "=", ";", "#", "\n"):
        text = text.replace(ch, "\\" + ch)
    return text


def _write_ffmetadata(metadata: dict[str, str], folder: str) -> str:
    path = os.path.join(folder, "metadata.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(";FFMETADATA1\n")
        for key, value in metadata.items():
            f.write(f"{_escape_ffmetadata(key)}={_escape_ffmetadata(str(value))}\n")
    return path


def fit_audio(samples: np.ndarray, rate: int, seconds: float, policy: str) -> np.ndarray:
    """[C, T] samples fitted to a video of `seconds` by `policy` (see module doc)."""
    if policy not in AUDIO_POLICIES:
        raise ValueError(f"audio policy {policy!r} is not one of {', '.join(AUDIO_POLICIES)}")
    target = int(round(seconds * rate))
    if policy == "keep":
        return samples
    if samples.shape[-1] >= target:
        return samples[..., :target]
    if policy == "shortest":
        return samples
    return np.pad(samples, ((0, 0), (0, target - samples.shape[-1])))


def _audio_samples(audio) -> tuple[np.ndarray, int]:
    if isinstance(audio, (str, os.PathLike)):
        from ..inputs.audio import read_audio

        return read_audio(audio)
    samples, rate = audio
    samples = np.asarray(samples, dtype=np.float32)
    samples = samples[None] if samples.ndim == 1 else samples
    if samples.shape[-1] == 0:
        raise ValueError("the audio is empty (0 samples); connect a recording or leave the audio out")
    if not np.all(np.isfinite(samples)):
        raise ValueError("the audio contains NaN or infinite samples")
    return samples, int(rate)


def _watermark(frames: np.ndarray, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    height = frames.shape[1]
    size = max(10, height // 28)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    out = np.empty_like(frames)
    for i, frame in enumerate(frames):
        img = Image.fromarray(frame)
        draw = ImageDraw.Draw(img)
        x, y = size // 2, height - size * 3 // 2
        draw.text((x + 1, y + 1), text, font=font, fill=(0, 0, 0))
        draw.text((x, y), text, font=font, fill=(255, 255, 255))
        out[i] = np.asarray(img)
    return out


def _prepare_chunk(chunk, width: int, height: int, watermark: str | None) -> np.ndarray:
    chunk = np.asarray(chunk)
    if chunk.ndim != 4 or chunk.shape[1:] != (height, width, 3) or chunk.dtype != np.uint8:
        raise ValueError(f"frame chunk is {chunk.dtype} {chunk.shape}, expected uint8 [n, {height}, {width}, 3]")
    if watermark:
        chunk = _watermark(chunk, watermark)
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:  # yuv420p needs even sides: repeat the last row/column, never rescale
        chunk = np.pad(chunk, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return np.ascontiguousarray(chunk)


def write_mp4(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    fps: float | Fraction | str,
    width: int,
    height: int,
    num_frames: int,
    audio: str | os.PathLike | tuple[np.ndarray, int] | None = None,
    crf: int = 18,
    preset: str = "medium",
    audio_policy: str = "match",
    metadata: dict[str, str] | None = None,
    watermark: str | None = None,
) -> Path:
    """Encode uint8 [n, H, W, 3] frame chunks (`num_frames` in all) and an optional sound track (a file, or
    (samples [T] or [C, T], rate))."""
    path = Path(path)
    if num_frames < 1:
        raise ValueError("there are no frames to write (empty batch)")
    if width < 1 or height < 1:
        raise ValueError(f"invalid frame size {width}x{height}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"output folder {path.parent} is not writable; choose another folder")
    rate = fps_fraction(fps)
    duration = num_frames / rate
    out_w, out_h = width + width % 2, height + height % 2
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial.mp4")
    if audio is not None:  # checked before anything is written (NaN, empty)
        samples, sample_rate = _audio_samples(audio)
        samples = fit_audio(samples, sample_rate, float(duration), audio_policy)
    # the work folder holds the metadata (prompt, workflow): it goes whatever happens from here on
    workdir = tempfile.mkdtemp(prefix="sonic-")
    proc = log_file = None
    try:
        tags = {"comment": PROVENANCE, "ai_generated": "true", **(metadata or {})}
        cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{out_w}x{out_h}", "-framerate", str(rate), "-i", "pipe:0",
               "-f", "ffmetadata", "-i", _write_ffmetadata(tags, workdir)]
        maps = ["-map", "0:v:0", "-map_metadata", "1"]
        video_filters = []
        if audio is not None:
            audio_file = os.path.join(workdir, "audio.wav")
            import soundfile

            soundfile.write(audio_file, samples.T, sample_rate, subtype="FLOAT")
            cmd += ["-i", audio_file]
            maps += ["-map", "2:a:0", "-c:a", "aac", "-b:a", "192k"]
            audio_seconds = samples.shape[-1] / sample_rate
            if audio_policy == "keep" and audio_seconds > duration:  # hold the last frame under the rest of the audio
                video_filters.append(f"tpad=stop_mode=clone:stop_duration={audio_seconds - float(duration):.6f}")
        cmd += maps
        if video_filters:
            cmd += ["-vf", ",".join(video_filters)]
        cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(int(crf)), "-preset", preset, "-r", str(rate),
                "-movflags", "+faststart+use_metadata_tags", "-f", "mp4", str(tmp)]
        log_path = os.path.join(workdir, "ffmpeg.log")  # a file, not a pipe: a full pipe would stall ffmpeg
        log_file = open(log_path, "wb")
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=log_file)
        written = 0
        try:
            for chunk in frames:
                chunk = _prepare_chunk(chunk, width, height, watermark)
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
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if log_file is not None:
            log_file.close()
        tmp.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return path


def read_video(path: str | os.PathLike, chunk: int = 32):
    """Open a video for reading in chunks: -> (fps, uint8 [n, H, W, 3] chunk iterator, start time of the picture
    in seconds). The file stays open until the iterator is exhausted or closed."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file {path} not found")
    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise ValueError(f"video file {path} could not be opened ({exc}); use an MP4, MOV, MKV or WebM file") from exc
    streams = [s for s in container.streams if s.type == "video"]
    if not streams:
        container.close()
        raise ValueError(f"{path} has no video stream")
    stream = streams[0]
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        container.close()
        raise ValueError(f"{path} does not say its frame rate")
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0

    def chunks():
        try:
            batch = []
            for frame in container.decode(stream):
                batch.append(frame.to_ndarray(format="rgb24"))
                if len(batch) == chunk:
                    yield np.stack(batch)
                    batch = []
            if batch:
                yield np.stack(batch)
        except av.FFmpegError as exc:
            raise ValueError(f"video file {path} could not be decoded ({exc})") from exc
        finally:
            container.close()

    return float(rate), chunks(), start


def audio_start_time(path: str | os.PathLike) -> float | None:
    """Start time in seconds of a file's first audio stream (None when it has none)."""
    import av

    with av.open(str(path)) as container:
        for stream in container.streams:
            if stream.type == "audio":
                return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    return None
