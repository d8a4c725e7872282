"""Speech -> per-frame audio windows (spec §3.4, §3.5).

16 kHz mono samples -> Whisper log-mel features per 30 s chunk -> Whisper-tiny encoder hidden states
(5 stacked states at 50 Hz) -> for every generated frame (12.5 fps) a 10-step window of all states (for the
audio tokens) and a 50-step window of the last state (for the motion buckets).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = 640  # one 25 fps frame at 16 kHz
CHUNK_SAMPLES = 480000  # Whisper's 30 s input
FRAME_STEP = 2  # generated frames are every second 25 fps frame -> 12.5 fps
GENERATED_FPS = 25 / FRAME_STEP
TOKEN_PAD = (4, 6)  # zero padding of the stacked-states stream, in Whisper frames
BUCKET_PAD = (24, 26)  # zero padding of the last-state stream
WHISPER_STRIDE = 2 * FRAME_STEP  # Whisper frames (50 Hz) per generated frame


def _read_with_soundfile(path: Path) -> tuple[np.ndarray, int] | None:
    import soundfile

    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError):
        return None
    return data.T, rate  # [channels, samples]


def _read_with_av(path: Path) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(str(path)) as container:
            streams = [s for s in container.streams if s.type == "audio"]
            if not streams:
                raise ValueError(f"audio file {path} has no audio stream")
            resampler = av.AudioResampler(format="fltp")  # float planar, native rate and channel layout
            pieces, rate = [], streams[0].rate
            for frame in container.decode(streams[0]):
                pieces.extend(f.to_ndarray() for f in resampler.resample(frame))
            pieces.extend(f.to_ndarray() for f in resampler.resample(None))
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"audio file {path} could not be decoded ({exc}); use a wav, mp3, flac, m4a/aac or ogg file"
        ) from exc
    if not pieces:
        return np.zeros((1, 0), np.float32), rate
    return np.concatenate(pieces, axis=1).astype(np.float32), rate


def to_mono_16k(waveform: np.ndarray | torch.Tensor, sample_rate: int) -> np.ndarray:
    """Down-mix ([channels, samples] or [samples]) by averaging and resample like `librosa.load(sr=16000)`."""
    import librosa

    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().cpu().float().numpy()
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim == 3:  # ComfyUI AUDIO: [batch, channels, samples]; batch item 0
        waveform = waveform[0]
    if waveform.ndim == 2:
        waveform = waveform.mean(axis=0)
    if waveform.size == 0:
        raise ValueError("the audio is empty (0 samples); give a recording with speech in it")
    if not np.all(np.isfinite(waveform)):
        raise ValueError("the audio contains NaN or infinite samples; re-export it")
    if sample_rate != SAMPLE_RATE:
        waveform = librosa.resample(waveform, orig_sr=sample_rate, target_sr=SAMPLE_RATE, res_type="soxr_hq")
    return np.ascontiguousarray(waveform, dtype=np.float32)


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Any common audio file -> (float32 [channels, samples], native sample rate)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} not found")
    samples, rate = _read_with_soundfile(path) or _read_with_av(path)
    if samples.size == 0:
        raise ValueError(f"audio file {path} contains no samples; give a recording with speech in it")
    return samples, rate


def load_audio(path: str | os.PathLike) -> np.ndarray:
    """Any common audio file -> float32 mono samples at 16 kHz."""
    return to_mono_16k(*read_audio(path))


def frame_count_25fps(num_samples: int) -> int:
    """Number of 25 fps frames the audio covers (`audio_len` of the official code)."""
    return num_samples // SAMPLES_PER_FRAME


def whisper_features(samples: np.ndarray, extractor) -> torch.Tensor:
    """[n_chunks, 80, 3000] log-mel features, one row per 30 s chunk (each chunk normalised on its own)."""
    chunks = [samples[i : i + CHUNK_SAMPLES] for i in range(0, max(len(samples), 1), CHUNK_SAMPLES)]
    feats = [
        extractor(chunk, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features[0] for chunk in chunks
    ]
    return torch.stack(feats)


@torch.no_grad()
def whisper_states(encoder, features: torch.Tensor, chunks_per_call: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Whisper encoder on every chunk, once: ([T, 5, C] stacked states, [T, 1, C] last state), T = 1500/chunk."""
    device = next(encoder.parameters()).device
    stacked = []
    for start in range(0, features.shape[0], chunks_per_call):
        batch = features[start : start + chunks_per_call].to(device, torch.float32)
        hidden = encoder(batch, output_hidden_states=True).hidden_states  # 5 x [n, 1500, C]; last is post-LN
        stacked.append(torch.stack(hidden, dim=2).flatten(0, 1).cpu())  # [n * 1500, 5, C]
    states = torch.cat(stacked)
    return states, states[:, -1:]


def frame_windows(
    states: torch.Tensor, last_state: torch.Tensor, audio_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per generated frame i: token window = padded states [4i, 4i+10) and bucket window = padded last
    state [4i, 4i+50). Returns ([F, 10, 5, C], [F, 50, 1, C]) with F = audio_len // 2."""
    num_frames = audio_len // FRAME_STEP
    used = FRAME_STEP * audio_len  # two Whisper frames per 25 fps frame
    tokens = F.pad(states[:used], (0, 0, 0, 0, *TOKEN_PAD))
    buckets = F.pad(last_state[:used], (0, 0, 0, 0, *BUCKET_PAD))
    token_windows = tokens.unfold(0, 10, WHISPER_STRIDE)[:num_frames].permute(0, 3, 1, 2)
    bucket_windows = buckets.unfold(0, 50, WHISPER_STRIDE)[:num_frames].permute(0, 3, 1, 2)
    return token_windows.contiguous(), bucket_windows.contiguous()


def trim_silence(samples: np.ndarray, sample_rate: int, top_db: float = 40.0) -> np.ndarray:
    """Cut leading/trailing parts quieter than `top_db` below the peak (judged on the mono mix), all channels."""
    import librosa

    mono = samples.mean(axis=0) if samples.ndim == 2 else samples
    _, (start, end) = librosa.effects.trim(mono, top_db=top_db, frame_length=1024, hop_length=256)
    if end <= start:
        raise ValueError("the audio is silent throughout; nothing is left after trimming silence")
    return np.ascontiguousarray(samples[..., start:end])
