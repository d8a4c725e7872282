"""`python -m sonic download` against a local server with the hub's file routes for the tiny models (loopback only).

Real huggingface_hub code, real HTTP: a cut connection resumed with a Range request, a second run that fetches
nothing, bytes corrupted in transit, a file that is not the official one, a gated repository, no network.

The command runs in this process (`sonic.cli.main`, what `python -m sonic` calls), with the environment a user
would set; one test runs the real `python -m sonic download` for what only a process shows (its exit status and
stderr, HF_HUB_OFFLINE read from the environment at import)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import HubServer, free_port

from sonic.cli import main

ROOT = Path(__file__).resolve().parents[2]
PARTS = "sonic,whisper,svd,rife"  # the tiny models have no YOLO detector
SVD = "stable-video-diffusion-img2vid-xt"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_files(models: Path) -> dict[str, str]:
    return {str(p.relative_to(models)): sha(p) for p in sorted(models.rglob("*"))
            if p.is_file() and ".cache" not in p.parts}


@pytest.fixture
def hub_repos(tiny_dir, tmp_path):
    """The three repositories as served folders (copies, so a test may replace a file)."""
    models = tiny_dir / "models"
    sonic = tmp_path / "hub" / "sonic"
    for rel in ("Sonic", "RIFE"):
        shutil.copytree(models / rel, sonic / rel)
    return {"LeonJoe13/Sonic": sonic, "openai/whisper-tiny": models / "whisper-tiny",
            "stabilityai/stable-video-diffusion-img2vid-xt": models / SVD}


@pytest.fixture
def hub(hub_repos):
    server = HubServer(hub_repos)
    yield server
    server.stop()


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run(monkeypatch, capsys, tmp_path):
    """`python -m sonic download --models MODELS FLAGS` in this process, as `run(endpoint, models, *flags, **env)`.

    huggingface_hub reads HF_HUB_OFFLINE, HF_ENDPOINT and its token file's place (HF_HOME) once, when it is
    imported (`huggingface_hub.constants`). HF_HUB_OFFLINE and the token file are set there. HF_ENDPOINT goes in
    the environment only: sonic.engine.download reads it at each call and hands it to huggingface_hub, which swaps
    it for its import-time `constants.ENDPOINT` in the URLs it builds (so that one must stay as imported).
    HF_TOKEN is read at each request. No token from this machine's own login, none left over from another test."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "hf-home"
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))

    def run_download(endpoint: str, models: Path, *flags: str, HF_TOKEN: str | None = None,
                     HF_HUB_OFFLINE: str | None = None) -> Ran:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)  # constants.ENDPOINT stays the hub's: hf_hub_url swaps it
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", HF_HUB_OFFLINE == "1")  # CI sets it for everything else
        if HF_TOKEN is None:
            monkeypatch.delenv("HF_TOKEN", raising=False)
        else:
            monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
        capsys.readouterr()
        code = main(["download", "--models", str(models), *flags])
        out = capsys.readouterr()
        return Ran(code, out.out, out.err)

    return run_download


def test_download_resumes_a_cut_connection_and_a_second_run_fetches_nothing(hub, run, tiny_dir, tmp_path):
    models = tmp_path / "models"
    hub.cut.add("Sonic/unet.pth")
    first = run(hub.url, models, "--only", PARTS)
    assert first.returncode == 0, first.stderr
    # every file of the layout, byte for byte the served one
    assert tiny_files(models) == tiny_files(tiny_dir / "models")
    unet_gets = hub.gets("Sonic/unet.pth")
    assert [g[2] for g in unet_gets] == [None, "bytes=10485760-"]  # the retry asked only for the rest
    assert "13 files downloaded, 0 already there" in first.stdout
    assert "next: python -m sonic generate --models" in first.stdout

    hub.requests.clear()
    second = run(hub.url, models, "--only", PARTS)
    assert second.returncode == 0, second.stderr
    assert [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]] == []
    assert "0 files downloaded, 13 already there" in second.stdout

    from sonic.engine.loader import load_models

    loaded = load_models(models, device="cpu", dtype="fp32", face_detector="dlib")
    assert loaded.rife is not None and loaded.unet is not None


def test_bytes_corrupted_in_transit_are_caught_by_the_hash_and_deleted(hub, run, tmp_path):
    models = tmp_path / "models"
    hub.garble.add("RIFE/flownet.pkl")
    bad = run(hub.url, models, "--only", "rife")
    assert bad.returncode == 2
    assert "RIFE/flownet.pkl" in bad.stderr and "corrupt" in bad.stderr and "run the same command again" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (models / "RIFE" / "flownet.pkl").exists()
    hub.garble.clear()
    good = run(hub.url, models, "--only", "rife")
    assert good.returncode == 0, good.stderr
    assert sha(models / "RIFE" / "flownet.pkl") == sha(hub.repos["LeonJoe13/Sonic"] / "RIFE" / "flownet.pkl")


def test_a_file_that_is_not_the_official_one_fails_the_manifest_check(hub, run, hub_repos, tmp_path):
    import torch

    unet = hub_repos["LeonJoe13/Sonic"] / "Sonic" / "unet.pth"
    state = torch.load(unet, weights_only=True)
    dropped = sorted(state)[5]
    del state[dropped]
    torch.save(state, unet)  # the hub's hash is of this file: only the check against the networks can see it
    models = tmp_path / "models"
    result = run(hub.url, models, "--only", "sonic,svd")
    assert result.returncode == 2
    assert "Sonic/unet" in result.stderr and "1 missing tensors" in result.stderr and dropped in result.stderr
    assert not (models / "Sonic" / "unet.pth").exists()  # nothing unusable left in the layout
    assert (models / "Sonic" / "audio2token.pth").exists()  # the good files stay


