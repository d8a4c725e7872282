"""`python -m sonic generate`: portrait + speech -> MP4 with the engine, in this process."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path

from ..exits import EXIT_OK
from ..params import DEFAULT_SEED, PrepareOptions, SampleOptions
from . import DefaultsShown, face_box_arg


def _duration(text: str) -> float | None:
    return None if text == "auto" else float(text)


def add_parsers(sub) -> None:
    gen = sub.add_parser("generate", help="portrait + speech -> MP4", formatter_class=DefaultsShown)
    gen.add_argument("--models", required=True, type=Path, help="models folder (official layout, see README)")
    gen.add_argument("--image", required=True, type=Path, help="portrait photo")
    gen.add_argument("--audio", required=True, type=Path, help="speech (wav, mp3, flac, m4a/aac, ogg)")
    gen.add_argument("--out", required=True, type=Path, help="output .mp4")
    d_prep, d_samp = PrepareOptions(), SampleOptions()
    gen.add_argument("--min-resolution", type=int, default=d_prep.min_resolution, help="short side of the video (x64)")
    gen.add_argument("--crop", action="store_true", help="animate a square crop around the face")
    gen.add_argument("--expand-ratio", type=float, default=d_prep.expand_ratio, help="crop margin, in face sizes")
    gen.add_argument("--face-box", type=face_box_arg, help="X,Y,W,H of the face in pixels (skips detection)")
    gen.add_argument("--duration", type=_duration, default=None, help="seconds, or 'auto' for the whole audio")
    gen.add_argument("--steps", type=int, default=d_samp.inference_steps, help="denoising steps")
    gen.add_argument("--seed", type=int, default=DEFAULT_SEED, help="noise seed (the value is the official demo's)")
    gen.add_argument("--dynamic-scale", type=float, default=d_samp.dynamic_scale, help="motion strength (both buckets)")
    gen.add_argument("--motion-scale", type=float, default=d_samp.motion_scale, help="extra head-motion factor")
    gen.add_argument("--ip-audio-scale", type=float, default=d_samp.ip_audio_scale, help="audio attention strength")
    gen.add_argument("--min-appearance-guidance", type=float, default=d_samp.min_appearance_guidance,
                     help="faithfulness to the portrait, first step")
    gen.add_argument("--max-appearance-guidance", type=float, default=d_samp.max_appearance_guidance,
                     help="faithfulness to the portrait, last step")
    gen.add_argument("--audio-guidance", type=float, default=d_samp.audio_guidance, help="lip-sync strength")
    gen.add_argument("--shift-offset", type=int, default=d_samp.shift_offset, help="window shift per step (frames)")
    gen.add_argument("--windows-per-call", type=int, default=d_samp.windows_per_call, help="windows per UNet call")
    gen.add_argument("--no-interpolation", action="store_true", help="skip RIFE: 12.5 fps output")
    gen.add_argument("--low-vram", action="store_true", help="guidance rows one after another (a third of the "
                     "UNet's working memory, same video); on a GPU chosen by itself when the batched call would "
                     "not fit in free memory")
    gen.add_argument("--compile", action="store_true", help="torch.compile the UNet (compiling takes minutes; "
                     "worth it for long videos)")
    gen.add_argument("--stream-unet", action="store_true", help="keep the UNet's weights in RAM and move one block "
                     "at a time to the GPU (for cards that cannot hold its 3 GB; slower; implies --low-vram)")
    gen.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    gen.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu; named on stderr), cpu, cuda, "
                     "cuda:1, mps, ...")
    gen.add_argument("--face-detector", default="auto", choices=["auto", "yolo", "dlib"])
    gen.add_argument("--crf", type=int, default=18, help="H.264 quality (lower = better)")
    gen.add_argument("--preset", default="medium", help="x264 preset (ultrafast ... veryslow)")
    gen.add_argument("--audio-policy", default="match", choices=["match", "shortest", "keep"],
                     help="fit the sound track to the video: match (cut/pad), shortest (cut), keep (hold last frame)")
    gen.add_argument("--watermark", default=None, help="visible text in the bottom-left corner")
    gen.add_argument("--noise", type=Path, help="safetensors file with 'noise.latents' [1, F, 4, h, w]")
    gen.add_argument("--dump", type=Path, help="write final_latents / video_before_interp / video_final here")

    gen.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print(generate(args))
    return EXIT_OK


FLAGS = {"inference_steps": "--steps", "min_resolution": "--min-resolution", "expand_ratio": "--expand-ratio",
         "face_box": "--face-box", "duration": "--duration", "seed": "--seed", "dynamic_scale": "--dynamic-scale",
         "motion_scale": "--motion-scale", "ip_audio_scale": "--ip-audio-scale",
         "min_appearance_guidance": "--min-appearance-guidance", "max_appearance_guidance": "--max-appearance-guidance",
         "audio_guidance": "--audio-guidance", "shift_offset": "--shift-offset", "windows_per_call": "--windows-per-call",
         "stream_unet": "--stream-unet", "compile": "--compile", "sequential_guidance": "--low-vram"}


@contextlib.contextmanager
def flag_names():
    """Errors of the engine's option checks name the command-line flag (`--steps`, not `inference_steps`)."""
    try:
        yield
    except ValueError as exc:
        message = str(exc)
        for field, flag in FLAGS.items():
            message = re.sub(rf"\b{field}\b", flag, message)
        raise ValueError(message) from None


