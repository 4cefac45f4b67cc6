"""Per-epoch validation: retrieval recall@k on held-out pairs, and localisation on a masks dataset.

Retrieval uses the global embeddings (cosine of image and report), as zero-shot classification
does. Many reports repeat word for word (NIH label sentences, one clinical note for several images
of a patient), so a retrieved item counts as correct when its report text equals the true one.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from afloc_engine.models import AFLocModel
from training.dataset import Collate, PairDataset, tokens_to

log = logging.getLogger(__name__)

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)


def recall_at_k(similarity: torch.Tensor, text_ids: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """Image->report and report->image recall@k.

    similarity: (N, N) image x report scores of N pairs (pair i = image i, report i);
    text_ids: (N,) ids equal for identical report texts. Returns {"i2t_r@k": ..., "t2i_r@k": ...}.
    """
    n = similarity.shape[0]
    out = {}
    same = text_ids[:, None] == text_ids[None, :]  # (N, N): report j is a correct answer for image i
    for k in ks:
        kk = min(k, n)
        top_t = similarity.topk(kk, dim=1).indices  # reports for each image
        out[f"i2t_r@{k}"] = float(same.gather(1, top_t).any(dim=1).float().mean())
        top_i = similarity.t().topk(kk, dim=1).indices  # images for each report
        out[f"t2i_r@{k}"] = float(same.t().gather(1, top_i).any(dim=1).float().mean())
    return out


@torch.no_grad()
def retrieval_metrics(
    model: AFLocModel,
    dataset: PairDataset,
    collate: Collate,
    device: torch.device,
    ks: tuple[int, ...],
    batch_size: int = 64,
    autocast: torch.autocast | None = None,
) -> dict[str, float]:
    """Encode every validation pair (no augmentation) and compute :func:`recall_at_k`."""
    was_training = model.training
    model.eval()
    images, reports, texts = [], [], []
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            with autocast or nullcontext():
                img = model.encode_images(batch.images.to(device))
                txt = model.encode_text(tokens_to(batch.tokens, device))
            images.append(img.global_.float())
            reports.append(txt.report.float())
            texts.extend(batch.texts)
    finally:
        model.train(was_training)
    if not images:
        return {}
    sim = F.normalize(torch.cat(images), dim=-1) @ F.normalize(torch.cat(reports), dim=-1).t()
    lookup: dict[str, int] = {}
    ids = torch.tensor([lookup.setdefault(t, len(lookup)) for t in texts], device=sim.device)
    return recall_at_k(sim, ids, ks)


# --- localisation ------------------------------------------------------------------------------
def _engine_metrics():  # noqa: ANN202 (module or None)
    """afloc_engine.metrics when another issue has added it (preferred), else None."""
    try:
        import afloc_engine.metrics as metrics  # noqa: PLC0415
    except ImportError:
        return None
    return metrics


def iou_dice(heatmap: np.ndarray, mask: np.ndarray, thresholds: tuple[float, ...] = THRESHOLDS) -> tuple[float, float]:
    """Mean IoU and Dice of ``heatmap > t`` against a boolean mask over the paper's thresholds.

    A minimal fallback for when ``afloc_engine.metrics`` (the evaluation issue's module, preferred
    whenever it is importable) is absent.
    """
    ious, dices = [], []
    truth = mask.astype(bool)
    for t in thresholds:
        pred = heatmap > t
        inter = float(np.logical_and(pred, truth).sum())
        union = float(np.logical_or(pred, truth).sum())
        total = float(pred.sum() + truth.sum())
        ious.append(inter / union if union else 1.0)
        dices.append(2 * inter / total if total else 1.0)
    return float(np.mean(ious)), float(np.mean(dices))


def cnr(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """|mean_in - mean_out| / sqrt(var_in + var_out) of the heatmap inside vs outside the mask."""
    truth = mask.astype(bool)
    inside, outside = heatmap[truth], heatmap[~truth]
    if inside.size == 0 or outside.size == 0:
        return float("nan")
    denom = np.sqrt(inside.var() + outside.var())
    return float(abs(inside.mean() - outside.mean()) / denom) if denom > 0 else 0.0


def localisation_metrics(
    model: AFLocModel,
    masks_root: str | Path,
    prompts: dict[str, str],
    device: torch.device,
    split: str = "dev",
    limit: int | None = None,
) -> dict[str, float]:
    """Mean IoU, Dice (thresholds 0.1..0.5) and CNR per mask class on covid-cxr's ``split``.

    Uses the engine's inference (:class:`afloc_engine.inference.AFLoc`) for the heatmaps.
    """
    import csv

    from PIL import Image

    from afloc_engine.checkpoint import ModelInfo
    from afloc_engine.inference import AFLoc

    root = Path(masks_root)
    pairs = {r["image_id"]: r for r in csv.DictReader((root / "pairs.csv").open())}
    wanted = [
        r
        for r in csv.DictReader((root / "masks.csv").open())
        if r["class"] in prompts and pairs.get(r["image_id"], {}).get("split") == split
    ]
    if limit is not None:
        wanted = wanted[:limit]
    if not wanted:
        return {}
    metrics = _engine_metrics()
    was_training = model.training
    afloc = AFLoc(model, ModelInfo(name="training", version="val"), device)
    per_class: dict[str, list[tuple[float, float, float]]] = {}
    try:
        for row in wanted:
            image_path = root / pairs[row["image_id"]]["image"]
            result = afloc.localize(str(image_path), [prompts[row["class"]]])
            heat = result.heatmaps[0]
            mask = np.asarray(Image.open(root / row["mask"]).convert("L")) > 127
            if mask.shape != heat.shape:
                log.warning("%s: mask shape %s differs from the image %s; skipped", row["mask"], mask.shape, heat.shape)
                continue
            if metrics is not None:  # the evaluation issue's definitions, when present
                scores = (metrics.mean_iou(heat, mask), metrics.mean_dice(heat, mask), metrics.cnr(heat, mask))
            else:
                scores = (*iou_dice(heat, mask), cnr(heat, mask))
            per_class.setdefault(row["class"], []).append(scores)
    finally:
        model.train(was_training)
    out = {}
    for name, values in per_class.items():
        arr = np.array(values, dtype=np.float64)
        out[f"{name}_iou"], out[f"{name}_dice"] = float(arr[:, 0].mean()), float(arr[:, 1].mean())
        out[f"{name}_cnr"] = float(np.nanmean(arr[:, 2])) if np.isfinite(arr[:, 2]).any() else float("nan")
    if per_class:
        out["mean_iou"] = float(np.mean([out[f"{n}_iou"] for n in per_class]))
        out["mean_cnr"] = float(np.nanmean([out[f"{n}_cnr"] for n in per_class]))
    return out
