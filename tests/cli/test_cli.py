"""`python -m sonic generate` end to end on the tiny models, and its one-line errors on bad input."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import pytest
import soundfile
from PIL import Image

from sonic.cli import main


def probe(path):
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio
        frames = sum(1 for _ in container.decode(video=0))
        return {
            "codec": video.codec_context.name,
            "pix_fmt": video.codec_context.pix_fmt,
            "fps": video.average_rate,
            "size": (video.codec_context.width, video.codec_context.height),
            "frames": frames,
            "duration": float(video.duration * video.time_base),
            "audio": audio[0].codec_context.name if audio else None,
            "audio_duration": float(audio[0].duration * audio[0].time_base) if audio else 0.0,
        }


def _run(tiny_dir, out, *extra):
    inputs = tiny_dir / "inputs"
    cmd = [sys.executable, "-m", "sonic", "generate", "--models", str(tiny_dir / "models"),
           "--image", str(inputs / "portrait.png"), "--audio", str(inputs / "speech.wav"), "--out", str(out),
           "--min-resolution", "128", "--device", "cpu", "--dtype", "fp32", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_generate_writes_a_playable_mp4_with_detection_and_interpolation(tiny_dir, tmp_path):
    out = tmp_path / "talk.mp4"
    result = _run(tiny_dir, out, "--steps", "1")
    assert result.returncode == 0, result.stderr
    info = probe(out)
    frames = 2 * (4.6 * 25 // 2) - 1  # 57 generated frames -> 113 after RIFE
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p" and info["audio"] == "aac"
    assert info["fps"] == 25 and info["frames"] == frames and info["size"] == (128, 256)
    assert abs(info["duration"] - frames / 25) <= 1 / 25
    assert abs(info["audio_duration"] - frames / 25) <= 0.05
    data = out.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # +faststart: plays while downloading
    assert not [p for p in tmp_path.iterdir() if p.name != "talk.mp4"]  # no temporary leftovers
    with av.open(str(out)) as container:
        params = __import__("json").loads(container.metadata["sonic_parameters"])
        assert params["steps"] == 1 and params["seed"] == 72589 and container.metadata["ai_generated"] == "true"


def test_generate_without_interpolation_and_shorter_duration(tiny_dir, tmp_path):
    out = tmp_path / "short.mp4"
    dump = tmp_path / "dump.safetensors"
    result = _run(tiny_dir, out, "--steps", "1", "--no-interpolation", "--duration", "2",
                  "--face-box", "37.25,37,76.25,76.25", "--dump", str(dump))
    assert result.returncode == 0, result.stderr
    info = probe(out)
    assert info["fps"] == Fraction(25, 2) and info["frames"] == 25
    assert abs(info["duration"] - 2.0) <= 1 / 12.5
    from safetensors.torch import load_file

    dumped = load_file(str(dump))
    assert dumped["final_latents"].shape == (1, 25, 4, 32, 16)
    assert dumped["video_before_interp"].shape == dumped["video_final"].shape == (1, 3, 25, 256, 128)
    assert 0 <= float(dumped["video_final"].min()) and float(dumped["video_final"].max()) <= 1


class _Sampled(Exception):
    """Raised by the sampler spy: what generate would sample with is known, nothing is generated."""


@pytest.mark.parametrize("flags, stream, rows", [((), False, False), (("--low-vram",), False, True),
                                                 (("--stream-unet",), True, True),
                                                 (("--stream-unet", "--low-vram"), True, True)])
def test_memory_flags_reach_the_sampler_through_the_run_plan(tiny_dir, tmp_path, tiny_models, tiny_cond, monkeypatch,
                                                             flags, stream, rows):
    """--stream-unet and --low-vram as the sampler receives them from `generate`, after the run plan
    (sonic/engine/plan.py, its policy tested in tests/engine/test_plan.py): streaming implies low-VRAM rows,
    --low-vram alone streams nothing, neither on a CPU is the official batched call. The session's tiny models
    and conditioning stand in for loading and preparing, and the sampler is a spy: nothing is generated (that
    streaming gives the same latents is tests/engine/test_offload.py's)."""
    from sonic.cli import build_parser
    from sonic.cli import generate as command
    from sonic.engine import loader, pipeline

    seen = []

    def sample(models, cond, options, **kwargs):
        seen.append((models, cond, options))
        raise _Sampled

    monkeypatch.setattr(loader, "load_models", lambda *args, **kwargs: tiny_models)
    monkeypatch.setattr(pipeline, "prepare", lambda models, image, speech, options: tiny_cond)
    monkeypatch.setattr(pipeline, "sample", sample)
    args = build_parser().parse_args(["generate", *_args(tiny_dir, tmp_path), *flags])
    with pytest.raises(_Sampled):
        command.generate(args)
    [(models, cond, options)] = seen
    assert models is tiny_models and cond is tiny_cond
    assert (options.stream_unet, options.sequential_guidance) == (stream, rows)
    assert options.inference_steps == 1  # the other flags came through too


def _gpus(monkeypatch, cuda: bool, mps: bool) -> None:
    """This PyTorch sees an NVIDIA GPU (named 'NVIDIA H100') and/or an Apple GPU, or neither."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("cuda, mps, chosen", [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"),
                                               (False, False, "cpu")])
def test_the_auto_device_is_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, chosen):
    import torch

    from sonic.engine.loader import resolve_device

    _gpus(monkeypatch, cuda, mps)
    assert resolve_device("auto") == resolve_device(None) == torch.device(chosen)


@pytest.mark.parametrize("built, reason", [(True, "no Apple GPU is usable here"),
                                           (False, "this PyTorch was built without MPS support")])
def test_a_named_mps_device_must_be_usable(monkeypatch, capsys, tiny_dir, tmp_path, built, reason):
    import torch

    from sonic.engine.loader import resolve_device

    _gpus(monkeypatch, cuda=False, mps=False)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: built)
    with pytest.raises(RuntimeError, match=reason):
        resolve_device("mps")
    argv = _args(tiny_dir, tmp_path)
    argv[argv.index("--device") + 1] = "mps"
    err = _error_of(capsys, *argv)
    assert err == f"error: device 'mps' was requested but {reason}" + (
        " (MPS needs Apple silicon or an AMD GPU, macOS 12.3 or newer)" if built else "") + "; use --device cpu"
    _gpus(monkeypatch, cuda=False, mps=True)
    assert resolve_device("mps") == torch.device("mps")


class _Loading(Exception):
    """Raised by the model-loading spy: the device generate chose is known, nothing is loaded."""


@pytest.mark.parametrize("cuda, mps, line", [(True, True, "device: cuda (NVIDIA H100)"),
                                             (False, True, "device: mps (Apple GPU; attention in chunks of up to "
                                                           "256 MiB)"),
                                             (False, False, "device: cpu (no CUDA or MPS GPU found)")])
def test_generate_says_which_device_auto_chose(tiny_dir, tmp_path, monkeypatch, capsys, cuda, mps, line):
    import torch

    from sonic.cli import build_parser
    from sonic.cli import generate as command
    from sonic.engine import loader

    loaded = []

    def load_models(models, device, *args, **kwargs):
        loaded.append(device)
        raise _Loading

    _gpus(monkeypatch, cuda, mps)
    monkeypatch.delenv("SONIC_ATTENTION_BLOCK_MB", raising=False)  # the default chunk budget, 256 MiB
    monkeypatch.setattr(loader, "load_models", load_models)
    argv = _args(tiny_dir, tmp_path)
    argv[argv.index("--device") + 1] = "auto"
    with pytest.raises(_Loading):
        command.generate(build_parser().parse_args(["generate", *argv]))
    assert capsys.readouterr().err.splitlines() == [line]
    assert loaded == [torch.device(line.split()[1])]
    with pytest.raises(_Loading):  # a device given by name is not announced
        command.generate(build_parser().parse_args(["generate", *_args(tiny_dir, tmp_path)]))
    assert capsys.readouterr().err == ""


def _error_of(capsys, *argv):
    code = main(["generate", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    return err


def _args(tiny_dir, tmp_path, image=None, audio=None, models=None):
    inputs = tiny_dir / "inputs"
    return ["--models", str(models or tiny_dir / "models"), "--image", str(image or inputs / "portrait.png"),
            "--audio", str(audio or inputs / "speech.wav"), "--out", str(tmp_path / "o.mp4"),
            "--min-resolution", "128", "--steps", "1", "--device", "cpu"]


def test_no_face_found(tiny_dir, tmp_path, capsys):
    blank = tmp_path / "wall.png"
    Image.fromarray(np.full((256, 256, 3), 200, np.uint8)).save(blank)
    err = _error_of(capsys, *_args(tiny_dir, tmp_path, image=blank))
    assert "no face found in the portrait" in err and "--face-box X,Y,W,H" in err  # the flag that fixes it
    assert not (tmp_path / "o.mp4").exists()


def test_option_errors_name_the_flag(tiny_dir, tmp_path, capsys):
    args = _args(tiny_dir, tmp_path)
    args[args.index("--steps") + 1] = "0"
    assert "--steps must be between 1 and 1000, got 0" in _error_of(capsys, *args)
    assert "--expand-ratio must be between" in _error_of(capsys, *_args(tiny_dir, tmp_path), "--expand-ratio", "9")
    assert "--compile and --stream-unet cannot be combined" in _error_of(capsys, *_args(tiny_dir, tmp_path),
                                                                          "--compile", "--stream-unet")


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "denoising steps (default: 25)" in text and "(default: 72589)" in text and "(default: 18)" in text


def test_ctrl_c_is_one_line_and_leaves_nothing(tiny_dir, tmp_path):
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-m", "sonic", "generate", *_args(tiny_dir, tmp_path)[:-4],
                                "--steps", "200", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 300
    seen = ""
    while "sampling" not in seen:  # the tqdm bar of the denoising loop is on stderr
        seen += process.stderr.read(1)
        assert time.time() < deadline and process.poll() is None, seen
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert err.strip().splitlines()[-1] == "cancelled" and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no MP4, no temporary file


def test_a_changed_aspect_is_said_in_one_line(tiny_dir, tmp_path):
    result = _run(tiny_dir, tmp_path / "o.mp4", "--steps", "1", "--duration", "1", "--face-box", "37,37,76,76")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert notes == ["note: the 144x256 photo becomes a 128x256 video (sides are multiples of 64), which changes its "
                     "proportions; crop the photo to that shape to keep them"]


def test_unreadable_image(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"\x89PNG broken")
    assert "could not be read" in _error_of(capsys, *_args(tiny_dir, tmp_path, image=bad))


@pytest.mark.parametrize("kind, message", [("garbage", "could not be decoded"), ("empty", "no samples")])
def test_bad_audio(tiny_dir, tmp_path, capsys, kind, message):
    audio = tmp_path / "speech.wav"
    if kind == "garbage":
        audio.write_bytes(b"RIFF....WAVEfmt nonsense" * 10)
    else:
        soundfile.write(audio, np.zeros(0, np.float32), 16000)
    assert message in _error_of(capsys, *_args(tiny_dir, tmp_path, audio=audio))


def test_missing_weights(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "models"
    empty.mkdir()
    err = _error_of(capsys, *_args(tiny_dir, tmp_path, models=empty))
    assert "unet.pth" in err and "huggingface.co" in err


def test_duration_longer_than_audio(tiny_dir, tmp_path, capsys):
    err = _error_of(capsys, *_args(tiny_dir, tmp_path), "--duration", "9", "--face-box", "37,37,76,76")
    assert "longer than the audio" in err


def test_convert_command(tiny_dir, tmp_path, capsys):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(tiny_dir / "models", models)
    assert main(["convert", "--models", str(models)]) == 0
    assert "unet.safetensors" in capsys.readouterr().out
    assert main(["convert", "--models", str(models)]) == 0
    assert "nothing to convert" in capsys.readouterr().out


def test_lipsync_without_a_face_names_the_frame_and_the_flag(tmp_path, capsys):
    import imageio_ffmpeg

    video = tmp_path / "wall.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "color=gray:s=128x128:d=1",
                    "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-shortest", "-c:v", "libx264", "-c:a", "aac",
                    str(video)], check=True)
    assert main(["lipsync", "--video", str(video)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no face found in the video's first frame") and "--face-box X,Y,W,H" in err
