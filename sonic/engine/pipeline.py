"""One Sonic generation, as stages that can run (and be cached) separately:

1. `prepare`  portrait + audio -> `SonicConditioning` (face, mask, CLIP, reference latents, audio tokens,
   motion buckets); independent of the seed.
2. `sample`   conditioning -> final latents [1, F, 4, h, w] (EDM Euler, 3-row guidance, shifted windows).
3. `decode`   latents -> frames, chunk by chunk: temporal VAE decode, RIFE x2, uint8 on the CPU. Frames leave
   the GPU as they are made, so GPU memory does not grow with the video's length.
"""

from __future__ import annotations

import logging
import os
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from ..inputs import audio as audio_lib
from . import offload
from ..inputs.face import FaceBox, largest_face, square_crop_box, validate_face_box
from ..inputs.image import PortraitTensors, load_image, prepare_portrait
from .loader import SonicModels
from ..params import PrepareOptions, SampleOptions
from .sampler import gather_to_device, guidance_schedule, sample_windows, schedule_from_config, to_device

log = logging.getLogger(__name__)

HEAD_MOTION_BUCKET = 0  # which of the two buckets `motion_scale` scales (see README: an assumption)
DURATION_SLACK_S = 0.1
TOKEN_BATCH = 256  # audio windows per audio2token / audio2bucket call

ProgressFn = Callable[[int, int], None]  # (done, total)
CancelFn = Callable[[], None]  # raises to abort


