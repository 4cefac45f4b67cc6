"""``finetune``: from a handful of (image, mask) pairs to an :class:`Adapter`, on cached frozen features.

:func:`finetune` is the list of its steps:

1. :func:`_encode_examples`: every example (and a few augmented views of it: small affine,
   intensity) goes once through the frozen encoder, exactly as inference prepares it; the shallow
   and deep features, the zero-shot heatmaps of the findings and the masks are cached on the head
   grid (:mod:`afloc_engine.finetune.views`). With >= 4 examples one is held out (:func:`_split`).
2. :func:`_fit`: the head (zero-initialised output, so it starts as the zero-shot model) is trained
   on the cache with Dice + focal loss (MONAI) and a small random shift/scale in feature space per
   step; the held-out example's Dice picks the best epoch and stops training early, then
   :func:`_refit` trains a fresh head on every example for that many epochs.
3. :func:`_cross_validate`: leave-one-out fits choose the weight of the head's correction.
4. :func:`_describe` records the settings, what ran and the metrics; ``adapter.save`` writes the folder.

The settings are one :class:`~afloc_engine.finetune.config.FinetuneConfig`. The base model is never
modified: its parameters are not optimised (an unfrozen last stage is a copy).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from afloc_engine.errors import ConfigError
from afloc_engine.finetune.adapter import Adapter, adapter_components, create_adapter
from afloc_engine.finetune.config import FinetuneConfig
from afloc_engine.finetune.data import Example, parse_examples
from afloc_engine.finetune.features import TunedStage
from afloc_engine.finetune.head import AdapterHead
from afloc_engine.finetune.views import ViewCache, cat_views, encode_views, make_views, shift_scale
from afloc_engine.metrics import iou_dice_at_thresholds

if TYPE_CHECKING:
    from afloc_engine.inference import AFLoc

log = logging.getLogger(__name__)

ProgressCallback = Callable[[dict[str, Any]], None]
"""Called with ``{"phase", "step", "total", ...}`` after each finished step (see :func:`finetune`)."""


class FinetuneCancelled(Exception):
    """Raised when ``should_stop()`` returns True; nothing has been written."""


@dataclass
class _Steps:
    """The run's progress: finished steps of all phases (encode, train, refit, validate) out of ``total``."""

    total: int
    emit: ProgressCallback
    should_stop: Callable[[], bool] | None
    done: int = 0

    def advance(self, n: int, phase: str, **fields: Any) -> None:  # noqa: ANN401
        """``n`` more steps of ``phase`` are done: report them (``fields`` join the event)."""
        self.done += n
        self.emit({"phase": phase, "step": self.done, "total": self.total, **fields})

    def encoded(self, n: int) -> None:
        """``n`` more views went through the encoder; cancel here if asked to."""
        self.advance(n, "encode")
        if self.should_stop is not None and self.should_stop():
            raise FinetuneCancelled("fine-tuning cancelled")

    def epochs(self, phase: str, n_epochs: int) -> Callable[[dict[str, float]], None]:
        """The per-epoch report of a fit of ``n_epochs`` (``train`` or ``refit``)."""
        return lambda record: self.advance(1, phase, epochs=n_epochs, **record)


