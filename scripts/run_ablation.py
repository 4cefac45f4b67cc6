"""Issue 4's ablation: one recipe, four loss-level settings, evaluated side by side on covid-cxr dev.

    python scripts/run_ablation.py --data ../shared/data --out runs/ablation [--device cuda] [--set KEY=VALUE]

Trains configs/ablation/base.yaml four times (global-only, sentence-only, word+global as in
GLoRIA, all three levels), each from the same seed, then runs `afloc evaluate` once with the four
final models and the constant and prior baselines (simple and precise prompts for ground-glass
opacity and consolidation). Writes <out>/evaluation/{evaluation.md,evaluation.json}.
The small CPU recipe: --set model.image_size=128 --set model.encoder_input_size=null
--set optim.epochs=8 --set optim.batch_size=32 --device cpu. `--base from_grounded` runs the
four settings as the default model's stage 2, from its grounded pre-training.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_default_model import REPO, resolved_config, run  # noqa: E402

VARIANTS = {
    "global_only": {"model.weight_word": 0.0, "model.weight_sentence": 0.0, "model.weight_global": 1.0},
    "sentence_only": {"model.weight_word": 0.0, "model.weight_sentence": 1.0, "model.weight_global": 0.0},
    "word_global": {"model.weight_word": 1.0, "model.weight_sentence": 0.0, "model.weight_global": 1.0},
    "all_three": {"model.weight_word": 1.0, "model.weight_sentence": 1.0, "model.weight_global": 1.0},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "ablation")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default="base", help="config in configs/ablation/ (base: from ImageNet)")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    py, env = sys.executable, dict(os.environ, PYTHONUNBUFFERED="1")
    common = {"runtime.device": args.device, "runtime.seed": args.seed}
    for item in args.set:
        key, value = item.split("=", 1)
        common[key] = yaml.safe_load(value)
    models, timing = [], {}
    for name in args.variants:
        run_dir = out / "runs" / name
        config = resolved_config(
            REPO / "configs" / "ablation" / f"{args.base}.yaml",
            {"data": str(args.data.resolve())},
            out / "configs" / f"{name}.yaml",
            {**common, **VARIANTS[name]},
        )
        shutil.rmtree(run_dir, ignore_errors=True)
        t = time.time()
        run(
            [py, "-m", "training", "run", "--config", str(config), "--run-dir", str(run_dir), "--progress", "none"],
            out / f"train_{name}.log",
            env,
        )
        timing[name] = time.time() - t
        # name the model folder after the variant so the evaluation table says which is which
        named = out / "models" / name
        shutil.rmtree(named, ignore_errors=True)
        shutil.copytree(run_dir / "model", named)
        models += ["--model", str(named)]
    run(
        [
            py,
            "-m",
            "afloc_engine",
            "evaluate",
            *models,
            "--data",
            str(args.data.resolve() / "covid-cxr"),
            "--split",
            "dev",
            "--out",
            str(out / "evaluation"),
            "--device",
            args.device,
            "--seed",
            str(args.seed),
            "--progress",
            "none",
        ],
        out / "evaluate.log",
        env,
    )
    (out / "timing.json").write_text(json.dumps({"train_s": timing, "settings": common}, indent=2))
    print((out / "evaluation" / "evaluation.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
