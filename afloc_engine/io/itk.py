"""NRRD, NIfTI, MHA/MHD through SimpleITK (what Slicer uses); NIfTI-2 through nibabel when installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from afloc_engine.errors import ImageReadError
from afloc_engine.io.image import ImageData, check_pixel_limit, first_line, positive_frame, quiet_libraries, rgb_to_grey


def read_itk(path: Path) -> ImageData:
    """Read an NRRD/NIfTI/MHA image with its geometry (LPS, as SimpleITK gives it).

    A one-slice volume (how Slicer saves a radiograph) becomes a 2D image that keeps its 3D place
    (``meta["direction3"]`` etc.). RGB(A) images keep their channels in ``rgb``. Raises
    :class:`ImageReadError` for unreadable files, 4D images, vector images other than RGB(A) and
    slices above the pixel limit.
    """
    import SimpleITK as sitk

    with quiet_libraries() as printed:
        try:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
        except RuntimeError as err:
            fallback = _read_nibabel(path)
            if fallback is not None:
                return fallback
            reason = first_line(err) or (printed[-1] if printed else "")
            raise ImageReadError(f"cannot read image (truncated or not an image?): {reason}", path) from None
        size = reader.GetSize()
        if len(size) > 3:
            raise ImageReadError(f"4D images are not supported (size {size}); split it into volumes", path)
        check_pixel_limit(size[0], size[1], path)
        try:
            img = reader.Execute()
        except RuntimeError as err:
            raise ImageReadError(f"cannot read image (truncated or not an image?): {first_line(err)}", path) from None
    comps = img.GetNumberOfComponentsPerPixel()
    rgb = None
    if comps > 1:
        if comps not in (3, 4):
            raise ImageReadError(f"vector image with {comps} components per pixel is not supported", path)
        channels = sitk.GetArrayFromImage(img)[..., :3]
        rgb = channels if channels.dtype == np.uint8 else channels.astype(np.float32)
        array = rgb_to_grey(channels)
    else:
        array = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)
    origin, spacing, direction = positive_frame(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    return _image(array, origin, spacing, direction, rgb)


def _image(
    array: np.ndarray,
    origin: tuple[float, ...],
    spacing: tuple[float, ...],
    direction: tuple[float, ...],
    rgb: np.ndarray | None,
) -> ImageData:
    if len(spacing) == 3 and array.shape[0] == 1:
        # a single-slice volume is a 2D image that keeps its place in 3D
        d = np.asarray(direction, dtype=float).reshape(3, 3)
        return ImageData(
            array[0],
            tuple(spacing[:2]),
            tuple(origin[:2]),
            tuple(float(v) for v in d[:2, :2].ravel()),
            meta={"slice_origin_z": float(origin[2]), "slice_spacing_z": float(spacing[2]), "direction3": d},
            rgb=None if rgb is None else rgb[0],
        )
    return ImageData(array, tuple(spacing), tuple(origin), tuple(direction), rgb=rgb)


def _read_nibabel(path: Path) -> ImageData | None:
    """A NIfTI that SimpleITK cannot read (NIfTI-2) through nibabel, in LPS; None when nibabel cannot either."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    try:
        import nibabel as nib
    except ImportError:
        return None
    try:
        img = nib.load(str(path))
    except Exception:  # nibabel raises assorted types for files it does not know  # noqa: BLE001
        return None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageReadError(f"{type(img).__name__} files are not images this engine reads (NIfTI volumes)", path)
    shape = img.shape
    if len(shape) > 3 and any(s > 1 for s in shape[3:]):
        raise ImageReadError(f"4D images are not supported (size {shape}); split it into volumes", path)
    shape3 = tuple(shape[:3]) + (1,) * (3 - len(shape[:3]))
    check_pixel_limit(shape3[0], shape3[1], path)
    data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape3)
    affine = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(img.affine, dtype=float)[:3]  # RAS -> LPS
    columns = affine[:, :3]
    spacing = np.linalg.norm(columns, axis=0)
    spacing[spacing == 0] = 1.0
    direction = columns / spacing
    array = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))  # (i, j, k) -> (k, j, i)
    return _image(array, tuple(affine[:, 3]), tuple(spacing), tuple(direction.ravel()), None)
