"""What gets evaluated: a predictor turns images and prompts into [-1, 1] heatmaps (and probabilities).

- :class:`ModelPredictor`: an AFLoc model, images batched through :meth:`AFLoc.localize_batch`;
- :class:`ConstantPredictor`: the same value everywhere (no localisation at all);
- :class:`PriorPredictor`: a fixed anatomical prior, a blurred template of each lung field's centre;
- :class:`LungFieldPredictor`: each image's own lung-field estimate (image processing, no learning);
- :class:`FunctionPredictor`: any ``fn(images, prompts) -> (heatmaps, probabilities | None)``.

The baselines ignore the prompt and give no probabilities (no AUROC).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from afloc_engine.io import ImageData
from afloc_engine.specificity import LUNG_FIELD_CENTRES, LUNG_FIELD_SIGMA, lung_field_map

LUNG_ESTIMATE_SIGMA = 0.02
"""Gaussian blur of the lung-field estimate's mask, as a fraction of the image's longest side,
before it is min-max normalised into a heatmap (:class:`LungFieldPredictor`)."""


@dataclass
class Prediction:
    """Output of a predictor for N images and P prompts.

    heatmaps: N arrays (P, H_i, W_i) float32 in [-1, 1], each on its image's pixel grid.
    probabilities: (N, P) float P(finding present), or None when the predictor does not classify.
    """

    heatmaps: list[np.ndarray]
    probabilities: np.ndarray | None = None


class Predictor:
    """Base class: ``predictor(images, prompts) -> Prediction``; ``name`` labels its results."""

    kind = "model"
    prompt_independent = False

    def __init__(self, name: str) -> None:
        self.name = name

    def describe(self) -> dict[str, Any]:
        """What the results record about this predictor."""
        return {"name": self.name, "kind": self.kind}

    def __call__(self, images: Sequence[ImageData], prompts: Sequence[str]) -> Prediction:
        raise NotImplementedError

    def close(self) -> None:
        """Undo any change made to a wrapped object (see :class:`ModelPredictor`)."""


class ConstantPredictor(Predictor):
    """The same heatmap value everywhere (default 1.0: every pixel above every threshold).

    With 1.0, IoU is the region's share of the image, CNR is 0 and the pointing game scores
    the region's share of the image (every pixel ties for the maximum).
    """

    kind = "baseline"
    prompt_independent = True

    def __init__(self, value: float = 1.0, name: str = "constant") -> None:
        super().__init__(name)
        if not -1.0 <= value <= 1.0:
            raise ValueError("a heatmap value must lie in [-1, 1]")
        self.value = float(value)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "value": self.value, "description": f"constant heatmap {self.value:g}"}

    def __call__(self, images: Sequence[ImageData], prompts: Sequence[str]) -> Prediction:
        maps = [np.full((len(prompts), *im.array.shape[-2:]), self.value, dtype=np.float32) for im in images]
        return Prediction(maps, None)


def lung_prior(
    shape: tuple[int, int],
    centres: Sequence[tuple[float, float]] = LUNG_FIELD_CENTRES,
    sigma: tuple[float, float] = LUNG_FIELD_SIGMA,
) -> np.ndarray:
    """(H, W) float32 heatmap in [-1, 1]: sum of a Gaussian at each lung field's centre, min-max normalised.

    ``centres`` and ``sigma`` are fractions of the width (x) and height (y) of the image
    (:func:`afloc_engine.specificity.lung_field_map`).
    """
    return lung_field_map(shape, centres, sigma)


class AnatomyBaseline(Predictor):
    """A baseline that gives every prompt the same map of the image's anatomy: :meth:`heatmap` per image."""

    kind = "baseline"
    prompt_independent = True

    def heatmap(self, image: ImageData) -> np.ndarray:
        """(H, W) float32 heatmap in [-1, 1] of one image, for every prompt."""
        raise NotImplementedError

    def __call__(self, images: Sequence[ImageData], prompts: Sequence[str]) -> Prediction:
        return Prediction([np.repeat(self.heatmap(im)[None], len(prompts), axis=0) for im in images], None)


class PriorPredictor(AnatomyBaseline):
    """The lung-field prior of :func:`lung_prior` for every prompt (anatomy, not learned)."""

    def __init__(self, name: str = "prior") -> None:
        super().__init__(name)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "description": "blurred template of each lung field's centre (fixed from anatomy)",
            "centres_xy": [list(c) for c in LUNG_FIELD_CENTRES],
            "sigma_xy": list(LUNG_FIELD_SIGMA),
        }

    def heatmap(self, image: ImageData) -> np.ndarray:
        return lung_prior(tuple(image.array.shape[-2:]))  # type: ignore[arg-type]


def lung_field_heatmap(image: ImageData, sigma: float = LUNG_ESTIMATE_SIGMA) -> np.ndarray:
    """(H, W) float32 heatmap in [-1, 1] of one 2D image's own lung fields (no learning, no masks).

    The lung-field estimate of :func:`training.synthetic.lung_fields` (the two dark bands either
    side of the mediastinum, inside the body), blurred by ``sigma`` x the longest side and
    min-max normalised. An image where no lung field is found gets the fixed :func:`lung_prior`.
    """
    from scipy import ndimage

    from afloc_engine.transforms import normalize_intensity
    from training.synthetic import lung_fields

    grey = normalize_intensity(image.array, image.window)
    shape = tuple(grey.shape)
    fields = lung_fields(grey)
    if not fields.any():
        return lung_prior(shape)  # type: ignore[arg-type]
    smooth = ndimage.gaussian_filter(fields.astype(np.float32), sigma * max(shape))
    low, high = float(smooth.min()), float(smooth.max())
    if high <= low:
        return lung_prior(shape)  # type: ignore[arg-type]
    return (2 * (smooth - low) / (high - low) - 1).astype(np.float32)