def _options(args: argparse.Namespace) -> tuple[PrepareOptions, SampleOptions]:
    prep = PrepareOptions(min_resolution=args.min_resolution, crop=args.crop, expand_ratio=args.expand_ratio,
                          face_box=args.face_box, duration=args.duration)
    opts = SampleOptions(inference_steps=args.steps, seed=args.seed, dynamic_scale=args.dynamic_scale,
                         motion_scale=args.motion_scale, ip_audio_scale=args.ip_audio_scale,
                         min_appearance_guidance=args.min_appearance_guidance,
                         max_appearance_guidance=args.max_appearance_guidance, audio_guidance=args.audio_guidance,
                         shift_offset=args.shift_offset, windows_per_call=args.windows_per_call,
                         interpolation=not args.no_interpolation, compile=args.compile,
                         stream_unet=args.stream_unet, sequential_guidance=args.low_vram)
    return prep, opts


def generate(args: argparse.Namespace) -> Path:
    import torch
    from tqdm import tqdm

    from ..engine import pipeline
    from ..engine.loader import load_models, resolve_device
    from ..engine.plan import DeviceMemory, plan_run
    from ..post.video_io import write_mp4

    with flag_names():
        prep, opts = _options(args)
    if args.out.suffix.lower() != ".mp4":
        raise ValueError(f"--out must end in .mp4, got {args.out}")
    if not args.out.parent.is_dir():
        raise FileNotFoundError(f"output folder {args.out.parent} does not exist")
    # Read the inputs before loading any model, so that bad files fail in a second.
    from ..inputs.audio import SAMPLE_RATE, load_audio
    from ..inputs.face import NoFaceError
    from ..inputs.image import load_image

    image = load_image(args.image)
    speech = (load_audio(args.audio), SAMPLE_RATE)
    noise = None
    if args.noise is not None:
        from ..engine.checkpoints import read_state_dict

        noise = read_state_dict(args.noise).get("noise.latents")
        if noise is None:
            raise ValueError(f"{args.noise} has no tensor named 'noise.latents'")

    device = resolve_device(args.device)
    if args.device == "auto":
        print(f"device: {_device_description(device)}", file=sys.stderr)
    models = load_models(args.models, device, args.dtype, interpolation=opts.interpolation,
                         face_detector="none" if args.face_box else args.face_detector,
                         unet_device="cpu")  # the run plan decides whether the UNet moves to the device or streams
    try:
        cond = pipeline.prepare(models, image, speech, prep)
    except NoFaceError as exc:
        raise exc.with_hint("give the face box with --face-box X,Y,W,H (pixels of the photo)") from None
    rounded = cond.size
    if abs(rounded[0] / rounded[1] - image.width / image.height) > 0.01 * image.width / image.height and not args.crop:
        print(f"note: the {image.width}x{image.height} photo becomes a {rounded[0]}x{rounded[1]} video (sides are "
              "multiples of 64), which changes its proportions; crop the photo to that shape to keep them",
              file=sys.stderr)
    with flag_names():
        plan = plan_run(models, cond, opts, DeviceMemory(usable_bytes=_free_bytes(models.device)))
    if not plan.options.stream_unet:
        torch.nn.Module.to(models.unet, models.device)  # (diffusers' ModelMixin.to only adds a warning)
        plan = plan.with_free_memory(_free_bytes(models.device))
    if plan.note:
        print(f"note: {plan.note}", file=sys.stderr)
    opts = plan.options
    with tqdm(total=1, desc="sampling", unit="call") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        latents = pipeline.sample(models, cond, opts, noise=noise, progress=progress)

    fps, out_frames = plan.fps, plan.output_frames
    before, final = [], []

    def frames():
        with tqdm(total=out_frames, desc="decoding", unit="frame") as bar:
            for chunk in pipeline.decode(models, latents, opts, keep_before_interpolation=before if args.dump else None):
                if args.dump:
                    final.append(chunk.half().cpu())
                bar.update(chunk.shape[0])
                yield pipeline.to_uint8_frames(chunk).numpy()

    width, height = plan.width, plan.height
    settings = {k: v for k, v in vars(args).items() if k not in ("command", "run", "noise", "dump")}
    metadata = {"sonic_parameters": json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in settings.items()})}
    write_mp4(args.out, frames(), fps, width, height, out_frames, audio=args.audio, crf=args.crf, preset=args.preset,
              audio_policy=args.audio_policy, metadata=metadata, watermark=args.watermark)
    if args.dump:
        from safetensors.torch import save_file

        to_video = lambda chunks: torch.cat(chunks).float().permute(1, 0, 2, 3)[None].contiguous()  # noqa: E731
        save_file({"final_latents": latents.float().cpu().contiguous(),
                   "video_before_interp": to_video(before), "video_final": to_video(final)}, str(args.dump))
    return args.out


def _device_description(device) -> str:
    """What `--device auto` chose, and why where it is the CPU."""
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "mps":
        from ..engine.memory import score_block_budget

        return f"mps (Apple GPU; attention in chunks of up to {score_block_budget() / 2**20:.0f} MiB)"
    return f"{device.type} (no CUDA or MPS GPU found)"


def _free_bytes(device) -> int | None:
    """Free memory of a CUDA device (None elsewhere: the plan then runs the official batched call)."""
    if device.type != "cuda":
        return None
    import torch

    torch.cuda.empty_cache()  # memory PyTorch holds but does not use is free for the UNet
    return torch.cuda.mem_get_info(device)[0]
