"""Synthetic findings placed where anatomy puts them (issue 19 item 2), for pre-training only.

:mod:`training.synthetic` pastes focal lesions (ground glass, consolidation, nodule, mass) anywhere
in a lung zone. The findings here have a place of their own on a frontal radiograph, and a look:

- **effusion**: homogeneous fluid density filling one costophrenic angle and base, its upper border
  a meniscus that climbs laterally, lung markings hidden;
- **cardiomegaly**: the heart shadow widened to a cardiothoracic ratio of 0.55-0.7, low and to the
  patient's left (image right);
- **pneumothorax**: a lucent rim without lung markings along one lung's apex and lateral wall,
  with the thin bright line of the visceral pleura at its inner edge;
- **atelectasis**: a plate-like band of density in a mid or lower zone;
- **pleural thickening**: a thin dense band along one lung's lateral wall or apex;
- **emphysema**: both lungs darker, with fewer markings;
- **calcification**: a few tiny, very dense dots;
- **fibrosis**: a reticular (net-like) pattern at both lung bases, peripherally;
- **diffuse nodule**: many tiny nodules over both lungs;
- **edema**: a bilateral perihilar haze ("bat wing").

Each painter takes the image (H, W) float32 in [0, 1] (changed in place), the lung-field estimate
(:func:`training.synthetic.lung_fields`), the side (patient's ``right`` = image left) and a
generator, and returns the finding's binary mask (H, W). Shapes and densities are rough by
design: enough for the words to have something of the right kind, in the right place, to point at.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

Painter = Callable[[np.ndarray, np.ndarray, str, np.random.Generator], np.ndarray]


def _side_fields(fields: np.ndarray, side: str) -> np.ndarray:
    """The lung field of one side (patient's right = image left); a fixed box when none was found."""
    h, w = fields.shape
    half = np.zeros_like(fields)
    half[:, : w // 2] = side == "right"
    half[:, w // 2 :] = side != "right"
    region = fields & half
    if region.sum() < 0.01 * h * w:
        region = np.zeros_like(fields)
        x0, x1 = (0.15, 0.47) if side == "right" else (0.53, 0.85)
        region[int(0.2 * h) : int(0.8 * h), int(x0 * w) : int(x1 * w)] = True
    return region


def _extent(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a mask's bounding box (bottom/right exclusive)."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(mask.astype(np.float32), max(0.5, sigma))


def _densify(image: np.ndarray, alpha: np.ndarray, contrast: float, flatten: float = 0.0) -> None:
    """Whiter where ``alpha`` (0-1): markings smoothed away by ``flatten``, then ``contrast`` of the way to 1."""
    if flatten > 0:
        smooth = ndimage.gaussian_filter(image, max(image.shape) / 40)
        image += flatten * alpha * (smooth - image)
    image += contrast * alpha * (1 - image)
    np.clip(image, 0, 1, out=image)


def _lucent(image: np.ndarray, alpha: np.ndarray, amount: float, flatten: float) -> None:
    """Darker where ``alpha``: markings smoothed away by ``flatten``, then ``amount`` of the way to 0."""
    smooth = ndimage.gaussian_filter(image, max(image.shape) / 30)
    image += flatten * alpha * (smooth - image)
    image -= amount * alpha * image
    np.clip(image, 0, 1, out=image)


def effusion(image: np.ndarray, fields: np.ndarray, side: str, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape
    lung = _side_fields(fields, side)
    top, bottom, left, right = _extent(lung)
    height = bottom - top
    level = bottom - rng.uniform(0.15, 0.45) * height
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    lateral = (right - xx) / max(1, right - left) if side == "right" else (xx - left) / max(1, right - left)
    meniscus = level - rng.uniform(0.05, 0.15) * height * np.clip(lateral, 0, 1) ** 2
    chest = ndimage.binary_dilation(lung, iterations=max(1, int(0.03 * h)))
    mask = (yy >= meniscus) & (yy <= bottom + 0.03 * h) & (xx >= left) & (xx < right) & chest
    _densify(image, _soft(mask, 0.012 * h), rng.uniform(0.35, 0.6), flatten=0.8)
    return mask


def cardiomegaly(image: np.ndarray, fields: np.ndarray, side: str, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape
    both = _side_fields(fields, "right") | _side_fields(fields, "left")
    top, bottom, left, right = _extent(both)
    width = right - left
    cx = (left + right) / 2 + 0.06 * width  # the heart lies to the patient's left (image right)
    cy = top + rng.uniform(0.68, 0.76) * (bottom - top)
    a = rng.uniform(0.55, 0.7) * width / 2
    b = a * rng.uniform(0.55, 0.7)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mask = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
    _densify(image, _soft(mask, 0.015 * h), rng.uniform(0.3, 0.5), flatten=0.6)
    return mask


def _wall_band(lung: np.ndarray, side: str, width: float, rows: np.ndarray) -> np.ndarray:
    """Pixels of ``lung`` within ``width`` px of its lateral edge, row by row, in the rows where ``rows``."""
    h, w = lung.shape
    xx = np.arange(w)[None, :]
    has = lung.any(axis=1)
    if side == "right":  # patient's right: the lateral wall is the image's left edge of the field
        edge = np.where(has, np.argmax(lung, axis=1), 0)[:, None]
        band = (xx >= edge) & (xx < edge + width)
    else:
        edge = np.where(has, w - 1 - np.argmax(lung[:, ::-1], axis=1), w - 1)[:, None]
        band = (xx <= edge) & (xx > edge - width)
    return band & has[:, None] & rows[:, None]


def _rows(lung: np.ndarray, start: float, end: float) -> np.ndarray:
    """(H,) bool: the rows from ``start`` to ``end`` of the lung's height (fractions, 0 = its apex)."""
    top, bottom, _, _ = _extent(lung)
    y = np.arange(lung.shape[0])
    return (y >= top + start * (bottom - top)) & (y <= top + end * (bottom - top))


def _apex_cap(lung: np.ndarray, depth: float) -> np.ndarray:
    """The lung's pixels within ``depth`` px below its apex."""
    top = _extent(lung)[0]
    return lung & (np.arange(lung.shape[0])[:, None] <= top + depth)


def pneumothorax(image: np.ndarray, fields: np.ndarray, side: str, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape
    lung = _side_fields(fields, side)
    depth = rng.uniform(0.03, 0.08) * w
    rim = _wall_band(lung, side, depth, _rows(lung, 0.0, rng.uniform(0.45, 0.75))) | _apex_cap(lung, depth)
    _lucent(image, _soft(rim, 0.004 * h), rng.uniform(0.25, 0.45), flatten=0.9)
    line = ndimage.binary_dilation(rim, iterations=max(1, int(0.006 * w))) & lung & ~rim
    _densify(image, _soft(line, 0.5), rng.uniform(0.15, 0.3))
    return rim


def atelectasis(image: np.ndarray, fields: np.ndarray, side: str, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape
    lung = _side_fields(fields, side)
    top, bottom, _, _ = _extent(lung)
    zone = lung & (np.arange(h)[:, None] >= top + rng.uniform(0.4, 0.65) * (bottom - top))
    ys, xs = np.nonzero(zone if zone.any() else lung)
    i = rng.integers(len(ys))
    angle = np.radians(rng.uniform(-25, 25))
    length, thickness = rng.uniform(0.08, 0.18) * w, rng.uniform(0.012, 0.03) * w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = (xx - xs[i]) * np.cos(angle) + (yy - ys[i]) * np.sin(angle)
    v = -(xx - xs[i]) * np.sin(angle) + (yy - ys[i]) * np.cos(angle)
    mask = ((u / length) ** 2 + (v / thickness) ** 2 <= 1) & ndimage.binary_dilation(lung, iterations=2)
    _densify(image, _soft(mask, 0.004 * h), rng.uniform(0.25, 0.45), flatten=0.3)
    return mask


def pleural_thickening(image: np.ndarray, fields: np.ndarray, side: str, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape
    lung = _side_fields(fields, side)
    thickness = rng.uniform(0.01, 0.025) * w
    if rng.random() < 0.35:  # an apical cap
        band = _apex_cap(lung, thickness) | _wall_band(lung, side, thickness, _rows(lung, 0.0, 0.18))
    else:  # along the lateral wall
        start = rng.uniform(0.1, 0.5)
        band = _wall_band(lung, side, thickness, _rows(lung, start, start + rng.uniform(0.3, 0.5)))
    _densify(image, _soft(band, 0.003 * h), rng.uniform(0.3, 0.5))
    return band


def emphysema(image: np.ndarray, fields: np.ndarray, side: str, rng: np.random.Generator) -> np.ndarray:
    h, _ = image.shape
    lungs = _side_fields(fields, "right") | _side_fields(fields, "left")
    _lucent(image, _soft(lungs, 0.01 * h), rng.uniform(0.15, 0.3), flatten=0.5)
    return lungs


def calcification(image: np.ndarray, fields: np.ndarray, side: str, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape
    lung = _side_fields(fields, side)
    ys, xs = np.nonzero(lung)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mask = np.zeros((h, w), bool)
    for _ in range(rng.integers(1, 5)):
        i = rng.integers(len(ys))
        radius = rng.uniform(0.004, 0.01) * w
        mask |= (yy - ys[i]) ** 2 + (xx - xs[i]) ** 2 <= radius**2
    _densify(image, _soft(mask, 0.5), rng.uniform(0.6, 0.9))
    return ndimage.binary_dilation(mask)


def fibrosis(image: np.ndarray, fields: np.ndarray, side: str, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape
    lungs = _side_fields(fields, "right") | _side_fields(fields, "left")
    top, bottom, _, _ = _extent(lungs)
    depth = ndimage.distance_transform_edt(lungs)
    region = lungs & (depth < rng.uniform(0.06, 0.12) * w)
    region &= np.arange(h)[:, None] >= top + rng.uniform(0.35, 0.55) * (bottom - top)
    noise = rng.standard_normal((h, w)).astype(np.float32)
    band = ndimage.gaussian_filter(noise, 0.006 * w) - ndimage.gaussian_filter(noise, 0.012 * w)
    lines = np.exp(-((band / (0.25 * band.std() + 1e-6)) ** 2))  # the zero crossings: a net
    _densify(image, _soft(region, 0.01 * h) * lines, rng.uniform(0.25, 0.45))
    return region


def diffuse_nodule(image: np.ndarray, fields: np.ndarray, side: str, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape
    lungs = _side_fields(fields, "right") | _side_fields(fields, "left")
    ys, xs = np.nonzero(lungs)
    dots = np.zeros((h, w), np.float32)
    for i in rng.integers(len(ys), size=rng.integers(15, 40)):
        dots[ys[i], xs[i]] = 1.0
    radius = rng.uniform(0.006, 0.012) * w
    blobs = ndimage.gaussian_filter(dots, radius) * (2 * np.pi * radius**2)
    _densify(image, np.clip(blobs, 0, 1), rng.uniform(0.15, 0.3))
    return lungs & (blobs > 0.3)


def edema(image: np.ndarray, fields: np.ndarray, side: str, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape
    mask = np.zeros((h, w), bool)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for s in ("right", "left"):
        lung = _side_fields(fields, s)
        top, bottom, left, right = _extent(lung)
        hx = right - 0.25 * (right - left) if s == "right" else left + 0.25 * (right - left)  # medial third
        hy = top + 0.5 * (bottom - top)
        radius = rng.uniform(0.12, 0.18) * w
        mask |= (np.exp(-(((yy - hy) / (1.2 * radius)) ** 2 + ((xx - hx) / radius) ** 2)) > 0.5) & lung
    _densify(image, _soft(mask, 0.03 * h), rng.uniform(0.12, 0.25), flatten=0.3)
    return mask


FINDINGS: dict[str, Painter] = {
    "effusion": effusion,
    "cardiomegaly": cardiomegaly,
    "pneumothorax": pneumothorax,
    "atelectasis": atelectasis,
    "pleural thickening": pleural_thickening,
    "emphysema": emphysema,
    "calcification": calcification,
    "fibrosis": fibrosis,
    "diffuse nodule": diffuse_nodule,
    "edema": edema,
}
"""Painter of each finding, by the name the prompts use (ChestX-Det's and NIH's finding names)."""
BILATERAL = frozenset({"cardiomegaly", "emphysema", "fibrosis", "diffuse nodule", "edema"})
"""Findings without a side (both lungs, or the heart)."""

PHRASES: dict[str, list[str]] = {
    "effusion": ["pleural effusion", "effusion", "pleural fluid", "blunting of the costophrenic angle"],
    "cardiomegaly": ["cardiomegaly", "enlarged heart", "enlarged cardiac silhouette", "cardiac enlargement"],
    "pneumothorax": ["pneumothorax", "collapsed lung with pleural air", "apical pneumothorax", "pleural air"],
    "atelectasis": ["atelectasis", "plate-like atelectasis", "subsegmental atelectasis", "volume loss"],
    "pleural thickening": ["pleural thickening", "thickened pleura", "apical pleural thickening", "pleural scarring"],
    "emphysema": ["emphysema", "hyperinflation", "hyperlucency", "emphysematous change"],
    "calcification": ["calcification", "calcified granuloma", "calcified nodule", "dense calcific focus"],
    "fibrosis": ["fibrosis", "pulmonary fibrosis", "reticular opacities", "interstitial fibrosis"],
    "diffuse nodule": ["diffuse nodules", "multiple small nodules", "miliary nodules", "diffuse nodular pattern"],
    "edema": ["edema", "pulmonary edema", "perihilar haziness", "interstitial edema"],
}
"""Report-language names of each finding (the grounded loss draws one per step; reports use them)."""

SENTENCES: dict[str, list[str]] = {
    "effusion": ["{Side} pleural effusion.", "There is a small {side} {phrase}.", "{Phrase} on the {side}."],
    "cardiomegaly": ["{Phrase} is noted.", "{Phrase}.", "There is {phrase}."],
    "pneumothorax": ["{Side} {phrase}.", "There is a {side} {phrase}.", "{Phrase} on the {side}."],
    "atelectasis": ["{Side} basilar {phrase}.", "{Phrase} at the {side} base.", "There is {side} {phrase}."],
    "pleural thickening": ["{Side} {phrase}.", "There is {side} {phrase}.", "{Phrase} on the {side}."],
    "emphysema": ["{Phrase}.", "There is {phrase}.", "The lungs show {phrase}."],
    "calcification": ["{Side} lung {phrase}.", "A {phrase} in the {side} lung.", "There is a {side} {phrase}."],
    "fibrosis": ["Bibasilar {phrase}.", "{Phrase} at both bases.", "{Phrase} at the lung bases."],
    "diffuse nodule": ["{Phrase} in both lungs.", "{Phrase} throughout both lungs.", "Bilateral {phrase}."],
    "edema": ["{Phrase}.", "There is {phrase}.", "Bilateral {phrase}."],
}
"""Report sentence templates: ``{side}``/``{Side}`` and ``{phrase}``/``{Phrase}`` are filled in."""


def sentence(kind: str, side: str, rng: np.random.Generator) -> str:
    """One report sentence naming the finding (and its side where it has one)."""
    phrase = str(rng.choice(PHRASES[kind]))
    template = str(rng.choice(SENTENCES[kind]))
    return template.format(side=side, Side=side.capitalize(), phrase=phrase, Phrase=phrase[0].upper() + phrase[1:])
