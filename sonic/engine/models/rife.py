"""RIFE IFNet (HDv3 family), the frame interpolator Sonic uses for 12.5 -> 25 fps (spec §3.10).

Three coarse-to-fine IFBlocks (scales 4, 2, 1) estimate a bidirectional flow and a blend mask; each block is
run in both directions and the two estimates are averaged. The training-only teacher block (`block_tea`)
exists so that the released `flownet.pkl` loads strictly; it is never evaluated.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SCALES = (4, 2, 1)


def _conv(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=True), nn.PReLU(out_ch))


def _resize(x: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 1:
        return x
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class IFBlock(nn.Module):
    def __init__(self, in_planes: int, channels: int):
        super().__init__()
        half = channels // 2
        self.conv0 = nn.Sequential(_conv(in_planes, half, 2), _conv(half, channels, 2))
        self.convblock0 = nn.Sequential(_conv(channels, channels), _conv(channels, channels))
        self.convblock1 = nn.Sequential(_conv(channels, channels), _conv(channels, channels))
        self.convblock2 = nn.Sequential(_conv(channels, channels), _conv(channels, channels))
        self.convblock3 = nn.Sequential(_conv(channels, channels), _conv(channels, channels))
        self.conv1 = nn.Sequential(
            nn.ConvTranspose2d(channels, half, 4, 2, 1), nn.PReLU(half), nn.ConvTranspose2d(half, 4, 4, 2, 1)
        )
        self.conv2 = nn.Sequential(
            nn.ConvTranspose2d(channels, half, 4, 2, 1), nn.PReLU(half), nn.ConvTranspose2d(half, 1, 4, 2, 1)
        )

    def forward(self, x: torch.Tensor, flow: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = _resize(x, 1.0 / scale)
        flow = _resize(flow, 1.0 / scale) * (1.0 / scale)
        feat = self.conv0(torch.cat((x, flow), 1))
        for block in (self.convblock0, self.convblock1, self.convblock2, self.convblock3):
            feat = block(feat) + feat
        flow = _resize(self.conv1(feat), scale) * scale
        mask = _resize(self.conv2(feat), scale)
        return flow, mask


def backward_warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample `image` at pixel + flow (bilinear, border padding, align_corners=True)."""
    n, _, h, w = flow.shape
    xs = torch.linspace(-1.0, 1.0, w, device=flow.device, dtype=flow.dtype).view(1, 1, w).expand(n, h, w)
    ys = torch.linspace(-1.0, 1.0, h, device=flow.device, dtype=flow.dtype).view(1, h, 1).expand(n, h, w)
    grid = torch.stack((xs + flow[:, 0] / ((w - 1.0) / 2.0), ys + flow[:, 1] / ((h - 1.0) / 2.0)), dim=-1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _swap_directions(flow: torch.Tensor) -> torch.Tensor:
    return torch.cat((flow[:, 2:4], flow[:, :2]), 1)


class IFNet(nn.Module):
    def __init__(self, channels: int = 90):
        super().__init__()
        self.block0 = IFBlock(7 + 4, channels)
        self.block1 = IFBlock(7 + 4, channels)
        self.block2 = IFBlock(7 + 4, channels)
        self.block_tea = IFBlock(7 + 4 + 3, channels)

    @classmethod
    def from_state_dict_shapes(cls, state_dict: dict[str, torch.Tensor]) -> "IFNet":
        return cls(channels=state_dict["block0.conv0.1.0.weight"].shape[0])

    def forward(self, image0: torch.Tensor, image1: torch.Tensor) -> torch.Tensor:
        """Middle frame between two [N, 3, H, W] batches in [0, 1] (H, W multiples of 32)."""
        n, _, h, w = image0.shape
        flow = image0.new_zeros(n, 4, h, w)
        mask = image0.new_zeros(n, 1, h, w)
        warped0, warped1 = image0, image1
        for block, scale in zip((self.block0, self.block1, self.block2), SCALES):
            flow_fwd, mask_fwd = block(torch.cat((warped0, warped1, mask), 1), flow, scale)
            flow_bwd, mask_bwd = block(torch.cat((warped1, warped0, -mask), 1), _swap_directions(flow), scale)
            flow = flow + (flow_fwd + _swap_directions(flow_bwd)) / 2
            mask = mask + (mask_fwd - mask_bwd) / 2
            warped0 = backward_warp(image0, flow[:, :2])
            warped1 = backward_warp(image1, flow[:, 2:4])
        weight = torch.sigmoid(mask)
        return (warped0 * weight + warped1 * (1 - weight)).clamp(0, 1)
