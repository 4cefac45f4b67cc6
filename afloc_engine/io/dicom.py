"""DICOM files and series folders, read as Slicer reads them.

Geometry comes from ITK/GDCM through SimpleITK (the readers Slicer uses): origin from Image Position
(Patient), direction from Image Orientation (Patient) (oblique and flipped rows included), spacing
from Pixel Spacing, else Imager Pixel Spacing, else 1 mm with a warning. Pixels are decoded by
pydicom with the pylibjpeg plug-ins (JPEG, JPEG-LS, JPEG 2000, RLE) and, where those fail (e.g.
12-bit JPEG Extended), by GDCM through SimpleITK. Then the standard's pipeline: palette colour
tables applied, Modality LUT (rescale or LUT sequence), the VOI window kept in ``ImageData.window``
(a VOI LUT sequence is applied), MONOCHROME1 inverted so bright = dense as a radiologist sees it.
Library warnings and GDCM's prints never reach the terminal; a failure is one :class:`ImageReadError`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from afloc_engine.errors import ImageReadError
from afloc_engine.io.image import (
    ImageData,
    check_pixel_limit,
    first_line,
    log,
    positive_frame,
    quiet_libraries,
    rgb_to_grey,
)

_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422")


NOT_DICOM = "not a DICOM file (no DICOM header, and no pixel data found without one)"


def looks_like_dicom(path: Path) -> bool:
    """True when the file has the DICOM preamble ('DICM' at byte 128)."""
    with path.open("rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def read_dicom_file(path: Path) -> ImageData:
    """Read one DICOM file: a 2D image (one frame) or a volume (a multi-frame file, frames along Z).

    Returns float32 pixels in the Modality LUT's units (HU for CT), geometry in LPS equal to
    SimpleITK's reading of the file (a 2D image keeps its 3D place in ``meta["direction3"]``,
    ``meta["slice_origin_z"]``, ``meta["slice_spacing_z"]``), the VOI window, colour in ``rgb``.
    Raises :class:`ImageReadError` for non-DICOM or non-image files, truncated or undecodable pixel
    data and images above the pixel limit.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    # pydicom's own message ends in "Use force=True to force reading", which a CLI user cannot act on
    errors = (InvalidDicomError, AttributeError, KeyError, ValueError, TypeError, OSError, EOFError)
    forced = False
    try:
        with quiet_libraries():
            ds = pydicom.dcmread(str(path))
    except InvalidDicomError:
        # no preamble/meta header (old ACR-NEMA style files): GDCM and pydicom's force mode still read some
        try:
            with quiet_libraries():
                ds = pydicom.dcmread(str(path), force=True)
            forced = True
        except errors:
            raise ImageReadError(NOT_DICOM, path) from None
        if "PixelData" not in ds:
            raise ImageReadError(NOT_DICOM, path) from None
    except errors as err:
        raise ImageReadError(f"cannot read DICOM (truncated or not DICOM?): {first_line(err)}", path) from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = str(getattr(ds, "Modality", "") or "").strip()
        raise ImageReadError(f"DICOM file holds no image (no pixel data{f'; a {kind} object' if kind else ''})", path)
    rows, columns = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    check_pixel_limit(columns, rows, path)
    frames = _frames(ds)
    pixels, rgb, decoder, window = _decode(ds, path)
    if frames == 1 and pixels.ndim == 3:
        pixels = pixels[0]
        rgb = None if rgb is None else rgb[0]
    geometry = _geometry(ds, path)
    meta = {
        "modality": str(getattr(ds, "Modality", "") or ""),
        "photometric": _photometric(ds),
        "frames": frames,
        "transfer_syntax": _transfer_syntax(ds),
        "decoder": decoder,
    }
    if frames == 1:
        # a DICOM SEG can reference only a proper DICOM file (one with a meta header)
        meta["sop_instance_uid"] = "" if forced else str(getattr(ds, "SOPInstanceUID", "") or "")
        origin, spacing, d3 = geometry
        return ImageData(
            pixels,
            spacing[:2],
            origin[:2],
            tuple(float(v) for v in np.asarray(d3).reshape(3, 3)[:2, :2].ravel()),
            window=window,
            meta={
                **meta,
                "direction3": np.asarray(d3).reshape(3, 3),
                "slice_origin_z": origin[2],
                "slice_spacing_z": spacing[2],
            },
            rgb=rgb,
        )
    origin, spacing, direction = geometry
    return ImageData(pixels, spacing, origin, direction, window=window, meta=meta, rgb=rgb)


