"""The run plan: what the device has, the video's size and the user's choices -> validated sampler options.

Every front end (the ComfyUI sampler node, the command line; Python callers may too) asks here how to run, so they
cannot disagree:

- **UNet streaming** (`offload.py`: weights in host memory, one block at a time on the device) when asked for
  (`SampleOptions.stream_unet`, `--stream-unet`), forced by the host (ComfyUI's --novram, SONIC_STREAM_UNET=1), or
  when the card cannot hold the UNet's weights next to a low-VRAM call; never together with compile.
- **Low-VRAM rows** (the three guidance rows one after another: a third of the UNet's working memory, the same
  video) when streaming, when forced (--low-vram, ComfyUI --lowvram/--novram, SONIC_LOW_VRAM=1), or when the
  batched call does not fit in what is free once the UNet's weights are in place.
- Otherwise the official batched call. Unknown memory (a CPU run) means batched, nothing streamed.

The plan is made in two steps because only the second can be measured: before the UNet is placed (`plan_run`:
does it fit at all?) and once it is (`RunPlan.with_free_memory`: does the batched call fit next to it?).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..inputs.audio import GENERATED_FPS
from ..params import PrepareOptions, SampleOptions
from . import memory


@dataclass(frozen=True)
class DeviceMemory:
    """What a front end knows of the compute device; None = unknown (a CPU run: batched, nothing streamed)."""

    usable_bytes: int | None = None  # what Sonic could have with every other model evicted: UNet weights + work
    force_low_vram: bool = False  # --low-vram, ComfyUI --lowvram / --novram, SONIC_LOW_VRAM=1
    force_stream_unet: bool = False  # ComfyUI --novram, SONIC_STREAM_UNET=1 (the user's flag is in the options)


@dataclass(frozen=True)
class RunPlan:
    """How one generation runs: validated options (memory mode chosen) and the sizes every stage works with."""

    options: SampleOptions
    width: int  # of the video, pixels
    height: int
    latent_size: tuple[int, int]  # (h, w) of the latents
    num_frames: int  # generated at 12.5 fps
    dtype: object  # the compute dtype (torch.dtype or its name)
    vae_dtype: object  # the VAE's (ComfyUI's VAE may run in fp32 beside an fp16 UNet)
    unet_bytes: int  # the UNet's weights
    largest_unit_bytes: int  # the largest streaming unit's weights
    rife: bool  # interpolation will run (asked for, RIFE loaded, more than one frame)
    note: str | None = None  # why a memory-saving mode was chosen (for the user); None = the official batched call
    attention: str = "fused"  # how attention runs on the device (models/attention.py; memory.attention_bytes)

    @property
    def fps(self) -> float:
        return 2 * GENERATED_FPS if self.rife else GENERATED_FPS

    @property
    def output_frames(self) -> int:
        """Frames of the finished video: RIFE puts one between each pair of the F generated frames (2F - 1)."""
        return 2 * self.num_frames - 1 if self.rife else self.num_frames

    def unet_call_bytes(self, sequential_guidance: bool | None = None) -> int:
        """Working memory of one UNet call (as planned, or in the given mode); streaming adds the largest block's
        weights twice (the block in use and the next one arriving)."""
        o = self.options
        sequential = o.sequential_guidance if sequential_guidance is None else sequential_guidance
        if o.stream_unet:
            return memory.streamed_unet_bytes(self.largest_unit_bytes, o.windows_per_call, o.frames_per_window,
                                              *self.latent_size, self.dtype, attention=self.attention)
        return memory.sampling_bytes(o.windows_per_call, o.frames_per_window, *self.latent_size, self.dtype,
                                     sequential_guidance=sequential, attention=self.attention)

    @property
    def decode_bytes(self) -> int:
        o = self.options
        return memory.decode_bytes(o.decode_chunk_size, o.interpolation_batch, self.height, self.width,
                                   self.vae_dtype, self.rife)

    def with_free_memory(self, free_bytes: int | None, force_low_vram: bool = False) -> "RunPlan":
        """The plan once the UNet's weights are on the device and `free_bytes` are free beside them: low-VRAM rows
        when the batched call does not fit, or when the host forces them. Already in low-VRAM mode (the user's
        choice, a streamed UNet): unchanged."""
        if self.options.stream_unet or self.options.sequential_guidance:
            return self
        batched = self.unet_call_bytes(sequential_guidance=False)
        if force_low_vram:
            note = "low-VRAM mode (guidance rows one after another), as the host asks (--lowvram / SONIC_LOW_VRAM)"
        elif free_bytes is not None and batched > free_bytes:
            note = (f"low-VRAM mode (guidance rows one after another): the batched UNet call needs "
                    f"{batched / 2**30:.1f} GiB, {free_bytes / 2**30:.1f} GiB are free")
        else:
            return self
        return dataclasses.replace(self, options=dataclasses.replace(self.options, sequential_guidance=True), note=note)


def plan_run(models, cond, options: SampleOptions, device: DeviceMemory = DeviceMemory()) -> RunPlan:
    """Plan a generation of `cond` (a `pipeline.SonicConditioning`) with `models` (`loader.SonicModels`) before the
    UNet is placed on the device. Raises ValueError (options' own checks) for impossible combinations."""
    from .models.attention import attention_backend
    from .offload import unet_units, unit_bytes

    unet_bytes = unit_bytes(models.unet)
    largest = max((unit_bytes(unit) for unit in unet_units(models.unet)), default=0)
    width, height = cond.size
    rife = options.interpolation and models.rife is not None and cond.num_frames > 1
    base = RunPlan(options=options, width=width, height=height, num_frames=cond.num_frames, dtype=models.dtype,
                   vae_dtype=models.vae.dtype, unet_bytes=unet_bytes, largest_unit_bytes=largest, rife=rife,
                   latent_size=tuple(cond.image_latents.shape[-2:]), attention=attention_backend(models.device))
    low_vram_call = base.unet_call_bytes(sequential_guidance=True)
    stream, note = options.stream_unet, None  # the user's own choice needs no note
    if not stream and not options.compile:  # a compiled graph reads the weights where they were when it compiled
        if device.force_stream_unet:
            stream, note = True, "UNet streaming and low-VRAM mode, as the host asks (--novram / SONIC_STREAM_UNET)"
        elif device.usable_bytes is not None and unet_bytes + low_vram_call > device.usable_bytes:
            stream, note = True, (f"UNet streaming and low-VRAM mode: the UNet's {unet_bytes / 2**30:.1f} GiB of "
                                  f"weights and a {low_vram_call / 2**30:.1f} GiB call do not fit in "
                                  f"{device.usable_bytes / 2**30:.1f} GiB; blocks of up to {largest / 2**30:.2f} GiB "
                                  "visit the device one at a time")
    if stream:  # dataclasses.replace validates again (SampleOptions.__post_init__)
        return dataclasses.replace(base, options=dataclasses.replace(options, stream_unet=True,
                                                                     sequential_guidance=True), note=note)
    return base.with_free_memory(None, force_low_vram=device.force_low_vram)


def video_size(image_size: tuple[int, int], options: PrepareOptions) -> tuple[int, int]:
    """(width, height) of the video made from an image of `image_size` (a crop is square)."""
    from ..inputs.image import output_size

    return output_size(*(image_size if not options.crop else (1, 1)), options.min_resolution)


def prepare_bytes(image_size: tuple[int, int], options: PrepareOptions, dtype) -> int:
    """Working memory of the PreData stage (VAE encode of the portrait at the video's size, Whisper, CLIP)."""
    width, height = video_size(image_size, options)
    return memory.prepare_bytes(height, width, dtype)
