"""Images in, with their geometry: DICOM (files and series), PNG/JPEG/TIFF, NRRD/NIfTI/MHA.

Every reader returns :class:`ImageData`: the pixels as float32 (H, W) for a 2D image or (Z, Y, X)
for a volume, and the geometry (spacing, origin, direction in LPS, as SimpleITK and DICOM use) that
outputs need to overlay the input exactly; the geometry equals SimpleITK's reading of the file (what
Slicer shows). Colour inputs keep their channels in ``ImageData.rgb``.

- :mod:`afloc_engine.io.dicom`: DICOM through pydicom + pylibjpeg, GDCM (SimpleITK) as fallback.
- :mod:`afloc_engine.io.raster`: PNG/JPEG/BMP/TIFF through Pillow.
- :mod:`afloc_engine.io.itk`: NRRD/NIfTI/MHA through SimpleITK (NIfTI-2 through nibabel).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from afloc_engine.errors import ImageReadError
from afloc_engine.io.dicom import looks_like_dicom, read_dicom_file, read_dicom_series
from afloc_engine.io.image import MAX_PIXELS, ImageData, max_pixels, quiet_libraries, rgb_to_grey
from afloc_engine.io.itk import read_itk
from afloc_engine.io.raster import read_raster

__all__ = [
    "DICOM_SUFFIXES",
    "ITK_SUFFIXES",
    "MAX_PIXELS",
    "RASTER_SUFFIXES",
    "ImageData",
    "max_pixels",
    "quiet_libraries",
    "read_image",
    "rgb_to_grey",
]

DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
ITK_SUFFIXES = {".nrrd", ".nhdr", ".nii", ".mha", ".mhd", ".nii.gz"}


def read_image(path: str | Path) -> ImageData:
    """Read an image file or a DICOM series folder, checking it is a finite, non-empty 2D image or 3D volume.

    Returns :class:`ImageData` (float32 pixels, LPS geometry equal to SimpleITK's reading, window,
    colour channels). Raises :class:`ImageReadError` naming the file and the problem (missing, empty,
    truncated, not an image, undecodable, 4D, above the pixel limit, NaN/Inf pixels, a series whose
    files differ in size).
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError("file not found", path)
    if path.is_dir():
        image = read_dicom_series(path)
    else:
        if path.stat().st_size == 0:
            raise ImageReadError("file is empty (0 bytes)", path)
        name = path.name.lower()
        suffix = ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()
        if suffix in DICOM_SUFFIXES or (suffix not in RASTER_SUFFIXES | ITK_SUFFIXES and looks_like_dicom(path)):
            image = read_dicom_file(path)
        elif suffix in RASTER_SUFFIXES:
            image = read_raster(path)
        elif suffix in ITK_SUFFIXES:
            image = read_itk(path)
        else:
            raise ImageReadError(
                f"not a supported image type {suffix!r} (DICOM, PNG, JPEG, TIFF, NRRD, NIfTI, MHA)", path
            )
    image.source = path
    _check_pixels(image, path)
    # writable arrays (memory-mapped or Pillow-backed ones are not): torch and MONAI warn on read-only ones
    if not image.array.flags.writeable:
        image.array = image.array.copy()
    if image.rgb is not None and not image.rgb.flags.writeable:
        image.rgb = image.rgb.copy()
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
