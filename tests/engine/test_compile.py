"""The optional torch.compile of the UNet (SampleOptions.compile, the sampler's `compile` input, `--compile`).

Graph capture and reuse are Dynamo's part, the same whatever backend compiles the graph, so they are tested with
`torch._dynamo.explain` and with the `eager` backend (Dynamo captures the UNet, PyTorch runs the graph: no code
generation) put under the pipeline's own `torch.compile` call: no graph break from Sonic's audio attention, one
graph for every UNet call of a run, nothing compiled again for a second run of the same shapes. One test runs
inductor, the backend the option uses, because only real code generation can show that the generated kernels
compute what the eager UNet does; it compiles once and runs one UNet call."""

from __future__ import annotations

import dataclasses
import weakref

import pytest
import torch

from helpers import rel_err
from sonic.engine import pipeline
from sonic.params import SampleOptions


def _call0_row(expected, row: int = 2) -> dict:
    """The official run's first UNet call, one guidance row of it (rows are independent; 2 = fully conditioned)."""
    sample = expected["unet_call0.sample"]
    rows, frames = sample.shape[:2]
    return {"sample": sample[row : row + 1], "timestep": expected["unet_call0.timestep"],
            "clip": expected["unet_call0.image_embeds"].reshape(rows, frames, -1)[row : row + 1, :1],
            "tokens": expected["unet_call0.audio_tokens"].unflatten(0, (rows, frames))[row],
            "time_ids": expected["unet_call0.added_time_ids"][row : row + 1],
            "mask": expected["unet_call0.face_mask"], "frames": frames}


def _unet_call(models, unet, call: dict) -> torch.Tensor:
    with torch.no_grad(), models.audio_conditioning.bind(call["tokens"], call["frames"], call["mask"], 1.0):
        return unet(call["sample"], call["timestep"], encoder_hidden_states=call["clip"],
                    added_time_ids=call["time_ids"], return_dict=False)[0]


def test_audio_attention_adds_no_graph_break(tiny_models, expected):
    call = _call0_row(expected)
    with torch.no_grad(), tiny_models.audio_conditioning.bind(call["tokens"], call["frames"], call["mask"], 1.0):
        explained = torch._dynamo.explain(tiny_models.unet)(
            call["sample"], call["timestep"], encoder_hidden_states=call["clip"], added_time_ids=call["time_ids"],
            return_dict=False)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.fixture
def fresh_compile(monkeypatch):
    """Nothing compiled before (no wrapper kept by the pipeline, no Dynamo cache); afterwards the same again."""
    monkeypatch.setattr(pipeline, "_COMPILED", weakref.WeakKeyDictionary())
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_unet_compiles_to_one_graph_once_and_later_runs_reuse_it(tiny_models, tiny_cond, expected,
                                                                     fresh_compile, monkeypatch):
    """Two steps of one 25-frame window: two UNet calls per run, at different timesteps."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("eager")  # counts every graph Dynamo hands to the backend
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, backend=counter, **kwargs))
    frames = 25
    cond = dataclasses.replace(tiny_cond, audio_tokens=tiny_cond.audio_tokens[:frames],
                               motion_buckets=tiny_cond.motion_buckets[:frames])
    noise = expected["noise.latents"][:, :frames]
    eager = pipeline.sample(tiny_models, cond, SampleOptions(inference_steps=2), noise=noise)
    assert counter.frame_count == 0  # off by default
    options = SampleOptions(inference_steps=2, compile=True)
    compiled = pipeline.sample(tiny_models, cond, options, noise=noise)
    # one graph for both calls: no break inside the UNet, no recompile from one step to the next
    assert counter.frame_count == 1
    assert rel_err(compiled, eager) < 1e-4  # Dynamo's graph computes what the module does
    wrapper = pipeline.unet_for(tiny_models, options)
    assert wrapper is not tiny_models.unet
    # a second run (another seed: new values, same shapes) reuses what was compiled, and computes with them
    again = pipeline.sample(tiny_models, cond, SampleOptions(inference_steps=2, seed=5, compile=True))
    assert counter.frame_count == 1 and pipeline.unet_for(tiny_models, options) is wrapper
    assert torch.isfinite(again).all() and rel_err(again, compiled) > 0.1
    assert pipeline.unet_for(tiny_models, SampleOptions()) is tiny_models.unet  # off by default


@pytest.mark.slow
def test_inductor_computes_what_the_eager_unet_does(tiny_models, expected, fresh_compile):
    """The one inductor compile (minutes on a 2-core CPU: the suite's slowest test), through the pipeline's own
    `torch.compile` call, kept because the eager and counting backends run PyTorch's kernels: only this shows
    that the code inductor generates computes the same UNet output."""
    call = _call0_row(expected)
    eager = _unet_call(tiny_models, tiny_models.unet, call)
    compiled = _unet_call(tiny_models, pipeline.unet_for(tiny_models, SampleOptions(compile=True)), call)
    # measured 2.8e-6 on the full 3-row call: the float noise of other kernels; another input differs by ~1
    assert rel_err(compiled, eager) < 1e-4


def test_audio_scale_and_guidance_mode_compile_once_per_shape(tiny_models, tiny_cond, expected, fresh_compile,
                                                              monkeypatch):
    """Three `ip_audio_scale` values in each guidance mode (batched rows, rows one after another): one graph per
    call shape (the two modes give the UNet 3 rows or 1), never one per scale (before: a graph per value, and after
    8 of them Dynamo silently ran the UNet eagerly). Whether Dynamo compiles again is decided by its guards, before
    any backend runs, so the counting `eager` backend shows what inductor would do and keeps this test to seconds;
    with it the graph runs PyTorch's own kernels, so the compiled numbers equal the uncompiled ones bit for bit."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("eager")
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, backend=counter, **kwargs))
    frames = 4  # one 4-frame window: the graph count does not depend on the size
    cond = dataclasses.replace(tiny_cond, audio_tokens=tiny_cond.audio_tokens[:frames],
                               motion_buckets=tiny_cond.motion_buckets[:frames])
    noise = expected["noise.latents"][:, :frames]
    outputs = {}
    for sequential in (False, True):
        for scale in (1.0, 0.5, 1.7):
            options = SampleOptions(inference_steps=1, ip_audio_scale=scale, sequential_guidance=sequential,
                                    frames_per_window=frames)
            compiled = pipeline.sample(tiny_models, cond, dataclasses.replace(options, compile=True), noise=noise)
            eager = pipeline.sample(tiny_models, cond, options, noise=noise)
            assert torch.equal(compiled, eager), (sequential, scale)  # the scale reaches the graph as it is
            outputs[sequential, scale] = compiled
    assert counter.frame_count == 2  # one graph per shape (3 rows, 1 row), whatever the scale
    assert rel_err(outputs[False, 0.5], outputs[False, 1.7]) > 1e-3  # and the scale still matters
