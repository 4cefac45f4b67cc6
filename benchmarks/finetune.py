"""Few-shot fine-tuning benchmark on covid-cxr dev, ground-glass opacity.

For k = 1, 3, 5, 10 masks, over several random draws of the k training images: Dice on the
remaining dev images with a ground-glass-opacity mask (images of the drawn patients are left out
of the evaluation, so no patient is on both sides) for

* zero-shot: the model's heatmap for "Findings suggesting ground glass opacity", mask = heatmap > t;
* fine-tune: an adapter trained on the k masks (:func:`afloc_engine.finetune`), same threshold;
* U-Net: a MONAI U-Net trained from scratch on the same k masks (same augmentation), p > 0.5;

as mean +- sd over the draws of each draw's mean Dice; also the paper's Dice averaged over
thresholds {0.1, ..., 0.5} for the two heatmap methods, and the wall time of each fine-tune.

    .venv/bin/python benchmarks/finetune.py --model MODEL --device cuda --out benchmarks/results/finetune
    .venv/bin/python benchmarks/finetune.py --ks 1 3 --draws 1 --max-eval 6 --unet-steps 20 --device cpu  # quick

Writes ``OUT.json`` and ``OUT.md`` (a markdown table). Real data: ``../shared/data`` (or
``$AFLOC_SHARED_DATA``); it is only read.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import cpu_model, load_average, machine_info  # noqa: E402

import afloc_engine  # noqa: E402
from afloc_engine.finetune import default_prompt  # noqa: E402
from afloc_engine.finetune.data import FinetuneAugmentConfig, augment_view  # noqa: E402
from afloc_engine.io import read_image  # noqa: E402
from afloc_engine.metrics import THRESHOLDS, iou_dice_at_thresholds  # noqa: E402
from afloc_engine.transforms import Letterbox, prepare_image  # noqa: E402

MASK_CLASS = "ground_glass_opacity"
DEFAULT_DATA = Path(os.environ.get("AFLOC_SHARED_DATA", REPO.parent / "shared" / "data"))


def load_dev(data: Path, mask_class: str = MASK_CLASS) -> list[dict]:
    """Dev images with a mask of ``mask_class``: ``{id, patient, image, mask}`` (arrays read)."""
    root = data / "covid-cxr"
    pairs = {r["image_id"]: r for r in csv.DictReader((root / "pairs.csv").open())}
    items = []
    for row in csv.DictReader((root / "masks.csv").open()):
        meta = pairs[row["image_id"]]
        if row["class"] != mask_class or meta["split"] != "dev":
            continue
        image = read_image(root / meta["image"])
        mask = read_image(root / row["mask"]).array > 0
        items.append({"id": row["image_id"], "patient": meta["patient_id"], "image": image, "mask": mask})
    items.sort(key=lambda it: it["id"])
    return items


def draw_split(items: list[dict], k: int, draw: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Draw ``draw`` of k training images: (their indices, sorted; the indices of the evaluation images,
    every image of another patient). Seeded by (seed, k, draw), so every script draws the same sets."""
    rng = np.random.default_rng(seed + 1000 * k + draw)
    chosen = sorted(rng.choice(len(items), size=k, replace=False).tolist())
    patients = {items[i]["patient"] for i in chosen}
    evaluation = [i for i in range(len(items)) if i not in chosen and items[i]["patient"] not in patients]
    return chosen, evaluation


