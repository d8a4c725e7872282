"""The optional torch.compile of the UNet (SampleOptions.compile, the sampler's `compile` input, `--compile`):
no graph break from Sonic's audio attention, the same latents as eager (inductor on the CPU), compiled once and
kept for later runs of the same shapes."""

from __future__ import annotations

import torch

from helpers import rel_err
from sonic.engine import pipeline
from sonic.params import SampleOptions


def test_audio_attention_adds_no_graph_break(tiny_models, expected):
    sample, tokens = expected["unet_call0.sample"], expected["unet_call0.audio_tokens"]
    rows, frames = sample.shape[:2]
    clip = expected["unet_call0.image_embeds"].reshape(rows, frames, -1)[:, :1]
    with torch.no_grad(), tiny_models.audio_conditioning.bind(tokens, frames, expected["unet_call0.face_mask"], 1.0):
        explained = torch._dynamo.explain(tiny_models.unet)(
            sample, expected["unet_call0.timestep"], encoder_hidden_states=clip,
            added_time_ids=expected["unet_call0.added_time_ids"], return_dict=False)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_compiled_unet_gives_the_same_latents_and_compiles_once(tiny_models, tiny_cond, expected):
    """Inductor on this CPU takes about two minutes for the tiny UNet: the suite's slowest test, kept because
    the option is only worth offering if it is exercised."""
    from torch._dynamo.utils import counters

    noise = expected["noise.latents"]
    eager = pipeline.sample(tiny_models, tiny_cond, SampleOptions(inference_steps=1), noise=noise)
    options = SampleOptions(inference_steps=1, compile=True)
    compiled = pipeline.sample(tiny_models, tiny_cond, options, noise=noise)
    # measured 1.7e-4 (2.8e-6 on one UNet call, amplified by the 7.5x guidance): the float noise of other kernels,
    # as between batch sizes (tests/test_pipeline.py); another noise differs by ~1
    assert rel_err(compiled, eager) < 1e-3
    graphs = counters["stats"]["unique_graphs"]
    wrapper = pipeline.unet_for(tiny_models, options)
    assert wrapper is not tiny_models.unet
    # a second run (another seed: new values, same shapes) reuses what was compiled
    again = pipeline.sample(tiny_models, tiny_cond, SampleOptions(inference_steps=1, seed=5, compile=True))
    assert counters["stats"]["unique_graphs"] == graphs and pipeline.unet_for(tiny_models, options) is wrapper
    assert torch.isfinite(again).all()
    assert pipeline.unet_for(tiny_models, SampleOptions()) is tiny_models.unet  # off by default
