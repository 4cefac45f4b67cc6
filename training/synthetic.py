"""Synthetic image-report pairs with known lesion positions, for pre-training only (never evaluation).

A real chest X-ray (with no report, e.g. from ``unlabeled-cxr``) gets 0-3 pasted lesions —
ground-glass opacity (faint, hazy), consolidation (dense) or a nodule (small, round) — inside an
estimate of its lung fields, and a report sentence for each that names the lesion and where it is
("Patchy ground-glass opacities in the right lower zone."). The words then have something to
point at: the contrastive losses learn that "ground glass" means a hazy region, "right" the
image's left half (patient's right on a frontal film), "lower" the bases.

    python -m training.synthetic --backgrounds DIR [DIR ...] --n 3000 --out DIR [--seed 0]

writes ``DIR/images/*.png`` (grey, longest side ``--size``), ``DIR/masks/*.png`` (lesion label maps,
values in ``KIND_LABELS``, written as ``DIR/labels.json``)
and ``DIR/manifest.csv`` (``id, image, text, patient_id, split, mask``) for the trainer's
``manifest`` source.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from training import synthetic_findings

LESIONS = {
    # name: (contrast range, radius range as a fraction of the image side, edge softness)
    "ground glass opacity": ((0.1, 0.22), (0.06, 0.14), 0.35),
    "consolidation": ((0.22, 0.42), (0.05, 0.11), 0.12),
    "nodule": ((0.2, 0.4), (0.015, 0.035), 0.08),
    "mass": ((0.28, 0.48), (0.04, 0.075), 0.06),
}
FOCAL_LESIONS = ("ground glass opacity", "consolidation", "nodule")
"""The lesion kinds of the ``lesions`` recipe (the default model's pre-training)."""
ROUND = frozenset({"nodule", "mass"})
"""Lesions drawn as one round blob, not clipped to the lung field."""
PHRASES = {
    "ground glass opacity": [
        "ground glass opacity",
        "ground-glass opacities",
        "hazy ground glass opacification",
        "patchy ground glass opacity",
        "faint ground-glass density",
    ],
    "consolidation": ["consolidation", "airspace consolidation", "dense consolidation", "patchy consolidation"],
    "nodule": ["nodule", "pulmonary nodule", "small nodular opacity", "rounded nodule"],
    "mass": ["mass", "lung mass", "pulmonary mass", "large rounded opacity"],
    **synthetic_findings.PHRASES,
}
NORMAL_SENTENCES = [
    "The lungs are clear.",
    "No focal consolidation.",
    "No pleural effusion.",
    "No pneumothorax.",
    "Heart size is normal.",
    "The cardiomediastinal silhouette is within normal limits.",
]
ZONES = ("upper", "mid", "lower")
KIND_LABELS = {kind: i + 1 for i, kind in enumerate([*LESIONS, *synthetic_findings.FINDINGS])}
"""Label value of each lesion or finding kind in the written masks (0: none); the first three are
those of the ``lesions`` recipe, so its masks keep their values."""
RECIPES = ("lesions", "all")
"""``lesions``: the three focal lesion kinds (the default model's pre-training); ``all``: every kind of
:data:`KIND_LABELS`, the focal lesions and the anatomical findings of :mod:`training.synthetic_findings`."""


@dataclass
class Lesion:
    kind: str
    side: str  # patient's "right" (image left) or "left"
    zone: str  # upper, mid, lower


def lung_fields(image: np.ndarray) -> np.ndarray:
    """Rough lung-field mask of a frontal CXR (H, W) in [0, 1].

    The lungs are the two dark bands either side of the bright mediastinum, inside the body: the
    darkest half of each band, minus the air outside the body (dark regions touching the border),
    largest connected piece per side.
    """
    h, w = image.shape
    s = ndimage.gaussian_filter(image, sigma=max(h, w) / 60)
    cols = s[int(0.25 * h) : int(0.75 * h)].mean(axis=0)
    lo, hi = int(0.35 * w), int(0.65 * w)
    mid = lo + int(np.argmax(cols[lo:hi]))
    dark = s < np.percentile(s, 30)
    labels, _ = ndimage.label(dark)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, border[border > 0])
    fields = np.zeros((h, w), dtype=bool)
    for a, b in ((mid - int(0.42 * w), mid - int(0.04 * w)), (mid + int(0.04 * w), mid + int(0.42 * w))):
        band = np.zeros((h, w), dtype=bool)
        band[int(0.08 * h) : int(0.92 * h), max(0, a) : max(0, min(w, b))] = True
        band &= ~outside
        if band.sum() < 16:
            continue
        candidate = band & (s <= np.percentile(s[band], 50))
        candidate = ndimage.binary_opening(candidate, iterations=2)
        lab, n = ndimage.label(candidate)
        if n:
            sizes = ndimage.sum(candidate, lab, range(1, n + 1))
            fields |= lab == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(fields)


