"""``finetune``: from a handful of (image, mask) pairs to an :class:`Adapter`, on cached frozen features.

1. Every example (and a few augmented views of it: small affine, intensity) goes once through the
   frozen encoder, exactly as inference prepares it; the shallow and deep features, the zero-shot
   heatmaps of the findings and the masks are cached on the head grid.
2. The head (zero-initialised output, so it starts as the zero-shot model) is trained on the cache
   with Dice + focal loss (MONAI) and a small random shift/scale in feature space per step.
3. With >= 4 examples one is held out: its Dice picks the best epoch and stops training early.

The base model is never modified: its parameters are not optimised (an unfrozen last stage is a copy).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from afloc_engine.errors import ConfigError, DataError
from afloc_engine.finetune.adapter import Adapter, adapter_components, create_adapter
from afloc_engine.finetune.data import AugmentConfig, Example, augment_view, downscale_for_views, parse_examples
from afloc_engine.finetune.features import (
    TunedStage,
    encode,
    image_channel,
    image_maps_to_head,
    valid_on_head,
)
from afloc_engine.finetune.head import AdapterHead
from afloc_engine.heatmap import grid_to_image, similarity_maps
from afloc_engine.metrics import iou_dice_at_thresholds
from afloc_engine.transforms import Letterbox, normalize_intensity, prepare_image

if TYPE_CHECKING:
    from afloc_engine.inference import AFLoc

log = logging.getLogger(__name__)

ProgressCallback = Callable[[dict[str, Any]], None]


class FinetuneCancelled(Exception):
    """Raised when ``should_stop()`` returns True; nothing has been written."""


@dataclass
class _Views:
    """Cached head inputs of N views (all tensors on the training device)."""

    shallow: torch.Tensor  # (N, D, g8, g8) encoder features; (N, k, g8, g8) once reduced
    deep: torch.Tensor  # (N, D, g16, g16) base deep features; reduced, or the stride-8 maps when tuning the stage
    zero_shot: torch.Tensor  # (N, F, R, R) zero-shot heatmaps in [-1, 1]
    image: torch.Tensor  # (N, 1, R, R)
    target: torch.Tensor  # (N, F, R, R) in [0, 1]
    valid: torch.Tensor  # (N, 1, R, R) in [0, 1]
    present: torch.Tensor  # (N, F) 1 where the finding has a mask
    s8: torch.Tensor | None = None  # (N, C8, g8, g8) stride-8 backbone maps (only to tune the last stage)

    def __len__(self) -> int:
        return self.shallow.shape[0]

    def take(self, idx: torch.Tensor) -> _Views:
        return _Views(*(None if getattr(self, f) is None else getattr(self, f)[idx] for f in self.__dataclass_fields__))

    @torch.no_grad()
    def reduce(self, head: torch.nn.Module, tune_stage: bool, chunk: int = 16) -> _Views:
        """Features -> the head's PCA inputs (deep: the stride-8 maps instead when the stage is tuned)."""

        def apply(x: torch.Tensor, level: str) -> torch.Tensor:
            return torch.cat([head.reduce(x[i : i + chunk], level) for i in range(0, len(x), chunk)])

        deep = self.s8 if tune_stage else apply(self.deep, "deep")
        return _Views(
            apply(self.shallow, "shallow"),
            deep,
            *(getattr(self, f) for f in ("zero_shot", "image", "target", "valid", "present")),
        )


def _auto_views(n_train: int) -> int:
    """Views per example (original + augmented) so that about 16 images are encoded, 1 to 8 each."""
    return int(min(8, max(1, math.ceil(16 / max(1, n_train)))))


def _auto_epochs(n_views: int, batch_size: int, target_steps: int = 200) -> int:
    steps_per_epoch = math.ceil(n_views / batch_size)
    return int(min(300, max(15, round(target_steps / steps_per_epoch))))


