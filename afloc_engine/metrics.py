"""Localisation and classification metrics of the AFLoc evaluation protocol, with bootstrap CIs.

The protocol (``shared/reference/afloc-method.md``): on positive images only, a [-1, 1] heatmap
is compared with the ground-truth region by

- IoU and Dice of ``heatmap > t``, each averaged over ``t`` in {0.1, 0.2, 0.3, 0.4, 0.5}
  (the definitions of MONAI's :func:`monai.metrics.compute_iou` / :func:`monai.metrics.compute_dice`,
  computed from confusion counts for speed and checked against MONAI in the tests);
- CNR ``|mean_in - mean_out| / sqrt(var_in + var_out)`` on the heatmap itself (no threshold,
  population variances);
- the pointing game: is the heatmap's maximum inside the region;

and classification by AUROC (MONAI's :func:`monai.metrics.compute_roc_auc`). 95% confidence
intervals are the 2.5th and 97.5th percentiles of 1,000 seeded bootstrap resamples.

>>> heat = np.array([[0.9, 0.2], [-1.0, -0.5]], dtype=np.float32)
>>> target = np.array([[True, False], [False, False]])
>>> round(mean_iou(heat, target), 3), pointing_game(heat, target)
(0.9, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
"""Thresholds on the [-1, 1] heatmap over which IoU and Dice are averaged (the paper's)."""


def _check_pair(heatmap: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    heatmap = np.asarray(heatmap, dtype=np.float32)
    target = np.asarray(target).astype(bool, copy=False)
    if heatmap.shape != target.shape:
        raise ValueError(f"heatmap shape {heatmap.shape} differs from target shape {target.shape}")
    if heatmap.ndim < 1 or heatmap.size == 0:
        raise ValueError("heatmap is empty")
    return heatmap, target


def threshold_masks(heatmap: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> np.ndarray:
    """(H, W) heatmap -> (T, H, W) bool masks ``heatmap > t``, one per threshold."""
    heatmap = np.asarray(heatmap, dtype=np.float32)
    return heatmap[None] > np.asarray(thresholds, dtype=np.float32).reshape(-1, *([1] * heatmap.ndim))


def iou_dice_at_thresholds(
    heatmap: np.ndarray, target: np.ndarray, thresholds: Sequence[float] = THRESHOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """IoU and Dice of ``heatmap > t`` against ``target`` for each threshold.

    heatmap: (H, W) float (any spatial shape), target: same shape, bool, not empty.
    Returns two (T,) float64 arrays. An empty prediction scores 0. Equal to MONAI's
    ``compute_iou`` / ``compute_dice`` (``include_background=True, ignore_empty=False``; the tests
    check it), computed from the confusion counts directly because MONAI's Dice takes ~0.3 s per
    512 x 512 map on a CPU, far too slow for thousands of image-prompt pairs.
    """
    heatmap, target = _check_pair(heatmap, target)
    area = int(target.sum())
    if area == 0:
        raise ValueError("target region is empty: IoU/Dice are measured on positive images only")
    inside = heatmap[target]
    t = np.asarray(thresholds, dtype=np.float32)
    intersection = np.array([np.count_nonzero(inside > v) for v in t], dtype=np.float64)
    predicted = np.array([np.count_nonzero(heatmap > v) for v in t], dtype=np.float64)
    union = predicted + area - intersection
    return intersection / union, 2 * intersection / (predicted + area)


def mean_iou(heatmap: np.ndarray, target: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> float:
    """IoU of (H, W) ``heatmap > t`` vs the (H, W) bool ``target``, averaged over ``thresholds``."""
    return float(iou_dice_at_thresholds(heatmap, target, thresholds)[0].mean())


def mean_dice(heatmap: np.ndarray, target: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> float:
    """Dice of (H, W) ``heatmap > t`` vs the (H, W) bool ``target``, averaged over ``thresholds``."""
    return float(iou_dice_at_thresholds(heatmap, target, thresholds)[1].mean())


def cnr(heatmap: np.ndarray, target: np.ndarray) -> float:
    """Contrast-to-noise ratio ``|mean_in - mean_out| / sqrt(var_in + var_out)`` of an (H, W) heatmap.

    ``in`` is the (H, W) bool ``target`` region, ``out`` the rest; variances are population
    variances (ddof 0). A heatmap with no contrast and no noise (e.g. constant) gives 0; NaN when
    the region or its complement is empty, or when the contrast is non-zero but both variances
    are 0 (undefined).
    """
    heatmap, target = _check_pair(heatmap, target)
    inside = heatmap[target].astype(np.float64)
    outside = heatmap[~target].astype(np.float64)
    if inside.size == 0 or outside.size == 0:
        return float("nan")
    diff = abs(inside.mean() - outside.mean())
    noise = np.sqrt(inside.var() + outside.var())
    if noise == 0:
        return 0.0 if diff == 0 else float("nan")
    return float(diff / noise)


def pointing_game(heatmap: np.ndarray, target: np.ndarray, tolerance: int = 0) -> float:
    """Pointing-game hit of an (H, W) heatmap: 1.0 when its maximum lies in the (H, W) bool ``target``.

    Ties (several pixels share the maximum, e.g. a constant heatmap) score the fraction of the
    maximal pixels inside the target: the expected hit rate of breaking the tie at random.
    ``tolerance`` (pixels) first dilates the target by a square of that radius.
    """
    heatmap, target = _check_pair(heatmap, target)
    if tolerance > 0:
        from scipy.ndimage import binary_dilation

        target = binary_dilation(target, structure=np.ones((3,) * target.ndim, bool), iterations=int(tolerance))
    top = heatmap == heatmap.max()
    return float(target[top].mean())


@dataclass(frozen=True)
class LocalizationScores:
    """The localisation metrics of one heatmap against one ground-truth region.

    iou, dice: means over the thresholds; iou_at, dice_at: (T,) per threshold; cnr: see :func:`cnr`;
    pointing: see :func:`pointing_game`.
    """

    iou: float
    dice: float
    cnr: float
    pointing: float
    iou_at: tuple[float, ...]
    dice_at: tuple[float, ...]


def localization_scores(
    heatmap: np.ndarray, target: np.ndarray, thresholds: Sequence[float] = THRESHOLDS, tolerance: int = 0
) -> LocalizationScores:
    """Every localisation metric of an (H, W) [-1, 1] heatmap against a non-empty (H, W) bool region."""
    iou, dice = iou_dice_at_thresholds(heatmap, target, thresholds)
    return LocalizationScores(
        iou=float(iou.mean()),
        dice=float(dice.mean()),
        cnr=cnr(heatmap, target),
        pointing=pointing_game(heatmap, target, tolerance),
        iou_at=tuple(float(v) for v in iou),
        dice_at=tuple(float(v) for v in dice),
    )


def _check_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (negative) or 1 (positive)")
    return scores, labels.astype(bool)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of (N,) scores for (N,) 0/1 labels (MONAI); ties count one half.

    NaN when only one class is present.
    """
    from monai.metrics import compute_roc_auc

    scores, labels = _check_scores(scores, labels)
    if labels.all() or not labels.any():
        return float("nan")
    return float(compute_roc_auc(torch.from_numpy(scores), torch.from_numpy(labels.astype(np.int64))))


def auroc_batch(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of each row of (B, N) scores against (B, N) bool labels (Mann-Whitney U, average ranks).

    Equal to :func:`auroc` row by row, vectorised for bootstrap resamples; NaN for a row with one class.
    """
    from scipy.stats import rankdata

    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    labels = np.atleast_2d(np.asarray(labels, dtype=bool))
    ranks = rankdata(scores, axis=1)
    n_pos = labels.sum(axis=1).astype(np.float64)
    n_neg = labels.shape[1] - n_pos
    u = (ranks * labels).sum(axis=1) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        out = u / (n_pos * n_neg)
    out[(n_pos == 0) | (n_neg == 0)] = np.nan
    return out


def _percentile_ci(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return float("nan"), float("nan")
    alpha = (1 - confidence) / 2
    low, high = np.percentile(stats, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high)


def bootstrap_mean_ci(
    values: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of (N,) values (non-finite values are dropped first).

    With ``groups`` ((N,) labels, e.g. the image of each image-finding pair) whole groups are
    resampled (cluster bootstrap) and the statistic is the mean over the values they hold.
    Returns (low, high); (nan, nan) when there are no finite values.
    """
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    values = np.asarray(values, dtype=np.float64).ravel()
    keep = np.isfinite(values)
    values = values[keep]
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    if groups is None:
        idx = rng.integers(0, values.size, size=(n_resamples, values.size))
        stats = values[idx].mean(axis=1)
    else:
        groups = np.asarray(groups).ravel()[keep]
        _, inverse = np.unique(groups, return_inverse=True)
        sums = np.bincount(inverse, weights=values)
        counts = np.bincount(inverse).astype(np.float64)
        idx = rng.integers(0, sums.size, size=(n_resamples, sums.size))
        stats = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    return _percentile_ci(stats, confidence)


def bootstrap_auroc_indices(labels: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """(B, N) resample indices drawn within each class (stratified), so every resample has both classes."""
    labels = np.asarray(labels, dtype=bool).ravel()
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    parts = [cls[rng.integers(0, cls.size, size=(n_resamples, cls.size))] for cls in (pos, neg) if cls.size]
    return np.concatenate(parts, axis=1) if parts else np.zeros((n_resamples, 0), dtype=np.int64)


def bootstrap_auroc_ci(
    scores: np.ndarray, labels: np.ndarray, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile CI of the AUROC of (N,) scores for (N,) 0/1 labels, positives and negatives resampled apart."""
    scores, labels = _check_scores(scores, labels)
    if labels.all() or not labels.any():
        return float("nan"), float("nan")
    idx = bootstrap_auroc_indices(labels, n_resamples, seed)
    return _percentile_ci(auroc_batch(scores[idx], labels[idx]), confidence)
