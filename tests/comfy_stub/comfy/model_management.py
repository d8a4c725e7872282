"""Stand-in for comfy.model_management on a CPU-only ComfyUI (--cpu)."""

import torch

interrupt_processing = False
LOADED = []  # every load_models_gpu call, for tests


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
    LOADED.append([type(getattr(m.model, "inner", m.model)).__name__ for m in models])
    for m in models:
        m.model.to(m.load_device)
        m.model.device = m.load_device  # as comfy.model_patcher.ModelPatcher.load does
