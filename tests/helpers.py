"""Small helpers shared by the tests."""

from __future__ import annotations

import numpy as np
import torch


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    actual, reference = actual.float(), reference.float()
    return float((actual - reference).abs().max() / reference.abs().max())


def prepare_reference_inputs(models, tiny_dir, tiny_params: dict):
    """The recorded run's portrait and speech with its face box -> SonicConditioning (with intermediates)."""
    from sonic.params import PrepareOptions
    from sonic.engine.pipeline import prepare

    options = PrepareOptions(min_resolution=tiny_params["min_resolution"], face_box=tuple(tiny_params["face_bbox_xywh"]))
    return prepare(models, tiny_dir / tiny_params["image"], tiny_dir / tiny_params["audio"], options,
                   keep_intermediates=True)


def sine(seconds: float, rate: int, channels: int = 1, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([wave * (1 + 0.1 * c) for c in range(channels)], axis=1)


def workflow_templates() -> dict:
    """workflows/_build.py's TEMPLATES: API name -> spec (its "title" is the UI file's name)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "workflows" / "_build.py"
    spec = importlib.util.spec_from_file_location("workflows_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TEMPLATES


def ui_template_path(name: str):
    """The UI-format template file of an API workflow name (e.g. sonic_quick_512)."""
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "workflows" / f"{workflow_templates()[name]['title']}.json"


class LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of tensor storages that operators create while it is active, and the peak of those
    still alive (a storage is counted once however many views share it; in-place and out= results are not new).
    `mark()` restarts the peak from what is alive now, so `peak - at_mark` is what the code allocated beyond
    that point at its worst."""

    def __init__(self):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._weak_ref = StorageWeakRef
        self._live: dict[int, tuple[object, int]] = {}  # data_ptr -> (weak ref, bytes)
        self.live = self.peak = self.at_mark = 0

    def mark(self) -> None:
        self._collect()
        self.at_mark = self.peak = self.live

    def _collect(self) -> None:
        for ptr, (ref, nbytes) in list(self._live.items()):
            if ref.expired():
                del self._live[ptr]
                self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        self._collect()
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in inputs or ptr in self._live or storage.nbytes() == 0:
                continue
            self._live[ptr] = (self._weak_ref(storage), storage.nbytes())
            self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        return out


def audio_delay_s(shifted: dict, source: dict) -> float:
    """How much later the ComfyUI AUDIO `shifted` plays `source`, in seconds (negative: its start was cut), found by
    cross-correlating the two waveforms, not from any number the node reports. The match must be exact: `shifted`
    is `source` behind silence (a delay) or without its first samples (an advance)."""
    from scipy.signal import correlate

    assert shifted["sample_rate"] == source["sample_rate"]
    a, b = shifted["waveform"][0].double().numpy(), source["waveform"][0].double().numpy()  # [channels, samples]
    scores = correlate(a.mean(axis=0), b.mean(axis=0), mode="full", method="fft")
    lag = int(np.argmax(scores)) - (b.shape[-1] - 1)
    if lag >= 0:
        assert not a[:, :lag].any() and np.array_equal(a[:, lag:], b), f"not a plain delay of {lag} samples"
    else:
        assert np.array_equal(a, b[:, -lag:]), f"not a plain advance of {-lag} samples"
    return lag / source["sample_rate"]


def record_streaming(monkeypatch) -> list:
    """Every UNet streaming context (sonic.engine.offload.streamed) a run opens, kept for the test to read its stats
    and streams afterwards: the list they are appended to."""
    from contextlib import contextmanager

    from sonic.engine import offload

    seen, real = [], offload.streamed

    @contextmanager
    def keep(*args, **kwargs):
        with real(*args, **kwargs) as streaming:
            seen.append(streaming)
            yield streaming

    monkeypatch.setattr(offload, "streamed", keep)
    return seen
