"""Dataset readers for evaluation: masks (covid-cxr, ChestX-Det layouts), box tables (NIH, RSNA,
TBX11K) and image-level labels (NIH ChestX-ray14 sample) -> samples.

Every reader returns an :class:`EvalDataset`: one :class:`Sample` per image with the findings it
is positive for (a mask file, or boxes rasterised to a mask on demand), the findings it is known
to be negative for, and a list of what was skipped and why. Nothing is read into memory until
:func:`load_target` asks for one mask.

Which images are negatives (for AUROC):

- covid-cxr: an image whose masks the dataset declares complete (``has_masks == 1`` in
  ``pairs.csv``) is negative for every finding it has no mask of; an image with
  ``has_masks == 0`` (or no ``has_masks`` column) is neither positive nor negative for a
  finding it has no mask of. A mask listed with 0 pixels makes the image neither for that finding.
- RSNA ``stage_2_train_labels``: rows with ``Target == 0`` are negatives for ``pneumonia``.
- NIH ``BBox_List_2017``: boxes were drawn for some findings of some images only, so no image is
  a negative; no AUROC is computed.
- ChestX-Det (``chestx-det-nih``): every image was read for all 13 findings, so an image is negative
  for each finding it has no outline of.
- TBX11K (``tbx11k-tb``): every image is tuberculosis positive; no negatives.
- NIH labels (``nih-cxr14-sample``): image-level labels only (no region): positive where the label
  string names the finding, negative otherwise (NIH's labels are text-mined and noisy). Used for
  AUROC only (:func:`afloc_engine.evaluation.classification.evaluate_classification`).

Held-out parts (fixed, so that a model trained on the rest can be measured on them):
:func:`heldout_part` puts an id in ``dev`` when the first 8 hex digits of its SHA-256 are
divisible by 3 (about a third), else ``train``. TBX11K splits by image id (no patient ids are
given), the NIH sample by patient id.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from afloc_engine.errors import DataError

COVID_FINDINGS: tuple[str, ...] = ("ground_glass_opacity", "consolidation", "pleural_effusion", "pneumothorax")
"""covid-cxr mask classes that are findings (evaluated by default)."""
COVID_ANATOMY: tuple[str, ...] = ("right_lung", "left_lung", "cardiomediastinum", "airways", "support_devices")
"""covid-cxr mask classes that are anatomy or devices (evaluated only when named with ``--finding``)."""
IMAGE_SUFFIXES: tuple[str, ...] = (".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".nrrd", ".nii.gz")
BOX_FRAME_DEFAULT = (1024, 1024)
"""NIH ChestX-ray14 and RSNA boxes are in the pixels of the original 1024 x 1024 images."""
FORMATS = ("covid", "nih-bbox", "rsna", "tbx11k", "chestx-det", "nih-labels")
CHESTX_DET_FINDINGS: tuple[str, ...] = (
    "consolidation",
    "effusion",
    "fracture",
    "cardiomegaly",
    "fibrosis",
    "nodule",
    "emphysema",
    "atelectasis",
    "pleural_thickening",
    "calcification",
    "pneumothorax",
    "mass",
    "diffuse_nodule",
)
"""The 13 findings ChestX-Det's radiologists outlined (every image was read for all of them)."""
TB_FINDING = "tuberculosis"
"""The finding of every TBX11K box (active and obsolete alike); each class is also its own finding."""
HELDOUT_SPLITS = ("dev", "train")


def heldout_part(key: str) -> str:
    """``dev`` for about a third of ids (SHA-256 of ``key``: first 8 hex digits divisible by 3), else ``train``.

    Fixed and documented, so that training can leave the ``dev`` part out and evaluation use it.
    """
    return "dev" if int(hashlib.sha256(key.strip().encode("utf-8")).hexdigest()[:8], 16) % 3 == 0 else "train"


def finding_key(name: str) -> str:
    """Canonical finding name: 'Ground-glass opacity' / 'ground glass opacity' -> 'ground_glass_opacity'."""
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


