"""A compact U-Net: 2 SAR channels in, 4 optical bands out, any tile size.

Three 2x down-samplings give a stride of 8; tiles whose sides are not a multiple of 8 (BigEarthNet
patches are 120 x 120) are padded by edge replication and the output is cropped back, so every
output pixel corresponds to an input pixel. GroupNorm instead of BatchNorm keeps the model
independent of batch composition at evaluation and free of running statistics. The output goes
through a sigmoid: targets are optical reflectance normalised to [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

IN_CHANNELS = 2
OUT_CHANNELS = 4
DEPTH = 3
STRIDE = 2**DEPTH


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.GroupNorm(min(8, cout), cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.GroupNorm(min(8, cout), cout),
        nn.SiLU(),
    )


class UNet(nn.Module):
    """U-Net of ``width`` base channels (doubling per level) with dropout at the bottleneck."""

    def __init__(self, width: int = 16, dropout: float = 0.1):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        widths = [width * 2**i for i in range(DEPTH + 1)]
        self.down = nn.ModuleList([_block(IN_CHANNELS, widths[0])] + [_block(widths[i], widths[i + 1]) for i in range(DEPTH)])
        self.dropout = nn.Dropout2d(dropout)
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(DEPTH))])
        self.merge = nn.ModuleList([_block(2 * widths[i], widths[i]) for i in reversed(range(DEPTH))])
        self.head = nn.Conv2d(widths[0], OUT_CHANNELS, 1)

    def forward(self, sar: torch.Tensor) -> torch.Tensor:
        h, w = sar.shape[-2:]
        pad_h, pad_w = (-h) % STRIDE, (-w) % STRIDE
        x = F.pad(sar, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else sar
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = self.dropout(skips.pop())
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return torch.sigmoid(self.head(x))[..., :h, :w]
