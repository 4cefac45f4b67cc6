"""Similarity maps: from deep features and prompt embeddings to [-1, 1] heatmaps on the image."""

from __future__ import annotations

import math

import numpy as np
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
    """Normalised sampled 1D Gaussian of radius ceil(3 sigma) (MONAI's ``gaussian_1d``), float32."""
    from monai.networks.layers.convutils import gaussian_1d

    radius = max(1, math.ceil(3 * sigma))
    kernel = gaussian_1d(torch.tensor(float(sigma)), truncated=radius / sigma, approx="sampled", normalize=True)
    if kernel.numel() != 2 * radius + 1:  # pragma: no cover (MONAI's rounding of the radius)
        raise AssertionError(f"Gaussian kernel of {kernel.numel()} taps, expected {2 * radius + 1}")
    return kernel.to(device=device, dtype=torch.float32)


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, *grid) maps (2D or 3D grid), sigma in grid cells; edges replicated.

    MONAI's ``separable_filtering`` with the kernel of :func:`gaussian_kernel1d`.
    """
    if sigma <= 0:
        return maps
    from monai.networks.layers import separable_filtering

    k = gaussian_kernel1d(sigma, maps.device).to(maps.dtype)
    return separable_filtering(maps.unsqueeze(1), [k] * (maps.dim() - 1), mode="replicate").squeeze(1)


def gaussian_smooth_scipy(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter of each (N, *grid) map, as the reference smooths its similarity map.

    Edges reflected (scipy's ``reflect``: the edge cell repeated, d c b a | a b c d), kernel radius
    int(4 sigma + 0.5), computed on the CPU in the maps' dtype; returned on the maps' device.
    """
    if sigma <= 0:
        return maps
    from scipy import ndimage

    arrays = maps.detach().cpu().numpy()
    out = np.stack([ndimage.gaussian_filter(a, sigma=sigma, order=0, mode="reflect") for a in arrays])
    return torch.from_numpy(out).to(maps.device)


def minmax_to_unit(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map of (N, ...) to [-1, 1]; a constant map becomes 0."""
    flat = maps.reshape(maps.shape[0], -1)
    low = flat.min(dim=1).values.view(-1, *([1] * (maps.dim() - 1)))
    high = flat.max(dim=1).values.view(-1, *([1] * (maps.dim() - 1)))
    span = high - low
    out = torch.where(span > 0, 2 * (maps - low) / span.clamp(min=1e-12) - 1, torch.zeros_like(maps))
    return out


def grid_to_image(
    grid_maps: torch.Tensor,
    box: Letterbox,
    sigma: float = 1.5,
    smoothing_mode: str = "replicate",
    heatmap_range: str = "image",
) -> torch.Tensor:
    """(P, g, g) similarity maps on the feature grid -> (P, H, W) heatmaps in [-1, 1] on the image.

    Smooth on the grid (``smoothing_mode``: ``replicate`` edges, or ``scipy-reflect`` as the
    reference), upsample bilinearly to the S x S canvas, undo the letterbox. ``heatmap_range``:
    ``image`` min-max normalises over the image's own pixels (the padding never sets the range;
    every map spans exactly [-1, 1]); ``canvas`` normalises over the whole canvas, padding
    included, before the letterbox is undone (the reference's [-1, 1] values, shown on the
    image's pixels: a map may not reach -1 or 1 there). Full-size maps are made one prompt at a
    time into one output tensor, so peak memory stays near the output's size.
    """
    if smoothing_mode == "scipy-reflect":
        smoothed = gaussian_smooth_scipy(grid_maps.float(), sigma)
    elif smoothing_mode == "replicate":
        smoothed = gaussian_smooth(grid_maps.float(), sigma)
    else:
        raise ValueError(f"smoothing_mode must be 'replicate' or 'scipy-reflect', not {smoothing_mode!r}")
    if heatmap_range not in ("image", "canvas"):
        raise ValueError(f"heatmap_range must be 'image' or 'canvas', not {heatmap_range!r}")
    canvas = F.interpolate(smoothed.unsqueeze(1), size=(box.size, box.size), mode="bilinear", align_corners=False)
    if heatmap_range == "canvas":
        canvas = minmax_to_unit(canvas)
    out = canvas.new_empty((canvas.shape[0], box.height, box.width))
    for p in range(canvas.shape[0]):
        heat = box.invert(canvas[p])[0]
        if heatmap_range == "image":
            low, high = heat.min(), heat.max()
            if high > low:
                heat.sub_(low).mul_(2.0 / (high - low)).sub_(1.0)
            else:
                heat.zero_()
        out[p] = heat
    return out
