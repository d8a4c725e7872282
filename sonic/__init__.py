"""Sonic Portrait engine: one portrait + one speech recording -> a talking-head video.

Plain PyTorch / diffusers / transformers; nothing here imports ComfyUI. Heavy modules load on first use::

    from sonic import load_models, prepare, sample, decode, PrepareOptions, SampleOptions
"""

from .params import DEFAULT_SEED, PrepareOptions, SampleOptions

__all__ = ["DEFAULT_SEED", "PrepareOptions", "SampleOptions", "load_models", "prepare", "sample", "decode"]


def __getattr__(name: str):
    if name == "load_models":
        from .engine.loader import load_models

        return load_models
    if name in ("prepare", "sample", "decode"):
        from .engine import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'sonic' has no attribute {name!r}")