@dataclass
class SonicConditioning:
    """Everything the sampler needs, independent of the seed (the SONIC_PREDATA of the nodes). CPU tensors."""

    ref_image: torch.Tensor  # [1, 3, H, W] in [-1, 1]
    face_mask: torch.Tensor  # [1, 1, H, W] in [0, 1]
    image_embeds: torch.Tensor  # [1, D] CLIP image embedding
    image_latents: torch.Tensor  # [1, 4, h, w] VAE latent mean, unscaled
    audio_tokens: torch.Tensor  # [F, T, D] per-frame audio tokens
    audio_tokens_uncond: torch.Tensor  # [1, T, D] tokens of an all-zero window
    motion_buckets: torch.Tensor  # [F, 2] float32 (raw * 16 + 16)
    audio_samples: np.ndarray  # 16 kHz mono, trimmed to the requested duration
    face_box: FaceBox  # in the animated image (after the crop)
    crop_box: tuple[int, int, int, int] | None  # x1, y1, x2, y2 in the input image, when cropped
    image_size: tuple[int, int]  # (width, height) of the animated image (after the crop, before resizing)
    extras: dict = field(default_factory=dict)  # intermediates, only with prepare(keep_intermediates=True)

    @property
    def num_frames(self) -> int:
        return self.audio_tokens.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the video."""
        return self.ref_image.shape[3], self.ref_image.shape[2]

    @property
    def video_face_box(self) -> FaceBox:
        """The face box (x, y, w, h) in pixels of the video (the animated image resized to the video's size)."""
        x, y, w, h = self.face_box
        sx, sy = self.size[0] / self.image_size[0], self.size[1] / self.image_size[1]
        return (x * sx, y * sy, w * sx, h * sy)


def locate_face(models: SonicModels, img, options: PrepareOptions):
    """-> (face box in the animated image, crop box in the input image or None). Cacheable per image."""
    rgb = np.asarray(img)
    width, height = img.size

    def find_face(pixels: np.ndarray) -> FaceBox:
        if models.face_detector is None:
            raise ValueError("no face detector is loaded; give the face box (x, y, w, h)")
        return largest_face(models.face_detector, pixels)

    face = validate_face_box(options.face_box, width, height) if options.face_box else find_face(rgb)
    if not options.crop:
        return face, None
    crop = square_crop_box(face, width, height, options.expand_ratio)
    if options.face_box:  # translate the caller's box into the crop
        return (face[0] - crop[0], face[1] - crop[1], face[2], face[3]), crop
    return find_face(np.asarray(img.crop(crop))), crop  # the official demo re-detects on the cropped image


def load_speech(audio, duration: float | None = None) -> np.ndarray:
    """Audio (path, (waveform, rate) or ComfyUI AUDIO) -> 16 kHz mono samples, trimmed to `duration`."""
    if isinstance(audio, (str, os.PathLike)):
        samples = audio_lib.load_audio(audio)
    elif isinstance(audio, dict):  # ComfyUI AUDIO
        samples = audio_lib.to_mono_16k(audio["waveform"], int(audio["sample_rate"]))
    else:
        samples = audio_lib.to_mono_16k(*audio)  # (waveform, sample_rate)
    length_s = len(samples) / audio_lib.SAMPLE_RATE
    if duration is not None:
        if duration > length_s + DURATION_SLACK_S:
            raise ValueError(
                f"duration {duration:.2f} s is longer than the audio ({length_s:.2f} s); a longer video would "
                "freeze frames. Leave duration on auto or shorten it"
            )
        samples = samples[: int(round(duration * audio_lib.SAMPLE_RATE))]
    if audio_lib.frame_count_25fps(len(samples)) // audio_lib.FRAME_STEP == 0:
        raise ValueError(
            f"the audio is {len(samples) / audio_lib.SAMPLE_RATE:.3f} s long; Sonic needs at least "
            f"{2 * audio_lib.SAMPLES_PER_FRAME / audio_lib.SAMPLE_RATE:.2f} s to make one video frame"
        )
    return samples


@torch.no_grad()
def encode_audio(models: SonicModels, samples: np.ndarray, image_embeds: torch.Tensor):
    """-> (tokens [F, T, D], uncond tokens [1, T, D], buckets [F, 2], extras) with the audio MLPs in fp32."""
    features = audio_lib.whisper_features(samples, models.feature_extractor)
    states, last_state = audio_lib.whisper_states(models.whisper_encoder, features)
    audio_len = audio_lib.frame_count_25fps(len(samples))
    token_windows, bucket_windows = audio_lib.frame_windows(states, last_state, audio_len)

    device = models.device
    embeds = image_embeds.to(device, torch.float32)
    tokens, buckets = [], []
    for start in range(0, token_windows.shape[0], TOKEN_BATCH):
        tw = token_windows[start : start + TOKEN_BATCH].to(device)[None]
        bw = bucket_windows[start : start + TOKEN_BATCH].to(device)[None]
        tokens.append(models.audio_to_tokens(tw)[0].to(models.dtype).cpu())
        buckets.append(models.audio_to_bucket(bw, embeds)[0, :, :, 0].cpu())
    zeros = torch.zeros_like(token_windows[:1]).to(device)[None]
    uncond = models.audio_to_tokens(zeros)[0].to(models.dtype).cpu()
    raw_buckets = torch.cat(buckets)
    extras = {"audio_feature": features, "token_windows": token_windows, "bucket_windows": bucket_windows,
              "raw_buckets": raw_buckets}
    return torch.cat(tokens), uncond, raw_buckets * 16 + 16, extras


@torch.no_grad()
def prepare(models: SonicModels, image, audio, options: PrepareOptions | None = None,
            keep_intermediates: bool = False, located=None) -> SonicConditioning:
    """Portrait (path or PIL image) + audio (path, (waveform, rate) or ComfyUI AUDIO) -> conditioning.

    `keep_intermediates` keeps the CLIP pixels, Whisper features and audio windows in `extras` (for checks;
    the windows take ~150 KB per frame). `located`: a cached result of `locate_face` for this image."""
    options = options or PrepareOptions()
    # 1. the face, and the crop around it when asked for
    img = load_image(image) if isinstance(image, (str, os.PathLike)) else image
    face, crop = located or locate_face(models, img, options)
    if crop is not None:
        img = img.crop(crop)
    # 2. the portrait at the video's size, its face mask and CLIP input; the speech at 16 kHz
    portrait: PortraitTensors = prepare_portrait(img, face, options.min_resolution)
    samples = load_speech(audio, options.duration)
    # 3. the image conditioning: CLIP embedding and reference latents
    image_embeds = models.image_encoder.embed(portrait.clip_image[None])  # [1, D]
    ref_image = portrait.ref_image[None]
    image_latents = models.vae.encode_mean(ref_image)  # [1, 4, h, w], unscaled
    # 4. the audio conditioning: per-frame tokens and motion buckets
    tokens, uncond, buckets, extras = encode_audio(models, samples, image_embeds)
    extras = {**extras, "clip_image": portrait.clip_image} if keep_intermediates else {}
    return SonicConditioning(
        ref_image=ref_image,
        face_mask=portrait.face_mask[None, :1],
        image_embeds=image_embeds.cpu(),
        image_latents=image_latents.cpu(),
        audio_tokens=tokens,
        audio_tokens_uncond=uncond,
        motion_buckets=buckets,
        audio_samples=samples,
        face_box=face,
        crop_box=crop,
        image_size=img.size,
        extras=extras,
    )


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # UNet -> its torch.compile wrapper


def unet_for(models: SonicModels, options: SampleOptions):
    """The UNet to call: the module itself, or (options.compile) its compiled wrapper, made once per UNet and
    kept for every later run. Shapes are static (a video size and window length compile once; another size, or
    the other guidance mode's row count, compiles again); `ip_audio_scale` is a tensor input, so its values share
    a graph; the audio attention adds no graph break (tested with torch._dynamo.explain)."""
    if not options.compile:
        return models.unet
    compiled = _COMPILED.get(models.unet)
    if compiled is None:
        compiled = _COMPILED[models.unet] = torch.compile(models.unet, dynamic=False)
    return compiled


class SonicDenoiser:
    """The UNet with Sonic's conditioning and three-row guidance [uncond, drop-audio, cond] (spec §3.6)."""

    def __init__(self, models: SonicModels, cond: SonicConditioning, options: SampleOptions, num_steps: int,
                 cancel: CancelFn | None = None):
        device, dtype = models.device, models.dtype
        self.models, self.options, self.cancel = models, options, cancel
        self.unet = unet_for(models, options)
        self.streaming: offload.Streaming | None = None  # set while `sample` streams the UNet's weights
        # compiled: ip_audio_scale enters the graph as a tensor input (a float is a constant: a compile per value)
        self.scale_tensor = (torch.tensor(options.ip_audio_scale, dtype=torch.float32, device=device)
                             if options.compile else None)
        self.fps = audio_lib.GENERATED_FPS
        zeros_latent = torch.zeros_like(cond.image_latents)
        # [3, 1, 4, h, w]: no image for the unconditional row
        self.image_rows = torch.cat([zeros_latent, cond.image_latents, cond.image_latents])[:, None].to(device, dtype)
        embeds = cond.image_embeds.to(device, dtype)
        self.clip_rows = torch.cat([torch.zeros_like(embeds), embeds, embeds])[:, None]  # [3, 1, D]
        self.tokens = cond.audio_tokens  # stays on the CPU: GPU memory must not grow with the video
        self.uncond = cond.audio_tokens_uncond.to(device, dtype)
        buckets = cond.motion_buckets.clone() * options.dynamic_scale
        buckets[:, HEAD_MOTION_BUCKET] *= options.motion_scale
        self.buckets = buckets
        self.face_mask = cond.face_mask.to(device, dtype)
        self.g_appearance = [torch.tensor(g, dtype=dtype, device=device) for g in
                             guidance_schedule(options.min_appearance_guidance, options.max_appearance_guidance, num_steps)]
        self.g_audio = [torch.tensor(g, dtype=dtype, device=device) for g in
                        guidance_schedule(options.audio_guidance, options.audio_guidance, num_steps)]

    def __call__(self, x_in: torch.Tensor, frames: torch.Tensor, step: int, timestep: torch.Tensor) -> torch.Tensor:
        """x_in [n, L, C, h, w] on the device; frames [n, L] frame indices on the CPU (never synchronised)."""
        if self.cancel is not None:
            self.cancel()
        device, dtype = self.models.device, self.models.dtype
        n, length = frames.shape
        # [n, 3, L, 8, h, w]: the same noisy latents for the three rows, each with its image latents
        latents = x_in[:, None].expand(n, 3, *x_in.shape[1:])
        images = self.image_rows[None].expand(n, 3, length, *self.image_rows.shape[2:])
        sample = torch.cat([latents, images], dim=3)

        cond_tokens = gather_to_device(self.tokens, frames, device).to(dtype)  # [n, L, T, D]
        uncond = self.uncond.expand(n, length, *self.uncond.shape[1:])
        tokens = torch.stack([uncond, uncond, cond_tokens], dim=1)  # [n, 3, L, T, D]

        window_buckets = self.buckets[frames].mean(dim=1)  # [n, 2]
        fps = torch.full((n, 1), self.fps)
        time_ids = to_device(torch.cat([fps, window_buckets], dim=1), device)[:, None].expand(n, 3, 3).to(dtype)
        clip = self.clip_rows[None].expand(n, *self.clip_rows.shape)  # [n, 3, 1, D]

        if self.options.sequential_guidance and self.streaming is not None:
            out = self._streamed_rows(sample, tokens, clip, time_ids, timestep, length)
        elif self.options.sequential_guidance:  # low-VRAM: one guidance row per call, a third of the activations
            out = torch.stack([self._unet(sample[:, r], tokens[:, r], clip[:, r], time_ids[:, r], timestep, length)
                               for r in range(3)], dim=1)
        else:
            out = self._unet(sample.flatten(0, 1), tokens.flatten(0, 1), clip.flatten(0, 1), time_ids.flatten(0, 1),
                             timestep, length).reshape(n, 3, *x_in.shape[1:])
        uncond_v, drop_audio_v, cond_v = out.unbind(dim=1)
        g1, g2 = self.g_appearance[step], self.g_audio[step]
        return uncond_v + g1 * (drop_audio_v - uncond_v) + g2 * (cond_v - drop_audio_v)

    def _streamed_rows(self, sample, tokens, clip, time_ids, timestep, length: int) -> torch.Tensor:
        """Low-VRAM rows with a streamed UNet: one UNet call whose blocks each run the three guidance rows in turn
        (`offload.Streaming.split`) while their weights are on the device, so the weights cross the bus once per
        call instead of once per row. Each block computes what it does in the row-by-row calls (the rows are laid
        out guidance-major, so each piece is exactly one of those calls' batch): the same numbers."""
        n = sample.shape[0]
        by_row = [t.transpose(0, 1).flatten(0, 1) for t in (sample, clip, time_ids)]  # [3 * n, ...], row-major
        row_tokens = tokens.transpose(0, 1).flatten(0, 2)  # [3 * n * L, T, D]
        models, per_row = self.models, row_tokens.shape[0] // 3

        def each(row: int):
            return models.audio_conditioning.bind(row_tokens[row * per_row : (row + 1) * per_row], length,
                                                  self.face_mask, self.options.ip_audio_scale)

        with self.streaming.split(3, each):
            out = self.unet(by_row[0], timestep, encoder_hidden_states=by_row[1].contiguous(),
                            added_time_ids=by_row[2].contiguous(), return_dict=False)[0]
        return out.unflatten(0, (3, n)).transpose(0, 1)  # [n, 3, L, 4, h, w]

    def _unet(self, sample, tokens, clip, time_ids, timestep, length: int) -> torch.Tensor:
        """One UNet call on [rows, L, 8, h, w] with rows' tokens [rows, L, T, D] -> v [rows, L, 4, h, w]."""
        models = self.models
        with models.audio_conditioning.bind(tokens.flatten(0, 1), length, self.face_mask, self.options.ip_audio_scale,
                                            self.scale_tensor):
            return self.unet(sample, timestep, encoder_hidden_states=clip.contiguous(),
                               added_time_ids=time_ids.contiguous(), return_dict=False)[0]


def draw_noise(models: SonicModels, cond: SonicConditioning, seed: int) -> torch.Tensor:
    """The official random draws, in order: augmentation noise [1, 3, H, W] (unused at strength 0, drawn to
    keep the stream aligned), then the latent noise [1, F, 4, h, w]."""
    generator = torch.Generator(models.device).manual_seed(seed)
    width, height = cond.size
    kwargs = dict(generator=generator, device=models.device, dtype=models.dtype)
    torch.randn((1, 3, height, width), **kwargs)
    shape = (1, cond.num_frames, *cond.image_latents.shape[1:])
    return torch.randn(shape, **kwargs)


@torch.no_grad()
def sample(
    models: SonicModels,
    cond: SonicConditioning,
    options: SampleOptions | None = None,
    noise: torch.Tensor | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> torch.Tensor:
    """Conditioning -> final latents [1, F, 4, h, w] in the model dtype, in host memory. GPU memory does not
    grow with the video's length, except for the official noise draw [1, F, 4, h, w] on the device (kept for the
    same random numbers; copied to the host before the first UNet call)."""
    options = options or SampleOptions()
    device, dtype = models.device, models.dtype
    # 1. the initial noise (the official draws, or the caller's)
    expected = (1, cond.num_frames, *cond.image_latents.shape[1:])
    if noise is None:
        noise = draw_noise(models, cond, options.seed)
    elif tuple(noise.shape) != expected:
        raise ValueError(f"initial noise has shape {tuple(noise.shape)}, expected {expected} for this input")
    # 2. the noise schedule
    sigmas, timesteps = schedule_from_config(models.scheduler_config, options.inference_steps, options.noise_strength)
    # 3. the initial latents: the full-length latents live in host memory; the sampler sends one call's windows at
    # a time to the device
    ref_latents = cond.image_latents.to(dtype) * models.vae.scaling_factor  # [1, 4, h, w]
    latents = ref_latents + noise[0].to("cpu", dtype) * sigmas[0].to(dtype)  # [F, 4, h, w]
    del noise

    # 4. the denoising loop over shifted windows
    denoiser = SonicDenoiser(models, cond, options, len(timesteps), cancel)
    # stream_unet: the UNet's weights stay where they are (host memory) and visit the device block by block
    streaming = offload.streamed(offload.unet_units(models.unet), device) if options.stream_unet else nullcontext()
    with streaming as denoiser.streaming:
        latents = sample_windows(
            denoiser,
            latents,
            sigmas,
            timesteps,
            device=device,
            window=options.frames_per_window,
            overlap=options.overlap,
            shift_offset=options.shift_offset,
            windows_per_call=options.windows_per_call,
            callback=progress,
        )
    return latents[None]


@torch.no_grad()
def decode_chunks(models: SonicModels, latents: torch.Tensor, chunk_size: int = 8,
                  cancel: CancelFn | None = None) -> Iterator[torch.Tensor]:
    """Temporal VAE decode, `chunk_size` frames at a time -> [n, 3, H, W] float32 in [0, 1] on the device."""
    z = latents[0] / models.vae.scaling_factor
    for start in range(0, z.shape[0], chunk_size):
        if cancel is not None:
            cancel()
        yield models.vae.decode(z[start : start + chunk_size]).to(models.device)


@torch.no_grad()
def interpolate_chunks(rife, chunks: Iterator[torch.Tensor], batch: int = 4) -> Iterator[torch.Tensor]:
    """RIFE x2 over a stream of frame chunks: F frames in -> 2F - 1 frames out (I0, mid01, I1, ..., I_F-1)."""
    previous = None
    for chunk in chunks:
        frames = chunk if previous is None else torch.cat([previous[None], chunk])
        mids = [rife(frames[i : i + batch][: len(frames) - 1 - i], frames[i + 1 : i + 1 + batch])
                for i in range(0, len(frames) - 1, batch)]
        mids = torch.cat(mids) if mids else frames[:0]
        out = torch.stack([mids, frames[1:]], dim=1).flatten(0, 1)  # mid, frame, mid, frame, ...
        yield out if previous is not None else torch.cat([frames[:1], out])
        previous = chunk[-1]


def to_uint8_frames(frames: torch.Tensor) -> torch.Tensor:
    """[n, 3, H, W] in [0, 1] -> [n, H, W, 3] uint8 on the CPU (rounded)."""
    return (frames * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def decode(
    models: SonicModels,
    latents: torch.Tensor,
    options: SampleOptions | None = None,
    cancel: CancelFn | None = None,
    keep_before_interpolation: list | None = None,
) -> Iterator[torch.Tensor]:
    """Latents -> final frames as float [n, 3, H, W] chunks in [0, 1] on the device (25 fps with RIFE)."""
    options = options or SampleOptions()
    chunks = decode_chunks(models, latents, options.decode_chunk_size, cancel)
    if keep_before_interpolation is not None:
        chunks = _tee(chunks, keep_before_interpolation)
    if options.interpolation and models.rife is not None and latents.shape[1] > 1:
        return interpolate_chunks(models.rife, chunks, options.interpolation_batch)
    return chunks


def _tee(chunks: Iterator[torch.Tensor], sink: list) -> Iterator[torch.Tensor]:
    for chunk in chunks:
        sink.append(chunk.half().cpu())
        yield chunk
