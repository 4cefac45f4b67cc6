"""Prompt localisation on 3D volumes (CT, MR): slice-wise with a 2D model, or natively with a 3D one.

>>> model = load_model("default")                                          # doctest: +SKIP
>>> r = model.localize_volume("ct.nrrd", ["Findings suggesting pneumonia"])  # doctest: +SKIP
>>> r.heatmaps.shape  # (P, Z, Y, X) float32 in [-1, 1], exactly the input's voxel grid  # doctest: +SKIP

Slice-wise (``config.spatial_dims == 2``): every slice along ``axis`` is windowed, letterboxed
(keeping its physical aspect ratio) and run through the 2D model in batches on the model's device;
each slice's similarity grid is smoothed and upsampled back onto the slice exactly as for a 2D image.
The heatmaps are then min-max normalised to [-1, 1] over the whole volume (``normalization="volume"``,
the default: a slice without the finding stays cold) or per slice (``"slice"``: every slice spans
[-1, 1], as if each were a radiograph).

Native 3D (``config.spatial_dims == 3``): the whole volume is letterboxed into an S^3 cube, encoded
once, and the 3D similarity grid is smoothed and upsampled trilinearly back onto the voxels.

Intensities: a volume is windowed once for all its slices (never per slice, so a slice keeps its
brightness relative to the others), by default with the file's display window, else the CT window
HU [-1150, 350] for CT-like data (as fVLM), else the volume's 0.5/99.5 percentiles.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from afloc_engine.errors import AFLocError, ImageReadError
from afloc_engine.heatmap import gaussian_smooth, similarity_maps
from afloc_engine.io import ImageData
from afloc_engine.prompts import negative_prompt, validate_prompts
from afloc_engine.results import VolumeResult
from afloc_engine.transforms import Letterbox

if TYPE_CHECKING:  # pragma: no cover
    from afloc_engine.inference import AFLoc, ImageInput

log = logging.getLogger(__name__)

CT_WINDOW: tuple[float, float] = (-1150.0, 350.0)
"""HU window of fVLM's CT pre-processing (lung to bone), the default for CT-like volumes."""
NORMALIZATIONS = ("volume", "slice")
WindowSpec = str | tuple[float, float] | None
"""``"auto"`` (file window, else CT window for CT-like data, else percentiles), ``"ct"``,
``"percentile"``, or an explicit (low, high) pair in the image's units."""


# --- intensities --------------------------------------------------------------------------------
def looks_like_ct(image: ImageData) -> bool:
    """True for a CT (DICOM modality CT) or a volume whose values look like Hounsfield units (air ~ -1000)."""
    modality = str(image.meta.get("modality", "")).upper()
    if modality:
        return modality == "CT"
    sample = _sample(image.array)
    low, high = np.percentile(sample, (1.0, 99.0))
    return bool(low <= -500.0 and high <= 4000.0)


