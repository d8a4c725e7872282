"""Block streaming: a network whose weights stay in host memory, each block visiting the compute device only for
its own forward. For cards that cannot hold the UNet's weights next to its working memory (ComfyUI's --novram):
ComfyUI can partially load only modules built from its own layer classes, so the pack streams the UNet itself.

The device then holds the weights of the block computing and of the next one arriving (the largest of SVD's UNet is
a 1280-channel spatio-temporal transformer, 0.21 GB in fp16, one of 49 units) instead of 3.15 GB; every weight
crosses the bus once per UNet call.

On CUDA the host weights are page-locked (pinned, once, in place: `should_pin`), so their copies run on the copy
engine without staging, and the next block's weights are copied on a side stream while the current block computes
(the order of the blocks is learnt from the first pass). Guidance rows that the caller wants one after another (low
VRAM) still share one weight pass: `Streaming.split` runs each block on the rows in turn while its weights are on
the device, instead of streaming all weights once per row.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)


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


def should_pin(device: torch.device | str) -> bool:
    """Whether streaming to `device` pins the host weights: only for a CUDA target with CUDA present (a copy from
    page-locked memory is a DMA the host need not wait for; anywhere else pinning buys nothing, or fails)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def pin_host_weights(units: list[nn.Module]) -> int:
    """Page-lock every host weight of `units` in place (the same Parameter objects, the same values; their storage
    becomes pinned and stays so for later runs). Returns the bytes newly pinned; where the system refuses
    page-locked memory (limits, WSL), the rest stays pageable: slower copies, the same numbers."""
    pinned = 0
    for unit in units:
        for table, name in _slots(unit):
            t = table[name]
            if t.device.type != "cpu" or t.is_pinned():
                continue
            try:
                t.data = t.data.pin_memory()
            except RuntimeError as err:  # e.g. the page-locked memory limit
                log.warning("UNet streaming: host weights stay pageable (%s); copies will be slower", err)
                return pinned
            pinned += t.numel() * t.element_size()
    return pinned


@dataclass
class StreamStats:
    """What one `streamed` context did: `loads` unit weight visits to the device (one UNet call = one per unit),
    `prefetched` of them copied ahead on the side stream (or, off CUDA, ahead of the unit's forward), `discarded`
    prefetches that were not used (the next unit was not the one expected), `pinned_bytes` newly page-locked."""

    loads: int = 0
    prefetched: int = 0
    discarded: int = 0
    pinned_bytes: int = 0


def _split_value(value, pieces: int) -> list:
    """A unit argument cut into `pieces` along its batch (first) dimension; anything else is shared."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] % pieces == 0:
        return list(value.chunk(pieces))
    return [value] * pieces


def _merge(outputs: list):
    """The pieces' outputs joined again along the batch dimension (tensors; tuples and lists of them; None)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, (tuple, list)):
        return type(first)(_merge(list(parts)) for parts in zip(*outputs))
    if first is None:
        return None
    raise TypeError(f"cannot join the outputs of a row-split unit of type {type(first).__name__}")