@dataclass(frozen=True)
class Box:
    """An axis-aligned box ``(x, y, width, height)`` in the pixels of the box table's frame."""

    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class MaskSource:
    """Where a ground-truth region comes from: a mask image, or boxes in a (width, height) frame.

    ``frame`` None means the boxes are in the image's own pixels.
    """

    path: Path | None = None
    boxes: tuple[Box, ...] = ()
    frame: tuple[int, int] | None = None


@dataclass
class Sample:
    """One image: the findings it shows (finding -> :class:`MaskSource`) and those it is known not to show."""

    image_id: str
    image: Path
    positives: dict[str, MaskSource] = field(default_factory=dict)
    negatives: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)
    """Findings the image shows by an image-level label only (no region): classification, not localisation."""
    patient_id: str | None = None


@dataclass(frozen=True)
class Skip:
    """Something left out of the evaluation: which image (or file), which finding, and why.

    ``category`` groups skips in the report's counts (defaults to ``reason``).
    """

    item: str
    reason: str
    finding: str | None = None
    path: str | None = None
    category: str = ""

    @property
    def group(self) -> str:
        return self.category or self.reason

    def to_dict(self) -> dict[str, str | None]:
        return {
            "item": self.item,
            "finding": self.finding,
            "reason": self.reason,
            "category": self.group,
            "path": self.path,
        }


class TargetError(DataError):
    """A ground-truth region cannot be used; ``category`` names the kind of problem for the skip report."""

    def __init__(self, message: str, path: str | Path | None = None, category: str = "") -> None:
        super().__init__(message, path)
        self.category = category or message

    def __str__(self) -> str:
        where = f" [{self.finding}]" if self.finding else ""
        path = f" ({self.path})" if self.path else ""
        return f"{self.item}{where}: {self.reason}{path}"


@dataclass
class EvalDataset:
    """Samples of one dataset split, ready for :func:`afloc_engine.evaluation.evaluate_localization`.

    findings: every finding with at least one positive, in first-seen order; default_findings: those
    evaluated when none are named; labels_complete: negatives are defined (AUROC is possible).
    """

    name: str
    format: str
    root: Path
    split: str | None
    samples: list[Sample]
    findings: list[str]
    default_findings: list[str]
    labels_complete: bool
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    label_set: list[str] = field(default_factory=list)
    """Every finding the readers looked for (ChestX-Det: 13, also those with no outline here); else ``findings``."""

    def positives(self, finding: str) -> list[Sample]:
        return [s for s in self.samples if finding in s.positives or finding in s.labels]

    def negatives(self, finding: str) -> list[Sample]:
        return [s for s in self.samples if finding in s.negatives]

    def counts(self) -> dict[str, dict[str, int]]:
        """finding -> {"positive": n, "negative": n} as listed (before any file is read)."""
        return {f: {"positive": len(self.positives(f)), "negative": len(self.negatives(f))} for f in self.findings}

    def subset(self, limit: int) -> EvalDataset:
        """The first ``limit`` samples (quick checks); findings recomputed."""
        samples = self.samples[:limit]
        findings = [f for f in self.findings if any(f in s.positives or f in s.labels for s in samples)]
        return EvalDataset(
            self.name,
            self.format,
            self.root,
            self.split,
            samples,
            findings,
            [f for f in self.default_findings if f in findings],
            self.labels_complete,
            list(self.skipped),
            [*self.notes, f"limited to the first {limit} images"],
            list(self.label_set),
        )


# --- helpers -----------------------------------------------------------------------------------
def _read_csv(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError("file not found", path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read CSV: {err}", path) from None
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)} (header: {', '.join(header) or 'none'})", path)
    return rows


