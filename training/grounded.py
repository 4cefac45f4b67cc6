"""Grounded pre-training on synthetic lesions: teach the deep map where each lesion phrase points.

Synthetic pairs (:mod:`training.synthetic`) come with the positions of their lesions. This stage
uses them directly, as pre-training only (never evaluation, never real masks):

* **local**: for every deep grid cell and lesion kind k, ``scale * cos(v_d, t_k) + bias`` is
  trained (binary cross-entropy) to match the fraction of the cell covered by a lesion of kind k,
  where ``t_k`` is the projected embedding of a paraphrase of k ("patchy ground-glass opacities").
  That is the very similarity map inference thresholds, so the prompt lights up the lesion.
* **global**: ``sigmoid(tau3 * (cos(v_g, t_k) - cos(v_g, t_no_k)))`` is trained to say whether the
  image has a lesion of kind k: the zero-shot probability of inference.

The text transformer stays frozen (its projection trains). The result is an ordinary engine model
folder, to be continued by the contrastive trainer on real image-report pairs (``init:``).

    python -m training.grounded --manifest SYN/manifest.csv --out runs/grounded [--epochs 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from afloc_engine.checkpoint import ModelInfo, save_model
from afloc_engine.config import AFLocConfig
from afloc_engine.models import AFLocModel
from afloc_engine.progress import Progress
from afloc_engine.transforms import Letterbox, normalize_intensity
from training.synthetic import KIND_LABELS, PHRASES, RECIPES, kinds_of

NEGATIVE = "No {kind}."


class GroundedSynthetic(torch.utils.data.Dataset):
    """Synthetic images and lesion label maps, letterboxed to ``size`` with a small random affine.

    Item: image (1, S, S) float in the engine's normalisation, labels (S, S) long.
    """

    def __init__(
        self, manifest: Path, size: int, mean: float = 0.5, std: float = 0.5, augment: bool | str = True
    ) -> None:
        root = manifest.parent
        self.rows = [(root / r["image"], root / r["mask"]) for r in csv.DictReader(manifest.open()) if r.get("mask")]
        if not self.rows:
            raise ValueError(f"{manifest}: no rows with a mask column")
        self.size, self.mean, self.std, self.augment = size, mean, std, augment

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.rows[i]
        grey = torch.from_numpy(normalize_intensity(np.asarray(Image.open(image_path).convert("L"), np.float32)))
        labels = torch.from_numpy(np.asarray(Image.open(mask_path), np.uint8).astype(np.float32))
        box = Letterbox.fit(grey.shape[0], grey.shape[1], self.size)
        image = box.apply(grey[None])
        lab = torch.zeros(1, self.size, self.size)
        small = F.interpolate(labels[None, None], size=(box.resized_height, box.resized_width), mode="nearest")[0]
        lab[:, box.top : box.top + box.resized_height, box.left : box.left + box.resized_width] = small
        if self.augment:
            image, lab = _random_affine(image, lab, AUGMENTATIONS["strong" if self.augment == "strong" else "standard"])
            image = image.clamp(0, 1) ** random.uniform(0.8, 1.25)
        return (image - self.mean) / self.std, lab[0].round().long()


AUGMENTATIONS = {
    # name: (max rotation in degrees, scale range, max shift as a fraction of the side, horizontal flip)
    "standard": (7.0, (0.9, 1.1), 0.06, False),
    "strong": (12.0, (0.75, 1.25), 0.2, True),
}
"""Random affine of the grounded images: ``strong`` moves and mirrors the chest so much that where a
finding usually sits no longer tells which finding it is: the map must follow what the image shows."""


def _random_affine(
    image: torch.Tensor, labels: torch.Tensor, setting: tuple = AUGMENTATIONS["standard"]
) -> tuple[torch.Tensor, torch.Tensor]:
    degrees, (s_lo, s_hi), shift, flip = setting
    angle = math.radians(random.uniform(-degrees, degrees))
    scale = random.uniform(s_lo, s_hi)
    tx, ty = random.uniform(-shift, shift), random.uniform(-shift, shift)
    mirror = -1.0 if flip and random.random() < 0.5 else 1.0
    theta = torch.tensor(
        [
            [mirror * math.cos(angle) / scale, -math.sin(angle) / scale, tx],
            [mirror * math.sin(angle) / scale, math.cos(angle) / scale, ty],
        ]
    )[None]
    grid = F.affine_grid(theta, (1, 1, *image.shape[-2:]), align_corners=False)
    warped = F.grid_sample(image[None], grid, mode="bilinear", align_corners=False)[0]
    warped_labels = F.grid_sample(labels[None], grid, mode="nearest", align_corners=False)[0]
    return warped, warped_labels


def kind_targets(labels: torch.Tensor, grid: tuple[int, int], kinds: list[str] | None = None) -> torch.Tensor:
    """(B, S, S) label maps -> (B, K, g, g) fraction of each grid cell covered by each of ``kinds``
    (default: every kind of :data:`~training.synthetic.KIND_LABELS`, in label order)."""
    values = [KIND_LABELS[k] for k in (kinds if kinds is not None else KIND_LABELS)]
    onehot = torch.stack([(labels == v).float() for v in values], dim=1)
    return F.adaptive_avg_pool2d(onehot, grid)


def grounded_losses(
    model: AFLocModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    phrases: list[str],
    negatives: list[str],
    scale: torch.Tensor,
    bias: torch.Tensor,
    pos_weight: float = 4.0,
    kinds: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Local (cell-phrase) and global (presence) losses of one batch; see the module docstring.

    ``phrases`` and ``negatives`` hold one sentence per kind of ``kinds`` (default: every kind).
    """
    feats = model.encode_images(images)
    text = model.text_encoder.encode(phrases + negatives).report  # (2K, D)
    pos, neg = F.normalize(text[: len(phrases)], dim=-1), F.normalize(text[len(phrases) :], dim=-1)
    deep = F.normalize(feats.deep, dim=1)  # (B, D, g, g)
    cos = torch.einsum("bdhw,kd->bkhw", deep, pos)
    target = kind_targets(labels, tuple(deep.shape[-2:]), kinds)
    local = F.binary_cross_entropy_with_logits(cos * scale + bias, target, pos_weight=target.new_tensor(pos_weight))
    g = F.normalize(feats.global_, dim=-1)
    present = (target.flatten(2).amax(2) > 0).float()  # (B, K)
    logits = model.config.tau3 * (g @ pos.t() - g @ neg.t())
    glob = F.binary_cross_entropy_with_logits(logits, present)
    return {"local": local, "global": glob, "total": local + glob}


