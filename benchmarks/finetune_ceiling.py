"""How far can a few masks move ground-glass Dice? Ceilings of the zero-shot heatmap on covid-cxr dev.

The few-shot target (issue 6) is Dice(5 masks) >= Dice(zero-shot) + 0.15. This measures, on the
default model's heatmaps for "Findings suggesting ground glass opacity" (full resolution, every
dev image with a GGO mask), what re-using that heatmap can reach at best:

* ``threshold``: Dice of heatmap > t for one t for all images, t in {0.1, ..., 0.7};
* ``calibrated``: t chosen from k drawn masks (the t with the best mean Dice on them), scored on the
  other patients' images, mean over 200 draws per k: what the masks buy by recalibrating the map;
* ``oracle per image``: the best t for each image, chosen with its own mask (an upper bound for any
  monotone recalibration of the map, however learnt);
* ``oracle lungs``: the radiologists' lung masks (left + right; not available to a user) alone,
  and intersected with heatmap > t: an upper bound for "keep the heat inside the lungs".

    python benchmarks/finetune_ceiling.py [--data ../shared/data] [--out docs/results/finetune_ceiling]

Writes ``OUT.json`` and ``OUT.md``. Real data is only read.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from finetune import DEFAULT_DATA, MASK_CLASS, draw_split, load_dev, localize_all, mask_dice  # noqa: E402

import afloc_engine  # noqa: E402
from afloc_engine.finetune import default_prompt  # noqa: E402

THRESHOLDS = [round(float(t), 2) for t in np.arange(0.1, 0.75, 0.05)]
ORACLE_THRESHOLDS = [round(float(t), 2) for t in np.arange(-0.5, 0.96, 0.05)]


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = afloc_engine.load_model(args.model, "cpu")
    items = load_dev(args.data, MASK_CLASS)
    lungs = {}
    for side in ("left_lung", "right_lung"):
        for it in load_dev(args.data, side):
            lungs[it["id"]] = lungs.get(it["id"], False) | it["mask"]
    heats = localize_all(model, items, default_prompt("ground glass opacity"))
    truth = [it["mask"] for it in items]
    per_t = np.array([[mask_dice(h > t, m) for t in THRESHOLDS] for h, m in zip(heats, truth)])  # (n, T)
    oracle = [max(mask_dice(h > t, m) for t in ORACLE_THRESHOLDS) for h, m in zip(heats, truth)]
    with_lungs = [it for it in items if it["id"] in lungs]
    lung_heats = [h for h, it in zip(heats, items) if it["id"] in lungs]
    lung_only = [mask_dice(lungs[it["id"]], it["mask"]) for it in with_lungs]
    lung_and = {
        t: float(np.mean([mask_dice((h > t) & lungs[it["id"]], it["mask"]) for h, it in zip(lung_heats, with_lungs)]))
        for t in (0.2, 0.3, 0.4, 0.5)
    }
    model_t = THRESHOLDS.index(round(model.config.threshold, 2))
    calibrated = {}
    for k in args.ks:
        rows = []
        for d in range(args.draws):
            chosen, ev = draw_split(items, k, d, args.seed)
            best = int(per_t[chosen].mean(0).argmax())
            rows.append((per_t[ev, model_t].mean(), per_t[ev, best].mean(), THRESHOLDS[best]))
        a = np.array(rows)
        calibrated[k] = {
            "zero_shot_dice": float(a[:, 0].mean()),
            "calibrated_dice": float(a[:, 1].mean()),
            "calibrated_sd": float(a[:, 1].std()),
            "median_threshold": float(np.median(a[:, 2])),
        }
    return {
        "model": model.model_id,
        "images": len(items),
        "images_with_lungs": len(with_lungs),
        "model_threshold": model.config.threshold,
        "dice_by_threshold": {f"{t:g}": float(per_t[:, i].mean()) for i, t in enumerate(THRESHOLDS)},
        "oracle_per_image_threshold": float(np.mean(oracle)),
        "oracle_lungs_only": float(np.mean(lung_only)),
        "oracle_heat_and_lungs": {f"{t:g}": v for t, v in lung_and.items()},
        "calibrated": {str(k): v for k, v in calibrated.items()},
        "draws": args.draws,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }


def markdown(r: dict) -> str:
    t = r["model_threshold"]
    best_t = max(r["dice_by_threshold"], key=r["dice_by_threshold"].get)
    zs = r["dice_by_threshold"][f"{t:g}"]
    lines = [
        f"Ceilings of the zero-shot GGO heatmap, covid-cxr dev ({r['images']} images), model `{r['model']}`.",
        "",
        "| what | mean Dice | vs the model threshold |",
        "| --- | --- | --- |",
        f"| heatmap > {t:g} (the model threshold) | {zs:.3f} | 0 |",
        f"| heatmap > {best_t} (best single threshold, chosen on these images) | "
        f"{r['dice_by_threshold'][best_t]:.3f} | {r['dice_by_threshold'][best_t] - zs:+.3f} |",
    ]
    for k, c in r["calibrated"].items():
        lines.append(
            f"| threshold chosen on k = {k} masks ({r['draws']} draws; median t {c['median_threshold']:g}), other "
            f"patients | {c['calibrated_dice']:.3f} ± {c['calibrated_sd']:.3f} | "
            f"{c['calibrated_dice'] - c['zero_shot_dice']:+.3f} (same images) |"
        )
    lines.append(
        f"| **oracle**: best threshold per image, from its own mask | {r['oracle_per_image_threshold']:.3f} | "
        f"{r['oracle_per_image_threshold'] - zs:+.3f} |"
    )
    lines.append(
        f"| **oracle**: radiologists' lung masks alone ({r['images_with_lungs']} images) | "
        f"{r['oracle_lungs_only']:.3f} | {r['oracle_lungs_only'] - zs:+.3f} |"
    )
    best_l = max(r["oracle_heat_and_lungs"], key=r["oracle_heat_and_lungs"].get)
    lines.append(
        f"| **oracle**: heatmap > {best_l} inside the radiologists' lung masks | "
        f"{r['oracle_heat_and_lungs'][best_l]:.3f} | {r['oracle_heat_and_lungs'][best_l] - zs:+.3f} |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5, 10])
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "finetune_ceiling")
    args = p.parse_args(argv)
    if not (args.data / "covid-cxr" / "masks.csv").is_file():
        p.error(f"covid-cxr not found under {args.data} (set --data or AFLOC_SHARED_DATA)")
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
