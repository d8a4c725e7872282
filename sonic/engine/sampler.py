"""The EDM Euler sampler with Sonic's time-shifted circular windows (spec §3.7, §3.8).

Pure functions: the schedule, one Euler step for a v-prediction model, the window layout of a step, and the
loop. The model-specific part (guidance rows, conditioning) is the `denoise` callable the loop receives.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

# denoise(x_in [n, L, C, h, w] (already scaled by c_in), frame_index [n, L], step, timestep) -> v [n, L, C, h, w]
Denoiser = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int], None]  # (unet calls done, unet calls in total)


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. noise levels, plus a final 0: float64 maths cast to float32, as diffusers does."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([torch.from_numpy(sigmas.astype(np.float32)), torch.zeros(1)])


def schedule_from_config(config: dict, num_steps: int, strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [n+1], timesteps [n]) for an SVD EulerDiscreteScheduler config; `strength` < 1 skips the
    first steps like the official `i2i_noise_strength`."""
    expected = {"prediction_type": "v_prediction", "use_karras_sigmas": True, "timestep_type": "continuous"}
    wrong = {k: config.get(k) for k, v in expected.items() if config.get(k) != v}
    if wrong:
        raise ValueError(f"scheduler config is not SVD-xt's (expected {expected}, got {wrong}); use the SVD-xt scheduler folder")
    if num_steps < 1:
        raise ValueError(f"inference_steps must be at least 1, got {num_steps}")
    sigmas = karras_sigmas(num_steps, float(config["sigma_min"]), float(config["sigma_max"]))
    start = num_steps - min(int(num_steps * strength), num_steps)
    sigmas = sigmas[start:]
    timesteps = torch.stack([0.25 * s.log() for s in sigmas[:-1]])
    return sigmas, timesteps


