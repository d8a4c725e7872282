"""Audio loading (formats, channels, rates, edge cases) and the per-frame windows (spec §3.4, §3.5)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import soundfile
import torch

from sonic.inputs import audio as A
from sonic.engine.pipeline import load_speech
from sonic.post.video_io import ffmpeg_exe

from helpers import sine


def _states(num_whisper_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake encoder output whose value is the (1-based) Whisper frame index: [T, 5, 2] and [T, 1, 2]."""
    idx = torch.arange(1, num_whisper_frames + 1, dtype=torch.float32)
    states = idx[:, None, None].expand(num_whisper_frames, 5, 2).clone()
    return states, states[:, -1:]


def test_windows_cover_the_official_frames_with_zero_padding():
    audio_len = 23  # 25 fps frames -> F = 11 generated frames
    tokens, buckets = A.frame_windows(*_states(1500), audio_len)
    assert tokens.shape == (11, 10, 5, 2) and buckets.shape == (11, 50, 1, 2)
    for i in (0, 1, 5, 10):
        # token window: unpadded Whisper frames 4i-4 .. 4i+5; bucket window: 4i-24 .. 4i+25
        want_t = [f + 1 if 0 <= f < 2 * audio_len else 0 for f in range(4 * i - 4, 4 * i + 6)]
        want_b = [f + 1 if 0 <= f < 2 * audio_len else 0 for f in range(4 * i - 24, 4 * i + 26)]
        assert tokens[i, :, 0, 0].tolist() == want_t
        assert buckets[i, :, 0, 0].tolist() == want_b


def test_windows_do_not_read_past_the_used_audio():
    # states beyond 2 * audio_len exist (the 30 s chunk is padded) but must read as zeros
    tokens, buckets = A.frame_windows(*_states(1500), 20)
    assert tokens[-1, -1, 0, 0] == 0 and buckets[-1, -1, 0, 0] == 0


def test_stereo_44k_wav_is_averaged_and_resampled(tmp_path):
    import librosa

    path = tmp_path / "stereo.wav"
    soundfile.write(path, sine(1.5, 44100, channels=2), 44100)
    samples = A.load_audio(path)
    assert samples.dtype == np.float32 and samples.shape == (24000,)
    reference, _ = librosa.load(path, sr=16000)  # what the official code reads
    np.testing.assert_allclose(samples, reference, atol=1e-6)


def _encode(src, dst, *codec):
    subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-y", "-i", str(src), *codec, str(dst)], check=True)


@pytest.mark.parametrize("suffix, codec", [(".mp3", ["-c:a", "libmp3lame"]), (".m4a", ["-c:a", "aac"]),
                                           (".ogg", ["-c:a", "libvorbis"]), (".flac", [])])
def test_compressed_formats_decode_to_the_same_speech(tmp_path, speech_wav, suffix, codec):
    encoded = tmp_path / f"speech{suffix}"
    _encode(speech_wav, encoded, *codec)
    original, decoded = A.load_audio(speech_wav), A.load_audio(encoded)
    assert abs(len(decoded) - len(original)) < 0.06 * A.SAMPLE_RATE  # encoder priming/padding only
    n = min(len(original), len(decoded))
    # align for codec delay, then compare shapes of the waveforms
    lags = range(-2000, 2001, 8)
    corr = max(np.corrcoef(original[2000:n - 2000], np.roll(decoded[:n], -lag)[2000:n - 2000])[0, 1] for lag in lags)
    assert corr > 0.9


def test_comfy_audio_dict_and_tuple_inputs():
    wave = sine(1.0, 22050, channels=2).T  # [C, T]
    from_tuple = load_speech((wave, 22050))
    from_dict = load_speech({"waveform": torch.from_numpy(wave)[None], "sample_rate": 22050})
    np.testing.assert_array_equal(from_tuple, from_dict)
    assert from_tuple.shape == (16000,)


def test_duration_trims_and_rejects_longer_than_audio():
    wave = (np.zeros(32000, np.float32), 16000)  # 2 s of silence
    assert len(load_speech(wave, 1.0)) == 16000
    assert len(load_speech(wave, 2.05)) == 32000  # within the 0.1 s slack
    with pytest.raises(ValueError, match="longer than the audio"):
        load_speech(wave, 2.5)


def test_audio_shorter_than_one_frame_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 0.08 s"):
        load_speech((np.zeros(1200, np.float32), 16000))  # 75 ms
    assert len(load_speech((np.zeros(1280, np.float32), 16000))) == 1280  # exactly one generated frame


def test_empty_and_unreadable_audio_files(tmp_path):
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, np.float32), 16000)
    with pytest.raises(ValueError, match="no samples"):
        A.load_audio(empty)
    garbage = tmp_path / "garbage.mp3"
    garbage.write_bytes(b"this is not audio" * 100)
    with pytest.raises(ValueError, match="could not be decoded"):
        A.load_audio(garbage)
    with pytest.raises(FileNotFoundError):
        A.load_audio(tmp_path / "missing.wav")


def test_nan_audio_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        A.to_mono_16k(np.full(16000, np.nan, np.float32), 16000)


def test_silence_and_long_audio_produce_finite_conditioning(tiny_models):
    from sonic.engine.pipeline import encode_audio

    embeds = torch.zeros(1, tiny_models.image_encoder.model.config.projection_dim)
    silence = np.zeros(int(31.5 * A.SAMPLE_RATE), np.float32)  # > 30 s: two Whisper chunks
    tokens, uncond, buckets, extras = encode_audio(tiny_models, silence, embeds)
    assert extras["audio_feature"].shape[0] == 2
    assert tokens.shape[0] == int(31.5 * 25) // 2 and torch.isfinite(tokens).all() and torch.isfinite(buckets).all()
