"""Colours and codes: the heatmap colour table, segment colours, and the segments' terminology.

Segment colours and finding codes come from :mod:`afloc_engine.protocol` (the engine writes the
same ones into its ``.seg.nrrd`` and DICOM SEG files); the protocol is imported when first needed,
so the module loads before the engine is installed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import slicer

from AFLocSlicerLib.Scene import ROLE

COLOR_NODE_NAME = "AFLoc heat (inferno)"
COLOR_ROLE = "colormap"

INFERNO_STOPS = np.array(
    [
        [0.000, 0.001, 0.000, 0.014],
        [0.125, 0.122, 0.047, 0.283],
        [0.250, 0.333, 0.060, 0.432],
        [0.375, 0.533, 0.134, 0.416],
        [0.500, 0.729, 0.212, 0.333],
        [0.625, 0.894, 0.353, 0.196],
        [0.750, 0.978, 0.557, 0.035],
        [0.875, 0.975, 0.788, 0.191],
        [1.000, 0.988, 0.998, 0.645],
    ]
)
"""Columns: value, R, G, B. A perceptually ordered map (dark purple -> red -> orange -> pale yellow), like inferno."""

OPACITY_START = 0.25
"""Heat below this (of the [0, 1] displayed range) is fully transparent: the image shows as it is."""
OPACITY_FULL = 0.85
"""Heat at and above this is drawn at :data:`OPACITY_MAX` (times the view's foreground opacity)."""
OPACITY_MAX = 0.95


def heatRGBA(values: np.ndarray | float) -> np.ndarray:
    """Heat in [0, 1] (clipped) -> (..., 4) RGBA in [0, 1]: inferno colours, smooth opacity ramp.

    The opacity rises as a smoothstep from 0 at :data:`OPACITY_START` to :data:`OPACITY_MAX` at
    :data:`OPACITY_FULL`: no step anywhere, transparent where the finding is unlikely.
    """
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.interp(v, INFERNO_STOPS[:, 0], INFERNO_STOPS[:, c]) for c in (1, 2, 3)], axis=-1)
    t = np.clip((v - OPACITY_START) / (OPACITY_FULL - OPACITY_START), 0.0, 1.0)
    alpha = OPACITY_MAX * t * t * (3 - 2 * t)
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


def heatColorNode(scene: Any, create: bool = True) -> Any:
    """The module's heat colour table (256 entries of :func:`heatRGBA`), created on first use."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
        if node.GetAttribute(ROLE) == COLOR_ROLE:
            return node
    if not create:
        return None
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(COLOR_NODE_NAME)
    node.SetTypeToUser()
    node.SetAttribute(ROLE, COLOR_ROLE)
    node.SetAttribute("Category", "AFLoc")
    node.SetHideFromEditors(False)
    count = 256
    node.SetNumberOfColors(count)
    node.GetLookupTable().SetTableRange(0, count - 1)
    rgba = heatRGBA(np.linspace(0.0, 1.0, count))
    for i, (r, g, b, a) in enumerate(rgba):
        node.SetColor(i, f"heat {i / (count - 1):.2f}", float(r), float(g), float(b), float(a))
    node.SetDescription(
        "AFLoc heatmap: inferno colours, transparent where the prompt is unlikely, opaque where it is likely"
    )
    return scene.AddNode(node)


def segmentColor(index: int) -> tuple[float, float, float]:
    """RGB (0..1) of segment ``index``: the engine's (``afloc_engine.protocol.SEGMENT_COLORS``)."""
    from afloc_engine import protocol

    return protocol.segment_color(index)


SEGMENTATION_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMY_CONTEXT = "Anatomic codes - DICOM master list"


def terminologyEntry(finding: str) -> str:
    """Slicer terminology string of a finding: SNOMED CT when known, a local ``99AFLOC`` code otherwise."""
    from afloc_engine import protocol

    scheme, code, meaning = protocol.finding_code(finding)
    categoryCode, categoryMeaning = protocol.CATEGORY_CODE
    category = f"{protocol.SNOMED}^{categoryCode}^{categoryMeaning}"
    return f"{SEGMENTATION_CONTEXT}~{category}~{scheme}^{code}^{meaning}~^^~{ANATOMY_CONTEXT}~^^~^^"
