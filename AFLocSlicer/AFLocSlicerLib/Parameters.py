"""Typed access to the module's parameter node (a ``vtkMRMLScriptedModuleNode`` saved with the scene).

Works on any MRML scene (the Slicer application's or a headless one). Values are stored as
strings in the node, node selections as node references, lists as JSON, so everything the user
set survives saving and reloading the scene.
"""

from __future__ import annotations

import json
from typing import Any

MODULE_NAME = "AFLocSlicer"

DEFAULT_PROMPTS = ["Findings suggesting pneumothorax"]


class AFLocParameters:
    """The module's settings: input volume, prompts, threshold, device, model, adapter, display options.

    >>> params = AFLocParameters.get(scene)        # doctest: +SKIP
    >>> params.threshold = 0.4; params.prompts = ["Findings suggesting pleural effusion"]  # doctest: +SKIP
    """

    # name -> (default, type); lists are JSON
    FIELDS: dict[str, tuple[Any, type]] = {
        "prompts": (DEFAULT_PROMPTS, list),
        "threshold": (0.3, float),
        "device": ("auto", str),
        "model": ("default", str),
        "adapter": ("", str),
        "opacity": (0.5, float),
        "createLabelmap": (False, bool),
        "finding": ("", str),
        "epochs": (30, int),
        "trainingExamples": ([], list),
    }
    INPUT_REFERENCE = "InputVolume"

    def __init__(self, node: Any) -> None:
        self.__dict__["node"] = node

    @classmethod
    def get(cls, scene: Any, moduleName: str = MODULE_NAME) -> AFLocParameters:
        """The module's parameter node in ``scene`` (the same singleton Slicer's logic uses), created if absent."""
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

    # --- the input volume (a node reference) ---------------------------------------------------
    @property
    def inputVolume(self) -> Any:
        return self.node.GetNodeReference(self.INPUT_REFERENCE)

    @inputVolume.setter
    def inputVolume(self, volumeNode: Any) -> None:
        self.node.SetNodeReferenceID(self.INPUT_REFERENCE, volumeNode.GetID() if volumeNode else None)

    # --- plain values ------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name not in self.FIELDS:
            raise AttributeError(name)
        default, kind = self.FIELDS[name]
        text = self.node.GetParameter(name)
        if not text:
            return list(default) if kind is list else default
        try:
            if kind is list:
                value = json.loads(text)
                return value if isinstance(value, list) else list(default)
            if kind is bool:
                return text.lower() in ("1", "true", "yes")
            return kind(text)
        except (ValueError, json.JSONDecodeError):
            return list(default) if kind is list else default

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "inputVolume":
            object.__setattr__(self, name, value)
            return
        if name not in self.FIELDS:
            raise AttributeError(f"unknown AFLoc parameter {name!r}")
        kind = self.FIELDS[name][1]
        if kind is list:
            text = json.dumps(list(value))
        elif kind is bool:
            text = "true" if value else "false"
        else:
            text = str(kind(value))
        self.node.SetParameter(name, text)
