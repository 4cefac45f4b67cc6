"""The evaluation runner: every predictor on the same images, metrics per finding and overall, with CIs.

>>> from afloc_engine.evaluation import load_dataset, evaluate_localization      # doctest: +SKIP
>>> data = load_dataset("../shared/data/covid-cxr", split="dev")                 # doctest: +SKIP
>>> result = evaluate_localization(model, data)                                   # doctest: +SKIP
>>> result["results"]["prior"]["overall"]["all"]["iou"]                          # doctest: +SKIP
{'mean': 0.12, 'ci': [0.10, 0.14], 'n': 75}

Localisation is measured on positive images only; each image-finding pair counts once per
prompt kind (its metric is the mean over that kind's prompts). Overall numbers pool every
image-finding pair and resample whole images (cluster bootstrap). AUROC uses the positives and
the dataset's negatives (see :mod:`afloc_engine.evaluation.datasets`); its CI resamples positives
and negatives apart, and the overall AUROC is the mean over findings.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from afloc_engine.errors import DataError, ImageReadError
from afloc_engine.evaluation.datasets import EvalDataset, Sample, Skip, TargetError, finding_key, load_target
from afloc_engine.evaluation.predictors import (
    ConstantPredictor,
    Predictor,
    PredictorLike,
    as_predictor,
    baseline_predictors,
)
from afloc_engine.evaluation.prompts import EvalPrompt, default_prompts, prompt_kind
from afloc_engine.io import ImageData, read_image
from afloc_engine.metrics import (
    THRESHOLDS,
    auroc,
    auroc_batch,
    bootstrap_auroc_indices,
    bootstrap_mean_ci,
    localization_scores,
)
from afloc_engine.progress import Progress

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("iou", "dice", "cnr", "pointing")
ALL = "all"
"""The prompt kind that pools every prompt of a finding (and the only kind of a baseline)."""
RESULT_FORMAT = "afloc-evaluation"
RESULT_VERSION = 1


@dataclass
class _Loaded:
    sample: Sample
    image: ImageData
    targets: dict[str, np.ndarray]
    negatives: list[str]
    present: list[str] = field(default_factory=list)  # positive by an image-level label (no region)


@dataclass
class _Records:
    """Per-method raw numbers: localisation rows and probability rows."""

    loc: list[dict[str, Any]] = field(default_factory=list)
    prob: list[dict[str, Any]] = field(default_factory=list)


def _normalise_prompts(
    prompts: Mapping[str, Sequence[EvalPrompt | str]] | None,
) -> dict[str, list[EvalPrompt]] | None:
    if prompts is None:
        return None
    out: dict[str, list[EvalPrompt]] = {}
    for key, items in prompts.items():
        items = [items] if isinstance(items, (str, EvalPrompt)) else items
        out[finding_key(key)] = [p if isinstance(p, EvalPrompt) else EvalPrompt(p, prompt_kind(p)) for p in items]
    return out


def _predictors(models: Any, baselines: Sequence[str], batch_size: int) -> list[Predictor]:  # noqa: ANN401
    if models is None:
        items: list[tuple[str | None, Any]] = []
    elif isinstance(models, Mapping):
        items = list(models.items())
    elif isinstance(models, (list, tuple)):
        items = [(None, m) for m in models]
    else:
        items = [(None, models)]
    preds = [as_predictor(m, name, batch_size) for name, m in items] + baseline_predictors(baselines)
    seen: Counter[str] = Counter()
    for p in preds:
        seen[p.name] += 1
        if seen[p.name] > 1:
            p.name = f"{p.name}_{seen[p.name]}"
    return preds


def _summary(
    per_image: dict[str, list[float]], groups: list[str], n_bootstrap: int, seed: int
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    g = np.asarray(groups)
    for metric in METRICS:
        values = np.asarray(per_image[metric], dtype=np.float64)
        finite = np.isfinite(values)
        if not finite.any():
            out[metric] = {"mean": None, "ci": [None, None], "n": 0}
            continue
        low, high = bootstrap_mean_ci(values, n_bootstrap, seed, groups=g if len(set(groups)) < len(groups) else None)
        out[metric] = {"mean": float(values[finite].mean()), "ci": [low, high], "n": int(finite.sum())}
    return out


def _auroc_summary(scores: np.ndarray, labels: np.ndarray, n_bootstrap: int, seed: int) -> dict[str, Any] | None:
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    idx = bootstrap_auroc_indices(labels, n_bootstrap, seed)
    boots = auroc_batch(scores[idx], labels[idx])
    low, high = np.percentile(boots, [2.5, 97.5])
    return {
        "value": auroc(scores, labels),
        "ci": [float(low), float(high)],
        "n_positive": n_pos,
        "n_negative": n_neg,
        "_boots": boots,
    }


def _kinds(prompts: list[EvalPrompt]) -> list[str]:
    kinds = list(dict.fromkeys(p.kind for p in prompts))
    return [*kinds, ALL] if ALL not in kinds else kinds


def _read(sample: Sample, findings: list[str], skipped: list[Skip], min_mask_pixels: int = 1) -> _Loaded | None:
    try:
        image = read_image(sample.image)
    except ImageReadError as err:
        skipped.append(Skip(sample.image_id, err.problem, None, str(sample.image), "unreadable image"))
        return None
    if image.is_volume:
        skipped.append(Skip(sample.image_id, "3D volume: evaluation takes 2D images", None, str(sample.image), "3D"))
        return None
    shape = tuple(image.array.shape)
    targets: dict[str, np.ndarray] = {}
    for f in findings:
        if f not in sample.positives:
            continue
        try:
            target = load_target(sample.positives[f], shape)  # type: ignore[arg-type]
        except TargetError as err:
            path = None if err.path is None else str(err.path)
            skipped.append(Skip(sample.image_id, err.problem, f, path, err.category))
            continue
        area = int(target.sum())
        if area < min_mask_pixels:
            path = None if sample.positives[f].path is None else str(sample.positives[f].path)
            reason = f"region of {area} px is below --min-mask-pixels {min_mask_pixels}"
            skipped.append(Skip(sample.image_id, reason, f, path, "region too small"))
            continue
        targets[f] = target
    negatives = [f for f in findings if f in sample.negatives]
    present = [f for f in findings if f in sample.labels and f not in targets]
    if not targets and not negatives and not present:
        return None
    return _Loaded(sample, image, targets, negatives, present)


def _check_prediction(pred: Predictor, out: Any, loaded: list[_Loaded], n_prompts: int) -> None:  # noqa: ANN401
    if len(out.heatmaps) != len(loaded):
        raise ValueError(f"{pred.name}: {len(out.heatmaps)} heatmap sets for {len(loaded)} images")
    for heat, item in zip(out.heatmaps, loaded):
        want = (n_prompts, *item.image.array.shape)
        if tuple(np.shape(heat)) != want:
            raise ValueError(f"{pred.name}: heatmaps of shape {np.shape(heat)} for {item.sample.image_id}, want {want}")
    if out.probabilities is not None and np.shape(out.probabilities) != (len(loaded), n_prompts):
        raise ValueError(f"{pred.name}: probabilities of shape {np.shape(out.probabilities)}")


def _resolve_findings(
    dataset: EvalDataset,
    findings: Sequence[str] | None,
    prompt_map: dict[str, list[EvalPrompt]] | None,
    skipped: list[Skip],
    notes: list[str],
) -> tuple[list[str], dict[str, list[EvalPrompt]]]:
    if findings:
        wanted = {finding_key(f): f for f in reversed(findings)}  # key -> the name as given (first one wins)
        wanted = {k: wanted[k] for k in dict.fromkeys(finding_key(f) for f in findings)}
    elif prompt_map:
        wanted = {k: k for k in prompt_map}
    else:
        wanted = {k: k for k in dataset.default_findings}
    chosen: list[str] = []
    available = ", ".join(dataset.findings) or "none"
    for f, given in wanted.items():
        if f in dataset.findings:
            chosen.append(f)
        else:
            reason = f"unknown finding: no positive image of it in this dataset (available: {available})"
            skipped.append(Skip(given, reason, f, None, "unknown finding"))
    prompts: dict[str, list[EvalPrompt]] = {}
    for f in chosen:
        if prompt_map and f in prompt_map:
            prompts[f] = prompt_map[f]
        else:
            prompts[f] = default_prompts(f)
            if prompt_map:
                notes.append(f"{f}: not in the prompt file; default prompts used")
    return chosen, prompts


def evaluate_localization(
    models: PredictorLike | Sequence[PredictorLike] | Mapping[str, PredictorLike] | None,
    dataset: EvalDataset,
    prompts: Mapping[str, Sequence[EvalPrompt | str]] | None = None,
    findings: Sequence[str] | None = None,
    baselines: Sequence[str] = ("constant", "prior"),
    n_bootstrap: int = 1000,
    seed: int = 0,
    thresholds: Sequence[float] = THRESHOLDS,
    batch_size: int = 8,
    cases: int = 3,
    figures: bool = True,
    progress: str | Progress = "none",
    min_mask_pixels: int = 1,
) -> dict[str, Any]:
    """Evaluate models and baselines on the same images of ``dataset``; returns a JSON-ready dict.

    Args:
        models: an ``AFLoc`` / ``AFLocModel``, a :class:`Predictor`, a function
            ``fn(images, prompts) -> (heatmaps, probabilities | None)``, a list of them, or a
            ``{name: model}`` mapping; None for baselines only.
        dataset: from :func:`~afloc_engine.evaluation.datasets.load_dataset`.
        prompts: finding -> prompts (strings or :class:`EvalPrompt`); defaults per finding otherwise.
        findings: findings to evaluate (default: the prompt mapping's, else the dataset's defaults).
            Names the dataset lacks are reported in ``skipped``.
        baselines: any of ``constant``, ``prior``, ``lung_field`` (left out, with a note, on a dataset of
            image-level labels only).
        n_bootstrap, seed: bootstrap resamples (95% percentile CIs) and their seed.
        thresholds: heatmap thresholds over which IoU and Dice are averaged.
        batch_size: images per network batch.
        cases: best and worst cases per finding to show (0: none).
        figures: render the case grids into ``result["figures"]`` ({file name: (H, W, 3) uint8});
            the JSON writer leaves them out.
        progress: ``bar``, ``json``, ``none`` or a :class:`~afloc_engine.progress.Progress`.
        min_mask_pixels: ground-truth regions smaller than this are skipped (reported); 1 keeps every
            non-empty region, as the paper's protocol does.

    Returns a dict with ``dataset``, ``protocol``, ``methods``, ``results`` (method -> findings ->
    kinds / prompts -> metrics with ``mean``, ``ci``, ``n``; ``overall``), ``per_image``,
    ``cases``, ``skipped`` (what was left out and why), ``notes`` and ``warnings``.
    Raises :class:`NothingEvaluatedError` (a :class:`DataError` listing the skips) when nothing could be evaluated.
    """
    skipped: list[Skip] = list(dataset.skipped)
    notes: list[str] = list(dataset.notes)
    prompt_map = _normalise_prompts(prompts)
    chosen, finding_prompts = _resolve_findings(dataset, findings, prompt_map, skipped, notes)
    if not chosen:
        headline = "no requested finding is in the dataset"
        raise NothingEvaluatedError(nothing_evaluated_message(skipped, headline), dataset.root, skipped)
    if not any(s.positives for s in dataset.samples) and baselines:
        notes.append(f"baselines {', '.join(baselines)} left out: the dataset has image-level labels only")
        baselines = ()
    predictors = _predictors(models, baselines, batch_size)
    if not predictors:
        raise ValueError("nothing to evaluate: give a model or at least one baseline")
    try:
        result = _run(
            dataset,
            predictors,
            chosen,
            finding_prompts,
            skipped,
            n_bootstrap,
            seed,
            thresholds,
            batch_size,
            cases,
            figures,
            progress,
            min_mask_pixels,
        )
    finally:
        for p in predictors:
            p.close()  # e.g. a trainer's model back in training mode, also after an error
    result["skipped"] = [s.to_dict() for s in skipped]
    result["skipped_counts"] = dict(Counter(s.group for s in skipped).most_common())
    result["notes"] = notes
    result["warnings"] = [
        f"UNTRAINED MODEL: {m['name']} has random weights; its numbers mean nothing"
        for m in result["methods"]
        if m.get("kind") == "model" and m.get("trained") is False
    ]
    return result


def _run(
    dataset: EvalDataset,
    predictors: list[Predictor],
    chosen: list[str],
    finding_prompts: dict[str, list[EvalPrompt]],
    skipped: list[Skip],
    n_bootstrap: int,
    seed: int,
    thresholds: Sequence[float],
    batch_size: int,
    cases: int,
    figures: bool,
    progress: str | Progress,
    min_mask_pixels: int,
) -> dict[str, Any]:
    """Predict and score every sample, aggregate, pick and render the cases."""
    classify = any(not p.prompt_independent for p in predictors)
    texts = list(dict.fromkeys(p.text for f in chosen for p in finding_prompts[f]))
    index = {t: i for i, t in enumerate(texts)}
    samples = [
        s
        for s in dataset.samples
        if any(f in s.positives or (classify and (f in s.negatives or f in s.labels)) for f in chosen)
    ]
    records = {p.name: _Records() for p in predictors}
    own_progress = not isinstance(progress, Progress)
    bar = Progress(len(samples), progress, desc="evaluate") if own_progress else progress
    try:
        for start in range(0, len(samples), max(1, batch_size)):
            batch = samples[start : start + max(1, batch_size)]
            loaded = [x for x in (_read(s, chosen, skipped, min_mask_pixels) for s in batch) if x is not None]
            if loaded:
                _score_batch(loaded, predictors, chosen, finding_prompts, texts, index, thresholds, records)
            bar.update(len(batch), message=batch[-1].image_id)
    finally:
        if own_progress:
            bar.close()
    result = _aggregate(dataset, predictors, chosen, finding_prompts, records, n_bootstrap, seed, thresholds)
    if not any(result["results"][p.name]["overall"] for p in predictors):
        headline = "no positive image could be evaluated"
        raise NothingEvaluatedError(nothing_evaluated_message(skipped, headline), dataset.root, skipped)
    result["cases"] = _select_cases(predictors, chosen, finding_prompts, records, cases)
    if figures and cases > 0:
        result["figures"] = _render_cases(dataset, predictors, result["cases"])
    return result


class NothingEvaluatedError(DataError):
    """Nothing could be evaluated; ``skipped`` lists every item left out and why."""

    def __init__(self, message: str, path: str | Path | None, skipped: Sequence[Skip]) -> None:
        super().__init__(message, path)
        self.skipped = list(skipped)


def nothing_evaluated_message(skipped: Sequence[Skip], headline: str) -> str:
    """One message: why nothing could be evaluated, with the skip counts by category."""
    counts = Counter(s.group for s in skipped)
    detail = "; ".join(f"{cat}: {n}" for cat, n in counts.most_common()) or "no usable image"
    return f"nothing could be evaluated ({headline}). Skipped: {detail}"


def _score_batch(
    loaded: list[_Loaded],
    predictors: list[Predictor],
    findings: list[str],
    finding_prompts: dict[str, list[EvalPrompt]],
    texts: list[str],
    index: dict[str, int],
    thresholds: Sequence[float],
    records: dict[str, _Records],
) -> None:
    images = [x.image for x in loaded]
    for pred in predictors:
        call_prompts = ["(prompt-independent baseline)"] if pred.prompt_independent else texts
        out = pred(images, call_prompts)
        _check_prediction(pred, out, loaded, len(call_prompts))
        rec = records[pred.name]
        for i, item in enumerate(loaded):
            heat = np.asarray(out.heatmaps[i], dtype=np.float32)
            for f in findings:
                plist = [None] if pred.prompt_independent else finding_prompts[f]
                for p in plist:
                    j = 0 if p is None else index[p.text]
                    base = {
                        "image_id": item.sample.image_id,
                        "finding": f,
                        "prompt": None if p is None else p.text,
                        "kind": ALL if p is None else p.kind,
                    }
                    if f in item.targets:
                        s = localization_scores(heat[j], item.targets[f], thresholds)
                        rec.loc.append(
                            {
                                **base,
                                "iou": s.iou,
                                "dice": s.dice,
                                "cnr": s.cnr,
                                "pointing": s.pointing,
                                "iou_at": list(s.iou_at),
                                "dice_at": list(s.dice_at),
                            }
                        )
                    positive = f in item.targets or f in item.present
                    if out.probabilities is not None and (positive or f in item.negatives):
                        label = positive
                        rec.prob.append({**base, "label": int(label), "probability": float(out.probabilities[i, j])})


def _per_image_means(rows: list[dict[str, Any]], keys: Sequence[str]) -> tuple[list[str], dict[str, list[float]]]:
    """Average rows of the same image (over prompts); returns image ids and metric -> values."""
    by_image: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    ids = list(by_image)
    out: dict[str, list[float]] = {}
    for k in keys:
        vals = []
        for i in ids:
            v = np.asarray([r[k] for r in by_image[i]], dtype=np.float64)
            v = v[np.isfinite(v)]
            vals.append(float(v.mean()) if v.size else float("nan"))
        out[k] = vals
    return ids, out


def _at_thresholds(rows: list[dict[str, Any]], thresholds: Sequence[float]) -> dict[str, dict[str, float]]:
    if not rows:
        return {}
    iou = np.asarray([r["iou_at"] for r in rows]).mean(axis=0)
    dice = np.asarray([r["dice_at"] for r in rows]).mean(axis=0)
    return {
        "iou_at": {f"{t:g}": float(v) for t, v in zip(thresholds, iou)},
        "dice_at": {f"{t:g}": float(v) for t, v in zip(thresholds, dice)},
    }


def _select(rows: list[dict[str, Any]], kind: str | None = None, prompt: str | None = None) -> list[dict[str, Any]]:
    return [
        r
        for r in rows
        if (kind is None or kind == ALL or r["kind"] == kind) and (prompt is None or r["prompt"] == prompt)
    ]


def _aggregate(
    dataset: EvalDataset,
    predictors: list[Predictor],
    findings: list[str],
    finding_prompts: dict[str, list[EvalPrompt]],
    records: dict[str, _Records],
    n_bootstrap: int,
    seed: int,
    thresholds: Sequence[float],
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    per_image: dict[str, Any] = {}
    evaluated: dict[str, dict[str, int]] = {f: {"positive": 0, "negative": 0} for f in findings}
    for pred in predictors:
        rec = records[pred.name]
        kinds_of = {f: ([ALL] if pred.prompt_independent else _kinds(finding_prompts[f])) for f in findings}
        per_finding: dict[str, Any] = {}
        pooled: dict[str, dict[str, Any]] = {}
        auroc_boots: dict[str, list[np.ndarray]] = {}
        auroc_points: dict[str, list[float]] = {}
        for f in findings:
            loc = [r for r in rec.loc if r["finding"] == f]
            prob = [r for r in rec.prob if r["finding"] == f]
            if not loc and not prob:
                continue
            n_img = len({r["image_id"] for r in loc} | {r["image_id"] for r in prob if r["label"]})
            evaluated[f]["positive"] = max(evaluated[f]["positive"], n_img)
            entry: dict[str, Any] = {"n_images": n_img, "kinds": {}, "prompts": {}}
            for kind in kinds_of[f]:
                rows = _select(loc, kind)
                ids, means = _per_image_means(rows, METRICS)
                summary: dict[str, Any] = {"n": len(ids), **_summary(means, ids, n_bootstrap, seed)}
                summary.update(_at_thresholds(rows, thresholds))
                summary["auroc"] = None
                prows = _select(prob, kind)
                if prows:
                    pids, pm = _per_image_means(prows, ("probability", "label"))
                    labels = np.asarray(pm["label"]) > 0.5
                    evaluated[f]["negative"] = max(evaluated[f]["negative"], int((~labels).sum()))
                    a = _auroc_summary(np.asarray(pm["probability"]), labels, n_bootstrap, seed)
                    if a is not None:
                        auroc_boots.setdefault(kind, []).append(a.pop("_boots"))
                        auroc_points.setdefault(kind, []).append(a["value"])
                    summary["auroc"] = a
                entry["kinds"][kind] = summary
                pool = pooled.setdefault(kind, {"ids": [], **{m: [] for m in METRICS}})
                pool["ids"] += ids
                for m in METRICS:
                    pool[m] += means[m]
            if not pred.prompt_independent:
                for p in finding_prompts[f]:
                    rows = _select(loc, prompt=p.text)
                    ids, means = _per_image_means(rows, METRICS)
                    summary = {"kind": p.kind, "n": len(ids), **_summary(means, ids, n_bootstrap, seed)}
                    summary.update(_at_thresholds(rows, thresholds))
                    prows = _select(prob, prompt=p.text)
                    summary["auroc"] = None
                    if prows:
                        labels = np.asarray([r["label"] for r in prows]) > 0
                        a = _auroc_summary(np.asarray([r["probability"] for r in prows]), labels, n_bootstrap, seed)
                        if a is not None:
                            a.pop("_boots")
                        summary["auroc"] = a
                    entry["prompts"][p.text] = summary
            per_finding[f] = entry
        overall: dict[str, Any] = {}
        for kind, pool in pooled.items():
            summary = {
                "n": len(pool["ids"]),
                "n_images": len(set(pool["ids"])),
                **_summary({m: pool[m] for m in METRICS}, pool["ids"], n_bootstrap, seed),
            }
            summary["auroc"] = None
            if auroc_boots.get(kind):
                boots = np.nanmean(np.stack(auroc_boots[kind]), axis=0)
                low, high = np.percentile(boots, [2.5, 97.5])
                summary["auroc"] = {
                    "value": float(np.mean(auroc_points[kind])),
                    "ci": [float(low), float(high)],
                    "findings": len(auroc_points[kind]),
                    "aggregate": "mean over findings",
                }
            overall[kind] = summary
        results[pred.name] = {"findings": per_finding, "overall": overall}
        per_image[pred.name] = {"localization": rec.loc, "classification": rec.prob}
    listed = dataset.counts()
    return {
        "format": RESULT_FORMAT,
        "version": RESULT_VERSION,
        "dataset": {
            "name": dataset.name,
            "format": dataset.format,
            "root": str(dataset.root),
            "split": dataset.split,
            "labels_complete": dataset.labels_complete,
            "counts": {
                f: {
                    "positive_listed": listed.get(f, {}).get("positive", 0),
                    "negative_listed": listed.get(f, {}).get("negative", 0),
                    "positive_evaluated": evaluated[f]["positive"],
                    "negative_evaluated": evaluated[f]["negative"],
                }
                for f in findings
            },
        },
        "protocol": {
            "localization_on": "positive images only",
            "thresholds": [float(t) for t in thresholds],
            "iou_dice": "mean over thresholds of heatmap > t (MONAI compute_iou / compute_dice)",
            "cnr": "|mean_in - mean_out| / sqrt(var_in + var_out) on the heatmap, population variances",
            "pointing": "heatmap maximum inside the region; ties score the share of maximal pixels inside",
            "auroc": "P(present) of positives vs the dataset's negatives (MONAI compute_roc_auc)",
            "prompt_kinds": "per image, the mean over the kind's prompts; 'all' pools every prompt",
            "overall": "every image-finding pair pooled; CI resamples whole images",
            "bootstrap": {"resamples": n_bootstrap, "seed": seed, "ci": "95% percentile"},
        },
        "findings": findings,
        "prompts": {f: [{"text": p.text, "kind": p.kind} for p in finding_prompts[f]] for f in findings},
        "methods": [p.describe() for p in predictors],
        "results": results,
        "per_image": per_image,
    }


def _select_cases(
    predictors: list[Predictor],
    findings: list[str],
    finding_prompts: dict[str, list[EvalPrompt]],
    records: dict[str, _Records],
    count: int,
) -> dict[str, Any]:
    """Best and worst images per finding, ranked by the IoU of the first model (its finding's first
    prompt), else of the first non-constant baseline."""
    if count <= 0:
        return {}
    ref = next(
        (p for p in predictors if not p.prompt_independent),
        next((p for p in predictors if not isinstance(p, ConstantPredictor)), predictors[0]),
    )
    out: dict[str, Any] = {}
    for f in findings:
        prompt = None if ref.prompt_independent else finding_prompts[f][0].text
        rows = [r for r in records[ref.name].loc if r["finding"] == f and r["prompt"] == prompt]
        if not rows:
            continue
        ranked = sorted(rows, key=lambda r: (-r["iou"], r["image_id"]))
        n_best = min(count, (len(ranked) + 1) // 2)
        best = ranked[:n_best]
        worst = ranked[n_best:][-count:][::-1]
        out[f] = {
            "ranked_by": ref.name,
            "prompt": prompt,
            "best": [{"image_id": r["image_id"], "iou": r["iou"]} for r in best],
            "worst": [{"image_id": r["image_id"], "iou": r["iou"]} for r in worst],
        }
    return out


def _render_cases(dataset: EvalDataset, predictors: list[Predictor], cases: dict[str, Any]) -> dict[str, np.ndarray]:
    """One grid per finding: rows = cases, columns = image with ground truth, then each method's heatmap."""
    from afloc_engine.evaluation.report import case_grid

    by_id = {s.image_id: s for s in dataset.samples}
    figures: dict[str, np.ndarray] = {}
    for f, sel in cases.items():
        rows = []
        for label, items in (("best", sel["best"]), ("worst", sel["worst"])):
            for rank, item in enumerate(items, 1):
                sample = by_id[item["image_id"]]
                image = read_image(sample.image)
                target = load_target(sample.positives[f], tuple(image.array.shape))  # type: ignore[arg-type]
                heatmaps = []
                for pred in predictors:
                    prompt = "(prompt-independent baseline)" if pred.prompt_independent else sel["prompt"]
                    heatmaps.append(np.asarray(pred([image], [prompt]).heatmaps[0][0], dtype=np.float32))
                title = f"{label} {rank}: {sample.image_id} IoU {item['iou']:.2f}"
                rows.append((title, image, target, heatmaps))
        if rows:
            shown = f', prompt "{sel["prompt"]}"' if sel["prompt"] else ""
            header = f"{f}{shown}, ranked by {sel['ranked_by']} IoU"
            figures[f"cases_{f}.png"] = case_grid(rows, [p.name for p in predictors], header)
    return figures
