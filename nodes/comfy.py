"""The one place that talks to ComfyUI's own modules (imported lazily, so the pack imports in milliseconds).

Everything ComfyUI-specific the nodes need: folders, progress bars, cancel, devices and model management.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "example_inputs"

SONIC_FOLDER = "sonic"


def folder_paths():
    import folder_paths as fp  # ComfyUI's module (top-level name in ComfyUI's process)

    return fp


def register_model_folder() -> None:
    """`models/sonic` as a model folder, merged with any `sonic:` paths from extra_model_paths.yaml."""
    try:
        fp = folder_paths()
    except ImportError:  # not running inside ComfyUI (tests, plain Python)
        return
    default = os.path.join(fp.models_dir, SONIC_FOLDER)
    if SONIC_FOLDER in fp.folder_names_and_paths:
        fp.add_model_folder_path(SONIC_FOLDER, default)  # keep the user's paths first
    else:
        fp.folder_names_and_paths[SONIC_FOLDER] = ([default], set(fp.supported_pt_extensions))


def register_routes(model_report) -> None:
    """`GET /sonic/models?unet=&interpolation=&svd_weights=`: which model files this ComfyUI has and lacks, so
    that a fleet worker takes no job its ComfyUI cannot run (the loader's choice list names the standard UNet
    even when it is absent). Names are relative to models/sonic; nothing else about the machine is told."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:  # not running inside ComfyUI
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return

    @instance.routes.get("/sonic/models")
    async def sonic_models(request):
        def flag(name: str) -> bool:
            return request.query.get(name, "true").lower() not in ("false", "0", "no")

        return web.json_response(model_report(request.query.get("unet") or None, flag("interpolation"),
                                              flag("svd_weights")))


def install_examples() -> None:
    """Copy the pack's example portrait and speech into ComfyUI's input folder (never over a file already there),
    so that the templates, which preselect them, run as is on a fresh install."""
    try:
        fp = folder_paths()
    except ImportError:
        return
    target = Path(fp.get_input_directory())
    try:
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted(EXAMPLES.glob("sonic_example_*")):
            if (target / source.name).exists():
                continue
            partial = target / f".{source.name}.{os.getpid()}.partial"
            try:
                shutil.copyfile(source, partial)
                os.replace(partial, target / source.name)
            finally:
                partial.unlink(missing_ok=True)
    except OSError as exc:  # a read-only input folder must not stop the pack from loading
        logging.getLogger(__name__).warning("Sonic: could not copy the example inputs into %s: %s", target, exc)


def model_management():
    import comfy.model_management as mm

    return mm


def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel (never swallow it)."""
    model_management().throw_exception_if_processing_interrupted()


def progress_bar(total: int):
    import comfy.utils

    return comfy.utils.ProgressBar(total)


def watched(chunks, bar=None):
    """Pass frame chunks through, honouring Cancel before each and advancing `bar` by each chunk's frames."""
    for chunk in chunks:
        check_interrupt()
        yield chunk
        if bar is not None:
            bar.update(chunk.shape[0])


@functools.lru_cache(maxsize=None)
def _whole_module_patcher(base: type) -> type:
    """`base` (ComfyUI's ModelPatcher) for plain torch modules, which run only with all their weights on one device.

    ComfyUI's partial loads and unloads work per layer through its own ops (`comfy.ops`, layers with
    `comfy_cast_weights`) that copy an offloaded weight to the GPU as the layer runs; our diffusers, transformers
    and RIFE layers have no such casting. Left to ComfyUI, a patcher of such a module (0.8.0 and 0.18.2 alike)
    - under --novram loads nothing (`load_models_gpu` asks for a 0.1-byte partial load whatever
      force_full_load says) and the stage runs on CPU weights with GPU inputs;
    - when another model needs room, `free_memory` unloads it partially (`LoadedModel.model_unload` ->
      `partially_unload` moves whole layers to the offload device) and keeps it listed as loaded: the next module
      of ours that runs before a new request has its layers split between two devices.
    So this patcher loads whole (a partial load request becomes a full one) and frees nothing partially (ComfyUI
    then unloads the whole model: `model_unload` falls back to `detach`)."""

    class WholeModulePatcher(base):
        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
            return super().partially_load(device_to, 1e32, force_patch_weights=force_patch_weights)

        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
            return 0

    WholeModulePatcher.__qualname__ = WholeModulePatcher.__name__ = "SonicWholeModulePatcher"
    return WholeModulePatcher


