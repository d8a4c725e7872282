"""The measuring parts of a GPU session (`benchmarks/gpu_session.sh` runs them as separate, time-limited phases).

    python benchmarks/gpu_bench.py preflight [--gpu]        every module the session imports, the reference files
    python benchmarks/gpu_bench.py ceiling --json F         the card's fp16 / bf16 matrix-product ceiling (TFLOP/s)
    python benchmarks/gpu_bench.py stages --json F ...      per-call UNet times at several sizes after a warm-up,
                                                            VAE decode and RIFE per frame, MFU, batched vs low-VRAM
                                                            vs streamed UNet on the same noise
    python benchmarks/gpu_bench.py table DIR                the Markdown table (benchmarks/README.md) from DIR's JSON
    python benchmarks/gpu_bench.py check-wheels DIR         (here) DIR's wheels install and import on the image

`stages --random-full` builds the released architectures with random weights (bench_stages.random_full_models:
SVD-xt UNet + Sonic audio layers from the SVD-xt configs, CLIP ViT-H/14, ...): speed does not depend on the weight
values, and no released weights exist on a lent machine. `--models DIR` uses a models folder (the tiny reference
models for the CPU dry run). Timings are taken after a warm-up call at the same shape, with the device synchronised;
a call's time is the gap between two calls' progress callbacks (the sampler's host runs one call behind the GPU), the
median of the run's calls. 25-step seconds per video second = per-call median x calls per video second at 25 steps
(windows of 25 frames, no overlap) + VAE decode and RIFE per frame x frames per video second.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

# what the session imports (tests/engine/test_gpu.py with tests/conftest.py, bench_stages.py, this file):
# importable name -> what to carry when it is missing (benchmarks/gpu_prepare.sh downloads these wheels)
MODULES = ["torch", "numpy", "scipy", "PIL", "skimage", "safetensors", "huggingface_hub", "transformers", "diffusers",
           "cffi", "soundfile", "soxr", "numba", "sklearn", "librosa", "pytest", "sonic.engine.pipeline",
           "sonic.engine.loader", "sonic.engine.sampler", "sonic.engine.offload", "bench_stages"]
REFERENCE_FILES = ["sonic-tiny/params.json", "sonic-tiny/models", "sonic-tiny/inputs/speech.wav",
                   "svd-xt/unet/config.json", "svd-xt/vae/config.json", "svd-xt/scheduler/scheduler_config.json"]
FACE_BOX = (180.0, 50.0, 150.0, 180.0)  # the astronaut's face (no dlib on a lent machine)


def preflight(args) -> int:
    """Import every module (all of them, then report every failure by name) and check the reference files."""
    failures = []
    for name in MODULES + list(args.extra):
        start = time.perf_counter()
        try:
            module = importlib.import_module(name)
            version = getattr(module, "__version__", "")
            print(f"ok   {name} {version} ({time.perf_counter() - start:.1f} s)", flush=True)
        except Exception as error:  # noqa: BLE001 - any import error is a missing or broken module
            failures.append(f"{name}: {type(error).__name__}: {error}")
            print(f"FAIL {name}: {type(error).__name__}: {error}", flush=True)
    reference = _reference_dir()
    for rel in REFERENCE_FILES:
        if not (reference / rel).exists():
            failures.append(f"reference file missing: {reference / rel}")
            print(f"FAIL reference file missing: {reference / rel}", flush=True)
    if not failures:  # the audio path for real: soundfile (cffi, libsndfile), librosa's resampling (soxr, numba)
        try:
            from sonic.inputs import audio

            samples = audio.load_audio(reference / "sonic-tiny/inputs/speech.wav")
            audio.trim_silence(samples[None], audio.SAMPLE_RATE)
            print(f"ok   reference speech read and resampled: {len(samples) / audio.SAMPLE_RATE:.2f} s", flush=True)
        except Exception as error:  # noqa: BLE001
            failures.append(f"reading the reference speech: {type(error).__name__}: {error}")
    if args.gpu and not failures:
        import torch

        if not torch.cuda.is_available():
            failures.append("torch.cuda.is_available() is False")
        else:
            print(f"ok   CUDA: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    if failures:
        print(f"preflight failed ({len(failures)}): " + "; ".join(failures), file=sys.stderr, flush=True)
        return 1
    print("preflight ok")
    return 0


def _reference_dir() -> Path:
    import os

    return Path(os.environ.get("SONIC_REFERENCE_DIR", ROOT.parent / "shared" / "reference"))


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceiling(args) -> int:
    """Dense matrix products n x n x n after warm-ups: the TFLOP/s this card reaches (the MFU's denominator)."""
    import torch

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    result = {"device": str(device), "n": args.n, "repeats": args.repeats,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "tflops": {}}
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16} if device.type == "cuda" else {"fp32": torch.float32}
    for name, dtype in dtypes.items():
        a = torch.randn(args.n, args.n, device=device, dtype=dtype)
        b = torch.randn(args.n, args.n, device=device, dtype=dtype)
        for _ in range(3):  # warm-up: cuBLAS picks its kernel, the clocks rise
            a @ b
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.repeats):
            a @ b
        _sync(device)
        seconds = (time.perf_counter() - start) / args.repeats
        result["tflops"][name] = 2 * args.n**3 / seconds / 1e12
        print(f"{name} {args.n}^3 matrix product: {seconds * 1e3:.2f} ms = {result['tflops'][name]:.1f} TFLOP/s",
              flush=True)
        del a, b
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _timed_sample(models, cond, options, noise):
    """(latents, per-call seconds: gaps between progress callbacks, total seconds, GPU peak bytes above start)."""
    import torch

    from sonic.engine import pipeline

    device = models.device
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    stamps = [time.perf_counter()]
    latents = pipeline.sample(models, cond, options, noise=noise,
                              progress=lambda done, total: stamps.append(time.perf_counter()))
    _sync(device)
    stamps.append(time.perf_counter())
    total, calls = stamps[-1] - stamps[0], len(stamps) - 2
    # on CUDA the callback of call k comes once call k-1's result is back on the host, on the CPU once call k is
    # done: either way the gap between two callbacks is one call's time (a step's end waits for its last call)
    gaps = [b - a for a, b in zip(stamps[1:-2], stamps[2:-1])] or [total / max(calls, 1)]
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    return latents, gaps, total, peak, calls


