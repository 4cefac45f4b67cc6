"""Images in: every format keeps its geometry; every bad file fails with its name and the problem."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image

from afloc_engine.errors import ImageReadError
from afloc_engine.io import read_image


def test_dicom_monochrome1_is_inverted_and_window_follows(sample_dicom):
    ds = pydicom.dcmread(sample_dicom)
    raw = ds.pixel_array.astype(np.float32)
    image = read_image(sample_dicom)
    assert image.array.shape == raw.shape and image.meta["photometric"] == "MONOCHROME1"
    # inverted: the brightest stored value becomes the darkest
    assert np.corrcoef(image.array.ravel()[::97], raw.ravel()[::97])[0, 1] < -0.999
    low, high = image.window
    # PS3.3 C.11.2.1.2 LINEAR: black at <= c - 0.5 - (w - 1) / 2, white above c - 0.5 + (w - 1) / 2
    assert high - low == pytest.approx(float(ds.WindowWidth) - 1)
    assert image.spacing == (1.0, 1.0)  # the header's PixelSpacing is 0\0: fall back, don't divide by zero


def test_png_8_and_16_bit_and_rgb(tmp_path):
    a16 = (np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) * 10).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "a16.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a16.png").array, a16.astype(np.float32))
    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    grey = read_image(tmp_path / "rgb.png").array
    assert grey.shape == (40, 50) and grey.mean() == pytest.approx(0.587 * 200, abs=0.01)


def test_nrrd_geometry_is_kept(tmp_path):
    img = sitk.GetImageFromArray(np.random.default_rng(0).random((12, 30, 40)).astype(np.float32))
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-10.0, 20.0, 5.0))
    img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(tmp_path / "ct.nrrd"))
    image = read_image(tmp_path / "ct.nrrd")
    assert image.is_volume and image.array.shape == (12, 30, 40)
    assert image.spacing == pytest.approx((0.7, 0.8, 2.5)) and image.origin == pytest.approx((-10, 20, 5))
    assert image.direction == pytest.approx((0, 1, 0, -1, 0, 0, 0, 0, 1))


def _write_bad_files(tmp_path, sample_dicom):
    files = {}
    files["empty"] = tmp_path / "empty.png"
    files["empty"].write_bytes(b"")
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(tmp_path / "ok.png")
    files["truncated_png"] = tmp_path / "truncated.png"
    files["truncated_png"].write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    files["truncated_dicom"] = tmp_path / "truncated.dcm"
    files["truncated_dicom"].write_bytes(sample_dicom.read_bytes()[:5000])
    files["text"] = tmp_path / "notes.png"
    files["text"].write_text("this is not an image")
    files["unknown_type"] = tmp_path / "report.docx"
    files["unknown_type"].write_text("x")
    four_d = sitk.GetImageFromArray(np.zeros((2, 3, 8, 8), np.float32), isVector=False)
    files["4d"] = tmp_path / "series.nrrd"
    sitk.WriteImage(four_d, str(files["4d"]))
    nan = np.ones((32, 32), np.float32)
    nan[3, 4] = np.nan
    files["nan"] = tmp_path / "nan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(files["nan"]))
    inf = np.ones((32, 32), np.float32)
    inf[0, 0] = np.inf
    files["inf"] = tmp_path / "inf.mha"
    sitk.WriteImage(sitk.GetImageFromArray(inf), str(files["inf"]))
    files["missing"] = tmp_path / "missing.dcm"
    return files


EXPECTED = {
    "empty": "0 bytes",
    "truncated_png": "truncated",
    "truncated_dicom": "DICOM",
    "text": "not an image",
    "unknown_type": "not a supported image type",
    "4d": "4D",
    "nan": "NaN or infinite",
    "inf": "NaN or infinite",
    "missing": "not found",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_bad_files_raise_one_clear_error_naming_the_file(tmp_path, sample_dicom, kind):
    path = _write_bad_files(tmp_path, sample_dicom)[kind]
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert EXPECTED[kind] in str(err.value)
    assert str(path) in str(err.value)
