"""Does each prompt light up its own finding? Prompt specificity and invariance on a multi-finding set.

Protocol (``shared/reference/afloc-method.md``, "Beyond the paper"), on a dataset with outlines
of several findings on the same images (``chestx-det-nih``: 13 findings):

- For every outline o (an image i and its finding f) and every candidate finding g (all K
  findings the readers looked for), the **contrast** of g's prompt is the mean heat inside the
  outline minus the mean heat outside it, on i's heatmap for g's prompt.
- The **rank** of f's own prompt among the K (1 = highest contrast; ties share the average rank)
  and **top-1** (1 when it is highest; a tie of t prompts at the top scores 1/t).
- Both are averaged over the outlines of each finding, then over the findings that have at least
  ``min_outlines`` outlines (each finding counts once: a common finding cannot carry it).
  Chance: top-1 = 1/K, mean rank = (K + 1) / 2. 95% CIs from bootstrap resamples of images.
- Two nulls beside it: the **class-mean heatmap** (each prompt's heatmap averaged over all images
  of the set: where a prompt habitually points, no information from the image) and the
  **shuffled image** (each image's outlines scored with the heatmaps of another image, a random
  derangement per draw; its mean and 95th percentile over the draws).
- **Invariance**: per image, the mean Pearson correlation between the heatmaps of different
  prompts (1.0: the prompt does not matter), averaged over images with a bootstrap CI.

Heatmaps and outlines are compared on a ``grid`` x ``grid`` raster (heatmaps area-averaged;
an outline is the cells at least half inside it, or its most covered cells when none is): the
nulls need every image's maps at once, and 512 x 512 maps of 13 prompts for 100 images would
take 1.4 GB.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from afloc_engine.errors import AFLocError, DataError
from afloc_engine.evaluation.datasets import EvalDataset, TargetError, finding_key, load_target
from afloc_engine.evaluation.predictors import Predictor
from afloc_engine.evaluation.prompts import EvalPrompt, default_prompts
from afloc_engine.io import read_image
from afloc_engine.metrics import bootstrap_mean_ci
from afloc_engine.progress import Progress
from afloc_engine.specificity import (
    LUNG_WARN_R,
    SPECIFICITY_WARN,
    correlation_matrix,
    lung_field_map,
    mean_other_correlation,
)

SPEC_FORMAT = "afloc-prompt-specificity"
SPEC_VERSION = 1


# --- the metric functions (pure numpy; the tests build their answers by hand) -------------------
def downsample(array: np.ndarray, grid: int) -> np.ndarray:
    """(H, W) -> (grid, grid) float32 area average (box filter); H and W need not divide by ``grid``."""
    from PIL import Image

    return np.asarray(
        Image.fromarray(np.asarray(array, dtype=np.float32), mode="F").resize((grid, grid), Image.BOX),
        dtype=np.float32,
    )


def outline_cells(mask: np.ndarray, grid: int) -> np.ndarray:
    """(H, W) bool outline -> (grid, grid) bool: cells at least half inside, else the most covered cells."""
    frac = downsample(mask.astype(np.float32), grid)
    inside = frac >= 0.5
    if not inside.any():
        inside = frac >= frac.max() - 1e-6
    return inside


def contrasts(heatmaps: np.ndarray, outlines: np.ndarray) -> np.ndarray:
    """Mean heat inside minus outside every outline, for every image and prompt.

    heatmaps: (N, K, G) float (N images, K prompts, G pixels each); outlines: (M, G) bool, each
    with at least one pixel inside and one outside. Returns (N, K, M) float64:
    ``[j, g, o]`` = contrast of image j's heatmap for prompt g on outline o.
    Raises ValueError for an outline that is empty or covers everything.
    """
    heatmaps = np.asarray(heatmaps, dtype=np.float64)
    m = np.asarray(outlines, dtype=np.float64)
    n_in = m.sum(axis=1)
    n_out = m.shape[1] - n_in
    if (n_in == 0).any() or (n_out == 0).any():
        raise ValueError("every outline needs pixels inside and outside it")
    flat = heatmaps.reshape(-1, heatmaps.shape[-1])
    total = flat.sum(axis=1, keepdims=True)
    s_in = flat @ m.T
    out = s_in / n_in - (total - s_in) / n_out
    return out.reshape(heatmaps.shape[0], heatmaps.shape[1], -1)


def own_rank(scores: np.ndarray, own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank and top-1 of each row's own prompt among K scores (higher score = better).

    scores: (M, K); own: (M,) int index of each row's own prompt. Rank 1 is the highest; prompts
    tied with the own one share the average rank. Top-1 is 1 / (1 + number of ties) when no prompt
    scores higher, else 0. Returns two (M,) float64 arrays.
    """
    scores = np.asarray(scores, dtype=np.float64)
    own = np.asarray(own, dtype=np.int64)
    mine = scores[np.arange(len(scores)), own][:, None]
    tol = 1e-9 * np.maximum(1.0, np.abs(scores).max(axis=1, keepdims=True))
    higher = (scores > mine + tol).sum(axis=1)
    ties = (np.abs(scores - mine) <= tol).sum(axis=1) - 1
    rank = 1.0 + higher + 0.5 * ties
    top1 = np.where(higher == 0, 1.0 / (1.0 + ties), 0.0)
    return rank, top1


