"""Shared fixtures. Reference data lives in ../shared/reference (or $SONIC_REFERENCE_DIR).

Tests that need it skip with a reason when it is absent, unless SONIC_REQUIRE_REFERENCE=1 (set by CI),
in which case they fail. Likewise the tests that speak need Debian's espeak-ng (SONIC_REQUIRE_ESPEAK=1 in CI):
nothing is silently substituted for what is missing (`skip_or_fail`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from servers import PostgreSQL, skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("SONIC_REFERENCE_DIR", ROOT.parent / "shared" / "reference"))
TINY = REFERENCE / "sonic-tiny"


def _need(path: Path) -> Path:
    if path.exists():
        return path
    skip_or_fail(f"reference data not found at {path} (set SONIC_REFERENCE_DIR)", "SONIC_REQUIRE_REFERENCE")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _need(REFERENCE)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return _need(TINY)


@pytest.fixture(scope="session")
def tiny_params(tiny_dir) -> dict:
    return json.loads((tiny_dir / "params.json").read_text())


@pytest.fixture(scope="session")
def expected(tiny_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(tiny_dir / "expected.safetensors"))


@pytest.fixture(scope="session")
def tiny_models(tiny_dir):
    from sonic.engine.loader import load_models

    return load_models(tiny_dir / "models", device="cpu", dtype="fp32", face_detector="auto")


@pytest.fixture(scope="session")
def tiny_cond(tiny_models, tiny_dir, tiny_params):
    from helpers import prepare_reference_inputs

    return prepare_reference_inputs(tiny_models, tiny_dir, tiny_params)


@pytest.fixture(scope="session")
def espeak():
    """tests/talking.py with libespeak-ng loaded (real speech with phoneme times)."""
    import talking

    if talking.espeak_library() is None:
        skip_or_fail("libespeak-ng not found: apt-get install espeak-ng", "SONIC_REQUIRE_ESPEAK")
    return talking


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory) -> Path:
    """Real speech from the espeak-ng command. Without it the tests that use this skip (fail with
    SONIC_REQUIRE_ESPEAK=1) rather than quietly run on another recording."""
    espeak = shutil.which("espeak-ng")
    if not espeak:
        skip_or_fail("the espeak-ng command not found: apt-get install espeak-ng", "SONIC_REQUIRE_ESPEAK")
    out = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run([espeak, "-w", str(out), "Hello there, this is a short test of the talking head."], check=True)
    return out


@pytest.fixture(scope="session")
def astronaut_png(tmp_path_factory) -> Path:
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("img") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


@pytest.fixture(scope="session")
def comfy_env(tmp_path_factory, tiny_dir):
    """A ComfyUI stand-in (tests/comfy_stub) with models/sonic = the tiny reference models, the reference
    portrait and speech in the input folder, and the pack loaded the way ComfyUI loads it."""
    import sys

    base = tmp_path_factory.mktemp("comfy")
    for sub in ("input", "output", "temp", "models"):
        (base / sub).mkdir()
    (base / "models" / "sonic").symlink_to(tiny_dir / "models", target_is_directory=True)
    shutil.copy(tiny_dir / "inputs" / "portrait.png", base / "input" / "portrait.png")
    shutil.copy(tiny_dir / "inputs" / "speech.wav", base / "input" / "speech.wav")
    os.environ["SONIC_TEST_COMFY_BASE"] = str(base)
    sys.path.insert(0, str(ROOT / "tests" / "comfy_stub"))
    for name in [m for m in sys.modules if m == "folder_paths" or m == "comfy" or m.startswith("comfy.")]:
        del sys.modules[name]
    from comfy_harness import load_pack

    pack = load_pack(ROOT)
    return {"base": base, "pack": pack, "mappings": pack.NODE_CLASS_MAPPINGS}


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """Debian's PostgreSQL on loopback, one server per test module (tests make their own databases in it)."""
    server = PostgreSQL(tmp_path_factory.mktemp("pg"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server.close()