def _frames(ds: Any) -> int:  # noqa: ANN401 (pydicom Dataset)
    try:
        return max(1, int(getattr(ds, "NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _photometric(ds: Any) -> str:  # noqa: ANN401
    return str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper()


def _transfer_syntax(ds: Any) -> str:  # noqa: ANN401
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return "" if uid is None else str(getattr(uid, "name", uid))


# ---- pixels -------------------------------------------------------------------------------------------


def _decode(ds: Any, path: Path) -> tuple[np.ndarray, np.ndarray | None, str, tuple[float, float] | None]:  # noqa: ANN401
    """(grey float32 (F, H, W) or (H, W), rgb or None, decoder name, window) after the standard's LUTs."""
    try:
        with quiet_libraries():
            raw = ds.pixel_array
        grey, rgb, window = _pydicom_pipeline(ds, raw)
        return grey, rgb, "pydicom", window
    except Exception as err:  # pydicom and its plug-ins raise assorted types for data they cannot decode  # noqa: BLE001
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # "Unable to decode as exceptions were raised by all available plugins:" -> the first plug-in's reason
        pydicom_error = lines[1] if len(lines) > 1 and lines[0].endswith(":") else first_line(err)
    try:
        grey, rgb, window = _sitk_pixels(ds, path)
    except ImageReadError as err:
        raise ImageReadError(
            f"cannot decode the DICOM pixel data ({_transfer_syntax(ds) or 'unknown transfer syntax'}): "
            f"pydicom: {pydicom_error}; GDCM: {err.problem}",
            path,
        ) from None
    log.debug("%s: pydicom could not decode (%s); decoded by GDCM", path, pydicom_error)
    return grey, rgb, "gdcm", window


def _pydicom_pipeline(ds: Any, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float] | None]:  # noqa: ANN401
    """Stored values -> (grey float32, rgb or None, window): palette, Modality LUT, VOI, MONOCHROME1."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    photometric = _photometric(ds)
    frames = _frames(ds)
    if photometric == "PALETTE COLOR":
        with quiet_libraries():
            rgb = apply_color_lut(raw, ds)
        if rgb.dtype != np.uint8:  # 16-bit palette entries: their top 8 bits, as an 8-bit display shows them
            rgb = (np.asarray(rgb, dtype=np.uint32) >> 8).astype(np.uint8)
        return rgb_to_grey(rgb), rgb, None
    if photometric in _COLOUR or (raw.ndim == (4 if frames > 1 else 3) and raw.shape[-1] in (3, 4)):
        # pydicom converts YBR to RGB while decoding
        return rgb_to_grey(raw), _compact_rgb(raw), None
    with quiet_libraries():
        values = _modality(ds, raw, apply_modality_lut)
        if _voi_lut_only(ds):
            values = apply_voi_lut(values, ds, index=0, prefer_lut=True)
    grey = np.asarray(values, dtype=np.float32)
    window = _voi_lut_range(ds) if _voi_lut_only(ds) else dicom_window(ds)
    if window is None and "VOILUTSequence" not in ds:
        frame_voi = _functional_item(ds, "FrameVOILUTSequence", 0)  # enhanced multi-frame
        window = None if frame_voi is None else dicom_window(frame_voi)
    if photometric == "MONOCHROME1":
        # bright = dense; the window follows so the picture shown is the one the radiologist sees
        total = float(grey.min()) + float(grey.max())
        grey = total - grey
        if window is not None:
            window = (total - window[1], total - window[0])
    return grey, None, window


def _functional_item(ds: Any, keyword: str, frame: int) -> Any:  # noqa: ANN401
    """The first item of ``keyword`` in frame ``frame``'s functional groups, else in the shared ones."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    for groups, index in ((per_frame, frame), (shared, 0)):
        if groups and len(groups) > index:
            sequence = groups[index].get(keyword)
            if sequence:
                return sequence[0]
    return None


def _modality(ds: Any, raw: np.ndarray, apply_modality_lut: Any) -> np.ndarray:  # noqa: ANN401
    """The Modality LUT: top-level rescale / LUT sequence, or an enhanced file's per-frame rescale."""
    top_level = any(k in ds for k in ("ModalityLUTSequence", "RescaleSlope", "RescaleIntercept"))
    if top_level or not any(k in ds for k in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence")):
        return apply_modality_lut(raw, ds)
    frames = raw[None] if _frames(ds) == 1 and raw.ndim == 2 else raw
    out = frames.astype(np.float32)
    for index in range(out.shape[0]):
        item = _functional_item(ds, "PixelValueTransformationSequence", index)
        if item is not None:
            slope = float(item.get("RescaleSlope", 1.0) or 1.0)
            intercept = float(item.get("RescaleIntercept", 0.0) or 0.0)
            out[index] = out[index] * np.float32(slope) + np.float32(intercept)
    return out[0] if out.shape[0] == 1 and raw.ndim == 2 else out


def _compact_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)[..., :3]
    return rgb if rgb.dtype == np.uint8 else rgb.astype(np.float32)


def _voi_lut_only(ds: Any) -> bool:  # noqa: ANN401
    """A VOI LUT Sequence and no window: the LUT is applied (a window is kept as a window)."""
    return "VOILUTSequence" in ds and dicom_window(ds) is None


def _voi_lut_range(ds: Any) -> tuple[float, float] | None:  # noqa: ANN401
    try:
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        bits = int(descriptor[2])
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    return (0.0, float(2**bits - 1)) if 0 < bits <= 16 else None


def dicom_window(ds: Any) -> tuple[float, float] | None:  # noqa: ANN401 (pydicom Dataset)
    """(low, high) of the first VOI window, in Modality LUT units, as PS3.3 C.11.2.1.2 defines it.

    LINEAR (the default) maps values <= c - 0.5 - (w - 1) / 2 to black and > c - 0.5 + (w - 1) / 2
    to white; LINEAR_EXACT and SIGMOID use c -/+ w / 2. None when there is no valid window.
    """
    center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if center is None or width is None:
        return None
    try:
        center = float(center[0] if _is_multi(center) else center)
        width = float(width[0] if _is_multi(width) else width)
    except (TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(center) and math.isfinite(width)):
        return None
    function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function == "LINEAR":
        if width < 1:
            return None
        return center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    if width <= 0:
        return None
    return center - width / 2, center + width / 2


def _is_multi(value: Any) -> bool:  # noqa: ANN401
    return not isinstance(value, (str, bytes)) and hasattr(value, "__len__")


def _sitk_pixels(ds: Any, path: Path) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float] | None]:  # noqa: ANN401
    """Pixels decoded by GDCM: ITK applies the palette, the rescale and turns MONOCHROME1 into MONOCHROME2."""
    import SimpleITK as sitk

    with quiet_libraries() as printed:
        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError as err:
            raise ImageReadError(first_line(err) or (printed[-1] if printed else "unreadable"), path) from None
    array = sitk.GetArrayFromImage(img)
    if img.GetNumberOfComponentsPerPixel() > 1:
        return rgb_to_grey(array), _compact_rgb(array), None
    grey = array.astype(np.float32, copy=False)
    return grey, None, _itk_window(ds)