def per_finding_mean(values: np.ndarray, finding: np.ndarray, counted: Sequence[int]) -> tuple[float, dict[int, float]]:
    """Mean of ``values`` over the rows of each finding in ``counted``, then over those findings.

    values, finding: (M,); returns (macro mean, {finding: its mean}). NaN when no finding is counted.
    """
    per = {int(f): float(values[finding == f].mean()) for f in counted if (finding == f).any()}
    return (float(np.mean(list(per.values()))) if per else float("nan")), per


def bootstrap_per_finding(
    values: dict[str, np.ndarray],
    finding: np.ndarray,
    image: np.ndarray,
    counted: Sequence[int],
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """95% percentile CIs of the per-finding-averaged means, resampling whole images.

    values: name -> (M,) per-outline values; finding, image: (M,) int codes of each outline's
    finding and image. In a resample a counted finding with no outline is left out of the mean.
    """
    rng = np.random.default_rng(seed)
    images = np.unique(image)
    draws = rng.integers(0, len(images), size=(n_resamples, len(images)))
    counts = np.stack([np.bincount(d, minlength=len(images)) for d in draws]).astype(np.float64)
    pos = np.searchsorted(images, image)
    weights = counts[:, pos]  # (B, M)
    onehot = np.stack([(finding == f).astype(np.float64) for f in counted], axis=1)  # (M, F)
    denom = weights @ onehot
    out = {}
    for name, v in values.items():
        num = (weights * np.asarray(v, dtype=np.float64)[None]) @ onehot
        with np.errstate(invalid="ignore", divide="ignore"):
            per = np.where(denom > 0, num / np.where(denom > 0, denom, 1), np.nan)
        macro = np.nanmean(per, axis=1)
        low, high = np.nanpercentile(macro, [2.5, 97.5])
        out[name] = (float(low), float(high))
    return out


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of range(n) with no fixed point (n >= 2)."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 items")
    while True:
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return p


def mean_invariance(heatmaps: np.ndarray) -> np.ndarray:
    """(N,) per image, the mean Pearson correlation between the heatmaps of different prompts.

    heatmaps: (N, K, ...) with K >= 2. Constant maps leave their pairs out (NaN if none is left).
    """
    out = []
    for maps in np.asarray(heatmaps):
        r = correlation_matrix(maps)
        off = r[~np.eye(len(r), dtype=bool)]
        off = off[np.isfinite(off)]
        out.append(float(off.mean()) if off.size else float("nan"))
    return np.asarray(out)


