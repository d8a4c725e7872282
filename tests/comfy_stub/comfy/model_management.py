"""Stand-in for comfy.model_management on a CPU-only ComfyUI (--cpu)."""

import torch

import enum

interrupt_processing = False
LOADED = []  # every load_models_gpu call, for tests
REQUESTS = []  # (module names, memory_required) of every load_models_gpu call, for tests
FREE_MEMORY = None  # what get_free_memory reports (a test sets it to play a GPU of some size)
TOTAL_MEMORY = None  # what get_total_memory reports
FREED = []  # memory_required of every free_memory call
# Memory pressure: None (room for everything), "smallest" or "all": at every load (and free_memory), the smallest
# loaded model outside the request, or every one, is unloaded first, as ComfyUI's free_memory does on a short card
EVICT = None
current_loaded_models = []  # the patchers on their load device, the latest load first


def reset_records():
    """Forget every recorded call and a pending Cancel (run before each test, so no test reads another's)."""
    global interrupt_processing, EVICT
    interrupt_processing = False
    EVICT = None
    while current_loaded_models:
        _unload(current_loaded_models[0])
    LOADED.clear()
    REQUESTS.clear()
    FREED.clear()


class VRAMState(enum.Enum):
    DISABLED = 0
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5


vram_state = VRAMState.NORMAL_VRAM


def get_free_memory(dev=None, torch_free_too=False):
    return FREE_MEMORY if FREE_MEMORY is not None else 2**40


def get_total_memory(dev=None, torch_total_too=False):
    return TOTAL_MEMORY if TOTAL_MEMORY is not None else 2**40


def minimum_inference_memory():
    return int(1024**3 * 0.8) + 400 * 1024**2


def _size(patcher):
    return sum(t.nbytes for t in [*patcher.model.parameters(), *patcher.model.buffers()])


def _unload(patcher):
    patcher.model.to(patcher.offload_device)
    patcher.model.device = patcher.offload_device
    current_loaded_models.remove(patcher)


def _evict(keep):
    others = sorted((m for m in current_loaded_models if not any(m is k for k in keep)), key=_size)
    for m in others[: {None: 0, "smallest": 1, "all": len(others)}[EVICT]]:
        _unload(m)


def free_memory(memory_required, device, keep_loaded=[]):
    FREED.append(memory_required)
    _evict(keep_loaded)


class InterruptProcessingException(Exception):
    pass


def interrupt_current_processing(value=True):
    global interrupt_processing
    interrupt_processing = value


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise InterruptProcessingException()


def get_torch_device():
    return torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def should_use_fp16(device=None, *args, **kwargs):
    return False


def should_use_bf16(device=None, *args, **kwargs):
    return False


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    names = [type(getattr(m.model, "inner", m.model)).__name__ for m in models]
    LOADED.append(names)
    REQUESTS.append((names, memory_required))
    _evict(models)
    for m in models:
        m.model.to(m.load_device)
        m.model.device = m.load_device  # as comfy.model_patcher.ModelPatcher.load does
        if not any(m is x for x in current_loaded_models):
            current_loaded_models.insert(0, m)


def load_model_gpu(model):
    return load_models_gpu([model])