def mask_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (0 when both are empty)."""
    return float(2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum()))


def dice_at(heat: np.ndarray, mask: np.ndarray, threshold: float) -> float:
    """Dice of heat > threshold against the mask."""
    return mask_dice(heat > threshold, mask)


def heat_scores(heat: np.ndarray, mask: np.ndarray, threshold: float) -> tuple[float, float]:
    """(Dice at the model threshold, Dice averaged over the paper's thresholds)."""
    return dice_at(heat, mask, threshold), float(iou_dice_at_thresholds(heat, mask, THRESHOLDS)[1].mean())


def localize_all(model, items: list[dict], prompt: str, adapter=None, batch: int = 8) -> list[np.ndarray]:
    heats = []
    for start in range(0, len(items), batch):
        part = items[start : start + batch]
        results = model.localize_batch([it["image"] for it in part], prompt, adapter=adapter)
        heats += [r.heatmaps[0] for r in results]
    return heats


# --- the U-Net baseline ----------------------------------------------------------------------------
def unet_canvas(item: dict, size: int) -> tuple[torch.Tensor, torch.Tensor, Letterbox]:
    """(1, S, S) image in [0, 1] and (1, S, S) mask on the letterboxed canvas."""
    x, box = prepare_image(item["image"].array, size, item["image"].window, 0.0, 1.0, 1)
    m = box.apply(torch.from_numpy(item["mask"].astype(np.float32))[None])
    return x, m, box


def train_unet(train: list[dict], size: int, steps: int, batch: int, seed: int, device: torch.device):
    """A MONAI U-Net from scratch on the k examples (Dice + focal, Adam, the fine-tune's augmentation)."""
    from monai.losses import DiceFocalLoss
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    aug = FinetuneAugmentConfig()
    net = UNet(2, 1, 1, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2).to(device)
    canvases = [unet_canvas(it, size)[:2] for it in train]
    loss_fn = DiceFocalLoss(sigmoid=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    net.train()
    for _ in range(steps):
        xs, ms = [], []
        for i in rng.integers(0, len(canvases), size=batch):
            x, m = canvases[i]
            xa, ma = augment_view(x[0], m, rng, aug)
            xs.append(xa[None])
            ms.append((ma > 0.5).float())
        x = (torch.stack(xs).to(device) - 0.5) / 0.5
        loss = loss_fn(net(x), torch.stack(ms).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def unet_predict(net, item: dict, size: int, device: torch.device) -> np.ndarray:
    x, _, box = unet_canvas(item, size)
    prob = torch.sigmoid(net(((x - 0.5) / 0.5)[None].to(device)))[0].float().cpu()
    return (box.invert(prob)[0] > 0.5).numpy()


# --- the benchmark ---------------------------------------------------------------------------------
def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = afloc_engine.load_model(args.model, args.device)
    device = model.device
    finding = args.mask_class.replace("_", " ")
    prompt = default_prompt(finding)
    t = model.config.threshold
    items = load_dev(args.data, args.mask_class)
    print(f"{len(items)} dev images with {args.mask_class} masks; model {model.model_id}", flush=True)
    zs: dict[int, tuple[float, float]] = {}  # zero-shot scores per image, computed when first needed
    draws = []
    for k in args.ks:
        for d in range(args.draws):
            chosen, evaluation = draw_split(items, k, d, args.seed)
            if args.max_eval:
                evaluation = evaluation[: args.max_eval]
            if not evaluation:
                print(f"k={k} draw {d}: no evaluation image left; skipped")
                continue
            train = [items[i] for i in chosen]
            examples = [(it["image"], it["mask"], it["id"]) for it in train]
            start = time.perf_counter()
            adapter = afloc_engine.finetune(model, examples, finding, seed=args.seed + d, epochs=args.epochs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            ft_seconds = time.perf_counter() - start
            ev = [items[i] for i in evaluation]
            todo = [i for i in evaluation if i not in zs]
            for i, h in zip(todo, localize_all(model, [items[i] for i in todo], prompt)):
                zs[i] = heat_scores(h, items[i]["mask"], t)
            ft = [heat_scores(h, it["mask"], t) for h, it in zip(localize_all(model, ev, prompt, adapter), ev)]
            record = {
                "k": k,
                "draw": d,
                "train_ids": [it["id"] for it in train],
                "n_eval": len(ev),
                "zero_shot_dice": float(np.mean([zs[i][0] for i in evaluation])),
                "zero_shot_mean_dice": float(np.mean([zs[i][1] for i in evaluation])),
                "finetune_dice": float(np.mean([s[0] for s in ft])),
                "finetune_mean_dice": float(np.mean([s[1] for s in ft])),
                "finetune_seconds": ft_seconds,
                "finetune_epochs_run": adapter.metrics["epochs_run"],
                "finetune_phase_seconds": adapter.metrics["seconds"],
                "blend": adapter.config.blend,
                "validation": adapter.metrics.get("validation"),
                "warnings": adapter.metrics.get("warnings", []),
            }
            if args.unet_steps > 0:
                start = time.perf_counter()
                net = train_unet(train, args.unet_size, args.unet_steps, args.unet_batch, args.seed + d, device)
                record["unet_seconds"] = time.perf_counter() - start
                record["unet_dice"] = float(
                    np.mean([dice_at(unet_predict(net, it, args.unet_size, device), it["mask"], 0.5) for it in ev])
                )
            draws.append(record)
            print(
                f"k={k} draw {d}: zero-shot {record['zero_shot_dice']:.3f}  fine-tune {record['finetune_dice']:.3f}"
                f" ({ft_seconds:.1f} s)  U-Net {record.get('unet_dice', float('nan')):.3f}  on {len(ev)} images",
                flush=True,
            )
            save(args, summarise(args, model, draws, prompt))  # partial results survive a time limit
    return summarise(args, model, draws, prompt)


def summarise(args: argparse.Namespace, model, draws: list[dict], prompt: str) -> dict:
    """The report: per-k mean +- sd over ``draws`` and every draw's record."""
    device, t, finding = model.device, model.config.threshold, args.mask_class.replace("_", " ")
    summary = []
    for k in args.ks:
        rows = [r for r in draws if r["k"] == k]
        if not rows:
            continue
        entry = {"k": k, "draws": len(rows), "n_eval_mean": float(np.mean([r["n_eval"] for r in rows]))}
        for key in (
            "zero_shot_dice",
            "zero_shot_mean_dice",
            "finetune_dice",
            "finetune_mean_dice",
            "unet_dice",
            "finetune_seconds",
            "unet_seconds",
        ):
            entry[key] = mean_sd([r.get(key) for r in rows])
        summary.append(entry)
    return {
        "benchmark": f"few-shot fine-tuning, covid-cxr dev, {finding}",
        "model_id": model.model_id,
        "model_trained": model.info.trained,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "machine": machine_info(str(device)),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "threshold": t,
        "prompt": prompt,
        "protocol": "k training images drawn at random from the dev images with a GGO mask; evaluation on the "
        "other dev GGO images of other patients; Dice of mask = heatmap > threshold (U-Net: p > 0.5) per image, "
        "averaged per draw; mean +- sd over draws",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": summary,
        "draws": draws,
    }


def _fmt(pair: tuple[float | None, float | None], digits: int = 3) -> str:
    mean, sd = pair
    return "n/a" if mean is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def markdown(result: dict) -> str:
    lines = [
        f"Few-shot fine-tuning, covid-cxr dev, {result['prompt']!r}: model `{result['model_id']}` "
        f"(trained: {result['model_trained']}), {result['device_name']} ({result['device']}, "
        f"{result['torch_threads']} torch threads). Dice at threshold {result['threshold']} (U-Net: p > 0.5), "
        "mean ± sd over draws; in brackets the Dice averaged over thresholds 0.1-0.5.",
        "",
        "| k | draws | eval images | zero-shot Dice | fine-tune Dice | U-Net (scratch) Dice | fine-tune s | U-Net s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    if not result["model_trained"]:
        lines[1:1] = [
            "",
            "**The model is untrained (random weights): these numbers only check that the pipeline runs.**",
        ]
    for e in result["summary"]:
        lines.append(
            f"| {e['k']} | {e['draws']} | {e['n_eval_mean']:.0f} | {_fmt(e['zero_shot_dice'])} "
            f"({_fmt(e['zero_shot_mean_dice'])}) | {_fmt(e['finetune_dice'])} ({_fmt(e['finetune_mean_dice'])}) | "
            f"{_fmt(e['unet_dice'])} | {_fmt(e['finetune_seconds'], 1)} | {_fmt(e['unet_seconds'], 1)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="model name or folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    p.add_argument("--mask-class", default=MASK_CLASS, help="covid-cxr mask class (default: ground_glass_opacity)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5, 10])
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="fine-tune epochs (default: the engine's auto)")
    p.add_argument("--max-eval", type=int, default=0, help="evaluate on at most this many images (0: all)")
    p.add_argument("--unet-steps", type=int, default=600, help="U-Net training steps (0: skip the U-Net)")
    p.add_argument("--unet-size", type=int, default=256)
    p.add_argument("--unet-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "finetune", help="OUT.json/OUT.md")
    args = p.parse_args(argv)
    if not (args.data / "covid-cxr" / "masks.csv").is_file():
        p.error(f"covid-cxr not found under {args.data} (set --data or AFLOC_SHARED_DATA)")
    machine = machine_info(args.device)  # the load average before the run ...
    result = run(args)
    result["machine"] = {**machine, "device": result["device"], "load_average_end": load_average()}  # ... and after
    save(args, result)
    print(markdown(result))
    return 0


def save(args: argparse.Namespace, result: dict) -> None:
    """Write ``OUT.json`` and ``OUT.md``."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    sys.exit(main())