def learning_rate_schedule(optimizer: torch.optim.Optimizer, lr: float, total_steps: int) -> Any:  # noqa: ANN401
    """One-cycle (10 % warm-up) over ``total_steps``; a run too short for a warm-up (under 20 steps, a smoke
    test on a few images) keeps ``lr`` constant instead (one-cycle cannot warm up in under one step)."""
    if total_steps < 20:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.1)


def pretrain(
    manifest: Path,
    out: Path,
    config: AFLocConfig,
    epochs: int = 4,
    batch_size: int = 32,
    lr: float = 3e-4,
    device: str = "cpu",
    seed: int = 0,
    workers: int = 1,
    progress: str = "bar",
    recipe: str = "lesions",
    init: Path | None = None,
    augment: str = "standard",
) -> Path:
    """Train ``config``'s model on the grounded losses of ``recipe``'s kinds (:data:`RECIPES`); write an
    engine model folder to ``out``. ``init``: start from this model folder's weights and config
    (``config`` is then ignored) instead of ``config``'s fresh model."""
    torch.manual_seed(seed)
    random.seed(seed)
    kinds = kinds_of(recipe)
    if init is not None:
        from afloc_engine.checkpoint import load_model_folder

        model, _ = load_model_folder(init)
        config = model.config
    else:
        model = AFLocModel(config)
    model = model.to(device)
    for p in model.text_encoder.transformer.parameters():
        p.requires_grad_(False)
    scale = torch.nn.Parameter(torch.tensor(10.0, device=device))
    bias = torch.nn.Parameter(torch.tensor(-4.0, device=device))
    params = [p for p in model.parameters() if p.requires_grad] + [scale, bias]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    data = GroundedSynthetic(manifest, config.image_size, config.intensity_mean, config.intensity_std, augment)
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers, persistent_workers=workers > 0
    )
    total = epochs * len(loader)
    if total == 0:
        raise ValueError(f"{manifest}: {len(data)} images make no full batch of {batch_size}: lower --batch-size")
    schedule = learning_rate_schedule(optimizer, lr, total)
    history = []
    start = time.time()
    rng = random.Random(seed)
    with Progress(total, progress, desc="grounded pre-training") as bar:
        for epoch in range(epochs):
            model.train()
            model.text_encoder.transformer.eval()
            for images, labels in loader:
                phrases = [rng.choice(PHRASES[k]) for k in kinds]
                negatives = [NEGATIVE.format(kind=k) for k in kinds]
                losses = grounded_losses(
                    model, images.to(device), labels.to(device), phrases, negatives, scale, bias, kinds=kinds
                )
                optimizer.zero_grad(set_to_none=True)
                losses["total"].backward()
                optimizer.step()
                schedule.step()
                row = {k: float(v.detach()) for k, v in losses.items()}
                history.append({"epoch": epoch + 1, **row})
                bar.update(1, loss=row["total"], local=row["local"], glob=row["global"])
    info = ModelInfo(
        name="grounded-synthetic",
        version=time.strftime("%Y.%m.%d"),
        trained=True,
        description=f"grounded pre-training on {len(data)} synthetic images ({recipe}), {epochs} epoch"
        + ("s" if epochs != 1 else "")
        + (f", from {init}" if init is not None else ""),
        extra={"stage": "grounded-synthetic", "recipe": recipe, "seconds": round(time.time() - start)},
    )
    model.cpu().eval()
    save_model(model, out, info, overwrite=True)
    (out / "grounded_history.json").write_text(json.dumps(history))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, required=True, help="training.synthetic manifest.csv")
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--model-config", type=Path, help="JSON/YAML of AFLocConfig keys")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", choices=("bar", "json", "none"), default="bar")
    parser.add_argument("--recipe", choices=RECIPES, default="lesions", help="the kinds the synthetic set holds")
    parser.add_argument("--augment", choices=tuple(AUGMENTATIONS), default="standard", help="random affine strength")
    parser.add_argument("--init", type=Path, help="start from this model folder (its config) instead of a fresh model")
    args = parser.parse_args(argv)
    import yaml

    overrides = yaml.safe_load(args.model_config.read_text()) if args.model_config else {}
    config = AFLocConfig.from_dict(overrides or {}, args.model_config)
    try:
        pretrain(
            args.manifest,
            args.out,
            config,
            args.epochs,
            args.batch_size,
            args.lr,
            args.device,
            args.seed,
            args.workers,
            args.progress,
            args.recipe,
            args.init,
            args.augment,
        )
    except ValueError as err:  # bad input: one line, exit 2
        print(f"training.grounded: error: {err}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
