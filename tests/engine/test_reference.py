"""The pipeline against every stage the official implementation recorded on the tiny reference model.

Bounds are those of ../shared/reference/sonic-tiny/tolerances.txt.
"""

from __future__ import annotations

import pytest
import torch

from sonic.engine import pipeline
from sonic.inputs.image import normalize_clip
from sonic.params import SampleOptions

from helpers import rel_err

PRE_BOUND = 1e-4  # pre.*, audio.*, clip.*: relative to max |ref|
UNET_BOUND = 1e-3
LATENT_BOUND = 1e-3
VIDEO_ABS_BOUND = 4e-3


def _options(params: dict) -> SampleOptions:
    return SampleOptions(
        inference_steps=params["inference_steps"],
        seed=params["seed"],
        dynamic_scale=params["dynamic_scale"],
        min_appearance_guidance=params["min_appearance_guidance_scale"],
        max_appearance_guidance=params["max_appearance_guidance_scale"],
        audio_guidance=params["audio_guidance_scale"],
        shift_offset=params["shift_offset"],
        frames_per_window=params["frames_per_batch"],
        overlap=params["overlap"],
        decode_chunk_size=params["decode_chunk_size"],
        noise_strength=params["i2i_noise_strength"],
        interpolation=params["use_interframe"],
    )


def test_portrait_tensors(tiny_cond, expected):
    assert rel_err(tiny_cond.ref_image[0], expected["pre.ref_img"]) <= PRE_BOUND
    assert rel_err(tiny_cond.face_mask[0, 0], expected["pre.face_mask"][0]) <= PRE_BOUND
    assert rel_err(normalize_clip(tiny_cond.extras["clip_image"]), expected["pre.clip_image"]) <= PRE_BOUND
    assert rel_err(tiny_cond.image_embeds, expected["clip.image_embeds"]) <= PRE_BOUND


def test_audio_stages(tiny_cond, expected):
    features = tiny_cond.extras["audio_feature"]
    assert features.shape == (1, *expected["pre.audio_feature"].shape)
    assert float((features[0] - expected["pre.audio_feature"]).abs().max()) <= 1e-3
    assert tiny_cond.num_frames == int(expected["pre.audio_len"]) // 2 == 57
    assert rel_err(tiny_cond.extras["token_windows"], expected["audio.a2t_inputs"][:, 0]) <= PRE_BOUND
    assert rel_err(tiny_cond.extras["bucket_windows"], expected["audio.a2b_inputs"][:, 0]) <= PRE_BOUND
    assert rel_err(tiny_cond.audio_tokens, expected["audio.tokens_cond"][:, 0]) <= PRE_BOUND
    assert rel_err(tiny_cond.audio_tokens_uncond[0], expected["audio.tokens_uncond"][0, 0]) <= PRE_BOUND
    assert rel_err(tiny_cond.extras["raw_buckets"], expected["audio.a2b_outputs"][:, 0, :, 0]) <= PRE_BOUND
    assert rel_err(tiny_cond.motion_buckets, expected["audio.a2b_outputs"][:, 0, :, 0] * 16 + 16) <= PRE_BOUND


def test_seed_draws_the_recorded_noise(tiny_models, tiny_cond, tiny_params, expected):
    noise = pipeline.draw_noise(tiny_models, tiny_cond, tiny_params["seed"])
    assert torch.equal(noise, expected["noise.latents"])


def test_first_unet_call_gets_the_recorded_inputs(tiny_models, tiny_cond, tiny_params, expected):
    captured = {}

    def grab(module, args, kwargs):
        if not captured:
            cond = tiny_models.audio_conditioning
            captured.update(sample=args[0].clone(), timestep=args[1].clone(), clip=kwargs["encoder_hidden_states"].clone(),
                            time_ids=kwargs["added_time_ids"].clone(), tokens=cond.audio_tokens.clone(),
                            mask=cond.face_mask.clone(), frames=cond.num_frames)
        raise StopIteration  # one call is enough

    handle = tiny_models.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with pytest.raises(StopIteration):
            pipeline.sample(tiny_models, tiny_cond, _options(tiny_params), noise=expected["noise.latents"])
    finally:
        handle.remove()
    assert rel_err(captured["sample"], expected["unet_call0.sample"]) <= PRE_BOUND
    assert rel_err(captured["timestep"].reshape(1), expected["unet_call0.timestep"]) <= 1e-6
    frames = captured["frames"]
    assert rel_err(captured["clip"].repeat_interleave(frames, 0), expected["unet_call0.image_embeds"]) <= PRE_BOUND
    assert rel_err(captured["tokens"], expected["unet_call0.audio_tokens"]) <= PRE_BOUND
    assert rel_err(captured["time_ids"], expected["unet_call0.added_time_ids"]) <= PRE_BOUND
    assert torch.equal(captured["mask"], expected["unet_call0.face_mask"])


def test_unet_output_on_recorded_inputs(tiny_models, expected):
    frames = expected["unet_call0.sample"].shape[1]
    with torch.no_grad(), tiny_models.audio_conditioning.bind(
        expected["unet_call0.audio_tokens"], frames, expected["unet_call0.face_mask"], 1.0
    ):
        out = tiny_models.unet(
            expected["unet_call0.sample"],
            expected["unet_call0.timestep"][0],
            encoder_hidden_states=expected["unet_call0.image_embeds"][::frames],
            added_time_ids=expected["unet_call0.added_time_ids"],
            return_dict=False,
        )[0]
    assert rel_err(out, expected["unet_call0.out"]) <= UNET_BOUND


def test_audio_branch_matters(tiny_models, expected):
    """Guard against a silently disconnected audio branch: scale 0 must change the output."""
    frames = expected["unet_call0.sample"].shape[1]
    outs = []
    for scale in (1.0, 0.0):
        with torch.no_grad(), tiny_models.audio_conditioning.bind(
            expected["unet_call0.audio_tokens"], frames, expected["unet_call0.face_mask"], scale
        ):
            outs.append(tiny_models.unet(expected["unet_call0.sample"], expected["unet_call0.timestep"][0],
                                         encoder_hidden_states=expected["unet_call0.image_embeds"][::frames],
                                         added_time_ids=expected["unet_call0.added_time_ids"], return_dict=False)[0])
    assert rel_err(outs[1], outs[0]) > 1e-3


def test_full_run_matches(tiny_models, tiny_cond, tiny_params, expected):
    calls = []
    options = _options(tiny_params)
    latents = pipeline.sample(tiny_models, tiny_cond, options, noise=expected["noise.latents"],
                              progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (int(expected["meta.unet_calls"]), int(expected["meta.unet_calls"]))
    assert rel_err(latents, expected["final_latents"]) <= LATENT_BOUND

    before = []
    final = torch.cat([c.cpu() for c in pipeline.decode(tiny_models, latents, options, keep_before_interpolation=before)])
    decoded = torch.cat(before).float().permute(1, 0, 2, 3)[None]
    assert float((decoded - expected["video_before_interp"].float()).abs().max()) <= VIDEO_ABS_BOUND

    final_u8 = pipeline.to_uint8_frames(final).permute(3, 0, 1, 2)[None]  # [1, 3, 2F-1, H, W]
    reference = expected["video_final_uint8"]
    assert final_u8.shape == reference.shape
    diff = (final_u8.int() - reference.int()).abs()
    assert float((diff <= 1).float().mean()) >= 0.995
    assert int(diff.max()) <= 3
