"""`afloc localize ct.nrrd`: a CT-like volume with a rotated direction round-trips with its geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from phantoms import make_phantom, rotated_direction

from afloc_engine.checkpoint import ModelInfo, save_model
from afloc_engine.cli import main
from afloc_engine.outputs import ijk_to_lps

SPACING = (0.7, 0.8, 2.5)
ORIGIN = (-112.0, 40.5, -310.0)


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    return save_model(tiny_model, tmp_path_factory.mktemp("m") / "tiny", ModelInfo(name="tiny", trained=True))


@pytest.fixture(scope="module")
def ct_path(tmp_path_factory):
    """A (10, 36, 40) HU phantom as NRRD: anisotropic spacing, an origin and a rotated, flipped direction."""
    p = make_phantom((10, 36, 40), "liver", np.random.default_rng(5))
    image = sitk.GetImageFromArray(p.volume.astype(np.int16))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(rotated_direction(30.0))
    path = tmp_path_factory.mktemp("ct") / "ct.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def _localize(*extra: str) -> int:
    return main(["localize", *extra, "--progress", "none"])


def test_volume_round_trips_with_its_geometry(model_dir, ct_path, tmp_path):
    out = tmp_path / "out"
    code = _localize(str(ct_path), "--prompt", "Mass in the liver", "--prompt", "Lung nodule", "--out", str(out),
                     "--model", str(model_dir), "--threshold", "0.4")  # fmt: skip
    assert code == 0
    folder = out / "ct"
    results = json.loads((folder / "results.json").read_text())
    assert results["volume"] == {"axis": 0, "normalization": "volume", "window": [-1150.0, 350.0]}
    src = sitk.ReadImage(str(ct_path))
    heats = []
    for entry in results["prompts"]:
        heat = sitk.ReadImage(str(folder / entry["heatmap"]))
        assert heat.GetSize() == src.GetSize()
        assert heat.GetSpacing() == pytest.approx(src.GetSpacing())
        assert heat.GetOrigin() == pytest.approx(src.GetOrigin())
        assert heat.GetDirection() == pytest.approx(src.GetDirection())
        h = sitk.GetArrayFromImage(heat)
        assert h.dtype == np.float32 and h.min() == pytest.approx(-1) and h.max() == pytest.approx(1)
        heats.append(h)
    seg = slicerio.read_segmentation(str(folder / "masks.seg.nrrd"))
    assert slicerio.segment_names(seg) == ["Mass in the liver", "Lung nodule"]
    # the segmentation's voxel -> LPS matrix is the input's (direction x spacing, origin)
    expected = np.eye(4)
    expected[:3, :3] = np.asarray(src.GetDirection()).reshape(3, 3) @ np.diag(src.GetSpacing())
    expected[:3, 3] = src.GetOrigin()
    np.testing.assert_allclose(seg["ijkToLPS"], expected, atol=1e-6)
    for name, h in zip(["Mass in the liver", "Lung nodule"], heats):
        mask = slicerio.segment_mask(seg, slicerio.segment_from_name(seg, name))  # (i, j, k) = (X, Y, Z)
        np.testing.assert_array_equal(np.transpose(mask, (2, 1, 0)).astype(bool), h > 0.4)
        assert results["prompts"][[p["segment"] for p in results["prompts"]].index(name)]["mask_pixels"] == int(
            (h > 0.4).sum()
        )


def test_axis_normalisation_and_window_options(model_dir, ct_path, tmp_path):
    out = tmp_path / "out"
    options = ["--axis", "2", "--volume-normalization", "slice", "--window=-200,300", "--no-overlay"]
    code = _localize(
        str(ct_path), "--prompt", "Mass in the liver", "--out", str(out), "--model", str(model_dir), *options
    )
    assert code == 0
    results = json.loads((out / "ct" / "results.json").read_text())
    assert results["volume"] == {"axis": 2, "normalization": "slice", "window": [-200.0, 300.0]}
    h = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ct" / results["prompts"][0]["heatmap"])))
    # slice normalisation along X: every sagittal slice spans [-1, 1]
    np.testing.assert_allclose(h.max(axis=(0, 1)), 1.0, atol=1e-5)
    np.testing.assert_allclose(h.min(axis=(0, 1)), -1.0, atol=1e-5)
    assert not (out / "ct" / "overlay.png").exists()


@pytest.mark.parametrize(
    "option, message",
    [(("--window", "300,-200"), "--window"), (("--window", "soft"), "--window"), (("--axis", "3"), "--axis")],
)
def test_bad_volume_options_exit_2_and_write_nothing(model_dir, ct_path, tmp_path, capsys, option, message):
    out = tmp_path / "out"
    code = _localize(str(ct_path), "--prompt", "edema", "--out", str(out), "--model", str(model_dir), *option)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_direction_is_what_the_outputs_use(ct_path):
    """The LPS matrix the writer computes for this volume is the one SimpleITK reads (same axis conventions)."""
    from afloc_engine.io import read_image

    image = read_image(ct_path)
    src = sitk.ReadImage(str(ct_path))
    m = ijk_to_lps(image)
    for ijk in [(0, 0, 0), (39, 0, 0), (3, 35, 9)]:
        np.testing.assert_allclose(m[:3, :3] @ ijk + m[:3, 3], src.TransformIndexToPhysicalPoint(ijk), atol=1e-6)


def test_json_progress_reports_slices_of_a_volume(model_dir, ct_path, tmp_path, capsys):
    code = main(["localize", str(ct_path), "--prompt", "edema", "--out", str(tmp_path / "o"), "--model", str(model_dir),
                 "--progress", "json", "--no-overlay"])  # fmt: skip
    assert code == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    slices = [e for e in events if e.get("unit") == "slices"]
    assert slices and slices[-1]["step"] == slices[-1]["total"] == 10  # the 10 axial slices
    assert [e["step"] for e in slices] == sorted(e["step"] for e in slices)
    assert events[-1]["event"] == "done"


def test_a_native_3d_model_folder_localises_a_volume(ct_path, tmp_path):
    import torch
    from conftest import tiny_config

    from afloc_engine.models import AFLocModel

    torch.manual_seed(0)
    model = AFLocModel(tiny_config(spatial_dims=3, image_size=32)).eval()
    folder = save_model(model, tmp_path / "m3d", ModelInfo(name="tiny3d", trained=True))
    out = tmp_path / "out"
    assert _localize(str(ct_path), "--prompt", "Mass in the liver", "--out", str(out), "--model", str(folder)) == 0
    results = json.loads((out / "ct" / "results.json").read_text())
    heat = sitk.ReadImage(str(out / "ct" / results["prompts"][0]["heatmap"]))
    src = sitk.ReadImage(str(ct_path))
    assert heat.GetSize() == src.GetSize() and heat.GetDirection() == pytest.approx(src.GetDirection())
    assert results["model_id"].startswith("tiny3d@")
