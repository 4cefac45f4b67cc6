"""What a localisation returns: heatmaps, masks and zero-shot probabilities of P prompts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from afloc_engine.io import ImageData
from afloc_engine.specificity import PromptSpecificity


@dataclass
class LocalizationResult:
    """Heatmaps, masks and zero-shot probabilities of P prompts on one image.

    heatmaps: (P, H, W) float32 in [-1, 1] on the input's pixel grid (same geometry as ``image``).
    masks: (P, H, W) bool, ``heatmaps > threshold``. probabilities: (P,) float32, P(finding
    present) from the prompt against its negative ("No {finding}"). adapter: with a few-shot
    adapter, what ``afloc_engine.finetune.adapter_usage`` says (its folder, weight, whether it kept
    the zero-shot map and why, the prompts it changed); None without one.
    """

    prompts: list[str]
    heatmaps: np.ndarray
    masks: np.ndarray
    probabilities: np.ndarray
    threshold: float
    image: ImageData
    model_id: str
    trained: bool
    negative_prompts: list[str] = field(default_factory=list)
    adapter: dict | None = None

    def with_threshold(self, threshold: float) -> LocalizationResult:
        """The same heatmaps thresholded anew (no network run); a result of the same type."""
        return dataclasses.replace(self, masks=self.heatmaps > threshold, threshold=float(threshold))

    def specificity(self) -> list[PromptSpecificity]:
        """Per prompt: how much its heatmap differs from the other prompts' and from a lung-field map,
        and a warning where it is not specific (:func:`afloc_engine.specificity.assess`)."""
        from afloc_engine.specificity import assess

        cached = self.__dict__.get("_specificity")  # computed once: results.json and the CLI both show it
        if cached is None:
            cached = self.__dict__["_specificity"] = assess(self.heatmaps, self.prompts)
        return cached


@dataclass
class VolumeResult(LocalizationResult):
    """The fields of :class:`LocalizationResult` for P prompts on one volume, plus how it was sliced.

    heatmaps: (P, Z, Y, X) float32 in [-1, 1] on the input's voxel grid (geometry in ``image``).
    masks: (P, Z, Y, X) bool, ``heatmaps > threshold``. probabilities: (P,) float32, P(finding
    present) = the maximum over slices (slice-wise) or of the whole volume (native 3D).
    slice_probabilities: (N, P) per slice along ``axis`` (slice-wise; (1, P) for a native 3D model).
    window: the (low, high) intensity window applied before the 2D normalisation.
    """

    axis: int = 0
    normalization: str = "volume"
    slice_probabilities: np.ndarray | None = None
    window: tuple[float, float] | None = None
