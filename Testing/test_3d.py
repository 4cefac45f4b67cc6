"""The native 3D path: a spatial_dims=3 encoder's features through the AFLoc losses and back onto a volume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config
from scipy.ndimage import gaussian_filter

from afloc_engine.heatmap import gaussian_smooth, similarity_maps
from afloc_engine.losses import afloc_loss, as_regions, local_similarity
from afloc_engine.models import AFLocModel


@pytest.fixture(scope="module")
def model3d() -> AFLocModel:
    torch.manual_seed(0)
    return AFLocModel(tiny_config(spatial_dims=3, image_size=32))


def test_3d_encoder_gives_three_levels_on_3d_grids(model3d):
    feats = model3d.encode_images(torch.randn(2, 1, 32, 24, 40))
    d = model3d.config.embed_dim
    # strides 8 and 16 of the 2-strided stem: (4, 3, 5) and (2, 2, 3) grids
    assert feats.shallow.shape == (2, d, 4, 3, 5)
    assert feats.deep.shape == (2, d, 2, 2, 3)
    assert feats.global_.shape == (2, d)


def test_losses_see_a_3d_grid_as_its_flattened_regions():
    """afloc_loss on (B, D, Z, Y, X) maps equals the loss on the same cells laid out as a 2D grid or as regions."""
    g = torch.Generator().manual_seed(0)
    b, d = 3, 16
    shallow = torch.randn(b, d, 4, 4, 2, generator=g)
    deep = torch.randn(b, d, 2, 2, 2, generator=g)
    glob = torch.randn(b, d, generator=g)
    words, sentences, report = torch.randn(b, 7, d, generator=g), torch.randn(b, 3, d, generator=g), glob.clone()
    word_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], dtype=torch.bool)
    sentence_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    text = (words, word_mask, sentences, sentence_mask, report)
    as3d = afloc_loss(shallow, deep, glob, *text)
    as2d = afloc_loss(shallow.reshape(b, d, 8, 4), deep.reshape(b, d, 4, 2), glob, *text)
    flat = afloc_loss(as_regions(shallow), as_regions(deep), glob, *text)
    for a, c, f in zip(as3d, as2d, flat):
        assert float(a) == pytest.approx(float(c), rel=1e-6) and float(a) == pytest.approx(float(f), rel=1e-6)
    # regions are the cells in (z, y, x) order
    torch.testing.assert_close(as_regions(deep)[1, 5], deep[1, :, 1, 0, 1])
    # region order does not matter to the matching score
    perm = torch.randperm(8, generator=g)
    z = local_similarity(as_regions(deep), sentences, sentence_mask)
    torch.testing.assert_close(local_similarity(as_regions(deep)[:, perm], sentences, sentence_mask), z)


def test_gradients_reach_a_3d_encoder_through_afloc_loss(model3d):
    model3d.train()
    model3d.zero_grad()
    images = torch.randn(3, 1, 32, 32, 32)
    reports = ["There is a mass in the liver.", "The lungs are clear. No effusion.", "Both kidneys are normal."]
    loss = model3d(images, model3d.text_encoder.tokenize(reports))
    assert torch.isfinite(loss.total) and loss.word.item() > 0 and loss.sentence.item() > 0
    loss.total.backward()
    enc = model3d.image_encoder
    for param in (enc.backbone.conv1.weight, enc.shallow_proj.weight, enc.deep_proj.weight, enc.global_proj.weight):
        assert param.grad is not None and float(param.grad.abs().sum()) > 0
    assert float(model3d.text_encoder.projection.weight.grad.abs().sum()) > 0
    model3d.eval()


def test_3d_gaussian_smoothing_matches_scipy():
    grid = torch.zeros(1, 7, 9, 8)
    grid[0, 3, 4, 2] = 1.0
    grid[0, 0, 8, 7] = 2.0  # at the border: edges are replicated
    ours = gaussian_smooth(grid, 1.5)[0].numpy()
    ref = gaussian_filter(grid[0].numpy(), 1.5, mode="nearest", truncate=3.0)
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_3d_similarity_map_is_per_cell(model3d):
    deep = torch.randn(2, 5, 3, 4, 2)
    prompts = torch.randn(3, 5)
    maps = similarity_maps(deep, prompts, "cosine")
    assert maps.shape == (2, 3, 3, 4, 2)
    cell = torch.nn.functional.cosine_similarity(deep[1, :, 2, 1, 0], prompts[2], dim=0)
    assert float(maps[1, 2, 2, 1, 0]) == pytest.approx(float(cell), abs=1e-6)