def finetune(
    model: AFLoc,
    examples: Sequence[Any],
    finding: str | Sequence[str],
    config: FinetuneConfig | None = None,
    *,
    prompts: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    **options: Any,  # noqa: ANN401
) -> Adapter:
    """Fine-tune a segmentation head for ``finding`` on a few (image, mask) pairs; returns an :class:`Adapter`.

    With >= 4 examples, one is held out: training stops early when its Dice stops improving (not
    before half the epochs), and the best epoch count is kept; with ``refit`` (default) a fresh head
    is then trained on every example for that many epochs, else the best held-out state is kept.
    A held-out example whose Dice never beats its zero-shot Dice says nothing: the full schedule is used.

    Args:
        model: a loaded :class:`~afloc_engine.inference.AFLoc` (2D; never modified).
        examples: 1 to ~50 items ``(image, mask)`` / ``(image, mask, id)`` / dicts (see
            :func:`~afloc_engine.finetune.data.parse_examples`); images: paths, (H, W) arrays or
            ImageData of any sizes; masks: binary, the size of their own image.
        finding: a finding name ("ground glass opacity") or several (then masks are dicts).
        config: the settings (:class:`~afloc_engine.finetune.config.FinetuneConfig`; defaults when None).
        prompts: the zero-shot prompt per finding (default "Findings suggesting {finding}").
        out_dir: if given, the adapter is saved to ``out_dir/<finding>-<timestamp>/``.
        progress: called with dicts ``{"phase": "encode"|"train"|"refit"|"validate", "step", "total",
            ...}``: per encoded chunk, per epoch (``epoch``, ``epochs``, ``loss``, ``heldout_dice``) and
            per leave-one-out fit (``fold``).
        should_stop: polled every step; True raises :class:`FinetuneCancelled` (nothing written).
        **options: fields of :class:`FinetuneConfig` (``epochs=3, seed=1``, ...) replacing ``config``'s.

    Raises:
        DataError / ImageReadError: no examples, unreadable files, masks empty, all foreground,
            not binary or not the size of their image (named in the message). Nothing is written.
        ConfigError: a 3D model or an invalid setting. TypeError: an option that is not a setting.
    """
    started = time.monotonic()
    cfg = FinetuneConfig.from_options(config, **options)
    if model.config.spatial_dims != 2:
        raise ConfigError("few-shot fine-tuning needs a 2D model (this one is 3D)")
    findings = [f.strip() for f in ([finding] if isinstance(finding, str) else finding)]
    parsed = parse_examples(examples, findings)
    rng = np.random.default_rng(cfg.seed)
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        adapter, stage = _new_head(model, findings, prompts, cfg)
        split = _split(parsed, findings, cfg, rng)
        steps = _Steps(split.total_steps(cfg), progress or (lambda _event: None), should_stop)
        run = _Run(model, findings, prompts, cfg, rng, steps)
        encoded = _encode_examples(run, adapter, split)
        fitted = _fit(run, adapter, stage, split, encoded)
        validation = _cross_validate(run, fitted.adapter, parsed, split.folds)
    adapter = _describe(run, split, encoded, fitted, validation, time.monotonic() - started)
    if out_dir is not None:
        adapter.save(out_dir)
    return adapter


@dataclass
class _Run:
    """What every step of one fine-tuning run shares."""

    model: AFLoc
    findings: list[str]
    prompts: Sequence[str] | None
    config: FinetuneConfig
    rng: np.random.Generator
    """Draws the held-out pick, the augmented views and the feature-space augmentation, in that order."""
    steps: _Steps


@dataclass
class _Split:
    """Which examples train, which one is held out, which are left out in turn; views and epochs."""

    examples: list[Example]
    train: list[Example]
    held: list[Example]
    folds: list[int]
    n_views: int
    n_epochs: int

    def total_steps(self, config: FinetuneConfig) -> int:
        """Progress steps of the run: encoded views, epochs (train, then at most as many to refit), folds."""
        n_held = len(self.held) * (self.n_views if config.refit else 1)
        refit_epochs = self.n_epochs if (n_held and config.refit) else 0
        return len(self.train) * self.n_views + n_held + self.n_epochs + refit_epochs + len(self.folds)


def _split(examples: list[Example], findings: list[str], config: FinetuneConfig, rng: np.random.Generator) -> _Split:
    """Hold one example out (>= 4 examples), size the views and epochs, pick the leave-one-out folds."""
    held = _pick_heldout(examples, findings, rng)
    train = [ex for i, ex in enumerate(examples) if i != held]
    n_views = config.views_for(len(train))
    # an rng of its own: the main fit is the same with or without cross-validation
    folds = _pick_folds(examples, findings, config.cv_folds, np.random.default_rng([config.seed, 1]))
    held_ex = [examples[held]] if held is not None else []
    return _Split(examples, train, held_ex, folds, n_views, config.epochs_for(len(train) * n_views))


@dataclass
class _Encoded:
    """The examples through the frozen encoder: raw caches, and the first head's reduced inputs."""

    raw: ViewCache
    raw_held: ViewCache | None
    cache: ViewCache
    """The training views reduced by the first head's PCA."""
    held_eval: ViewCache | None
    """View 0 of the held-out example, reduced (early stopping)."""
    n_views: int
    seconds: float


def _encode_examples(run: _Run, adapter: Adapter, split: _Split) -> _Encoded:
    """Step 1: make the views, encode them once, fit the head's PCA on them and reduce the cache."""
    c, model = run.config, run.model
    views = make_views(model, split.train, run.findings, split.n_views, run.rng, c.augment)
    # the held-out example: view 0 for early stopping, its other views only for the refit
    held_views = make_views(model, split.held, run.findings, split.n_views if c.refit else 1, run.rng, c.augment)
    prompt_emb = model.embed_prompts(adapter.prompts).clone().float()
    started = time.monotonic()
    args = (prompt_emb, adapter.config.head_resolution, c.unfreeze_last_stage, c.batch_size, run.steps.encoded)
    raw = encode_views(model, views, *args)
    raw_held = encode_views(model, held_views, *args) if held_views else None
    adapter.head.fit_reduction(raw.shallow, "shallow")
    adapter.head.fit_reduction(raw.deep, "deep")
    cache = raw.reduce(adapter.head, c.unfreeze_last_stage)
    held_eval = None
    if raw_held is not None:
        held_eval = raw_held.take(torch.tensor([0])).reduce(adapter.head, c.unfreeze_last_stage)
    n_views = len(views) + len(held_views)
    return _Encoded(raw, raw_held, cache, held_eval, n_views, time.monotonic() - started)


