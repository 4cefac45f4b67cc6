"""Pre-processing: intensity normalisation and letterboxing with its exact inverse.

A radiograph of any size and bit depth becomes a (1, S, S) tensor in [0, 1]: its longest side
resized to S, the rest zero-padded (centred). :class:`Letterbox` remembers how, so a map on the
S x S canvas is mapped back onto the original pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def normalize_intensity(
    array: np.ndarray, window: tuple[float, float] | None = None, percentiles: tuple[float, float] = (0.5, 99.5)
) -> np.ndarray:
    """Map pixel values to [0, 1] float32.

    With a display ``window`` (low, high), values are clipped to it; otherwise to the given
    percentiles of the image, which ignores burned-in text and saturated borders.
    """
    array = np.asarray(array, dtype=np.float32)
    if window is not None:
        low, high = window
    else:
        low, high = np.percentile(array, percentiles)
    if not high > low:
        low, high = float(array.min()), float(array.max())
    if not high > low:
        return np.zeros_like(array, dtype=np.float32)
    return np.clip((array - low) / (high - low), 0.0, 1.0).astype(np.float32)


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

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """(..., C, H, W) -> (..., C, S, S): area-preserving resize, zero padding."""
        lead = image.shape[:-2]
        x = image.reshape(-1, 1, self.height, self.width).float()
        x = F.interpolate(x, size=(self.resized_height, self.resized_width), mode="bilinear", antialias=True)
        canvas = x.new_zeros(x.shape[0], 1, self.size, self.size)
        canvas[..., self.top : self.top + self.resized_height, self.left : self.left + self.resized_width] = x
        return canvas.reshape(*lead, self.size, self.size)

    def valid_region(self, maps: torch.Tensor) -> torch.Tensor:
        """(..., S, S) canvas maps -> (..., h, w): the part that holds the image."""
        return maps[..., self.top : self.top + self.resized_height, self.left : self.left + self.resized_width]

    def invert(self, maps: torch.Tensor) -> torch.Tensor:
        """(N, S, S) canvas maps -> (N, H, W) on the original pixel grid (bilinear)."""
        valid = self.valid_region(maps).unsqueeze(1)
        out = F.interpolate(valid, size=(self.height, self.width), mode="bilinear", align_corners=False)
        return out.squeeze(1)


def prepare_image(
    array: np.ndarray,
    size: int,
    window: tuple[float, float] | None = None,
    mean: float = 0.5,
    std: float = 0.5,
    channels: int = 1,
) -> tuple[torch.Tensor, Letterbox]:
    """(H, W) pixels -> ((C, S, S) network input, letterbox). Intensities to [0, 1], then (x - mean) / std."""
    grey = torch.from_numpy(normalize_intensity(array, window))
    box = Letterbox.fit(grey.shape[0], grey.shape[1], size)
    canvas = box.apply(grey.unsqueeze(0))
    canvas = (canvas - mean) / std
    if channels == 3:
        canvas = canvas.expand(3, -1, -1)
    return canvas, box
