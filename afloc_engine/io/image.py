"""`ImageData` (pixels + LPS geometry), the pixel limit, and helpers shared by the readers."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from afloc_engine.errors import ImageReadError

log = logging.getLogger("afloc_engine.io")

#: Largest 2D image (or volume slice) read, in pixels: 50 megapixels, e.g. 7071 x 7071. Larger images
#: are refused with one line before their pixels are decoded, so memory stays bounded (a 96-megapixel
#: RGB PNG would otherwise need gigabytes once heatmaps are made at full resolution). Override with
#: the environment variable ``AFLOC_MAX_PIXELS``.
MAX_PIXELS = 50_000_000


def max_pixels() -> int:
    """The pixel limit in force: ``AFLOC_MAX_PIXELS`` when set to a positive integer, else :data:`MAX_PIXELS`."""
    value = os.environ.get("AFLOC_MAX_PIXELS", "").strip()
    if value:
        try:
            limit = int(float(value))
        except ValueError:
            limit = 0
        if limit > 0:
            return limit
        log.warning("AFLOC_MAX_PIXELS=%r is not a positive number; using %d", value, MAX_PIXELS)
    return MAX_PIXELS


def check_pixel_limit(width: int, height: int, path: Path) -> None:
    """Raise :class:`ImageReadError` when a ``width`` x ``height`` image (or slice) exceeds the limit."""
    limit = max_pixels()
    if int(width) * int(height) > limit:
        raise ImageReadError(
            f"image is too large: {width}x{height} px ({width * height / 1e6:.0f} megapixels) exceeds the limit "
            f"of {limit / 1e6:g} megapixels; reduce it first (or raise AFLOC_MAX_PIXELS)",
            path,
        )


@dataclass
class ImageData:
    """Pixels and geometry of one image.

    array: float32, (H, W) for 2D or (Z, Y, X) for 3D, in the image's own units (HU for CT after the
    DICOM Modality LUT / rescale, stored values for radiographs; MONOCHROME1 already inverted so that
    bright = dense; colour images as BT.601 luminance).
    spacing/origin: per axis in x, y[, z] order, mm. direction: row-major 2x2 or 3x3 (LPS, as
    SimpleITK and DICOM use it; columns are the directions of the i, j[, k] axes).
    A 2D image that has a place in 3D (any DICOM file, a one-slice NRRD/NIfTI) also carries
    ``meta["direction3"]`` (3x3), ``meta["slice_origin_z"]`` and ``meta["slice_spacing_z"]``: its full
    frame is ``frame3d()``; ``spacing``, ``origin`` and ``direction`` then hold the in-plane part.
    window: (low, high) display window from the file (DICOM VOI window), if any, in ``array`` units.
    rgb: the colour channels for a colour input, (H, W, 3) or (Z, Y, X, 3), uint8 for 8-bit sources
    else float32 (palettes applied, YBR converted to RGB); None for grey images. A 3-channel model
    can use it in place of the luminance in ``array``.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    source: Path | None = None
    window: tuple[float, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    rgb: np.ndarray | None = None

    @property
    def is_volume(self) -> bool:
        return self.array.ndim == 3

    def with_array(self, array: np.ndarray) -> ImageData:
        """Same geometry, other pixels (e.g. a heatmap); the colour channels are not carried over."""
        return dataclasses.replace(self, array=array, rgb=None)

    def frame3d(self) -> tuple[tuple[float, float, float], tuple[float, float, float], np.ndarray]:
        """The image's frame in 3D LPS: (origin (3,) mm, spacing (3,) mm, direction (3, 3)).

        A 2D image without a 3D place gets z origin 0, z spacing 1 and its 2x2 direction in the x-y plane.
        """
        if self.array.ndim == 3:
            return (
                tuple(float(v) for v in self.origin),
                tuple(float(v) for v in self.spacing),
                np.asarray(self.direction, dtype=float).reshape(3, 3),
            )
        d3 = self.meta.get("direction3")
        if d3 is not None:
            direction = np.asarray(d3, dtype=float).reshape(3, 3)
        else:
            direction = np.eye(3)
            direction[:2, :2] = np.asarray(self.direction, dtype=float).reshape(2, 2)
        origin = (float(self.origin[0]), float(self.origin[1]), float(self.meta.get("slice_origin_z", 0.0)))
        spacing = (float(self.spacing[0]), float(self.spacing[1]), float(self.meta.get("slice_spacing_z", 1.0)))
        return origin, spacing, direction

    def to_sitk(self, array: np.ndarray | None = None):  # noqa: ANN201 (SimpleITK.Image; import is lazy)
        """A SimpleITK image with this geometry (e.g. to write a heatmap beside the input).

        2D images become 2D ITK images, except those with a 3D place (``meta["direction3"]``: DICOM
        files, one-slice volumes), which become one-slice 3D images, as SimpleITK reads the input.
        """
        import SimpleITK as sitk

        pixels = self.array if array is None else array
        if pixels.ndim == 2 and self.meta.get("direction3") is not None:
            origin, spacing, direction = self.frame3d()
            image = sitk.GetImageFromArray(pixels[None])
            image.SetSpacing(spacing)
            image.SetOrigin(origin)
            image.SetDirection(tuple(float(v) for v in direction.ravel()))
            return image
        image = sitk.GetImageFromArray(pixels)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def from_array(cls, array: np.ndarray, spacing: tuple[float, ...] | None = None) -> ImageData:
        """Wrap a numpy array with unit spacing, zero origin and identity direction.

        array: (H, W), (Z, Y, X) or (H, W, 3|4) colour (kept in ``rgb``; ``array`` gets the luminance).
        """
        array = np.asarray(array)
        rgb = None
        if array.ndim == 3 and array.shape[-1] in (3, 4):
            rgb = array[..., :3] if array.dtype == np.uint8 else array[..., :3].astype(np.float32)
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
            rgb=rgb,
        )


def rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    """(..., 3|4) colour -> (...) luminance (ITU-R BT.601 weights), float32, in the input's units."""
    rgb = np.asarray(rgb)
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    out = np.empty(rgb.shape[:-1], dtype=np.float32)
    flat_in = rgb.reshape(-1, rgb.shape[-1])
    flat_out = out.reshape(-1)
    step = 1 << 20  # a million pixels at a time: no full-size float copy of the channels
    for start in range(0, flat_out.size, step):
        block = flat_in[start : start + step, :3].astype(np.float32)
        np.dot(block, weights, out=flat_out[start : start + step])
    return out


def positive_frame(
    origin: tuple[float, ...], spacing: tuple[float, ...], direction: tuple[float, ...]
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """The same voxel-to-LPS map with positive spacings (a negative spacing flips its direction column).

    GDCM reports e.g. -10 mm between the frames of some enhanced multi-frame files; ITK writers refuse
    negative spacings, so the sign moves into the direction matrix.
    """
    dims = len(spacing)
    d = np.asarray(direction, dtype=float).reshape(dims, dims).copy()
    sp = list(float(s) for s in spacing)
    for axis, s in enumerate(sp):
        if s < 0:
            sp[axis] = -s
            d[:, axis] = -d[:, axis]
    return tuple(float(v) for v in origin), tuple(sp), tuple(float(v) for v in d.ravel())


_STDERR_LOCK = threading.RLock()
_quiet_depth = 0


@contextlib.contextmanager
def quiet_libraries() -> Iterator[list[str]]:
    """Keep pydicom/pylibjpeg/ITK/GDCM warnings, log records and C-level stderr prints off the terminal.

    Yields a list that receives what was printed on stderr inside the block (for a debug log or an
    error message): everything printed there is held back, so log our own warnings outside it.
    Nested uses only redirect once.
    """
    global _quiet_depth
    captured: list[str] = []
    with _STDERR_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loggers = [logging.getLogger(name) for name in ("pydicom", "pylibjpeg", "PIL", "nibabel", "highdicom")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.CRITICAL + 1)
        sitk_display = None
        try:
            import SimpleITK as sitk

            sitk_display = sitk.ProcessObject.GetGlobalWarningDisplay()
            sitk.ProcessObject.SetGlobalWarningDisplay(False)
        except ImportError:  # pragma: no cover - SimpleITK is a core dependency
            sitk = None
        saved_fd = tmp = None
        if _quiet_depth == 0:
            try:
                for stream in (sys.stderr, sys.__stderr__):
                    if stream is not None:
                        stream.flush()
                tmp = tempfile.TemporaryFile(mode="w+b")
                saved_fd = os.dup(2)
                os.dup2(tmp.fileno(), 2)
            except (OSError, ValueError):  # no fd 2 (a GUI process): warnings and logs are still quiet
                if saved_fd is not None:
                    os.close(saved_fd)
                    saved_fd = None
        _quiet_depth += 1
        try:
            yield captured
        finally:
            _quiet_depth -= 1
            if saved_fd is not None:
                os.dup2(saved_fd, 2)
                os.close(saved_fd)
            if tmp is not None:
                tmp.seek(0)
                text = tmp.read().decode("utf-8", "replace").strip()
                tmp.close()
                if text:
                    captured.extend(text.splitlines())
                    log.debug("library output while reading: %s", text)
            if sitk is not None and sitk_display is not None:
                sitk.ProcessObject.SetGlobalWarningDisplay(sitk_display)
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def first_line(err: BaseException | str) -> str:
    """The most telling line of an exception text (ITK errors span many lines)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__ if isinstance(err, BaseException) else ""
    chosen = lines[0]
    for line in lines:
        if "ERROR" in line or "rror:" in line:
            chosen = line.split("ERROR:", 1)[-1].strip() if "ERROR:" in line else line
            break
    return re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", chosen)  # ITK's "GDCMImageIO(0x55d...): " prefix