class Streaming:
    """The state of a `streamed` context: the copies in flight, the learnt block order, the row split."""

    def __init__(self, units: list[nn.Module], device: torch.device):
        self.units, self.device = units, device
        self.stats = StreamStats()
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda else None  # side stream for the next unit's weights
        self._successor: dict[int, nn.Module] = {}  # id(unit) -> the unit that ran after it last time
        self._previous: nn.Module | None = None
        self._pending: tuple | None = None  # (unit, device tensors, copy-done event or None)
        self._saved: dict[int, list] = {}  # id(unit) -> [(table, name, host tensor)] while on the device
        self._pieces, self._each = 1, None

    @contextmanager
    def split(self, pieces: int, each: Callable[[int], ContextManager]) -> Iterator[None]:
        """Inside: every unit runs its forward `pieces` times, on consecutive equal slices of its batch, each
        inside `each(piece)`, while its weights are on the device once. The result is what `pieces` separate
        calls of the network give (each block computes the same slices), with one weight pass instead of
        `pieces`. Every tensor argument of a unit must be batch-major with the pieces consecutive."""
        before = self._pieces, self._each
        self._pieces, self._each = pieces, each
        try:
            yield
        finally:
            self._pieces, self._each = before

    # -- weights ------------------------------------------------------------------------------------------------

    def _copy_ahead(self, unit: nn.Module) -> tuple:
        """Start copying `unit`'s weights to the device: on CUDA on the side stream, into memory taken from the
        compute stream's pool (so it is reused only in the compute stream's order) after the compute stream's
        queued work (which may still read the memory being handed out); returns (unit, tensors, event)."""
        hosts = [table[name] for table, name in _slots(unit)]
        if self.copy_stream is None:
            return unit, [h.to(self.device) for h in hosts], None
        compute = torch.cuda.current_stream(self.device)
        copies = [torch.empty_like(h, device=self.device) for h in hosts]
        self.copy_stream.wait_stream(compute)
        with torch.cuda.stream(self.copy_stream):
            for copy, host in zip(copies, hosts):
                copy.copy_(host, non_blocking=True)
        done = torch.cuda.Event()
        done.record(self.copy_stream)
        return unit, copies, done

    def _take_pending(self, unit: nn.Module | None, counted: bool = True) -> list | None:
        """The prefetched tensors when they are `unit`'s (the compute stream waits for their copy); else the
        prefetch is dropped, once the compute stream has waited for it (its memory returns to that stream)."""
        if self._pending is None:
            return None
        pending_unit, copies, done = self._pending
        self._pending = None
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
        if pending_unit is unit:
            self.stats.prefetched += 1
            return copies
        self.stats.discarded += counted
        return None

    def load(self, unit: nn.Module, args=None) -> None:
        """Forward pre-hook: `unit`'s weights onto the device (prefetched or copied now), then the next unit's
        copy started, so that it overlaps this unit's compute."""
        if self._previous is not None:
            self._successor[id(self._previous)] = unit
        self._previous = unit
        copies = self._take_pending(unit)
        if copies is None:  # not copied ahead (the first pass): copied now, in the compute stream's order
            copies = [table[name].to(self.device, non_blocking=True) for table, name in _slots(unit)]
        slots = _slots(unit)
        self._saved[id(unit)] = [(table, name, table[name]) for table, name in slots]
        for (table, name), copy in zip(slots, copies):
            host = table[name]
            table[name] = nn.Parameter(copy, requires_grad=False) if isinstance(host, nn.Parameter) else copy
        self.stats.loads += 1
        following = self._successor.get(id(unit))
        if following is not None and following is not unit:
            self._pending = self._copy_ahead(following)

    def unload(self, unit: nn.Module, args=None, output=None) -> None:
        """Forward hook: the host tensors back in place; the device copies are freed (in the compute stream's
        order, after the kernels queued to read them)."""
        for table, name, host in self._saved.pop(id(unit), []):
            table[name] = host

    def close(self) -> None:
        self._take_pending(None, counted=False)  # the first unit of a next call that will not come
        for unit in self.units:  # a forward that raised leaves its unit on the device
            self.unload(unit)

    # -- forwards -----------------------------------------------------------------------------------------------

    def forward_of(self, forward: Callable) -> Callable:
        """`forward` running in pieces while a split is active."""

        def run(*args, **kwargs):
            pieces = self._pieces
            if pieces <= 1:
                return forward(*args, **kwargs)
            split_args = [_split_value(a, pieces) for a in args]
            split_kwargs = {k: _split_value(v, pieces) for k, v in kwargs.items()}
            outputs = []
            for p in range(pieces):
                with self._each(p):
                    outputs.append(forward(*[a[p] for a in split_args], **{k: v[p] for k, v in split_kwargs.items()}))
            return _merge(outputs)

        return run


@contextmanager
def streamed(units: list[nn.Module], device: torch.device | str) -> Iterator[Streaming]:
    """Inside: each unit's weights are on `device` only for its forward (the next unit's copy already under way);
    the host tensors are put back (never changed, so nothing is copied back). On CUDA the host weights are pinned
    first (in place, kept). Outside: everything as it was, but pinned. Yields the `Streaming` (stats, split)."""
    device = torch.device(device)
    streaming = Streaming(units, device)
    if should_pin(device):
        streaming.stats.pinned_bytes = pin_host_weights(units)
    handles, forwards = [], []
    for unit in units:
        handles.append(unit.register_forward_pre_hook(streaming.load))
        handles.append(unit.register_forward_hook(streaming.unload))
        forwards.append((unit, unit.__dict__.get("forward")))
        unit.forward = streaming.forward_of(unit.forward)
    try:
        yield streaming
    finally:
        for handle in handles:
            handle.remove()
        for unit, own in forwards:
            if own is None:
                del unit.forward
            else:
                unit.forward = own
        streaming.close()
