"""Block streaming: a network whose weights stay in host memory, each block visiting the compute device only for
its own forward. For cards that cannot hold the UNet's weights next to its working memory (ComfyUI's --novram):
ComfyUI can partially load only modules built from its own layer classes, so the pack streams the UNet itself.

The device then holds one block's weights at a time (the largest of SVD's UNet is a 1280-channel spatio-temporal
transformer, 0.21 GB in fp16, one of 49 units) instead of 3.15 GB; every weight crosses the bus once per UNet
call.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def unet_units(unet: nn.Module) -> list[nn.Module]:
    """The streaming units of a diffusers UNet: each resnet, transformer, down/upsampler of its blocks, and the
    top-level layers (embeddings, input and output convolutions). Together they hold every parameter."""
    units = []
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        for child in block.children():
            units.extend(child.children() if isinstance(child, nn.ModuleList) else [child])
    inside = {id(p) for unit in units for p in unit.parameters()}
    units.extend(m for name, m in unet.named_children()
                 if name not in ("down_blocks", "mid_block", "up_blocks") and any(id(p) not in inside for p in m.parameters()))
    return units


def unit_bytes(unit: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*unit.parameters(), *unit.buffers()])


def _slots(unit: nn.Module) -> list[tuple[dict, str]]:
    """(owning dict, name) of every parameter and buffer of `unit` and its submodules."""
    return [(table, name) for module in unit.modules() for table in (module._parameters, module._buffers)
            for name, t in table.items() if t is not None]


@contextmanager
def streamed(units: list[nn.Module], device: torch.device | str) -> Iterator[None]:
    """Inside: each unit's weights are copied to `device` just before its forward and dropped there right after;
    the host tensors are put back (never changed, so nothing is copied back). Outside: everything as it was."""
    device = torch.device(device)
    handles, saved = [], {}

    def to_device(unit, args):
        slots = _slots(unit)
        saved[id(unit)] = [(table, name, table[name]) for table, name in slots]
        for table, name in slots:
            host = table[name]
            copy = host.to(device, non_blocking=True)
            table[name] = nn.Parameter(copy, requires_grad=False) if isinstance(host, nn.Parameter) else copy

    def to_host(unit, args=None, output=None):
        for table, name, host in saved.pop(id(unit), []):
            table[name] = host

    for unit in units:
        handles.append(unit.register_forward_pre_hook(to_device))
        handles.append(unit.register_forward_hook(to_host))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for unit in units:  # a forward that raised leaves its unit on the device
            to_host(unit)
