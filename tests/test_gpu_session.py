"""benchmarks/gpu_session.sh's plumbing, proved on the CPU (SONIC_GPU_SESSION_DRYRUN=1: tiny models, tiny sizes):
its exit status, its timed phases, the files it leaves (at most 8: what the device tool brings back), that a module
missing on the lent machine stops it with a non-zero status naming the module, that a phase over its budget fails it,
and that tests/engine/test_gpu.py fails instead of skipping without CUDA where SONIC_REQUIRE_GPU=1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def run_session(tmp_path: Path, reference: Path, phases: str | None, timeout: float, **env) -> tuple[int, str, Path]:
    out = tmp_path / "out"
    environment = {**os.environ, "OUT": str(out), "TMPDIR": str(tmp_path), "SONIC_GPU_SESSION_DRYRUN": "1",
                   "SONIC_REFERENCE_DIR": str(reference), **env}
    environment.pop("SONIC_GPU_SESSION_PHASES", None)
    if phases:
        environment["SONIC_GPU_SESSION_PHASES"] = phases
    done = subprocess.run(["bash", str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr, out


def phases_run(out: Path) -> dict[str, int]:
    rows = [line.split("\t") for line in (out / "phases.tsv").read_text().splitlines()]
    return {name: int(rc) for name, rc, _seconds, _budget in rows}


def test_the_cpu_dry_run_passes_and_leaves_its_files(tmp_path, reference_dir):
    rc, log, out = run_session(tmp_path, reference_dir, "install,preflight,info,ceiling,table", timeout=400)
    assert rc == 0, log[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["ceiling.json", "gpu.txt", "phases.tsv", "session.log", "table.md"]
    assert phases_run(out) == {"install": 0, "preflight": 0, "info": 0, "ceiling": 0, "table": 0}
    ceiling = json.loads((out / "ceiling.json").read_text())
    assert ceiling["device"] == "cpu" and ceiling["tflops"]["fp32"] > 0
    log = (out / "session.log").read_text()
    assert "preflight ok" in log and "all phases passed" in log and "5 files in" in log
    assert "| ceiling | 0 |" in (out / "table.md").read_text()
    assert not list(tmp_path.glob("sonic-gpu-session.*"))  # its working folder is removed


def test_a_module_missing_on_the_machine_stops_the_session_naming_it(tmp_path, reference_dir):
    """The lent image's failure: no cffi, so soundfile does not import (its compiled part needs cffi's
    _cffi_backend). Stand-ins for both that fail to import come first on PYTHONPATH; preflight names them and
    soundfile, and nothing after it runs."""
    stub = tmp_path / "stub"
    (stub / "cffi").mkdir(parents=True)
    for path, name in ((stub / "cffi" / "__init__.py", "cffi"), (stub / "_cffi_backend.py", "_cffi_backend")):
        path.write_text(f"raise ModuleNotFoundError(\"No module named '{name}' (test stand-in)\")\n")
    rc, log, out = run_session(tmp_path, reference_dir, "install,preflight,ceiling", timeout=400,
                               PYTHONPATH=str(tmp_path / "stub"))
    assert rc != 0
    assert "FAIL cffi: ModuleNotFoundError" in log
    assert "FAIL soundfile: ModuleNotFoundError: No module named '_cffi_backend'" in log
    assert "phase preflight FAILED (exit 1)" in log and "preflight is needed by every later phase" in log
    assert phases_run(out) == {"install": 0, "preflight": 1}  # the ceiling never ran
    assert sorted(p.name for p in out.iterdir()) == ["phases.tsv", "session.log"]


def test_a_phase_over_its_budget_fails_the_session(tmp_path, reference_dir):
    rc, log, out = run_session(tmp_path, reference_dir, "preflight", timeout=120,
                               SONIC_GPU_SESSION_TIMEOUT_SCALE="0.005")  # 40 s x 0.005 = 0.2 s
    assert rc != 0
    assert "phase preflight FAILED (timed out after 0.2 s)" in log
    assert phases_run(out) == {"preflight": 124}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the GPU tests would run")
def test_gpu_tests_fail_without_cuda_where_a_gpu_is_required(tmp_path):
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               str(ROOT / "tests/engine/test_gpu.py")]
    env = {k: v for k, v in os.environ.items() if k != "SONIC_REQUIRE_GPU"}
    collected = subprocess.run([*command, "--collect-only"], env=env, capture_output=True, text=True, timeout=300,
                               cwd=ROOT)
    count = int(re.search(r"(\d+) tests? collected", collected.stdout).group(1))
    assert count >= 8, collected.stdout[-2000:]
    skipped = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert skipped.returncode == 0 and f"{count} skipped" in skipped.stdout, skipped.stdout[-2000:]
    failed = subprocess.run(command, env={**env, "SONIC_REQUIRE_GPU": "1"}, capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert failed.returncode == 1, failed.stdout[-2000:]
    assert f"{count} errors" in failed.stdout and "no CUDA GPU on this machine (SONIC_REQUIRE_GPU=1)" in failed.stdout


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SONIC_TEST_GPU_SESSION_WHOLE") != "1",
                    reason="the whole dry run takes 2-4 minutes of the suite's 30 on 2 cores (the five-phase dry run "
                           "above covers the plumbing): SONIC_TEST_GPU_SESSION_WHOLE=1 runs it, do so after changing "
                           "benchmarks/gpu_bench.py")
def test_the_whole_cpu_dry_run(tmp_path, reference_dir):
    """Every phase at toy sizes on the CPU: the GPU tests skip (no SONIC_REQUIRE_GPU in a dry run), the stages,
    the comparison of the modes and the end-to-end run write their JSON, and the 8 files come back."""
    rc, log, out = run_session(tmp_path, reference_dir, None, timeout=1500)
    assert rc == 0, log[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["session.log", "phases.tsv", "table.md", "gpu.txt", "test_gpu.txt", "ceiling.json", "stages.json", "e2e.json"])
    assert set(phases_run(out).values()) == {0} and len(phases_run(out)) == 8
    stages = json.loads((out / "stages.json").read_text())
    assert [row["size"] for row in stages["sizes"]] == ["64x64"] and stages["sizes"][0]["finite"]
    modes = {m["mode"]: m for m in stages["modes"]}
    assert set(modes) == {"batched", "low-VRAM rows", "streamed UNet"}
    assert modes["streamed UNet"]["rel_err"] == 0.0  # the same weights, only their place differs
    assert modes["low-VRAM rows"]["equal_within_tolerance"]
    assert re.search(r"\d+ skipped", (out / "test_gpu.txt").read_text())
    table = (out / "table.md").read_text()
    assert "| 64x64 |" in table and "| streamed UNet | 64 |" in table and "End to end" in table


def _wheel(folder: Path, name: str, version: str, requires: list[str], tag: str = "py3-none-any") -> None:
    import zipfile

    metadata = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    with zipfile.ZipFile(folder / f"{name}-{version}-{tag}.whl", "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", metadata)


def check_wheels(folder: Path, *need: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_bench.py"), "check-wheels", str(folder),
                           "--need", *need], capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


def test_the_wheel_check_finds_what_the_image_lacks(tmp_path):
    """gpu_prepare.sh's check, on stand-in wheels against the image's real package list: soundfile without cffi
    (the session that died on the lent machine) fails naming cffi; a requirement whose marker excludes Python 3.12
    is ignored; one the image's recorded version does not meet fails; a wheel for another Python fails."""
    _wheel(tmp_path, "soundfile", "0.14.0", ["cffi >=1.0", "numpy", "typing-extensions"])
    _wheel(tmp_path, "audioread", "3.1.0", ['standard-aifc ; python_version >= "3.13"'])
    rc, log = check_wheels(tmp_path, "soundfile", "torch")
    assert rc == 1 and "soundfile 0.14.0 needs cffi>=1.0: neither carried nor on the image" in log
    assert "standard-aifc" not in log
    _wheel(tmp_path, "cffi", "2.0.0", ['pycparser; implementation_name != "PyPy"'],
           tag="cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64")
    _wheel(tmp_path, "pycparser", "3.0", [])
    rc, log = check_wheels(tmp_path, "soundfile", "torch")
    assert rc == 0 and "wheel check ok" in log, log
    _wheel(tmp_path, "diffusers", "9.0", ["huggingface-hub>=2.0"])  # the image records huggingface-hub 1.33.0
    _wheel(tmp_path, "soxr", "1.1.0", [], tag="cp311-cp311-manylinux_2_28_x86_64")
    rc, log = check_wheels(tmp_path)
    assert rc == 1 and "diffusers needs huggingface-hub>=2.0, the image has huggingface-hub 1.33.0" in log
    assert "soxr-1.1.0-cp311-cp311-manylinux_2_28_x86_64.whl does not install on CPython 3.12" in log
    rc, log = check_wheels(tmp_path / "none", "librosa")
    assert rc == 1 and "the session needs librosa: neither carried nor on the image" in log