@dataclass
class _Fitted:
    """The head that is kept, how it was trained, and its Dice on the training examples."""

    adapter: Adapter
    stage: TunedStage | None
    trainer: _Trainer
    cache: ViewCache
    originals: torch.Tensor
    """Indices in ``cache`` of each training example's view 0 (the image as inference sees it)."""
    train: list[Example]
    history: list[dict[str, float]]
    best_epoch: int
    informative: bool
    """The held-out example's best Dice beat its zero-shot Dice (so its best epoch means something)."""
    zero_shot_train: float
    zero_shot_held: tuple[float, float] | None
    patience: int
    refit_history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    train_dice: float = 0.0
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def heldout_dice(self) -> float | None:
        return self.history[self.best_epoch - 1]["heldout_dice"] if self.informative else None


def _fit(run: _Run, adapter: Adapter, stage: TunedStage | None, split: _Split, enc: _Encoded) -> _Fitted:
    """Step 2: train the head (early stopping on the held-out example), then refit on every example."""
    c, threshold = run.config, adapter.config.threshold
    objective = _Objective(c.logit_scale, threshold, c.focal_weight)
    trainer = _Trainer(adapter.head, stage, objective, threshold, c, run.rng, run.steps.should_stop)
    cache = enc.cache
    originals = torch.tensor([i * split.n_views for i in range(len(split.train))])
    zs_train = _dice(cache.zero_shot[originals], cache.target[originals], cache.valid[originals],
                     cache.present[originals], threshold)  # fmt: skip
    zs_held = trainer.evaluate(enc.held_eval) if enc.held_eval is not None else None
    patience = c.patience_for(split.n_epochs)
    started = time.monotonic()
    history, best_epoch, best_state = trainer.fit(
        cache,
        split.n_epochs,
        enc.held_eval,
        patience,
        math.ceil(split.n_epochs / 2),
        run.steps.epochs("train", split.n_epochs),
    )
    informative = (
        enc.held_eval is not None
        and best_state is not None
        and history[best_epoch - 1]["heldout_dice"] > (zs_held[1] if zs_held else 0.0)
    )
    seconds = {"train": time.monotonic() - started, "refit": 0.0}
    fitted = _Fitted(adapter, stage, trainer, cache, originals, split.train, history, best_epoch, informative,
                     zs_train, zs_held, patience, seconds=seconds)  # fmt: skip
    chosen_epochs = best_epoch if informative else len(history)
    if enc.raw_held is not None and c.refit and chosen_epochs > 0:
        fitted = _refit(run, split, enc, fitted, chosen_epochs)
    elif informative:
        trainer.load(best_state)
    fitted.train_dice = fitted.trainer.evaluate(fitted.cache.take(fitted.originals))[1]
    fitted.adapter.head.eval()
    return fitted


def _refit(run: _Run, split: _Split, enc: _Encoded, fitted: _Fitted, epochs: int) -> _Fitted:
    """A fresh head on every example (the held-out one too) for the chosen number of ``epochs``."""
    assert enc.raw_held is not None
    c = run.config
    started = time.monotonic()
    torch.manual_seed(c.seed + 1)
    adapter, stage = _new_head(run.model, run.findings, run.prompts, c)
    every = cat_views(enc.raw, enc.raw_held)
    adapter.head.fit_reduction(every.shallow, "shallow")
    adapter.head.fit_reduction(every.deep, "deep")
    old = fitted.trainer
    trainer = _Trainer(adapter.head, stage, old.objective, old.threshold, c, run.rng, run.steps.should_stop)
    history, _, _ = trainer.fit(
        every.reduce(adapter.head, c.unfreeze_last_stage), epochs, None, 0, 0, run.steps.epochs("refit", epochs)
    )
    train = split.examples if len(split.train) + 1 == len(split.examples) else split.train + split.held
    originals = torch.cat([fitted.originals, torch.tensor([len(enc.raw)])])
    cache = every.reduce(adapter.head, c.unfreeze_last_stage)
    seconds = {**fitted.seconds, "refit": time.monotonic() - started}
    return dataclasses.replace(fitted, adapter=adapter, stage=stage, trainer=trainer, cache=cache,
                               originals=originals, train=train, refit_history=history, seconds=seconds)  # fmt: skip


