"""Colour inputs reach 3-channel models (fundus photographs, histopathology tiles); grey models are unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from afloc_engine.io import ImageData
from afloc_engine.prompts import preset_prompts


def _colour_image(rgb: tuple[int, int, int]) -> ImageData:
    """A 64 x 64 8-bit image: one colour disc on black."""
    yy, xx = np.mgrid[:64, :64]
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[(yy - 32) ** 2 + (xx - 32) ** 2 < 20**2] = rgb
    return ImageData.from_array(pixels)


@pytest.fixture(scope="module")
def colour_afloc():
    from conftest import tiny_config

    from afloc_engine.checkpoint import ModelInfo
    from afloc_engine.inference import AFLoc
    from afloc_engine.models import AFLocModel

    torch.manual_seed(0)
    model = AFLocModel(tiny_config(in_channels=3)).eval()
    return AFLoc(model, ModelInfo(name="tiny-rgb", version="test", trained=False), "cpu")


def test_three_channel_model_sees_the_colours(colour_afloc):
    red, green = _colour_image((200, 0, 0)), _colour_image((0, 102, 0))  # near-equal luminance
    assert abs(float(red.array.max()) - float(green.array.max())) < 1.0
    red_in, _ = colour_afloc.prepare(red)
    green_in, _ = colour_afloc.prepare(green)
    assert red_in.shape == (3, 64, 64)
    centre = (slice(None), 28, 36)
    assert red_in[centre][0] > red_in[centre][1] and green_in[centre][1] > green_in[centre][0]
    a = colour_afloc.localize(red, ["Findings suggesting haemorrhages"]).heatmaps
    b = colour_afloc.localize(green, ["Findings suggesting haemorrhages"]).heatmaps
    assert not np.allclose(a, b)  # grey inputs would be the same picture


def test_grey_model_still_sees_the_luminance(tiny_afloc):
    red = _colour_image((200, 0, 0))
    grey = ImageData.from_array(red.array)
    red_in, _ = tiny_afloc.prepare(red)
    grey_in, _ = tiny_afloc.prepare(grey)
    assert red_in.shape[0] == 1 and torch.equal(red_in, grey_in)


def test_presets_for_the_papers_other_modalities():
    for name, finding in (("fundus", "microaneurysms"), ("histopathology", "necrosis")):
        prompts = preset_prompts(name)
        assert f"Findings suggesting {finding}" in prompts and len(set(prompts)) == len(prompts) >= 5
