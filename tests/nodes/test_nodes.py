"""The node pack as ComfyUI sees it: contracts of every node, and each node run through the harness."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfy_harness import ValidationError, execute_prompt, reset_stub_records, validate_prompt
from helpers import audio_delay_s


@pytest.fixture(autouse=True)
def _fresh_stub_records():
    """The ComfyUI stand-in records model loads, memory requests and progress: none carried over between tests."""
    reset_stub_records()
    yield
    reset_stub_records()


NODE_IDS = ["SonicLoadImage", "SonicLoadAudio", "SonicModelLoader", "SonicPreData", "SonicSampler",
            "SonicLipSyncCalibrate", "SonicSmoothMotion", "SonicVideoEncode"]


def test_every_node_has_a_complete_contract(comfy_env):
    mappings = comfy_env["mappings"]
    assert sorted(mappings) == sorted(NODE_IDS)
    assert sorted(comfy_env["pack"].NODE_DISPLAY_NAME_MAPPINGS) == sorted(NODE_IDS)
    for node_id, cls in mappings.items():
        types = cls.INPUT_TYPES()
        assert set(types) <= {"required", "optional", "hidden"}
        assert cls.CATEGORY == "Sonic" and cls.DESCRIPTION
        assert isinstance(cls.RETURN_TYPES, tuple) and callable(getattr(cls, cls.FUNCTION))
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
        for group in ("required", "optional"):
            for name, spec in types.get(group, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_combos_list_the_folders(comfy_env):
    mappings = comfy_env["mappings"]
    assert mappings["SonicModelLoader"].INPUT_TYPES()["required"]["sonic_unet"][0] == ["Sonic/unet.pth"]
    assert "portrait.png" in mappings["SonicLoadImage"].INPUT_TYPES()["required"]["image"][0]
    assert "speech.wav" in mappings["SonicLoadAudio"].INPUT_TYPES()["required"]["audio"][0]
    seed = mappings["SonicSampler"].INPUT_TYPES()["required"]["seed"][1]
    assert seed["control_after_generate"] and seed["default"] == 72589


def _graph(**overrides):
    sampler = {"sonic_model": ["3", 0], "predata": ["4", 0], "seed": 1, "steps": 1, "dynamic_scale": 1.0,
               "motion_scale": 1.0, "audio_guidance": 7.5, "appearance_guidance": 2.0, "ip_audio_scale": 1.0,
               "output": "auto"}
    prompt = {
        "1": {"class_type": "SonicLoadImage", "inputs": {"image": "portrait.png"}},
        "2": {"class_type": "SonicLoadAudio", "inputs": {"audio": "speech.wav", "trim_silence": False, "silence_db": 40.0}},
        "3": {"class_type": "SonicModelLoader", "inputs": {"sonic_unet": "Sonic/unet.pth", "dtype": "fp32",
                                                          "interpolation": True, "face_detector": "auto"}},
        "4": {"class_type": "SonicPreData", "inputs": {"sonic_model": ["3", 0], "image": ["1", 0], "audio": ["2", 0],
                                                      "min_resolution": 128, "duration": 1.0, "crop": False,
                                                      "expand_ratio": 0.5, "face_box": "37.25,37,76.25,76.25"}},
        "5": {"class_type": "SonicSampler", "inputs": sampler},
        "6": {"class_type": "SonicVideoEncode", "inputs": {"fps": ["5", 2], "filename_prefix": "test/sonic", "crf": 23,
                                                          "images": ["5", 0], "audio": ["5", 1]}},
    }
    for key, value in overrides.items():
        node, name = key.split(".")
        prompt[node]["inputs"][name] = value
    return prompt


def test_graph_runs_end_to_end(comfy_env):
    results, ui = execute_prompt(_graph(), comfy_env["mappings"])
    images, audio, fps, frames = results["5"]
    assert fps == 25.0 and images.shape == (23, 256, 128, 3) and images.dtype == torch.float32
    assert audio["waveform"].shape[-1] == round(23 / 25 * 16000) and audio["sample_rate"] == 16000
    assert len(frames.store) == 23
    entry = ui["6"]["images"][0]
    assert ui["6"]["animated"] == [True] and entry["type"] == "output" and entry["subfolder"] == "test"
    assert (comfy_env["base"] / "output" / "test" / entry["filename"]).is_file()


def test_validation_catches_bad_values(comfy_env):
    mappings = comfy_env["mappings"]
    for overrides, message in (({"4.min_resolution": 64}, "smaller than min"),
                               ({"3.dtype": "fp8"}, "not in list"),
                               ({"6.images": ["2", 0]}, "return type mismatch"),
                               ({"1.image": "missing.png"}, "custom validation failed")):
        with pytest.raises(ValidationError, match=message):
            validate_prompt(_graph(**overrides), mappings)


def _node(comfy_env, node_id):
    return comfy_env["mappings"][node_id]()


def _model(comfy_env):
    return _node(comfy_env, "SonicModelLoader").load("Sonic/unet.pth", dtype="fp32")[0]


def _inputs(comfy_env):
    """(SONIC_MODEL, IMAGE, AUDIO) from the loader nodes, on the reference portrait and speech."""
    image, _ = _node(comfy_env, "SonicLoadImage").load("portrait.png")
    return _model(comfy_env), image, _node(comfy_env, "SonicLoadAudio").load("speech.wav")[0]


def test_model_loader_caches(comfy_env):
    first, second = _model(comfy_env), _model(comfy_env)
    assert first is second  # loaded once, kept between runs
    with pytest.raises(ValueError, match="both vae and clip_vision"):
        _node(comfy_env, "SonicModelLoader").load("Sonic/unet.pth", vae=object())


def _prepare(comfy_env, min_resolution=128):
    """(SONIC_MODEL, SONIC_PREDATA) of 0.5 s of the reference speech on the portrait (face box given)."""
    model, image, audio = _inputs(comfy_env)
    predata = _node(comfy_env, "SonicPreData").prepare(model, image, audio, min_resolution=min_resolution,
                                                       duration=0.5, face_box="37,37,76,76")[0]
    return model, predata


def _sample(comfy_env, model, predata, **sampler):
    return _node(comfy_env, "SonicSampler").sample(model, predata, seed=3, steps=2, **sampler)


class _FirstUNetCall(Exception):
    pass


def _until_first_unet_call(comfy_env, model, predata):
    """Run the sampler node until its first UNet call starts (the memory mode is chosen and logged by then)."""

    def stop(module, args):
        raise _FirstUNetCall

    handle = model.models.unet.register_forward_pre_hook(stop)
    try:
        with pytest.raises(_FirstUNetCall):
            _sample(comfy_env, model, predata)
    finally:
        handle.remove()


def _run_stages(comfy_env, min_resolution=128, **sampler):
    model, predata = _prepare(comfy_env, min_resolution)
    return predata, _sample(comfy_env, model, predata, **sampler)


# The reference portrait is 144x256 (w x h). Its video (both sides multiples of 64, the short one the minimum
# resolution) and latents (8x smaller), as the memory requests below must be sized:
VIDEO = {128: (128, 256), 256: (256, 448), 384: (384, 704)}  # min_resolution -> (width, height)
LATENT = {128: (32, 16), 256: (56, 32)}  # min_resolution -> (latent_h, latent_w)
# SampleOptions' defaults the requests depend on: 25 latent frames per UNet window, one window per call, three
# guidance rows per window (one in low-VRAM mode), VAE decode chunks of 8 frames, RIFE batches of 4 frame pairs
ROWS, LOW_VRAM_ROWS, WINDOW, CHUNK, RIFE_BATCH = 3, 1, 25, 8, 4
STAGE_MODULES = [["ModuleDict", "AutoencoderKLTemporalDecoder", "CLIPVisionModelWithProjection"],  # PreData
                 ["UNetSpatioTemporalConditionModel"],  # sampling
                 ["AutoencoderKLTemporalDecoder", "IFNet"]]  # decode + RIFE


def test_each_stage_tells_comfyui_the_memory_it_needs(comfy_env):
    """ComfyUI frees memory for a stage only as far as it is told: every load names its modules and the working
    memory of that stage for this video's size (sonic/engine/memory.py's estimates, checked against measured
    stages in tests/engine), so other models are evicted when needed."""
    import comfy.model_management as mm

    from sonic.engine import memory

    fp32, requests = torch.float32, {}
    for resolution in (128, 256):
        (width, height), (latent_h, latent_w) = VIDEO[resolution], LATENT[resolution]
        mm.REQUESTS.clear()
        predata, (images, *_rest) = _run_stages(comfy_env, resolution)
        assert predata.cond.size == (width, height) and tuple(images.shape[1:3]) == (height, width)
        assert [names for names, _ in mm.REQUESTS] == STAGE_MODULES
        prepare, sampling, decode = requests[resolution] = [request for _, request in mm.REQUESTS]
        assert prepare == memory.prepare_bytes(height, width, fp32)  # one portrait VAE-encoded, Whisper, CLIP
        assert sampling == memory.unet_call_bytes(ROWS, WINDOW, latent_h, latent_w, fp32)
        assert decode == max(memory.vae_decode_bytes(CHUNK, height, width, fp32),
                             memory.rife_bytes(RIFE_BATCH, height, width))
        assert decode > prepare  # decoding a chunk of frames needs more than encoding one
    # a larger video asks for more, in proportion to its area above the fixed parts (128x256 -> 256x448 here)
    small, large = requests[128], requests[256]
    fixed = memory.UNET_FIXED_BYTES * memory.SLACK  # the UNet call's size-independent part
    assert (large[1] - fixed) / (small[1] - fixed) == pytest.approx(3.5, rel=1e-6)
    assert large[2] / small[2] == pytest.approx(3.5, rel=1e-6)
    # PreData: below 384x704 Whisper and CLIP need more than the portrait's encode; from there the encode counts
    floor = memory.AUDIO_AND_CLIP_BYTES * memory.SLACK
    assert small[0] == large[0] == pytest.approx(floor, abs=1)
    mm.REQUESTS.clear()
    _, predata = _prepare(comfy_env, 384)
    width, height = VIDEO[384]
    assert predata.cond.size == (width, height)
    assert mm.REQUESTS == [(STAGE_MODULES[0], memory.prepare_bytes(height, width, fp32))]
    assert mm.REQUESTS[0][1] == pytest.approx(width * height * memory.VAE_ENCODE_BYTES_PER_PIXEL * memory.SLACK, abs=1)
    assert mm.REQUESTS[0][1] > floor


class _VAEInDtype:
    """A comfy.sd.VAE as far as the nodes' memory requests read it: ComfyUI chooses its dtype apart from the
    UNet's (`model_management.vae_dtype`: fp32 on cards without fast fp16 or bf16)."""

    def __init__(self, dtype):
        self.vae_dtype = dtype
        self.patcher = None  # no weights: the stages stop before it would run


