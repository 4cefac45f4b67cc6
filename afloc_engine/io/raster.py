"""PNG, JPEG, BMP and TIFF through Pillow: 8/16-bit and float values kept, colour kept, size bounded."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from afloc_engine.errors import ImageReadError
from afloc_engine.io.image import ImageData, check_pixel_limit, first_line, log, quiet_libraries, rgb_to_grey

# Pillow modes that hold one channel of 16- or 32-bit integers or 32-bit floats: read as they are
_WIDE_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;32", "I;32B", "I;32L", "F;32", "F;32B"}
_GREY_MODES = {"1", "L", "LA", "La"}


def read_raster(path: Path) -> ImageData:
    """Read a PNG/JPEG/BMP/TIFF as a 2D image with unit spacing (these formats carry no patient geometry).

    Grey 8-bit -> 0..255; 16-bit PNG/TIFF -> 0..65535; float TIFF -> its float values; colour -> the
    luminance in ``array`` and the channels in ``rgb`` (uint8). Multi-page TIFFs give their first page.
    Raises :class:`ImageReadError` for unreadable files and for images above the pixel limit
    (:func:`afloc_engine.io.max_pixels`), checked from the header before any pixel is decoded.
    """
    from PIL import Image, UnidentifiedImageError

    rgb = None
    try:
        with quiet_libraries(), Image.open(path) as img:
            check_pixel_limit(img.size[0], img.size[1], path)
            pages = int(getattr(img, "n_frames", 1) or 1)
            mode = img.mode
            if mode in ("RGB", "RGBA") and _sixteen_bit_tiles(img):
                # Pillow reduces 16-bit colour to 8 bits; ITK keeps them
                return _read_wide_colour(path)
            img.load()
            if mode in _WIDE_MODES:
                array = np.asarray(img).astype(np.float32)
            elif mode in _GREY_MODES or (mode in ("P", "PA") and _palette_is_grey(img)):
                array = np.asarray(img.convert("L"), dtype=np.float32)
            else:
                rgb = np.asarray(img if mode == "RGB" else img.convert("RGB"))
                array = None  # the luminance is computed once Pillow's copy is freed
    except Image.DecompressionBombError as err:
        raise ImageReadError(f"image is too large: {err}", path) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"cannot read image (truncated or not an image?): {err}", path) from None
    if pages > 1:  # said outside quiet_libraries, which holds back what is printed on stderr
        log.warning("%s: %d pages; reading the first", path, pages)
    if array is None:
        array = rgb_to_grey(rgb)
    if array.ndim != 2:
        raise ImageReadError(f"cannot read image: unexpected pixel layout {array.shape} (mode {mode})", path)
    image = ImageData.from_array(array)
    image.rgb = rgb
    image.meta["mode"] = mode
    return image


def _palette_is_grey(img) -> bool:  # noqa: ANN001 (PIL.Image.Image)
    palette = img.getpalette() or []
    entries = np.asarray(palette[: 3 * 256], dtype=np.int32).reshape(-1, 3)
    return bool(entries.size == 0 or ((entries[:, 0] == entries[:, 1]) & (entries[:, 1] == entries[:, 2])).all())


def _sixteen_bit_tiles(img) -> bool:  # noqa: ANN001 (PIL.Image.Image)
    """True when the file stores 16 bits per colour sample (PNG 'RGB;16B', TIFF 'RGB;16L', ...)."""
    for tile in getattr(img, "tile", None) or []:
        args = tile[3] if len(tile) > 3 else None
        rawmode = args[0] if isinstance(args, tuple) and args else args
        if isinstance(rawmode, str) and ";16" in rawmode:
            return True
    return False


def _read_wide_colour(path: Path) -> ImageData:
    """16-bit colour PNG/TIFF through SimpleITK: channels in ``rgb`` as float32 0..65535."""
    import SimpleITK as sitk

    with quiet_libraries():
        try:
            itk = sitk.ReadImage(str(path))
        except RuntimeError as err:
            raise ImageReadError(f"cannot read image (truncated or not an image?): {first_line(err)}", path) from None
    channels = sitk.GetArrayFromImage(itk)
    if channels.ndim != 3 or channels.shape[-1] not in (3, 4):
        raise ImageReadError(f"cannot read image: unexpected pixel layout {channels.shape}", path)
    rgb = channels[..., :3].astype(np.float32)
    image = ImageData.from_array(rgb_to_grey(rgb))
    image.rgb = rgb
    image.meta["mode"] = "RGB;16"
    return image
