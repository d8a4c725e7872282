"""Time every stage of one Sonic generation and record peak memory.

    python benchmarks/bench_stages.py --models ../shared/reference/sonic-tiny/models            # a models folder
    python benchmarks/bench_stages.py --random-full --device cuda --seconds 10 --steps 25      # real sizes
    python benchmarks/bench_stages.py --random-full --device cuda --seconds 4 --steps 4 --low-vram on \
        --stream-unet both --face-box 180,60,160,200 --no-encode           # UNet streaming against resident

`--random-full` builds the released architectures (SVD-xt UNet + Sonic audio layers, SVD VAE, CLIP ViT-H/14,
Whisper-tiny encoder, audio MLPs, RIFE) with random weights in memory: speed does not depend on weight values.
Prints a table and writes JSON next to this script under results/.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sonic.engine import pipeline  # noqa: E402
from sonic.inputs.face import largest_face  # noqa: E402
from sonic.params import PrepareOptions, SampleOptions  # noqa: E402

REFERENCE = HERE.parent.parent / "shared" / "reference"


def random_full_models(device: torch.device, dtype: torch.dtype, svd_config_dir: Path, face_detector: bool = True):
    """The released architectures with random weights (no files needed beyond the SVD-xt configs); dlib's face
    detector unless `face_detector` is false (a face box is given)."""
    from diffusers import AutoencoderKLTemporalDecoder
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from sonic.engine.encoders import DiffusersVAE, TransformersImageEncoder
    from sonic.inputs.face import DlibFaceDetector
    from sonic.engine.loader import SonicModels
    from sonic.engine.models.audio_proj import AudioToBucket, AudioToTokens
    from sonic.engine.models.rife import IFNet
    from sonic.engine.models.unet import build_sonic_unet

    def init(module):
        module.to_empty(device=device)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.02)
        return module

    unet, conditioning = build_sonic_unet(json.loads((svd_config_dir / "unet/config.json").read_text()), 1024)
    unet = torch.nn.Module.to(init(unet), dtype=dtype)  # plain .to: no diffusers fp32-module warning
    vae_config = json.loads((svd_config_dir / "vae/config.json").read_text())
    vae = torch.nn.Module.to(AutoencoderKLTemporalDecoder.from_config(vae_config), device, dtype).eval()
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
        image_size=224, projection_dim=1024, hidden_act="gelu")).to(device, dtype).eval()
    whisper = WhisperEncoder(WhisperConfig(d_model=384, encoder_layers=4, encoder_attention_heads=6,
                                           encoder_ffn_dim=1536, num_mel_bins=80)).to(device).eval()
    with torch.device("meta"):
        tokens, bucket = AudioToTokens(19200, 1024, 32, 1024), AudioToBucket(20224, 1024, 2)
        rife = IFNet(90)
    return SonicModels(
        unet=unet, audio_conditioning=conditioning, vae=DiffusersVAE(vae), image_encoder=TransformersImageEncoder(clip),
        whisper_encoder=whisper,
        feature_extractor=WhisperFeatureExtractor(), audio_to_tokens=init(tokens).eval(),
        audio_to_bucket=init(bucket).eval(), rife=init(rife).eval(),
        scheduler_config=json.loads((svd_config_dir / "scheduler/scheduler_config.json").read_text()),
        face_detector=DlibFaceDetector() if face_detector else None, device=device, dtype=dtype)


class Recorder:
    def __init__(self, device: torch.device):
        self.device, self.rows = device, []

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str, count: int | None = None, unit: str = ""):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sync()
        start = time.perf_counter()
        row = {"stage": name}
        yield row
        self._sync()
        row["seconds"] = time.perf_counter() - start
        if count:
            row["per_item_s"], row["items"], row["unit"] = row["seconds"] / count, count, unit
        if self.device.type == "cuda":
            row["gpu_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        row["cpu_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.rows.append(row)

    def table(self) -> str:
        lines = [f"{'size':<10}{'stage':<16}{'seconds':>10}{'per item':>16}{'GPU peak GiB':>14}{'RSS GiB':>10}"]
        for r in self.rows:
            per = f"{r['per_item_s']:.3f}s/{r['unit']}" if "per_item_s" in r else ""
            gpu = f"{r['gpu_peak_gib']:.2f}" if "gpu_peak_gib" in r else "-"
            lines.append(f"{r.get('size', ''):<10}{r['stage']:<16}{r['seconds']:>10.2f}{per:>16}{gpu:>14}"
                         f"{r['cpu_peak_rss_gib']:>10.2f}")
        return "\n".join(lines)


def speech(seconds: float | None, path: Path) -> tuple[np.ndarray, int]:
    import soundfile

    data, rate = soundfile.read(str(path), dtype="float32")
    if seconds:
        reps = int(np.ceil(seconds * rate / len(data)))
        data = np.tile(data, reps)[: int(seconds * rate)]
    return data, rate


def unet_call_flops(models, cond, options: SampleOptions) -> float:
    """Floating-point operations of one UNet call at this run's shape, counted by PyTorch's FlopCounterMode on a
    copy of the architecture on `meta` (no memory, no time): the numerator of the model FLOP utilisation."""
    from torch.utils.flop_counter import FlopCounterMode

    from sonic.engine.models.unet import build_sonic_unet

    unet, conditioning = build_sonic_unet(dict(models.unet.config), cond.audio_tokens.shape[-1])
    unet.to("meta")  # diffusers makes its mix factors on the CPU whatever the default device
    rows = options.windows_per_call * (1 if options.sequential_guidance else 3)
    length, (_, channels, h, w) = options.frames_per_window, cond.image_latents.shape
    with torch.device("meta"):
        sample = torch.zeros(rows, length, 2 * channels, h, w)
        tokens = torch.zeros(rows * length, *cond.audio_tokens.shape[1:])
        mask, clip = torch.zeros(cond.face_mask.shape), torch.zeros(rows, 1, cond.image_embeds.shape[-1])
        time_ids, timestep = torch.zeros(rows, 3), torch.zeros(())
    with FlopCounterMode(display=False) as counter, torch.no_grad(), torch.device("meta"), \
            conditioning.bind(tokens, length, mask, options.ip_audio_scale):
        unet(sample, timestep, encoder_hidden_states=clip, added_time_ids=time_ids, return_dict=False)
    per_call = counter.get_total_flops()
    return per_call * (3 if options.sequential_guidance else 1)  # the three rows of one denoiser call


def run_once(models, image, face, samples, size: int, options: SampleOptions, rec: "Recorder",
             peak_tflops: float | None, encode: bool = True) -> dict:
    """One generation at `size` (min_resolution) with `options`; stage rows go to `rec`, the summary is returned."""

    first = len(rec.rows)
    prep = PrepareOptions(min_resolution=size, face_box=face)
    with rec.stage("prepare total"):
        cond = pipeline.prepare(models, image, (samples, pipeline.audio_lib.SAMPLE_RATE), prep, keep_intermediates=True)
    with rec.stage("CLIP"):
        models.image_encoder.embed(cond.extras["clip_image"][None])
    with rec.stage("VAE encode"):
        models.vae.encode_mean(cond.ref_image)
    with rec.stage("audio encode", cond.num_frames, "frame"):
        pipeline.encode_audio(models, samples, cond.image_embeds)

    calls = []
    with rec.stage("sampling"):
        latents = pipeline.sample(models, cond, options, progress=lambda done, total: calls.append(total))
    sampling = rec.rows[-1]
    sampling.update(per_item_s=sampling["seconds"] / calls[-1], items=calls[-1], unit="call")
    flops = unet_call_flops(models, cond, options)
    sampling["unet_tflop_per_call"] = flops / 1e12
    if peak_tflops:
        sampling["mfu"] = flops / sampling["per_item_s"] / (peak_tflops * 1e12)

    with rec.stage("VAE decode", cond.num_frames, "frame"):
        decoded = [c for c in pipeline.decode_chunks(models, latents, options.decode_chunk_size)]
    with rec.stage("RIFE x2", 2 * cond.num_frames - 1, "frame"):
        final = [pipeline.to_uint8_frames(c) for c in pipeline.interpolate_chunks(models.rife, iter(decoded))]
    del decoded
    width, height = cond.size
    total = sum(f.shape[0] for f in final)
    if encode:
        from sonic.post.video_io import write_mp4

        with rec.stage("MP4 encode", total, "frame"), tempfile.TemporaryDirectory() as tmp:
            write_mp4(Path(tmp) / "bench.mp4", (f.numpy() for f in final), 25.0, width, height, total,
                      audio=(samples, pipeline.audio_lib.SAMPLE_RATE))
    rows = rec.rows[first:]
    for row in rows:
        row["size"] = f"{width}x{height}"
    audio_s = len(samples) / pipeline.audio_lib.SAMPLE_RATE
    generation_s = sum(r["seconds"] for r in rows if r["stage"] in
                       ("prepare total", "sampling", "VAE decode", "RIFE x2", "MP4 encode"))
    summary = {"size": f"{width}x{height}", "frames": cond.num_frames, "audio_s": audio_s,
               "sequential_guidance": options.sequential_guidance, "compile": options.compile,
               "stream_unet": options.stream_unet,
               "generation_s": generation_s, "s_per_video_s": generation_s / audio_s,
               "sampling_s_per_video_s": sampling["seconds"] / audio_s,
               "unet_s_per_call": sampling["per_item_s"], "unet_tflop_per_call": flops / 1e12,
               "mfu": sampling.get("mfu")}
    summary.update({f"gpu_peak_gib_{r['stage'].split()[0].lower()}": r["gpu_peak_gib"] for r in rows
                    if "gpu_peak_gib" in r})
    return summary


def place_unet(models, stream: bool, rec: "Recorder") -> None:
    """The UNet's weights on the compute device (resident) or in host memory, page-locked as streaming pins them
    on CUDA (timed apart, so the sampling stage shows the streamed calls alone)."""
    from sonic.engine import offload

    home = torch.device("cpu") if stream else models.device
    if next(models.unet.parameters()).device != home:
        with rec.stage("move UNet " + ("to host" if stream else "to device")):
            torch.nn.Module.to(models.unet, home)
    if stream and offload.should_pin(models.device):
        with rec.stage("pin UNet weights"):
            offload.pin_host_weights(offload.unet_units(models.unet))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--models", type=Path, help="models folder (official layout)")
    source.add_argument("--random-full", action="store_true", help="released architectures, random weights")
    parser.add_argument("--svd-config", type=Path, default=REFERENCE / "svd-xt")
    parser.add_argument("--image", type=Path, help="portrait (default: scikit-image's astronaut)")
    parser.add_argument("--audio", type=Path, default=REFERENCE / "sonic-tiny/inputs/speech.wav")
    parser.add_argument("--seconds", type=float, help="loop the audio to this length")
    parser.add_argument("--min-resolution", type=int, nargs="+", default=[512], help="one run per size")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--windows-per-call", type=int, default=1)
    parser.add_argument("--low-vram", choices=("off", "on", "both"), default="off",
                        help="guidance rows one after another (sequential_guidance); both = a run of each")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (the first call compiles)")
    parser.add_argument("--stream-unet", choices=("off", "on", "both"), default="off",
                        help="UNet block streaming (weights in pinned host memory, the next block copied ahead on a "
                             "side stream); both = a resident run, then a streamed one, for each size and mode")
    parser.add_argument("--channels-last", action="store_true",
                        help="the UNet's 4-d weights in channels_last memory format (to see whether it helps)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the card's dense peak for this dtype (H100/H200 SXM bf16/fp16: 989) for the MFU")
    parser.add_argument("--face-box", help="x,y,w,h of the face (skips detection: no dlib needed)")
    parser.add_argument("--no-encode", action="store_true", help="skip the MP4 stage (no ffmpeg needed)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--name", default=None, help="result file name (default from the settings)")
    args = parser.parse_args()

    from sonic.engine.loader import load_models, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    rec = Recorder(device)
    with rec.stage("load models"):
        if args.random_full:
            models = random_full_models(device, dtype, args.svd_config, face_detector=not args.face_box)
        else:
            models = load_models(args.models, device, dtype, face_detector="none" if args.face_box else "auto")

    if args.channels_last:  # the 2-d convolutions only (the temporal ones are 3-d)
        for module in models.unet.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.to(memory_format=torch.channels_last)

    from PIL import Image

    if args.image:
        image = Image.open(args.image).convert("RGB")
    else:
        from skimage import data

        image = Image.fromarray(data.astronaut())
    rgb = np.asarray(image)
    if args.face_box:
        face = tuple(float(v) for v in args.face_box.split(","))
    else:
        with rec.stage("face detect"):
            face = largest_face(models.face_detector, rgb)
    waveform, rate = speech(args.seconds, args.audio)
    with rec.stage("audio load"):
        samples = pipeline.load_speech((waveform, rate))

    modes = {"off": [False], "on": [True], "both": [False, True]}
    summaries = []
    for size in args.min_resolution:
        for stream in modes[args.stream_unet]:
            place_unet(models, stream, rec)
            for sequential in modes[args.low_vram]:
                options = SampleOptions(inference_steps=args.steps, windows_per_call=args.windows_per_call,
                                        sequential_guidance=sequential, compile=args.compile, stream_unet=stream)
                summaries.append(run_once(models, image, face, samples, size, options, rec, args.peak_tflops,
                                          encode=not args.no_encode))
                print(json.dumps(summaries[-1]), flush=True)

    settings = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "steps": args.steps,
                "windows_per_call": args.windows_per_call, "audio_s": len(samples) / 16000,
                "models": "random-full" if args.random_full else str(args.models), "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "peak_tflops": args.peak_tflops, "channels_last": args.channels_last}
    print(json.dumps(settings))
    print(rec.table())
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    sizes = "-".join(str(s) for s in args.min_resolution)
    name = args.name or f"{'full' if args.random_full else 'models'}-{device.type}-{settings['dtype']}-{sizes}"
    (out_dir / f"{name}.json").write_text(json.dumps({"settings": settings, "runs": summaries, "stages": rec.rows},
                                                     indent=1))


if __name__ == "__main__":
    main()