def _pick_heldout(examples: list[Example], findings: list[str], rng: np.random.Generator) -> int | None:
    """Index of the example to hold out (>= 4 examples), keeping every finding in the training set."""
    if len(examples) < 4:
        return None
    picked = _pick_folds(examples, findings, 1, rng)
    return picked[0] if picked else None


def _mask_stack(example: Example, findings: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, H, W) float masks (zeros for findings without a mask) and (F,) presence."""
    h, w = example.image.array.shape
    masks = torch.zeros(len(findings), h, w)
    present = torch.zeros(len(findings))
    for j, f in enumerate(findings):
        if f in example.masks:
            masks[j] = torch.from_numpy(example.masks[f].astype(np.float32))
            present[j] = 1.0
    return masks, present


def _make_views(
    model: AFLoc,
    examples: list[Example],
    findings: list[str],
    n_views: int,
    rng: np.random.Generator,
    aug: AugmentConfig,
) -> list[tuple[torch.Tensor, Letterbox, torch.Tensor, torch.Tensor]]:
    """(network input (C, S, S), letterbox, masks (F, H', W'), presence (F,)) per view.

    View 0 of each example is the image exactly as inference prepares it; the others are augmented
    copies (shrunk to at most 2 S px first, so augmenting a large DICOM stays cheap).
    """
    c = model.config
    out = []
    for ex in examples:
        masks, present = _mask_stack(ex, findings)
        x, box = model.prepare(ex.image)
        out.append((x, box, masks, present))
        if n_views > 1:
            img01 = torch.from_numpy(normalize_intensity(ex.image.array, ex.image.window))
            small_img, small_masks = downscale_for_views(img01, masks, 2 * c.image_size)
            for _ in range(n_views - 1):
                a_img, a_masks = augment_view(small_img, small_masks, rng, aug)
                xa, boxa = prepare_image(
                    a_img.numpy(), c.image_size, (0.0, 1.0), c.intensity_mean, c.intensity_std, c.in_channels
                )
                out.append((xa, boxa, a_masks, present))
    return out


def _encode_views(
    model: AFLoc,
    views: list[tuple[torch.Tensor, Letterbox, torch.Tensor, torch.Tensor]],
    prompt_emb: torch.Tensor,
    resolution: int,
    want_s8: bool,
    chunk: int,
    on_chunk: Callable[[int], None],
) -> _Views:
    """Run the frozen encoder over the views and cache the head inputs (see :class:`_Views`)."""
    dev = model.device
    c = model.config
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in _Views.__dataclass_fields__}
    for start in range(0, len(views), chunk):
        part = views[start : start + chunk]
        batch = torch.stack([v[0] for v in part]).to(dev)
        tap = encode(model.model.image_encoder, batch, want_s8)
        feats = tap.features
        with torch.no_grad():
            grids = similarity_maps(feats.deep.float(), prompt_emb, c.similarity)
            for i, (_, box, masks, present) in enumerate(part):
                zs = grid_to_image(grids[i], box, c.smoothing_sigma)
                parts["zero_shot"].append(image_maps_to_head(zs, box, resolution))
                parts["target"].append(image_maps_to_head(masks.to(dev), box, resolution).clamp(0, 1))
                parts["valid"].append(valid_on_head(box, resolution, dev)[None])
                parts["present"].append(present.to(dev))
            parts["shallow"].append(feats.shallow.float())
            parts["deep"].append(feats.deep.float())
            if want_s8:
                parts["s8"].append(tap.s8.float())
            parts["image"].append(image_channel(batch, resolution))
        on_chunk(len(part))
    stacked = {
        k: torch.cat(v) if k in ("shallow", "deep", "s8", "image") else torch.stack(v) for k, v in parts.items() if v
    }
    return _Views(**{k: t.detach().clone() for k, t in stacked.items()})


def _shift_scale(batch: _Views, rng: np.random.Generator, aug: AugmentConfig) -> _Views:
    """Feature-space augmentation: one random translation + scale per sample, applied to every cached map."""
    n = len(batch)
    if n == 0 or (aug.feature_shift <= 0 and aug.feature_scale <= 0):
        return batch
    scale = np.exp(rng.uniform(-aug.feature_scale, aug.feature_scale, size=n))
    shift = rng.uniform(-aug.feature_shift, aug.feature_shift, size=(n, 2)) * 2
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    theta_t = torch.from_numpy(theta).to(batch.shallow.device)

    def warp(x: torch.Tensor, padding: str) -> torch.Tensor:
        grid = F.affine_grid(theta_t, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)

    return _Views(
        warp(batch.shallow, "border"),
        warp(batch.deep, "border"),
        warp(batch.zero_shot, "zeros"),
        warp(batch.image, "border"),
        warp(batch.target, "zeros"),
        warp(batch.valid, "zeros"),
        batch.present,
    )  # (batch.s8 is not needed once reduced)


class _Objective:
    """Dice + focal loss (MONAI) on sigmoid(k (heatmap - t)), ignoring letterbox padding and absent masks."""

    def __init__(self, logit_scale: float, threshold: float, focal_weight: float) -> None:
        from monai.losses import DiceLoss, FocalLoss

        self.k, self.t, self.focal_weight = logit_scale, threshold, focal_weight
        self.dice = DiceLoss(sigmoid=False, reduction="none", smooth_nr=1e-4, smooth_dr=1e-4)
        self.focal = FocalLoss(use_softmax=False, gamma=2.0, reduction="none")

    def logits(self, heat: torch.Tensor) -> torch.Tensor:
        return self.k * (heat - self.t)

    def __call__(
        self, heat: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, present: torch.Tensor
    ) -> torch.Tensor:
        logits = self.logits(heat)
        prob = torch.sigmoid(logits) * valid
        dice = self.dice(prob, target * valid).flatten(1)  # (B, F)
        focal = self.focal(logits, target)  # (B, F, R, R)
        focal = (focal * valid).flatten(2).sum(-1) / valid.flatten(2).sum(-1).clamp(min=1)
        per = dice + self.focal_weight * focal
        return (per * present).sum() / present.sum().clamp(min=1)


def _dice(heat: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, present: torch.Tensor, t: float) -> float:
    """Mean Dice of (heat > t) against (target > 0.5) over present (view, finding) pairs, on the head grid."""
    inside = valid > 0.5
    pred = (heat > t) & inside
    truth = (target > 0.5) & inside
    inter = (pred & truth).flatten(2).sum(-1).float()
    total = (pred.flatten(2).sum(-1) + truth.flatten(2).sum(-1)).float()
    d = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
    return float((d * present).sum() / present.sum().clamp(min=1))


class _Trainer:
    """Trains one head (and optionally a tuned stage) on a reduced cache; reports each epoch."""

    def __init__(
        self,
        head: AdapterHead,
        stage: TunedStage | None,
        objective: _Objective,
        threshold: float,
        lr: float,
        stage_lr: float,
        weight_decay: float,
        batch_size: int,
        seed: int,
        rng: np.random.Generator,
        aug: AugmentConfig,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.head, self.stage, self.objective, self.threshold = head, stage, objective, threshold
        self.lr, self.stage_lr, self.weight_decay, self.batch_size = lr, stage_lr, weight_decay, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.rng, self.aug, self.should_stop = rng, aug, should_stop

    def heat(self, v: _Views) -> torch.Tensor:
        """Adapted heatmaps (N, F, R, R) = zero-shot + the head's correction."""
        deep = self.head.reduce(self.stage(v.deep), "deep") if self.stage is not None else v.deep
        return v.zero_shot + self.head(v.shallow, deep, v.zero_shot, v.image)

    def evaluate(self, v: _Views) -> tuple[float, float]:
        """(loss, Dice) on cached views, without augmentation or dropout."""
        self.head.eval()
        if self.stage is not None:
            self.stage.eval()
        with torch.no_grad():
            heat = self.heat(v)
            loss = float(self.objective(heat, v.target, v.valid, v.present))
            dice = _dice(heat, v.target, v.valid, v.present, self.threshold)
        return loss, dice

    def state(self) -> dict[str, Any]:
        return {
            "head": copy.deepcopy(self.head.state_dict()),
            "stage": copy.deepcopy(self.stage.state_dict()) if self.stage is not None else None,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        if self.stage is not None:
            self.stage.load_state_dict(state["stage"])

    def fit(
        self,
        cache: _Views,
        epochs: int,
        held: _Views | None,
        patience: int,
        min_epochs: int,
        on_epoch: Callable[[dict[str, float]], None],
    ) -> tuple[list[dict[str, float]], int, dict[str, Any] | None]:
        """Train for ``epochs`` (cosine learning rate). With ``held``: keep the best held-out state and stop
        after ``patience`` epochs without improvement (not before ``min_epochs``).

        Returns (history, best epoch (0: none), best state or None).
        """
        params = [{"params": list(self.head.parameters()), "lr": self.lr}]
        if self.stage is not None:
            params.append({"params": list(self.stage.parameters()), "lr": self.stage_lr})
        optimiser = torch.optim.AdamW(params, weight_decay=self.weight_decay)
        total_steps = max(1, epochs * math.ceil(len(cache) / self.batch_size))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * min(1.0, step / total_steps)))
        )
        history: list[dict[str, float]] = []
        best: tuple[float, float] = (-1.0, -math.inf)
        best_epoch, best_state, wait = 0, None, 0
        for epoch in range(1, epochs + 1):
            self.head.train()
            if self.stage is not None:
                self.stage.train()
            order = torch.randperm(len(cache), generator=self.generator)
            losses = []
            for start in range(0, len(order), self.batch_size):
                if self.should_stop is not None and self.should_stop():
                    raise FinetuneCancelled("fine-tuning cancelled")
                batch = _shift_scale(cache.take(order[start : start + self.batch_size]), self.rng, self.aug)
                loss = self.objective(self.heat(batch), batch.target, batch.valid, batch.present)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                losses.append(float(loss.detach()))
            record = {"epoch": epoch, "loss": float(np.mean(losses))}
            if held is not None:
                held_loss, held_dice = self.evaluate(held)
                record.update(heldout_loss=held_loss, heldout_dice=held_dice)
                if (held_dice, -held_loss) > best:
                    best, best_epoch, best_state, wait = (held_dice, -held_loss), epoch, self.state(), 0
                else:
                    wait += 1
            history.append(record)
            on_epoch(record)
            if held is not None and wait >= patience and epoch >= min_epochs:
                break
        return history, best_epoch, best_state


