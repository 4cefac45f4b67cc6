"""Similarity maps: from deep features and prompt embeddings to [-1, 1] heatmaps on the image."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from afloc_engine.transforms import Letterbox


def similarity_maps(deep: torch.Tensor, prompts: torch.Tensor, similarity: str = "cosine") -> torch.Tensor:
    """Patch-prompt similarity.

    deep: (B, D, *grid) deep local features; prompts: (P, D) prompt embeddings.
    Returns (B, P, *grid): cosine (default, comparable across images) or dot product (reference).
    """
    if similarity == "cosine":
        deep = F.normalize(deep, dim=1)
        prompts = F.normalize(prompts, dim=-1)
    elif similarity != "dot":
        raise ValueError(f"similarity must be 'cosine' or 'dot', not {similarity!r}")
    return torch.einsum("bd...,pd->bp...", deep, prompts)


def gaussian_kernel1d(sigma: float, device: torch.device | None = None) -> torch.Tensor:
    """Normalised 1D Gaussian, radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, *grid) maps (2D or 3D grid), sigma in grid cells; edges replicated."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.device).to(maps.dtype)
    r = (k.numel() - 1) // 2
    dims = maps.dim() - 1
    x = maps.unsqueeze(1)
    conv = F.conv2d if dims == 2 else F.conv3d
    for axis in range(dims):
        shape = [1, 1] + [1] * dims
        shape[2 + axis] = k.numel()
        pad = [0, 0] * dims
        pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = r
        x = conv(F.pad(x, pad, mode="replicate"), k.reshape(shape))
    return x.squeeze(1)


def minmax_to_unit(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map of (N, ...) to [-1, 1]; a constant map becomes 0."""
    flat = maps.reshape(maps.shape[0], -1)
    low = flat.min(dim=1).values.view(-1, *([1] * (maps.dim() - 1)))
    high = flat.max(dim=1).values.view(-1, *([1] * (maps.dim() - 1)))
    span = high - low
    out = torch.where(span > 0, 2 * (maps - low) / span.clamp(min=1e-12) - 1, torch.zeros_like(maps))
    return out


def grid_to_image(grid_maps: torch.Tensor, box: Letterbox, sigma: float = 1.5) -> torch.Tensor:
    """(P, g, g) similarity maps on the feature grid -> (P, H, W) heatmaps in [-1, 1] on the image.

    Smooth on the grid, upsample bilinearly to the S x S canvas, undo the letterbox, min-max
    normalise over the image's own pixels (the padding never sets the range). Full-size maps are
    made one prompt at a time into one output tensor, so peak memory stays near the output's size.
    """
    smoothed = gaussian_smooth(grid_maps.float(), sigma)
    canvas = F.interpolate(smoothed.unsqueeze(1), size=(box.size, box.size), mode="bilinear", align_corners=False)
    out = canvas.new_empty((canvas.shape[0], box.height, box.width))
    for p in range(canvas.shape[0]):
        heat = box.invert(canvas[p])[0]
        low, high = heat.min(), heat.max()
        if high > low:
            heat.sub_(low).mul_(2.0 / (high - low)).sub_(1.0)
        else:
            heat.zero_()
        out[p] = heat
    return out
