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


def test_text_file_named_dcm_is_not_dicom_without_pydicoms_advice(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("Findings: small left pleural effusion.\n" * 20)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert "not a DICOM file" in str(err.value) and str(path) in str(err.value)
    assert "force" not in str(err.value)  # pydicom's "Use force=True" is nothing a CLI user can do


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_bad_files_raise_one_clear_error_naming_the_file(tmp_path, sample_dicom, kind):
    path = _write_bad_files(tmp_path, sample_dicom)[kind]
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert EXPECTED[kind] in str(err.value)
    assert str(path) in str(err.value)


# ---- DICOM read as Slicer reads it (issue 13) ------------------------------------------------------------


def _testdata(name: str):
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)  # never fetched at test time
    if path is None:
        pytest.skip(f"{name} is not in pydicom-data")
    return path


def _sitk_array(path) -> np.ndarray:
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[0]


def test_single_dicom_file_keeps_its_3d_place():
    path = _testdata("CT_small.dcm")
    ds = pydicom.dcmread(path)
    image = read_image(path)
    origin, spacing, direction = image.frame3d()
    assert origin == pytest.approx([float(v) for v in ds.ImagePositionPatient])
    assert spacing[:2] == pytest.approx([float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])])
    np.testing.assert_allclose(direction, np.eye(3), atol=1e-6)
    # the heatmap written from it is a one-slice 3D image at the same place, as SimpleITK reads the input
    written = image.to_sitk()
    ref = sitk.ReadImage(path)
    assert written.GetSize() == ref.GetSize() and written.GetOrigin() == pytest.approx(ref.GetOrigin())


def test_oblique_dicom_direction_comes_from_image_orientation():
    path = _testdata("MR2_UNCR.dcm")
    iop = [float(v) for v in pydicom.dcmread(path, stop_before_pixels=True).ImageOrientationPatient]
    _, _, direction = read_image(path).frame3d()
    np.testing.assert_allclose(direction[:, 0], iop[:3], atol=1e-6)  # along a row (i)
    np.testing.assert_allclose(direction[:, 1], iop[3:], atol=1e-6)  # down a column (j)
    np.testing.assert_allclose(direction[:, 2], np.cross(iop[:3], iop[3:]), atol=1e-5)


