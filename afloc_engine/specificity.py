"""Does a prompt's heatmap say something of its own? Per-prompt specificity scores (pure numpy).

AFLoc promises that the text decides where the heatmap points. A model that finds the lungs
whatever it is asked gives every prompt nearly the same map. Two numbers per prompt tell the user:

- **specificity** = 1 - (mean Pearson correlation of this prompt's heatmap with the heatmaps of
  the *other* prompts of the same run, on the same image). 0: the map is what the other prompts
  give (the prompt changes nothing); 1: unrelated to them; up to 2: the opposite of them. It is
  None with a single prompt (nothing to compare with) or when a map is constant.
- **lung_correlation** = Pearson correlation of the heatmap with a lung-field map (by default
  :func:`lung_field_map`, a fixed template of both lung fields defined from anatomy; an
  image-specific lung estimate may be passed instead). Near 1: the map is "the lungs".

A warning string is attached where the model cannot tell the finding from the lungs
(``lung_correlation >= LUNG_WARN_R``) or from the other prompts (``specificity <=
SPECIFICITY_WARN``). The thresholds are documented in ``docs/results.md`` (section "Prompt
specificity") with the measurements that chose them.

>>> lungs = lung_field_map((32, 32))
>>> [round(s, 6) for s in specificity_scores(np.stack([lungs] * 3))]  # one map for 3 prompts
[0.0, 0.0, 0.0]
>>> specificity_scores(lungs[None])  # a single prompt: nothing to compare with
[None]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LUNG_FIELD_CENTRES: tuple[tuple[float, float], ...] = ((0.30, 0.48), (0.70, 0.48))
"""(x, y) centres of the two lung fields as fractions of the image width and height.

