"""Issue 16 item 6: the engine-mode pipeline uses MONAI's pieces (percentile intensity scaling, padding,
Gaussian smoothing) instead of hand-written copies, with outputs unchanged.

The hand-written implementations the engine had before the switch are kept here, verbatim in behaviour,
as the references the MONAI-based code must reproduce within 1e-4.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from afloc_engine.heatmap import gaussian_smooth, grid_to_image
from afloc_engine.transforms import Letterbox, normalize_intensity, prepare_image


# --- the implementations before the switch ----------------------------------------------------------
def old_normalize_intensity(array, window=None, percentiles=(0.5, 99.5)):
    array = np.asarray(array, dtype=np.float32)
    low, high = window if window is not None else np.percentile(array, percentiles)
    if not high > low:
        low, high = float(array.min()), float(array.max())
    if not high > low:
        return np.zeros_like(array, dtype=np.float32)
    return np.clip((array - low) / (high - low), 0.0, 1.0).astype(np.float32)


def old_gaussian_smooth(maps, sigma):
    if sigma <= 0:
        return maps
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).to(maps.dtype)
    dims = maps.dim() - 1
    out = maps.unsqueeze(1)
    conv = F.conv2d if dims == 2 else F.conv3d
    for axis in range(dims):
        shape = [1, 1] + [1] * dims
        shape[2 + axis] = k.numel()
        pad = [0, 0] * dims
        pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), k.reshape(shape))
    return out.squeeze(1)


def old_letterbox_apply(box, image):
    lead = image.shape[:-2]
    x = image.reshape(-1, 1, box.height, box.width).float()
    x = F.interpolate(x, size=(box.resized_height, box.resized_width), mode="bilinear", antialias=True)
    canvas = x.new_zeros(x.shape[0], 1, box.size, box.size)
    canvas[..., box.top : box.top + box.resized_height, box.left : box.left + box.resized_width] = x
    return canvas.reshape(*lead, box.size, box.size)


# --- the checks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "array, window",
    [
        (np.random.default_rng(0).normal(1000, 300, (200, 150)), None),
        (np.random.default_rng(1).normal(1000, 300, (200, 150)), (800.0, 1400.0)),
        (np.r_[np.zeros(9990), np.ones(10)].reshape(100, 100), None),  # percentiles equal: the full range
        (np.full((40, 30), 7.0), None),  # constant: zeros
        (np.full((40, 30), 7.0), (7.0, 7.0)),  # empty window on a constant image
    ],
)
def test_intensity_scaling_unchanged(array, window):
    ours = normalize_intensity(array, window)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32 and ours.shape == array.shape
    np.testing.assert_allclose(ours, old_normalize_intensity(array, window), rtol=0, atol=1e-5)


@pytest.mark.parametrize("sigma", [0.0, 0.7, 1.1, 1.5, 2.3])
@pytest.mark.parametrize("grid", [(3, 19, 19), (2, 6, 19, 19)])
def test_gaussian_smoothing_unchanged_2d_and_3d(sigma, grid):
    maps = torch.randn(*grid, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(gaussian_smooth(maps, sigma), old_gaussian_smooth(maps, sigma), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(300, 200), (180, 420), (224, 224), (97, 333)])
def test_letterbox_padding_unchanged(shape):
    image = torch.rand(2, *shape, generator=torch.Generator().manual_seed(5))
    box = Letterbox.fit(*shape, 224)
    torch.testing.assert_close(box.apply(image), old_letterbox_apply(box, image), rtol=0, atol=0)


def test_engine_heatmaps_unchanged_on_real_radiographs(tiny_afloc, shared_data):
    """End to end on covid-cxr radiographs: the heatmaps through the old pieces equal localize()'s."""
    from afloc_engine.heatmap import similarity_maps
    from afloc_engine.io import read_image

    c = tiny_afloc.config
    prompts = ["Findings suggesting pneumonia", "ground glass opacity"]
    for name in ("04b8da435f57", "009a17d546e1"):
        image = read_image(shared_data / "covid-cxr" / "images" / f"{name}.jpg")
        grey = torch.from_numpy(old_normalize_intensity(image.array, image.window))
        box = Letterbox.fit(*grey.shape, c.image_size)
        canvas = (old_letterbox_apply(box, grey[None]) - c.intensity_mean) / c.intensity_std
        deep, _ = tiny_afloc.encode_images(canvas[None])
        with torch.inference_mode():
            grids = similarity_maps(deep, tiny_afloc.embed_prompts(prompts), c.similarity)[0]
            smoothed = old_gaussian_smooth(grids, c.smoothing_sigma)
            up = F.interpolate(smoothed[:, None], size=(box.size, box.size), mode="bilinear", align_corners=False)
        result = tiny_afloc.localize(image, prompts)
        for p in range(len(prompts)):
            heat = box.invert(up[p])[0]
            heat = 2 * (heat - heat.min()) / (heat.max() - heat.min()) - 1
            assert np.abs(result.heatmaps[p] - heat.numpy()).max() < 1e-4, (name, prompts[p])
        # and the pieces one by one on this image: today's prepare_image and grid_to_image
        prepared, _ = prepare_image(image.array, c.image_size, image.window, c.intensity_mean, c.intensity_std)
        torch.testing.assert_close(prepared, canvas, rtol=0, atol=1e-5)
        ours = grid_to_image(grids, box, c.smoothing_sigma)
        assert np.abs(ours.numpy() - result.heatmaps).max() < 1e-6
