"""Image-report pairs: a manifest format and readers for MIMIC-CXR, covid-cxr, NIH CXR14 and IU reports.

Every reader returns ``(records, skipped)``: the usable :class:`PairRecord` rows, and one
``(where, reason)`` per row that was left out (no text, missing image, ...). Rows are never fatal
one by one; a source with no usable row at all is (:class:`DataError`, before any work).

Manifest (CSV with a header, or JSON lines), one pair per row::

    image,text,patient_id,split,id
    p1/s1/a.jpg,"Findings: small left effusion. Impression: ...",p1,train,a

``image`` (also ``image_path``/``path``) is relative to ``root`` (default: the manifest's folder);
``text`` (also ``report``) the report; ``patient_id``, ``split`` and ``id`` are optional.
"""

from __future__ import annotations

import csv
import json
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

from afloc_engine.errors import DataError
from afloc_engine.text import split_sentences

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")
Skipped = tuple[str, str]


@dataclass
class PairRecord:
    """One image-report pair (``image`` None for a text-only report). Paths are absolute strings."""

    id: str
    image: str | None
    text: str
    patient_id: str = ""
    split: str = ""
    source: str = ""

    def to_dict(self) -> dict:
        """Plain dict (what the store index holds)."""
        return asdict(self)


def usable_text(text: str | None) -> bool:
    """True when the report has at least one word after the engine's sentence splitting."""
    return bool(text) and bool(split_sentences(str(text)))


# --- manifest ----------------------------------------------------------------------------------
_IMAGE_KEYS = ("image", "image_path", "path")
_TEXT_KEYS = ("text", "report")


def read_manifest(path: str | Path, root: str | Path | None = None) -> tuple[list[PairRecord], list[Skipped]]:
    """Read a CSV or JSONL manifest; rows with no text or a missing image file are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError("manifest not found", path)
    base = Path(root) if root else path.parent
    if root and not base.is_dir():
        raise DataError("data root not found", base)
    rows = _read_rows(path)
    if not rows:
        raise DataError("manifest has no rows", path)
    keys = set(rows[0][1])
    image_key = next((k for k in _IMAGE_KEYS if k in keys), None)
    text_key = next((k for k in _TEXT_KEYS if k in keys), None)
    if image_key is None or text_key is None:
        columns = "/".join(_IMAGE_KEYS)
        raise DataError(f"manifest needs an image column ({columns}) and a text column (text/report)", path)
    records, skipped = [], []
    for where, row in rows:
        text = (row.get(text_key) or "").strip()
        image = (row.get(image_key) or "").strip()
        if not usable_text(text):
            skipped.append((f"{path}:{where}", "empty report text"))
            continue
        if not image:
            skipped.append((f"{path}:{where}", "no image path"))
            continue
        full = Path(image) if Path(image).is_absolute() else base / image
        if not full.exists():
            skipped.append((f"{path}:{where}", f"image not found: {full}"))
            continue
        rid = str(row.get("id") or row.get("image_id") or Path(image).stem)
        records.append(
            PairRecord(rid, str(full), text, str(row.get("patient_id") or ""), str(row.get("split") or ""), str(path))
        )
    return records, skipped


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """(line label, row dict) of a CSV (header) or JSONL file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read manifest: {err}", path) from None
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"line {n} is not JSON: {err}", path) from None
            if not isinstance(row, dict):
                raise DataError(f"line {n} is not a JSON object", path)
            rows.append((f"line {n}", row))
        return rows
    try:
        reader = csv.DictReader(text.splitlines())
        return [(f"row {n}", row) for n, row in enumerate(reader, start=2)]
    except csv.Error as err:
        raise DataError(f"not a valid CSV: {err}", path) from None


def write_manifest(records: list[PairRecord], path: str | Path) -> Path:
    """Write records as a CSV manifest (absolute image paths), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "image", "text", "patient_id", "split"])
        for r in records:
            writer.writerow([r.id, r.image or "", r.text, r.patient_id, r.split])
    tmp.replace(path)
    return path


def _table(root: Path, name: str, dataset: str) -> Path:
    """``root / name``; :class:`DataError` naming the root when the dataset's table is not there."""
    table = root / name
    if not table.is_file():
        raise DataError(f"no {name} in the {dataset} root", root)
    return table


