"""The one place that talks to ComfyUI's own modules (imported lazily, so the pack imports in milliseconds).

Everything ComfyUI-specific the nodes need: folders, progress bars, cancel, devices and model management.
"""

from __future__ import annotations

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


def model_patcher(module, load_device, offload_device):
    """A ModelPatcher for one of our modules. It is wrapped in a plain container because the patcher assigns
    `model.device`, which diffusers and transformers models expose as a read-only property."""
    import comfy.model_patcher
    import torch

    holder = torch.nn.Module()
    holder.inner = module
    return comfy.model_patcher.ModelPatcher(holder, load_device=load_device, offload_device=offload_device)


def load_to_gpu(patchers: list, memory_required: int = 0) -> None:
    """Load our modules onto the compute device, evicting other models as needed (one call per stage)."""
    patchers = [p for p in patchers if p is not None]
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
