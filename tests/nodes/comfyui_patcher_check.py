"""Run by tests/nodes/test_model_management.py inside a real ComfyUI (cwd = its folder, --cpu): the pack's patchers
of plain torch modules (nodes/comfy.py, model_patcher) beside ComfyUI's own ModelPatcher of the same modules,
through ComfyUI's model management.

    python tests/nodes/comfyui_patcher_check.py PACK_DIR [--dynamic]   (prints one JSON line)

The 'GPU' is torch.device("cpu", 0): ComfyUI compares devices with ==, so it is a device of its own to
load_models_gpu and free_memory (cpu != cpu:0), whose free memory this script reports (a fixed capacity less what
is loaded on it). --dynamic switches on ComfyUI 0.18's dynamic VRAM the way its main.py does on NVIDIA once
comfy-aimdo initialises (CoreModelPatcher := ModelPatcherDynamic, aimdo_enabled); the dynamic patcher itself needs
a CUDA device and falls back to the classic one on a CPU device, so only the choice of class is checked there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

GPU, CPU = torch.device("cpu", 0), torch.device("cpu")
LAYERS, WIDTH = 8, 128


def net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = []
    for _ in range(LAYERS):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def main() -> None:
    pack_dir, dynamic = Path(sys.argv[1]), "--dynamic" in sys.argv[2:]
    sys.path.insert(0, os.getcwd())
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    import comfy.model_patcher as mp

    report = {}
    if dynamic:
        import comfy.memory_management

        mp.CoreModelPatcher = mp.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    spec = importlib.util.spec_from_file_location("sonic_nodes_comfy", pack_dir / "nodes" / "comfy.py")
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)  # the pack's ComfyUI adapter imports nothing of the pack

    def comfy_patcher(module):
        holder = torch.nn.Module()
        holder.inner = module
        return mp.ModelPatcher(holder, load_device=GPU, offload_device=CPU)

    def pack_patcher(module):
        return pack.model_patcher(module, GPU, CPU)

    size = comfy_patcher(net(0)).model_size()
    report["size"] = size
    if dynamic:
        patcher = pack_patcher(net(0))
        report["dynamic"] = {"core_patcher": mp.CoreModelPatcher.__name__,
                             "aimdo_enabled": comfy.memory_management.aimdo_enabled,
                             "pack_patcher_is_dynamic": patcher.is_dynamic(),
                             "pack_patcher_bases": [c.__name__ for c in type(patcher).__mro__]}

    # --novram: load_models_gpu gives every model `lowvram_model_memory = 0.1`, whatever force_full_load says
    report["novram"] = {}
    for name, make in (("comfyui_patcher", comfy_patcher), ("pack_patcher", pack_patcher)):
        patcher = make(net(0))
        mm.LoadedModel(patcher).model_load(0.1)
        report["novram"][name] = {"loaded": int(patcher.loaded_size()), "size": int(patcher.model_size())}
        patcher.detach()

    # memory pressure: room for two of the three models beside ComfyUI's inference reserve
    original = mm.get_free_memory
    capacity = int(mm.minimum_inference_memory() + 2.5 * size)

    def free_memory(dev=None, torch_free_too=False):
        if dev != GPU:
            return original(dev, torch_free_too)
        free = capacity - sum(m.model.loaded_size() for m in mm.current_loaded_models if m.device == GPU)
        return (free, free) if torch_free_too else free

    mm.get_free_memory = free_memory

    def listed(patcher) -> bool:
        return any(m.model is patcher for m in mm.current_loaded_models)

    def patched(patcher) -> list:
        return [getattr(layer, "comfy_patched_weights", False) for layer in patcher.model.modules()
                if isinstance(layer, torch.nn.Linear)]

    report["pressure"] = {}
    for name, make in (("comfyui_patcher", comfy_patcher), ("pack_patcher", pack_patcher)):
        patchers = [make(net(seed)) for seed in (1, 2, 3)]
        for patcher in patchers:
            mm.load_models_gpu([patcher], force_full_load=True)
        hit = [p for p in patchers[:2] if not listed(p) or p.loaded_size() < size]
        assert len(hit) == 1, f"{name}: {len(hit)} models unloaded, expected one"
        evicted, kept = hit[0], [p for p in patchers if p is not hit[0]]
        flags = patched(evicted)
        result = {"evicted_listed": listed(evicted), "evicted_loaded": int(evicted.loaded_size()),
                  "evicted_split": any(flags) and not all(flags),
                  "evicted_on_offload_device": evicted.model.device == CPU and not any(flags),
                  "others_loaded": [int(p.loaded_size()) for p in kept]}
        mm.load_models_gpu([evicted], force_full_load=True)  # its stage asks for it again
        flags = patched(evicted)
        result.update(reloaded=int(evicted.loaded_size()), reloaded_split=any(flags) and not all(flags))
        report["pressure"][name] = result
        mm.free_memory(1e30, GPU)  # unload everything before the next kind
        assert not mm.current_loaded_models
    print(json.dumps(report))


if __name__ == "__main__":
    main()