@pytest.mark.parametrize("name", ["JPEG-LL.dcm", "JPEG-lossy.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_compressed_dicom_decodes_quietly_to_gdcms_values(name, capfd):
    path = _testdata(name)
    reference = _sitk_array(path).astype(np.float32)
    capfd.readouterr()
    image = read_image(path)
    assert capfd.readouterr().err == ""  # no pydicom traceback, no pylibjpeg or GDCM messages
    np.testing.assert_array_equal(image.array, reference)


def test_gdcm_decodes_when_pydicom_cannot_and_the_picture_is_the_same(monkeypatch):
    """Without working pydicom plug-ins (a plain install, an unusual codec) GDCM decodes; MONOCHROME1
    is then inverted by ITK, and the window follows, so the displayed picture is identical."""
    import afloc_engine.io.dicom as dicom_io
    from afloc_engine.transforms import normalize_intensity

    path = _testdata("RG1_UNCR.dcm")
    by_pydicom = read_image(path)

    def no_plugins(*args, **kwargs):
        raise RuntimeError("Unable to decode: no pixel data handlers are available")

    monkeypatch.setattr(dicom_io, "_pydicom_pipeline", no_plugins)
    by_gdcm = read_image(path)
    assert (by_pydicom.meta["decoder"], by_gdcm.meta["decoder"]) == ("pydicom", "gdcm")
    shown_a = normalize_intensity(by_pydicom.array, by_pydicom.window)
    shown_b = normalize_intensity(by_gdcm.array, by_gdcm.window)
    np.testing.assert_allclose(shown_a, shown_b, atol=1e-6)


def test_undecodable_dicom_is_one_clear_error(tmp_path):
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(_testdata("JPEG-LL.dcm"))
    noise = np.random.default_rng(0).integers(0, 255, 4000, dtype=np.uint8).tobytes()
    ds.PixelData = encapsulate([b"\xff\xd8" + noise + b"\xff\xd9"])  # a JPEG stream no decoder can read
    bad = tmp_path / "broken.dcm"
    ds.save_as(bad)
    with pytest.raises(ImageReadError) as err:
        read_image(bad)
    message = str(err.value)
    assert "\n" not in message and str(bad) in message and "cannot decode the DICOM pixel data" in message


def test_palette_colour_is_applied_and_kept():
    path = _testdata("OBXXXX1A.dcm")
    indices = pydicom.dcmread(path).pixel_array
    image = read_image(path)
    assert image.rgb is not None and image.rgb.shape == (*indices.shape, 3) and image.rgb.dtype == np.uint8
    np.testing.assert_array_equal(image.rgb, _sitk_array(path))  # GDCM applies the same colour table
    np.testing.assert_allclose(image.array, image.rgb @ np.array([0.299, 0.587, 0.114]), atol=1e-3)
    assert not np.array_equal(image.array, indices.astype(np.float32))  # not the raw palette indices


def test_modality_lut_sequence_and_voi_lut_sequence_are_applied():
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(_testdata("mlut_18.dcm"))
    np.testing.assert_allclose(read_image(_testdata("mlut_18.dcm")).array, apply_modality_lut(ds.pixel_array, ds))
    ds = pydicom.dcmread(_testdata("vlut_04.dcm"))
    image = read_image(_testdata("vlut_04.dcm"))
    np.testing.assert_allclose(image.array, apply_voi_lut(ds.pixel_array, ds))
    bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    assert image.window == (0.0, 2.0**bits - 1)


def test_window_follows_voi_lut_function():
    from afloc_engine.io.dicom import dicom_window

    ds = pydicom.Dataset()
    ds.WindowCenter, ds.WindowWidth = 40, 400
    assert dicom_window(ds) == (40 - 0.5 - 399 / 2, 40 - 0.5 + 399 / 2)
    ds.VOILUTFunction = "LINEAR_EXACT"
    assert dicom_window(ds) == (-160.0, 240.0)


def _series_file(template, folder, number, rows=None):
    ds = template.copy()
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    if rows is not None:
        ds.Rows = ds.Columns = rows
        ds.PixelData = np.zeros((rows, rows), np.int16).tobytes()
    ds.save_as(folder / f"slice{number}.dcm")


def test_series_whose_files_differ_in_size_is_one_clear_error(tmp_path, capfd):
    template = pydicom.dcmread(_testdata("MR_small.dcm"))
    for n in (1, 2, 3):
        _series_file(template, tmp_path, n)
    _series_file(template, tmp_path, 4, rows=32)
    capfd.readouterr()
    with pytest.raises(ImageReadError) as err:
        read_image(tmp_path)
    message = str(err.value)
    assert "differ in size" in message and "64x64 px (3 files)" in message and "32x32 px (1 file)" in message
    assert "\n" not in message and capfd.readouterr().err == ""  # no ITK dump


def test_series_folder_reads_as_a_volume_with_gdcm_geometry(tmp_path):
    template = pydicom.dcmread(_testdata("MR_small.dcm"))
    for n in (1, 2, 3):
        _series_file(template, tmp_path, n)
    image = read_image(tmp_path)
    assert image.is_volume and image.array.shape == (3, 64, 64)
    assert image.spacing[2] == pytest.approx(1.0) and image.origin[2] == pytest.approx(1.0)


# ---- rasters ------------------------------------------------------------------------------------------------


def test_float_and_16_bit_tiff_keep_their_values(tmp_path):
    radiograph = np.linspace(0, 1, 64 * 80, dtype=np.float32).reshape(64, 80)
    Image.fromarray(radiograph, mode="F").save(tmp_path / "float.tif")
    image = read_image(tmp_path / "float.tif")
    np.testing.assert_array_equal(image.array, radiograph)  # not two grey levels
    assert len(np.unique(image.array)) == radiograph.size
    a16 = (np.arange(64 * 80).reshape(64, 80) * 12).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "a16.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "a16.tif").array, a16.astype(np.float32))


def test_rgb_channels_are_kept_for_colour_models(tmp_path):
    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 200, 30
    Image.fromarray(rgb).save(tmp_path / "fundus.png")
    image = read_image(tmp_path / "fundus.png")
    np.testing.assert_array_equal(image.rgb, rgb)
    assert image.array.mean() == pytest.approx(0.299 * 200 + 0.114 * 30, abs=0.01)  # grey models: luminance
    assert image.with_array(np.zeros((40, 50), np.float32)).rgb is None  # a heatmap does not carry colour
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_image(tmp_path / "palette.png").rgb, rgb)
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(tmp_path / "grey.png")
    assert read_image(tmp_path / "grey.png").rgb is None


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_colour_keeps_16_bits(tmp_path, suffix):
    rgb16 = np.random.default_rng(0).integers(0, 65535, (20, 30, 3)).astype(np.uint16)
    path = tmp_path / f"rgb16{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(rgb16, isVector=True), str(path))
    image = read_image(path)
    np.testing.assert_array_equal(image.rgb, rgb16.astype(np.float32))  # Pillow alone gives 8 bits
    assert image.array.max() > 255


def test_images_above_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch):
    from afloc_engine.io import MAX_PIXELS

    big = tmp_path / "big.png"
    Image.new("1", (12000, 8000)).save(big)  # 96 megapixels, a few kB on disk
    with pytest.raises(ImageReadError) as err:
        read_image(big)
    assert f"limit of {MAX_PIXELS / 1e6:g} megapixels" in str(err.value) and "12000x8000" in str(err.value)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(bomb)  # 200 megapixels: Pillow's DecompressionBombError
    with pytest.raises(ImageReadError, match="too large"):
        read_image(bomb)
    monkeypatch.setenv("AFLOC_MAX_PIXELS", "1000")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ImageReadError, match="too large"):
        read_image(tmp_path / "small.png")
    with pytest.raises(ImageReadError, match="too large"):
        read_image(_testdata("CT_small.dcm"))  # 128 x 128 DICOM: checked from the header