class LungFieldPredictor(AnatomyBaseline):
    """Each image's own lung-field estimate (:func:`lung_field_heatmap`) for every prompt.

    A stronger baseline than :class:`PriorPredictor`: it follows the image's anatomy, but like it
    ignores the prompt. A model that scores no better than this has learnt where the lungs are.
    """

    def __init__(self, name: str = "lung_field") -> None:
        super().__init__(name)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "description": "the image's own lung-field estimate (training.synthetic.lung_fields), "
            f"blurred by {LUNG_ESTIMATE_SIGMA:g} x the longest side",
        }

    def heatmap(self, image: ImageData) -> np.ndarray:
        return lung_field_heatmap(image)


class ModelPredictor(Predictor):
    """An :class:`~afloc_engine.inference.AFLoc` model; images go through ``localize_batch`` in batches.

    Accepts an ``AFLoc`` or a bare :class:`~afloc_engine.models.AFLocModel` (e.g. from a trainer:
    it is switched to eval mode for the evaluation and back by :meth:`close`).
    """

    kind = "model"

    def __init__(
        self,
        model: Any,  # noqa: ANN401 (AFLoc or AFLocModel; imports stay lazy)
        name: str | None = None,
        batch_size: int = 8,
        threshold: float | None = None,
        similarity: str | None = None,
    ) -> None:
        from afloc_engine.checkpoint import ModelInfo
        from afloc_engine.inference import AFLoc
        from afloc_engine.models import AFLocModel

        self._restore: tuple[Any, bool] | None = None
        if isinstance(model, AFLocModel):
            self._restore = (model, model.training)
            device = next(model.parameters()).device
            model = AFLoc(model, ModelInfo(name=name or "model", version="in-memory", trained=True), device)
        if not isinstance(model, AFLoc):
            raise TypeError(f"expected an AFLoc or AFLocModel, got {type(model).__name__}")
        super().__init__(name or model.info.name)
        self.afloc = model
        self.batch_size = max(1, int(batch_size))
        self.threshold = threshold
        self.similarity = similarity

    def describe(self) -> dict[str, Any]:
        info = self.afloc.info
        return {
            **super().describe(),
            "model_id": info.model_id,
            "trained": info.trained,
            "path": None if info.path is None else str(info.path),
            "similarity": self.similarity or self.afloc.config.similarity,
        }

    def __call__(self, images: Sequence[ImageData], prompts: Sequence[str]) -> Prediction:
        heatmaps: list[np.ndarray] = []
        probs: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            chunk = list(images[start : start + self.batch_size])
            for r in self.afloc.localize_batch(chunk, list(prompts), self.threshold, self.similarity):
                heatmaps.append(r.heatmaps)
                probs.append(np.asarray(r.probabilities, dtype=np.float32))
        return Prediction(heatmaps, np.stack(probs) if probs else np.zeros((0, len(prompts)), np.float32))

    def close(self) -> None:
        if self._restore is not None:
            module, training = self._restore
            module.train(training)


PredictFn = Callable[[Sequence[ImageData], Sequence[str]], Any]


class FunctionPredictor(Predictor):
    """A plain function ``fn(images, prompts) -> Prediction | (heatmaps, probabilities | None)``."""

    def __init__(self, fn: PredictFn, name: str = "function") -> None:
        if not callable(fn):
            raise TypeError("fn must be callable")
        super().__init__(name)
        self.fn = fn

    def __call__(self, images: Sequence[ImageData], prompts: Sequence[str]) -> Prediction:
        out = self.fn(images, prompts)
        if isinstance(out, Prediction):
            return out
        heatmaps, probabilities = out
        return Prediction(
            [np.asarray(h, dtype=np.float32) for h in heatmaps],
            None if probabilities is None else np.asarray(probabilities, dtype=np.float32),
        )


PredictorLike = Any
"""A Predictor, an AFLoc / AFLocModel, or a predict function."""


def as_predictor(obj: PredictorLike, name: str | None = None, batch_size: int = 8) -> Predictor:
    """A :class:`Predictor` from a predictor, an ``AFLoc``/``AFLocModel``, or a predict function."""
    if isinstance(obj, Predictor):
        return obj
    from afloc_engine.inference import AFLoc
    from afloc_engine.models import AFLocModel

    if isinstance(obj, (AFLoc, AFLocModel)):
        return ModelPredictor(obj, name, batch_size)
    if callable(obj):
        return FunctionPredictor(obj, name=name or getattr(obj, "__name__", "function"))
    raise TypeError(f"cannot evaluate a {type(obj).__name__}: give an AFLoc model, a Predictor or a function")


BASELINES: dict[str, Callable[[], Predictor]] = {
    "constant": ConstantPredictor,
    "prior": PriorPredictor,
    "lung_field": LungFieldPredictor,
}


def baseline_predictors(names: Sequence[str]) -> list[Predictor]:
    """Baselines by name (``constant``, ``prior``, ``lung_field``); raises ValueError for an unknown one."""
    out = []
    for n in names:
        key = n.strip().lower()
        if not key:
            continue
        if key not in BASELINES:
            raise ValueError(f"unknown baseline {n!r}; choose from {', '.join(BASELINES)}")
        out.append(BASELINES[key]())
    return out