class _StageReached(Exception):
    pass


def test_vae_stages_ask_for_memory_in_comfyuis_vae_dtype_not_the_unets(comfy_env, monkeypatch):
    """An older card: ComfyUI's VAE in fp32 beside an fp16 UNet. PreData's request (the portrait's encode, at a size
    where it outweighs Whisper and CLIP even in fp16) and the decode stage's must count fp32 activations: twice an
    fp16 VAE's. The stages stop right after their requests (what runs after them is tested above)."""
    import comfy.model_management as mm

    from sonic.engine import memory
    from sonic.engine.plan import video_size
    from sonic.params import PrepareOptions

    _, predata = _prepare(comfy_env)  # 128 px, with the folder's VAE
    _, image, audio = _inputs(comfy_env)
    loader = _node(comfy_env, "SonicModelLoader")
    pipeline = comfy_env["pack"].sonic.engine.pipeline

    def stop(*args, **kwargs):
        raise _StageReached

    def sample(models, cond, options, **kwargs):  # what sampling hands the decode stage, without the UNet
        return torch.zeros(1, cond.num_frames, *cond.image_latents.shape[1:])

    monkeypatch.setattr(pipeline, "prepare", stop)
    monkeypatch.setattr(pipeline, "sample", sample)
    monkeypatch.setattr(pipeline, "decode", stop)
    prepared, decoded = {}, {}
    for vae_dtype in (torch.float32, torch.float16):
        sonic = loader.load("Sonic/unet.pth", dtype="fp32", vae=_VAEInDtype(vae_dtype),
                            clip_vision=_VAEInDtype(None))[0]
        sonic = dataclasses.replace(sonic, models=dataclasses.replace(sonic.models, dtype=torch.float16))  # its UNet
        mm.REQUESTS.clear()
        with pytest.raises(_StageReached):
            _node(comfy_env, "SonicPreData").prepare(sonic, image, audio, min_resolution=640, duration=0.5,
                                                     face_box="37,37,76,76")
        with pytest.raises(_StageReached):
            _sample(comfy_env, sonic, predata)
        [(_, prepared[vae_dtype]), *_, (names, decoded[vae_dtype])] = mm.REQUESTS
        assert names == ["IFNet"]  # with ComfyUI's VAE (no weights here: tests/nodes/test_model_management.py)
    width, height = video_size((144, 256), PrepareOptions(min_resolution=640))
    assert prepared[torch.float32] == memory.prepare_bytes(height, width, torch.float32)
    assert prepared[torch.float32] == pytest.approx(2 * prepared[torch.float16], abs=2)
    width, height = VIDEO[128]
    assert decoded[torch.float32] == memory.decode_bytes(CHUNK, RIFE_BATCH, height, width, torch.float32,
                                                         interpolation=True)
    assert decoded[torch.float32] == pytest.approx(2 * decoded[torch.float16], abs=2)


