"""The adapter's segmentation head: a small U-Net-style decoder on the frozen encoder's features.

Inputs (per image, on the letterboxed canvas):

* shallow local features (D, g8, g8) and deep local features (D, g16, g16) of the AFLoc encoder;
* the zero-shot heatmaps of the adapter's findings, (F, R, R) in [-1, 1], at the head resolution R;
* the network-input image, (1, R, R).

Output: a heatmap correction (F, R, R), added to the zero-shot heatmap. The last layer starts at
zero, so an untrained head leaves the zero-shot output exactly as it is.

Each feature level is first reduced from D to ``in_dim`` channels by a fixed, whitened PCA fitted on
the training images' features (a buffer saved with the head): with D = 768 this makes the cached
features, their augmentation and every training step about ten times cheaper.
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
    in_dim: int = 64
    """Channels each feature level is reduced to (fixed PCA); at most ``embed_dim``."""
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
        config.in_dim = min(config.in_dim, config.embed_dim)
        self.config = config
        e, d, w, fw, n = config.embed_dim, config.in_dim, config.width, config.fine_width, config.n_findings
        for level in ("shallow", "deep"):
            self.register_buffer(f"{level}_mean", torch.zeros(e))
            self.register_buffer(f"{level}_basis", torch.eye(d, e))
        self.drop = nn.Dropout2d(config.dropout)
        self.deep_in = nn.Sequential(_block(d, w, 1), _block(w, w))
        self.shallow_in = _block(d, w, 1)
        self.fuse = nn.Sequential(_block(2 * w, w), _block(w, w))
        self.refine = nn.Sequential(_block(w + n + 1, fw), _block(fw, fw))
        self.out = nn.Conv2d(fw, n, kernel_size=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def reduce(self, features: torch.Tensor, level: str) -> torch.Tensor:
        """(B, D, h, w) encoder features of ``level`` (``shallow``/``deep``) -> (B, in_dim, h, w) whitened PCA."""
        mean, basis = getattr(self, f"{level}_mean"), getattr(self, f"{level}_basis")
        return torch.einsum("bdhw,kd->bkhw", features - mean[None, :, None, None], basis)

    @torch.no_grad()
    def fit_reduction(self, features: torch.Tensor, level: str, eps: float = 1e-6) -> None:
        """Fit the whitened PCA of ``level`` on (N, D, h, w) features (every grid cell is a sample)."""
        x = features.double().permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        mean = x.mean(0)
        cov = (x - mean).T @ (x - mean) / max(1, x.shape[0] - 1)
        values, vectors = torch.linalg.eigh(cov)  # ascending
        k = self.config.in_dim
        values, vectors = values.flip(0)[:k].clamp(min=0), vectors.flip(1)[:, :k]
        # a fixed sign per component (largest entry positive) keeps the basis reproducible
        signs = torch.sign(vectors.gather(0, vectors.abs().argmax(0, keepdim=True)))
        vectors = vectors * torch.where(signs == 0, torch.ones_like(signs), signs)
        scale = 1.0 / torch.sqrt(values + eps * values.max().clamp(min=eps))
        getattr(self, f"{level}_mean").copy_(mean.float())
        getattr(self, f"{level}_basis").copy_((vectors * scale).T.float())

    def forward(
        self, shallow: torch.Tensor, deep: torch.Tensor, zero_shot: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        """Reduced shallow (B, k, g8, g8) and deep (B, k, g16, g16) features (see :meth:`reduce`),
        zero_shot (B, F, R, R) and image (B, 1, R, R) -> correction (B, F, R, R)."""
        s = self.shallow_in(self.drop(shallow))
        d = self.deep_in(self.drop(deep))
        d = F.interpolate(d, size=s.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse(torch.cat([s, d], dim=1))
        x = F.interpolate(x, size=zero_shot.shape[-2:], mode="bilinear", align_corners=False)
        x = self.refine(torch.cat([x, zero_shot, image], dim=1))
        return self.out(x)
