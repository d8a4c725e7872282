"""Command line: `python -m sonic generate|lipsync|convert ...`."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import re
import sys
from pathlib import Path

from ..params import DEFAULT_SEED, PrepareOptions, SampleOptions


def _face_box(text: str) -> tuple[float, float, float, float]:
    from ..inputs.face import parse_face_box

    try:
        box = parse_face_box(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if box is None:
        raise argparse.ArgumentTypeError("expected X,Y,W,H in pixels, got an empty value")
    return box


def _duration(text: str) -> float | None:
    return None if text == "auto" else float(text)


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _as_module() -> bool:
    return os.path.basename(sys.argv[0]) in ("__main__.py", "-m", "-c", "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sonic" if _as_module() else "sonic-portrait", description="Sonic talking-head video generation")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="portrait + speech -> MP4", formatter_class=_DefaultsShown)
    gen.add_argument("--models", required=True, type=Path, help="models folder (official layout, see README)")
    gen.add_argument("--image", required=True, type=Path, help="portrait photo")
    gen.add_argument("--audio", required=True, type=Path, help="speech (wav, mp3, flac, m4a/aac, ogg)")
    gen.add_argument("--out", required=True, type=Path, help="output .mp4")
    d_prep, d_samp = PrepareOptions(), SampleOptions()
    gen.add_argument("--min-resolution", type=int, default=d_prep.min_resolution, help="short side of the video (x64)")
    gen.add_argument("--crop", action="store_true", help="animate a square crop around the face")
    gen.add_argument("--expand-ratio", type=float, default=d_prep.expand_ratio, help="crop margin, in face sizes")
    gen.add_argument("--face-box", type=_face_box, help="X,Y,W,H of the face in pixels (skips detection)")
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
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    gen.add_argument("--face-detector", default="auto", choices=["auto", "yolo", "dlib"])
    gen.add_argument("--crf", type=int, default=18, help="H.264 quality (lower = better)")
    gen.add_argument("--preset", default="medium", help="x264 preset (ultrafast ... veryslow)")
    gen.add_argument("--audio-policy", default="match", choices=["match", "shortest", "keep"],
                     help="fit the sound track to the video: match (cut/pad), shortest (cut), keep (hold last frame)")
    gen.add_argument("--watermark", default=None, help="visible text in the bottom-left corner")
    gen.add_argument("--noise", type=Path, help="safetensors file with 'noise.latents' [1, F, 4, h, w]")
    gen.add_argument("--dump", type=Path, help="write final_latents / video_before_interp / video_final here")

    sync = sub.add_parser("lipsync", help="measure a video's lip-sync offset; prints one JSON line",
                          formatter_class=_DefaultsShown)
    sync.add_argument("--video", required=True, type=Path, help="the talking-head video (MP4, MOV, MKV, WebM)")
    sync.add_argument("--audio", type=Path, help="sound track to measure against (default: the video's own)")
    sync.add_argument("--face-box", type=_face_box, help="X,Y,W,H of the face in video pixels (default: detected "
                      "on the first frame with dlib)")
    sync.add_argument("--search-range", type=float, default=0.4, help="largest offset searched, seconds either way")
    sync.add_argument("--no-track", action="store_true", help="do not follow head motion (fixed mouth region)")

    dl = sub.add_parser(
        "download", formatter_class=_DefaultsShown, help="fetch the model files into the README's layout, verified",
        description="Download the model files from the Hugging Face Hub (HF_ENDPOINT and HF_TOKEN honoured) into "
                    "the README's layout, check each against the hub's size and hash and every component against "
                    "Sonic's networks. Files already there are not fetched again.")
    dl.add_argument("--models", required=True, type=Path, help="models folder to fill (e.g. ComfyUI/models/sonic)")
    dl.add_argument("--only", action="append", metavar="PART", help="only these components, comma separated or "
                    "repeated: sonic, whisper, svd, rife, yolo (default: all; with ComfyUI's SVD checkpoint "
                    "connected to the loader, svd is not needed)")
    dl.add_argument("--fp16", action="store_true", help="SVD's half-precision VAE and CLIP files (half the size; "
                    "what GPUs compute in anyway)")

    add_batch_parser(sub)
    add_fleet_parsers(sub)

    conv = sub.add_parser("convert", help="write .safetensors twins of the pickled Sonic and RIFE weights",
                          formatter_class=_DefaultsShown)
    conv.add_argument("--models", required=True, type=Path)
    conv.add_argument("--overwrite", action="store_true")
    return parser


def add_batch_parser(sub) -> None:
    batch = sub.add_parser(
        "batch", help="run a jobs file through ComfyUI servers' queue API (no GPU needed here)",
        description="Run every job of a .csv/.jsonl file through one or more ComfyUI servers with this pack, "
                    "fetch each MP4 to a folder or s3://, record each finished job in a manifest. Running the "
                    "same command again resumes: finished jobs are skipped. Exit status: 0 all done, 1 some "
                    "failed, 2 bad invocation or jobs file, 130 cancelled.",
        formatter_class=_DefaultsShown)
    batch.add_argument("jobs", type=Path, metavar="JOBS", help="jobs file: .csv with a header row, or .jsonl")
    batch.add_argument("--server", dest="servers", action="append", required=True, metavar="URL",
                       help="ComfyUI server base URL, e.g. http://gpu1:8188 (repeat for several)")
    batch.add_argument("--out", required=True, metavar="DEST", help="output folder, or s3://bucket/prefix")
    batch.add_argument("--workflow", type=Path, metavar="FILE",
                       help="API-format workflow made of the Sonic nodes (default: workflows/api/sonic_batch_api.json)")
    batch.add_argument("--retries", type=int, default=2, help="extra attempts for a transient failure "
                       "(server gone, out of memory); a job's own bad input is never retried")
    batch.add_argument("--manifest", metavar="FILE", help="manifest location (default: DEST/manifest.jsonl)")
    batch.add_argument("--retry-failed", action="store_true", help="also rerun jobs that failed in an earlier run")
    batch.add_argument("--json", action="store_true", help="one JSON event per line on stdout instead of a progress bar")
    batch.add_argument("--url-expiry", type=int, default=7200, metavar="SECONDS",
                       help="lifetime of the presigned links to s3:// outputs in the manifest")
    batch.add_argument("--s3-endpoint", metavar="URL", default=os.environ.get("SONIC_S3_ENDPOINT"),
                       help="S3-compatible endpoint (OSS, MinIO, R2, COS); default $SONIC_S3_ENDPOINT or AWS")
    batch.add_argument("--s3-addressing", choices=["auto", "path", "virtual"], default="auto",
                       help="bucket addressing (Aliyun OSS needs virtual)")
    batch.add_argument("--job-timeout", type=float, default=0, metavar="SECONDS",
                       help="interrupt and retry a job that runs longer (0 = no limit)")
    batch.add_argument("--backoff", type=float, default=5.0, metavar="SECONDS",
                       help="wait before the first retry; doubles with each further one")
    batch.add_argument("--give-up-after", type=float, default=60.0, metavar="SECONDS",
                       help="stop when no server has answered for this long (the manifest stays resumable)")
    batch.add_argument("--check", action="store_true", help="check the jobs and the servers, run nothing")


def add_fleet_parsers(sub) -> None:
    def store_flags(parser):
        parser.add_argument("--s3-endpoint", metavar="URL", default=os.environ.get("SONIC_S3_ENDPOINT"),
                            help="S3-compatible endpoint (OSS, MinIO, R2, COS); default $SONIC_S3_ENDPOINT or AWS")
        parser.add_argument("--s3-addressing", choices=["auto", "path", "virtual"], default="auto",
                            help="bucket addressing (Aliyun OSS needs virtual)")
        parser.add_argument("--broker", metavar="URL", help="redis://host:6379/0 or amqp://user@host// "
                            "(default $SONIC_BROKER_URL)")

    submit = sub.add_parser("submit", formatter_class=_DefaultsShown,
                            help="queue a jobs file for a fleet of workers; prints the batch's URI",
                            description="Check every job as `batch` does, upload local inputs to the store once, "
                                        "queue one task per job. Exit status: 0 queued, 2 bad invocation or jobs.")
    submit.add_argument("jobs", type=Path, metavar="JOBS", help="jobs file: .csv with a header row, or .jsonl")
    submit.add_argument("--out", required=True, metavar="s3://BUCKET/PREFIX", help="where the batch's folder goes")
    submit.add_argument("--workflow", type=Path, metavar="FILE", help="API-format workflow "
                        "(default: workflows/api/sonic_batch_api.json)")
    submit.add_argument("--retries", type=int, default=2, help="extra attempts for a transient failure")
    submit.add_argument("--batch", metavar="NAME", help="the batch's folder name (default: time + random)")
    submit.add_argument("--url-expiry", type=int, default=7200, metavar="SECONDS", help="lifetime of output links")
    submit.add_argument("--server", metavar="URL", help="check the jobs against this ComfyUI's nodes "
                        "(default: the snapshot of this pack's nodes)")
    store_flags(submit)

    status = sub.add_parser("status", formatter_class=_DefaultsShown, help="a submitted batch's progress",
                            description="queued / running / done / failed, per worker, from the batch's records in "
                                        "the store (the broker, when known, adds the queue's length). With --wait, "
                                        "follow it to the end, then write the manifest. Exit status: 0 all done, "
                                        "1 some failed.")
    status.add_argument("batch", metavar="BATCH", help="the s3:// URI that submit printed")
    status.add_argument("--wait", action="store_true", help="follow the batch until every job has finished")
    status.add_argument("--json", action="store_true", help="JSON lines instead of text and a progress bar")
    status.add_argument("--manifest", metavar="FILE", help="also write the manifest here (always: BATCH/manifest.jsonl)")
    store_flags(status)

    worker = sub.add_parser("worker", formatter_class=_DefaultsShown,
                            help="take jobs from the queue and run them on one ComfyUI server",
                            description="One process per ComfyUI server (one per GPU). SIGTERM or Ctrl-C: the running "
                                        "job finishes, then the worker stops. Redelivery after a crash: "
                                        "SONIC_VISIBILITY_TIMEOUT (s, Redis).")
    worker.add_argument("--comfyui", required=True, metavar="URL", help="this worker's ComfyUI, e.g. http://127.0.0.1:8188")
    worker.add_argument("--concurrency", type=int, default=1, help="jobs at a time (1 per GPU)")
    worker.add_argument("--name", help="the worker's name in status (default: sonic-<port>-<pid>@<host>)")
    worker.add_argument("--job-timeout", type=float, default=0, metavar="SECONDS", help="0 = no limit")
    store_flags(worker)


def run_fleet(args: argparse.Namespace) -> int:
    from ..jobs.jobsfile import JobsError

    try:
        if args.command == "submit":
            from ..fleet.batches import submit

            print(submit(args.jobs, args.broker, args.out, args.workflow, args.retries, args.url_expiry, args.batch,
                         args.server, args.s3_endpoint, args.s3_addressing))
            return 0
        if args.command == "status":
            from ..fleet.batches import status

            return status(args.batch, args.broker, args.wait, args.json, args.manifest, args.s3_endpoint,
                          args.s3_addressing)
        from ..fleet.work import serve

        return serve(_broker(args.broker), args.comfyui, args.concurrency, args.name,
                     args.s3_endpoint, args.s3_addressing, args.job_timeout)
    except JobsError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"error: {len(exc.problems)} problem(s); nothing was queued", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130


def _broker(flag: str | None) -> str:
    from ..fleet.queue import broker_url

    return broker_url(flag)


def run_batch(args: argparse.Namespace) -> int:
    from ..batch.runner import Settings, run

    return run(Settings(jobs=args.jobs, servers=args.servers, out=args.out, workflow=args.workflow,
                        retries=args.retries, manifest=args.manifest, json=args.json, retry_failed=args.retry_failed,
                        url_expiry_s=args.url_expiry, s3_endpoint=args.s3_endpoint, s3_addressing=args.s3_addressing,
                        backoff_s=args.backoff, job_timeout_s=args.job_timeout, give_up_s=args.give_up_after,
                        check=args.check))


FLAGS = {"inference_steps": "--steps", "min_resolution": "--min-resolution", "expand_ratio": "--expand-ratio",
         "face_box": "--face-box", "duration": "--duration", "seed": "--seed", "dynamic_scale": "--dynamic-scale",
         "motion_scale": "--motion-scale", "ip_audio_scale": "--ip-audio-scale",
         "min_appearance_guidance": "--min-appearance-guidance", "max_appearance_guidance": "--max-appearance-guidance",
         "audio_guidance": "--audio-guidance", "shift_offset": "--shift-offset", "windows_per_call": "--windows-per-call",
         "stream_unet": "--stream-unet", "compile": "--compile"}


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
                         stream_unet=args.stream_unet)
    return prep, opts


def _low_vram(forced: bool, models, cond, opts) -> bool:
    import torch

    from ..engine import memory

    free = torch.cuda.mem_get_info(models.device)[0] if models.device.type == "cuda" else None
    _, _, latent_h, latent_w = cond.image_latents.shape
    chosen = memory.choose_sequential_guidance(free, opts.windows_per_call, opts.frames_per_window, latent_h,
                                               latent_w, models.dtype, forced=forced)
    if chosen and not forced:
        print("note: low-VRAM mode (guidance rows one after another): the batched UNet call needs "
              f"{memory.sampling(opts.windows_per_call, opts.frames_per_window, latent_h, latent_w, models.dtype) / 2**30:.1f} "
              f"GiB, {free / 2**30:.1f} GiB are free", file=sys.stderr)
    return chosen


def generate(args: argparse.Namespace) -> Path:
    import torch
    from tqdm import tqdm

    from ..engine import pipeline
    from ..engine.loader import load_models
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

    models = load_models(args.models, args.device, args.dtype, interpolation=opts.interpolation,
                         face_detector="none" if args.face_box else args.face_detector,
                         unet_device="cpu" if opts.stream_unet else None)
    try:
        cond = pipeline.prepare(models, image, speech, prep)
    except NoFaceError as exc:
        raise exc.with_hint("give the face box with --face-box X,Y,W,H (pixels of the photo)") from None
    rounded = cond.size
    if abs(rounded[0] / rounded[1] - image.width / image.height) > 0.01 * image.width / image.height and not args.crop:
        print(f"note: the {image.width}x{image.height} photo becomes a {rounded[0]}x{rounded[1]} video (sides are "
              "multiples of 64), which changes its proportions; crop the photo to that shape to keep them",
              file=sys.stderr)
    opts.sequential_guidance = _low_vram(args.low_vram or opts.stream_unet, models, cond, opts)
    with tqdm(total=1, desc="sampling", unit="call") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        latents = pipeline.sample(models, cond, opts, noise=noise, progress=progress)

    num_frames = cond.num_frames
    fps = pipeline.output_fps(opts, models, num_frames)
    out_frames = pipeline.output_frame_count(opts, models, num_frames)
    before, final = [], []

    def frames():
        with tqdm(total=out_frames, desc="decoding", unit="frame") as bar:
            for chunk in pipeline.decode(models, latents, opts, keep_before_interpolation=before if args.dump else None):
                if args.dump:
                    final.append(chunk.half().cpu())
                bar.update(chunk.shape[0])
                yield pipeline.to_uint8_frames(chunk).numpy()

    width, height = cond.size
    settings = {k: v for k, v in vars(args).items() if k not in ("command", "noise", "dump")}
    metadata = {"sonic_parameters": json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in settings.items()})}
    write_mp4(args.out, frames(), fps, width, height, out_frames, audio=args.audio, crf=args.crf, preset=args.preset,
              audio_policy=args.audio_policy, metadata=metadata, watermark=args.watermark)
    if args.dump:
        from safetensors.torch import save_file

        to_video = lambda chunks: torch.cat(chunks).float().permute(1, 0, 2, 3)[None].contiguous()  # noqa: E731
        save_file({"final_latents": latents.float().cpu().contiguous(),
                   "video_before_interp": to_video(before), "video_final": to_video(final)}, str(args.dump))
    return args.out


def lipsync(args: argparse.Namespace) -> dict:
    """offset_s > 0: the mouth moves after the sound (delay the audio by offset_s to fix it)."""
    from ..post import lipsync as sync
    from ..inputs.audio import read_audio
    from ..post.video_io import audio_start_time, read_video

    fps, chunks, video_start = read_video(args.video)
    audio_path = args.audio or args.video
    audio_start = audio_start_time(audio_path) if args.audio is None else 0.0
    if audio_start is None:
        chunks.close()
        raise ValueError(f"{args.video} has no sound track; give one with --audio")
    waveform, rate = read_audio(audio_path)
    box = args.face_box
    if box is None:
        from ..inputs.face import DlibFaceDetector, NoFaceError, largest_face

        first = next(chunks)
        try:
            box = largest_face(DlibFaceDetector(), first[0], "the video's first frame")[:4]
        except NoFaceError as exc:
            raise exc.with_hint("give the face box with --face-box X,Y,W,H (video pixels)") from None
        chunks = itertools.chain([first], chunks)
    estimate = sync.measure(chunks, fps, sync.mono(waveform), rate, box, args.search_range, track=not args.no_track)
    # a sound track that starts later than the picture is already delayed by the difference
    offset = estimate.offset_s - (audio_start - video_start)
    return {"offset_s": round(offset, 4) + 0.0, "confidence": round(estimate.confidence, 4),
            "reliable": bool(estimate.confidence >= sync.DEFAULT_MIN_CONFIDENCE and not estimate.at_edge),
            "fps": fps, "face_box": [round(float(v), 1) for v in box]}


def download(args: argparse.Namespace) -> None:
    from ..engine import download as dl
    from ..engine.checkpoints import ModelLayout

    components = dl.parse_only(args.only)
    fetched = dl.download(args.models, components, fp16=args.fp16)
    kept = sum(not f.downloaded for f in fetched)
    print(f"{len(fetched) - kept} files downloaded, {kept} already there; verified: {', '.join(components)}")
    missing = ModelLayout(args.models).missing(interpolation=True, svd_weights=True)
    if not missing:
        print(f"next: python -m sonic generate --models {args.models} --image PORTRAIT --audio SPEECH --out out.mp4")
    elif not ModelLayout(args.models).missing(interpolation=True, svd_weights=False):
        print("ready for ComfyUI with an SVD checkpoint's VAE and CLIP_VISION connected to Sonic Model Loader; "
              "for the command line also: python -m sonic download --models " + str(args.models) + " --only svd")
    else:
        print("still missing: " + "; ".join(missing))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "batch":
        return run_batch(args)
    if args.command in ("submit", "status", "worker"):
        return run_fleet(args)
    try:
        if args.command == "convert":
            from ..engine.checkpoints import convert_to_safetensors

            written = convert_to_safetensors(args.models, overwrite=args.overwrite)
            print("\n".join(str(p) for p in written) or "nothing to convert")
        elif args.command == "download":
            download(args)
        elif args.command == "lipsync":
            print(json.dumps(lipsync(args)))
        else:
            print(generate(args))
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the MP4 writer has removed its temporary file on the way out
        print("cancelled", file=sys.stderr)
        return 130
    return 0