# --- covid-cxr -----------------------------------------------------------------------------------
def read_covid(root: str | Path, split: str | None = None) -> tuple[list[PairRecord], list[Skipped]]:
    """``covid-cxr/pairs.csv`` (image, text = clinical note, patient_id, split); empty notes are skipped.

    With ``split``, rows of other splits are left out silently (they are not skipped rows).
    """
    root = Path(root)
    table = _table(root, "pairs.csv", "covid-cxr")
    records, skipped = [], []
    for where, row in _read_rows(table):
        if split is not None and row.get("split", "") != split:
            continue
        rid = row.get("image_id") or Path(row.get("image", "")).stem
        text = (row.get("text") or "").strip()
        image = root / (row.get("image") or "")
        if not usable_text(text):
            skipped.append((f"{table}:{where}", "empty clinical note"))
        elif not image.is_file():
            skipped.append((f"{table}:{where}", f"image not found: {image}"))
        else:
            records.append(
                PairRecord(rid, str(image), text, f"covid-{row.get('patient_id', '')}", row.get("split", ""), "covid")
            )
    return records, skipped


# --- NIH ChestX-ray14 labels as report-like sentences -------------------------------------------
NIH_NAMES = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "consolidation",
    "Edema": "pulmonary edema",
    "Effusion": "pleural effusion",
    "Emphysema": "emphysema",
    "Fibrosis": "fibrosis",
    "Hernia": "hiatal hernia",
    "Infiltration": "infiltration",
    "Mass": "a mass",
    "Nodule": "a nodule",
    "Pleural_Thickening": "pleural thickening",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
}


def nih_report(findings: str) -> str:
    """NIH label string (``Edema|Effusion``) -> report-like sentences, one per finding.

    >>> nih_report("Edema|Effusion")
    'Findings suggesting pulmonary edema. Findings suggesting pleural effusion.'
    """
    labels = [f.strip() for f in (findings or "").split("|") if f.strip()]
    if not labels or labels == ["No Finding"]:
        return "No acute cardiopulmonary abnormality. The lungs are clear."
    return " ".join(f"Findings suggesting {NIH_NAMES.get(f, f.replace('_', ' ').lower())}." for f in labels)


def read_nih(root: str | Path) -> tuple[list[PairRecord], list[Skipped]]:
    """``nih-cxr14-sample/labels.csv``: each image with its labels turned into sentences (:func:`nih_report`)."""
    root = Path(root)
    table = _table(root, "labels.csv", "NIH")
    records, skipped = [], []
    for where, row in _read_rows(table):
        image = root / (row.get("image") or "")
        if not image.is_file():
            skipped.append((f"{table}:{where}", f"image not found: {image}"))
            continue
        text = nih_report(row.get("findings", ""))
        records.append(PairRecord(image.stem, str(image), text, f"nih-{row.get('patient_id', '')}", "", "nih"))
    return records, skipped


# --- MIMIC-CXR -------------------------------------------------------------------------------------
_HEADING = re.compile(r"^\s*([A-Z][A-Z /&-]{2,40}):", re.MULTILINE)


def report_sections(report: str) -> dict[str, str]:
    """Split a free-text radiology report at ``HEADING:`` lines -> {heading (upper case): text}."""
    sections: dict[str, str] = {}
    matches = list(_HEADING.finditer(report))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(report)
        body = " ".join(report[m.end() : end].split())
        if body:
            sections[m.group(1).strip().upper()] = body
    return sections


def findings_impression(report: str) -> str:
    """The Findings and Impression sections joined (as AFLoc trains on); '' when neither is there."""
    sections = report_sections(report)
    parts = [sections[k] for k in ("FINDINGS", "IMPRESSION") if k in sections]
    return " ".join(parts)


