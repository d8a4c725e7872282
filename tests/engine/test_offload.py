"""UNet block streaming (sonic/engine/offload.py): every weight is in exactly one streamed unit, the device holds one
unit at a time, nothing changes in host memory, and the video is the same."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import record_streaming

from sonic.engine import offload, pipeline
from sonic.params import SampleOptions


def _weights(module) -> dict[int, torch.Tensor]:
    return {id(t): t for t in [*module.parameters(), *module.buffers()]}


def test_units_hold_every_weight_exactly_once(tiny_models):
    unet = tiny_models.unet
    units = offload.unet_units(unet)
    owned = [id(t) for unit in units for t in [*unit.parameters(), *unit.buffers()]]
    assert len(owned) == len(set(owned))  # no weight in two units
    assert set(owned) == set(_weights(unet))  # and none left out


def test_the_released_unet_streams_in_blocks_of_at_most_a_tenth(reference_dir):
    """On the released architecture (built on `meta`): the largest unit against the whole UNet, in fp16."""
    from sonic.engine.models.unet import build_sonic_unet

    unet, _ = build_sonic_unet(json.loads((reference_dir / "svd-xt" / "unet" / "config.json").read_text()), 1024)
    unet.to(device="meta", dtype=torch.float16)
    units = offload.unet_units(unet)
    total = sum(t.numel() * t.element_size() for t in unet.parameters())
    largest = max(offload.unit_bytes(unit) for unit in units)
    assert 2.8e9 < total < 3.3e9  # the 3.0 GB fp16 UNet
    assert largest < 0.1 * total, (largest, total)


def test_the_device_holds_one_unit_at_a_time_and_the_host_copy_is_untouched(tiny_models, expected):
    """Streamed to `meta` (a device without memory that still runs every layer's shapes), what sits on that
    device is counted at each unit's forward; the CPU copies keep their storage and values."""
    unet, conditioning = tiny_models.unet, tiny_models.audio_conditioning
    units = offload.unet_units(unet)
    before = {key: (t.data_ptr(), t.clone()) for key, t in _weights(unet).items()}
    resident, largest = [], max(offload.unit_bytes(u) for u in units)

    def on_device(*_):
        resident.append(sum(t.numel() * t.element_size() for t in _weights(unet).values() if t.device.type == "meta"))

    sample, tokens = expected["unet_call0.sample"], expected["unet_call0.audio_tokens"]
    meta = {name: t.to("meta") for name, t in dict(sample=sample, tokens=tokens, mask=expected["unet_call0.face_mask"],
            ids=expected["unet_call0.added_time_ids"], clip=expected["unet_call0.image_embeds"][::25],
            timestep=expected["unet_call0.timestep"][0]).items()}
    with torch.no_grad(), offload.streamed(units, "meta"), conditioning.bind(meta["tokens"], 25, meta["mask"], 1.0):
        # registered after the streaming hooks, so each count runs once its unit is on the device
        hooks = [u.register_forward_pre_hook(on_device) for u in units]
        try:
            out = unet(meta["sample"], meta["timestep"], encoder_hidden_states=meta["clip"],
                       added_time_ids=meta["ids"], return_dict=False)[0]
        finally:
            for hook in hooks:
                hook.remove()
    assert out.shape == (sample.shape[0], 25, 4, *sample.shape[-2:])
    assert len(resident) >= len(units) and max(resident) == largest and min(resident) > 0
    for key, t in _weights(unet).items():
        assert t.device.type == "cpu" and t.data_ptr() == before[key][0] and torch.equal(t, before[key][1])


def test_streaming_and_compile_are_refused_together():
    with pytest.raises(ValueError, match="compile and stream_unet cannot be combined"):
        SampleOptions(compile=True, stream_unet=True)


def test_a_unit_that_raises_is_put_back(tiny_models):
    units = offload.unet_units(tiny_models.unet)
    conv_in = tiny_models.unet.conv_in
    weight = conv_in.weight
    with pytest.raises(RuntimeError), torch.no_grad(), offload.streamed(units, "meta"):
        conv_in(torch.zeros(1, 3, 8, 8, device="meta"))  # wrong channels: fails inside the unit's forward
    assert conv_in.weight is weight and weight.device.type == "cpu"


def _count_unit_calls(units) -> tuple[list, list]:
    """Forward pre-hooks counting every call of every unit (each call of a streamed unit is one weight pass)."""
    calls = [0]

    def count(*_):
        calls[0] += 1

    return calls, [unit.register_forward_pre_hook(count) for unit in units]


def test_low_vram_rows_share_one_weight_pass_per_unet_call(tiny_models, tiny_cond, monkeypatch):
    """Streamed with the guidance rows one after another (how the plan always streams): every unit visits the
    device once per window and step, not once per row (which sent the 3.15 GB three times per window); the
    streaming stats agree, and from the second UNet call on every unit's weights were copied ahead."""
    unet = tiny_models.unet
    units = offload.unet_units(unet)
    cond, window = _short(tiny_cond, 8), 4
    steps, windows = 2, 2
    calls, hooks = _count_unit_calls(units)
    seen = record_streaming(monkeypatch)
    try:
        pipeline.sample(tiny_models, cond, SampleOptions(inference_steps=steps, stream_unet=True,
                                                         frames_per_window=window, sequential_guidance=True))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls[0] == steps * windows * len(units), (calls[0], len(units))
    stats = seen[0].stats
    assert stats.loads == steps * windows * len(units)
    # all but the first call's units and the second call's first unit (whose predecessor ended the first call)
    assert stats.prefetched == stats.loads - len(units) - 1 and stats.discarded == 0
    assert stats.pinned_bytes == 0  # a CPU run pins nothing


def _short(cond, frames: int):
    """The first `frames` frames of a conditioning (short windows keep the CPU runs to seconds)."""
    return dataclasses.replace(cond, audio_tokens=cond.audio_tokens[:frames],
                               motion_buckets=cond.motion_buckets[:frames])


@pytest.mark.parametrize("windows_per_call", [1, 2])
def test_streamed_low_vram_rows_give_the_resident_latents(tiny_models, tiny_cond, windows_per_call):
    """Two steps over two windows (one or two windows per UNet call), streamed with the rows sharing each weight
    pass and the next block copied ahead: bit for bit the latents of the resident UNet running the rows one after
    another; and batched rows streamed give the batched call's latents."""
    cond = _short(tiny_cond, 8)
    for sequential in (True, False):
        options = dict(inference_steps=2, seed=3, frames_per_window=4, windows_per_call=windows_per_call,
                       sequential_guidance=sequential)
        resident = pipeline.sample(tiny_models, cond, SampleOptions(**options))
        streamed = pipeline.sample(tiny_models, cond, SampleOptions(stream_unet=True, **options))
        assert torch.equal(streamed, resident), sequential


def test_pinning_is_decided_by_the_target(tiny_models):
    assert not offload.should_pin("cpu") and not offload.should_pin("meta")
    assert offload.should_pin("cuda") == torch.cuda.is_available()
    assert offload.should_pin(torch.device("cuda", 1)) == torch.cuda.is_available()


def test_with_the_next_unit_copied_ahead_the_device_holds_at_most_two_units(tiny_models, expected):
    """Two UNet calls streamed to `meta`: in the second, each unit's forward runs with the next unit's weights
    already copied (held by the streaming context, not yet in the module): at most two units' weights on the
    device, the largest pair of consecutive units at most."""
    unet, conditioning = tiny_models.unet, tiny_models.audio_conditioning
    units = offload.unet_units(unet)
    largest = max(offload.unit_bytes(u) for u in units)
    sample, tokens = expected["unet_call0.sample"], expected["unet_call0.audio_tokens"]
    meta = {name: t.to("meta") for name, t in dict(sample=sample, tokens=tokens, mask=expected["unet_call0.face_mask"],
            ids=expected["unet_call0.added_time_ids"], clip=expected["unet_call0.image_embeds"][::25],
            timestep=expected["unet_call0.timestep"][0]).items()}
    held, ahead = [], []
    with torch.no_grad(), offload.streamed(units, "meta") as streaming, \
            conditioning.bind(meta["tokens"], 25, meta["mask"], 1.0):
        def on_device(*_):
            in_module = sum(t.numel() * t.element_size() for t in _weights(unet).values() if t.device.type == "meta")
            pending = streaming._pending[1] if streaming._pending is not None else []
            ahead.append(sum(t.numel() * t.element_size() for t in pending))
            held.append(in_module + ahead[-1])

        hooks = [u.register_forward_pre_hook(on_device) for u in units]
        try:
            for _ in range(2):
                unet(meta["sample"], meta["timestep"], encoder_hidden_states=meta["clip"],
                     added_time_ids=meta["ids"], return_dict=False)
        finally:
            for hook in hooks:
                hook.remove()
    second = slice(len(held) // 2, None)
    assert all(a > 0 for a in ahead[second][:-1])  # every unit but the last had its successor on the way
    assert max(held) <= 2 * largest and max(held[second]) > largest
    assert streaming.stats.prefetched == len(units) - 1
