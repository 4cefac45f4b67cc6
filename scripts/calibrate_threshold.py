"""Calibrate a model's default mask threshold on a dataset with masks (covid-cxr dev by default).

For every (image, finding) pair with a radiologist's mask, the model's heatmap for the preset
prompt ("Findings suggesting <finding>", what the Slicer panel's preset list gives) is thresholded
at a grid of values in [-1, 1]. Two candidates are reported:

- ``area_matched``: the threshold at which the mean mask area (share of the image) equals the
  radiologists' mean mask area, so a default mask is of the size a radiologist would draw;
- ``best_dice``: the threshold of the best mean Dice.

The recommended threshold is ``area_matched`` (written to ``--write-config`` when given).

    python scripts/calibrate_threshold.py --data ../shared/data/covid-cxr --split dev \
        --out benchmarks/results/threshold_calibration.json [--write-config afloc_engine/weights/default/config.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GRID = np.round(np.arange(-0.5, 0.951, 0.01), 2)
"""Thresholds tried (heatmaps lie in [-1, 1])."""


def calibrate(model: object, data: object, findings: list[str], grid: np.ndarray = GRID) -> dict:
    """Mean mask share and mean Dice over (image, finding) pairs at each threshold of ``grid``.

    Returns a JSON-ready dict: per threshold ``mean_area`` (share of the image, 0..1) and
    ``mean_dice``, the radiologists' ``target_mean_area``, and the two candidate thresholds.
    """
    from afloc_engine.evaluation import load_target
    from afloc_engine.io import read_image
    from afloc_engine.prompts import TEMPLATE

    areas, dices, targets, pairs = [], [], [], []
    for sample in data.samples:
        wanted = [f for f in findings if f in sample.positives]
        if not wanted:
            continue
        image = read_image(sample.image)
        prompts = [TEMPLATE.format(finding=f.replace("_", " ")) for f in wanted]
        result = model.localize(image, prompts)
        for finding, heat in zip(wanted, result.heatmaps):
            target = load_target(sample.positives[finding], heat.shape)
            # pixels above each threshold, overall and inside the target (sorted values: no (T, H, W) masks)
            everywhere = np.sort(heat.ravel())
            inside = np.sort(heat[target])
            size = everywhere.size - np.searchsorted(everywhere, grid, side="right")
            inter = inside.size - np.searchsorted(inside, grid, side="right")
            dices.append(2 * inter / np.maximum(size + target.sum(), 1))
            areas.append(size / target.size)
            targets.append(target.sum() / target.size)
            pairs.append((sample.image_id, finding))
    if not pairs:
        raise SystemExit("no (image, finding) pair with a mask in this split")
    mean_area = np.mean(areas, axis=0)
    mean_dice = np.mean(dices, axis=0)
    target_area = float(np.mean(targets))
    area_matched = float(grid[int(np.argmin(np.abs(mean_area - target_area)))])
    best = int(np.argmax(mean_dice))
    at = int(np.where(grid == area_matched)[0][0])
    return {
        "pairs": len(pairs),
        "images": len({p[0] for p in pairs}),
        "findings": findings,
        "target_mean_area": round(target_area, 4),
        "area_matched": {
            "threshold": area_matched,
            "mean_area": round(float(mean_area[at]), 4),
            "mean_dice": round(float(mean_dice[at]), 4),
        },
        "best_dice": {
            "threshold": float(grid[best]),
            "mean_area": round(float(mean_area[best]), 4),
            "mean_dice": round(float(mean_dice[best]), 4),
        },
        "grid": [
            {"threshold": float(t), "mean_area": round(float(a), 4), "mean_dice": round(float(d), 4)}
            for t, a, d in zip(grid, mean_area, mean_dice)
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "covid-cxr")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--finding", action="append", default=None, help="findings (default: the dataset's)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "threshold_calibration.json")
    parser.add_argument("--write-config", type=Path, default=None, help="a model's config.json to store it in")
    args = parser.parse_args(argv)

    import afloc_engine
    from afloc_engine.evaluation import load_dataset

    start = time.monotonic()
    model = afloc_engine.load_model(args.model, "cpu")
    data = load_dataset(args.data, split=args.split)
    findings = args.finding or list(data.default_findings)
    report = calibrate(model, data, findings)
    report.update(
        {
            "model_id": model.model_id,
            "data": str(args.data.name),
            "split": args.split,
            "previous_threshold": float(model.config.threshold),
            "recommended": report["area_matched"]["threshold"],
            "seconds": round(time.monotonic() - start, 1),
            "host": platform.node(),
            "command": "python scripts/calibrate_threshold.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.write_config is not None:
        config = json.loads(args.write_config.read_text())
        config["model"]["threshold"] = report["recommended"]
        args.write_config.write_text(json.dumps(config, indent=2) + "\n")
    summary = {k: report[k] for k in ("pairs", "target_mean_area", "area_matched", "best_dice", "recommended")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
