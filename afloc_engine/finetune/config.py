"""The settings of one few-shot fine-tuning run: :class:`FinetuneConfig`.

``afloc_engine.finetune(model, examples, finding, **options)`` builds one from its keyword options
(each option is a field below); the adapter records it in ``adapter.json`` (``config.finetune``), so
``FinetuneConfig.from_dict(adapter.config.finetune)`` gives back the settings an adapter was made with.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from afloc_engine.errors import ConfigError
from afloc_engine.finetune.data import FinetuneAugmentConfig

DEFAULT_BLEND_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class FinetuneConfig:
    """How a few-shot adapter is trained. Validated on creation (:class:`ConfigError` names the field).

    Sizes of the data:
        epochs: passes over the cached views (None: about 200 optimiser steps, 15 to 300 epochs); 0
            trains nothing (the adapter is the zero-shot model).
        views: encoded views per training example, original included (None: ~16 images in all, 1 to 8 each).
        batch_size: views per optimiser step, and per encoder batch.
    Optimiser (AdamW, cosine schedule):
        lr: the head's learning rate. weight_decay: AdamW's. stage_lr: the tuned stage's learning rate.
    Objective (MONAI Dice + focal on sigmoid(logit_scale * (heatmap - threshold))):
        focal_weight: weight of the focal term (>= 0). logit_scale: k (> 0).
    Head:
        head_resolution: side R of the head's grid over the S x S canvas (None: S / 4, >= 32).
        width: head channels. feature_dim: PCA channels per feature level (at most the model's D).
        unfreeze_last_stage: also tune a copy of the encoder's last local stage (ResNet only; slower).
    Held-out example (>= 4 examples):
        patience: epochs without held-out improvement before stopping (None: a quarter of the epochs,
            at least 10). refit: after early stopping, retrain on all examples (the held-out one too).
    Correction weight:
        cv_folds: with >= 2 examples, up to this many leave-one-out fits (0: none) choose the weight
            ``blend`` from ``blend_grid`` (values >= 0) by the left-out examples' Dice; a head that
            does not beat the zero-shot heatmap on them gets ``blend`` 0.
        bag: keep the leave-one-out heads as members (pixel-wise median of the corrections).
    augment: the image-space and feature-space augmentation (:class:`FinetuneAugmentConfig`; a dict
        of its fields is accepted). seed: seeds initialisation, augmentation, the held-out pick and
        the batch order.
    """

    epochs: int | None = None
    views: int | None = None
    batch_size: int = 8
    lr: float = 1e-2
    weight_decay: float = 1e-4
    focal_weight: float = 1.0
    logit_scale: float = 4.0
    head_resolution: int | None = None
    width: int = 32
    feature_dim: int = 64
    unfreeze_last_stage: bool = False
    stage_lr: float = 1e-4
    patience: int | None = None
    refit: bool = True
    cv_folds: int = 3
    blend_grid: tuple[float, ...] = DEFAULT_BLEND_GRID
    bag: bool = True
    augment: FinetuneAugmentConfig = field(default_factory=FinetuneAugmentConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.augment is None:
            object.__setattr__(self, "augment", FinetuneAugmentConfig())
        elif isinstance(self.augment, Mapping):
            object.__setattr__(self, "augment", FinetuneAugmentConfig.from_dict(self.augment))
        elif not isinstance(self.augment, FinetuneAugmentConfig):
            raise ConfigError(f"augment must be a FinetuneAugmentConfig, not {type(self.augment).__name__}")
        if isinstance(self.blend_grid, (str, bytes)) or not isinstance(self.blend_grid, Sequence):
            raise ConfigError(f"blend_grid must be a list of weights, not {self.blend_grid!r}")
        object.__setattr__(self, "blend_grid", tuple(float(b) for b in self.blend_grid))
        self._check()

    def _check(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"{name} must be {rule}, not {getattr(self, name)!r}")

        need(self.epochs is None or self.epochs >= 0, "epochs", ">= 0 (or None: automatic)")
        need(self.views is None or self.views >= 0, "views", ">= 0 (0 or None: automatic)")
        need(self.batch_size >= 1, "batch_size", ">= 1")
        for name in ("lr", "stage_lr", "logit_scale"):
            need(math.isfinite(getattr(self, name)) and getattr(self, name) > 0, name, "> 0")
        for name in ("weight_decay", "focal_weight"):
            need(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name, ">= 0")
        need(
            self.head_resolution is None or self.head_resolution >= 0, "head_resolution", ">= 0 (0 or None: automatic)"
        )
        need(self.width >= 1, "width", ">= 1")
        need(self.feature_dim >= 1, "feature_dim", ">= 1")
        need(self.patience is None or self.patience >= 0, "patience", ">= 0 (or None: automatic)")
        need(self.cv_folds >= 0, "cv_folds", ">= 0")
        need(
            len(self.blend_grid) > 0 and all(math.isfinite(b) and b >= 0 for b in self.blend_grid),
            "blend_grid",
            "a non-empty list of weights >= 0",
        )

    @classmethod
    def from_options(cls, base: FinetuneConfig | None = None, **options: Any) -> FinetuneConfig:  # noqa: ANN401
        """``base`` (default settings when None) with ``options`` replacing fields of the same name.

        Raises :class:`TypeError` for an option that is not a field (as a misspelt keyword argument does).
        """
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"finetune() got an unexpected keyword argument {unknown[0]!r}")
        return dataclasses.replace(base or cls(), **options)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (``augment`` as a dict, ``blend_grid`` as a list)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["augment"] = self.augment.to_dict()
        data["blend_grid"] = list(self.blend_grid)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FinetuneConfig:
        """The inverse of :meth:`to_dict`; raises :class:`ConfigError` naming an unknown key."""
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown fine-tuning setting {unknown[0]!r}")
        return cls(**data)

    # --- what a run with this many examples does ---------------------------------------------------
    def views_for(self, n_train: int) -> int:
        """Views per training example: ``views``, or about 16 encoded images in all (1 to 8 each)."""
        return self.views or int(min(8, max(1, math.ceil(16 / max(1, n_train)))))

    def epochs_for(self, n_views: int, target_steps: int = 200) -> int:
        """Epochs over ``n_views`` cached views: ``epochs``, or about ``target_steps`` steps (15 to 300)."""
        if self.epochs is not None:
            return int(self.epochs)
        steps_per_epoch = math.ceil(n_views / self.batch_size)
        return int(min(300, max(15, round(target_steps / steps_per_epoch))))

    def patience_for(self, n_epochs: int) -> int:
        """Early-stopping patience: ``patience``, or a quarter of the epochs (at least 10)."""
        return self.patience if self.patience is not None else max(10, n_epochs // 4)