def test_low_vram_mode_is_chosen_from_free_memory_and_gives_the_same_video(comfy_env, monkeypatch, caplog):
    import comfy.model_management as mm

    from sonic.engine import memory

    model, predata = _prepare(comfy_env)
    latent_h, latent_w = LATENT[128]
    batched = memory.unet_call_bytes(ROWS, WINDOW, latent_h, latent_w, torch.float32)
    sequential = memory.unet_call_bytes(LOW_VRAM_ROWS, WINDOW, latent_h, latent_w, torch.float32)
    fixed = memory.UNET_FIXED_BYTES * memory.SLACK
    assert (sequential - fixed) == pytest.approx((batched - fixed) / 3, rel=1e-6)  # a third above the fixed part
    calls = []
    handle = model.models.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        normal, *_rest = _sample(comfy_env, model, predata)  # plenty free: the three rows in one call
        assert set(calls) == {3}
        calls.clear()
        monkeypatch.setattr(mm, "FREE_MEMORY", batched - 1)  # a card where the batched call does not fit
        mm.REQUESTS.clear()
        with caplog.at_level("INFO"):
            low, *_rest = _sample(comfy_env, model, predata)
        assert "low-VRAM mode" in caplog.text
        assert [r for names, r in mm.REQUESTS if names == STAGE_MODULES[1]] == [batched, sequential]
        assert set(calls) == {1}  # one guidance row per UNet call
        calls.clear()
        monkeypatch.setattr(mm, "FREE_MEMORY", None)
        monkeypatch.setenv("SONIC_LOW_VRAM", "1")  # the setting forces it whatever is free
        mm.REQUESTS.clear()
        _until_first_unet_call(comfy_env, model, predata)
        assert calls == [1]
        assert [r for names, r in mm.REQUESTS if names == STAGE_MODULES[1]] == [sequential]
    finally:
        handle.remove()
    assert (low.float() - normal.float()).abs().max() < 2 / 255  # the same video (uint8 rounding at most)