def _itk_window(ds: Any) -> tuple[float, float] | None:  # noqa: ANN401 (a pydicom Dataset)
    """The file's VOI window for pixels as ITK/GDCM returns them: for MONOCHROME1, ITK stored
    (2^bits - 1) - s and then rescaled, v' = slope (M - s) + b = C - v with C = slope M + 2 b, so the
    window is mirrored about C / 2."""
    window = dicom_window(ds)
    if window is None or _photometric(ds) != "MONOCHROME1":
        return window
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    total = slope * float(2 ** int(getattr(ds, "BitsStored", 16)) - 1) + 2 * intercept
    return (total - window[1], total - window[0])


# ---- geometry -----------------------------------------------------------------------------------------


def _geometry(ds: Any, path: Path) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:  # noqa: ANN401
    """(origin (3,), spacing (3,), direction (9,)) in LPS: GDCM's reading, with the header's in-plane spacing."""
    import SimpleITK as sitk

    header_spacing = dicom_spacing(ds, path)
    try:
        with quiet_libraries():
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
        origin, spacing, direction = reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection()
    except RuntimeError:
        origin, spacing, direction = _header_geometry(ds, header_spacing)
    if len(spacing) != 3:  # pragma: no cover - GDCM always gives 3D
        origin, spacing, direction = _header_geometry(ds, header_spacing)
    origin, spacing, direction = positive_frame(origin, spacing, direction)
    if header_spacing is not None:
        spacing = (header_spacing[0], header_spacing[1], spacing[2])
    return origin, spacing, direction


