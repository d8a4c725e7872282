"""The MP4 encoder: decoded back with PyAV (streams, counts, rates, durations, metadata, failure cleanup)."""

from __future__ import annotations

import json
from fractions import Fraction

import av
import numpy as np
import pytest

from sonic.post import video_io
from sonic.post.video_io import fps_fraction, write_mp4


def gradient(n, height, width):
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    return np.stack([np.roll(base, i, axis=1) for i in range(n)]).astype(np.uint8)


def probe(path):
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        a = c.streams.audio[0] if c.streams.audio else None
        return {"frames": frames, "rate": v.average_rate, "pix_fmt": v.codec_context.pix_fmt,
                "codec": v.codec_context.name, "size": (v.codec_context.width, v.codec_context.height),
                "video_s": float(v.duration * v.time_base), "metadata": dict(c.metadata),
                "audio_codec": a.codec_context.name if a else None,
                "audio_s": float(a.duration * a.time_base) if a else 0.0}


@pytest.mark.parametrize("fps, expected", [(12.5, Fraction(25, 2)), (25, Fraction(25)), (23.976, Fraction(24000, 1001)),
                                           (29.97, Fraction(30000, 1001)), ("24000/1001", Fraction(24000, 1001)),
                                           (59.94, Fraction(60000, 1001))])
def test_frame_rates_are_exact(fps, expected):
    assert fps_fraction(fps) == expected


@pytest.mark.parametrize("fps", [12.5, "24000/1001"])
def test_counts_rates_durations_and_streams(tmp_path, fps):
    frames = gradient(48, 64, 96)
    tone = (0.2 * np.sin(np.arange(48000 * 3) / 10)).astype(np.float32)
    out = write_mp4(tmp_path / "v.mp4", [frames[:20], frames[20:]], fps, 96, 64, 48, audio=(tone, 48000))
    info = probe(out)
    rate = fps_fraction(fps)
    assert len(info["frames"]) == 48 and info["rate"] == rate
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p" and info["audio_codec"] == "aac"
    assert abs(info["video_s"] - 48 / rate) <= 1 / rate
    assert abs(info["audio_s"] - 48 / rate) <= 0.05  # 'match' trims the 3 s tone to the video
    data = out.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


def test_odd_sizes_are_padded_not_scaled(tmp_path):
    frames = gradient(5, 75, 101)
    info = probe(write_mp4(tmp_path / "odd.mp4", [frames], 25, 101, 75, 5, crf=0, preset="veryfast"))
    assert info["size"] == (102, 76)
    decoded = info["frames"][2][:75, :101].astype(int)
    assert np.abs(decoded - frames[2]).mean() < 3  # same pixels in the same places (only chroma subsampling)


@pytest.mark.parametrize("policy, audio_s, video_s", [("match", 2.0, 2.0), ("shortest", 1.0, 2.0), ("keep", 3.0, 3.0)])
def test_audio_policies(tmp_path, policy, audio_s, video_s):
    seconds = {"match": 1.0, "shortest": 1.0, "keep": 3.0}[policy]
    tone = np.zeros(int(16000 * seconds), np.float32)
    info = probe(write_mp4(tmp_path / "a.mp4", [gradient(50, 32, 32)], 25, 32, 32, 50, audio=(tone, 16000),
                           audio_policy=policy))
    assert abs(info["audio_s"] - audio_s) <= 0.05
    assert abs(info["video_s"] - video_s) <= 0.05
    with pytest.raises(ValueError, match="audio policy"):
        write_mp4(tmp_path / "b.mp4", [gradient(1, 32, 32)], 25, 32, 32, 1, audio=(tone, 16000), audio_policy="loop")


def test_metadata_round_trip_and_provenance(tmp_path):
    workflow = {"nodes": [{"id": i, "type": "SonicSampler", "widgets_values": ["x=y; #z\n" * 20]} for i in range(1000)]}
    prompt = {"5": {"class_type": "SonicSampler", "inputs": {"seed": 7}}}
    meta = {"workflow": json.dumps(workflow), "prompt": json.dumps(prompt), "sonic_parameters": json.dumps({"seed": 7})}
    assert len(meta["workflow"]) > 200_000  # more than one command-line argument may hold
    info = probe(write_mp4(tmp_path / "m.mp4", [gradient(3, 32, 32)], 25, 32, 32, 3, metadata=meta))
    assert json.loads(info["metadata"]["workflow"]) == workflow
    assert json.loads(info["metadata"]["prompt"]) == prompt
    assert info["metadata"]["comment"] == video_io.PROVENANCE and info["metadata"]["ai_generated"] == "true"


def test_watermark_is_burned_in(tmp_path):
    frames = np.full((2, 96, 128, 3), 90, np.uint8)
    plain = probe(write_mp4(tmp_path / "p.mp4", [frames], 25, 128, 96, 2, crf=0))["frames"][0].astype(int)
    marked = probe(write_mp4(tmp_path / "w.mp4", [frames], 25, 128, 96, 2, crf=0, watermark="AI"))["frames"][0].astype(int)
    changed = np.abs(marked - plain).sum(-1) > 30
    assert changed[60:, :40].any() and not changed[:40].any()  # bottom-left corner only


def test_bad_input_leaves_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        write_mp4(tmp_path / "e.mp4", [], 25, 32, 32, 0)
    with pytest.raises(ValueError, match="empty"):
        write_mp4(tmp_path / "e.mp4", [gradient(1, 32, 32)], 25, 32, 32, 1, audio=(np.zeros(0, np.float32), 16000))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_mp4(tmp_path / "missing" / "e.mp4", [gradient(1, 32, 32)], 25, 32, 32, 1)

    def failing():
        yield gradient(2, 32, 32)
        raise KeyboardInterrupt  # e.g. a cancel in the middle of the stream

    with pytest.raises(KeyboardInterrupt):
        write_mp4(tmp_path / "c.mp4", failing(), 25, 32, 32, 10)
    with pytest.raises(RuntimeError, match="expected 10 frames"):
        write_mp4(tmp_path / "s.mp4", [gradient(2, 32, 32)], 25, 32, 32, 10)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(video_io.os, "access", lambda path, mode: False)  # tests run as root: simulate
    with pytest.raises(PermissionError, match="not writable"):
        write_mp4(tmp_path / "x.mp4", [gradient(1, 32, 32)], 25, 32, 32, 1)


def test_failures_before_encoding_leave_no_work_folder(tmp_path, monkeypatch):
    """The work folder holds the prompt and workflow (ffmetadata): it must not outlive a failed call."""
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    nan_audio = (np.full(16000, np.nan, np.float32), 16000)
    with pytest.raises(ValueError, match="NaN"):
        write_mp4(tmp_path / "n.mp4", [gradient(1, 32, 32)], 25, 32, 32, 1, audio=nan_audio, metadata={"prompt": "{}"})
    monkeypatch.setattr(video_io, "ffmpeg_exe", lambda: str(tmp_path / "no-such-ffmpeg"))
    with pytest.raises(OSError):
        write_mp4(tmp_path / "f.mp4", [gradient(1, 32, 32)], 25, 32, 32, 1, metadata={"prompt": "{}"})
    assert list(scratch.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["scratch"]
