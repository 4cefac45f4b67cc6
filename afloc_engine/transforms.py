"""Pre-processing: intensity normalisation and letterboxing with its exact inverse.

A radiograph of any size and bit depth becomes a (1, S, S) tensor in [0, 1]: its longest side
resized to S, the rest zero-padded (centred). :class:`Letterbox` remembers how, so a map on the
S x S canvas is mapped back onto the original pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def normalize_colour(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) colour -> (H, W, 3) float32 in [0, 1], the channels' balance kept.

    8-bit pixels are divided by 255 (no window: a colour photograph is already display-ready); other
    types are scaled by one min-max over all three channels, so hues are not shifted.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) colour pixels, got shape {rgb.shape}")
    if rgb.dtype == np.uint8:
        return rgb.astype(np.float32) / 255.0
    rgb = rgb.astype(np.float32)
    low, high = float(rgb.min()), float(rgb.max())
    return np.zeros_like(rgb) if not high > low else (rgb - low) / (high - low)


def normalize_intensity(
    array: np.ndarray, window: tuple[float, float] | None = None, percentiles: tuple[float, float] = (0.5, 99.5)
) -> np.ndarray:
    """Map pixel values to [0, 1] float32 (same shape), with MONAI's intensity transforms.

    With a display ``window`` (low, high), values are clipped to it (``ScaleIntensityRange``);
    otherwise to the given percentiles of the image (``ScaleIntensityRangePercentiles``), which
    ignores burned-in text and saturated borders. An empty range falls back to the image's
    min-max; a constant image gives zeros.
    """
    from monai.transforms import ScaleIntensityRange, ScaleIntensityRangePercentiles

    array = np.asarray(array, dtype=np.float32)
    if window is not None:
        low, high = float(window[0]), float(window[1])
        scale: Any = ScaleIntensityRange(low, high, 0.0, 1.0, clip=True, dtype=np.float32)
    else:
        low, high = (float(v) for v in np.percentile(array, percentiles))
        scale = ScaleIntensityRangePercentiles(percentiles[0], percentiles[1], 0.0, 1.0, clip=True, dtype=np.float32)
    if not high > low:
        low, high = float(array.min()), float(array.max())
        if not high > low:
            return np.zeros_like(array, dtype=np.float32)
        scale = ScaleIntensityRange(low, high, 0.0, 1.0, clip=True, dtype=np.float32)
    out = scale(array)
    return np.asarray(out.numpy() if isinstance(out, torch.Tensor) else out, dtype=np.float32)


@dataclass(frozen=True)
class Letterbox:
    """How an (H, W) image sits on an S x S canvas: resized to (h, w), pasted at (top, left)."""

    height: int
    width: int
    size: int
    resized_height: int
    resized_width: int
    top: int
    left: int

    @classmethod
    def fit(cls, height: int, width: int, size: int) -> Letterbox:
        scale = size / max(height, width)
        h = max(1, min(size, round(height * scale)))
        w = max(1, min(size, round(width * scale)))
        return cls(height, width, size, h, w, (size - h) // 2, (size - w) // 2)

    @classmethod
    def fit_reference(cls, height: int, width: int, size: int) -> Letterbox:
        """The reference's letterbox: longest side = ``size``, the other ``int(side * size / longest)``
        (truncated, not rounded), padding split floor/ceil (the extra pixel at the bottom/right)."""
        if height >= width:
            h, w = size, max(1, int(float(width) * (size / float(height))))
        else:
            h, w = max(1, int(float(height) * (size / float(width)))), size
        return cls(height, width, size, h, w, (size - h) // 2, (size - w) // 2)

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """(..., C, H, W) -> (..., C, S, S): antialiased bilinear resize, centred zero padding.

        The padding is MONAI's ``SpatialPad`` (symmetric: the extra pixel at the bottom/right, as
        :meth:`fit` places it); the resize stays torch's antialiased bilinear (MONAI's ``Resize``
        antialiases with a Gaussian pre-blur, which would change the network input).
        """
        from monai.transforms import SpatialPad

        lead = image.shape[:-2]
        x = image.reshape(-1, self.height, self.width).float()
        x = F.interpolate(x[:, None], size=(self.resized_height, self.resized_width), mode="bilinear", antialias=True)
        pad = SpatialPad((self.size, self.size), method="symmetric", mode="constant", value=0.0)
        canvas = torch.as_tensor(pad(x[:, 0])).as_subclass(torch.Tensor)  # channel-first (N, h, w) -> (N, S, S)
        if (canvas.shape[-2] - self.resized_height) // 2 != self.top:  # pragma: no cover (MONAI's convention)
            raise AssertionError("SpatialPad placed the image off the letterbox")
        return canvas.reshape(*lead, self.size, self.size)

    def valid_region(self, maps: torch.Tensor) -> torch.Tensor:
        """(..., S, S) canvas maps -> (..., h, w): the part that holds the image."""
        return maps[..., self.top : self.top + self.resized_height, self.left : self.left + self.resized_width]

    def invert(self, maps: torch.Tensor) -> torch.Tensor:
        """(N, S, S) canvas maps -> (N, H, W) on the original pixel grid (bilinear)."""
        valid = self.valid_region(maps).unsqueeze(1)
        out = F.interpolate(valid, size=(self.height, self.width), mode="bilinear", align_corners=False)
        return out.squeeze(1)


def to_uint8(array: np.ndarray) -> np.ndarray:
    """(H, W) pixels -> uint8 as the reference reads them.

    Integer pixels already in [0, 255] (8-bit PNG/JPEG) are kept as they are; other non-negative
    images are scaled by 255 / max and rounded (the reference's DICOM reader, ``convertScaleAbs``);
    images with negative values are min-max scaled to [0, 255] first. The display window is ignored.
    """
    a = np.asarray(array, dtype=np.float64)
    low, high = float(a.min()), float(a.max())
    if low >= 0 and high <= 255 and np.array_equal(a, np.round(a)):
        return a.astype(np.uint8)
    if low < 0:
        a, high = a - low, high - low
    if high <= 0:
        return np.zeros(a.shape, np.uint8)
    return np.clip(np.rint(a * (255.0 / high)), 0, 255).astype(np.uint8)


def _area_table(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and float32 weights of area resampling, (n_out, k) each (zero-weight padding).

    Output cell i covers [i * s, i * s + s) of the input, s = 1 / (n_out / n_in) in double
    precision; a partly covered pixel is weighted by the covered fraction (fractions under 1e-3
    are dropped), every weight divided by the cell's width, as OpenCV tabulates ``INTER_AREA``.
    """
    scale = 1.0 / (n_out / n_in)
    rows: list[list[tuple[int, float]]] = []
    for i in range(n_out):
        f1 = i * scale
        f2 = f1 + scale
        cell = min(scale, n_in - f1)
        s1, s2 = math.ceil(f1), math.floor(f2)
        s2 = min(s2, n_in - 1)
        s1 = min(s1, s2)
        entries = []
        if s1 - f1 > 1e-3:
            entries.append((s1 - 1, (s1 - f1) / cell))
        entries.extend((j, 1.0 / cell) for j in range(s1, s2))
        if f2 - s2 > 1e-3:
            entries.append((s2, min(min(f2 - s2, 1.0), cell) / cell))
        rows.append(entries)
    k = max(len(r) for r in rows)
    index = np.zeros((n_out, k), np.int64)
    weight = np.zeros((n_out, k), np.float32)
    for i, entries in enumerate(rows):
        for j, (src, w) in enumerate(entries):
            index[i, j], weight[i, j] = src, np.float32(w)
    return index, weight


def area_resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a uint8 (H, W) image to (height, width) as OpenCV's ``INTER_AREA`` does; uint8 out.

    Shrinking: each output pixel is the area-weighted mean of the input pixels its cell covers,
    accumulated in float32 row by row in OpenCV's order and rounded half to even; a 2x2 integer
    shrink rounds halves up, as OpenCV's fast path. Enlarging falls back to bilinear interpolation
    (OpenCV's ``INTER_LINEAR``, which it computes in fixed point: there a pixel can differ by one level).
    """
    h0, w0 = image.shape
    if (h0, w0) == (height, width):
        return image.astype(np.uint8, copy=True)
    if h0 < height or w0 < width:
        t = torch.from_numpy(image.astype(np.float32))[None, None]
        out = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if h0 % height == 0 and w0 % width == 0:
        fy, fx = h0 // height, w0 // width
        blocks = image.astype(np.int64).reshape(height, fy, width, fx).sum(axis=(1, 3))
        if fy == fx == 2:
            return ((blocks + 2) // 4).astype(np.uint8)
        return np.clip(np.rint(blocks.astype(np.float32) * np.float32(1.0 / (fy * fx))), 0, 255).astype(np.uint8)
    src = image.astype(np.float32)
    x_index, x_weight = _area_table(w0, width)
    rows = np.zeros((h0, width), np.float32)
    for j in range(x_index.shape[1]):  # horizontal sums, in the table's order, float32
        rows += src[:, x_index[:, j]] * x_weight[None, :, j]
    y_index, y_weight = _area_table(h0, height)
    out = rows[y_index[:, 0]] * y_weight[:, :1]
    for j in range(1, y_index.shape[1]):
        out += rows[y_index[:, j]] * y_weight[:, j : j + 1]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def prepare_image_reference(
    array: np.ndarray, size: int, mean: float = 0.5, std: float = 0.5, channels: int = 1
) -> tuple[torch.Tensor, Letterbox]:
    """The reference's inference input: 8-bit grey, INTER_AREA letterbox to ``size`` (zero padding),
    / 255, then (x - mean) / std. Returns ((C, S, S) float32, letterbox)."""
    grey = to_uint8(array)
    box = Letterbox.fit_reference(grey.shape[0], grey.shape[1], size)
    resized = area_resize_uint8(grey, box.resized_height, box.resized_width)
    canvas = torch.zeros(1, size, size)
    canvas[0, box.top : box.top + box.resized_height, box.left : box.left + box.resized_width] = torch.from_numpy(
        resized.astype(np.float32) / 255.0
    )
    canvas = (canvas - mean) / std
    if channels == 3:
        canvas = canvas.expand(3, -1, -1)
    return canvas, box


def prepare_image(
    array: np.ndarray,
    size: int,
    window: tuple[float, float] | None = None,
    mean: float = 0.5,
    std: float = 0.5,
    channels: int = 1,
    rgb: np.ndarray | None = None,
) -> tuple[torch.Tensor, Letterbox]:
    """(H, W) pixels -> ((C, S, S) network input, letterbox). Intensities to [0, 1], then (x - mean) / std.

    A 3-channel model given the colour channels ``rgb`` ((H, W, 3), e.g. ``ImageData.rgb`` of a fundus
    photograph or a histopathology tile) sees the colours (:func:`normalize_colour`); without them, or for
    a 1-channel model, the grey ``array`` is used (repeated over 3 channels for a 3-channel model).
    """
    if channels == 3 and rgb is not None:
        colour = torch.from_numpy(normalize_colour(rgb)).permute(2, 0, 1)
        box = Letterbox.fit(colour.shape[-2], colour.shape[-1], size)
        return (box.apply(colour) - mean) / std, box
    grey = torch.from_numpy(normalize_intensity(array, window))
    box = Letterbox.fit(grey.shape[0], grey.shape[1], size)
    canvas = box.apply(grey.unsqueeze(0))
    canvas = (canvas - mean) / std
    if channels == 3:
        canvas = canvas.expand(3, -1, -1)
    return canvas, box