def score_specificity(
    C: np.ndarray,  # noqa: N803 (the contrast tensor)
    outline_image: np.ndarray,
    outline_finding: np.ndarray,
    counted: Sequence[int],
    n_bootstrap: int = 1000,
    n_shuffles: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Top-1 and mean rank of the own prompt for the model and both nulls, from the contrast tensor.

    C: (N, K, M) from :func:`contrasts`; outline_image: (M,) index into N of each outline's image;
    outline_finding: (M,) index into K of its finding; counted: the finding indices averaged over.
    """
    m = np.arange(C.shape[2])
    own = C[outline_image, :, m]  # (M, K)
    rank, top1 = own_rank(own, outline_finding)
    out: dict[str, Any] = {}
    cis = bootstrap_per_finding(
        {"top1": top1, "rank": rank}, outline_finding, outline_image, counted, n_bootstrap, seed
    )
    t_mean, t_per = per_finding_mean(top1, outline_finding, counted)
    r_mean, r_per = per_finding_mean(rank, outline_finding, counted)
    out["model"] = {
        "top1": {"mean": t_mean, "ci": list(cis["top1"])},
        "mean_rank": {"mean": r_mean, "ci": list(cis["rank"])},
        "pooled": {"top1": float(top1.mean()), "mean_rank": float(rank.mean()), "n": len(m)},
        "per_finding": {int(f): {"top1": t_per[f], "mean_rank": r_per[f]} for f in t_per},
    }
    cm_rank, cm_top1 = own_rank(C.mean(axis=0).T, outline_finding)
    cis = bootstrap_per_finding(
        {"top1": cm_top1, "rank": cm_rank}, outline_finding, outline_image, counted, n_bootstrap, seed
    )
    out["class_mean_null"] = {
        "top1": {"mean": per_finding_mean(cm_top1, outline_finding, counted)[0], "ci": list(cis["top1"])},
        "mean_rank": {"mean": per_finding_mean(cm_rank, outline_finding, counted)[0], "ci": list(cis["rank"])},
        "pooled": {"top1": float(cm_top1.mean()), "mean_rank": float(cm_rank.mean())},
    }
    rng = np.random.default_rng(seed + 1)
    n_img = C.shape[0]
    tops, ranks = [], []
    for _ in range(n_shuffles if n_img >= 2 else 0):
        perm = derangement(n_img, rng)
        s_rank, s_top1 = own_rank(C[perm[outline_image], :, m], outline_finding)
        tops.append(per_finding_mean(s_top1, outline_finding, counted)[0])
        ranks.append(per_finding_mean(s_rank, outline_finding, counted)[0])
    if tops:
        tops_a, ranks_a = np.asarray(tops), np.asarray(ranks)
        out["shuffled_null"] = {
            "top1": {"mean": float(tops_a.mean()), "p95": float(np.percentile(tops_a, 95))},
            "mean_rank": {"mean": float(ranks_a.mean()), "p05": float(np.percentile(ranks_a, 5))},
            "draws": len(tops),
            "p_top1": float((1 + (tops_a >= t_mean).sum()) / (1 + len(tops))),
            "p_rank": float((1 + (ranks_a <= r_mean).sum()) / (1 + len(ranks))),
        }
    else:
        out["shuffled_null"] = None
    return out


def _nan_stat(values: np.ndarray, fn: Any) -> Any:  # noqa: ANN401
    """``fn`` of the finite values (a float or a list of floats); None when there is none (constant maps)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return None
    out = fn(v)
    return [float(x) for x in out] if np.ndim(out) else float(out)


# --- the evaluation -------------------------------------------------------------------------------
def specificity_prompts(
    candidates: Sequence[str], prompts: Mapping[str, Sequence[EvalPrompt | str]] | None = None
) -> dict[str, str]:
    """One prompt per candidate finding: the first ``simple`` one of the prompt file or presets, else the first."""
    given = {finding_key(k): v for k, v in (prompts or {}).items()}
    out = {}
    for f in candidates:
        items = [p if isinstance(p, EvalPrompt) else EvalPrompt(p, "simple") for p in given.get(f, [])]
        items = items or default_prompts(f)
        simple = [p for p in items if p.kind == "simple"]
        out[f] = (simple or items)[0].text
    return out


def evaluate_specificity(
    predictors: Sequence[Predictor],
    dataset: EvalDataset,
    prompts: Mapping[str, Sequence[EvalPrompt | str]] | None = None,
    candidates: Sequence[str] | None = None,
    min_outlines: int = 3,
    n_bootstrap: int = 1000,
    n_shuffles: int = 1000,
    seed: int = 0,
    grid: int = 128,
    batch_size: int = 8,
    progress: str | Progress = "none",
) -> dict[str, Any]:
    """Prompt specificity and invariance of each predictor on ``dataset`` (see the module doc).

    Args:
        predictors: models and baselines (a prompt-independent baseline scores exactly chance).
        dataset: several findings outlined on the same images (e.g. ``chestx-det-nih``).
        prompts: finding -> prompts; each finding's first ``simple`` prompt is used (presets otherwise).
        candidates: the K findings whose prompts compete (default: ``dataset.label_set`` or its findings).
        min_outlines: findings with fewer outlines are not averaged over (they still compete).
        n_bootstrap, n_shuffles, seed: CI resamples of images, shuffled-image draws, their seed.
        grid: side of the raster heatmaps and outlines are compared on.

    Returns a JSON-ready dict (``results``: method -> model / class_mean_null / shuffled_null /
    invariance / per_prompt). Raises :class:`DataError` when fewer than 2 candidates, 2 usable
    images or one counted finding remain.
    """
    candidates = [finding_key(c) for c in (candidates or dataset.label_set or dataset.findings)]
    if len(candidates) < 2:
        raise DataError("prompt specificity needs at least 2 findings to compare", dataset.root)
    texts = specificity_prompts(candidates, prompts)
    prompt_list = [texts[c] for c in candidates]
    index = {c: i for i, c in enumerate(candidates)}
    samples = list(dataset.samples)
    heat: dict[str, list[np.ndarray]] = {p.name: [] for p in predictors}
    masks: list[np.ndarray] = []
    o_image: list[int] = []
    o_finding: list[int] = []
    o_id: list[tuple[str, str]] = []
    kept_ids: list[str] = []
    skipped: list[dict[str, Any]] = []
    own_progress = not isinstance(progress, Progress)
    bar = Progress(len(samples), progress, desc="specificity") if own_progress else progress
    try:
        for start in range(0, len(samples), max(1, batch_size)):
            batch = samples[start : start + max(1, batch_size)]
            images = []
            for s in batch:
                try:
                    im = read_image(s.image)
                except AFLocError as err:
                    skipped.append({"item": s.image_id, "reason": err.problem})
                    continue
                if im.is_volume:
                    skipped.append({"item": s.image_id, "reason": "3D volume"})
                    continue
                images.append((s, im))
            for s, im in images:
                shape = tuple(im.array.shape)
                for f, source in s.positives.items():
                    if f not in index:
                        continue
                    try:
                        target = load_target(source, shape)  # type: ignore[arg-type]
                    except TargetError as err:
                        skipped.append({"item": s.image_id, "finding": f, "reason": err.problem})
                        continue
                    cells = outline_cells(target, grid)
                    if cells.all():
                        skipped.append({"item": s.image_id, "finding": f, "reason": "outline covers the image"})
                        continue
                    masks.append(cells.reshape(-1))
                    o_image.append(len(kept_ids))
                    o_finding.append(index[f])
                    o_id.append((s.image_id, f))
                kept_ids.append(s.image_id)
            if images:
                ims = [im for _, im in images]
                for pred in predictors:
                    call = ["(prompt-independent baseline)"] if pred.prompt_independent else prompt_list
                    out = pred(ims, call)
                    for h in out.heatmaps:
                        h = np.asarray(h, dtype=np.float32)
                        if pred.prompt_independent:
                            h = np.repeat(h[:1], len(prompt_list), axis=0)
                        heat[pred.name].append(np.stack([downsample(x, grid) for x in h]).reshape(len(h), -1))
            bar.update(len(batch), message=batch[-1].image_id)
    finally:
        if own_progress:
            bar.close()
    o_image_a, o_finding_a = np.asarray(o_image), np.asarray(o_finding)
    n_outlines = {c: int((o_finding_a == i).sum()) for c, i in index.items()}
    counted = [index[c] for c in candidates if n_outlines[c] >= min_outlines]
    if len(kept_ids) < 2 or not counted:
        raise DataError(
            f"prompt specificity needs >= 2 images and a finding with >= {min_outlines} outlines "
            f"(found {len(kept_ids)} images; outlines: {n_outlines})",
            dataset.root,
        )
    outlines = np.stack(masks)
    lung = lung_field_map((grid, grid)).reshape(-1)
    results: dict[str, Any] = {}
    k = len(candidates)
    for pred in predictors:
        maps = np.stack(heat[pred.name])  # (N, K, G)
        scored = score_specificity(
            contrasts(maps, outlines), o_image_a, o_finding_a, counted, n_bootstrap, n_shuffles, seed
        )
        for part in ("model", "class_mean_null"):
            if "per_finding" in scored[part]:
                scored[part]["per_finding"] = {
                    candidates[f]: {"n": n_outlines[candidates[f]], **v} for f, v in scored[part]["per_finding"].items()
                }
        entry: dict[str, Any] = {**scored}
        if not pred.prompt_independent:
            inv = mean_invariance(maps)
            finite = inv[np.isfinite(inv)]
            low, high = bootstrap_mean_ci(finite, n_bootstrap, seed) if finite.size else (None, None)
            entry["invariance"] = {
                "mean": float(finite.mean()) if finite.size else None,
                "ci": [low, high],
                "n": int(finite.size),
            }
            spec = np.stack([1.0 - mean_other_correlation(x) for x in maps])  # (N, K)
            lung_r = np.stack([correlation_matrix(np.concatenate([x, lung[None]]))[-1, :-1] for x in maps])
            entry["per_prompt"] = {
                candidates[g]: {
                    "prompt": prompt_list[g],
                    "specificity_mean": _nan_stat(spec[:, g], np.mean),
                    "lung_correlation_mean": _nan_stat(lung_r[:, g], np.mean),
                    "lung_correlation_p10_p50_p90": _nan_stat(lung_r[:, g], lambda v: np.percentile(v, [10, 50, 90])),
                    "warned_fraction": float(
                        np.mean(
                            (lung_r[:, g] >= LUNG_WARN_R) | (np.nan_to_num(spec[:, g], nan=9.0) <= SPECIFICITY_WARN)
                        )
                    ),
                }
                for g in range(k)
            }
        else:
            entry["invariance"] = {"mean": 1.0, "ci": [1.0, 1.0], "n": len(kept_ids), "note": "prompt-independent"}
        results[pred.name] = entry
    return {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "dataset": {"name": dataset.name, "format": dataset.format, "root": str(dataset.root), "split": dataset.split},
        "protocol": {
            "contrast": "mean heat inside the outline minus mean heat outside it, per candidate prompt",
            "rank": "of the finding's own prompt among the K candidates (1 = highest; ties share the average rank)",
            "top1": "1 when the own prompt is highest (a tie of t at the top scores 1/t), else 0",
            "average": f"per finding (findings with >= {min_outlines} outlines), then over findings",
            "class_mean_null": "each prompt's heatmap averaged over every image of the set",
            "shuffled_null": "each image's outlines scored with another image's heatmaps (random derangement)",
            "invariance": "per image, mean Pearson r between different prompts' heatmaps; mean over images",
            "grid": grid,
            "bootstrap": {"resamples": n_bootstrap, "seed": seed, "ci": "95% percentile, images resampled"},
            "shuffles": n_shuffles,
        },
        "candidates": candidates,
        "prompts": texts,
        "n_images": len(kept_ids),
        "outlines": n_outlines,
        "counted": [candidates[f] for f in counted],
        "chance": {"top1": 1.0 / k, "mean_rank": (k + 1) / 2.0},
        "methods": [p.describe() for p in predictors],
        "results": results,
        "skipped": skipped,
    }


def _ci(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("mean") is None:
        return "n/a"
    low, high = entry.get("ci", [None, None])
    if low is None:
        return f"{entry['mean']:.3f}"
    return f"{entry['mean']:.3f} [{low:.3f}, {high:.3f}]"


def specificity_markdown(spec: dict[str, Any]) -> str:
    """The specificity result as a markdown section (one table: methods x top-1, rank, nulls, invariance)."""
    ch = spec["chance"]
    lines = [
        f"## Prompt specificity ({spec['dataset']['name']}: {spec['n_images']} images, "
        f"{len(spec['candidates'])} candidate prompts)",
        "",
        f"Averaged per finding over {len(spec['counted'])} findings with enough outlines "
        f"({', '.join(spec['counted'])}). Chance: top-1 {ch['top1']:.3f}, mean rank {ch['mean_rank']:.1f}. "
        "Shuffled-image null: mean and 95th percentile of top-1 (5th percentile of the rank) over "
        f"{spec['protocol']['shuffles']} draws.",
        "",
        "| method | top-1 | mean rank | class-mean null top-1 / rank | shuffled null top-1 (p95) / rank (p5) "
        "| invariance r |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in spec["results"].items():
        cm = r["class_mean_null"]
        sh = r.get("shuffled_null")
        shuffled = (
            f"{sh['top1']['mean']:.3f} ({sh['top1']['p95']:.3f}) / {sh['mean_rank']['mean']:.2f} "
            f"({sh['mean_rank']['p05']:.2f})"
            if sh
            else "n/a"
        )
        lines.append(
            f"| {name} | {_ci(r['model']['top1'])} | {_ci(r['model']['mean_rank'])} | "
            f"{cm['top1']['mean']:.3f} / {cm['mean_rank']['mean']:.2f} | {shuffled} | {_ci(r['invariance'])} |"
        )
    lines.append("")
    for name, r in spec["results"].items():
        per = r["model"].get("per_finding", {})
        if per and "per_prompt" in r:
            lines += [
                f"Per finding ({name}): "
                + "; ".join(
                    f"{f} (n {v['n']}) top-1 {v['top1']:.2f}, rank {v['mean_rank']:.1f}" for f, v in per.items()
                ),
                "",
            ]
    lines += ["Prompts: " + "; ".join(f'{f}: "{t}"' for f, t in spec["prompts"].items()), ""]
    return "\n".join(lines)