def _sample(array: np.ndarray, max_values: int = 1 << 20) -> np.ndarray:
    """A strided sample of at most about ``max_values`` voxels (percentiles of a 512^2 x 300 CT in ms)."""
    flat = array.reshape(-1)
    step = max(1, flat.size // max_values)
    return flat[::step]


def resolve_window(image: ImageData, window: WindowSpec = "auto") -> tuple[float, float]:
    """The (low, high) intensity window of a volume, in its own units (HU for CT).

    ``auto``: the file's display window, else :data:`CT_WINDOW` when :func:`looks_like_ct`,
    else the 0.5/99.5 percentiles of the whole volume. Raises :class:`AFLocError` for a bad spec.
    """
    if window is None or window == "percentile":
        low, high = (float(v) for v in np.percentile(_sample(image.array), (0.5, 99.5)))
    elif window == "ct":
        low, high = CT_WINDOW
    elif window == "auto":
        if image.window is not None:
            low, high = image.window
        elif looks_like_ct(image):
            low, high = CT_WINDOW
        else:
            return resolve_window(image, "percentile")
    elif isinstance(window, str):
        raise AFLocError(f"unknown intensity window {window!r}; use auto, ct, percentile or (low, high)")
    else:
        try:
            low, high = (float(v) for v in window)
        except (TypeError, ValueError):
            raise AFLocError(f"intensity window must be (low, high), not {window!r}") from None
        if not (np.isfinite(low) and np.isfinite(high) and high > low):
            raise AFLocError(f"intensity window needs finite low < high, not ({low}, {high})")
        return low, high
    if not high > low:  # a constant volume: any window maps it to 0
        high = low + 1.0
    return float(low), float(high)


def apply_window(array: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    """Map intensities to [0, 1] by clipping to ``window`` (low, high); any shape, any device."""
    low, high = window
    return ((array.float() - low) / (high - low)).clamp_(0.0, 1.0)


# --- geometry of slices and volumes ----------------------------------------------------------
def spacing_zyx(image: ImageData) -> tuple[float, ...]:
    """Voxel spacing in array-axis order ((Z, Y, X) for a volume), mm."""
    return tuple(float(s) for s in image.spacing[::-1])


def slice_letterbox(height: int, width: int, size: int, pixel_spacing: tuple[float, float] = (1.0, 1.0)) -> Letterbox:
    """Letterbox of an (height, width) slice onto an S x S canvas keeping its physical aspect ratio.

    pixel_spacing: (row, column) spacing in mm. Equal spacings give exactly ``Letterbox.fit``.
    """
    row, col = pixel_spacing
    if row <= 0 or col <= 0 or row == col:
        return Letterbox.fit(height, width, size)
    extent_h, extent_w = height * row, width * col
    scale = size / max(extent_h, extent_w)
    h = max(1, min(size, round(extent_h * scale)))
    w = max(1, min(size, round(extent_w * scale)))
    return Letterbox(height, width, size, h, w, (size - h) // 2, (size - w) // 2)


@dataclass(frozen=True)
class VolumeBox:
    """How a (Z, Y, X) volume sits in an S^3 cube: resized to ``resized`` (physical aspect kept), at ``offset``."""

    shape: tuple[int, int, int]
    size: int
    resized: tuple[int, int, int]
    offset: tuple[int, int, int]

    @classmethod
    def fit(cls, shape: tuple[int, ...], size: int, spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> VolumeBox:
        """shape and spacing in (Z, Y, X) order; the longest physical side becomes ``size`` voxels."""
        extent = [n * max(float(s), 1e-6) for n, s in zip(shape, spacing)]
        scale = size / max(extent)
        resized = tuple(max(1, min(size, round(e * scale))) for e in extent)
        offset = tuple((size - r) // 2 for r in resized)
        return cls(tuple(int(n) for n in shape), int(size), resized, offset)  # type: ignore[arg-type]

    def _slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + r) for o, r in zip(self.offset, self.resized))

    def apply(self, volume: torch.Tensor, mode: str = "linear") -> torch.Tensor:
        """(N, C, Z, Y, X) -> (N, C, S, S, S): resized (area when shrinking, trilinear when growing), zero padded.

        ``mode="nearest"`` resamples label maps (pass them as float and round back).
        """
        if tuple(volume.shape[2:]) == self.resized:
            x = volume.float()
        elif mode == "nearest":
            x = F.interpolate(volume.float(), size=self.resized, mode="nearest-exact")
        elif all(r <= n for r, n in zip(self.resized, self.shape)):
            x = F.interpolate(volume.float(), size=self.resized, mode="area")
        else:
            x = F.interpolate(volume.float(), size=self.resized, mode="trilinear", align_corners=False)
        cube = x.new_zeros(*x.shape[:2], self.size, self.size, self.size)
        cube[(..., *self._slices())] = x
        return cube

    def invert(self, maps: torch.Tensor) -> torch.Tensor:
        """(N, S, S, S) maps on the cube -> (N, Z, Y, X) on the original voxels (trilinear)."""
        valid = maps[(..., *self._slices())].unsqueeze(1)
        out = F.interpolate(valid, size=self.shape, mode="trilinear", align_corners=False)
        return out.squeeze(1)


def prepare_volume(
    image: ImageData | np.ndarray,
    size: int,
    window: tuple[float, float],
    mean: float = 0.5,
    std: float = 0.5,
    channels: int = 1,
) -> tuple[torch.Tensor, VolumeBox]:
    """(Z, Y, X) volume -> ((C, S, S, S) input of a native 3D model, its box). Window, letterbox, (x - mean) / std."""
    data = image if isinstance(image, ImageData) else ImageData.from_array(np.asarray(image, dtype=np.float32))
    if data.array.ndim != 3:
        raise ImageReadError(f"expected a 3D volume, got shape {data.array.shape}", data.source)
    box = VolumeBox.fit(data.array.shape, size, spacing_zyx(data))
    x = apply_window(torch.from_numpy(np.ascontiguousarray(data.array)), window)
    cube = (box.apply(x[None, None])[0] - mean) / std
    if channels == 3:
        cube = cube.expand(3, -1, -1, -1)
    return cube, box


def prepare_label_map(labels: np.ndarray | torch.Tensor, box: VolumeBox) -> torch.Tensor:
    """(Z, Y, X) integer label map -> (S, S, S) long on the same cube as :func:`prepare_volume` (nearest)."""
    t = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    return box.apply(t[None, None].float(), mode="nearest")[0, 0].round().long()


# --- localisation --------------------------------------------------------------------------------
def localize_volume(
    model: AFLoc,
    image: ImageInput,
    prompts: list[str] | str,
    threshold: float | None = None,
    axis: int = 0,
    normalization: str = "volume",
    batch_size: int = 16,
    similarity: str | None = None,
    negative_prompts: list[str] | None = None,
    window: WindowSpec = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> VolumeResult:
    """Heatmaps, masks and probabilities for ``prompts`` on one 3D volume.

    Args:
        model: a loaded :class:`afloc_engine.inference.AFLoc` (2D or native 3D).
        image: a path, a (Z, Y, X) array or :class:`ImageData` holding a volume.
        prompts: prompt sentences.
        threshold: mask threshold on the [-1, 1] heatmap (default: the model's).
        axis: slice axis in (Z, Y, X) array order (0 = axial for a usual CT).
        normalization: ``volume`` (min-max over the whole volume) or ``slice`` (per slice along ``axis``).
        batch_size: slices per network batch (slice-wise path).
        similarity: ``cosine`` or ``dot`` (default: the model's).
        negative_prompts: negatives for the probabilities (default: "No {finding}").
        window: intensity window, see :data:`WindowSpec`.
        progress: called as ``progress(done_slices, total_slices)`` after each batch.

    Returns:
        :class:`VolumeResult` whose arrays have exactly the input's shape and whose ``image`` keeps
        its spacing, origin and direction.
    """
    from afloc_engine.inference import as_image

    data = as_image(image)
    if not data.is_volume:
        raise ImageReadError(f"expected a 3D volume, got a 2D image of shape {data.array.shape}", data.source)
    if axis not in (0, 1, 2, -1, -2, -3):
        raise AFLocError(f"slice axis must be 0, 1 or 2 (Z, Y, X array order), not {axis}")
    axis = axis % 3
    if normalization not in NORMALIZATIONS:
        raise AFLocError(f"volume normalization must be 'volume' or 'slice', not {normalization!r}")
    if batch_size < 1:
        raise AFLocError(f"batch_size must be >= 1, not {batch_size}")
    prompts = validate_prompts(prompts)
    negatives = validate_prompts(negative_prompts) if negative_prompts else [negative_prompt(p) for p in prompts]
    if len(negatives) != len(prompts):
        raise AFLocError("give one negative prompt per prompt")
    threshold = model.config.threshold if threshold is None else float(threshold)
    similarity = similarity or model.config.similarity
    win = resolve_window(data, window)
    if model.config.spatial_dims == 3:
        raw, slice_probs = _native_3d(model, data, prompts, negatives, similarity, win)
    else:
        raw, slice_probs = _slice_wise(model, data, prompts, negatives, similarity, win, axis, batch_size, progress)
    with torch.inference_mode():
        heat_t = _normalize(raw, normalization, axis)
        masks = (heat_t > threshold).cpu().numpy()
        heat = heat_t.cpu().numpy()
    del raw, heat_t
    return VolumeResult(
        list(prompts),
        heat,
        masks,
        slice_probs.max(axis=0).astype(np.float32),
        threshold,
        data,
        model.model_id,
        model.info.trained,
        negatives,
        axis=axis,
        normalization=normalization,
        slice_probabilities=slice_probs,
        window=win,
    )


def _fits_on(device: torch.device, nbytes: int) -> bool:
    """True on the CPU, or when a CUDA device has ``nbytes`` free with a 25 % margin."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes * 1.25 < free


def _slice_wise(
    model: AFLoc,
    data: ImageData,
    prompts: list[str],
    negatives: list[str],
    similarity: str,
    window: tuple[float, float],
    axis: int,
    batch_size: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Raw (un-normalised) heatmaps (P, Z, Y, X) and per-slice probabilities (N, P) of a 2D model.

    On a GPU with room, the volume is uploaded once and the heatmaps stay on the GPU (normalised and
    thresholded there, then copied back once); otherwise slabs go up batch by batch.
    """
    c = model.config
    device = model.device
    n_prompts = len(prompts)
    volume = torch.from_numpy(np.ascontiguousarray(data.array, dtype=np.float32))
    out_bytes = n_prompts * volume.numel() * 4 * 2  # heatmaps + their normalised copy / masks
    store = device if _fits_on(device, out_bytes + volume.numel() * 4) else torch.device("cpu")
    if store.type == "cuda":
        volume = volume.to(store)
    moved = volume.movedim(axis, 0)  # (N, a, b), a view
    n, height, width = moved.shape
    spacing = spacing_zyx(data)
    plane = [spacing[k] for k in range(3) if k != axis]
    box = slice_letterbox(height, width, c.image_size, (plane[0], plane[1]))
    out = torch.empty((n_prompts, n, height, width), dtype=torch.float32, device=store)
    probs = torch.empty((n, n_prompts), dtype=torch.float32)
    embeddings = model.embed_prompts(prompts)
    model.embed_prompts(negatives)  # fill the cache once
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            slab = moved[start:stop].to(device, non_blocking=True)
            canvas = box.apply(apply_window(slab, window).unsqueeze(1))  # (B, 1, S, S)
            canvas = (canvas - c.intensity_mean) / c.intensity_std
            if c.in_channels == 3:
                canvas = canvas.expand(-1, 3, -1, -1)
            deep, glob = model.encode_images(canvas)  # precision (bf16 on CUDA) is the model's choice
            grids = similarity_maps(deep.float(), embeddings, similarity)  # (B, P, g, g)
            smoothed = gaussian_smooth(grids.flatten(0, 1), c.smoothing_sigma)
            up = F.interpolate(smoothed.unsqueeze(1), size=(box.size, box.size), mode="bilinear", align_corners=False)
            maps = box.invert(up.squeeze(1)).view(stop - start, n_prompts, height, width)
            out[:, start:stop] = maps.transpose(0, 1).to(store)  # blocking: a D2H copy must land first
            probs[start:stop] = model.probabilities(glob.float(), prompts, negatives).float().cpu()
            if progress is not None:
                progress(stop, n)
    return out.movedim(1, axis + 1), probs.numpy()


def _native_3d(
    model: AFLoc,
    data: ImageData,
    prompts: list[str],
    negatives: list[str],
    similarity: str,
    window: tuple[float, float],
) -> tuple[torch.Tensor, np.ndarray]:
    """Raw heatmaps (P, Z, Y, X) and probabilities (1, P) of a native 3D model (one forward pass)."""
    c = model.config
    cube, box = prepare_volume(data, c.image_size, window, c.intensity_mean, c.intensity_std, c.in_channels)
    embeddings = model.embed_prompts(prompts)
    with torch.inference_mode():
        deep, glob = model.encode_images(cube.unsqueeze(0))
        grids = similarity_maps(deep.float(), embeddings, similarity)[0]  # (P, g, g, g)
        smoothed = gaussian_smooth(grids, c.smoothing_sigma)
        up = F.interpolate(smoothed.unsqueeze(1), size=(box.size,) * 3, mode="trilinear", align_corners=False)
        store = model.device if _fits_on(model.device, len(prompts) * data.array.size * 4 * 3) else torch.device("cpu")
        maps = box.invert(up.squeeze(1).to(store)).float()
        probs = model.probabilities(glob.float(), prompts, negatives).float().cpu().numpy()
    return maps, probs


def _normalize(raw: torch.Tensor, normalization: str, axis: int) -> torch.Tensor:
    """Min-max (P, Z, Y, X) heatmaps to [-1, 1] over each prompt's volume or each slice along ``axis``.

    Works in place (the result is made contiguous); a constant volume (or slice) becomes 0.
    """
    dims = (1, 2, 3) if normalization == "volume" else tuple(d for d in (1, 2, 3) if d != axis + 1)
    low = raw.amin(dim=dims, keepdim=True)
    high = raw.amax(dim=dims, keepdim=True)
    span = high - low
    scale = torch.where(span > 0, 2.0 / span.clamp(min=1e-12), torch.zeros_like(span))
    raw.sub_(low).mul_(scale).sub_(1.0)
    return raw.masked_fill_(span.expand_as(raw) <= 0, 0.0).contiguous()