class ImageIndex:
    """Finds an image by file name or id under a folder (direct path first, then a one-off recursive index)."""

    def __init__(self, root: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> None:
        self.root = root
        self.suffixes = suffixes
        self._index: dict[str, Path] | None = None

    def _build(self) -> dict[str, Path]:
        index: dict[str, Path] = {}
        for folder, _, files in os.walk(self.root):
            for name in files:
                index.setdefault(name, Path(folder) / name)
                stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem
                index.setdefault(stem, Path(folder) / name)
        return index

    def find(self, name: str) -> Path | None:
        """The path of ``name`` (a file name, or an id without suffix) or None."""
        direct = self.root / name
        if direct.is_file():
            return direct
        for suffix in self.suffixes:
            if (self.root / (name + suffix)).is_file():
                return self.root / (name + suffix)
        if self._index is None:
            self._index = self._build() if self.root.is_dir() else {}
        return self._index.get(name) or self._index.get(Path(name).stem)


def _ordered(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


# --- covid-cxr -------------------------------------------------------------------------------
def read_covid(root: str | Path, split: str | None = None) -> EvalDataset:
    """A folder in the covid-cxr layout: ``pairs.csv``, ``masks.csv`` and ``masks/`` (see its README).

    Keeps the images of ``split`` (all when None). Missing image or mask files, mask rows of
    unknown images and images without masks are recorded in ``skipped``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError("dataset folder not found", root)
    pairs = _read_csv(root / "pairs.csv", ("image_id", "image", "split"))
    masks = _read_csv(root / "masks.csv", ("image_id", "class", "mask"))
    if split is not None:
        splits = _ordered(r["split"] for r in pairs)
        pairs = [r for r in pairs if r["split"] == split]
        if not pairs:
            raise DataError(f"no image in split {split!r} (splits: {', '.join(splits) or 'none'})", root / "pairs.csv")
    skipped: list[Skip] = []
    samples: dict[str, Sample] = {}
    complete: dict[str, bool] = {}
    excluded: dict[str, set[str]] = {}
    for r in pairs:
        image_id = r["image_id"]
        path = root / r["image"]
        if not path.is_file():
            skipped.append(Skip(image_id, "image file not found", path=str(path), category="image file not found"))
            continue
        samples[image_id] = Sample(image_id, path)
        complete[image_id] = r.get("has_masks", "").strip().lower() in ("1", "true", "yes")
    listed = {r["image_id"] for r in pairs}
    for r in masks:
        image_id, finding = r["image_id"], finding_key(r["class"])
        if image_id not in listed:
            if split is None:
                skipped.append(
                    Skip(
                        image_id,
                        "mask of an image not listed in pairs.csv",
                        finding,
                        r["mask"],
                        "mask of an unlisted image",
                    )
                )
            continue
        if image_id not in samples:
            continue  # its image is missing: already reported
        path = root / r["mask"]
        if not path.is_file():
            skipped.append(Skip(image_id, "mask file not found", finding, str(path), "mask file not found"))
            continue
        if r.get("pixels", "").strip() in ("0", "0.0"):
            # an empty mask is neither a positive nor (since a mask was drawn) a trustworthy negative
            skipped.append(Skip(image_id, "empty mask (0 pixels in masks.csv)", finding, str(path), "empty mask"))
            excluded.setdefault(image_id, set()).add(finding)
            continue
        samples[image_id].positives[finding] = MaskSource(path=path)
    findings = _ordered(f for s in samples.values() for f in s.positives)
    every = _ordered([*COVID_FINDINGS, *COVID_ANATOMY, *findings])
    for s in samples.values():
        if complete[s.image_id]:
            s.negatives = {f for f in every if f not in s.positives and f not in excluded.get(s.image_id, set())}
        if not s.positives and not complete[s.image_id]:
            skipped.append(
                Skip(
                    s.image_id,
                    "no masks (has_masks = 0): neither positive nor negative",
                    None,
                    str(s.image),
                    "no masks",
                )
            )
    kept = [s for s in samples.values() if s.positives or s.negatives]
    defaults = [f for f in findings if f in COVID_FINDINGS] or [f for f in findings if f not in COVID_ANATOMY]
    return EvalDataset(
        name=root.name,
        format="covid",
        root=root,
        split=split,
        samples=kept,
        findings=findings,
        default_findings=defaults,
        labels_complete=any(complete.values()),
        skipped=skipped,
        notes=[
            "negatives: images with has_masks = 1 and no mask of the finding; has_masks = 0 images are not negatives"
            if pairs and "has_masks" in pairs[0]
            else "pairs.csv has no has_masks column: masks are not known to be complete, so no negatives (no AUROC)"
        ],
    )


# --- box tables ------------------------------------------------------------------------------
def _float(value: str) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _box(row: dict[str, str], keys: tuple[str, str, str, str]) -> Box | None:
    vals = [_float(row.get(k, "")) for k in keys]
    if any(v is None for v in vals) or vals[2] <= 0 or vals[3] <= 0:  # type: ignore[operator]
        return None
    return Box(*vals)  # type: ignore[arg-type]


def _images_folder(csv_path: Path, images: str | Path | None) -> Path:
    if images is not None:
        folder = Path(images)
        if not folder.is_dir():
            raise DataError("image folder not found", folder)
        return folder
    for candidate in (csv_path.parent / "images", csv_path.parent / "stage_2_train_images", csv_path.parent):
        if candidate.is_dir():
            return candidate
    return csv_path.parent


def _split_rows(rows: list[dict[str, str]], split: str | None, path: Path, notes: list[str]) -> list[dict[str, str]]:
    if split is None:
        return rows
    if rows and "split" in rows[0]:
        kept = [r for r in rows if r["split"] == split]
        if not kept:
            raise DataError(f"no row in split {split!r}", path)
        return kept
    notes.append(f"--split {split} ignored: {path.name} has no 'split' column (all rows used)")
    return rows


def _box_samples(
    rows: list[tuple[str, str, Box | None, bool]],
    index: ImageIndex,
    frame: tuple[int, int] | None,
    skipped: list[Skip],
    csv_path: Path,
) -> dict[str, Sample]:
    """rows: (image name, finding, box or None for a negative, is_negative) -> samples keyed by image name."""
    samples: dict[str, Sample] = {}
    missing: set[str] = set()
    boxes: dict[tuple[str, str], list[Box]] = {}
    for name, finding, box, negative in rows:
        if name in missing:
            continue
        if name not in samples:
            path = index.find(name)
            if path is None:
                missing.add(name)
                skipped.append(
                    Skip(
                        name,
                        f"image file not found under {index.root}",
                        None,
                        str(index.root / name),
                        "image file not found",
                    )
                )
                continue
            samples[name] = Sample(Path(name).stem if Path(name).suffix else name, path)
        if negative:
            samples[name].negatives.add(finding)
        elif box is None:
            skipped.append(
                Skip(name, "box with missing, non-numeric or non-positive size", finding, str(csv_path), "invalid box")
            )
        else:
            boxes.setdefault((name, finding), []).append(box)
    for (name, finding), bs in boxes.items():
        samples[name].positives[finding] = MaskSource(boxes=tuple(bs), frame=frame)
        samples[name].negatives.discard(finding)
    return samples


def read_nih_bbox(
    csv_path: str | Path,
    images: str | Path | None = None,
    split: str | None = None,
    frame: tuple[int, int] | None = BOX_FRAME_DEFAULT,
) -> EvalDataset:
    """NIH ChestX-ray14 ``BBox_List_2017.csv``: ``Image Index, Finding Label, Bbox [x, y, w, h]``.

    Boxes (1024 x 1024 pixel frame by default; ``frame=None`` for the image's own pixels) become
    masks. No negatives: the table annotates only some findings of some images.
    """
    csv_path = Path(csv_path)
    rows = _read_csv(csv_path, ("Image Index", "Finding Label"))
    notes = ["NIH boxes annotate some findings of some images only: no negatives, no AUROC"]
    rows = _split_rows(rows, split, csv_path, notes)
    header = list(rows[0]) if rows else []
    keys = ("Bbox [x", "y", "w", "h]") if "Bbox [x" in header else ("x", "y", "w", "h")
    if rows and any(k not in header for k in keys):
        raise DataError("missing box columns: expected 'Bbox [x,y,w,h]' (4 columns) or x, y, w, h", csv_path)
    index = ImageIndex(_images_folder(csv_path, images))
    skipped: list[Skip] = []
    parsed = [(r["Image Index"], finding_key(r["Finding Label"]), _box(r, keys), False) for r in rows]
    samples = _box_samples(parsed, index, frame, skipped, csv_path)
    for s in samples.values():
        s.negatives.clear()
    kept = [s for s in samples.values() if s.positives]
    findings = _ordered(f for s in kept for f in s.positives)
    return EvalDataset(csv_path.stem, "nih-bbox", index.root, split, kept, findings, findings, False, skipped, notes)


def read_rsna(
    csv_path: str | Path,
    images: str | Path | None = None,
    split: str | None = None,
    frame: tuple[int, int] | None = BOX_FRAME_DEFAULT,
    finding: str = "pneumonia",
) -> EvalDataset:
    """RSNA Pneumonia ``stage_2_train_labels.csv``: ``patientId, x, y, width, height, Target``.

    ``Target == 1`` rows are boxes of ``finding`` (several rows per image allowed); ``Target == 0``
    images are its negatives. Images are looked up as ``{patientId}.dcm`` (or .png/.jpg) under ``images``.
    """
    csv_path = Path(csv_path)
    rows = _read_csv(csv_path, ("patientId", "x", "y", "width", "height", "Target"))
    notes = ["negatives: Target = 0 images"]
    rows = _split_rows(rows, split, csv_path, notes)
    index = ImageIndex(_images_folder(csv_path, images))
    skipped: list[Skip] = []
    parsed = []
    for r in rows:
        target = r["Target"].strip()
        if target not in ("0", "1"):
            skipped.append(
                Skip(r["patientId"], f"Target is {target!r}, not 0 or 1", finding, str(csv_path), "invalid label")
            )
            continue
        negative = target == "0"
        box = None if negative else _box(r, ("x", "y", "width", "height"))
        parsed.append((r["patientId"], finding, box, negative))
    samples = _box_samples(parsed, index, frame, skipped, csv_path)
    kept = [s for s in samples.values() if s.positives or s.negatives]
    findings = [finding] if any(s.positives for s in kept) else []
    return EvalDataset(csv_path.stem, "rsna", index.root, split, kept, findings, findings, True, skipped, notes)


# --- TBX11K, ChestX-Det, NIH labels -------------------------------------------------------------
def _heldout(rows: list[dict[str, str]], split: str | None, key: str, path: Path) -> list[dict[str, str]]:
    if split is None:
        return rows
    if split not in HELDOUT_SPLITS:
        raise DataError(f"split must be one of {', '.join(HELDOUT_SPLITS)} (fixed held-out part), not {split!r}", path)
    return [r for r in rows if heldout_part(r[key]) == split]


def _size(row: dict[str, str], prefix: str) -> tuple[int, int] | None:
    w, h = _float(row.get(f"{prefix}_width", "")), _float(row.get(f"{prefix}_height", ""))
    return (int(w), int(h)) if w and h and w > 0 and h > 0 else None


def read_tbx11k(root: str | Path, split: str | None = None) -> EvalDataset:
    """A folder in the ``tbx11k-tb`` layout: ``labels.csv``, ``boxes.csv`` (x1, y1, x2, y2) and ``images/``.

    Every box is a region of ``tuberculosis``; each box class (``ActiveTuberculosis``,
    ``ObsoletePulmonaryTuberculosis``) is also a finding of its own. Boxes are in the released
    image's pixels (``released_width`` x ``released_height`` of labels.csv, else the image's own).
    ``split``: ``dev`` (the fixed held-out third, :func:`heldout_part` of the image id), ``train``
    or None (all). No negatives: every image is TB positive.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError("dataset folder not found", root)
    labels = _read_csv(root / "labels.csv", ("image", "image_id"))
    boxes = _read_csv(root / "boxes.csv", ("image", "finding", "x1", "y1", "x2", "y2"))
    labels = _heldout(labels, split, "image_id", root / "labels.csv")
    skipped: list[Skip] = []
    samples: dict[str, Sample] = {}
    frames: dict[str, tuple[int, int] | None] = {}
    for r in labels:
        path = root / r["image"]
        if not path.is_file():
            skipped.append(Skip(r["image_id"], "image file not found", None, str(path), "image file not found"))
            continue
        samples[r["image"]] = Sample(r["image_id"], path)
        frames[r["image"]] = _size(r, "released")
    found: dict[tuple[str, str], list[Box]] = {}
    for r in boxes:
        if r["image"] not in samples:
            continue
        x1, y1, x2, y2 = (_float(r[k]) for k in ("x1", "y1", "x2", "y2"))
        cls = finding_key(re.sub(r"(?<=[a-z])(?=[A-Z])", " ", r["finding"]))  # ActiveTuberculosis -> active_...
        if None in (x1, y1, x2, y2) or x2 <= x1 or y2 <= y1:  # type: ignore[operator]
            skipped.append(Skip(samples[r["image"]].image_id, "invalid box", cls, str(root / "boxes.csv")))
            continue
        box = Box(x1, y1, x2 - x1, y2 - y1)  # type: ignore[arg-type,operator]
        for f in (TB_FINDING, cls):
            found.setdefault((r["image"], f), []).append(box)
    for (image, f), bs in found.items():
        samples[image].positives[f] = MaskSource(boxes=tuple(bs), frame=frames[image])
    for s in samples.values():
        if not s.positives:
            skipped.append(Skip(s.image_id, "no box in boxes.csv", None, str(root / "boxes.csv"), "no boxes"))
    kept = [s for s in samples.values() if s.positives]
    findings = _ordered([TB_FINDING, *(f for s in kept for f in s.positives)]) if kept else []
    part = "all images" if split is None else f"the {split} part ({len(labels)} images)"
    notes = [
        "every image is tuberculosis positive: no negatives, no AUROC",
        f"{part}; the fixed held-out part is heldout_part(image_id) == 'dev'",
    ]
    return EvalDataset(root.name, "tbx11k", root, split, kept, findings, findings[:1], False, skipped, notes)


def _finding_of_mask(path: str) -> str:
    stem = Path(path).name
    stem = stem[: -len(".png")] if stem.lower().endswith(".png") else Path(stem).stem
    return finding_key(stem.split("__", 1)[1] if "__" in stem else stem)


def read_chestx_det(root: str | Path, split: str | None = None) -> EvalDataset:
    """A folder in the ``chestx-det-nih`` layout: ``labels.csv`` (image, image_id, masks), ``masks/``, ``images/``.

    Each mask file ``masks/<image>__<Finding>.png`` is that finding's outline. Every image was read
    for all 13 findings (:data:`CHESTX_DET_FINDINGS`), so it is a negative for each one it has no
    outline of. The whole set is a dev set: ``split`` None, ``dev`` or ``all`` keep every image.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError("dataset folder not found", root)
    if split not in (None, "dev", "all"):
        raise DataError(f"chestx-det is one dev set: split must be dev or all, not {split!r}", root)
    rows = _read_csv(root / "labels.csv", ("image", "image_id", "masks"))
    skipped: list[Skip] = []
    samples: list[Sample] = []
    for r in rows:
        path = root / r["image"]
        if not path.is_file():
            skipped.append(Skip(r["image_id"], "image file not found", None, str(path), "image file not found"))
            continue
        sample = Sample(r["image_id"], path, patient_id=r.get("patient_id") or None)
        for m in r["masks"].split():
            f, mpath = _finding_of_mask(m), root / m
            if not mpath.is_file():
                skipped.append(Skip(r["image_id"], "mask file not found", f, str(mpath), "mask file not found"))
                continue
            sample.positives[f] = MaskSource(path=mpath)
        every = _ordered([*CHESTX_DET_FINDINGS, *sample.positives])
        sample.negatives = {f for f in every if f not in sample.positives}
        samples.append(sample)
    findings = _ordered(f for f in CHESTX_DET_FINDINGS if any(f in s.positives for s in samples))
    findings += [f for f in _ordered(f for s in samples for f in s.positives) if f not in findings]
    notes = ["every image was read for all 13 findings: an image without an outline of a finding is its negative"]
    label_set = _ordered([*CHESTX_DET_FINDINGS, *findings])
    return EvalDataset(
        root.name, "chestx-det", root, split, samples, findings, findings, True, skipped, notes, label_set
    )


NO_FINDING = "no_finding"


def read_nih_labels(root: str | Path, split: str | None = None) -> EvalDataset:
    """A folder in the ``nih-cxr14-sample`` layout: ``labels.csv`` (image, patient_id, findings) and ``images/``.

    ``findings`` is NIH's ``|``-separated label string; an image is positive for each finding it
    names and negative for the others (``No Finding`` is no finding). Image-level labels only:
    for AUROC, not localisation. ``split``: ``dev`` (the fixed held-out third of patients,
    :func:`heldout_part` of the patient id), ``train`` or None (all).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError("dataset folder not found", root)
    rows = _read_csv(root / "labels.csv", ("image", "patient_id", "findings"))
    rows = _heldout(rows, split, "patient_id", root / "labels.csv")
    skipped: list[Skip] = []
    samples: list[Sample] = []
    named = [{finding_key(f) for f in r["findings"].split("|") if f.strip()} - {NO_FINDING} for r in rows]
    findings = sorted({f for n in named for f in n}, key=lambda f: -sum(f in n for n in named))
    for r, present in zip(rows, named):
        path = root / r["image"]
        if not path.is_file():
            skipped.append(Skip(r["image"], "image file not found", None, str(path), "image file not found"))
            continue
        samples.append(
            Sample(
                Path(r["image"]).stem,
                path,
                negatives={f for f in findings if f not in present},
                labels=present,
                patient_id=r["patient_id"],
            )
        )
    part = "all patients" if split is None else f"the {split} part of the patients"
    notes = [
        "image-level NIH labels (text-mined, noisy): positive where named, negative otherwise; AUROC only",
        f"{part}; the fixed held-out part is heldout_part(patient_id) == 'dev'",
    ]
    return EvalDataset(root.name, "nih-labels", root, split, samples, findings, findings, True, skipped, notes)


# --- format detection ------------------------------------------------------------------------
def detect_format(data: Path) -> str:
    """``covid`` for a folder with pairs.csv + masks.csv; ``nih-bbox`` / ``rsna`` from a CSV's header."""
    if data.is_dir():
        if (data / "pairs.csv").is_file() or (data / "masks.csv").is_file():
            return "covid"
        for name, fmt in (("BBox_List_2017.csv", "nih-bbox"), ("stage_2_train_labels.csv", "rsna")):
            if (data / name).is_file():
                return fmt
        if (data / "labels.csv").is_file():
            try:
                with (data / "labels.csv").open(newline="", encoding="utf-8-sig") as fh:
                    cols = {c.strip() for c in next(csv.reader(fh), [])}
            except (OSError, UnicodeDecodeError, csv.Error) as err:
                raise DataError(f"cannot read CSV: {err}", data / "labels.csv") from None
            if "masks" in cols:
                return "chestx-det"
            if (data / "boxes.csv").is_file():
                return "tbx11k"
            if "findings" in cols:
                return "nih-labels"
        raise DataError(
            "cannot tell the dataset format: no pairs.csv/masks.csv, labels.csv (+ boxes.csv or masks), "
            "BBox_List_2017.csv or stage_2_train_labels.csv (give --format and a CSV)",
            data,
        )
    if not data.is_file():
        raise DataError("dataset not found", data)
    try:
        with data.open(newline="", encoding="utf-8-sig") as fh:
            first = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read CSV: {err}", data) from None
    cols = {c.strip() for c in first}
    if "Image Index" in cols and "Finding Label" in cols:
        return "nih-bbox"
    if "patientId" in cols and "Target" in cols:
        return "rsna"
    raise DataError(f"cannot tell the box table format from its header ({', '.join(sorted(cols))})", data)


def _csv_for(data: Path, fmt: str) -> Path:
    if data.is_file():
        return data
    name = "BBox_List_2017.csv" if fmt == "nih-bbox" else "stage_2_train_labels.csv"
    if not (data / name).is_file():
        raise DataError(f"no {name} in the folder (give the CSV itself as --data)", data)
    return data / name


def parse_frame(text: str | None) -> tuple[int, int] | None:
    """``'1024'`` / ``'1024x1024'`` -> (1024, 1024); ``'image'`` -> None (boxes in the image's own pixels)."""
    if text is None:
        return BOX_FRAME_DEFAULT
    if text.strip().lower() == "image":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not m or int(m.group(1)) <= 0 or (m.group(2) and int(m.group(2)) <= 0):
        raise DataError(f"box frame must be 'image', N or WxH (pixels), not {text!r}")
    return int(m.group(1)), int(m.group(2) or m.group(1))


def load_dataset(
    data: str | Path,
    format: str | None = None,  # noqa: A002 (the CLI's --format)
    images: str | Path | None = None,
    split: str | None = None,
    box_frame: tuple[int, int] | None = BOX_FRAME_DEFAULT,
) -> EvalDataset:
    """Read a dataset of any supported format (auto-detected when ``format`` is None)."""
    data = Path(data)
    fmt = format or detect_format(data)
    if fmt not in FORMATS:
        raise DataError(f"unknown dataset format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "covid":
        if not data.is_dir():
            raise DataError("the covid-cxr format is a folder with pairs.csv, masks.csv and masks/", data)
        return read_covid(data, split)
    folder_readers = {"tbx11k": read_tbx11k, "chestx-det": read_chestx_det, "nih-labels": read_nih_labels}
    if fmt in folder_readers:
        if not data.is_dir():
            raise DataError(f"the {fmt} format is a folder with labels.csv (see its README)", data)
        return folder_readers[fmt](data, split)
    reader = read_nih_bbox if fmt == "nih-bbox" else read_rsna
    return reader(_csv_for(data, fmt), images, split, box_frame)


# --- ground truth ----------------------------------------------------------------------------
def rasterize_boxes(boxes: Iterable[Box], shape: tuple[int, int], frame: tuple[int, int] | None = None) -> np.ndarray:
    """Boxes -> an (H, W) bool mask of ``shape``; boxes in a (width, height) ``frame`` are scaled to the image.

    A box covers every pixel it overlaps (floor of the start, ceil of the end), clipped to the image.
    """
    height, width = shape
    sx, sy = (1.0, 1.0) if frame is None else (width / frame[0], height / frame[1])
    mask = np.zeros(shape, dtype=bool)
    for b in boxes:
        x0, x1 = max(0, math.floor(b.x * sx)), min(width, math.ceil((b.x + b.width) * sx))
        y0, y1 = max(0, math.floor(b.y * sy)), min(height, math.ceil((b.y + b.height) * sy))
        if x1 > x0 and y1 > y0:
            mask[y0:y1, x0:x1] = True
    return mask


def load_target(source: MaskSource, shape: tuple[int, int]) -> np.ndarray:
    """The (H, W) bool ground-truth region of ``source`` for an image of ``shape`` (H, W).

    Raises :class:`TargetError` naming the file for an unreadable mask, a mask of another size
    than the image, or an empty region.
    """
    if source.path is None:
        mask = rasterize_boxes(source.boxes, shape, source.frame)
        if not mask.any():
            raise TargetError(
                f"every box lies outside the {shape[1]}x{shape[0]} image", None, "boxes outside the image"
            )
        return mask
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source.path) as img:
            img.load()
            array = np.asarray(img.convert("L") if img.mode not in ("L", "1", "I", "I;16") else img)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise TargetError(f"cannot read mask: {err}", source.path, "unreadable mask") from None
    if array.shape != tuple(shape):
        raise TargetError(
            f"mask is {array.shape[1]}x{array.shape[0]} px but its image is {shape[1]}x{shape[0]} px",
            source.path,
            "mask of the wrong size",
        )
    mask = array > 0
    if not mask.any():
        raise TargetError("empty mask (no pixel set)", source.path, "empty mask")
    return mask
