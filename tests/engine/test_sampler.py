"""Schedule, Euler step and the shifted circular windows (spec §3.7, §3.8)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sonic.engine import sampler
from sonic.engine.sampler import (_HostAccumulator, euler_step, karras_sigmas, nonblocking_to_host, sample_windows,
                                  scale_input, schedule_from_config, v_scalings, window_indices)

SVD_SIGMAS_25 = [700.0, 545.729248, 421.569122, 322.453674, 244.023071, 182.547134, 134.854446, 98.267136,
                 70.54084, 49.809792, 34.536739, 23.467512, 15.589968, 10.09713, 6.354266, 3.869697, 2.269116,
                 1.273177, 0.678146, 0.339378, 0.157405, 0.066399, 0.024803, 0.007882, 0.002, 0.0]


@pytest.fixture(scope="module")
def scheduler_config(reference_dir):
    return json.loads((reference_dir / "svd-xt" / "scheduler" / "scheduler_config.json").read_text())


def test_karras_sigmas_match_the_svd_table(scheduler_config):
    sigmas, timesteps = schedule_from_config(scheduler_config, 25)
    assert sigmas.dtype == torch.float32 and len(sigmas) == 26
    torch.testing.assert_close(sigmas, torch.tensor(SVD_SIGMAS_25), rtol=2e-6, atol=1e-6)
    assert timesteps[0].item() == pytest.approx(1.63777, abs=1e-5)
    assert timesteps[-1].item() == pytest.approx(-1.553652, abs=1e-5)


def test_noise_strength_skips_the_first_steps(scheduler_config):
    sigmas, timesteps = schedule_from_config(scheduler_config, 25, strength=0.5)
    assert len(timesteps) == 12  # int(25 * 0.5) steps remain
    torch.testing.assert_close(sigmas, karras_sigmas(25, 0.002, 700.0)[13:])


def test_non_svd_scheduler_is_rejected(scheduler_config):
    with pytest.raises(ValueError, match="v_prediction"):
        schedule_from_config({**scheduler_config, "prediction_type": "epsilon"}, 25)


def test_windows_shift_back_and_wrap():
    windows = window_indices(57, 25, 0, shift=7)
    assert windows.shape == (3, 25)
    assert windows[0].tolist() == list(range(50, 57)) + list(range(0, 18))
    assert windows[2].tolist() == [(43 + m) % 57 for m in range(25)]
    assert window_indices(10, 25, 0, shift=0)[0].tolist() == [m % 10 for m in range(25)]  # F < L repeats frames


def perfect_v(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The v-prediction target of x = x0 + sigma * noise with sigma_data = 1 (Salimans & Ho 2022, written in
    EDM's sigma): what a perfect denoiser returns."""
    return (noise - sigma * x0) / (sigma**2 + 1) ** 0.5


@pytest.mark.parametrize("sigma", [700.0, 3.0, 0.5, 0.002])
def test_euler_with_a_perfect_denoiser_lands_on_the_noise_path(sigma):
    # x(sigma) = x0 + sigma * noise is the probability-flow ODE's path for a perfect denoiser: a straight line,
    # so one Euler step lands exactly on it, and a step to 0 returns x0 itself.
    torch.manual_seed(0)
    x0, noise, sigma = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.tensor(sigma)
    x, v = x0 + sigma * noise, perfect_v(x0, noise, sigma)
    torch.testing.assert_close(euler_step(x, v, sigma, torch.tensor(0.0)), x0, rtol=1e-4, atol=1e-4 * sigma.item())
    sigma_next = sigma * 0.6
    torch.testing.assert_close(euler_step(x, v, sigma, sigma_next), x0 + sigma_next * noise, rtol=1e-4,
                               atol=1e-4 * sigma.item())


def test_scalings_are_karras_v_prediction_with_unit_sigma_data():
    sigma = torch.tensor([0.002, 0.5, 3.0, 700.0], dtype=torch.float64)
    c_skip, c_out, c_in = v_scalings(sigma)
    # EDM table 1 with sigma_data = 1: the input has unit variance, skip + out reproduce x0 from (x0, v)
    torch.testing.assert_close(c_in**2 * (sigma**2 + 1), torch.ones_like(sigma))
    torch.testing.assert_close(c_skip + c_out * -sigma * c_in, torch.ones_like(sigma))  # x0's share of denoised
    torch.testing.assert_close(c_skip * sigma + c_out * c_in, torch.zeros_like(sigma))  # noise cancels
    x = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(scale_input(x, sigma[2]), c_in[2] * x)


