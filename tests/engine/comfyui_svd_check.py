"""Run by tests/engine/test_comfyui_svd.py inside a real ComfyUI, 0.8.0 or 0.18.2 (cwd = its folder): ComfyUI's
own SVD VAE (`comfy.sd.VAE`, temporal decoder) and CLIP-H vision model (`comfy.clip_vision`) against the diffusers /
transformers networks the pack loads itself, with the same random weights at the released sizes.

    python tests/engine/comfyui_svd_check.py PACK_DIR SVD_CONFIG_DIR   (prints one JSON line)

ComfyUI builds both from fixed configs, recognised by their state-dict keys, so the networks must be full size.
The VAE is made with diffusers and its weights renamed to the layout ComfyUI reads (the one of svd_xt.safetensors);
CLIP-H uses transformers' names in both. ComfyUI keeps CLIP vision weights in float16 on a CPU, so the random
weights are made float16-exact first: then both sides compute with the same numbers.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch


def load_pack(pack_dir: Path):
    """The pack as ComfyUI imports it: a package named after its folder."""
    spec = importlib.util.spec_from_file_location("sonic_pack_under_test", pack_dir / "__init__.py",
                                                  submodule_search_locations=[str(pack_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_RESNET = [(r"spatial_res_block\.", ""), (r"temporal_res_block\.norm1", "time_stack.in_layers.0"),
           (r"temporal_res_block\.conv1", "time_stack.in_layers.2"),
           (r"temporal_res_block\.norm2", "time_stack.out_layers.0"),
           (r"temporal_res_block\.conv2", "time_stack.out_layers.3"), (r"time_mixer\.mix_factor", "mix_factor"),
           (r"conv_shortcut", "nin_shortcut")]


def diffusers_svd_vae_to_comfy(state: dict, num_up_blocks: int = 4) -> dict:
    """diffusers' AutoencoderKLTemporalDecoder names -> the SGM names of svd_xt.safetensors' VAE."""
    out = {}
    for key, value in state.items():
        if key.startswith("quant_conv."):
            continue  # the SGM model has none; identity in the diffusers copy (see below)
        k = key
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"decoder.up.{num_up_blocks - 1 - int(m[1])}.block.{m[2]}.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{num_up_blocks - 1 - int(m[1])}.upsample.", k)
        k = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", k)
        k = re.sub(r"\.mid_block\.attentions\.0\.", ".mid.attn_1.", k)
        for name, new in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            k = k.replace(f"attn_1.{name}.", f"attn_1.{new}.")
        for pattern, new in _RESNET:
            k = re.sub(pattern, new, k)
        k = re.sub(r"\.conv_norm_out\.", ".norm_out.", k)
        k = k.replace("decoder.time_conv_out.", "decoder.conv_out.time_mix_conv.")
        if ".attn_1." in k and k.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]  # linear -> 1x1 convolution
        out[k] = value
    return out


def random_vae(config_dir: Path):
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder.from_config(json.loads((config_dir / "vae" / "config.json").read_text()))
    with torch.no_grad():
        weight = vae.quant_conv.weight
        weight.copy_(torch.eye(weight.shape[0])[:, :, None, None])
        vae.quant_conv.bias.zero_()
        for name, p in vae.named_parameters():
            if name.endswith("mix_factor"):
                p.normal_(0, 1)  # a temporal mix that matters (the released blend is learned, not 0)
    return vae.eval()


def random_clip_h():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                              patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
            p.copy_(p.half().float())  # float16-exact: ComfyUI stores CLIP vision in float16 on a CPU
        for name, buffer in model.named_buffers():
            if "position_ids" in name:
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    return model.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    pack_dir, svd_config = Path(sys.argv[1]), Path(sys.argv[2])
    sys.path.insert(0, ".")  # ComfyUI's own modules
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.clip_vision
    import comfy.sd

    pack = load_pack(pack_dir)
    from skimage import data
    from PIL import Image

    encoders = importlib.import_module("sonic_pack_under_test.sonic.engine.encoders")
    image_lib = importlib.import_module("sonic_pack_under_test.sonic.inputs.image")
    model_nodes = importlib.import_module("sonic_pack_under_test.nodes.model")
    assert pack.NODE_CLASS_MAPPINGS["SonicModelLoader"] is model_nodes.SonicModelLoader

    portrait = image_lib.prepare_portrait(Image.fromarray(data.astronaut()), (170, 40, 150, 180), 128)
    report = {"size": list(portrait.ref_image.shape[1:])}

    vae = random_vae(svd_config)
    comfy_state = diffusers_svd_vae_to_comfy(vae.state_dict())
    comfy_vae = comfy.sd.VAE(sd=dict(comfy_state))
    loaded = comfy_vae.first_stage_model.state_dict()
    report["vae_keys_missing"] = sorted(set(loaded) - set(comfy_state))
    report["vae_keys_unused"] = sorted(set(comfy_state) - set(loaded))
    report["vae_dtype"] = str(comfy_vae.vae_dtype)
    ours, theirs = encoders.DiffusersVAE(vae), model_nodes.ComfyVAE(comfy_vae)
    with torch.no_grad():
        latents = ours.encode_mean(portrait.ref_image[None])
        report["vae_encode_rel"] = rel(theirs.encode_mean(portrait.ref_image[None]), latents)
        # three frames of one temporal chunk, different enough for the temporal layers to mix them
        z = latents.expand(3, -1, -1, -1) + 0.5 * torch.randn(3, *latents.shape[1:], generator=torch.Generator().manual_seed(2))
        native, comfy_frames = ours.decode(z), theirs.decode(z)
        report["vae_decode_rel"] = rel(comfy_frames, native)
        report["vae_decode_shape"] = list(comfy_frames.shape)
        report["vae_decode_frame_spread"] = float((native[0] - native[1]).abs().mean())
        alone = ours.decode(z[:1])
        report["vae_decode_temporal_effect"] = float((alone[0] - native[0]).abs().max())
        # a card with room for two frames by ComfyUI's estimate: its VAE.decode splits the chunk 2 + 1
        import comfy.model_management

        per_frame = comfy_vae.memory_used_decode(z.shape, comfy_vae.vae_dtype)
        free = comfy.model_management.get_free_memory
        comfy.model_management.get_free_memory = lambda *args, **kwargs: 2.5 * per_frame
        try:
            split = comfy_vae.decode(z).movedim(-1, 1)
            whole = theirs.decode(z)
        finally:
            comfy.model_management.get_free_memory = free
        report["short_card_comfy_decode_rel"] = rel(split, native)
        report["short_card_sonic_decode_rel"] = rel(whole, native)

    clip = random_clip_h()
    comfy_clip = comfy.clip_vision.load_clipvision_from_sd(dict(clip.state_dict()))
    report["clip_config"] = type(comfy_clip).__name__ if comfy_clip is not None else None
    report["clip_dtype"] = str(comfy_clip.dtype)
    with torch.no_grad():
        embeds = encoders.TransformersImageEncoder(clip).embed(portrait.clip_image[None])
        comfy_embeds = model_nodes.ComfyImageEncoder(comfy_clip).embed(portrait.clip_image[None])
    report["clip_embeds_rel"] = rel(comfy_embeds, embeds)
    report["clip_embeds_shape"] = list(comfy_embeds.shape)
    report["clip_embeds_norm"] = float(embeds.norm())
    other = portrait.clip_image.flip(-1)
    with torch.no_grad():
        report["clip_other_image_rel"] = rel(encoders.TransformersImageEncoder(clip).embed(other[None]), embeds)
    print(json.dumps(report))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