def _rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max())


def stages(args) -> int:
    import numpy as np
    import torch

    import bench_stages
    from sonic.engine import pipeline
    from sonic.engine.loader import load_models, resolve_device, resolve_dtype
    from sonic.engine.sampler import window_starts
    from sonic.params import PrepareOptions, SampleOptions

    from PIL import Image
    from skimage import data

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    ceiling_tflops = None
    if args.ceiling_json and Path(args.ceiling_json).exists():
        measured = json.loads(Path(args.ceiling_json).read_text())["tflops"]
        ceiling_tflops = measured.get({torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32"))
    result = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "models": "random-full (released architectures, random weights)" if args.random_full else str(args.models),
              "steps_timed": args.steps, "clip_s": args.seconds, "ceiling_tflops": ceiling_tflops,
              "nominal_tflops": args.peak_tflops, "sizes": [], "modes": [], "failures": []}

    def save():
        Path(args.json).write_text(json.dumps(result, indent=1))

    start = time.perf_counter()
    if args.random_full:
        svd_config = args.svd_config or _reference_dir() / "svd-xt"
        models = bench_stages.random_full_models(device, dtype, svd_config, face_detector=False)
    else:
        models = load_models(args.models, device, dtype, face_detector="none")
    _sync(device)
    result["load_s"] = time.perf_counter() - start
    print(f"models loaded in {result['load_s']:.1f} s", flush=True)
    image = Image.fromarray(data.astronaut())
    waveform, rate = bench_stages.speech(args.seconds, args.audio)
    samples = pipeline.load_speech((waveform, rate))
    audio_s = len(samples) / pipeline.audio_lib.SAMPLE_RATE
    generator = torch.Generator().manual_seed(0)
    batched_at = {}
    for size in args.sizes:
        with torch.no_grad():
            t0 = time.perf_counter()
            cond = pipeline.prepare(models, image, (samples, pipeline.audio_lib.SAMPLE_RATE),
                                    PrepareOptions(min_resolution=size, face_box=FACE_BOX))
            _sync(device)
            prepare_s = time.perf_counter() - t0
        noise = torch.randn(1, cond.num_frames, *cond.image_latents.shape[1:], generator=generator)
        options = SampleOptions(inference_steps=args.steps)
        pipeline.sample(models, cond, SampleOptions(inference_steps=1), noise=noise)  # warm-up at this shape
        latents, gaps, total, peak, calls = _timed_sample(models, cond, options, noise)
        batched_at[size] = (cond, noise, latents, statistics.median(gaps), peak)
        # decode and RIFE: warm-up on one chunk, then timed on `decode_frames` frames
        frames = min(args.decode_frames, cond.num_frames)
        next(pipeline.decode_chunks(models, latents[:, :options.decode_chunk_size], options.decode_chunk_size))
        _sync(device)
        t0 = time.perf_counter()
        decoded = list(pipeline.decode_chunks(models, latents[:, :frames], options.decode_chunk_size))
        _sync(device)
        decode_s = (time.perf_counter() - t0) / frames
        finite = bool(torch.isfinite(latents).all()) and all(bool(torch.isfinite(c).all()) for c in decoded)
        list(pipeline.interpolate_chunks(models.rife, iter(decoded[:1]), options.interpolation_batch))
        _sync(device)
        t0 = time.perf_counter()
        out_frames = sum(c.shape[0] for c in pipeline.interpolate_chunks(models.rife, iter(decoded),
                                                                         options.interpolation_batch))
        _sync(device)
        rife_s = (time.perf_counter() - t0) / out_frames
        del decoded
        flops = bench_stages.unet_call_flops(models, cond, options)
        per_call = statistics.median(gaps)
        frames_per_s = cond.num_frames / audio_s
        windows = len(window_starts(cond.num_frames, options.frames_per_window, options.overlap))
        calls_per_video_s = frames_per_s / (options.frames_per_window - options.overlap) * 25  # 25 steps
        width, height = cond.size
        row = {"size": f"{width}x{height}", "min_resolution": size, "frames": cond.num_frames, "windows": windows,
               "calls": calls, "per_call_s": gaps, "per_call_median_s": per_call, "sampling_s": total,
               "sampling_gpu_peak_gib": peak / 2**30 if peak is not None else None, "prepare_s": prepare_s,
               "vae_decode_s_per_frame": decode_s, "rife_s_per_frame": rife_s, "finite": finite,
               "unet_tflop_per_call": flops / 1e12, "calls_per_video_s_25_steps": calls_per_video_s,
               "sampling_s_per_video_s_25_steps": per_call * calls_per_video_s,
               "s_per_video_s_25_steps": per_call * calls_per_video_s + decode_s * frames_per_s
               + rife_s * (2 * frames_per_s)}
        if ceiling_tflops:
            row["mfu_measured_ceiling"] = flops / per_call / (ceiling_tflops * 1e12)
        if args.peak_tflops:
            row["mfu_nominal"] = flops / per_call / (args.peak_tflops * 1e12)
        if not finite:
            result["failures"].append(f"{row['size']}: non-finite latents or frames")
        result["sizes"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "per_call_s"}), flush=True)
        save()

    # batched (the default) vs low-VRAM rows vs the UNet streamed from host memory, the same noise and steps
    size = args.compare_size if args.compare_size in batched_at else args.sizes[0]
    cond, noise, reference, per_call, peak = batched_at[size]
    result["modes"].append({"mode": "batched", "size": size, "per_call_median_s": per_call,
                            "sampling_gpu_peak_gib": peak / 2**30 if peak is not None else None, "rel_err": 0.0})
    for mode, options in (("low-VRAM rows", SampleOptions(inference_steps=args.steps, sequential_guidance=True)),
                          ("streamed UNet", SampleOptions(inference_steps=args.steps, stream_unet=True))):
        if options.stream_unet:  # the weights live in host memory and visit the device block by block
            torch.nn.Module.to(models.unet, "cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        try:
            pipeline.sample(models, cond, dataclass_replace(options, inference_steps=1), noise=noise)  # warm-up
            latents, gaps, total, peak, calls = _timed_sample(models, cond, options, noise)
        finally:
            if options.stream_unet:
                torch.nn.Module.to(models.unet, device)
        err = _rel_err(latents, reference)
        ok = bool(np.isfinite(err)) and err <= args.tolerance
        row = {"mode": mode, "size": size, "per_call_median_s": statistics.median(gaps), "per_call_s": gaps,
               "sampling_gpu_peak_gib": peak / 2**30 if peak is not None else None, "rel_err": err,
               "equal_within_tolerance": ok, "tolerance": args.tolerance}
        if not ok:
            result["failures"].append(f"{mode} vs batched at {size}: rel_err {err:.3g} > {args.tolerance}")
        result["modes"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "per_call_s"}), flush=True)
        save()
    if result["failures"]:
        print("FAILED: " + "; ".join(result["failures"]), file=sys.stderr, flush=True)
        return 1
    return 0


