"""The way ComfyUI-Manager installs the pack, end to end: `git clone` into custom_nodes, `pip install -r
requirements.txt` with ComfyUI's Python, restart. ComfyUI's torch must come out of that untouched (a requirements.txt
that lists torch or pins torchvision would replace a user's CUDA build), and the restarted ComfyUI lists the nodes.

ComfyUI's environment is a fresh venv with --system-site-packages over the interpreter that runs ComfyUI 0.8.0 (the
tests' own, or COMFYUI_PYTHON): torch is "already installed" there, and whatever pip decides to install lands in the
venv, where this test sees it. Pip uses the configured index (a PyPI mirror is enough); with the requirements already
met it downloads nothing.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from servers import comfyui_dir, comfyui_python, wait_listening

ROOT = Path(__file__).resolve().parents[1]
FOLDER = "sonic-portrait"  # the folder name the README's `git clone` gives

# Run in ComfyUI's environment: where each of the torch stack comes from, byte for byte
SNAPSHOT = r"""
import hashlib, json, os, sys
from importlib import metadata
out = {}
for name in ("torch", "torchvision", "torchaudio"):
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        continue
    record = dist.read_text("RECORD") or ""
    out[name] = {"version": dist.version, "location": str(dist.locate_file("")),
                 "record_sha256": hashlib.sha256(record.encode()).hexdigest()}
# the torch that `import torch` would load, and its __version__, without the seconds an import takes
import ast, importlib.util
origin = importlib.util.find_spec("torch").origin
lib = os.path.join(os.path.dirname(origin), "lib")
version_py = open(os.path.join(os.path.dirname(origin), "version.py")).read()
out["torch.__file__"] = origin
out["torch.__version__"] = next(ast.literal_eval(n.value) for n in ast.parse(version_py).body
                                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "__version__")
out["torch/lib"] = {f: [os.stat(os.path.join(lib, f)).st_size, os.stat(os.path.join(lib, f)).st_mtime_ns]
                    for f in sorted(os.listdir(lib))}
print(json.dumps(out))
"""


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


def torch_snapshot(python: Path) -> dict:
    return json.loads(run([python, "-c", SNAPSHOT], timeout=120).stdout.strip().splitlines()[-1])


def node_ids(pack: Path) -> set[str]:
    """The keys of NODE_CLASS_MAPPINGS in the pack's nodes/__init__.py."""
    for node in ast.walk(ast.parse((pack / "nodes" / "__init__.py").read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "NODE_CLASS_MAPPINGS" for t in node.targets):
            return {key.value for key in node.value.keys}
    raise AssertionError("no NODE_CLASS_MAPPINGS in nodes/__init__.py")


@pytest.mark.slow
def test_manager_style_install_keeps_torch_and_loads_the_nodes(tmp_path):
    comfyui, python = comfyui_dir(), comfyui_python()  # skip (or fail in CI) without a ComfyUI 0.8.0
    started = time.time()

    # ComfyUI's environment: torch comes from the interpreter below it
    venv = tmp_path / "venv"
    # no pip of its own (ensurepip takes long here): `python -m pip` runs the pip it sees through the system
    # site-packages, and installs into the venv as ComfyUI's own pip would into ComfyUI's environment
    run([python, "-m", "venv", "--system-site-packages", "--without-pip", venv], timeout=120)
    venv_python = venv / "bin" / "python"
    before = torch_snapshot(venv_python)
    assert before["torch.__version__"] and before["torch"]["location"] != str(venv)

    # the Manager's install: a clean clone of this repository (HEAD) into a fresh base directory's custom_nodes
    base = tmp_path / "base"
    pack = base / "custom_nodes" / FOLDER
    run(["git", "clone", "--quiet", "--no-hardlinks", ROOT, pack], timeout=120)
    requirements = (pack / "requirements.txt").read_text()
    pip = run([venv_python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r",
               pack / "requirements.txt"], timeout=300)

    after = torch_snapshot(venv_python)
    assert after == before, (f"pip install -r requirements.txt changed ComfyUI's torch stack:\n{requirements}\n"
                             f"before: { {k: v for k, v in before.items() if k != 'torch/lib'} }\n"
                             f"after: { {k: v for k, v in after.items() if k != 'torch/lib'} }\n{pip.stdout[-2000:]}")

    # restart ComfyUI with that environment: the nodes load from the clone, nothing failed to import
    log_path = tmp_path / "comfyui.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(venv_python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", "0",
                                    "--base-directory", str(base), "--disable-api-nodes",
                                    "--database-url", "sqlite:///:memory:"],
                                   cwd=comfyui, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        port = wait_listening(process, 0, log_path, 0, 120, "ComfyUI")
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info", timeout=30) as response:
                    object_info = json.load(response)
                break
            except OSError:
                assert time.time() < deadline and process.poll() is None, log_path.read_text()[-3000:]
                time.sleep(0.3)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)
    log_text = log_path.read_text()
    expected = node_ids(pack)
    assert {"SonicSampler", "SonicModelLoader", "SonicVideoEncode"} <= expected
    assert expected <= set(object_info), log_text[-3000:]
    assert {object_info[n]["python_module"] for n in expected} == {f"custom_nodes.{FOLDER}"}
    for failure in ("IMPORT FAILED", "Cannot import", "Traceback", "Unable to parse pyproject.toml"):
        assert failure not in log_text, log_text[-3000:]
    print(f"manager-style install and start: {time.time() - started:.1f} s")