# ---- NRRD / NIfTI -------------------------------------------------------------------------------------------


def test_nifti2_through_nibabel_keeps_its_oblique_frame(tmp_path):
    nib = pytest.importorskip("nibabel")
    angle = np.deg2rad(30)
    affine = np.eye(4)
    affine[:3, :3] = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    ) @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = [10, -20, 30]
    data = np.random.default_rng(0).random((20, 16, 6)).astype(np.float32)
    nib.save(nib.Nifti2Image(data, affine), tmp_path / "v2.nii")
    image = read_image(tmp_path / "v2.nii")
    from afloc_engine.outputs import ijk_to_lps

    np.testing.assert_allclose(ijk_to_lps(image), np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine, atol=1e-5)
    np.testing.assert_array_equal(image.array, data.transpose(2, 1, 0))


def test_rgb_nrrd_keeps_its_channels(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "tile.nrrd"))
    image = read_image(tmp_path / "tile.nrrd")
    np.testing.assert_array_equal(image.rgb, rgb)
    assert image.array.shape == (30, 40)


def test_enhanced_multiframe_is_a_volume_with_its_functional_group_rescale():
    path = _testdata("eCT_Supplemental.dcm")  # enhanced CT: rescale in the functional groups, 2 frames
    image = read_image(path)
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(path)).astype(np.float32)  # GDCM applies it: HU
    assert image.is_volume and image.array.shape == reference.shape
    np.testing.assert_array_equal(image.array, reference)
    assert min(image.spacing) > 0  # GDCM's -10 mm between frames becomes a flipped direction column


def test_arrays_are_writable_so_torch_does_not_warn(tmp_path):
    Image.fromarray(np.full((20, 30, 3), 9, np.uint8)).save(tmp_path / "colour.png")
    image = read_image(tmp_path / "colour.png")
    assert image.array.flags.writeable and image.rgb.flags.writeable
