"""Small helpers shared by the tests."""

from __future__ import annotations

import numpy as np
import torch


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    actual, reference = actual.float(), reference.float()
    return float((actual - reference).abs().max() / reference.abs().max())


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
