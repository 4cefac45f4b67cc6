"""Few-shot training examples: reading and checking (image, mask) pairs, and augmenting them.

An example is one 2D image with a binary mask per finding it shows. Masks must be binary (0 and
one other value), non-empty, not all foreground, and of the size of their own image; images may
differ in size from each other (each is letterboxed on its own).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from afloc_engine.errors import ConfigError, DataError, ImageReadError
from afloc_engine.io import ImageData, read_image

MaskInput = str | Path | np.ndarray | ImageData


@dataclass
class Example:
    """One training image and its masks.

    image: the 2D image. masks: finding -> (H, W) bool mask on the image's own pixel grid.
    id: a name recorded in the adapter (file stem by default). sources: finding -> mask file (or None).
    """

    image: ImageData
    masks: dict[str, np.ndarray]
    id: str
    sources: dict[str, Path | None] = field(default_factory=dict)


def _mask_array(mask: MaskInput) -> tuple[np.ndarray, Path | None]:
    """A mask input -> (2D float array, source file or None)."""
    if isinstance(mask, (str, Path)):
        path = Path(mask)
        try:
            data = read_image(path)
        except ImageReadError as err:
            raise DataError(f"cannot read mask: {err.problem}", path) from None
        return data.array, path
    if isinstance(mask, ImageData):
        return mask.array, mask.source
    array = np.asarray(mask)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    return array, None


def check_mask(mask: MaskInput, image: ImageData, finding: str, where: str) -> tuple[np.ndarray, Path | None]:
    """Validate one mask against its image; returns ((H, W) bool, source).

    Raises :class:`DataError` naming the mask (file, or ``where`` for arrays) when it is not 2D,
    not the image's size, not binary, empty or all foreground.
    """
    array, source = _mask_array(mask)
    name = source if source is not None else None
    label = f"{where} mask of {finding!r}" if source is None else f"mask of {finding!r}"
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise DataError(f"{label} must be a 2D mask, got shape {array.shape}", name)
    if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
        raise DataError(f"{label} has non-numeric, NaN or infinite values", name)
    if array.shape != image.array.shape:
        (mh, mw), (ih, iw) = array.shape, image.array.shape
        src = f" ({image.source})" if image.source is not None else ""
        raise DataError(
            f"{label} is {mw}x{mh} px but its image{src} is {iw}x{ih} px; a mask must match its own image", name
        )
    values = np.unique(array)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        hint = (
            " (JPEG is lossy: save masks as PNG or NRRD)"
            if source and source.suffix.lower() in {".jpg", ".jpeg"}
            else ""
        )
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise DataError(
            f"{label} is not binary: {len(values)} distinct values ({shown}); expected 0 and one other{hint}", name
        )
    binary = array != 0
    if not binary.any():
        raise DataError(f"{label} is empty (no foreground pixel); give images where the finding is drawn", name)
    if binary.all():
        raise DataError(f"{label} is all foreground (every pixel set); draw only the finding", name)
    return binary, source


def _as_image(image: Any, where: str) -> ImageData:  # noqa: ANN401
    if isinstance(image, ImageData):
        data = image
    elif isinstance(image, (str, Path)):
        data = read_image(image)
    else:
        try:
            data = ImageData.from_array(np.asarray(image))
        except ImageReadError as err:
            raise ImageReadError(f"{where} image: {err.problem}") from None
    if data.is_volume:
        raise ImageReadError("fine-tuning takes 2D images; this is a 3D volume", data.source)
    if not np.isfinite(data.array).all():
        raise ImageReadError(f"{where} image has NaN or infinite pixels", data.source)
    return data


def _default_id(image: Any, index: int) -> str:  # noqa: ANN401
    if isinstance(image, (str, Path)):
        return Path(image).name
    if isinstance(image, ImageData) and image.source is not None:
        return image.source.name
    return f"example-{index}"


def parse_examples(examples: Sequence[Any], findings: list[str]) -> list[Example]:
    """Normalise user examples to :class:`Example` and check every image and mask.

    Accepted items: ``(image, mask)``, ``(image, mask, id)``, ``{"image", "mask"|"masks", "id"}``
    or :class:`Example`. With several findings, a mask is a ``{finding: mask}`` dict (an example may
    omit findings it does not show; each finding needs at least one mask). Raises :class:`DataError`
    or :class:`ImageReadError` naming the first bad file; nothing is written.
    """
    if examples is None or len(examples) < 1:
        raise DataError("no training examples: give at least one (image, mask) pair")
    out: list[Example] = []
    for index, item in enumerate(examples):
        where = f"example {index}"
        if isinstance(item, Example):
            image, masks, ex_id = item.image, item.masks, item.id
        elif isinstance(item, Mapping):
            if "image" not in item or not ("mask" in item or "masks" in item):
                raise DataError(f"{where} needs an 'image' and a 'mask' (or 'masks')")
            image, masks, ex_id = item["image"], item.get("masks", item.get("mask")), item.get("id")
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
            image, masks = item[0], item[1]
            ex_id = item[2] if len(item) == 3 else None
        else:
            raise DataError(f"{where} is not an (image, mask) pair")
        data = _as_image(image, where)
        if not isinstance(masks, Mapping):
            if len(findings) != 1:
                raise DataError(f"{where}: with several findings give masks as a {{finding: mask}} dict")
            masks = {findings[0]: masks}
        unknown = [k for k in masks if k not in findings]
        if unknown:
            raise DataError(f"{where} has a mask for {unknown[0]!r}, which is not among the findings {findings}")
        if not masks:
            raise DataError(f"{where} has no mask")
        checked, sources = {}, {}
        for finding, mask in masks.items():
            checked[finding], sources[finding] = check_mask(mask, data, finding, where)
        out.append(Example(data, checked, str(ex_id) if ex_id is not None else _default_id(image, index), sources))
    for finding in findings:
        if not any(finding in ex.masks for ex in out):
            raise DataError(f"no example has a mask of {finding!r}")
    ids = [ex.id for ex in out]
    for i, ex in enumerate(out):
        if ids.count(ex.id) > 1:
            ex.id = f"{ex.id}#{i}"
    return out


# --- augmentation -------------------------------------------------------------------------------
@dataclass
class FinetuneAugmentConfig:
    """Few-shot augmentation: small affine, intensity; flips only where anatomy allows.

    Angles in degrees, translation as a fraction of the image side, gamma as a log-range.
    Left-right flips are off by default: chest anatomy is not mirror-symmetric. (The offline
    trainer's image augmentation is :class:`training.config.TrainAugmentConfig`.)
    """

    rotate_deg: float = 7.0
    scale: float = 0.08
    translate: float = 0.05
    gamma: float = 0.25
    contrast: float = 0.1
    brightness: float = 0.05
    noise: float = 0.01
    flip_lr: bool = False
    flip_ud: bool = False
    feature_shift: float = 0.04
    """Per-step feature-space augmentation: random translation, as a fraction of the canvas."""
    feature_scale: float = 0.05

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FinetuneAugmentConfig:
        """The inverse of :meth:`to_dict`; raises :class:`ConfigError` naming an unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown few-shot augmentation setting {unknown[0]!r}")
        return cls(**data)


def affine_matrix(rng: np.random.Generator, cfg: FinetuneAugmentConfig, flips: bool = True) -> np.ndarray:
    """A random 2x3 affine (normalised coordinates, as ``F.affine_grid`` takes) within the config's ranges."""
    angle = math.radians(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))
    scale = math.exp(rng.uniform(-cfg.scale, cfg.scale))
    tx, ty = rng.uniform(-cfg.translate, cfg.translate, size=2) * 2
    sx = -1.0 if flips and cfg.flip_lr and rng.random() < 0.5 else 1.0
    sy = -1.0 if flips and cfg.flip_ud and rng.random() < 0.5 else 1.0
    c, s = math.cos(angle) / scale, math.sin(angle) / scale
    return np.array([[c * sx, -s * sy, tx], [s * sx, c * sy, ty]], dtype=np.float32)


