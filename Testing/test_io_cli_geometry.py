"""`afloc localize` on real files (pydicom-data, nibabel): every output sits where the input is.

The heatmap NRRDs, masks.seg.nrrd and, for DICOM, the DICOM SEG are read back with SimpleITK,
slicerio and pydicom; their voxel-to-LPS frame must equal SimpleITK's reading of the input
(CT_small.dcm: a 2D CT slice at z = -75.7 mm; MR2_UNCR.dcm: an oblique MR; a CT_small with flipped
rows and columns; MR_small_RLE.dcm: RLE; a NIfTI volume).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import slicerio

from afloc_engine.checkpoint import ModelInfo, save_model
from afloc_engine.cli import main


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    return save_model(tiny_model, tmp_path_factory.mktemp("m") / "tiny", ModelInfo(name="tiny", trained=True))


def _testdata(name: str) -> Path:
    data = pytest.importorskip("pydicom.data")
    path = data.get_testdata_file(name, download=False)  # never fetched at test time
    if path is None:
        pytest.skip(f"{name} is not in pydicom-data")
    return Path(path)


def _flipped_ct(tmp_path: Path) -> Path:
    """CT_small.dcm with its rows running right-to-left and its columns bottom-to-top."""
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
    path = tmp_path / "flipped.dcm"
    ds.save_as(path)
    return path


def _nifti(tmp_path: Path) -> Path:
    nibabel_testing = pytest.importorskip("nibabel.testing")
    return Path(nibabel_testing.data_path) / "anatomical.nii"


def _frame(image: sitk.Image) -> np.ndarray:
    dims = image.GetDimension()
    m = np.eye(4)
    m[:dims, :dims] = np.asarray(image.GetDirection(), dtype=float).reshape(dims, dims) @ np.diag(image.GetSpacing())
    m[:dims, 3] = image.GetOrigin()
    return m


INPUTS = {
    "CT_small": lambda tmp: _testdata("CT_small.dcm"),
    "MR2_UNCR_oblique": lambda tmp: _testdata("MR2_UNCR.dcm"),
    "MR_small_RLE": lambda tmp: _testdata("MR_small_RLE.dcm"),
    "flipped_rows": _flipped_ct,
    "nifti_volume": _nifti,
}


@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_localize_outputs_sit_where_simpleitk_puts_the_input(model_dir, tmp_path, kind, capsys):
    source = INPUTS[kind](tmp_path)
    is_dicom = source.suffix == ".dcm"
    out = tmp_path / "out"
    args = ["localize", str(source), "--prompt", "pleural effusion", "--prompt", "nodule", "--out", str(out)]
    args += ["--model", str(model_dir), "--threshold", "0.0", "--progress", "none", "--no-overlay"]
    assert main(args + (["--dicom-seg"] if is_dicom else [])) == 0, capsys.readouterr().err
    folder = next(p for p in out.iterdir() if p.is_dir())
    results = json.loads((folder / "results.json").read_text())
    ref = sitk.ReadImage(str(source))
    expected = _frame(ref)
    for entry in results["prompts"]:
        heat = sitk.ReadImage(str(folder / entry["heatmap"]))
        assert heat.GetSize() == ref.GetSize()
        np.testing.assert_allclose(_frame(heat), expected, atol=1e-4)
    seg = slicerio.read_segmentation(str(folder / "masks.seg.nrrd"))
    np.testing.assert_allclose(np.asarray(seg["ijkToLPS"], dtype=float), expected, atol=1e-4)
    assert tuple(seg["voxels"].shape[-3:]) == ref.GetSize()  # (layers, i, j, k)
    if is_dicom:
        _assert_seg_matches(folder / "masks.dcm", source)


def _assert_seg_matches(seg_path: Path, source: Path) -> None:
    """The DICOM SEG's planes have the source's position, orientation and pixel spacing."""
    seg = pydicom.dcmread(str(seg_path))
    src = pydicom.dcmread(str(source), stop_before_pixels=True)
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in src.ImageOrientationPatient],
        atol=1e-5,
    )
    np.testing.assert_allclose(
        [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing], [float(v) for v in src.PixelSpacing]
    )
    for frame in seg.PerFrameFunctionalGroupsSequence:
        np.testing.assert_allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in src.ImagePositionPatient],
            atol=1e-4,
        )


def test_flipped_rows_give_the_same_heatmap_pixels_at_the_flipped_place(model_dir, tmp_path):
    """Flipping IOP moves the picture in space, not its pixels: the heatmap follows the image."""
    plain, flipped = _testdata("CT_small.dcm"), _flipped_ct(tmp_path)
    heat = {}
    for name, source in (("plain", plain), ("flipped", flipped)):
        out = tmp_path / name
        args = ["localize", str(source), "--prompt", "nodule", "--out", str(out), "--model", str(model_dir)]
        assert main(args + ["--progress", "none", "--no-overlay"]) == 0
        folder = next(p for p in out.iterdir() if p.is_dir())
        entry = json.loads((folder / "results.json").read_text())["prompts"][0]
        heat[name] = sitk.ReadImage(str(folder / entry["heatmap"]))
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(heat["plain"]), sitk.GetArrayFromImage(heat["flipped"]), atol=1e-6
    )
    # the first pixel stays at IPP; pixel (i, 0) lies i * spacing to the right (-x) instead of the left
    p0 = heat["flipped"].TransformIndexToPhysicalPoint((10, 0, 0))
    q0 = heat["plain"].TransformIndexToPhysicalPoint((10, 0, 0))
    origin = heat["plain"].GetOrigin()
    assert p0[0] - origin[0] == pytest.approx(-(q0[0] - origin[0]))


def test_cli_mixed_size_series_is_one_line_exit_2(model_dir, tmp_path, capfd):
    template = pydicom.dcmread(_testdata("MR_small.dcm"))
    folder = tmp_path / "series"
    folder.mkdir()
    for n, rows in ((1, None), (2, None), (3, 32)):
        ds = template.copy()
        ds.InstanceNumber, ds.ImagePositionPatient = n, [0.0, 0.0, float(n)]
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        if rows:
            ds.Rows = ds.Columns = rows
            ds.PixelData = np.zeros((rows, rows), np.int16).tobytes()
        ds.save_as(folder / f"{n}.dcm")
    out = tmp_path / "out"
    args = ["localize", str(folder), "--prompt", "nodule", "--out", str(out), "--model", str(model_dir)]
    capfd.readouterr()
    assert main(args + ["--progress", "none"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differ in size" in err[0] and str(folder) in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_cli_12_bit_jpeg_decodes_without_library_noise(model_dir, tmp_path, capfd):
    source = _testdata("JPEG-lossy.dcm")
    out = tmp_path / "out"
    args = ["localize", str(source), "--prompt", "nodule", "--out", str(out), "--model", str(model_dir)]
    capfd.readouterr()
    assert main(args + ["--progress", "none", "--no-overlay"]) == 0
    err = capfd.readouterr().err
    for noise in ("Traceback", "pylibjpeg", "Unsupported JPEG", "GDCMImageIO", "UserWarning", "Invalid SOS"):
        assert noise not in err, err
    heat = sitk.ReadImage(str(next(out.glob("*/heatmap_*.nrrd"))))
    assert heat.GetSize() == sitk.ReadImage(str(source)).GetSize()