def test_fp16_fetches_the_half_precision_svd_files(hub, run, hub_repos, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    svd = tmp_path / "hub" / "svd"
    shutil.copytree(hub_repos["stabilityai/stable-video-diffusion-img2vid-xt"], svd)
    for rel in ("vae/diffusion_pytorch_model", "image_encoder/model"):
        full = load_file(str(svd / f"{rel}.safetensors"))
        save_file({k: v.to(torch.float16) for k, v in full.items()}, str(svd / f"{rel}.fp16.safetensors"))
    hub.repos["stabilityai/stable-video-diffusion-img2vid-xt"] = svd
    models = tmp_path / "models"
    result = run(hub.url, models, "--only", "svd", "--fp16")
    assert result.returncode == 0, result.stderr
    names = sorted(str(p.relative_to(models / SVD)) for p in (models / SVD).rglob("*.safetensors")
                   if ".cache" not in p.parts)
    assert names == ["image_encoder/model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"]


def test_gated_repository_says_how_to_get_access(hub, run, tmp_path):
    hub.gated.add("stabilityai/stable-video-diffusion-img2vid-xt")
    result = run(hub.url, tmp_path / "models", "--only", "svd")
    assert result.returncode == 2
    assert "is gated" in result.stderr and "HF_TOKEN" in result.stderr and "--only sonic,whisper,rife" in result.stderr
    ok = run(hub.url, tmp_path / "models", "--only", "svd", HF_TOKEN="hf_test")  # the token from the environment
    assert ok.returncode == 0, ok.stderr


def test_missing_file_on_the_server_names_it_and_the_way_out(hub, run, tmp_path):
    result = run(hub.url, tmp_path / "models")  # every component: the tiny hub has no YOLO detector
    assert result.returncode == 2
    assert "yoloface_v5m.pt not found in LeonJoe13/Sonic" in result.stderr and "--only" in result.stderr
    assert not (tmp_path / "models" / "Sonic").exists()  # sizes are asked before anything is fetched


def test_no_network_is_one_clear_error_and_writes_nothing(run, tmp_path):
    models = tmp_path / "models"
    result = run(f"http://127.0.0.1:{free_port()}", models, "--only", "sonic")
    assert result.returncode == 2
    assert "could not download Sonic/unet.pth" in result.stderr and "network" in result.stderr
    assert "Traceback" not in result.stderr
    assert not models.exists() or not any(p.is_file() for p in models.rglob("*"))
    offline = run(f"http://127.0.0.1:{free_port()}", models, "--only", "sonic", HF_HUB_OFFLINE="1")
    assert offline.returncode == 2 and "HF_HUB_OFFLINE" in offline.stderr


def test_the_real_command_honours_hf_hub_offline_with_one_error_line(tmp_path):
    """The one separate process: `python -m sonic download` as a user runs it, HF_HUB_OFFLINE=1 in its environment
    (read by huggingface_hub at import): exit status 2, one `error:` line, no traceback, nothing written."""
    models = tmp_path / "models"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    result = subprocess.run([sys.executable, "-m", "sonic", "download", "--models", str(models), "--only", "sonic"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "HF_HUB_OFFLINE" in result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr and result.stdout == ""
    assert not models.exists() or not any(p.is_file() for p in models.rglob("*"))


def test_bad_component_names_the_flag(run, tmp_path):
    result = run("http://127.0.0.1:9", tmp_path / "models", "--only", "sonic,unet")
    assert result.returncode == 2
    assert "--only: unknown component unet" in result.stderr


def test_model_loader_download_missing_in_comfyui(comfy_env, hub, tmp_path, monkeypatch):
    """Sonic Model Loader on an empty models/sonic: validation says how; download_missing fetches the files with
    ComfyUI's progress bar in bytes, then loads them."""
    import folder_paths
    from comfy import utils
    from huggingface_hub import constants

    empty = tmp_path / "models-sonic"
    empty.mkdir()
    paths, exts = folder_paths.folder_names_and_paths["sonic"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sonic", ([str(empty)], exts))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # CI sets HF_HUB_OFFLINE=1 for everything else
    loader_cls = comfy_env["mappings"]["SonicModelLoader"]
    assert loader_cls.INPUT_TYPES()["required"]["sonic_unet"][0] == ["Sonic/unet.pth"]
    message = loader_cls.VALIDATE_INPUTS("Sonic/unet.pth")
    assert isinstance(message, str) and str(empty) in message
    assert "download_missing" in message and f"python -m sonic download --models {empty}" in message
    assert loader_cls.VALIDATE_INPUTS("Sonic/unet.pth", download_missing=True) is True

    with pytest.raises(FileNotFoundError, match="download_missing"):
        loader_cls().load("Sonic/unet.pth", dtype="fp32")
    utils.UPDATES.clear()
    model = loader_cls().load("Sonic/unet.pth", dtype="fp32", download_missing=True)[0]
    assert model.models.rife is not None
    served = sum(p.stat().st_size for p in (empty).rglob("*") if p.is_file() and ".cache" not in p.parts)
    assert utils.UPDATES and utils.UPDATES[-1] == (served, served)  # the bar counted every byte, in bytes
    assert [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]
    hub.requests.clear()
    assert loader_cls().load("Sonic/unet.pth", dtype="fp32", download_missing=True)[0] is model  # nothing fetched
    assert not [r for r in hub.requests if "/resolve/" in r[1]]