def test_unet_streaming_under_novram_or_a_small_card_gives_the_same_video(comfy_env, monkeypatch, caplog):
    import comfy.model_management as mm

    from sonic.engine import memory, offload

    model, predata = _prepare(comfy_env)
    normal, *_rest = _sample(comfy_env, model, predata)
    unet = model.models.unet
    latent_h, latent_w = LATENT[128]
    low_vram_call = memory.unet_call_bytes(LOW_VRAM_ROWS, WINDOW, latent_h, latent_w, torch.float32)
    rows, block_batches = [], []
    inner = unet.down_blocks[0].resnets[0].spatial_res_block  # inside a streaming unit: sees what one piece runs
    handle = unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    inner_handle = inner.register_forward_pre_hook(lambda module, args: block_batches.append(args[0].shape[0]))
    try:
        monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)
        mm.REQUESTS.clear()
        mm.FREED.clear()
        with caplog.at_level("INFO"):
            streamed, *_rest = _sample(comfy_env, model, predata)
        assert "UNet streaming" in caplog.text
        assert not [names for names, _ in mm.REQUESTS if names == STAGE_MODULES[1]]  # never loaded whole
        # room for a low-VRAM call, what the blocks keep across the UNet for the other two guidance rows, and two
        # of the largest streaming units (the one in use, the next arriving)
        largest = max(offload.unit_bytes(unit) for unit in offload.unet_units(unet))
        kept = 2 * WINDOW * memory.kept_elements(latent_h, latent_w, memory.svd_unet_config()) * 4  # fp32
        assert kept > 0
        assert mm.FREED == [low_vram_call + kept + 2 * largest]
        # one UNet call (one weight pass) per window with all three guidance rows; inside each block the rows run
        # one at a time (low-VRAM rows: one row's frames per piece; tests/engine/test_offload.py checks the rows)
        assert set(rows) == {ROWS}
        assert set(block_batches) == {LOW_VRAM_ROWS * WINDOW} and len(block_batches) == ROWS * len(rows)
        # a card whose whole memory cannot hold the UNet's weights and a low-VRAM call chooses it by itself
        monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NORMAL_VRAM)
        unet_bytes = sum(t.numel() * t.element_size() for t in [*unet.parameters(), *unet.buffers()])
        fits = unet_bytes + low_vram_call
        monkeypatch.setattr(mm, "TOTAL_MEMORY", fits + mm.minimum_inference_memory() - 1)
        caplog.clear()
        with caplog.at_level("INFO"):
            _until_first_unet_call(comfy_env, model, predata)
        assert "UNet streaming" in caplog.text
        monkeypatch.setattr(mm, "TOTAL_MEMORY", fits + mm.minimum_inference_memory())
        caplog.clear()
        with caplog.at_level("INFO"):
            _until_first_unet_call(comfy_env, model, predata)
        assert "UNet streaming" not in caplog.text
        # the pack's own setting, on a card that would not need it
        monkeypatch.setenv("SONIC_STREAM_UNET", "1")
        caplog.clear()
        with caplog.at_level("INFO"):
            _until_first_unet_call(comfy_env, model, predata)
        assert "UNet streaming" in caplog.text and "SONIC_STREAM_UNET" in caplog.text
    finally:
        handle.remove()
        inner_handle.remove()
    assert (streamed.float() - normal.float()).abs().max() < 2 / 255  # the same video (uint8 rounding at most)


def test_same_portrait_with_new_audio_reuses_the_face_analysis(comfy_env, monkeypatch):
    from comfy_harness import load_pack  # noqa: F401  (pack already loaded by the fixture)

    model, image, audio = _inputs(comfy_env)
    monkeypatch.setattr(comfy_env["pack"].nodes.sampling, "_FACE_CACHE", None)  # earlier tests analysed it
    calls = []
    detector = model.models.face_detector
    original = detector.detect
    monkeypatch.setattr(detector, "detect", lambda rgb: calls.append(rgb.shape) or original(rgb))
    node = _node(comfy_env, "SonicPreData")
    first = node.prepare(model, image, audio, min_resolution=128, duration=1.0)[0]
    quieter = {"waveform": audio["waveform"] * 0.5, "sample_rate": audio["sample_rate"]}
    second = node.prepare(model, image, quieter, min_resolution=128, duration=0.6)[0]
    assert len(calls) == 1  # detected once
    assert first.cond.face_box == second.cond.face_box
    assert first.cond.num_frames == 12 and second.cond.num_frames == 7


def test_predata_errors_are_actionable(comfy_env):
    model, image, audio = _inputs(comfy_env)
    node = _node(comfy_env, "SonicPreData")
    with pytest.raises(ValueError, match="longer than the audio"):
        node.prepare(model, image, audio, duration=30.0)
    with pytest.raises(ValueError, match="face_box"):
        node.prepare(model, image, audio, face_box="1,2,3")
    blank = torch.full((1, 128, 128, 3), 0.5)
    with pytest.raises(ValueError, match="no face found in the portrait.*Sonic PreData's face_box widget"):
        node.prepare(model, blank, audio, min_resolution=128)


def test_core_load_audio_output_is_accepted(comfy_env):
    """ComfyUI's LoadAudio gives float32 [1, C, T] at the file's own rate: a 44.1 kHz stereo clip works."""
    import numpy as np

    model = _model(comfy_env)
    image, _ = _node(comfy_env, "SonicLoadImage").load("portrait.png")
    t = np.arange(44100) / 44100
    wave = torch.from_numpy(np.stack([np.sin(2 * np.pi * 200 * t), np.sin(2 * np.pi * 300 * t)]).astype(np.float32))
    predata = _node(comfy_env, "SonicPreData").prepare(model, image, {"waveform": wave[None], "sample_rate": 44100},
                                                      min_resolution=128, face_box="37,37,76,76")[0]
    assert predata.cond.num_frames == 12 and predata.audio["sample_rate"] == 44100


