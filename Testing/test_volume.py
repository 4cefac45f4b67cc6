"""Slice-wise and native-3D localisation on volumes: shapes, geometry, normalisation, windows, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config
from phantoms import make_phantom, rotated_direction

from afloc_engine.checkpoint import ModelInfo
from afloc_engine.errors import AFLocError, ImageReadError
from afloc_engine.heatmap import minmax_to_unit
from afloc_engine.inference import AFLoc
from afloc_engine.io import ImageData
from afloc_engine.models import AFLocModel
from afloc_engine.transforms import Letterbox
from afloc_engine.volume import (
    CT_WINDOW,
    VolumeBox,
    VolumeResult,
    looks_like_ct,
    prepare_label_map,
    prepare_volume,
    resolve_window,
    slice_letterbox,
)

PROMPTS = ["There is a mass in the liver", "Findings suggesting lung nodule"]


@pytest.fixture(scope="module")
def ct() -> ImageData:
    """A small CT-like phantom (HU) with anisotropic spacing, an origin and a rotated direction."""
    p = make_phantom((12, 40, 48), "liver", np.random.default_rng(0))
    return ImageData(p.volume, (0.8, 0.8, 2.5), (-120.0, 35.5, 210.0), rotated_direction(25.0))


@pytest.fixture(scope="module")
def afloc3d() -> AFLoc:
    torch.manual_seed(1)
    model = AFLocModel(tiny_config(spatial_dims=3, image_size=32)).eval()
    return AFLoc(model, ModelInfo(name="tiny3d", trained=False), "cpu")


def test_result_has_the_input_shape_and_geometry(tiny_afloc, ct):
    for axis in (0, 1, 2):
        r = tiny_afloc.localize_volume(ct, PROMPTS, threshold=0.25, axis=axis)
        assert isinstance(r, VolumeResult)
        assert r.heatmaps.shape == (2, *ct.array.shape) and r.heatmaps.dtype == np.float32
        assert r.masks.shape == r.heatmaps.shape and r.masks.dtype == bool
        np.testing.assert_array_equal(r.masks, r.heatmaps > 0.25)
        assert r.image.spacing == ct.spacing and r.image.origin == ct.origin and r.image.direction == ct.direction
        assert r.slice_probabilities.shape == (ct.array.shape[axis], 2)
        np.testing.assert_allclose(r.probabilities, r.slice_probabilities.max(axis=0))
        assert np.all((r.probabilities >= 0) & (r.probabilities <= 1))
        # volume normalisation: each prompt's whole volume spans [-1, 1]
        for heat in r.heatmaps:
            assert heat.min() == pytest.approx(-1.0, abs=1e-6) and heat.max() == pytest.approx(1.0, abs=1e-6)


def test_slice_normalisation_is_the_2d_model_on_each_slice(tiny_afloc, ct):
    """normalization='slice' gives, slice by slice, what localize() gives on that slice with the same window."""
    r = tiny_afloc.localize_volume(ct, PROMPTS, normalization="slice", batch_size=5)
    assert r.window == CT_WINDOW  # HU data -> the CT window
    for z in (0, 5, 11):
        s = ImageData(ct.array[z], ct.spacing[:2], (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), window=CT_WINDOW)
        ref = tiny_afloc.localize(s, PROMPTS)
        np.testing.assert_allclose(r.heatmaps[:, z], ref.heatmaps, atol=1e-4)
        np.testing.assert_allclose(r.slice_probabilities[z], ref.probabilities, atol=1e-5)


def test_volume_normalisation_keeps_slices_comparable(tiny_afloc, ct):
    """Volume mode is one affine map per prompt: re-normalising each slice gives slice mode; slice ranges differ."""
    vol = tiny_afloc.localize_volume(ct, PROMPTS[:1], normalization="volume")
    per_slice = tiny_afloc.localize_volume(ct, PROMPTS[:1], normalization="slice")
    renormalised = minmax_to_unit(torch.from_numpy(vol.heatmaps[0])).numpy()
    np.testing.assert_allclose(renormalised, per_slice.heatmaps[0], atol=1e-4)
    spans = vol.heatmaps[0].reshape(ct.array.shape[0], -1)
    spans = spans.max(axis=1) - spans.min(axis=1)
    assert spans.min() < 1.9  # not every slice is stretched to [-1, 1]


def test_axis_is_a_transpose_of_the_volume(tiny_afloc, ct):
    """Slicing along axis 1 equals slicing along axis 0 of the volume with Y moved first (spacing permuted)."""
    r1 = tiny_afloc.localize_volume(ct, PROMPTS[:1], axis=1, normalization="slice")
    moved = np.ascontiguousarray(np.moveaxis(ct.array, 1, 0))  # (Y, Z, X)
    sx, sy, sz = ct.spacing
    other = ImageData(moved, (sx, sz, sy), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    r0 = tiny_afloc.localize_volume(other, PROMPTS[:1], axis=0, normalization="slice", window=r1.window)
    np.testing.assert_allclose(r1.heatmaps[0], np.moveaxis(r0.heatmaps[0], 0, 1), atol=1e-4)


def test_batch_size_and_progress(tiny_afloc, ct):
    calls = []
    a = tiny_afloc.localize_volume(
        ct, PROMPTS[:1], batch_size=1, progress=lambda done, total: calls.append((done, total))
    )
    b = tiny_afloc.localize_volume(ct, PROMPTS[:1], batch_size=64)
    np.testing.assert_allclose(a.heatmaps, b.heatmaps, atol=1e-4)
    assert calls == [(i + 1, 12) for i in range(12)]


def test_intensity_windows(tiny_afloc, ct, rng):
    assert looks_like_ct(ct) and resolve_window(ct) == CT_WINDOW
    mr = ImageData.from_array(rng.uniform(100, 900, (6, 20, 20)).astype(np.float32))
    assert not looks_like_ct(mr)
    low, high = resolve_window(mr)
    assert 100 <= low < 110 and 890 < high <= 900  # the volume's 0.5 / 99.5 percentiles
    assert resolve_window(mr, (0, 50)) == (0.0, 50.0)
    assert resolve_window(ImageData(mr.array, mr.spacing, mr.origin, mr.direction, window=(5, 6))) == (5, 6)
    tagged = ImageData(mr.array, mr.spacing, mr.origin, mr.direction, meta={"modality": "CT"})
    assert resolve_window(tagged) == CT_WINDOW
    # a narrower window changes the network input, hence the heatmap
    wide = tiny_afloc.localize_volume(ct, PROMPTS[:1])
    narrow = tiny_afloc.localize_volume(ct, PROMPTS[:1], window=(-100.0, 200.0))
    assert narrow.window == (-100.0, 200.0) and not np.allclose(wide.heatmaps, narrow.heatmaps)
    for bad in ("soft", (3, 3), (1, float("nan")), "x"):
        with pytest.raises(AFLocError, match="window"):
            resolve_window(ct, bad)


def test_bad_calls_raise_clear_errors(tiny_afloc, ct):
    with pytest.raises(ImageReadError, match="3D volume"):
        tiny_afloc.localize_volume(np.zeros((32, 32), np.float32), PROMPTS)
    with pytest.raises(AFLocError, match="axis"):
        tiny_afloc.localize_volume(ct, PROMPTS, axis=3)
    with pytest.raises(AFLocError, match="normalization"):
        tiny_afloc.localize_volume(ct, PROMPTS, normalization="global")
    with pytest.raises(AFLocError, match="empty prompt"):
        tiny_afloc.localize_volume(ct, [" "])


def test_with_threshold(tiny_afloc, ct):
    r = tiny_afloc.localize_volume(ct, PROMPTS[:1], threshold=0.9)
    r2 = r.with_threshold(-0.5)
    assert r2.threshold == -0.5 and r2.masks.sum() > r.masks.sum()
    np.testing.assert_array_equal(r2.masks, r.heatmaps > -0.5)


def test_slice_letterbox_keeps_physical_aspect():
    assert slice_letterbox(40, 48, 64) == Letterbox.fit(40, 48, 64)
    # 12 slices of 2.5 mm by 48 columns of 0.8 mm: 30 mm x 38.4 mm -> 50 x 64 on the canvas
    box = slice_letterbox(12, 48, 64, (2.5, 0.8))
    assert (box.resized_height, box.resized_width) == (50, 64) and box.top == 7 and box.left == 0


def test_volume_box_round_trip():
    box = VolumeBox.fit((10, 20, 16), 32, (3.0, 1.0, 1.0))
    # 30 x 20 x 16 mm: the longest side becomes 32 voxels, the others keep the aspect ratio, centred
    assert box.resized == (32, 21, 17) and box.offset == (0, 5, 7)
    z, y, x = np.meshgrid(np.linspace(0, 1, 10), np.linspace(0, 1, 20), np.linspace(0, 1, 16), indexing="ij")
    smooth = torch.from_numpy((z + 2 * y - x).astype(np.float32))
    cube = box.apply(smooth[None, None])
    assert cube.shape == (1, 1, 32, 32, 32)
    assert float(cube[0, 0, :, :5].abs().max()) == 0.0 and float(cube[0, 0, :, :, 24:].abs().max()) == 0.0
    back = box.invert(cube[:, 0])[0]
    assert back.shape == smooth.shape
    assert float((back - smooth).abs()[1:-1, 1:-1, 1:-1].max()) < 0.1


def test_label_map_lands_where_its_volume_does():
    p = make_phantom((12, 24, 20), "liver", np.random.default_rng(3))
    data = ImageData(p.volume, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    cube, box = prepare_volume(data, 32, CT_WINDOW)
    labels = prepare_label_map(p.labels, box)
    assert cube.shape == (1, 32, 32, 32) and labels.shape == (32, 32, 32) and labels.dtype == torch.long
    assert set(np.unique(labels.numpy())) == set(np.unique(p.labels))
    # lungs are dark (air-filled) and outside the box is padding (-1 after (x - 0.5) / 0.5)
    lung, liver = cube[0][labels == 1].mean(), cube[0][labels == 3].mean()
    assert lung < liver


def test_native_3d_model_gives_a_heatmap_volume(afloc3d, ct):
    r = afloc3d.localize_volume(ct, PROMPTS)
    assert r.heatmaps.shape == (2, *ct.array.shape) and r.slice_probabilities.shape == (1, 2)
    assert r.heatmaps.min() == pytest.approx(-1) and r.heatmaps.max() == pytest.approx(1)
    assert r.image.direction == ct.direction
    per_slice = afloc3d.localize_volume(ct, PROMPTS, normalization="slice", axis=2)
    for k in (0, 20, 47):
        sl = per_slice.heatmaps[0, :, :, k]
        assert sl.min() == pytest.approx(-1, abs=1e-5) and sl.max() == pytest.approx(1, abs=1e-5)