def read_mimic(root: str | Path, frontal_only: bool = True) -> tuple[list[PairRecord], list[Skipped]]:
    """MIMIC-CXR(-JPG) layout: ``files/pXX/pSUBJECT/sSTUDY.txt`` reports beside ``sSTUDY/*.jpg|dcm`` images.

    Findings + Impression of each report pair with every image of its study. When
    ``mimic-cxr-2.0.0-metadata.csv(.gz)`` is in ``root``, only PA/AP views are kept; when
    ``mimic-cxr-2.0.0-split.csv(.gz)`` is, its split (train/validate/test) is recorded.
    """
    root = Path(root)
    files = root / "files" if (root / "files").is_dir() else root
    if not files.is_dir():
        raise DataError("MIMIC-CXR root not found", root)
    views = _mimic_table(root, "metadata", "dicom_id", "ViewPosition") if frontal_only else {}
    splits = _mimic_table(root, "split", "dicom_id", "split")
    records, skipped = [], []
    reports = sorted(files.glob("p*/p*/s*.txt"))
    if not reports:
        raise DataError("no reports (files/pXX/pSUBJECT/sSTUDY.txt) under the MIMIC-CXR root", root)
    for report in reports:
        text = findings_impression(report.read_text(errors="replace"))
        if not usable_text(text):
            skipped.append((str(report), "no Findings or Impression section"))
            continue
        study = report.with_suffix("")
        images = sorted(p for p in study.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if study.is_dir() else []
        if not images:
            skipped.append((str(report), "study has no image"))
            continue
        subject = report.parent.name
        for image in images:
            if views and views.get(image.stem, "").upper() not in ("PA", "AP"):
                skipped.append((str(image), f"not a frontal view ({views.get(image.stem) or 'unknown'})"))
                continue
            split = {"validate": "val"}.get(splits.get(image.stem, ""), splits.get(image.stem, ""))
            records.append(PairRecord(image.stem, str(image), text, subject, split, "mimic"))
    return records, skipped


def _mimic_table(root: Path, kind: str, key: str, value: str) -> dict[str, str]:
    import gzip

    for name in (f"mimic-cxr-2.0.0-{kind}.csv", f"mimic-cxr-2.0.0-{kind}.csv.gz"):
        path = root / name
        if path.is_file():
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt", newline="") as fh:
                return {row[key]: row.get(value, "") for row in csv.DictReader(fh)}
    return {}


# --- Indiana University reports (text only) --------------------------------------------------
def default_iu_archive() -> Path:
    """``NLMCXR_reports.tgz`` shipped inside the installed torchxrayvision package."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("torchxrayvision")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise DataError("torchxrayvision is not installed: give the path of NLMCXR_reports.tgz")
    return Path(spec.origin).parent / "data" / "NLMCXR_reports.tgz"


_ABSTRACT = re.compile(r'<AbstractText Label="(FINDINGS|IMPRESSION)">(.*?)</AbstractText>', re.DOTALL)


def read_iu(path: str | Path | None = None) -> tuple[list[PairRecord], list[Skipped]]:
    """Indiana University chest X-ray reports (Findings + Impression) as text-only records.

    Read straight from the archive (default: the one torchxrayvision ships); nothing is extracted.
    """
    import html

    path = Path(path) if path else default_iu_archive()
    if not path.is_file():
        raise DataError("IU reports archive not found", path)
    records, skipped = [], []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".xml"):
                    continue
                fh = tar.extractfile(member)
                raw = fh.read().decode("utf-8", errors="replace") if fh else ""
                parts = {label: html.unescape(" ".join(body.split())) for label, body in _ABSTRACT.findall(raw)}
                text = " ".join(parts[k] for k in ("FINDINGS", "IMPRESSION") if parts.get(k))
                text = text.replace("XXXX", " ")
                if not usable_text(text):
                    skipped.append((f"{path}:{member.name}", "no Findings or Impression"))
                    continue
                rid = f"iu-{Path(member.name).stem}"
                records.append(PairRecord(rid, None, text, rid, "", "iu"))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"cannot read the reports archive: {err}", path) from None
    return records, skipped


# --- sources -------------------------------------------------------------------------------------
def load_source(
    fmt: str, path: str, root: str | None = None, split: str | None = None, limit: int | None = None
) -> tuple[list[PairRecord], list[Skipped]]:
    """Records of one configured source (see :class:`training.config.SourceConfig`)."""
    if fmt != "iu" and not Path(path).exists():
        raise DataError("data path not found", path)
    if fmt == "manifest":
        records, skipped = read_manifest(path, root)
    elif fmt == "covid":
        records, skipped = read_covid(path, split)
    elif fmt == "nih":
        records, skipped = read_nih(path)
    elif fmt == "mimic":
        records, skipped = read_mimic(path)
    elif fmt == "iu":
        records, skipped = read_iu(path or None)
    else:
        raise DataError(f"unknown source format {fmt!r}", path)
    if split is not None:
        records = [r for r in records if r.split == split]
    if limit is not None:
        records = records[:limit]
    if not records:
        where = f" of split {split!r}" if split is not None else ""
        raise DataError(f"no usable rows{where} ({len(skipped)} skipped: {_summary(skipped)})", path or fmt)
    return records, skipped


def _summary(skipped: list[Skipped]) -> str:
    if not skipped:
        return "none"
    reasons: dict[str, int] = {}
    for _, reason in skipped:
        key = reason.split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    return ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))


def split_by_patient(records: list[PairRecord], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val) with ``fraction`` of the patients held out (no patient in both)."""
    import random

    patients = sorted({r.patient_id or r.id for r in records})
    rng = random.Random(seed)
    rng.shuffle(patients)
    n_val = max(1, round(len(patients) * fraction)) if fraction > 0 and len(patients) > 1 else 0
    held = set(patients[:n_val])
    train = [i for i, r in enumerate(records) if (r.patient_id or r.id) not in held]
    val = [i for i, r in enumerate(records) if (r.patient_id or r.id) in held]
    return train, val
