"""Every image file pydicom-data, nibabel and slicerio ship is read with SimpleITK's geometry.

For each file: when SimpleITK (ITK/GDCM, what Slicer uses) or pydicom can open it, ``read_image``
reads it and its voxel-to-LPS frame (origin, spacing, direction; 2D images as one-slice 3D frames)
equals SimpleITK's reading (pydicom's header where only pydicom can read the file); when neither
can, ``read_image`` raises one :class:`ImageReadError` of one line naming the file.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from afloc_engine.errors import ImageReadError
from afloc_engine.io import read_image
from afloc_engine.outputs import ijk_to_lps

pytest.importorskip("pydicom.data")


def _pydicom_paths() -> list[Path]:
    """What ``pydicom.data.get_testdata_files()`` lists, globbed from the package folders (pydicom's
    test_files and pydicom-data's ``data_store``) so that nothing is ever downloaded."""
    import importlib.util

    from pydicom.data.data_manager import DATA_ROOT

    folders = [Path(DATA_ROOT) / "test_files"]
    spec = importlib.util.find_spec("data_store")  # the pydicom-data package
    if spec is not None and spec.origin:
        folders.append(Path(spec.origin).parent / "data")
    return sorted(p for folder in folders if folder.is_dir() for p in folder.rglob("*") if p.suffix != ".py")


def _pydicom_files() -> list[Path]:
    return [p for p in _pydicom_paths() if p.is_file()]


def _pydicom_folders() -> list[Path]:
    return [p for p in _pydicom_paths() if p.is_dir()]


def _itk_files() -> list[Path]:
    folders = []
    try:
        import nibabel.testing

        folders.append(Path(nibabel.testing.data_path))
    except ImportError:
        pass
    try:
        import slicerio

        folders.append(Path(slicerio.__file__).parent)
    except ImportError:
        pass
    found = []
    for folder in folders:
        for f in folder.rglob("*"):
            if f.is_file() and f.name.lower().endswith((".nii", ".nii.gz", ".nrrd", ".nhdr")):
                found.append(f)
    return sorted(found)


def _id(path: Path) -> str:
    parts = path.parts
    for anchor in ("test_files", "data", "slicerio"):
        if anchor in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(anchor) :])
    return path.name


def _sitk_read(path: Path):
    """SimpleITK's full reading (pixels too, so 'can open' means it decodes), or None."""
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError:
        return None


def _frame(image: sitk.Image) -> np.ndarray:
    """4x4 voxel (i, j, k) -> LPS matrix of a SimpleITK image (a 2D image in the z = 0 plane)."""
    dims = image.GetDimension()
    m = np.eye(4)
    d = np.asarray(image.GetDirection(), dtype=float).reshape(dims, dims)
    m[:dims, :dims] = d @ np.diag(image.GetSpacing())
    m[:dims, 3] = image.GetOrigin()
    return m


def _pydicom_decodes(path: Path):
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(str(path))
            ds.pixel_array  # noqa: B018 (decodes)
            return ds
        except Exception:  # noqa: BLE001
            return None


def _header_frame(ds) -> np.ndarray:
    """The frame a one-frame DICOM header gives: IPP, IOP (row, column, normal), Pixel Spacing."""
    m = np.eye(4)
    row, col = (np.array([float(v) for v in ds.ImageOrientationPatient[i : i + 3]]) for i in (0, 3))
    col_spacing, row_spacing = float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])
    m[:3, 0] = row * col_spacing
    m[:3, 1] = col * row_spacing
    m[:3, 3] = [float(v) for v in ds.ImagePositionPatient]
    return m


def _assert_same_frame(image, expected: np.ndarray, is_2d_single: bool) -> None:
    got = ijk_to_lps(image)
    if is_2d_single:  # the k column of a one-slice image carries no position; compare i, j and the origin
        np.testing.assert_allclose(got[:3, [0, 1, 3]], expected[:3, [0, 1, 3]], atol=1e-4)
    else:
        np.testing.assert_allclose(got, expected, atol=1e-4)