def _cross_validate(
    run: _Run, adapter: Adapter, examples: list[Example], folds: list[int]
) -> tuple[dict[str, Any] | None, float]:
    """Step 3: leave-one-out fits choose the correction's weight (``adapter.config.blend``); with ``bag``
    their heads become the adapter's members. Returns (the report or None without folds, seconds)."""
    if not folds:
        return None, 0.0
    started = time.monotonic()
    c = run.config
    grid = sorted({float(b) for b in c.blend_grid} | {0.0})
    scores: dict[float, list[float]] = {b: [] for b in grid}
    fitted = []
    for n, idx in enumerate(folds):
        rest = [ex for i, ex in enumerate(examples) if i != idx]
        fold_config = dataclasses.replace(c, cv_folds=0, seed=c.seed + 1 + n)
        fold = finetune(run.model, rest, run.findings, fold_config, prompts=adapter.prompts,
                        should_stop=run.steps.should_stop, progress=_fold_progress(run.steps, n))  # fmt: skip
        fitted.append(fold)
        _score_blends(run.model, fold, examples[idx], run.findings, scores)
        run.steps.advance(1, "validate", fold=n + 1)
    mean = {b: float(np.mean(v)) for b, v in scores.items()}
    best = max(grid, key=lambda b: (round(mean[b], 6), -b))
    report = {
        "left_out": [examples[i].id for i in folds],
        "dice_by_blend": {f"{b:g}": round(mean[b], 4) for b in grid},
        "zero_shot_dice": round(mean[0.0], 4),
        "blend": best,
    }
    adapter.config.blend = best
    if c.bag:
        adapter.set_members([(a.head, a.stage) for a in fitted])
    return report, time.monotonic() - started


def _fold_progress(steps: _Steps, n: int) -> ProgressCallback:
    """Progress inside leave-one-out fit ``n`` (0-based): the step stays, ``fold_step`` of ``fold_total`` moves."""
    return lambda e: steps.emit({"phase": "validate", "step": steps.done, "total": steps.total, "fold": n + 1,
                                 "fold_step": e["step"], "fold_total": e["total"]})  # fmt: skip


def _score_blends(model: AFLoc, fold: Adapter, left: Example, findings: list[str], scores: dict[float, list]) -> None:
    """Append the left-out example's Dice (model threshold, full resolution) at every blend weight."""
    [(zero_shot, correction)] = adapter_components(model, fold, [left.image])
    for b in scores:
        heat = np.clip(zero_shot + b * correction, -1.0, 1.0)
        for j, f in enumerate(findings):
            if f in left.masks:  # masks are never empty (parse_examples)
                _, dice = iou_dice_at_thresholds(heat[j], left.masks[f], [model.config.threshold])
                scores[b].append(float(dice[0]))


def _describe(
    run: _Run,
    split: _Split,
    enc: _Encoded,
    fitted: _Fitted,
    validation: tuple[dict[str, Any] | None, float],
    total_s: float,
) -> Adapter:
    """Step 4: record the settings, what ran and the metrics on the kept adapter."""
    adapter, c = fitted.adapter, run.config
    report, validate_s = validation
    adapter.stage = fitted.stage.eval() if fitted.stage is not None else None
    adapter.example_ids = [ex.id for ex in fitted.train]
    adapter.heldout_ids = [ex.id for ex in split.held] if not fitted.refit_history else []
    adapter.config.finetune = c.to_dict()
    adapter.config.training = {
        "epochs": split.n_epochs,
        "views_per_example": split.n_views,
        "batch_size": c.batch_size,
        "lr": c.lr,
        "stage_lr": c.stage_lr if c.unfreeze_last_stage else None,
        "weight_decay": c.weight_decay,
        "focal_weight": c.focal_weight,
        "patience": fitted.patience if enc.held_eval is not None else None,
        "refit": bool(fitted.refit_history),
        "cv_folds": len(split.folds),
        "bag": bool(split.folds) and c.bag,
        "blend_grid": list(c.blend_grid),
        "seed": c.seed,
        "augment": c.augment.to_dict(),
    }
    seconds = {**fitted.seconds, "encode": enc.seconds, "validate": validate_s, "total": total_s}
    adapter.metrics = _metrics(run, split, enc, fitted, report, seconds)
    return adapter