def v_scalings(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in) of a v-prediction denoiser with sigma_data = 1 (Karras et al. 2022, table 1; the
    scalings k-diffusion's `VDenoiser.get_scalings` names): denoised = c_skip * x + c_out * v(c_in * x)."""
    c_skip = 1 / (sigma**2 + 1)
    c_out = -sigma / (sigma**2 + 1) ** 0.5
    c_in = 1 / (sigma**2 + 1) ** 0.5
    return c_skip, c_out, c_in


def scale_input(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """c_in * x, in the latent dtype (what the UNet is given)."""
    return x / ((sigma**2 + 1) ** 0.5)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step sigma -> sigma_next for a v-prediction model, in float32, returned in v's dtype."""
    x32 = x.float()
    _, c_out, _ = v_scalings(sigma)
    denoised = v * c_out + x32 / (sigma**2 + 1)  # c_skip * x, divided as diffusers does (the same bits)
    derivative = (x32 - denoised) / sigma
    return (x32 + derivative * (sigma_next - sigma)).to(v.dtype)


def window_starts(num_frames: int, window: int, overlap: int) -> list[int]:
    stride = window - overlap
    if stride < 1:
        raise ValueError(f"overlap ({overlap}) must be smaller than the window ({window})")
    return list(range(0, num_frames, stride))


def window_indices(num_frames: int, window: int, overlap: int, shift: int) -> torch.Tensor:
    """[n_windows, window] frame indices of one step: windows shifted back by `shift`, wrapping circularly."""
    starts = torch.tensor(window_starts(num_frames, window, overlap)) - shift
    return (starts[:, None] + torch.arange(window)[None, :]) % num_frames


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait: a CUDA copy from pageable memory first waits for
    all queued GPU work, one from page-locked memory does not (PyTorch keeps the page-locked block until the copy
    is done)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def gather_to_device(host: torch.Tensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """host[index] on `device`: gathered on the host (into page-locked memory for CUDA), then one async copy."""
    if device.type != "cuda":
        return host[index].to(device)
    staged = torch.empty((*index.shape, *host.shape[1:]), dtype=host.dtype, pin_memory=True)
    torch.index_select(host, 0, index.reshape(-1), out=staged.view(-1, *host.shape[1:]))
    return staged.to(device, non_blocking=True)


def nonblocking_to_host(device: torch.device | str) -> bool:
    """Whether a copy from `device` into host memory may be queued without waiting (`non_blocking=True`): only
    from a CUDA device, where the copier records an event after the copy and waits on it before the host reads.
    ComfyUI turns non_blocking off on MPS and XPU (`model_management.device_supports_non_blocking`): there the
    host would read a buffer the copy may not have filled yet, with no event to wait on; from the CPU there is
    nothing to wait for."""
    return torch.device(device).type == "cuda"


def record_copy_done(device: torch.device) -> torch.cuda.Event:
    """An event that completes once the work queued so far on CUDA `device` (a copy back to the host) is done:
    recorded on that device's current stream, where its copies are queued. The current device's stream (what
    `Event.record()` uses) is another card's when the sampler runs on cuda:1 and the current device is cuda:0."""
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    return done


class _HostAccumulator:
    """Sums window results into a full-length host buffer. A CUDA result is copied back asynchronously and added
    one call later, so the host never waits for the GPU while it still has work queued (elsewhere the copy
    waits, see `nonblocking_to_host`)."""

    def __init__(self, device: torch.device):
        self.device = device  # where the window results are (the sampler's device)
        self.pending: tuple | None = None

    def add_later(self, summed: torch.Tensor, index: torch.Tensor, stepped: torch.Tensor) -> None:
        asynchronous = nonblocking_to_host(self.device)
        copied = stepped.to("cpu", non_blocking=asynchronous)  # lands in page-locked memory when asynchronous
        done = record_copy_done(self.device) if asynchronous else None
        self.flush()
        self.pending = (summed, index, copied, done)

    def flush(self) -> None:
        if self.pending is None:
            return
        summed, index, copied, done = self.pending
        self.pending = None
        if done is not None:
            done.synchronize()
        summed.index_add_(0, index.reshape(-1), copied.flatten(0, 1))


def sample_windows(
    denoise: Denoiser,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    device: torch.device | str | None = None,
    window: int = 25,
    overlap: int = 0,
    shift_offset: int = 7,
    windows_per_call: int = 1,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Denoise [F, C, h, w] latents from sigmas[0] to sigmas[-1]; every window of a step reads the latents of
    the previous step, frames covered by several windows are averaged.

    The full-length latents live in host memory (given there, or moved there) and come back there; only the
    windows of one call visit `device` (default: the latents' device), so device memory does not grow with the
    video's length. Two full-length host buffers take turns: one holds the sums of the previous step, which windows
    read divided by their coverage counts, the other collects the sums of this step."""
    num_frames = latents.shape[0]
    device = torch.device(device) if device is not None else latents.device
    host = torch.device("cpu")
    latents = latents.to(host)
    # the schedule stays on the CPU as float32 scalars (0-dim CPU tensors combine with device tensors without a
    # copy back): reading a device tensor per call would synchronise with the host
    sigmas = sigmas.cpu()
    calls_per_step = -(-len(window_starts(num_frames, window, overlap)) // windows_per_call)
    total_calls, calls = calls_per_step * len(timesteps), 0
    accumulator = _HostAccumulator(device)
    buffers = [torch.empty_like(latents, device=host) for _ in range(min(2, len(timesteps)))]
    read, read_counts = latents, None  # step 0 reads the given latents as they are
    for step in range(len(timesteps)):
        sigma, sigma_next = sigmas[step], sigmas[step + 1]
        timestep = to_device(timesteps[step], device)
        windows = window_indices(num_frames, window, overlap, step * shift_offset)  # CPU: gathers stay async
        summed = buffers[step % 2].zero_()
        for group in windows.split(windows_per_call):
            x_win = gather_to_device(read, group, device)  # [n, L, C, h, w]
            if read_counts is not None:
                x_win = x_win / gather_to_device(read_counts, group, device)[..., None, None, None]
            v = denoise(scale_input(x_win, sigma), group, step, timestep)
            accumulator.add_later(summed, group, euler_step(x_win, v, sigma, sigma_next))
            calls += 1
            if callback is not None:  # queued, as the GPU sees it; the host is at most one call behind
                callback(calls, total_calls)
        accumulator.flush()  # the next step reads all of this one
        counts = torch.bincount(windows.flatten(), minlength=num_frames).to(latents.dtype)
        read, read_counts = summed, counts
    return read.div_(read_counts.view(num_frames, *([1] * (latents.dim() - 1)))) if read_counts is not None else read


def guidance_schedule(start: float, end: float, num_steps: int) -> Sequence[float]:
    return torch.linspace(start, end, num_steps).tolist()
