"""Images in, with their geometry: DICOM, PNG/JPEG, NRRD/NIfTI/MHA.

Every reader returns :class:`ImageData`: the pixels as float32 (H, W) for a 2D image or
(Z, Y, X) for a volume, and the geometry (spacing, origin, direction in LPS, as SimpleITK
and DICOM use) that outputs need to overlay the input exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from afloc_engine.errors import ImageReadError

log = logging.getLogger(__name__)

DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
ITK_SUFFIXES = {".nrrd", ".nhdr", ".nii", ".mha", ".mhd", ".nii.gz"}


@dataclass
class ImageData:
    """Pixels and geometry of one image.

    array: float32, (H, W) for 2D or (Z, Y, X) for 3D, in the image's own units (HU for CT,
    stored values for radiographs; MONOCHROME1 already inverted so that bright = dense).
    spacing/origin: per axis in x, y[, z] order, mm. direction: row-major 2x2 or 3x3 (LPS).
    window: (low, high) display window from the file, if any.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    source: Path | None = None
    window: tuple[float, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_volume(self) -> bool:
        return self.array.ndim == 3

    def with_array(self, array: np.ndarray) -> ImageData:
        """Same geometry, other pixels (e.g. a heatmap)."""
        return dataclasses.replace(self, array=array)

    def to_sitk(self, array: np.ndarray | None = None):  # noqa: ANN201 (SimpleITK.Image; import is lazy)
        """A SimpleITK image with this geometry (2D images become 2D ITK images)."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.array if array is None else array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def from_array(cls, array: np.ndarray, spacing: tuple[float, ...] | None = None) -> ImageData:
        """Wrap a numpy array with unit spacing, zero origin and identity direction."""
        array = np.asarray(array)
        if array.ndim == 3 and array.shape[-1] in (3, 4):
            array = rgb_to_grey(array)
        dims = array.ndim
        if dims not in (2, 3):
            raise ImageReadError(f"expected a 2D image or 3D volume, got an array of shape {array.shape}")
        spacing = tuple(float(s) for s in (spacing or (1.0,) * dims))
        return cls(
            array.astype(np.float32, copy=False),
            spacing,
            (0.0,) * dims,
            tuple(float(v) for v in np.eye(dims).ravel()),
        )


def read_image(path: str | Path) -> ImageData:
    """Read an image file, checking it is a finite, non-empty 2D image or 3D volume.

    Raises :class:`ImageReadError` naming the file and the problem (missing, empty, truncated,
    not an image, 4D, NaN/Inf pixels).
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError("file not found", path)
    if path.is_dir():
        image = _read_dicom_series(path)
    else:
        if path.stat().st_size == 0:
            raise ImageReadError("file is empty (0 bytes)", path)
        suffix = "".join(path.suffixes[-2:]).lower() if path.name.lower().endswith(".nii.gz") else path.suffix.lower()
        if suffix in DICOM_SUFFIXES or (suffix not in RASTER_SUFFIXES | ITK_SUFFIXES and _looks_like_dicom(path)):
            image = _read_dicom(path)
        elif suffix in RASTER_SUFFIXES:
            image = _read_raster(path)
        elif suffix in ITK_SUFFIXES:
            image = _read_itk(path)
        else:
            raise ImageReadError(
                f"not a supported image type {suffix!r} (DICOM, PNG, JPEG, TIFF, NRRD, NIfTI, MHA)", path
            )
    image.source = path
    _check_pixels(image, path)
    return image


def _check_pixels(image: ImageData, path: Path) -> None:
    array = image.array
    if array.ndim not in (2, 3):
        raise ImageReadError(f"expected a 2D image or a 3D volume, got {array.ndim} dimensions {array.shape}", path)
    if array.size == 0 or min(array.shape) == 0:
        raise ImageReadError(f"image has no pixels (shape {array.shape})", path)
    if array.ndim == 2 and min(array.shape) < 8:
        raise ImageReadError(f"image is too small ({array.shape[1]}x{array.shape[0]} px)", path)
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - finite.sum())
        raise ImageReadError(f"{bad} pixel(s) are NaN or infinite", path)


def rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3|4) -> (H, W) luminance (ITU-R BT.601 weights), float32."""
    rgb = rgb[..., :3].astype(np.float32)
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _looks_like_dicom(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _read_raster(path: Path) -> ImageData:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(img, dtype=np.float32)
            elif img.mode in ("L", "P", "LA", "1"):
                array = np.asarray(img.convert("L"), dtype=np.float32)
            else:
                array = rgb_to_grey(np.asarray(img.convert("RGB")))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"cannot read image (truncated or not an image?): {err}", path) from None
    image = ImageData.from_array(array)
    return image


def _read_itk(path: Path) -> ImageData:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        reason = next((line for line in first if "ERROR" in line or "rror" in line), first[-1] if first else "")
        raise ImageReadError(f"cannot read image (truncated or not an image?): {reason.strip()}", path) from None
    if img.GetDimension() > 3:
        raise ImageReadError(f"4D images are not supported (size {img.GetSize()}); split it into volumes", path)
    if img.GetNumberOfComponentsPerPixel() > 1:
        comps = img.GetNumberOfComponentsPerPixel()
        if comps in (3, 4) and img.GetDimension() == 2:
            array = rgb_to_grey(sitk.GetArrayFromImage(img))
        else:
            raise ImageReadError(f"vector image with {comps} components per pixel is not supported", path)
    else:
        array = sitk.GetArrayFromImage(img).astype(np.float32)
    dims = img.GetDimension()
    if dims == 3 and array.shape[0] == 1:
        # a single-slice volume (how Slicer saves a radiograph) is a 2D image
        array = array[0]
        d = np.array(img.GetDirection()).reshape(3, 3)
        return ImageData(
            array,
            tuple(img.GetSpacing()[:2]),
            tuple(img.GetOrigin()[:2]),
            tuple(float(v) for v in d[:2, :2].ravel()),
            meta={"slice_origin_z": img.GetOrigin()[2], "slice_spacing_z": img.GetSpacing()[2], "direction3": d},
        )
    return ImageData(array, tuple(img.GetSpacing()), tuple(img.GetOrigin()), tuple(img.GetDirection()))


def _read_dicom(path: Path) -> ImageData:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path))
        pixels = ds.pixel_array
    except (InvalidDicomError, AttributeError, KeyError, ValueError, OSError, EOFError) as err:
        raise ImageReadError(f"cannot read DICOM pixels (truncated or not an image?): {err}", path) from None
    except Exception as err:  # pydicom raises assorted types for broken pixel data
        raise ImageReadError(f"cannot decode DICOM pixel data: {type(err).__name__}: {err}", path) from None
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(f"multi-frame DICOM ({frames} frames) is not supported; give a series folder", path)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        array = rgb_to_grey(pixels)
    else:
        array = pixels.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    array = array * slope + intercept
    window = _dicom_window(ds)
    if photometric == "MONOCHROME1":
        # bright = dense after inversion, like MONOCHROME2
        low, high = float(array.min()), float(array.max())
        array = (low + high) - array
        if window is not None:
            window = (low + high - window[1], low + high - window[0])
    spacing = _dicom_spacing(ds, path)
    return ImageData(
        array.astype(np.float32),
        spacing,
        (0.0, 0.0),
        (1.0, 0.0, 0.0, 1.0),
        window=window,
        meta={
            "modality": str(getattr(ds, "Modality", "")),
            "photometric": photometric,
            "sop_instance_uid": str(getattr(ds, "SOPInstanceUID", "")),
        },
    )


def _dicom_window(ds: Any) -> tuple[float, float] | None:  # noqa: ANN401
    center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if center is None or width is None:
        return None
    try:
        center = float(center[0] if isinstance(center, (list, tuple)) or hasattr(center, "__len__") else center)
        width = float(width[0] if isinstance(width, (list, tuple)) or hasattr(width, "__len__") else width)
    except (TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        return None
    return center - width / 2, center + width / 2


def _dicom_spacing(ds: Any, path: Path) -> tuple[float, float]:  # noqa: ANN401
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = getattr(ds, tag, None)
        if value is not None and len(value) == 2:
            row, col = float(value[0]), float(value[1])
            if row > 0 and col > 0:
                return col, row
    log.warning("%s: no valid pixel spacing in the DICOM header; using 1 mm", path)
    return 1.0, 1.0


def _read_dicom_series(folder: Path) -> ImageData:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise ImageReadError("folder holds no DICOM series", folder)
    if len(series) > 1:
        log.warning("%s: %d DICOM series found; reading the first", folder, len(series))
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    if len(files) == 1:
        return _read_dicom(Path(files[0]))
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except RuntimeError as err:
        raise ImageReadError(f"cannot read DICOM series: {err}", folder) from None
    return ImageData(
        sitk.GetArrayFromImage(img).astype(np.float32),
        tuple(img.GetSpacing()),
        tuple(img.GetOrigin()),
        tuple(img.GetDirection()),
    )
