"""The adapter's segmentation head: a small U-Net-style decoder on the frozen encoder's features.

Inputs (per image, on the letterboxed canvas):

* shallow local features (D, g8, g8) and deep local features (D, g16, g16) of the AFLoc encoder;
* the zero-shot heatmaps of the adapter's findings, (F, R, R) in [-1, 1], at the head resolution R;
* the network-input image, (1, R, R).

Output: a heatmap correction (F, R, R), added to the zero-shot heatmap. The last layer starts at
zero, so an untrained head leaves the zero-shot output exactly as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class HeadConfig:
    """Sizes of :class:`AdapterHead` (``embed_dim`` = the base model's D)."""

    embed_dim: int
    n_findings: int = 1
    width: int = 32
    fine_width: int = 16
    dropout: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _block(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    groups = 8 if cout % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True)
    )


class AdapterHead(nn.Module):
    """Residual segmentation head; ``forward`` returns the correction to the zero-shot heatmaps."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        d, w, fw, n = config.embed_dim, config.width, config.fine_width, config.n_findings
        self.drop = nn.Dropout2d(config.dropout)
        self.deep_in = nn.Sequential(_block(d, w, 1), _block(w, w))
        self.shallow_in = _block(d, w, 1)
        self.fuse = nn.Sequential(_block(2 * w, w), _block(w, w))
        self.refine = nn.Sequential(_block(w + n + 1, fw), _block(fw, fw))
        self.out = nn.Conv2d(fw, n, kernel_size=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self, shallow: torch.Tensor, deep: torch.Tensor, zero_shot: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        """shallow (B, D, g8, g8), deep (B, D, g16, g16), zero_shot (B, F, R, R), image (B, 1, R, R) -> (B, F, R, R)."""
        s = self.shallow_in(self.drop(shallow))
        d = self.deep_in(self.drop(deep))
        d = F.interpolate(d, size=s.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse(torch.cat([s, d], dim=1))
        x = F.interpolate(x, size=zero_shot.shape[-2:], mode="bilinear", align_corners=False)
        x = self.refine(torch.cat([x, zero_shot, image], dim=1))
        return self.out(x)