@pytest.mark.parametrize("frames, windows_per_call", [(57, 1), (57, 2), (10, 1)])
def test_every_frame_is_updated_once_per_step_and_overlaps_average(frames, windows_per_call):
    # With v = 0 every window computes the same per-frame update, so averaging overlapping (or repeated)
    # frames must give exactly that update.
    latents = torch.randn(frames, 4, 2, 2)
    sigmas = torch.tensor([10.0, 5.0, 0.0])
    visits = torch.zeros(frames)

    def denoise(x_in, idx, step, t):
        visits.index_add_(0, idx.flatten(), torch.ones(idx.numel()))
        return torch.zeros_like(x_in)

    out = sample_windows(denoise, latents, sigmas, torch.tensor([0.5, 0.4]), window=25, shift_offset=7,
                         windows_per_call=windows_per_call)
    expected = latents.clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        expected = euler_step(expected, torch.zeros_like(expected), s, s_next)
    torch.testing.assert_close(out, expected)
    assert (visits >= 2).all()  # at least once per step


class HostCopies(TorchFunctionMode):
    """Records the non_blocking flag of every `Tensor.to(...)` into host memory made inside it."""

    def __init__(self):
        super().__init__()
        self.non_blocking: list[bool] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
                self.non_blocking.append(kwargs.get("non_blocking", False))
        return func(*args, **kwargs)


@pytest.mark.parametrize("device, asynchronous", [("cuda", True), ("cuda:1", True), ("mps", False), ("xpu", False),
                                                  ("cpu", False)])
def test_only_copies_from_cuda_to_the_host_are_asynchronous(device, asynchronous):
    """As ComfyUI decides (`device_supports_non_blocking`): on CUDA the sampler waits on an event before reading;
    MPS and XPU have none, so a non_blocking copy could be read half-filled."""
    assert nonblocking_to_host(torch.device(device)) is asynchronous


@pytest.mark.parametrize("device", ["mps", "xpu", "cpu"])
def test_the_samplers_copies_back_to_the_host_wait_where_nothing_else_does(device):
    """The sampler's device-to-host copy of a window's result, on devices without CUDA's events: a host tensor
    stands in for the device's (the flag the copy is made with is what counts)."""
    accumulator, summed = _HostAccumulator(torch.device(device)), torch.zeros(4, 2)
    with HostCopies() as copies:
        accumulator.add_later(summed, torch.tensor([[0, 1]]), torch.ones(1, 2, 2))
        accumulator.flush()
    assert copies.non_blocking == [False]
    assert summed.tolist() == [[1, 1], [1, 1], [0, 0], [0, 0]]


def test_the_sampling_loop_asks_the_device_policy_for_every_copy_back(monkeypatch):
    asked = []

    def policy(device):
        asked.append(torch.device(device))
        return nonblocking_to_host(device)

    monkeypatch.setattr(sampler, "nonblocking_to_host", policy)
    with HostCopies() as copies:
        sample_windows(lambda x_in, idx, step, t: torch.zeros_like(x_in), torch.randn(30, 4, 2, 2),
                       torch.tensor([10.0, 5.0, 0.0]), torch.tensor([0.5, 0.4]), device="cpu")
    assert len(asked) == 4 and set(asked) == {torch.device("cpu")}  # 2 windows x 2 steps
    assert copies.non_blocking and not any(copies.non_blocking)


def test_the_host_waits_for_the_copy_on_the_stream_of_the_results_device(monkeypatch):
    """With --device cuda:1 the copy back is queued on cuda:1's stream while the current device may be cuda:0: an
    event recorded on the current device's stream would complete at once and the host would read a half-filled
    buffer. Here CUDA's event and streams are stand-ins that log what the sampler asks of them, and a host tensor
    stands in for the window's result on cuda:1."""
    log = []

    class Event:
        def record(self, stream=None):
            log.append(("record on", stream))

        def synchronize(self):
            log.append(("wait",))

    def current_stream(device=None):
        return "the stream of " + (str(torch.device(device)) if device is not None else "the current device")

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    accumulator, summed = _HostAccumulator(torch.device("cuda", 1)), torch.zeros(4, 2)
    accumulator.add_later(summed, torch.tensor([[0, 1]]), torch.ones(1, 2, 2))
    assert log == [("record on", "the stream of cuda:1")]
    assert not summed.any()  # not read before the event says the copy is done
    accumulator.flush()
    assert log[-1] == ("wait",) and summed.tolist() == [[1, 1], [1, 1], [0, 0], [0, 0]]