Anatomy of a frontal (PA/AP) chest radiograph framed on the thorax: each lung field spans about
10-50 % (image left = patient's right) and 50-90 % of the width, and from the apices (~15 %)
to the hemidiaphragms (~80 %) of the height. Fixed from anatomy; not fitted to any mask.
"""
LUNG_FIELD_SIGMA: tuple[float, float] = (0.10, 0.17)
"""(x, y) Gaussian spread of each lung field's template, as fractions of width and height
(about a quarter of the field's extent)."""

LUNG_WARN_R = 0.5
"""A prompt whose heatmap correlates at least this much with :func:`lung_field_map` gets a warning
(the template then explains at least a quarter of the map's variance). On ``chestx-det-nih`` the
shipped v2 model, at chance on prompt specificity, has a median r of 0.38-0.61 per prompt."""
SPECIFICITY_WARN = 0.3
"""A prompt whose specificity is at most this (mean r >= 0.7 with the other prompts' maps) gets a
warning: 0.7 is the prompt invariance of the shipped v2 model, whose prompts rank their own
finding at chance on ``chestx-det-nih`` (``docs/results.md``, "Prompt specificity")."""


ASSESS_MAX_PIXELS = 1 << 18
""":func:`assess` subsamples larger maps on a regular grid to at most about this many pixels."""


def lung_field_map(
    shape: tuple[int, int],
    centres: Sequence[tuple[float, float]] = LUNG_FIELD_CENTRES,
    sigma: tuple[float, float] = LUNG_FIELD_SIGMA,
) -> np.ndarray:
    """(H, W) float32 map in [-1, 1]: a Gaussian at each lung field's centre, summed, min-max normalised.

    ``centres`` and ``sigma`` are fractions of the width (x) and height (y) of the image.
    Raises ValueError for a shape that is not two positive sizes.
    """
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (H, W) with positive sizes, not {tuple(shape)}")
    height, width = int(shape[0]), int(shape[1])
    y = (np.arange(height, dtype=np.float64) + 0.5) / height
    x = (np.arange(width, dtype=np.float64) + 0.5) / width
    total = np.zeros((height, width), dtype=np.float64)
    for cx, cy in centres:
        gx = np.exp(-0.5 * ((x - cx) / sigma[0]) ** 2)
        gy = np.exp(-0.5 * ((y - cy) / sigma[1]) ** 2)
        total += gy[:, None] * gx[None, :]
    low, high = total.min(), total.max()
    if high <= low:
        return np.zeros((height, width), dtype=np.float32)
    return (2 * (total - low) / (high - low) - 1).astype(np.float32)


MAX_PIXELS = 1 << 20
"""Correlations use at most this many pixels per map: larger maps (big radiographs, CT volumes) are
sampled with a fixed stride (heatmaps are smooth; the tests check r against all pixels), which keeps
the memory to a few MB per prompt."""


def _flat(maps: np.ndarray) -> np.ndarray:
    """(P, ...) maps -> (P, N) float64 over the pixels finite in every map (strided to <= MAX_PIXELS)."""
    flat = np.asarray(maps).reshape(len(maps), -1)
    step = -(-flat.shape[1] // MAX_PIXELS)
    flat = flat[:, ::step].astype(np.float64)
    keep = np.isfinite(flat).all(axis=0)
    return flat[:, keep]


def correlation_matrix(heatmaps: np.ndarray) -> np.ndarray:
    """(P, P) Pearson correlations between the P heatmaps of one image.

    heatmaps: (P, H, W) (any spatial shape); pixels that are not finite in some map are left out.
    A constant map correlates with nothing: its row and column are NaN (its diagonal too).
    Raises ValueError for fewer than one map or an empty map.
    """
    heatmaps = np.asarray(heatmaps)
    if heatmaps.ndim < 2 or len(heatmaps) == 0 or heatmaps[0].size == 0:
        raise ValueError(f"heatmaps must be (P, H, W) with P >= 1, not shape {heatmaps.shape}")
    flat = _flat(heatmaps)
    centred = flat - flat.mean(axis=1, keepdims=True)
    norm = np.sqrt((centred**2).sum(axis=1))
    size = np.abs(flat).max(axis=1) if flat.shape[1] else np.zeros(len(flat))
    valid = (norm > 1e-9 * size * np.sqrt(flat.shape[1])) & (norm > 0)
    unit = np.where(valid[:, None], centred / np.where(valid, norm, 1.0)[:, None], np.nan)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps of the same shape (NaN when either is constant)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"maps of different shapes {a.shape} and {b.shape}")
    return float(correlation_matrix(np.stack([a, b]))[0, 1])


def mean_other_correlation(heatmaps: np.ndarray) -> np.ndarray:
    """(P,) for each prompt, the mean correlation of its heatmap with the other P - 1 (NaN if P < 2).

    Pairs involving a constant map are left out of the mean; NaN when none is left.
    """
    r = correlation_matrix(heatmaps)
    p = len(r)
    out = np.full(p, np.nan)
    if p < 2:
        return out
    off = r.copy()
    np.fill_diagonal(off, np.nan)
    for i in range(p):
        row = off[i][np.isfinite(off[i])]
        if row.size:
            out[i] = row.mean()
    return out


def specificity_scores(heatmaps: np.ndarray) -> list[float | None]:
    """Per prompt, 1 - mean correlation with the other prompts' heatmaps on the same image.

    heatmaps: (P, H, W). Returns P floats in [0, 2] (None where undefined: a single prompt or a
    constant map). See the module doc for how to read it.
    """
    return [None if not np.isfinite(m) else float(1.0 - m) for m in mean_other_correlation(heatmaps)]


def lung_correlations(heatmaps: np.ndarray, lung_map: np.ndarray | None = None) -> list[float | None]:
    """Per prompt, the Pearson correlation of its (H, W) heatmap with ``lung_map`` (default: :func:`lung_field_map`).

    heatmaps: (P, H, W); lung_map: (H, W). Returns P floats in [-1, 1] (None for a constant map).
    """
    heatmaps = np.asarray(heatmaps)
    if heatmaps.ndim != 3:
        raise ValueError(f"heatmaps must be (P, H, W), not shape {heatmaps.shape}")
    lung = lung_field_map(heatmaps.shape[1:]) if lung_map is None else np.asarray(lung_map)
    if lung.shape != heatmaps.shape[1:]:
        raise ValueError(f"lung map of shape {lung.shape} for heatmaps of shape {heatmaps.shape[1:]}")
    r = correlation_matrix(np.concatenate([heatmaps, lung[None]]))[-1, :-1]
    return [None if not np.isfinite(v) else float(v) for v in r]


@dataclass(frozen=True)
class PromptSpecificity:
    """How much one prompt's heatmap is its own.

    specificity: 1 - mean r with the other prompts' maps (None: single prompt or constant map).
    mean_correlation: that mean r (None likewise). lung_correlation: r with the lung-field map.
    warning: a sentence for the user, or None.
    """

    prompt: str
    specificity: float | None
    mean_correlation: float | None
    lung_correlation: float | None
    warning: str | None

    def to_dict(self) -> dict[str, object]:
        """The fields by name (as ``results.json`` records them)."""
        return dict(vars(self))


def specificity_warning(
    prompt: str,
    specificity: float | None,
    lung_correlation: float | None,
    lung_warn_r: float = LUNG_WARN_R,
    specificity_warn: float = SPECIFICITY_WARN,
) -> str | None:
    """The warning for one prompt (None when neither threshold is crossed)."""
    parts = []
    if lung_correlation is not None and lung_correlation >= lung_warn_r:
        parts.append(
            f'the heatmap of "{prompt}" correlates r = {lung_correlation:.2f} with a lung-field map: '
            "the model cannot tell this finding from the lungs"
        )
    if specificity is not None and specificity <= specificity_warn:
        parts.append(
            f'the heatmap of "{prompt}" is nearly the same as the other prompts\' '
            f"(specificity {specificity:.2f}, mean r = {1 - specificity:.2f}): "
            "the prompt hardly changes where it points"
        )
    return "; ".join(parts) if parts else None


def assess(
    heatmaps: np.ndarray,
    prompts: Sequence[str],
    lung_map: np.ndarray | None = None,
    lung_warn_r: float = LUNG_WARN_R,
    specificity_warn: float = SPECIFICITY_WARN,
) -> list[PromptSpecificity]:
    """Specificity, correlations and a warning for each of the P prompts of one image.

    heatmaps: (P, H, W) float (the [-1, 1] maps of one run; (P, Z, Y, X) volumes get specificity
    only); prompts: P strings; lung_map: (H, W) or None for :func:`lung_field_map`.
    Raises ValueError when the counts or shapes disagree.
    """
    heatmaps = np.asarray(heatmaps)
    if heatmaps.ndim < 3 or len(heatmaps) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts for heatmaps of shape {heatmaps.shape}; want (P, H, W)")
    # the maps are smooth (a 14 x 14 feature grid upsampled): a regular subsample of at most
    # ASSESS_MAX_PIXELS pixels gives the same r to ~1e-3 at a small part of the cost (a 1841 x 1955
    # radiograph with 14 prompts: seconds -> milliseconds)
    step = int(np.ceil((heatmaps[0].size / ASSESS_MAX_PIXELS) ** (1.0 / (heatmaps.ndim - 1))))
    if step > 1:
        if heatmaps.ndim == 3 and lung_map is None:
            lung_map = lung_field_map(heatmaps.shape[1:])  # the full-size template, subsampled alike
        heatmaps = heatmaps[(slice(None),) + (slice(None, None, step),) * (heatmaps.ndim - 1)]
        if lung_map is not None:
            lung_map = np.asarray(lung_map)[::step, ::step]
    # a prompt with no word the text model reads gives a noise map: no specificity of its own, and left
    # out of the other prompts' comparison (its noise would make them look specific)
    readable = [i for i, p in enumerate(prompts) if is_readable(p)]
    spec: list[float | None] = [None] * len(prompts)
    for i, s in zip(readable, specificity_scores(heatmaps[readable]) if readable else []):
        spec[i] = s
    # the lung-field template is 2D: a volume's (P, Z, Y, X) maps get no lung correlation
    lung = lung_correlations(heatmaps, lung_map) if heatmaps.ndim == 3 else [None] * len(prompts)
    out = []
    for i, (p, s, r) in enumerate(zip(prompts, spec, lung)):
        if i in readable:
            warning = specificity_warning(p, s, r, lung_warn_r, specificity_warn)
        else:
            warning = f'the text model reads no word of "{p}" (it reads English words): its heatmap is noise'
        out.append(PromptSpecificity(p, s, None if s is None else 1.0 - s, r, warning))
    return out


def is_readable(prompt: str) -> bool:
    """Whether the text model reads at least one word of ``prompt`` (English words; accents folded)."""
    from afloc_engine.text import split_sentences

    return bool(split_sentences(prompt))