def _metrics(
    run: _Run, split: _Split, enc: _Encoded, fitted: _Fitted, validation: dict[str, Any] | None,
    seconds: dict[str, float],
) -> dict[str, Any]:  # fmt: skip
    """The adapter's ``metrics.json``: sizes, Dice before and after, the validation report, timings."""
    held = enc.held_eval is not None
    return {
        "n_examples": len(split.examples),
        "n_train_examples": len(fitted.train),
        "heldout_example": split.held[0].id if split.held else None,
        "n_cached_views": enc.n_views,
        "epochs_run": len(fitted.history),
        "best_epoch": fitted.best_epoch if fitted.informative else None,
        "heldout_informative": fitted.informative if held else None,
        "refit_epochs": len(fitted.refit_history) if fitted.refit_history else None,
        "train_dice_zero_shot": fitted.zero_shot_train,
        "train_dice": fitted.train_dice,
        "heldout_dice_zero_shot": fitted.zero_shot_held[1] if fitted.zero_shot_held else None,
        "heldout_dice": fitted.heldout_dice,
        "dice_note": "Dice of heatmap > threshold on the head grid (R x R over the canvas), letterbox padding "
        "excluded; heldout_dice is that of the best epoch before the refit on all examples",
        "validation": validation,
        "blend": fitted.adapter.config.blend,
        "warnings": _warnings(split.examples, run.findings, split.folds, validation),
        "history": fitted.history,
        "refit_history": fitted.refit_history,
        "seconds": {k: round(seconds[k], 3) for k in ("encode", "train", "refit", "validate", "total")},
        "device": str(run.model.device),
        "torch_threads": torch.get_num_threads(),
    }


def _pick_heldout(examples: list[Example], findings: list[str], rng: np.random.Generator) -> int | None:
    """Index of the example to hold out (>= 4 examples), keeping every finding in the training set."""
    if len(examples) < 4:
        return None
    picked = _pick_folds(examples, findings, 1, rng)
    return picked[0] if picked else None


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
        config: FinetuneConfig,
        rng: np.random.Generator,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        """``config`` gives the optimiser settings, batch size, augmentation and the batch-order seed;
        ``rng`` draws the feature-space augmentation; ``should_stop`` is polled every step."""
        self.head, self.stage, self.objective, self.threshold = head, stage, objective, threshold
        self.config, self.rng, self.should_stop = config, rng, should_stop
        self.generator = torch.Generator().manual_seed(config.seed)

    def heat(self, v: ViewCache) -> torch.Tensor:
        """Adapted heatmaps (N, F, R, R) = zero-shot + the head's correction."""
        deep = self.head.reduce(self.stage(v.deep), "deep") if self.stage is not None else v.deep
        return v.zero_shot + self.head(v.shallow, deep, v.zero_shot, v.image)

    def evaluate(self, v: ViewCache) -> tuple[float, float]:
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
        cache: ViewCache,
        epochs: int,
        held: ViewCache | None,
        patience: int,
        min_epochs: int,
        on_epoch: Callable[[dict[str, float]], None],
    ) -> tuple[list[dict[str, float]], int, dict[str, Any] | None]:
        """Train for ``epochs`` (cosine learning rate). With ``held``: keep the best held-out state and stop
        after ``patience`` epochs without improvement (not before ``min_epochs``).

        Returns (history, best epoch (0: none), best state or None).
        """
        c = self.config
        params = [{"params": list(self.head.parameters()), "lr": c.lr}]
        if self.stage is not None:
            params.append({"params": list(self.stage.parameters()), "lr": c.stage_lr})
        optimiser = torch.optim.AdamW(params, weight_decay=c.weight_decay)
        total_steps = max(1, epochs * math.ceil(len(cache) / c.batch_size))
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
            for start in range(0, len(order), c.batch_size):
                if self.should_stop is not None and self.should_stop():
                    raise FinetuneCancelled("fine-tuning cancelled")
                batch = shift_scale(cache.take(order[start : start + c.batch_size]), self.rng, c.augment)
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
    model: AFLoc, findings: list[str], prompts: Sequence[str] | None, config: FinetuneConfig
) -> tuple[Adapter, TunedStage | None]:
    """A fresh (zero-output) adapter on the model's device, and a copy of the last stage when it is tuned."""
    c = config
    adapter = create_adapter(
        model, findings, prompts, width=c.width, fine_width=max(8, c.width // 2), in_dim=c.feature_dim
    )
    if c.head_resolution:
        adapter.config.head_resolution = int(c.head_resolution)
    adapter.config.logit_scale = c.logit_scale
    adapter.config.unfreeze_last_stage = c.unfreeze_last_stage
    adapter.head.to(model.device)
    stage = TunedStage.from_encoder(model.model.image_encoder).to(model.device) if c.unfreeze_last_stage else None
    return adapter, stage


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