def _assert_one_line_error(path: Path) -> None:
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("path", _pydicom_files(), ids=_id)
def test_pydicom_data_file_reads_with_simpleitk_geometry(path, capfd):
    ref = _sitk_read(path)
    ds = _pydicom_decodes(path)
    if ref is None and ds is None:
        _assert_one_line_error(path)
        return
    capfd.readouterr()  # what the reference readers printed
    try:
        image = read_image(path)
    except ImageReadError as err:
        size = ref.GetSize()[:2] if ref is not None else (int(ds.Columns), int(ds.Rows))
        # the engine's one refusal of a readable file: images under 8 px a side (no network input)
        assert "too small" in str(err) and min(size) < 8, str(err)
        return
    if ref is not None:
        ref_array = sitk.GetArrayFromImage(ref)
        if ref.GetNumberOfComponentsPerPixel() > 1:
            ref_array = ref_array[..., 0]
        assert image.array.shape == ref_array.squeeze(axis=0).shape if ref_array.shape[0] == 1 else ref_array.shape
        _assert_same_frame(image, _frame(ref), not image.is_volume)
        # the heatmap NRRDs are written through to_sitk: the same frame and size as the input
        written = image.to_sitk(np.zeros(image.array.shape, np.float32))
        assert written.GetSize() == ref.GetSize()
        np.testing.assert_allclose(_frame(written), _frame(ref), atol=1e-4)
    else:  # only pydicom opens it: the header's frame
        assert image.array.shape == ds.pixel_array.shape
        if "ImagePositionPatient" in ds and "PixelSpacing" in ds and not image.is_volume:
            _assert_same_frame(image, _header_frame(ds), True)
    assert image.array.dtype == np.float32 and np.isfinite(image.array).all()
    # no library noise on the terminal (pydicom warnings, pylibjpeg messages, GDCM's prints)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("path", _itk_files(), ids=_id)
def test_nifti_nrrd_test_file_reads_with_simpleitk_geometry(path):
    ref = _sitk_read(path)
    if ref is None:
        nib = pytest.importorskip("nibabel")
        try:
            nib_img = nib.load(str(path))
        except Exception:  # noqa: BLE001
            nib_img = None
        if not isinstance(nib_img, (nib.Nifti1Image, nib.Nifti2Image)) or any(s > 1 for s in nib_img.shape[3:]):
            _assert_one_line_error(path)  # not an image (CIFTI), or 4D
            return
        # NIfTI-2: nibabel's affine (RAS) is the reference, turned into LPS
        image = read_image(path)
        expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(nib_img.affine, dtype=float)
        np.testing.assert_allclose(ijk_to_lps(image), expected, atol=1e-4)
        assert image.array.shape == tuple(reversed(nib_img.shape[:3]))
        return
    if ref.GetDimension() > 3 or ref.GetNumberOfComponentsPerPixel() not in (1, 3, 4):
        _assert_one_line_error(path)
        return
    image = read_image(path)
    single = ref.GetDimension() == 3 and ref.GetSize()[2] == 1
    _assert_same_frame(image, _frame(ref), single)
    written = image.to_sitk(np.zeros(image.array.shape, np.float32))  # how heatmaps are written
    assert written.GetSize() == ref.GetSize()
    np.testing.assert_allclose(_frame(written), _frame(ref), atol=1e-4)
    assert image.array.size * max(1, ref.GetNumberOfComponentsPerPixel()) == math.prod(ref.GetSize()) * max(
        1, ref.GetNumberOfComponentsPerPixel()
    )


@pytest.mark.parametrize("folder", _pydicom_folders(), ids=_id)
def test_pydicom_data_folder_reads_as_simpleitk_series(folder):
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    ref = None
    if series:
        files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
        reader.SetFileNames(files)
        try:
            ref = reader.Execute()
        except RuntimeError:
            ref = None
    if ref is None:
        _assert_one_line_error(folder)
        return
    image = read_image(folder)
    single = ref.GetSize()[2] == 1
    assert image.is_volume != single
    _assert_same_frame(image, _frame(ref), single)