def augment_view(
    image01: torch.Tensor, masks: torch.Tensor, rng: np.random.Generator, cfg: FinetuneAugmentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented view of an image in [0, 1] (H, W) and its masks (F, H, W) in [0, 1].

    Same random affine on both (bilinear; zero fill like the letterbox), then gamma, contrast,
    brightness and Gaussian noise on the image only. Returns (image (H, W) in [0, 1], masks (F, H, W)).
    """
    theta = torch.from_numpy(affine_matrix(rng, cfg))[None]
    stack = torch.cat([image01[None], masks], dim=0)[None].float()
    grid = F.affine_grid(theta, list(stack.shape), align_corners=False)
    warped = F.grid_sample(stack, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    img, out_masks = warped[0], warped[1:]
    gamma = math.exp(rng.uniform(-cfg.gamma, cfg.gamma))
    img = img.clamp(0, 1) ** gamma
    img = (img - 0.5) * (1 + rng.uniform(-cfg.contrast, cfg.contrast)) + 0.5
    img = img + rng.uniform(-cfg.brightness, cfg.brightness)
    if cfg.noise > 0:
        noise = torch.from_numpy(rng.standard_normal(img.shape).astype(np.float32)) * cfg.noise
        img = img + noise
    return img.clamp(0, 1), out_masks.clamp(0, 1)


def downscale_for_views(image01: torch.Tensor, masks: torch.Tensor, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink (H, W) image and (F, H, W) masks so the longest side is at most ``longest`` (area)."""
    h, w = image01.shape
    if max(h, w) <= longest:
        return image01, masks
    scale = longest / max(h, w)
    size = (max(8, round(h * scale)), max(8, round(w * scale)))
    stack = torch.cat([image01[None], masks], dim=0)[None].float()
    small = F.interpolate(stack, size=size, mode="area")[0]
    return small[0], small[1:]