def model_patcher(module, load_device, offload_device):
    """A ModelPatcher for one of our modules. It is wrapped in a plain container because the patcher assigns
    `model.device`, which diffusers and transformers models expose as a read-only property.

    Deliberately ComfyUI's classic `ModelPatcher`, never `comfy.model_patcher.CoreModelPatcher`, which ComfyUI
    0.18+ turns into `ModelPatcherDynamic` under dynamic VRAM (NVIDIA with comfy-aimdo; main.py rebinds only that
    name, so `ModelPatcher` stays the classic class there). The dynamic patcher streams weights through comfy.ops
    layers as they run; a plain module it only force-loads, weight by weight as new Parameter objects, and the
    parameters of a module that also has children it moves without a backup, so they never return to the offload
    device. Classic and dynamic patchers load side by side: `load_models_gpu` evicts dynamic models like any other
    when a request holds a classic one."""
    import comfy.model_patcher
    import torch

    holder = torch.nn.Module()
    holder.inner = module
    patcher_class = _whole_module_patcher(comfy.model_patcher.ModelPatcher)
    return patcher_class(holder, load_device=load_device, offload_device=offload_device)


def load_to_gpu(patchers: list, memory_required: int = 0) -> None:
    """Load our modules onto the compute device, evicting other models as needed. One call names every module a
    stage runs (ComfyUI evicts the smallest models first when short of memory, so a module loaded by an earlier
    call may be gone by the time it runs)."""
    patchers = list(dict.fromkeys(p for p in patchers if p is not None))  # once each, in order
    if patchers:
        model_management().load_models_gpu(patchers, memory_required=memory_required, force_full_load=True)


def free_memory(device) -> int:
    """Bytes ComfyUI says are free on `device` (RAM when it computes on the CPU)."""
    return int(model_management().get_free_memory(device))


def usable_memory(device) -> int:
    """Bytes a stage could have on `device` once ComfyUI evicted every other model: the total less its reserve."""
    mm = model_management()
    return int(mm.get_total_memory(device)) - int(mm.minimum_inference_memory())


def make_room(memory_required: int, device) -> None:
    """Have ComfyUI evict models from `device` until `memory_required` bytes are free (for work on modules it does
    not load itself, such as the streamed UNet)."""
    model_management().free_memory(memory_required, device)


def _setting(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def unet_streaming_forced() -> bool:
    """ComfyUI started with --novram, or SONIC_STREAM_UNET=1 (the pack's own setting)."""
    state = getattr(model_management(), "vram_state", None)
    return _setting("SONIC_STREAM_UNET") or (state is not None and getattr(state, "name", "") == "NO_VRAM")


def low_vram_forced() -> bool:
    """ComfyUI started with --lowvram / --novram, or SONIC_LOW_VRAM=1 (the pack's own setting)."""
    if _setting("SONIC_LOW_VRAM"):
        return True
    mm = model_management()
    state = getattr(mm, "vram_state", None)
    return state is not None and getattr(state, "name", "") in ("LOW_VRAM", "NO_VRAM")


def devices():
    """(compute device, offload device, intermediate device) as ComfyUI configures them."""
    mm = model_management()
    return mm.get_torch_device(), mm.unet_offload_device(), mm.intermediate_device()


def inside(path: str | os.PathLike, roots: list[str]) -> bool:
    resolved = Path(path).resolve()
    return any(resolved == Path(r).resolve() or Path(r).resolve() in resolved.parents for r in roots)


def user_file(name: str) -> Path:
    """Resolve a file name from a widget: an input-folder name (with ComfyUI's `[input]`/`[output]`
    annotations) or a path inside ComfyUI's input, output or temp folders. Nothing outside them."""
    fp = folder_paths()
    roots = [fp.get_input_directory(), fp.get_output_directory(), fp.get_temp_directory()]
    candidate = Path(name) if os.path.isabs(name) else Path(fp.get_annotated_filepath(name))
    if not inside(candidate, roots):
        raise ValueError(f"{name!r} is outside ComfyUI's input/output folders; put the file in the input folder")
    if not candidate.is_file():
        raise FileNotFoundError(f"file {name!r} not found in ComfyUI's input folder; upload it first")
    return candidate


NO_CORE_VIDEO = ("Sonic Video Encode: this ComfyUI has no core VIDEO type (comfy_api's VideoFromFile, which ComfyUI "
                 "0.8.0 and 0.18.2 have), so the video output is empty (None). The MP4 is written as usual: use the "
                 "path output, or update ComfyUI to feed its Save Video / Preview Video")


def core_video(path: str):
    """ComfyUI's core VIDEO value of the MP4 at `path` (what its own Load Video gives: comfy_api's VideoFromFile),
    or None, with a warning, where this ComfyUI has none. (ComfyUI's modules are imported here only when the node
    runs, so the pack loads anywhere.)"""
    try:
        from comfy_api.latest import InputImpl

        video_from_file = InputImpl.VideoFromFile
    except (ImportError, AttributeError):
        try:
            from comfy_api.input_impl import VideoFromFile as video_from_file
        except ImportError:
            logging.getLogger("sonic").warning(NO_CORE_VIDEO)
            return None
    return video_from_file(path)