def dataclass_replace(options, **changes):
    import dataclasses

    return dataclasses.replace(options, **changes)


def _fmt(value, pattern="{:.3f}"):
    return "-" if value is None else pattern.format(value)


def table(args) -> int:
    """The session's results as the Markdown rows benchmarks/README.md keeps."""
    folder = Path(args.dir)
    lines = []
    phases = folder / "phases.tsv"
    if phases.exists():
        lines += ["| phase | exit | seconds | budget s |", "|---|---|---|---|"]
        for line in phases.read_text().splitlines():
            lines.append("| " + " | ".join(line.split("\t")) + " |")
        lines.append("")
    ceiling_file = folder / "ceiling.json"
    if ceiling_file.exists():
        c = json.loads(ceiling_file.read_text())
        lines.append(f"Matrix-product ceiling ({c['gpu'] or c['device']}, {c['n']}^3, mean of {c['repeats']} after 3 "
                     "warm-ups): " + ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in c["tflops"].items()))
        lines.append("")
    stages_file = folder / "stages.json"
    if stages_file.exists():
        s = json.loads(stages_file.read_text())
        lines.append(f"{s['gpu'] or s['device']}, {s['dtype']}, torch {s['torch']}, {s['models']}; per-call times "
                     f"after a warm-up, {s['steps_timed']} steps on a {s['clip_s']} s clip, extrapolated to 25 steps:")
        lines.append("")
        lines += ["| size | UNet s/call (median) | TFLOP/call | MFU (measured ceiling / nominal) | VAE decode s/frame "
                  "| RIFE s/frame | sampling s per video s, 25 steps | total s per video s, 25 steps | GPU peak "
                  "sampling GiB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in s["sizes"]:
            mfu = f"{_fmt(r.get('mfu_measured_ceiling'), '{:.0%}')} / {_fmt(r.get('mfu_nominal'), '{:.0%}')}"
            lines.append(f"| {r['size']} | {r['per_call_median_s']:.3f} | {r['unet_tflop_per_call']:.1f} | {mfu} | "
                         f"{r['vae_decode_s_per_frame']:.4f} | {r['rife_s_per_frame']:.4f} | "
                         f"{r['sampling_s_per_video_s_25_steps']:.2f} | {r['s_per_video_s_25_steps']:.2f} | "
                         f"{_fmt(r['sampling_gpu_peak_gib'], '{:.2f}')} |")
        lines += ["", "| mode (same noise) | size | UNet s/call | GPU peak sampling GiB | max rel. difference to batched |",
                  "|---|---|---|---|---|"]
        for m in s["modes"]:
            lines.append(f"| {m['mode']} | {m['size']} | {m['per_call_median_s']:.3f} | "
                         f"{_fmt(m['sampling_gpu_peak_gib'], '{:.2f}')} | {m['rel_err']:.2e} |")
        if s["failures"]:
            lines += ["", "Failures: " + "; ".join(s["failures"])]
        lines.append("")
    e2e_file = folder / "e2e.json"
    if e2e_file.exists():
        e = json.loads(e2e_file.read_text())
        for run in e["runs"]:
            lines.append(f"End to end (bench_stages.py, {e['settings']['dtype']}, {e['settings']['steps']} steps, "
                         f"{run['audio_s']:.1f} s of audio, {run['size']}, no warm-up): {run['s_per_video_s']:.2f} s "
                         f"per video second, sampling {run['sampling_s_per_video_s']:.2f}, "
                         f"{run['unet_s_per_call']:.3f} s per UNet call")
    print("\n".join(lines))
    return 0


# the lent machine's interpreter, for the wheels' environment markers
IMAGE_ENVIRONMENT = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
                     "platform_python_implementation": "CPython", "implementation_version": "3.12.3",
                     "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                     "os_name": "posix", "extra": ""}
IMAGE_TAGS = {"interpreters": {"cp312", "py312", "py3", "py2.py3", "py32"}, "abis": {"cp312", "abi3", "none"}}


def check_wheels(args) -> int:
    """Every carried wheel fits CPython 3.12 on x86-64 Linux, one version per name, and every requirement of every
    wheel (markers evaluated for the image's Python) is met by another carried wheel or by the image's packages
    (`--image`, with its version where the list records one); the `--need` names must be importable there."""
    import zipfile
    from email.parser import Parser

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version

    image = {}
    for line in Path(args.image).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            image[canonicalize_name(name)] = Version(version) if version else None
    carried, problems, size = {}, [], 0
    for wheel in sorted(Path(args.dir).glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(wheel.name)
        size += wheel.stat().st_size
        if name in carried:
            problems.append(f"two versions of {name}: {carried[name][0]} and {version} (pip stops the install)")
        fits = any(t.interpreter in IMAGE_TAGS["interpreters"] and t.abi in IMAGE_TAGS["abis"]
                   and (t.platform == "any" or (t.platform.startswith("manylinux") and t.platform.endswith("x86_64")))
                   for t in tags)
        if not fits:
            problems.append(f"{wheel.name} does not install on CPython 3.12, x86-64 Linux")
        with zipfile.ZipFile(wheel) as archive:
            metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            requires = Parser().parsestr(archive.read(metadata).decode()).get_all("Requires-Dist") or []
        carried[name] = (version, requires)
    notes = []
    for name, (version, requires) in carried.items():
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(IMAGE_ENVIRONMENT):
                continue
            need = canonicalize_name(req.name)
            if need in carried:
                if not req.specifier.contains(carried[need][0], prereleases=True):
                    problems.append(f"{name} needs {req}, carried {need} {carried[need][0]}")
            elif need in image:
                if image[need] is None:
                    notes.append(f"{name} needs {req}: on the image (version not recorded)")
                elif not req.specifier.contains(image[need], prereleases=True):
                    problems.append(f"{name} needs {req}, the image has {need} {image[need]}: carry a fitting wheel")
            else:
                problems.append(f"{name} {version} needs {req}: neither carried nor on the image")
    for need in args.need:
        if canonicalize_name(need) not in carried and canonicalize_name(need) not in image:
            problems.append(f"the session needs {need}: neither carried nor on the image")
    for note in notes:
        print("note:", note)
    print(f"{len(carried)} wheels, {size / 2**20:.1f} MiB: " + ", ".join(f"{n} {v[0]}" for n, v in carried.items()))
    if problems:
        print(f"wheel check FAILED ({len(problems)}):\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print("wheel check ok: every requirement is carried or on the image")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preflight")
    p.add_argument("--gpu", action="store_true", help="also require CUDA")
    p.add_argument("--extra", nargs="*", default=[], help="more modules to import")
    p = sub.add_parser("ceiling")
    p.add_argument("--json", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=10)
    p = sub.add_parser("stages")
    p.add_argument("--json", required=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--models", type=Path)
    source.add_argument("--random-full", action="store_true")
    p.add_argument("--svd-config", type=Path, help="SVD-xt configs with vae/ (default: $SONIC_REFERENCE_DIR/svd-xt)")
    p.add_argument("--audio", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=4.0, help="clip length (the speech looped)")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 768, 1024])
    p.add_argument("--steps", type=int, default=2, help="timed steps per size (after a 1-step warm-up)")
    p.add_argument("--decode-frames", type=int, default=16)
    p.add_argument("--compare-size", type=int, default=512)
    p.add_argument("--tolerance", type=float, default=0.02, help="max relative difference of the modes' latents")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--ceiling-json")
    p.add_argument("--peak-tflops", type=float, help="nominal dense peak (H100/H200 SXM fp16: 989)")
    p = sub.add_parser("table")
    p.add_argument("dir")
    p = sub.add_parser("check-wheels")
    p.add_argument("dir")
    p.add_argument("--image", default=str(HERE / "gpu_image_packages.txt"))
    p.add_argument("--need", nargs="*", default=[], help="distributions the session imports")
    args = parser.parse_args()
    return {"preflight": preflight, "ceiling": ceiling, "stages": stages, "table": table,
            "check-wheels": check_wheels}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
