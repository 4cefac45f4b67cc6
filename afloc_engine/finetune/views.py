"""The few-shot training cache: every example's views encoded once by the frozen encoder.

A *view* is an example as inference prepares it (view 0) or an augmented copy (small affine,
intensity). :func:`encode_views` runs the encoder over the views once and keeps what the head needs
on its R x R grid (:class:`ViewCache`); :func:`shift_scale` is the per-step feature-space
augmentation of a batch of the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from afloc_engine.finetune.data import Example, FinetuneAugmentConfig, augment_view, downscale_for_views
from afloc_engine.finetune.features import encode, image_channel, image_maps_to_head, valid_on_head
from afloc_engine.heatmap import grid_to_image, similarity_maps
from afloc_engine.transforms import Letterbox, normalize_intensity, prepare_image

if TYPE_CHECKING:
    from afloc_engine.inference import AFLoc

View = tuple[torch.Tensor, Letterbox, torch.Tensor, torch.Tensor]
"""(network input (C, S, S), letterbox, masks (F, H', W') in [0, 1], presence (F,)) of one view."""


@dataclass
class ViewCache:
    """Cached head inputs of N views (all tensors on the training device)."""

    shallow: torch.Tensor  # (N, D, g8, g8) encoder features; (N, k, g8, g8) once reduced
    deep: torch.Tensor  # (N, D, g16, g16) base deep features; reduced, or the stride-8 maps when tuning the stage
    zero_shot: torch.Tensor  # (N, F, R, R) zero-shot heatmaps in [-1, 1]
    image: torch.Tensor  # (N, 1, R, R)
    target: torch.Tensor  # (N, F, R, R) in [0, 1]
    valid: torch.Tensor  # (N, 1, R, R) in [0, 1]
    present: torch.Tensor  # (N, F) 1 where the finding has a mask
    s8: torch.Tensor | None = None  # (N, C8, g8, g8) stride-8 backbone maps (only to tune the last stage)

    def __len__(self) -> int:
        return self.shallow.shape[0]

    def take(self, idx: torch.Tensor) -> ViewCache:
        return ViewCache(
            *(None if getattr(self, f) is None else getattr(self, f)[idx] for f in self.__dataclass_fields__)
        )

    @torch.no_grad()
    def reduce(self, head: torch.nn.Module, tune_stage: bool, chunk: int = 16) -> ViewCache:
        """Features -> the head's PCA inputs (deep: the stride-8 maps instead when the stage is tuned)."""

        def apply(x: torch.Tensor, level: str) -> torch.Tensor:
            return torch.cat([head.reduce(x[i : i + chunk], level) for i in range(0, len(x), chunk)])

        deep = self.s8 if tune_stage else apply(self.deep, "deep")
        return ViewCache(
            apply(self.shallow, "shallow"),
            deep,
            *(getattr(self, f) for f in ("zero_shot", "image", "target", "valid", "present")),
        )


def mask_stack(example: Example, findings: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, H, W) float masks (zeros for findings without a mask) and (F,) presence."""
    h, w = example.image.array.shape
    masks = torch.zeros(len(findings), h, w)
    present = torch.zeros(len(findings))
    for j, f in enumerate(findings):
        if f in example.masks:
            masks[j] = torch.from_numpy(example.masks[f].astype(np.float32))
            present[j] = 1.0
    return masks, present


def make_views(
    model: AFLoc,
    examples: list[Example],
    findings: list[str],
    n_views: int,
    rng: np.random.Generator,
    aug: FinetuneAugmentConfig,
) -> list[View]:
    """(network input (C, S, S), letterbox, masks (F, H', W'), presence (F,)) per view.

    View 0 of each example is the image exactly as inference prepares it; the others are augmented
    copies (shrunk to at most 2 S px first, so augmenting a large DICOM stays cheap).
    """
    c = model.config
    out = []
    for ex in examples:
        masks, present = mask_stack(ex, findings)
        x, box = model.prepare(ex.image)
        out.append((x, box, masks, present))
        if n_views > 1:
            img01 = torch.from_numpy(normalize_intensity(ex.image.array, ex.image.window))
            small_img, small_masks = downscale_for_views(img01, masks, 2 * c.image_size)
            for _ in range(n_views - 1):
                a_img, a_masks = augment_view(small_img, small_masks, rng, aug)
                xa, boxa = prepare_image(
                    a_img.numpy(), c.image_size, (0.0, 1.0), c.intensity_mean, c.intensity_std, c.in_channels
                )
                out.append((xa, boxa, a_masks, present))
    return out


def encode_views(
    model: AFLoc,
    views: list[View],
    prompt_emb: torch.Tensor,
    resolution: int,
    want_s8: bool,
    chunk: int,
    on_chunk: Callable[[int], None],
) -> ViewCache:
    """Run the frozen encoder over the views and cache the head inputs (see :class:`ViewCache`)."""
    dev = model.device
    c = model.config
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ViewCache.__dataclass_fields__}
    for start in range(0, len(views), chunk):
        part = views[start : start + chunk]
        batch = torch.stack([v[0] for v in part]).to(dev)
        tap = encode(model.model.image_encoder, batch, want_s8)
        feats = tap.features
        with torch.no_grad():
            grids = similarity_maps(feats.deep.float(), prompt_emb, c.similarity)
            for i, (_, box, masks, present) in enumerate(part):
                zs = grid_to_image(grids[i], box, c.smoothing_sigma)
                parts["zero_shot"].append(image_maps_to_head(zs, box, resolution))
                parts["target"].append(image_maps_to_head(masks.to(dev), box, resolution).clamp(0, 1))
                parts["valid"].append(valid_on_head(box, resolution, dev)[None])
                parts["present"].append(present.to(dev))
            parts["shallow"].append(feats.shallow.float())
            parts["deep"].append(feats.deep.float())
            if want_s8:
                parts["s8"].append(tap.s8.float())
            parts["image"].append(image_channel(batch, resolution))
        on_chunk(len(part))
    stacked = {
        k: torch.cat(v) if k in ("shallow", "deep", "s8", "image") else torch.stack(v) for k, v in parts.items() if v
    }
    return ViewCache(**{k: t.detach().clone() for k, t in stacked.items()})


def shift_scale(batch: ViewCache, rng: np.random.Generator, aug: FinetuneAugmentConfig) -> ViewCache:
    """Feature-space augmentation: one random translation + scale per sample, applied to every cached map."""
    n = len(batch)
    if n == 0 or (aug.feature_shift <= 0 and aug.feature_scale <= 0):
        return batch
    scale = np.exp(rng.uniform(-aug.feature_scale, aug.feature_scale, size=n))
    shift = rng.uniform(-aug.feature_shift, aug.feature_shift, size=(n, 2)) * 2
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    theta_t = torch.from_numpy(theta).to(batch.shallow.device)

    def warp(x: torch.Tensor, padding: str) -> torch.Tensor:
        grid = F.affine_grid(theta_t, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)

    return ViewCache(
        warp(batch.shallow, "border"),
        warp(batch.deep, "border"),
        warp(batch.zero_shot, "zeros"),
        warp(batch.image, "border"),
        warp(batch.target, "zeros"),
        warp(batch.valid, "zeros"),
        batch.present,
    )  # (batch.s8 is not needed once reduced)


def cat_views(a: ViewCache, b: ViewCache) -> ViewCache:
    """Views of ``a`` then ``b``, as one cache."""
    return ViewCache(
        *(
            None if getattr(a, f) is None else torch.cat([getattr(a, f), getattr(b, f)])
            for f in ViewCache.__dataclass_fields__
        )
    )
