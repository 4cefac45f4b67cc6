"""What the clinician sees: background + heatmap + mask outline blended by Slicer's own slice logic.

The heatmap's hot region is made known: heatmaps we construct over a known region are written by
the engine's writer (afloc_engine.outputs.write_results), imported by the module's logic, shown
with its heat colour table, and composited by the real ``vtkMRMLSliceLogic``. The test checks that
the hot colours lie over the region and that the rest of the image is left untouched.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (headless MRML) is not installed")

import slicer_fakes as sf  # noqa: E402
from AFLocSlicerLib import Scene, SceneResults  # noqa: E402
from AFLocSlicerLib.Logic import AFLocLogic  # noqa: E402
from test_slicer_logic import engine_results_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOCS_PNG = REPO / "docs" / "slicer_overlay.png"
SCREENSHOT_PNG = REPO / "Resources" / "Screenshots" / "AFLocSlicer-overlay.png"  # the extension's screenshot URL
TWO_INPUTS_PNG = REPO / "docs" / "slicer_two_inputs.png"
SIZE = 512


def heat_from_mask(mask: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    """(H, W) heatmap in [-1, 1] like a real one: graded, hottest at the region's core, -1 far from it."""
    from scipy.ndimage import distance_transform_edt, gaussian_filter

    depth = distance_transform_edt(mask)
    inside = np.where(mask, 0.45 + 0.55 * depth / max(float(depth.max()), 1.0), 0.0)
    smooth = gaussian_filter(inside.astype(np.float32), sigma)
    return (2 * smooth / max(float(smooth.max()), 1e-6) - 1).astype(np.float32)


def show_and_composite(scene, tmp_path, volume, region: np.ndarray, prompt: str, opacity: float = 0.6):
    """Import engine results whose heatmap is hot over ``region`` (H, W); return (composite, background-only,
    view->voxel map, results)."""
    logic = AFLocLogic(scene, python="unused", env={}, adaptersDir=tmp_path / "adapters", warm=False)
    exported = Scene.exportVolume(volume, tmp_path / "input.nrrd")
    folder = engine_results_folder(tmp_path, exported, [heat_from_mask(region)], [prompt], probabilities=[0.8])
    results = SceneResults.importResults(scene, volume, folder)
    logic.showResults(results, 0, opacity)
    label = logic.exportLabelmap(results)
    plain = sf.composite_png(scene, volume, None, 0.0, None, SIZE)
    seen = sf.composite_png(scene, volume, results.heatmaps[0], opacity, label, SIZE)
    return seen, plain, sf.view_to_ijk(scene, volume, SIZE), results