def dicom_spacing(ds: Any, path: Path) -> tuple[float, float] | None:  # noqa: ANN401
    """(column, row) spacing in mm: Pixel Spacing, else Imager Pixel Spacing, else 1 mm with a warning.

    Returns None (GDCM's value stands) for enhanced multi-frame files, whose spacing lives in their
    functional groups.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = getattr(ds, keyword, None)
        try:
            if value is not None and len(value) == 2:
                row, col = float(value[0]), float(value[1])
                if row > 0 and col > 0 and math.isfinite(row) and math.isfinite(col):
                    return col, row
        except (TypeError, ValueError):
            continue
    if "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds:
        return None
    log.warning("%s: no valid pixel spacing in the DICOM header; using 1 mm", path)
    return 1.0, 1.0


def _header_geometry(
    ds: Any,  # noqa: ANN401
    spacing_xy: tuple[float, float] | None,
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Geometry from the header alone, for files GDCM cannot read (e.g. one-frame RT Dose)."""
    origin = (0.0, 0.0, 0.0)
    direction = np.eye(3)
    try:
        ipp = [float(v) for v in ds.ImagePositionPatient]
        if len(ipp) == 3 and all(math.isfinite(v) for v in ipp):
            origin = tuple(ipp)
    except (AttributeError, TypeError, ValueError):
        pass
    try:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=float)
        row, col = iop[:3], iop[3:6]
        normal = np.cross(row, col)
        if iop.size == 6 and np.linalg.norm(normal) > 1e-3:
            direction = np.stack([row, col, normal / np.linalg.norm(normal)], axis=1)
    except (AttributeError, TypeError, ValueError, IndexError):
        pass
    spacing_xy = spacing_xy or (1.0, 1.0)
    z = 1.0
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            value = float(getattr(ds, keyword, 0) or 0)
        except (TypeError, ValueError):
            value = 0.0
        if value > 0:
            z = value
            break
    return origin, (spacing_xy[0], spacing_xy[1], z), tuple(float(v) for v in direction.ravel())


# ---- series -------------------------------------------------------------------------------------------


def read_dicom_series(folder: Path) -> ImageData:
    """Read the (first) DICOM series of a folder as a volume (Z, Y, X), slices sorted by GDCM.

    Geometry, rescale and MONOCHROME1 handling are ITK's (as Slicer); the window and modality come
    from the first file. A one-file series is read as a file. Raises :class:`ImageReadError` for a
    folder without a series, files of different sizes and unreadable pixel data.
    """
    import pydicom
    import SimpleITK as sitk
    from pydicom.errors import InvalidDicomError

    with quiet_libraries():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(folder))
        if not series:
            raise ImageReadError("folder holds no DICOM series", folder)
        files = list(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    if len(series) > 1:
        log.warning("%s: %d DICOM series found; reading the first", folder, len(series))
    if len(files) == 1:
        return read_dicom_file(Path(files[0]))
    headers = []
    for f in files:
        try:
            with quiet_libraries():
                headers.append(pydicom.dcmread(f, stop_before_pixels=True))
        except (InvalidDicomError, AttributeError, KeyError, ValueError, TypeError, OSError, EOFError) as err:
            raise ImageReadError(f"cannot read DICOM header: {first_line(err)}", f) from None
    sizes: dict[tuple[int, int], int] = {}
    for ds in headers:
        key = (int(getattr(ds, "Columns", 0) or 0), int(getattr(ds, "Rows", 0) or 0))
        sizes[key] = sizes.get(key, 0) + 1
    if len(sizes) > 1:
        listing = ", ".join(f"{c}x{r} px ({n} file{'s' if n > 1 else ''})" for (c, r), n in sorted(sizes.items()))
        raise ImageReadError(f"the DICOM series' files differ in size: {listing}; give one size per series", folder)
    (columns, rows), _ = next(iter(sizes.items()))
    check_pixel_limit(columns, rows, folder)
    reader.SetFileNames(files)
    with quiet_libraries() as printed:
        try:
            img = reader.Execute()
        except RuntimeError as err:
            reason = first_line(err) or (printed[-1] if printed else "")
            raise ImageReadError(f"cannot read the DICOM series: {reason}", folder) from None
    array = sitk.GetArrayFromImage(img)
    rgb = None
    if img.GetNumberOfComponentsPerPixel() > 1:
        rgb = _compact_rgb(array)
        array = rgb_to_grey(array)
    first = headers[0]
    window = _itk_window(first)
    origin, spacing, direction = positive_frame(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    return ImageData(
        np.asarray(array, dtype=np.float32),
        spacing,
        origin,
        direction,
        window=window,
        meta={
            "modality": str(getattr(first, "Modality", "") or ""),
            "photometric": _photometric(first),
            "frames": len(files),
            "transfer_syntax": _transfer_syntax(first),
            "decoder": "gdcm",
        },
        rgb=rgb,
    )