def _new_head(
    model: AFLoc,
    findings: list[str],
    prompts: Sequence[str] | None,
    width: int,
    feature_dim: int,
    head_resolution: int | None,
    logit_scale: float,
    unfreeze_last_stage: bool,
) -> tuple[Adapter, TunedStage | None]:
    """A fresh (zero-output) adapter on the model's device, and a copy of the last stage when it is tuned."""
    adapter = create_adapter(model, findings, prompts, width=width, fine_width=max(8, width // 2), in_dim=feature_dim)
    if head_resolution:
        adapter.config.head_resolution = int(head_resolution)
    adapter.config.logit_scale = logit_scale
    adapter.config.unfreeze_last_stage = unfreeze_last_stage
    adapter.head.to(model.device)
    stage = TunedStage.from_encoder(model.model.image_encoder).to(model.device) if unfreeze_last_stage else None
    return adapter, stage


def finetune(
    model: AFLoc,
    examples: Sequence[Any],
    finding: str | Sequence[str],
    *,
    prompts: Sequence[str] | None = None,
    epochs: int | None = None,
    views: int | None = None,
    batch_size: int = 8,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    focal_weight: float = 1.0,
    logit_scale: float = 4.0,
    head_resolution: int | None = None,
    width: int = 32,
    feature_dim: int = 64,
    unfreeze_last_stage: bool = False,
    stage_lr: float = 1e-4,
    patience: int | None = None,
    refit: bool = True,
    cv_folds: int = 3,
    blend_grid: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    bag: bool = True,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Adapter:
    """Fine-tune a segmentation head for ``finding`` on a few (image, mask) pairs; returns an :class:`Adapter`.

    With >= 4 examples, one is held out: training stops early when its Dice stops improving (not
    before half the epochs), and the best epoch count is kept; with ``refit`` (default) a fresh head
    is then trained on every example for that many epochs, else the best held-out state is kept.
    A held-out example whose Dice never beats its zero-shot Dice says nothing: the full schedule is used.

    Args:
        model: a loaded :class:`~afloc_engine.inference.AFLoc` (never modified).
        examples: 1 to ~50 items ``(image, mask)`` / ``(image, mask, id)`` / dicts (see
            :func:`~afloc_engine.finetune.data.parse_examples`); images: paths, (H, W) arrays or
            ImageData of any sizes; masks: binary, the size of their own image.
        finding: a finding name ("ground glass opacity") or several (then masks are dicts).
        prompts: the zero-shot prompt per finding (default "Findings suggesting {finding}").
        epochs: passes over the cached views (default: about 200 optimiser steps, 15 to 300 epochs).
        views: encoded views per training example, original included (default: ~16 images in all).
        head_resolution: side R of the head's grid over the S x S canvas (default S / 4, >= 32).
        width, feature_dim: head channels; PCA channels per feature level (at most D).
        unfreeze_last_stage: also tune a copy of the encoder's last local stage (ResNet only; slower).
        patience: epochs without held-out improvement before stopping (default: a quarter of the epochs).
        refit: after early stopping, retrain on all examples (including the held-out one).
        cv_folds: with >= 2 examples, up to this many leave-one-out fits (0: none) choose the
            correction's weight ``blend`` from ``blend_grid`` by the left-out examples' Dice; a head that
            does not beat the zero-shot heatmap on them gets ``blend`` 0 (the zero-shot output).
        bag: keep the leave-one-out heads as members, their corrections and the main head's combined by
            a pixel-wise median (one unlucky fit cannot drag the map); False keeps the main head alone.
        seed: seeds initialisation, augmentation, the held-out pick and the batch order.
        out_dir: if given, the adapter is saved to ``out_dir/<finding>-<timestamp>/``.
        progress: called with dicts ``{"phase": "encode"|"train"|"refit", "step", "total", "epoch",
            "loss", "heldout_dice", ...}``.
        should_stop: polled every step; True raises :class:`FinetuneCancelled` (nothing written).

    Raises:
        DataError / ImageReadError: no examples, unreadable files, masks empty, all foreground,
            not binary or not the size of their image (named in the message). Nothing is written.
    """
    started = time.monotonic()
    if model.config.spatial_dims != 2:
        raise ConfigError("few-shot fine-tuning needs a 2D model (this one is 3D)")
    findings = [finding] if isinstance(finding, str) else list(finding)
    findings = [f.strip() for f in findings]
    parsed = parse_examples(examples, findings)
    if epochs is not None and epochs < 0:
        raise DataError(f"epochs must be >= 0, not {epochs}")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, not {batch_size}")
    aug = augment or AugmentConfig()
    rng = np.random.default_rng(seed)
    emit = progress or (lambda _event: None)
    dev = model.device
    head_args = (findings, prompts, width, feature_dim, head_resolution, logit_scale, unfreeze_last_stage)

    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        adapter, stage = _new_head(model, *head_args)
        res = adapter.config.head_resolution
        threshold = adapter.config.threshold

        held = _pick_heldout(parsed, findings, rng)
        train_ex = [ex for i, ex in enumerate(parsed) if i != held]
        held_ex = [parsed[held]] if held is not None else []
        n_views = views or _auto_views(len(train_ex))
        view_list = _make_views(model, train_ex, findings, n_views, rng, aug)
        # the held-out example: view 0 for early stopping, its other views only for the refit
        held_list = _make_views(model, held_ex, findings, n_views if refit else 1, rng, aug)
        n_epochs = _auto_epochs(len(view_list), batch_size) if epochs is None else int(epochs)
        refit_epochs_max = n_epochs if (held_list and refit) else 0
        # an rng of its own: the main fit is the same with or without cross-validation
        folds = _pick_folds(parsed, findings, cv_folds, np.random.default_rng([seed, 1]))
        total = len(view_list) + len(held_list) + n_epochs + refit_epochs_max + len(folds)
        done_steps = 0

        def on_chunk(n: int) -> None:
            nonlocal done_steps
            done_steps += n
            emit({"phase": "encode", "step": done_steps, "total": total})
            if should_stop is not None and should_stop():
                raise FinetuneCancelled("fine-tuning cancelled")

        def on_epoch(phase: str, n_total: int) -> Callable[[dict[str, float]], None]:
            def report(record: dict[str, float]) -> None:
                nonlocal done_steps
                done_steps += 1
                emit({"phase": phase, "step": done_steps, "total": total, "epochs": n_total, **record})

            return report

        prompt_emb = model.embed_prompts(adapter.prompts).clone().float()
        want_s8 = unfreeze_last_stage
        t_encode = time.monotonic()
        raw = _encode_views(model, view_list, prompt_emb, res, want_s8, batch_size, on_chunk)
        raw_held = (
            _encode_views(model, held_list, prompt_emb, res, want_s8, batch_size, on_chunk) if held_list else None
        )
        adapter.head.fit_reduction(raw.shallow, "shallow")
        adapter.head.fit_reduction(raw.deep, "deep")
        cache = raw.reduce(adapter.head, want_s8)
        held_eval = raw_held.take(torch.tensor([0])).reduce(adapter.head, want_s8) if raw_held is not None else None
        encode_s = time.monotonic() - t_encode

        objective = _Objective(logit_scale, threshold, focal_weight)

        def trainer(head: AdapterHead, tuned: TunedStage | None) -> _Trainer:
            return _Trainer(
                head, tuned, objective, threshold, lr, stage_lr, weight_decay, batch_size, seed, rng, aug, should_stop
            )

        train_run = trainer(adapter.head, stage)
        originals = torch.tensor([i * n_views for i in range(len(train_ex))])
        zs_train = _dice(cache.zero_shot[originals], cache.target[originals], cache.valid[originals],
                         cache.present[originals], threshold)  # fmt: skip
        zs_held = train_run.evaluate(held_eval) if held_eval is not None else None
        patience_epochs = patience if patience is not None else max(10, n_epochs // 4)
        t_train = time.monotonic()
        history, best_epoch, best_state = train_run.fit(
            cache, n_epochs, held_eval, patience_epochs, math.ceil(n_epochs / 2), on_epoch("train", n_epochs)
        )
        train_s = time.monotonic() - t_train
        informative = (
            held_eval is not None
            and best_state is not None
            and history[best_epoch - 1]["heldout_dice"] > (zs_held[1] if zs_held else 0.0)
        )
        chosen_epochs = best_epoch if informative else len(history)
        heldout_dice = history[best_epoch - 1]["heldout_dice"] if informative else None
        refit_history: list[dict[str, float]] = []
        refit_s = 0.0
        if raw_held is not None and refit and chosen_epochs > 0:
            # a fresh head on every example (the held-out one too) for the chosen number of epochs
            t_refit = time.monotonic()
            torch.manual_seed(seed + 1)
            adapter, stage = _new_head(model, *head_args)
            every = _cat_views(raw, raw_held)
            adapter.head.fit_reduction(every.shallow, "shallow")
            adapter.head.fit_reduction(every.deep, "deep")
            refit_run = trainer(adapter.head, stage)
            refit_history, _, _ = refit_run.fit(
                every.reduce(adapter.head, want_s8), chosen_epochs, None, 0, 0, on_epoch("refit", chosen_epochs)
            )
            train_ex = parsed if len(train_ex) + 1 == len(parsed) else train_ex + held_ex
            originals = torch.cat([originals, torch.tensor([len(raw)])])
            cache = every.reduce(adapter.head, want_s8)
            train_run = refit_run
            refit_s = time.monotonic() - t_refit
        elif informative:
            train_run.load(best_state)
        final_train = train_run.evaluate(cache.take(originals))
        adapter.head.eval()
        t_validate = time.monotonic()
        validation = None
        if folds:
            fit_args = dict(
                prompts=adapter.prompts, epochs=epochs, views=views, batch_size=batch_size, lr=lr,
                weight_decay=weight_decay, focal_weight=focal_weight, logit_scale=logit_scale,
                head_resolution=head_resolution, width=width, feature_dim=feature_dim,
                unfreeze_last_stage=unfreeze_last_stage, stage_lr=stage_lr, patience=patience, refit=refit,
                augment=aug, should_stop=should_stop,
            )  # fmt: skip

            def fold_done(n: int) -> None:
                nonlocal done_steps
                done_steps += 1
                emit({"phase": "validate", "step": done_steps, "total": total, "fold": n})

            validation, fold_adapters = _cross_validate_blend(
                model, parsed, findings, folds, fit_args, blend_grid, seed, fold_done
            )
            adapter.config.blend = validation["blend"]
            if bag:
                adapter.set_members([(a.head, a.stage) for a in fold_adapters])
        validate_s = time.monotonic() - t_validate

    adapter.stage = stage.eval() if stage is not None else None
    adapter.example_ids = [ex.id for ex in train_ex]
    adapter.heldout_ids = [ex.id for ex in held_ex] if not refit_history else []
    adapter.config.training = {
        "epochs": n_epochs,
        "views_per_example": n_views,
        "batch_size": batch_size,
        "lr": lr,
        "stage_lr": stage_lr if unfreeze_last_stage else None,
        "weight_decay": weight_decay,
        "focal_weight": focal_weight,
        "patience": patience_epochs if held_eval is not None else None,
        "refit": bool(refit_history),
        "cv_folds": len(folds),
        "bag": bool(folds) and bag,
        "blend_grid": [float(b) for b in blend_grid],
        "seed": seed,
        "augment": aug.to_dict(),
    }
    adapter.metrics = {
        "n_examples": len(parsed),
        "n_train_examples": len(train_ex),
        "heldout_example": held_ex[0].id if held_ex else None,
        "n_cached_views": len(view_list) + len(held_list),
        "epochs_run": len(history),
        "best_epoch": best_epoch if informative else None,
        "heldout_informative": informative if held_eval is not None else None,
        "refit_epochs": len(refit_history) if refit_history else None,
        "train_dice_zero_shot": zs_train,
        "train_dice": final_train[1],
        "heldout_dice_zero_shot": zs_held[1] if zs_held else None,
        "heldout_dice": heldout_dice,
        "dice_note": "Dice of heatmap > threshold on the head grid (R x R over the canvas), letterbox padding "
        "excluded; heldout_dice is that of the best epoch before the refit on all examples",
        "validation": validation,
        "blend": adapter.config.blend,
        "warnings": _warnings(parsed, findings, folds, validation),
        "history": history,
        "refit_history": refit_history,
        "seconds": {
            "encode": round(encode_s, 3),
            "train": round(train_s, 3),
            "refit": round(refit_s, 3),
            "validate": round(validate_s, 3),
            "total": round(time.monotonic() - started, 3),
        },
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
    }
    if out_dir is not None:
        adapter.save(out_dir)
    return adapter


TINY_MASK_FRACTION = 0.001
"""A mask under this fraction of its image (0.1 %) is probably a stray click, not an outline."""


def _warnings(
    examples: list[Example], findings: list[str], folds: list[int], validation: dict[str, Any] | None
) -> list[str]:
    """What a user should know about this adapter's examples before trusting it (plain sentences)."""
    out = []
    if len(examples) < 2:
        out.append(
            "one example: the correction's weight could not be checked on a left-out example, so it is 1; "
            "from one mask the adapter is often worse than zero-shot - give at least 3 examples"
        )
    elif not folds:
        out.append("no leave-one-out fits (cv_folds 0): the correction's weight was not checked")
    for ex in examples:
        for f, mask in ex.masks.items():
            fraction = float(np.count_nonzero(mask)) / mask.size
            if fraction < TINY_MASK_FRACTION:
                out.append(
                    f"example {ex.id}: its '{f}' mask covers {100 * fraction:.3g} % of the image; the adapter "
                    "learns the extent it is shown - outline the whole finding"
                )
    if validation is not None and validation["blend"] == 0:
        out.append(
            "the leave-one-out fits did not beat the zero-shot heatmap on their left-out examples: "
            "the adapter keeps the zero-shot heatmap (weight 0)"
        )
    return out


def _pick_folds(examples: list[Example], findings: list[str], n_folds: int, rng: np.random.Generator) -> list[int]:
    """Indices of up to ``n_folds`` examples to leave out one at a time (>= 2 examples), each leaving
    every finding in the rest."""
    if n_folds <= 0 or len(examples) < 2:
        return []
    picked = []
    for idx in rng.permutation(len(examples)):
        rest = [ex for i, ex in enumerate(examples) if i != idx]
        if all(any(f in ex.masks for ex in rest) for f in findings):
            picked.append(int(idx))
        if len(picked) == n_folds:
            break
    return picked


def _cross_validate_blend(
    model: AFLoc,
    examples: list[Example],
    findings: list[str],
    folds: list[int],
    fit_args: dict[str, Any],
    blend_grid: Sequence[float],
    seed: int,
    on_fold: Callable[[int], None],
) -> tuple[dict[str, Any], list[Adapter]]:
    """Leave-one-out fits on ``folds``: mean Dice (at the model threshold, full resolution) of each left-out
    example's heatmap for every blend weight; the best weight wins, ties to the smaller one (0 = zero-shot).
    Returns that report and the fold adapters."""
    grid = sorted({float(b) for b in blend_grid} | {0.0})
    scores = {b: [] for b in grid}
    fitted = []
    threshold = model.config.threshold
    for n, idx in enumerate(folds):
        rest = [ex for i, ex in enumerate(examples) if i != idx]
        fold = finetune(model, rest, findings, cv_folds=0, seed=seed + 1 + n, **fit_args)
        fitted.append(fold)
        left = examples[idx]
        [(zero_shot, correction)] = adapter_components(model, fold, [left.image])
        for b in grid:
            heat = np.clip(zero_shot + b * correction, -1.0, 1.0)
            for j, f in enumerate(findings):
                if f in left.masks:  # masks are never empty (parse_examples)
                    _, dice = iou_dice_at_thresholds(heat[j], left.masks[f], [threshold])
                    scores[b].append(float(dice[0]))
        on_fold(n + 1)
    mean = {b: float(np.mean(v)) for b, v in scores.items()}
    best = max(grid, key=lambda b: (round(mean[b], 6), -b))
    report = {
        "left_out": [examples[i].id for i in folds],
        "dice_by_blend": {f"{b:g}": round(mean[b], 4) for b in grid},
        "zero_shot_dice": round(mean[0.0], 4),
        "blend": best,
    }
    return report, fitted


def _cat_views(a: _Views, b: _Views) -> _Views:
    """Views of ``a`` then ``b``, as one cache."""
    return _Views(
        *(
            None if getattr(a, f) is None else torch.cat([getattr(a, f), getattr(b, f)])
            for f in _Views.__dataclass_fields__
        )
    )
