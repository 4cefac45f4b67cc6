"""The module's settings: a typed dataclass, bound to the scene's parameter node in one place.

:class:`AFLocSettings` declares every setting with its type and default. :class:`AFLocParameters`
stores them in the module's ``vtkMRMLScriptedModuleNode`` (saved with the scene): plain values as
node parameters, the input volume and the training examples as node references (so they follow
the nodes when a scene is saved, reloaded or merged), a training example's segment and finding as
properties of its reference. (slicer-core, which the tests run on, has no ``parameterNodeWrapper``;
this binding works on both it and the Slicer application.)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

MODULE_NAME = "AFLocSlicer"
DEFAULT_PROMPTS = ["Findings suggesting pneumothorax"]
INPUT_REFERENCE = "InputVolume"
EXAMPLE_VOLUME_REFERENCE = "AFLocTrainingVolume"
EXAMPLE_SEGMENTATION_REFERENCE = "AFLocTrainingSegmentation"


@dataclass
class TrainingExample:
    """A (volume, segment) pair the user marked as a training example for ``finding``."""

    volume: Any
    segmentation: Any
    segmentId: str
    finding: str

    @property
    def label(self) -> str:
        """'volume / segment (finding)', as the panel lists it."""
        seg = self.segmentation.GetSegmentation().GetSegment(self.segmentId)
        return f"{self.volume.GetName()} / {seg.GetName() if seg else self.segmentId} ({self.finding})"

    def same(self, volume: Any, segmentation: Any, segmentId: str) -> bool:
        return self.volume is volume and self.segmentation is segmentation and self.segmentId == segmentId


@dataclass
class AFLocSettings:
    """Every setting of the module (what the panel shows; what scripts may set)."""

    inputVolume: Any = None
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    threshold: float | None = None
    """Mask threshold on the [-1, 1] heatmap; None: the model's own (calibrated) default."""
    device: str = "auto"
    model: str = "default"
    adapter: str = ""
    opacity: float = 0.8
    """Heatmap (foreground) opacity; the colour table is itself transparent where heat is low."""
    createLabelmap: bool = False
    replaceResults: bool = False
    """A new Localize replaces the input's earlier run of the same model and adapter (default: kept beside it)."""
    finding: str = ""
    epochs: int = 0
    """Fine-tuning epochs; 0: the engine's "auto"."""
    trainingExamples: list[TrainingExample] = field(default_factory=list)


_FIELDS = {f.name: f for f in dataclasses.fields(AFLocSettings)}
_SCALARS = {"threshold": float, "device": str, "model": str, "adapter": str, "opacity": float}
_SCALARS.update({"createLabelmap": bool, "replaceResults": bool, "finding": str, "epochs": int})


def _default(name: str) -> Any:  # noqa: ANN401
    f = _FIELDS[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


class AFLocParameters:
    """:class:`AFLocSettings` stored in the module's parameter node: ``params.threshold = 0.4`` writes it.

    >>> params = AFLocParameters.get(scene)        # doctest: +SKIP
    >>> params.prompts = ["Findings suggesting pleural effusion"]; params.settings()  # doctest: +SKIP
    """

    def __init__(self, node: Any) -> None:
        object.__setattr__(self, "node", node)

    @classmethod
    def get(cls, scene: Any, moduleName: str = MODULE_NAME) -> AFLocParameters:
        """The module's parameter node in ``scene`` (the singleton Slicer's logic uses), created if absent."""
        node = scene.GetSingletonNode(moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)  # CreateNodeByClass returns an owned reference
            node.SetSingletonTag(moduleName)
            node.SetName(scene.GenerateUniqueName(moduleName))
            node.SetAttribute("ModuleName", moduleName)
            node.SetHideFromEditors(True)
            node = scene.AddNode(node)
        return cls(node)

    def settings(self) -> AFLocSettings:
        """All settings at once."""
        return AFLocSettings(**{name: getattr(self, name) for name in _FIELDS})

    # --- reading ---------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:  # noqa: ANN401
        if name not in _FIELDS:
            raise AttributeError(name)
        if name == "inputVolume":
            return self.node.GetNodeReference(INPUT_REFERENCE)
        if name == "trainingExamples":
            return self._examples()
        text = self.node.GetParameter(name)
        if not text:
            return _default(name)
        try:
            if name == "prompts":
                value = json.loads(text)
                return [str(p) for p in value] if isinstance(value, list) else _default(name)
            kind = _SCALARS[name]
            if kind is bool:
                return text.lower() in ("1", "true", "yes")
            return kind(text)
        except (ValueError, json.JSONDecodeError):
            return _default(name)

    def _examples(self) -> list[TrainingExample]:
        node = self.node
        examples = []
        for i in range(node.GetNumberOfNodeReferences(EXAMPLE_VOLUME_REFERENCE)):
            volume = node.GetNthNodeReference(EXAMPLE_VOLUME_REFERENCE, i)
            segmentation = node.GetNthNodeReference(EXAMPLE_SEGMENTATION_REFERENCE, i)
            segmentId = node.GetNthNodeReferenceProperty(EXAMPLE_SEGMENTATION_REFERENCE, i, "segment") or ""
            finding = node.GetNthNodeReferenceProperty(EXAMPLE_SEGMENTATION_REFERENCE, i, "finding") or ""
            if volume is None or segmentation is None:
                continue
            if segmentation.GetSegmentation().GetSegment(segmentId) is None:
                continue
            examples.append(TrainingExample(volume, segmentation, segmentId, finding))
        return examples

    # --- writing ---------------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:  # noqa: ANN401
        if name not in _FIELDS:
            raise AttributeError(f"unknown AFLoc parameter {name!r}")
        node = self.node
        if name == "inputVolume":
            node.SetNodeReferenceID(INPUT_REFERENCE, value.GetID() if value is not None else None)
        elif name == "trainingExamples":
            self._setExamples(list(value))
        elif name == "prompts":
            node.SetParameter(name, json.dumps([str(p) for p in value]))
        elif value is None:
            node.SetParameter(name, "")
        else:
            kind = _SCALARS[name]
            node.SetParameter(name, ("true" if value else "false") if kind is bool else str(kind(value)))

    def _setExamples(self, examples: list[TrainingExample]) -> None:
        node = self.node
        wasModified = node.StartModify()
        try:
            node.RemoveNodeReferenceIDs(EXAMPLE_VOLUME_REFERENCE)
            node.RemoveNodeReferenceIDs(EXAMPLE_SEGMENTATION_REFERENCE)
            for i, example in enumerate(examples):
                node.AddNodeReferenceID(EXAMPLE_VOLUME_REFERENCE, example.volume.GetID())
                node.AddNodeReferenceID(EXAMPLE_SEGMENTATION_REFERENCE, example.segmentation.GetID())
                node.SetNthNodeReferenceProperty(EXAMPLE_SEGMENTATION_REFERENCE, i, "segment", example.segmentId)
                node.SetNthNodeReferenceProperty(EXAMPLE_SEGMENTATION_REFERENCE, i, "finding", example.finding)
        finally:
            node.EndModify(wasModified)
