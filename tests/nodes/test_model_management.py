"""The pack under ComfyUI's model management: every module a stage runs is loaded when it runs, however ComfyUI
evicts, and the pack's patchers of plain torch modules load and unload whole in a real ComfyUI (0.8.0 and 0.18.2,
the latter with its dynamic-VRAM patcher switched on as its main.py does on NVIDIA).

The stages run through the ComfyUI stand-in (tests/comfy_stub), whose model manager can evict under memory
pressure: at every load the smallest loaded model outside the request (or every one) is unloaded first, as
ComfyUI's free_memory does on a short card. There everything computes on the CPU, so "loaded" is the manager's
record (`current_loaded_models`), read by forward pre-hooks on every layer of every patcher's model.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from comfy_harness import reset_stub_records


@pytest.fixture(autouse=True)
def _fresh_stub_records():
    reset_stub_records()
    yield
    reset_stub_records()


class _AutoencodingEngine(torch.nn.Module):
    """ComfyUI's SVD VAE network (`first_stage_model`) as far as the pack calls it, around the tiny diffusers VAE."""

    def __init__(self, diffusers_vae):
        super().__init__()
        self.net = diffusers_vae

    def encode(self, x):
        return self.net.encode(x).latent_dist.mode()

    def decode(self, z):
        return self.net.decode(z, num_frames=z.shape[0]).sample


class _ComfyVAE:
    """A comfy.sd.VAE as the pack uses it. Like ComfyUI's, `encode` loads its own patcher alone first (the numbers
    through ComfyUI's real VAE are checked in tests/engine/test_comfyui_svd.py)."""

    upscale_ratio = 8
    vae_dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, diffusers_vae):
        import comfy.model_patcher

        self.first_stage_model = _AutoencodingEngine(diffusers_vae)
        self.patcher = comfy.model_patcher.ModelPatcher(self.first_stage_model, self.device, torch.device("cpu"))

    def encode(self, pixels):
        import comfy.model_management as mm

        mm.load_models_gpu([self.patcher], memory_required=1)
        return self.first_stage_model.encode(pixels.movedim(-1, 1) * 2 - 1)

    def process_output(self, image):
        return ((image + 1) / 2).clamp(0, 1)


class _CLIPVisionModelProjection(torch.nn.Module):
    def __init__(self, transformers_model):
        super().__init__()
        self.net = transformers_model


class _ComfyClipVision:
    """A comfy.clip_vision.ClipVisionModel as the pack uses it: `encode_image` loads its own patcher alone first."""

    def __init__(self, transformers_model):
        import comfy.model_patcher

        self.model = _CLIPVisionModelProjection(transformers_model)
        self.patcher = comfy.model_patcher.ModelPatcher(self.model, torch.device("cpu"), torch.device("cpu"))

    def encode_image(self, image):
        import comfy.model_management as mm

        mm.load_model_gpu(self.patcher)
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
        return {"image_embeds": self.model.net(pixel_values=(image.movedim(-1, 1) - mean) / std).image_embeds}


class _Watch:
    """Forward pre-hooks on every layer with weights of each patcher's model: which stage modules ran, and which
    ran while the manager did not hold their patcher loaded."""

    def __init__(self, patchers: dict):
        import comfy.model_management as mm

        self.ran, self.unloaded, self.handles = set(), [], []
        for name, patcher in patchers.items():
            for layer in patcher.model.modules():
                if next(layer.parameters(recurse=False), None) is not None:
                    self.handles.append(layer.register_forward_pre_hook(self._hook(mm, name, patcher)))

    def _hook(self, mm, name, patcher):
        def check(layer, args):
            self.ran.add(name)
            if not any(patcher is m for m in mm.current_loaded_models):
                self.unloaded.append((name, type(layer).__name__))

        return check

    def close(self):
        for handle in self.handles:
            handle.remove()


def _stages(comfy_env, sonic):
    """PreData and the sampler (2 steps, RIFE on) on 0.5 s of the reference speech."""
    nodes = comfy_env["mappings"]
    image, _ = nodes["SonicLoadImage"]().load("portrait.png")
    audio = nodes["SonicLoadAudio"]().load("speech.wav")[0]
    predata = nodes["SonicPreData"]().prepare(sonic, image, audio, min_resolution=128, duration=0.5,
                                              face_box="37,37,76,76")[0]
    return nodes["SonicSampler"]().sample(sonic, predata, seed=3, steps=2)