def _zone_region(fields: np.ndarray, side: str, zone: str) -> np.ndarray:
    h, w = fields.shape
    half = np.zeros_like(fields)
    if side == "right":  # patient's right = image left on a frontal film
        half[:, : w // 2] = True
    else:
        half[:, w // 2 :] = True
    region = fields & half
    rows = np.nonzero(region.any(axis=1))[0]
    if rows.size < 6:  # no usable lung estimate: a fixed anatomical box
        region = np.zeros_like(fields)
        x0, x1 = (0.15, 0.47) if side == "right" else (0.53, 0.85)
        region[int(0.2 * h) : int(0.8 * h), int(x0 * w) : int(x1 * w)] = True
        rows = np.nonzero(region.any(axis=1))[0]
    top, bottom = rows.min(), rows.max() + 1
    k = ZONES.index(zone)
    cut = np.zeros_like(fields)
    cut[top + (bottom - top) * k // 3 : top + (bottom - top) * (k + 1) // 3] = True
    return region & cut


def paste_lesion(image: np.ndarray, fields: np.ndarray, lesion: Lesion, rng: np.random.Generator) -> np.ndarray:
    """Add one lesion to ``image`` (in place, [0, 1]); returns its binary mask (H, W)."""
    h, w = image.shape
    region = _zone_region(fields, lesion.side, lesion.zone)
    (c_lo, c_hi), (r_lo, r_hi), soft = LESIONS[lesion.kind]
    radius = rng.uniform(r_lo, r_hi) * max(h, w)
    inner = ndimage.binary_erosion(region, iterations=max(1, int(radius * 0.5)))
    ys, xs = np.nonzero(inner if inner.sum() > 8 else region)
    i = rng.integers(len(ys))
    cy, cx = ys[i], xs[i]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    blob = np.zeros((h, w), np.float32)
    lobes = 1 if lesion.kind in ROUND else rng.integers(2, 6)
    for _ in range(lobes):
        oy, ox = rng.normal(0, radius * 0.45, 2) if lobes > 1 else (0.0, 0.0)
        ry, rx = radius * rng.uniform(0.6, 1.0, 2)
        blob = np.maximum(blob, np.exp(-(((yy - cy - oy) / ry) ** 2 + ((xx - cx - ox) / rx) ** 2)))
    mask = blob > 0.5
    if lesion.kind not in ROUND:
        mask &= ndimage.binary_dilation(fields, iterations=max(1, int(radius * 0.2)))
    if not mask.any():
        mask = blob > 0.5
    alpha = ndimage.gaussian_filter(mask.astype(np.float32), sigma=max(1.0, soft * radius))
    texture = 1 + 0.35 * ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), radius / 6 + 1) * 4
    alpha *= np.clip(texture, 0.4, 1.6)
    contrast = rng.uniform(c_lo, c_hi)
    image += contrast * (1 - image) * np.clip(alpha, 0, 1.5)
    np.clip(image, 0, 1, out=image)
    return mask


def describe(lesions: list[Lesion], rng: np.random.Generator) -> str:
    """A short report: one sentence per lesion (or bilateral pair), plus normal sentences."""
    sentences = []
    used = set()
    for i, les in enumerate(lesions):
        if i in used:
            continue
        phrase = str(rng.choice(PHRASES[les.kind]))
        twin = next(
            (j for j, o in enumerate(lesions) if j > i and j not in used and o.kind == les.kind and o.zone == les.zone),
            None,
        )
        zone = {"mid": "mid", "upper": "upper", "lower": "lower"}[les.zone]
        if twin is not None:
            used.add(twin)
            loc = str(
                rng.choice([f"in both {zone} zones", f"bilateral {zone} zone", f"in the {zone} zones bilaterally"])
            )
        else:
            loc = str(
                rng.choice(
                    [f"in the {les.side} {zone} zone", f"in the {zone} {les.side} lung", f"{les.side} {zone} zone"]
                )
            )
        template = rng.integers(3)
        if template == 0:
            sentences.append(f"There is {phrase} {loc}.")
        elif template == 1:
            sentences.append(f"{phrase[0].upper()}{phrase[1:]} {loc}.")
        else:
            sentences.append(f"{loc[0].upper()}{loc[1:]} {phrase}.")
    kinds = {les.kind for les in lesions}
    normals = [s for s in NORMAL_SENTENCES if not (kinds and ("clear" in s or "consolidation" in s))]
    extra = rng.choice(normals, size=rng.integers(0, 3), replace=False).tolist() if normals else []
    if not lesions:
        extra = ["The lungs are clear.", *extra]
    order = sentences + extra
    rng.shuffle(order)
    return " ".join(order)


def synthesize(
    background: np.ndarray, rng: np.random.Generator, recipe: str = "lesions"
) -> tuple[np.ndarray, np.ndarray, str]:
    """(H, W) uint8 real CXR -> (image uint8 with findings, label map uint8 (see KIND_LABELS), report).

    ``recipe``: ``lesions`` (0-3 focal lesions of :data:`FOCAL_LESIONS`) or ``all`` (0-3 findings of any
    kind, each where anatomy puts it). Raises ValueError for another recipe.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, not {recipe!r}")
    image = background.astype(np.float32) / 255.0
    fields = lung_fields(image)
    if recipe == "all":
        return _synthesize_all(image, fields, rng)
    n = rng.choice([0, 1, 1, 2, 2, 3], p=[0.12, 0.3, 0.18, 0.2, 0.1, 0.1])
    lesions = []
    for _ in range(n):
        kind = str(rng.choice(list(FOCAL_LESIONS), p=[0.5, 0.35, 0.15]))
        lesions.append(Lesion(kind, str(rng.choice(["right", "left"])), str(rng.choice(ZONES, p=[0.25, 0.3, 0.45]))))
        if kind != "nodule" and rng.random() < 0.35:  # bilateral disease, as in viral pneumonia
            other = "left" if lesions[-1].side == "right" else "right"
            lesions.append(Lesion(kind, other, lesions[-1].zone))
    labels = np.zeros(image.shape, np.uint8)
    for les in lesions:
        labels[paste_lesion(image, fields, les, rng)] = KIND_LABELS[les.kind]
    return (image * 255).round().astype(np.uint8), labels, describe(lesions, rng)


def _synthesize_all(
    image: np.ndarray, fields: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, str]:
    """The ``all`` recipe: distinct kinds, the lung-wide ones painted first so focal ones stay on top."""
    kinds = list(KIND_LABELS)
    n = int(rng.choice([0, 1, 2, 3], p=[0.1, 0.35, 0.35, 0.2]))
    chosen = [str(k) for k in rng.choice(kinds, size=n, replace=False)]
    wide = ("emphysema", "edema", "fibrosis", "diffuse nodule")  # emphysema covers both lungs: first
    chosen.sort(key=lambda k: wide.index(k) if k in wide else len(wide))
    labels = np.zeros(image.shape, np.uint8)
    lesions, sentences = [], []
    for kind in chosen:
        side = str(rng.choice(["right", "left"]))
        if kind in LESIONS:
            lesion = Lesion(kind, side, str(rng.choice(ZONES, p=[0.25, 0.3, 0.45])))
            lesions.append(lesion)
            mask = paste_lesion(image, fields, lesion, rng)
        else:
            mask = synthetic_findings.FINDINGS[kind](image, fields, side, rng)
            sentences.append(synthetic_findings.sentence(kind, side, rng))
        labels[mask] = KIND_LABELS[kind]
    report = describe(lesions, rng) if lesions else ""
    contradicted = {"effusion": "effusion", "pneumothorax": "pneumothorax", "cardiomegaly": "Heart"}
    kept = [s for s in report.split(". ") if s and not any(k in chosen and w in s for k, w in contradicted.items())]
    kept = [s if s.endswith(".") else s + "." for s in kept]
    order = kept + sentences
    rng.shuffle(order)
    return (image * 255).round().astype(np.uint8), labels, " ".join(order) or "The lungs are clear."


def _load_grey(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L")
        scale = size / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
        return np.asarray(img)


def _one(job: tuple[int, str, int, int, str, str]) -> dict:
    from PIL import Image

    index, background, size, seed, out, recipe = job
    rng = np.random.default_rng([seed, index])
    image, mask, report = synthesize(_load_grey(Path(background), size), rng, recipe)
    name = f"syn{index:06d}"
    Image.fromarray(image).save(Path(out) / "images" / f"{name}.png")
    Image.fromarray(mask).save(Path(out) / "masks" / f"{name}.png")
    return {
        "id": name,
        "image": f"images/{name}.png",
        "text": report,
        "patient_id": name,
        "split": "train",
        "mask": f"masks/{name}.png",
    }


def _images_of(source: Path) -> list[Path]:
    """The PNG/JPEG files under a folder, or those a text file lists (one path per line)."""
    if source.is_file():
        return [Path(line.strip()) for line in source.read_text().splitlines() if line.strip()]
    return [p for p in source.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")]


def kinds_of(recipe: str) -> list[str]:
    """The kinds a recipe paints (:data:`RECIPES`), in label order."""
    return list(FOCAL_LESIONS) if recipe == "lesions" else list(KIND_LABELS)


def generate(
    backgrounds: list[Path],
    n: int,
    out: Path,
    size: int = 256,
    seed: int = 0,
    workers: int = 0,
    recipe: str = "lesions",
) -> Path:
    """Write ``n`` synthetic pairs of ``recipe`` (:data:`RECIPES`) and ``manifest.csv`` into ``out``;
    returns the manifest path."""
    from concurrent.futures import ProcessPoolExecutor

    files = sorted(p for d in backgrounds for p in _images_of(Path(d)))
    if not files:
        raise SystemExit(f"no background images under {', '.join(map(str, backgrounds))}")
    order = np.random.default_rng(seed).permutation(len(files))
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    jobs = [(i, str(files[order[i % len(files)]]), size, seed, str(out), recipe) for i in range(n)]
    workers = workers or max(1, (os.cpu_count() or 2) - 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            rows = list(pool.map(_one, jobs, chunksize=16))
    else:
        rows = [_one(j) for j in jobs]
    (out / "labels.json").write_text(json.dumps({"background": 0, **KIND_LABELS}, indent=1) + "\n")  # the masks' key
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--backgrounds", nargs="+", type=Path, required=True, help="folders of real CXR images, or text files of paths"
    )
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--recipe", choices=RECIPES, default="lesions", help="which kinds to paint (see RECIPES)")
    args = parser.parse_args(argv)
    print(generate(args.backgrounds, args.n, args.out, args.size, args.seed, args.workers, args.recipe))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
