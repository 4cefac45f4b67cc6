"""Writing an evaluation: ``evaluation.md`` (tables), ``evaluation.json`` (every number and CI), case PNGs.

The output folder is written to a temporary folder and renamed into place, so a failed run
never leaves a half-written report. An existing folder is replaced only if it holds a previous
evaluation (``evaluation.json``) or is empty.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from afloc_engine.checkpoint import atomic_folder, commit_folder
from afloc_engine.errors import DataError
from afloc_engine.evaluation.runner import ALL, METRICS
from afloc_engine.io import ImageData
from afloc_engine.outputs import overlay_rgb
from afloc_engine.transforms import normalize_intensity

JSON_FILE = "evaluation.json"
MARKDOWN_FILE = "evaluation.md"
LABELS = {"iou": "IoU", "dice": "Dice", "cnr": "CNR", "pointing": "Pointing"}
MAX_SKIPS_LISTED = 50


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def format_ci(entry: dict[str, Any] | None, digits: int = 3) -> str:
    """``{"mean": m, "ci": [lo, hi]}`` (or ``{"value": ...}``) -> ``'m [lo, hi]'``; ``'n/a'`` when absent."""
    if not entry:
        return "n/a"
    value = entry.get("mean", entry.get("value"))
    if value is None:
        return "n/a"
    low, high = entry.get("ci", [None, None])
    return f"{_num(value, digits)} [{_num(low, digits)}, {_num(high, digits)}]"


def _describe(method: dict[str, Any]) -> str:
    if method.get("kind") == "baseline":
        return f"**{method['name']}**: {method.get('description', 'baseline')}"
    trained = "" if method.get("trained", True) else ", untrained"
    return f"**{method['name']}**: model {method.get('model_id', '')}{trained}"


def _row(method: str, prompts: str, summary: dict[str, Any]) -> str:
    cells = [method, prompts, str(summary.get("n", ""))]
    cells += [format_ci(summary.get(m)) for m in METRICS]
    cells.append(format_ci(summary.get("auroc")))
    return "| " + " | ".join(cells) + " |"


def _kind_order(kinds: Sequence[str]) -> list[str]:
    """Kinds with ``all`` last; ``all`` left out when it would repeat the only other kind."""
    others = [k for k in kinds if k != ALL]
    return others if len(others) == 1 else [*others, ALL] if ALL in kinds else others


def to_markdown(result: dict[str, Any]) -> str:
    """The evaluation as markdown: overall table, one table per finding, skips, notes."""
    ds, proto = result["dataset"], result["protocol"]
    boot = proto["bootstrap"]
    thresholds = ", ".join(f"{t:g}" for t in proto["thresholds"])
    lines = [
        f"# Localisation evaluation: {ds['name']}" + (f" ({ds['split']} split)" if ds.get("split") else ""),
        "",
        f"Positive images only. IoU and Dice averaged over heatmap thresholds {{{thresholds}}}; CNR on the "
        f"heatmap; pointing game; AUROC of P(present) where the dataset has negatives. 95% CIs from "
        f"{boot['resamples']} bootstrap resamples (seed {boot['seed']}). Overall rows pool every image-finding "
        "pair (the CI resamples whole images); the overall AUROC is the mean over findings with negatives. "
        "Prompt rows: each image's metric is the mean over the prompts of that kind; 'all' pools every prompt.",
        "",
        "Methods: " + "; ".join(_describe(m) for m in result["methods"]) + ".",
        "",
    ]
    for w in result.get("warnings", []):
        lines += [f"> **{w}**", ""]
    header = "| method | prompts | n | IoU | Dice | CNR | Pointing | AUROC |"
    rule = "| --- | --- | ---: | --- | --- | --- | --- | --- |"
    lines += ["## Overall (all findings)", "", header, rule]
    for method, res in result["results"].items():
        for kind in _kind_order(list(res["overall"])):
            lines.append(_row(method, "-" if kind == ALL and len(res["overall"]) == 1 else kind, res["overall"][kind]))
    lines.append("")
    for f in result["findings"]:
        c = ds["counts"][f]
        neg = f", {c['negative_evaluated']} negatives" if c["negative_evaluated"] else ""
        lines += [f"## {f} ({c['positive_evaluated']} positive images{neg})", "", header, rule]
        for method, res in result["results"].items():
            entry = res["findings"].get(f)
            if not entry:
                continue
            kinds = entry["kinds"]
            for kind in _kind_order(list(kinds)):
                lines.append(_row(method, "-" if kind == ALL and len(kinds) == 1 else kind, kinds[kind]))
        lines.append("")
        if any(m.get("kind") != "baseline" for m in result["methods"]):
            lines += ["Prompts: " + "; ".join(f'{p["kind"]}: "{p["text"]}"' for p in result["prompts"][f]), ""]
    if result.get("specificity"):
        from afloc_engine.evaluation.prompt_specificity import specificity_markdown

        lines += [specificity_markdown(result["specificity"])]
    lines += _skip_lines(result)
    if result.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in result["notes"]], ""]
    if result.get("figures_written"):
        lines += ["## Cases", "", *[f"![{name}]({name})" for name in result["figures_written"]], ""]
    return "\n".join(lines)


def _skip_lines(result: dict[str, Any]) -> list[str]:
    skipped = result.get("skipped", [])
    if not skipped:
        return ["## Skipped", "", "Nothing was skipped.", ""]
    lines = ["## Skipped", "", "| why | count |", "| --- | ---: |"]
    lines += [f"| {cat} | {n} |" for cat, n in result["skipped_counts"].items()]
    lines.append("")
    for s in skipped[:MAX_SKIPS_LISTED]:
        where = f" [{s['finding']}]" if s.get("finding") else ""
        lines.append(f"- {s['item']}{where}: {s['reason']}" + (f" (`{s['path']}`)" if s.get("path") else ""))
    if len(skipped) > MAX_SKIPS_LISTED:
        lines.append(f"- ... and {len(skipped) - MAX_SKIPS_LISTED} more (see {JSON_FILE})")
    lines.append("")
    return lines


def skip_report(result_or_skips: dict[str, Any] | Sequence[Any], limit: int = 20) -> str:
    """A few lines for stderr: skip counts by category, then the first ``limit`` items."""
    skips = result_or_skips.get("skipped", []) if isinstance(result_or_skips, dict) else list(result_or_skips)
    if not skips:
        return ""
    rows = [s if isinstance(s, dict) else s.to_dict() for s in skips]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["category"]] = counts.get(r["category"], 0) + 1
    lines = [f"skipped {len(rows)} item(s): " + "; ".join(f"{k}: {v}" for k, v in counts.items())]
    for r in rows[:limit]:
        where = f" [{r['finding']}]" if r.get("finding") else ""
        lines.append(f"  {r['item']}{where}: {r['reason']}" + (f" ({r['path']})" if r.get("path") else ""))
    if len(rows) > limit:
        lines.append(f"  ... and {len(rows) - limit} more")
    return "\n".join(lines)


def _json_ready(value: Any) -> Any:  # noqa: ANN401
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def to_json(result: dict[str, Any]) -> str:
    """The result (figures left out) as JSON; NaN becomes null."""
    return json.dumps(_json_ready({k: v for k, v in result.items() if k != "figures"}), indent=1) + "\n"


def _tile(grey: np.ndarray, heatmap: np.ndarray | None, target: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One (h, w, 3) uint8 panel at the panel's ``size`` (w, h): resized first, so the outline stays 1 px sharp."""
    from PIL import Image

    small_grey = np.asarray(Image.fromarray(grey.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
    small_mask = np.asarray(Image.fromarray(target.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
    if heatmap is None:
        small_heat = np.full(small_grey.shape, -1.0, np.float32)
    else:
        small_heat = np.asarray(Image.fromarray(heatmap.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
    return overlay_rgb(np.clip(small_grey, 0, 1), small_heat, small_mask)


def case_grid(
    rows: Sequence[tuple[str, ImageData, np.ndarray, Sequence[np.ndarray]]],
    methods: Sequence[str],
    header: str = "",
    panel: int = 192,
) -> np.ndarray:
    """(H, W, 3) uint8 grid: one row per case (image + ground-truth outline, then each method's heatmap).

    rows: (title, image, (H, W) bool ground truth, one (H, W) [-1, 1] heatmap per method).
    """
    from PIL import Image, ImageDraw

    label_h, head_h = 16, 20
    cols = 1 + len(methods)
    sheet = Image.new("RGB", (cols * panel, head_h + label_h + len(rows) * (panel + label_h)), "black")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), header[:160], fill=(255, 255, 255))
    for c, name in enumerate(["image + ground truth", *methods]):
        draw.text((c * panel + 4, head_h + 2), name[:30], fill=(255, 230, 120))
    for r, (title, image, target, heatmaps) in enumerate(rows):
        grey = normalize_intensity(image.array, image.window)
        scale = panel / max(grey.shape)
        size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
        y = head_h + label_h + r * (panel + label_h)
        draw.text((4, y + 2), title[:90], fill=(255, 255, 255))
        for c, heat in enumerate([None, *heatmaps]):
            sheet.paste(Image.fromarray(_tile(grey, heat, target, size)), (c * panel, y + label_h))
    return np.asarray(sheet)


def write_evaluation(result: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``evaluation.md``, ``evaluation.json`` and the case PNGs into ``out_dir`` atomically."""
    from PIL import Image

    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise DataError("output path exists and is not a folder", out_dir)
        if any(out_dir.iterdir()) and not (out_dir / JSON_FILE).is_file():
            raise DataError(
                f"output folder is not empty and holds no previous {JSON_FILE}; refusing to replace it", out_dir
            )
    tmp = atomic_folder(out_dir)
    try:
        written = []
        for name, array in result.get("figures", {}).items():
            Image.fromarray(np.asarray(array, dtype=np.uint8)).save(tmp / name)
            written.append(name)
        result = {**result, "figures_written": written}
        (tmp / JSON_FILE).write_text(to_json(result))
        (tmp / MARKDOWN_FILE).write_text(to_markdown(result))
        commit_folder(tmp, out_dir, overwrite=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
