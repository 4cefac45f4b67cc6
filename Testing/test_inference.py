"""Prompt inference: heatmaps line up with the input's pixels; masks, probabilities and caching behave."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from afloc_engine.errors import PromptError
from afloc_engine.heatmap import gaussian_smooth, minmax_to_unit
from afloc_engine.models.image_encoder import ImageFeatures
from afloc_engine.transforms import Letterbox, normalize_intensity


def force_brightness_similarity(afloc, monkeypatch):
    """Make deep features encode local brightness along the prompt's direction, so the hot spot is known."""
    d = afloc.config.embed_dim
    e = torch.zeros(d)
    e[0] = 1.0
    f = torch.zeros(d)
    f[1] = 1.0

    def fake_encode(images):
        grey = images[:, :1] * afloc.config.intensity_std + afloc.config.intensity_mean  # back to [0, 1]
        grid = F.avg_pool2d(grey, 4)  # (B, 1, S/4, S/4)
        deep = grid * e.view(1, d, 1, 1) + (1 - grid) * f.view(1, d, 1, 1)
        return ImageFeatures(deep, deep, deep.mean((2, 3)))

    monkeypatch.setattr(afloc.model, "encode_images", fake_encode)
    monkeypatch.setattr(afloc, "embed_prompts", lambda prompts: e.expand(len(prompts), d).clone())


@pytest.mark.parametrize("shape, box", [((300, 200), (40, 70, 150, 120)), ((180, 420), (30, 150, 160, 330))])
def test_bright_square_gives_heatmap_argmax_inside_it(tiny_afloc, monkeypatch, shape, box):
    force_brightness_similarity(tiny_afloc, monkeypatch)
    image = np.random.default_rng(0).normal(100, 5, shape).astype(np.float32)
    r0, c0, r1, c1 = box
    image[r0:r1, c0:c1] = 400
    result = tiny_afloc.localize(image, ["Findings suggesting a bright square"], threshold=0.3)
    heat = result.heatmaps[0]
    assert heat.shape == shape and heat.dtype == np.float32
    assert heat.min() == pytest.approx(-1.0) and heat.max() == pytest.approx(1.0)
    r, c = np.unravel_index(np.argmax(heat), shape)
    assert r0 <= r < r1 and c0 <= c < c1
    inside = np.zeros(shape, bool)
    inside[r0:r1, c0:c1] = True
    mask = result.masks[0]
    # the mask sits on the square: most of it inside, most of the square covered
    assert (mask & inside).sum() / mask.sum() > 0.6
    assert (mask & inside).sum() / inside.sum() > 0.6


def test_masks_follow_threshold_without_rerunning(tiny_afloc):
    image = np.random.default_rng(1).random((96, 80)).astype(np.float32)
    result = tiny_afloc.localize(image, ["Findings suggesting pneumothorax", "cardiomegaly"], threshold=0.3)
    assert result.heatmaps.shape == (2, 96, 80) and result.masks.dtype == bool
    np.testing.assert_array_equal(result.masks, result.heatmaps > 0.3)
    lower = result.with_threshold(-0.5)
    np.testing.assert_array_equal(lower.masks, result.heatmaps > -0.5)
    assert lower.masks.sum() >= result.masks.sum()
    assert ((result.probabilities >= 0) & (result.probabilities <= 1)).all()
    assert result.negative_prompts == ["No pneumothorax", "No cardiomegaly"]


def test_prompt_embeddings_are_cached(tiny_afloc, monkeypatch):
    calls = []
    encode = tiny_afloc.model.text_encoder.encode

    def counting(reports):
        calls.append(list(reports))
        return encode(reports)

    monkeypatch.setattr(tiny_afloc.model.text_encoder, "encode", counting)
    tiny_afloc._prompt_cache.clear()
    image = np.ones((64, 64), np.float32)
    first = tiny_afloc.localize(image, ["Findings suggesting edema"])
    second = tiny_afloc.localize(image, ["Findings suggesting edema"])
    assert sum(len(c) for c in calls) == 2  # prompt + its negative, once
    np.testing.assert_array_equal(first.heatmaps, second.heatmaps)


def test_cosine_and_dot_similarity_both_available(tiny_afloc):
    image = np.random.default_rng(2).random((64, 64)).astype(np.float32)
    cos = tiny_afloc.localize(image, ["edema"], similarity="cosine").heatmaps
    dot = tiny_afloc.localize(image, ["edema"], similarity="dot").heatmaps
    assert cos.shape == dot.shape
    assert not np.allclose(cos, dot)


@pytest.mark.parametrize("prompts", [[""], ["   "], ["..."], ["x" * 501], []])
def test_bad_prompts_are_refused(tiny_afloc, prompts):
    with pytest.raises(PromptError):
        tiny_afloc.localize(np.ones((64, 64), np.float32), prompts)


def test_letterbox_inverse_restores_the_original_grid():
    yy, xx = np.mgrid[0:150, 0:400].astype(np.float32)
    smooth = torch.from_numpy(np.sin(xx / 40) + np.cos(yy / 30))
    box = Letterbox.fit(150, 400, 224)
    assert box.resized_width == 224 and box.top == (224 - box.resized_height) // 2
    canvas = box.apply(smooth[None])
    back = box.invert(canvas)
    assert back.shape == (1, 150, 400)
    assert (back[0] - smooth).abs()[5:-5, 5:-5].max() < 0.05


def test_gaussian_smoothing_preserves_mass_and_minmax_range():
    impulse = torch.zeros(1, 19, 19)
    impulse[0, 9, 9] = 1
    blurred = gaussian_smooth(impulse, 1.5)
    assert blurred.sum() == pytest.approx(1.0, abs=1e-5)
    assert blurred[0, 9, 9] == blurred.max()
    unit = minmax_to_unit(torch.randn(3, 5, 5))
    assert unit.min() == -1 and unit.max() == 1
    assert (minmax_to_unit(torch.ones(1, 4, 4)) == 0).all()


def test_normalize_intensity_uses_window_and_is_robust_to_outliers():
    a = np.linspace(0, 100, 10000, dtype=np.float32).reshape(100, 100)
    a[0, 0] = 1e6  # burned-in marker
    n = normalize_intensity(a)
    assert n.min() == 0 and n.max() == 1 and np.median(n) == pytest.approx(0.5, abs=0.01)
    w = normalize_intensity(a, window=(25, 75))
    assert w[a < 25].max() == 0 and w[(a > 75)].min() == 1