def region_in_view(region: np.ndarray, ijk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inside, valid): view pixels over ``region``, and view pixels over the image at all."""
    i = np.rint(ijk[..., 0]).astype(int)
    j = np.rint(ijk[..., 1]).astype(int)
    valid = (i >= 0) & (j >= 0) & (i < region.shape[1]) & (j < region.shape[0])
    inside = np.zeros(valid.shape, bool)
    inside[valid] = region[j[valid], i[valid]]
    return inside, valid


def check_hot_over_region(seen: np.ndarray, plain: np.ndarray, region: np.ndarray, ijk: np.ndarray) -> dict:
    from scipy.ndimage import binary_dilation, binary_erosion

    core = binary_erosion(region, iterations=8)
    far = ~binary_dilation(region, iterations=25)
    inside, valid = region_in_view(core, ijk)
    outside, _ = region_in_view(far, ijk)
    outside &= valid
    hot = seen.max(axis=-1).astype(int) - seen.min(axis=-1).astype(int)  # colourfulness: 0 on the grey image
    change = np.abs(seen.astype(int) - plain.astype(int)).sum(axis=-1)
    stats = {
        "hot_inside": float(hot[inside].mean()),
        "hot_outside": float(hot[outside].mean()),
        "changed_outside": float((change[outside] > 6).mean()),
    }
    assert inside.sum() > 500 and outside.sum() > 500, "the region and its surroundings must both be in view"
    assert stats["hot_inside"] > 40, stats  # strongly coloured over the region (inferno: purple-red-orange)
    assert stats["hot_outside"] < 5, stats  # grey elsewhere
    assert stats["changed_outside"] < 0.01, stats  # and the image untouched there (transparent heat colours)
    return stats


def test_heatmap_lies_over_a_known_square_on_the_dicom_radiograph(tmp_path, sample_dicom):
    scene = sf.make_scene()
    volume = sf.load_dicom_volume(scene, sample_dicom)
    h, w = Scene.volumeArray(volume).shape[1:]
    region = np.zeros((h, w), bool)
    region[h // 5 : h // 2, w // 2 : w - w // 6] = True  # upper right of the image
    seen, plain, ijk, _ = show_and_composite(scene, tmp_path, volume, region, "Findings suggesting pneumothorax")
    check_hot_over_region(seen, plain, region, ijk)


def test_heatmap_lies_over_the_radiologist_mask_on_an_oblique_covid_image(tmp_path, shared_data):
    from PIL import Image, ImageDraw

    image_id = "d45d56d1db55"
    folder = shared_data / "covid-cxr"
    scene = sf.make_scene()
    m = sf.oblique_ijk_to_ras((0.7, 0.7, 1.0), (-20.0, 35.0, 4.0), angles=(0.0, 0.0, 0.35))  # in-plane rotation
    volume = sf.load_raster_volume(scene, folder / "images" / f"{image_id}.jpg", m)
    with Image.open(folder / "masks" / f"{image_id}__ground_glass_opacity.png") as mask_image:
        region = np.asarray(mask_image) > 127
    seen, plain, ijk, results = show_and_composite(scene, tmp_path, volume, region, "ground glass opacity")
    stats = check_hot_over_region(seen, plain, region, ijk)
    assert results.findings == ["ground glass opacity"]

    # one such picture for the README: what the clinician sees (the colour legend Slicer draws over the view
    # from the heatmap's legend node), with a caption strip
    (legend,) = sf.visible_legends(scene)
    assert legend.GetDisplayableNode() is results.heatmaps[0] and "ground glass opacity" in legend.GetTitleText()
    picture = Image.fromarray(sf.draw_legend(seen, legend))
    strip = Image.new("RGB", (SIZE, 40), (20, 20, 20))
    draw = ImageDraw.Draw(strip)
    draw.text(
        (8, 4),
        "AFLocSlicer: heatmap (inferno, transparent where unlikely) + mask outline + legend, Slicer's slice view",
        fill=(230, 230, 230),
    )
    draw.text(
        (8, 20),
        "covid-cxr dev image, ground-glass opacity (heatmap constructed over the radiologist mask)",
        fill=(170, 170, 170),
    )
    sheet = Image.new("RGB", (SIZE, SIZE + 40))
    sheet.paste(picture, (0, 0))
    sheet.paste(strip, (0, SIZE))
    out = tmp_path / "slicer_overlay.png"
    sheet.save(out)
    assert stats["hot_inside"] > 40
    for target in (DOCS_PNG, SCREENSHOT_PNG):  # refreshed on request (AFLOC_UPDATE_DOCS=1) or when missing
        if os.environ.get("AFLOC_UPDATE_DOCS") or not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            sheet.save(target)


# --- results belong to their input ------------------------------------------------------------------
@pytest.mark.slow
def test_two_radiographs_shown_in_turn_show_only_their_own_results(tmp_path, sample_dicom, shared_data):
    """Two radiographs (both at the RAS origin, as Slicer loads them), localised with the default model through
    the documented Python call, then shown in turn: each view holds only the shown input's AFLoc results."""
    from PIL import Image

    scene = sf.make_scene()
    dicom = sf.load_dicom_volume(scene, sample_dicom)
    jpeg = sf.load_raster_volume(scene, shared_data / "covid-cxr" / "images" / "d45d56d1db55.jpg")
    logic = AFLocLogic(scene, python=sys.executable, adaptersDir=tmp_path / "adapters")
    logic.shutdown()  # a fresh engine for this test (the session's server is shared)
    starts = logic.server.starts
    try:
        runs = {}
        for volume in (dicom, jpeg):
            runs[volume.GetID()] = logic.localize(
                volume, ["Findings suggesting pneumothorax", "pleural effusion"], device="cpu", timeout=600
            )
            # the API call shows what the panel shows: the input with its first heatmap and legend
            composite = sf.slice_logic_of(scene).GetSliceCompositeNode()
            assert composite.GetBackgroundVolumeID() == volume.GetID()
            assert composite.GetForegroundVolumeID() == runs[volume.GetID()].heatmaps[0].GetID()
        for results in runs.values():
            logic.exportLabelmap(results)  # label maps too: they are slice-view layers as well
        pictures = []
        for shown, other in ((dicom, jpeg), (jpeg, dicom)):
            mine, theirs = runs[shown.GetID()], runs[other.GetID()]
            assert logic.showInput(shown, opacity=0.8).segmentation is mine.segmentation
            composite = sf.slice_logic_of(scene).GetSliceCompositeNode()
            layers = {
                composite.GetBackgroundVolumeID(),
                composite.GetForegroundVolumeID(),
                composite.GetLabelVolumeID(),
            }
            assert layers == {shown.GetID(), mine.heatmaps[0].GetID(), mine.labelmap.GetID()}
            assert mine.segmentation.GetDisplayNode().GetVisibility()
            assert not theirs.segmentation.GetDisplayNode().GetVisibility()  # its outline is not drawn over us
            assert [n.GetDisplayableNode().GetID() for n in sf.visible_legends(scene)] == [mine.heatmaps[0].GetID()]
            view = sf.view_png(scene, SIZE)
            # pixel for pixel what the shown input and its own results alone give
            alone = sf.composite_png(scene, shown, mine.heatmaps[0], 0.8, mine.labelmap, SIZE)
            assert np.array_equal(view, alone)
            with_other = sf.composite_png(scene, shown, mine.heatmaps[0], 0.8, theirs.labelmap, SIZE)
            assert not np.array_equal(view, with_other)  # the other's label map would show: the check can fail
            logic.showInput(shown, opacity=0.8)  # restore the view the module set
            pictures.append(sf.draw_legend(sf.view_png(scene, SIZE), sf.visible_legends(scene)[0]))
        sheet = Image.new("RGB", (2 * SIZE, SIZE))
        for k, picture in enumerate(pictures):
            sheet.paste(Image.fromarray(picture), (k * SIZE, 0))
        sheet.save(tmp_path / "two_inputs.png")
        if os.environ.get("AFLOC_UPDATE_DOCS") or not TWO_INPUTS_PNG.exists():
            sheet.save(TWO_INPUTS_PNG)
        # a second run of the same input sits beside the first, named apart; replace=True swaps it
        again = logic.localize(dicom, ["Findings suggesting pneumothorax"], device="cpu", timeout=600)
        assert [r.label for r in logic.runsFor(dicom)] == ["default #1", "default #2"]
        assert again.heatmaps[0].GetName() == f"{dicom.GetName()} AFLoc pneumothorax [default #2]"
        assert again.segmentation.GetAttribute("AFLoc.ModelId").startswith("default@")
        assert again.segmentation.GetAttribute("AFLoc.Adapter") == ""
        logic.localize(dicom, ["Findings suggesting pneumothorax"], device="cpu", timeout=600, replace=True)
        assert [r.label for r in logic.runsFor(dicom)] == ["default #3"]
        assert logic.server.starts == starts + 1  # one warm engine served every run
        assert AFLocLogic(scene, python=sys.executable).server is logic.server  # one per session
    finally:
        logic.shutdown()