def test_load_audio_keeps_rate_and_channels_and_trims_silence(comfy_env):
    import numpy as np
    import soundfile

    rate = 22050
    tone = 0.5 * np.sin(2 * np.pi * 220 * np.arange(rate) / rate)
    stereo = np.concatenate([np.zeros(rate // 2), tone, np.zeros(rate)])[:, None] * [1.0, 0.8]
    soundfile.write(comfy_env["base"] / "input" / "padded.flac", stereo.astype(np.float32), rate)
    node = _node(comfy_env, "SonicLoadAudio")
    plain = node.load("padded.flac")[0]
    trimmed = node.load("padded.flac", trim_silence=True)[0]
    assert plain["sample_rate"] == rate and plain["waveform"].shape == (1, 2, int(2.5 * rate))
    assert abs(trimmed["waveform"].shape[-1] - rate) < 0.05 * rate


def test_paths_cannot_escape_comfyui_folders(comfy_env, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    cls = comfy_env["mappings"]["SonicLoadImage"]
    assert "outside" in cls.VALIDATE_INPUTS("portrait.png", str(outside))
    assert "outside" in cls.VALIDATE_INPUTS("../../etc/passwd")
    with pytest.raises(ValueError, match="outside"):
        _node(comfy_env, "SonicLoadImage").load("portrait.png", path_or_url=str(outside))


def test_missing_file_messages_name_the_widget_at_fault(comfy_env):
    image, audio = comfy_env["mappings"]["SonicLoadImage"], comfy_env["mappings"]["SonicLoadAudio"]
    upload = image.VALIDATE_INPUTS("gone.png", "")
    assert upload.startswith("the image widget's file 'gone.png' is not in ComfyUI's input folder")
    assert "path_or_url" not in upload  # it is empty: not the culprit
    path = audio.VALIDATE_INPUTS("speech.wav", "missing/take1.wav")
    assert path.startswith("path_or_url 'missing/take1.wav': ") and "speech.wav" not in path
    assert image.VALIDATE_INPUTS("", "") == "no image chosen: upload one with the image widget (or set path_or_url)"
    assert image.VALIDATE_INPUTS("gone.png", "https://example.com/p.png") is True  # fetched when the node runs


def test_cancel_is_honoured_within_one_step(comfy_env):
    import comfy.model_management as mm
    import comfy.utils

    model, image, audio = _inputs(comfy_env)
    predata = _node(comfy_env, "SonicPreData").prepare(model, image, audio, min_resolution=128, duration=1.0,
                                                      face_box="37,37,76,76")[0]
    comfy.utils.UPDATES.clear()
    calls = []
    unet_forward = model.models.unet.forward

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            mm.interrupt_current_processing()  # the user presses Cancel during the second UNet call
        return unet_forward(*args, **kwargs)

    model.models.unet.forward = forward
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _node(comfy_env, "SonicSampler").sample(model, predata, seed=1, steps=5)
    finally:
        del model.models.unet.forward
    assert len(calls) == 2  # stopped before a third call
    assert comfy.utils.UPDATES[0] == (1, 5)  # progress reports calls out of the total


def test_frames_file_mode_for_long_videos(comfy_env):
    model, image, audio = _inputs(comfy_env)
    predata = _node(comfy_env, "SonicPreData").prepare(model, image, audio, min_resolution=128, duration=1.0,
                                                      face_box="37,37,76,76")[0]
    images, audio_out, fps, frames = _node(comfy_env, "SonicSampler").sample(model, predata, seed=1, steps=1,
                                                                             output="frames file")
    assert images.shape[0] == 1 and len(frames.store) == 23 and frames.store.path.is_file()
    assert frames.store.path.parent == comfy_env["base"] / "temp"
    out = _node(comfy_env, "SonicVideoEncode").encode(fps, filename_prefix="long/clip", frames=frames)
    path = out["result"][0]
    import av

    with av.open(path) as container:
        assert sum(1 for _ in container.decode(video=0)) == 23
        assert container.streams.audio[0].codec_context.name == "aac"


class _ComfyStyleVAE:
    """Stands in for a comfy.sd.VAE object in the cache test, which is about object identity (the numbers through
    ComfyUI's real VAE and CLIP vision classes are checked in test_comfyui_svd.py)."""

    def __init__(self, diffusers_vae):
        self.vae = diffusers_vae


class _ComfyStyleClipVision:
    """Stands in for a comfy.clip_vision.ClipVisionModel object in the cache test."""

    def __init__(self, model):
        self.model = model


def test_model_cache_is_keyed_by_files_not_by_vae_objects(comfy_env):
    import gc
    import weakref

    native = _model(comfy_env)
    loader = _node(comfy_env, "SonicModelLoader")
    vae = _ComfyStyleVAE(native.models.vae.model)
    first = loader.load("Sonic/unet.pth", dtype="fp32", vae=vae,
                        clip_vision=_ComfyStyleClipVision(native.models.image_encoder.model))[0]
    # the upstream checkpoint loader ran again: new VAE / CLIP_VISION objects for the same files
    second = loader.load("Sonic/unet.pth", dtype="fp32", vae=_ComfyStyleVAE(native.models.vae.model),
                         clip_vision=_ComfyStyleClipVision(native.models.image_encoder.model))[0]
    assert second.models.unet is first.models.unet and second.unet_patcher is first.unet_patcher  # not reloaded
    assert second.models.vae.vae is not vae
    gone = weakref.ref(vae)
    del first, vae
    gc.collect()
    assert gone() is None  # the cache holds no VAE that ComfyUI replaced
    cache = comfy_env["pack"].nodes.model._CACHE
    key = next(iter(cache))
    changed = (key[0][0], key[0][1], key[0][2] + 1)  # as if the file had been replaced
    cache[(changed, *key[1:])] = cache.pop(key)
    third = loader.load("Sonic/unet.pth", dtype="fp32", vae=second.models.vae.vae,
                        clip_vision=second.models.image_encoder.clip_vision)[0]
    assert third.models.unet is not second.models.unet and len(cache) == 1  # a changed file is loaded again


def test_sonic_model_folder_merges_with_user_paths(comfy_env, tmp_path):
    """A `sonic:` path from extra_model_paths.yaml stays first; models/sonic is added after it."""
    import folder_paths

    from comfy_harness import load_pack  # noqa: F401

    saved = folder_paths.folder_names_and_paths.pop("sonic")
    try:
        folder_paths.folder_names_and_paths["sonic"] = ([str(tmp_path)], set())
        comfy_env["pack"].nodes.comfy.register_model_folder()
        paths = folder_paths.get_folder_paths("sonic")
        assert paths[0] == str(tmp_path) and paths[1].endswith("models/sonic")
    finally:
        folder_paths.folder_names_and_paths["sonic"] = saved


def test_loaders_fetch_http_urls(comfy_env, tiny_dir, monkeypatch):
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_dir / "inputs"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.delenv("SONIC_URL_ALLOW", raising=False)
        with pytest.raises(ValueError, match="loopback address.*SONIC_URL_ALLOW"):  # a shared server's own network
            _node(comfy_env, "SonicLoadImage").load("", path_or_url=f"{url}/portrait.png")
        monkeypatch.setenv("SONIC_URL_ALLOW", "127.0.0.1")  # what an operator sets to allow it
        image, mask = _node(comfy_env, "SonicLoadImage").load("", path_or_url=f"{url}/portrait.png")
        assert image.shape == (1, 256, 144, 3)
        audio = _node(comfy_env, "SonicLoadAudio").load("", path_or_url=f"{url}/speech.wav")[0]
        assert audio["sample_rate"] == 16000 and audio["waveform"].shape == (1, 1, 73600)
        with pytest.raises(ValueError, match="could not download"):
            _node(comfy_env, "SonicLoadImage").load("", path_or_url=f"{url}/missing.png")
    finally:
        server.shutdown()
    assert not list((comfy_env["base"] / "temp" / "sonic-downloads").iterdir())  # read, then deleted
    assert comfy_env["mappings"]["SonicLoadImage"].IS_CHANGED("", f"{url}/portrait.png") == f"{url}/portrait.png"


def test_video_encode_metadata_and_bad_frames(comfy_env):
    import json

    import av

    node = _node(comfy_env, "SonicVideoEncode")
    frames = torch.rand(5, 33, 47, 3)  # odd size
    prompt = {"5": {"class_type": "SonicSampler", "inputs": {"seed": 9, "steps": 3, "predata": ["4", 0]}}}
    workflow = {"nodes": [{"id": 5, "type": "SonicSampler"}], "links": []}
    out = node.encode(12.5, filename_prefix="meta/clip", images=frames, watermark="AI-generated",
                      prompt=prompt, extra_pnginfo={"workflow": workflow})
    with av.open(out["result"][0]) as container:
        assert json.loads(container.metadata["workflow"]) == workflow
        assert json.loads(container.metadata["prompt"]) == prompt
        assert json.loads(container.metadata["sonic_parameters"]) == {"SonicSampler": {"seed": 9, "steps": 3}}
        assert container.streams.video[0].average_rate == 12.5
        assert (container.streams.video[0].codec_context.width, container.streams.video[0].codec_context.height) == (48, 34)
    broken = frames.clone()
    broken[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        node.encode(25.0, filename_prefix="meta/broken", images=broken)
    with pytest.raises(ValueError, match="no frames"):
        node.encode(25.0, images=torch.zeros(0, 32, 32, 3))
    with pytest.raises(ValueError, match="empty"):
        node.encode(25.0, images=frames, audio={"waveform": torch.zeros(1, 1, 0), "sample_rate": 16000})
    with pytest.raises(ValueError, match="NaN or infinite samples"):  # broken audio from an upstream node
        node.encode(25.0, filename_prefix="meta/nan", images=frames,
                    audio={"waveform": torch.full((1, 1, 16000), float("nan")), "sample_rate": 16000})
    assert sorted(p.name for p in (comfy_env["base"] / "output" / "meta").iterdir()) == ["clip_00001_.mp4"]


def test_video_encode_outputs_path_then_core_video_empty_without_comfy_api(comfy_env, caplog):
    """Outputs keep their slots (path stays 0; VIDEO appended as 1). The stand-in has no comfy_api, like a ComfyUI
    without the core VIDEO type: the MP4 is still written, the video output is None and the log says why (the
    real VIDEO in ComfyUI 0.8.0 and 0.18.2: tests/nodes/test_comfyui_live.py)."""
    import logging

    cls = comfy_env["mappings"]["SonicVideoEncode"]
    assert cls.RETURN_TYPES == ("STRING", "VIDEO") and cls.RETURN_NAMES == ("path", "video")
    with caplog.at_level(logging.WARNING, logger="sonic"):
        out = _node(comfy_env, "SonicVideoEncode").encode(25.0, filename_prefix="novideo/clip",
                                                           images=torch.rand(3, 32, 32, 3))
    path, video = out["result"]
    assert video is None and path.endswith("clip_00001_.mp4")
    assert any("no core VIDEO type" in r.getMessage() and "path output" in r.getMessage() for r in caplog.records)


def test_video_metadata_redacts_signed_url_queries(comfy_env):
    """A signed link typed into a loader (S3 presigned, a token in the query) does not travel inside the MP4;
    everything else of the prompt and workflow stays, so dropping the MP4 on ComfyUI still restores the graph."""
    import json

    import av

    video = comfy_env["pack"].nodes.video
    signed = ("https://studio.s3.eu-west-1.amazonaws.com/in/anna.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
              "&X-Amz-Credential=AKIAEXAMPLEKEYID%2F20260101%2Feu-west-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z"
              "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=0123456789abcdef")
    token = "http://media.local:8080/voice/intro.wav?token=s3cr3t&expires=99"
    prompt = {"1": {"class_type": "SonicLoadImage", "inputs": {"image": "portrait.png", "path_or_url": signed}},
              "2": {"class_type": "SonicLoadAudio", "inputs": {"audio": "speech.wav", "path_or_url": token}},
              "3": {"class_type": "SonicVideoEncode", "inputs": {"watermark": "Studio X", "crf": 18,
                                                                  "filename_prefix": "redact/signed", "audio": ["2", 0]}},
              "4": {"class_type": "SonicLoadImage", "inputs": {"image": "portrait.png",
                                                               "path_or_url": "https://cdn.example.com/bob.jpg"}}}
    workflow = {"nodes": [{"id": 1, "type": "SonicLoadImage", "widgets_values": ["portrait.png", "image", signed]},
                          {"id": 2, "type": "SonicLoadAudio", "widgets_values": ["speech.wav", token, 0.5]}],
                "links": [[1, 2, 0, 3, 0, "AUDIO"]], "extra": {"note": f"from {token} today"}}
    meta = video.generation_metadata(prompt, {"workflow": workflow})
    assert set(meta) == {"prompt", "sonic_parameters", "workflow"}
    text = " ".join(meta.values())
    for secret in ("X-Amz", "Signature", "Credential", "AKIAEXAMPLEKEYID", "token=", "s3cr3t"):
        assert secret not in text, secret
    kept = json.loads(meta["prompt"])
    assert kept["1"]["inputs"]["path_or_url"] == "https://studio.s3.eu-west-1.amazonaws.com/in/anna.png?<redacted>"
    assert kept["2"]["inputs"]["path_or_url"] == "http://media.local:8080/voice/intro.wav?<redacted>"
    assert kept["4"] == prompt["4"] and kept["3"] == prompt["3"]  # plain values and links unchanged
    assert json.loads(meta["sonic_parameters"])["SonicLoadImage"]["path_or_url"] == "https://cdn.example.com/bob.jpg"
    restored = json.loads(meta["workflow"])
    assert restored["nodes"][0]["widgets_values"] == ["portrait.png", "image", kept["1"]["inputs"]["path_or_url"]]
    assert restored["nodes"][1]["widgets_values"][2] == 0.5 and restored["links"] == workflow["links"]
    assert restored["extra"]["note"] == "from http://media.local:8080/voice/intro.wav?<redacted> today"
    assert prompt["1"]["inputs"]["path_or_url"] == signed  # the prompt itself is untouched
    # and in the written file
    out = _node(comfy_env, "SonicVideoEncode").encode(25.0, filename_prefix="redact/signed", images=torch.rand(2, 32, 32, 3),
                                                      prompt=prompt, extra_pnginfo={"workflow": workflow})
    with av.open(out["result"][0]) as container:
        embedded = " ".join(container.metadata.values())
    assert "<redacted>" in embedded and "X-Amz" not in embedded and "s3cr3t" not in embedded


def _frames_file(comfy_env, clip, fps, audio):
    """A SONIC_FRAMES value (as the sampler's frames-file output) holding the uint8 clip [N, H, W, 3]."""
    import importlib

    pack = comfy_env["pack"]
    frame_store = importlib.import_module(f"{pack.__name__}.sonic.post.frames").FrameStore
    store = frame_store(clip.shape[1], clip.shape[2], len(clip), fps, folder=comfy_env["base"] / "temp")
    store.append(clip)
    return pack.nodes.sampling.SonicFrames(store=store, audio=audio, fps=fps)


def test_smooth_motion_node_on_images_and_frames_file(comfy_env):
    import cv2
    import numpy as np
    from skimage import data

    from sonic.post.smoothing import estimate_trajectory, region_weights

    photo = data.astronaut()
    jitter = np.stack([1.5 * (-1.0) ** np.arange(40), np.zeros(40)], axis=1)
    clip = np.stack([cv2.warpAffine(photo, np.float32([[1, 0, dx], [0, 1, dy]]), (512, 512),
                                    borderMode=cv2.BORDER_REFLECT)[64:320, 128:384] for dx, dy in jitter])
    images = torch.from_numpy(clip).float() / 255
    node = _node(comfy_env, "SonicSmoothMotion")
    smoothed, handle = node.smooth(alpha=0.2, region="face", images=images, face_box="40,0,120,160")
    assert handle is None  # IMAGE in: no frames file (it would carry a guessed fps)
    weights = region_weights(256, 256, "frame")

    def jitter_px(frames_u8):
        return float(np.abs(np.diff(estimate_trajectory([frames_u8], weights)[:, 0])).mean())

    before = jitter_px(clip)
    after = jitter_px((smoothed.numpy() * 255).round().astype(np.uint8))
    assert before > 2.5 and after < before / 4
    # the same clip through a frames file (the long-video path) gives the same frames, chunk by chunk
    frames = _frames_file(comfy_env, clip, 25.0, None)
    preview, from_file = node.smooth(alpha=0.2, region="face", frames=frames, face_box="40,0,120,160")
    assert preview.shape[0] == 1 and len(from_file.store) == 40
    np.testing.assert_array_equal(from_file.store.uint8(), (smoothed.numpy() * 255).round().astype(np.uint8))
    with pytest.raises(ValueError, match="needs the face"):
        node.smooth(region="face", images=images)


def _message_ms(message: str, label: str) -> float:
    """The milliseconds the node's message states after `label` (e.g. 'lip-sync offset +101.0 ms')."""
    import re

    found = re.search(re.escape(label) + r" ([+-][0-9.]+) ms", message)
    assert found, f"{label!r} not in {message!r}"
    return float(found.group(1))


def test_lip_sync_node_on_images_and_frames_file(comfy_env, espeak, caplog):
    import numpy as np

    speech = espeak.synthesize(espeak.SENTENCES[0])
    clip = espeak.talking_clip(speech, 25.0, 0.1, seed=3)  # the picture is 100 ms late
    images = torch.from_numpy(clip).float() / 255
    audio = {"waveform": torch.from_numpy(speech.samples)[None, None], "sample_rate": speech.sample_rate}
    node = _node(comfy_env, "SonicLipSyncCalibrate")
    box = ",".join(str(v) for v in espeak.FACE_BOX)
    out = node.calibrate(mode="auto+manual", lip_sync_offset=0.02, fps=25.0, images=images, audio=audio, face_box=box)
    out_images, handle, corrected, offset, confidence = out["result"]
    assert out_images is images and handle is None
    assert offset == pytest.approx(0.1, abs=0.01) and confidence > 0.4
    # the audio passed on is the input delayed by the known 100 ms plus the manual 20 ms (the delay is found by
    # matching the waveforms; 10 ms is the measurement's accuracy, not the node's rounding)
    delay = audio_delay_s(corrected, audio)
    assert delay == pytest.approx(0.12, abs=0.01)
    shown = out["ui"]["lipsync"][0]  # in the node's UI and the prompt's history (batch manifests)
    assert shown["offset_s"] == pytest.approx(0.1, abs=0.01) and shown["confidence"] > 0.4 and not shown["warning"]
    assert shown["applied_s"] == pytest.approx(delay, abs=1e-4)  # what was done to the audio (0.1 ms resolution)
    assert _message_ms(shown["message"], "lip-sync offset") == pytest.approx(100, abs=10)
    assert _message_ms(shown["message"], "manual offset") == 20 and _message_ms(shown["message"], "audio delayed by") \
        == pytest.approx(delay * 1000, abs=0.1)

    # the frames-file path: audio from the handle, face found by dlib on the first frame, same measurement
    frames = _frames_file(comfy_env, clip, 25.0, audio)
    store = frames.store
    preview, handle, from_file, offset2, _ = node.calibrate(mode="auto", frames=frames)["result"]
    assert preview.shape[0] == 1 and handle.store is store and handle.audio is from_file
    assert offset2 == pytest.approx(offset, abs=0.003)
    assert audio_delay_s(from_file, audio) == pytest.approx(0.1, abs=0.01)  # mode auto: the measurement alone

    # manual: nothing measured, only the given shift (negative cuts the start)
    _, _, manual, offset3, confidence3 = node.calibrate(mode="manual", lip_sync_offset=-0.05, images=images,
                                                       audio=audio)["result"]
    assert (offset3, confidence3) == (0.0, 0.0)
    assert audio_delay_s(manual, audio) == pytest.approx(-0.05, abs=1 / speech.sample_rate)

    # a picture whose mouth never moves: low confidence, the audio is left alone and a warning says why
    still = torch.from_numpy(espeak.render(np.zeros(4), len(clip), 25.0, seed=4)).float() / 255
    with caplog.at_level("WARNING", logger="sonic"):
        low_out = node.calibrate(mode="auto", images=still, audio=audio, face_box=box)
    _, _, untouched, _, low = low_out["result"]
    assert low < 0.4 and torch.equal(untouched["waveform"], audio["waveform"])
    assert low_out["ui"]["lipsync"][0]["warning"] and "NOT corrected" in low_out["ui"]["lipsync"][0]["message"]
    assert "NOT corrected" in caplog.text

    with pytest.raises(ValueError, match="connect images or frames"):
        node.calibrate(audio=audio)
    with pytest.raises(ValueError, match="connect the audio"):
        node.calibrate(images=images)


def _shake(frames_u8) -> float:
    """Mean absolute change between consecutive frames on the upper face (eyes, nose: no mouth), grey levels.
    Measured without registration, so it does not share the smoothing's own motion estimate."""
    import numpy as np

    region = frames_u8[:, 60:115, 80:180].astype(np.float32)
    return float(np.abs(np.diff(region, axis=0)).mean())


def test_smoothing_through_a_frames_file_keeps_fps_and_lip_sync(comfy_env, espeak):
    """A jittered 12.5 fps talking clip (interpolation off) in a frames file through Smooth Motion (smoothing on)
    then Lip-Sync Calibrate: the jitter is removed, the frames file keeps 12.5 fps, the lip-sync is measured at
    12.5 fps; the IMAGE path gives the same frames and the same measurement."""
    import numpy as np

    speech = espeak.synthesize(espeak.SENTENCES[0])
    clip = espeak.talking_clip(speech, 12.5, 0.16, jitter_px=1.5)  # the picture is 160 ms late and shakes
    steady = espeak.talking_clip(speech, 12.5, 0.16)  # the same frames without the shake
    audio = {"waveform": torch.from_numpy(speech.samples)[None, None], "sample_rate": speech.sample_rate}
    box = ",".join(str(v) for v in espeak.FACE_BOX)
    frames = _frames_file(comfy_env, clip, 12.5, audio)
    store = frames.store
    smooth = _node(comfy_env, "SonicSmoothMotion")
    preview, handle = smooth.smooth(alpha=0.2, region="face without mouth", frames=frames, face_box=box)
    assert preview.shape[0] == 1 and handle.fps == 12.5 and len(handle.store) == len(clip)
    assert handle.store.path != store.path and handle.audio is audio
    smoothed = handle.store.uint8()
    assert _shake(clip) > 8 * _shake(steady)  # the shake is there to remove (about 20 against 2 grey levels)
    assert _shake(smoothed) < 1.5 * _shake(steady)  # and it is gone
    # the IMAGE path: the same frames
    images, none = smooth.smooth(alpha=0.2, region="face without mouth", images=torch.from_numpy(clip).float() / 255,
                                 face_box=box)
    assert none is None
    np.testing.assert_array_equal((images.numpy() * 255).round().astype(np.uint8), smoothed)

    calibrate = _node(comfy_env, "SonicLipSyncCalibrate")
    # the frames file brings its own fps: the fps input (the 25 of an interpolated video) is not used
    from_file = calibrate.calibrate(mode="auto", fps=25.0, frames=handle, face_box=box)["result"]
    from_images = calibrate.calibrate(mode="auto", fps=12.5, images=images, audio=audio, face_box=box)["result"]
    assert from_file[1].fps == 12.5
    assert from_file[3] == pytest.approx(0.16, abs=0.02) and from_file[4] > 0.4
    assert from_images[3:] == pytest.approx(from_file[3:], abs=1e-6)
