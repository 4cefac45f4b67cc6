"""Light outputs on a real radiograph (issue 13 item 6): ``afloc localize RG1_UNCR.dcm --preset cxr`` with
the embedded default model writes at most 20 MB, every heatmap file holds ``model.localize``'s values
within 0.01 and opens with the input's geometry in SimpleITK and in Slicer (slicer-core's volume
storage node), and no library's log lines reach the terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from afloc_engine.prompts import preset_prompts

MAX_BYTES = 20 * 10**6


@pytest.fixture(scope="module")
def cli_run(sample_dicom, tmp_path_factory):
    """One cold ``afloc localize RG1_UNCR.dcm --preset cxr`` in a child process (stderr as a user sees it)."""
    out = tmp_path_factory.mktemp("light") / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # the user's default warning filters
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "afloc_engine",
            "localize",
            str(sample_dicom),
            "--preset",
            "cxr",
            "--out",
            str(out),
            "--progress",
            "none",
            "--device",
            "cpu",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "RG1_UNCR", done


@pytest.fixture(scope="module")
def reference(sample_dicom):
    import afloc_engine

    return afloc_engine.load_model("default", "cpu").localize(str(sample_dicom), preset_prompts("cxr"))


def test_outputs_of_14_prompts_are_light(cli_run):
    folder, _ = cli_run
    files = [p for p in folder.iterdir() if p.is_file()]
    assert len([p for p in files if p.name.startswith("heatmap_")]) == 14
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES  # 162 MB before (float32 at full resolution)


def test_heatmap_files_hold_the_model_values_within_001(cli_run, reference, sample_dicom):
    folder, _ = cli_run
    results = json.loads((folder / "results.json").read_text())
    assert [p["prompt"] for p in results["prompts"]] == reference.prompts
    src = reference.image.to_sitk()
    for entry, heat in zip(results["prompts"], reference.heatmaps):
        stored = sitk.ReadImage(str(folder / entry["heatmap"]))
        assert stored.GetSize() == src.GetSize()
        assert stored.GetSpacing() == pytest.approx(src.GetSpacing())
        assert stored.GetOrigin() == pytest.approx(src.GetOrigin())
        assert stored.GetDirection() == pytest.approx(src.GetDirection())
        values = sitk.GetArrayFromImage(stored)
        assert values.dtype == np.float32
        assert np.abs(values - heat).max() <= 0.01


def test_heatmap_files_open_in_slicer_with_their_values(cli_run, reference):
    slicer = pytest.importorskip("slicer", reason="slicer-core (headless MRML) is not installed")
    from vtk.util import numpy_support

    folder, _ = cli_run
    results = json.loads((folder / "results.json").read_text())
    for index in (0, 13):
        node = slicer.vtkMRMLScalarVolumeNode()
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(folder / results["prompts"][index]["heatmap"]))
        storage.SetSingleFile(True)
        assert storage.ReadData(node)
        data = node.GetImageData()
        dims = data.GetDimensions()
        assert dims[:2] == (1841, 1955)
        values = numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()).reshape(dims[1], dims[0])
        assert np.abs(values - reference.heatmaps[index]).max() <= 0.01
        assert node.GetSpacing()[:2] == pytest.approx(reference.image.spacing)


def test_no_library_log_noise_on_the_terminal(cli_run):
    _, done = cli_run
    noise = (
        "Traceback",
        "pydicom",
        "UserWarning",
        "FutureWarning",
        "DeprecationWarning",
        "transformers",
        "ITK",
        "WARNING: In ",
    )  # noqa: E501
    for line in done.stderr.splitlines():
        assert not any(word in line for word in noise), line
        # every line is the engine's own: the command's prefix, a logged warning naming the file, or a
        # prompt's specificity (indented, with its warning) under the line naming the input
        assert line.startswith(("afloc localize:", "WARNING: ", '  "', "    WARNING: ")), line


def test_specificity_of_large_maps_is_computed_on_a_subsample_with_the_same_result(monkeypatch):
    """``assess`` (run twice per localisation) subsamples radiograph-sized maps; the scores stay put."""
    import torch

    from afloc_engine import specificity

    grid = torch.from_numpy(np.random.default_rng(0).normal(size=(4, 1, 14, 14)).astype(np.float32))
    maps = torch.nn.functional.interpolate(grid, size=(1955, 1841), mode="bilinear")[:, 0].numpy()
    prompts = ["a", "b", "c", "d"]
    fast = specificity.assess(maps, prompts)
    monkeypatch.setattr(specificity, "ASSESS_MAX_PIXELS", maps[0].size)
    full = specificity.assess(maps, prompts)
    for f, g in zip(fast, full):
        assert f.specificity == pytest.approx(g.specificity, abs=2e-3)
        assert f.lung_correlation == pytest.approx(g.lung_correlation, abs=2e-3)
