"""The reference inference pieces (converted AFLoc checkpoints): 8-bit INTER_AREA letterbox, scipy smoothing,
canvas range, config validation; engine-trained models keep the engine's pieces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from afloc_engine.config import REFERENCE_INFERENCE, AFLocConfig
from afloc_engine.errors import ConfigError
from afloc_engine.transforms import Letterbox, area_resize_uint8, prepare_image_reference, to_uint8


@pytest.mark.parametrize("shape", [(512, 497), (487, 512), (512, 512), (448, 448), (1024, 1000), (300, 257)])
def test_area_resize_equals_opencv_inter_area(shape):
    cv2 = pytest.importorskip("cv2")
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    box = Letterbox.fit_reference(*shape, 224)
    ours = area_resize_uint8(image, box.resized_height, box.resized_width)
    theirs = cv2.resize(image, (box.resized_width, box.resized_height), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(ours, theirs)


def test_area_resize_equals_opencv_on_real_radiographs(shared_data):
    cv2 = pytest.importorskip("cv2")
    for path in sorted((shared_data / "covid-cxr" / "images").glob("*.jpg"))[:12]:
        image = cv2.imread(str(path), 0)
        box = Letterbox.fit_reference(*image.shape, 224)
        theirs = cv2.resize(image, (box.resized_width, box.resized_height), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(area_resize_uint8(image, box.resized_height, box.resized_width), theirs)


def test_reference_letterbox_truncates_and_pads_floor_ceil():
    box = Letterbox.fit_reference(512, 497, 224)  # 497 * 224 / 512 = 217.4 -> 217 (round would give 217 too)
    assert (box.resized_height, box.resized_width, box.top, box.left) == (224, 217, 0, 3)
    box = Letterbox.fit_reference(422, 512, 224)  # 422 * 0.4375 = 184.625 -> 184 (round: 185)
    assert (box.resized_height, box.resized_width, box.top, box.left) == (184, 224, 20, 0)
    assert Letterbox.fit(422, 512, 224).resized_height == 185


def test_to_uint8_keeps_8_bit_pixels_and_scales_others():
    eight = np.array([[0, 17], [128, 255]], np.float32)
    np.testing.assert_array_equal(to_uint8(eight), eight.astype(np.uint8))
    twelve = np.array([[0, 1000], [2000, 4000]], np.float32)
    np.testing.assert_array_equal(to_uint8(twelve), [[0, 64], [128, 255]])  # x * 255 / max, rounded
    negative = np.array([[-1000, 0], [1000, 3000]], np.float32)  # min-max to [0, 255]
    np.testing.assert_array_equal(to_uint8(negative), [[0, 64], [128, 255]])


def test_prepare_image_reference_has_no_window_and_zero_padding():
    image = np.full((100, 50), 200.0, np.float32)
    image[0, 0] = 0.0  # a percentile window would stretch the rest; the reference's /255 does not
    canvas, box = prepare_image_reference(image, 64)
    assert canvas.shape == (1, 64, 64) and (box.resized_height, box.resized_width) == (64, 32)
    inside = canvas[0, 5:-5, box.left + 2 : box.left + box.resized_width - 2]
    torch.testing.assert_close(inside, torch.full_like(inside, (200 / 255 - 0.5) / 0.5))
    assert (canvas[0, :, : box.left] == -1).all()  # zero padding, normalised


def test_reference_pieces_are_validated():
    config = AFLocConfig(**REFERENCE_INFERENCE)
    assert config.inference_mode == "reference" and config.similarity == "dot"
    with pytest.raises(ConfigError, match="go together"):
        AFLocConfig(intensity_scaling="uint8")
    with pytest.raises(ConfigError, match="smoothing_mode must be one of"):
        AFLocConfig(smoothing_mode="gaussian")
    with pytest.raises(ConfigError, match="probability_scale must be > 0"):
        AFLocConfig(probability_scale=0.0)


def test_engine_models_keep_the_engine_pieces(tiny_afloc):
    from afloc_engine.cli.info import describe

    defaults = AFLocConfig()
    assert defaults.inference_mode == "engine" and defaults.heatmap_range == "image"
    assert not defaults.encoder_align_corners and defaults.smoothing_mode == "replicate"
    info = describe("default", "cpu")
    assert info["inference_mode"] == "engine" and "smoothing_mode=replicate" in info["inference_pieces"]
    # an engine model's heatmap spans exactly [-1, 1] over the image (min-max over the image's pixels)
    heat = tiny_afloc.localize(np.random.default_rng(0).random((90, 60)).astype(np.float32), ["edema"]).heatmaps
    assert heat.min() == pytest.approx(-1.0) and heat.max() == pytest.approx(1.0)