@pytest.mark.parametrize("svd, eviction", [("comfyui", "smallest"), ("comfyui", "all"), ("folder", "all")])
def test_every_module_a_stage_runs_is_loaded_when_it_runs(comfy_env, svd, eviction):
    """ComfyUI evicts the smallest models first: a stage that loaded its modules in several requests (ComfyUI's
    VAE per decode chunk after RIFE, its CLIP vision and VAE inside PreData after Whisper and the audio MLPs) ran
    some of them after they were pushed out, i.e. on the offload device beside inputs on the GPU. 'all' (only the
    request stays loaded) is the strictest pressure; the folder's own VAE and CLIP load with the stage."""
    import comfy.model_management as mm

    loader = comfy_env["mappings"]["SonicModelLoader"]()
    sonic = loader.load("Sonic/unet.pth", dtype="fp32")[0]
    patchers = {"audio": sonic.audio_patcher, "unet": sonic.unet_patcher, "rife": sonic.rife_patcher}
    if svd == "comfyui":  # SVD's VAE and CLIP from ComfyUI's loaders, with their own patchers
        vae, clip = _ComfyVAE(sonic.models.vae.model), _ComfyClipVision(sonic.models.image_encoder.model)
        sonic = loader.load("Sonic/unet.pth", dtype="fp32", vae=vae, clip_vision=clip)[0]
        patchers = {"audio": sonic.audio_patcher, "unet": sonic.unet_patcher, "rife": sonic.rife_patcher,
                    "vae": vae.patcher, "clip": clip.patcher}
    else:
        patchers.update(vae=sonic.image_patchers[0], clip=sonic.image_patchers[1])
    mm.EVICT = eviction
    watch = _Watch(patchers)
    try:
        images, _audio, fps, _frames = _stages(comfy_env, sonic)
    finally:
        watch.close()
    assert fps == 25.0 and images.shape[0] == 11  # RIFE ran (6 generated frames -> 11)
    assert watch.ran == {"audio", "clip", "vae", "unet", "rife"}
    assert watch.unloaded == []
    if svd == "comfyui":  # decoding asks for ComfyUI's VAE with RIFE, in the stage's request and the chunk's
        names = [names for names, _ in mm.REQUESTS]
        decode = names.index(["_AutoencodingEngine", "IFNet"])
        assert names[decode:] == [["_AutoencodingEngine", "IFNet"]] * 2
        assert ["_CLIPVisionModelProjection"] in names[:decode]  # CLIP only where PreData embeds the portrait


# -- the pack's patchers in a real ComfyUI (a child process: this one holds the tests' `comfy` stand-in) --------

CHECK = Path(__file__).with_name("comfyui_patcher_check.py")
ROOT = Path(__file__).resolve().parents[2]


def _check(version: str, dynamic: bool = False) -> dict:
    from servers import comfyui_dir, comfyui_python

    folder, python = comfyui_dir(version), comfyui_python(version)
    args = [python, str(CHECK), str(ROOT)] + (["--dynamic"] if dynamic else [])
    result = subprocess.run(args, cwd=folder, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=["0.8.0", "0.18.2"])
def report(request) -> dict:
    return _check(request.param)


def test_novram_loads_the_pack_modules_whole(report):
    """--novram: load_models_gpu asks every patcher for a 0.1-byte partial load. ComfyUI's own patcher of a plain
    module then loads none of it (its layers have no comfy.ops casting); the pack's loads it whole."""
    assert report["novram"]["comfyui_patcher"] == {"loaded": 0, "size": report["size"]}
    assert report["novram"]["pack_patcher"] == {"loaded": report["size"], "size": report["size"]}


def test_memory_pressure_unloads_the_pack_modules_whole(report):
    """A fake 'GPU' (cpu:0, which ComfyUI treats as a device of its own) with room for two of three modules: the
    third load makes ComfyUI's free_memory unload one of the first two. ComfyUI's own patcher of a plain module is left
    half unloaded and still listed as loaded; the pack's is unloaded whole, and loads whole again."""
    plain, pack = report["pressure"]["comfyui_patcher"], report["pressure"]["pack_patcher"]
    assert plain["evicted_listed"] and 0 < plain["evicted_loaded"] < report["size"] and plain["evicted_split"]
    assert pack["evicted_listed"] is False and pack["evicted_loaded"] == 0 and pack["evicted_split"] is False
    assert pack["evicted_on_offload_device"] is True
    assert pack["others_loaded"] == [report["size"], report["size"]]
    assert pack["reloaded"] == report["size"] and pack["reloaded_split"] is False


def test_dynamic_vram_keeps_the_pack_patchers_classic():
    """ComfyUI 0.18.2 with dynamic VRAM switched on as its main.py does on NVIDIA (CoreModelPatcher rebound to
    ModelPatcherDynamic, aimdo_enabled): ComfyUI's own models would get the dynamic patcher, the pack's stay
    classic (see nodes/comfy.py, model_patcher) and still load and unload whole through model management."""
    report = _check("0.18.2", dynamic=True)
    assert report["dynamic"]["core_patcher"] == "ModelPatcherDynamic" and report["dynamic"]["aimdo_enabled"]
    assert report["dynamic"]["pack_patcher_is_dynamic"] is False
    assert report["dynamic"]["pack_patcher_bases"][:2] == ["SonicWholeModulePatcher", "ModelPatcher"]
    pack = report["pressure"]["pack_patcher"]
    assert pack["evicted_listed"] is False and pack["evicted_loaded"] == 0 and pack["evicted_on_offload_device"]
    assert pack["reloaded"] == report["size"] and pack["reloaded_split"] is False
    assert report["novram"]["pack_patcher"]["loaded"] == report["size"]
