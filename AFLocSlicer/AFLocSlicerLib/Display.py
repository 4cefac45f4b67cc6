"""How AFLoc results are shown in the slice views: results belong to their input.

- :func:`showResults` shows one run's heatmap ``index`` as the foreground over its input (the
  background) in every slice view, with a colour legend, and the run's mask of that prompt as a
  bold outline; every other AFLoc overlay in the scene (other inputs' and other runs'
  segmentations, legends and label maps) is hidden, because all radiographs sit at the RAS
  origin and would otherwise draw over each other.
- :func:`showInput` shows an input with its newest run, or the bare input (no AFLoc overlay at
  all) when it has none.

The panel and the Python API (``logic.localize``, ``logic.showInput``) both go through here.
"""

from __future__ import annotations

from typing import Any

import slicer

from AFLocSlicerLib import SceneResults
from AFLocSlicerLib.Errors import AFLocSlicerError
from AFLocSlicerLib.SceneResults import AFLocResults

OUTLINE_THICKNESS = 3
"""Mask outline width in slice views (pixels); Slicer's default is 1."""
LEGEND_SIZE = (0.12, 0.45)
"""Colour legend (width, height) as a fraction of the slice view."""
LEGEND_LABEL_FORMAT = "%.1f"


def sliceCompositeNodes(scene: Any) -> list[Any]:
    """Every slice view's composite node (which volumes a view blends)."""
    return [
        scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))
    ]


def colorLegend(heatmap: Any, create: bool = True) -> Any:
    """The colour legend display node of a heatmap volume (created on first use, hidden), or None."""
    for i in range(heatmap.GetNumberOfDisplayNodes()):
        node = heatmap.GetNthDisplayNode(i)
        if node is not None and node.IsA("vtkMRMLColorLegendDisplayNode"):
            return node
    if not create:
        return None
    legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(heatmap)
    if legend is None:
        return None
    legend.SetVisibility(False)
    legend.SetTitleText("AFLoc heat")
    legend.SetLabelFormat(LEGEND_LABEL_FORMAT)
    legend.SetNumberOfLabels(3)
    legend.SetSize(*LEGEND_SIZE)
    if hasattr(legend, "SetVisibility3D"):
        legend.SetVisibility3D(False)
    legend.SetAttribute(SceneResults.ROLE, "legend")
    return legend


def hideOverlays(scene: Any, keep: AFLocResults | None = None) -> None:
    """Hide every AFLoc segmentation and heatmap legend in the scene except those of ``keep``'s run;
    clear AFLoc label maps and heatmaps of other runs from the slice views' layers."""
    keepIds = {n.GetID() for n in keep.nodes()} if keep is not None else set()
    outputIds = set()
    for run in SceneResults.allRuns(scene):
        outputIds.update(n.GetID() for n in run.nodes())
        if keep is not None and run.segmentation.GetID() == keep.segmentation.GetID():
            continue
        display = run.segmentation.GetDisplayNode()
        if display is not None:
            display.SetVisibility(False)
        for heat in run.heatmaps:
            legend = colorLegend(heat, create=False)
            if legend is not None:
                legend.SetVisibility(False)
    for composite in sliceCompositeNodes(scene):
        for getter, setter in (
            ("GetForegroundVolumeID", "SetForegroundVolumeID"),
            ("GetLabelVolumeID", "SetLabelVolumeID"),
        ):
            shown = getattr(composite, getter)()
            if shown in outputIds and shown not in keepIds:
                getattr(composite, setter)(None)


def showResults(results: AFLocResults, index: int = 0, opacity: float = 0.8) -> None:
    """Show prompt ``index`` of one run: its input as background, its heatmap as foreground at ``opacity``
    with a colour legend, its mask as a bold outline; every other AFLoc overlay hidden (see module doc)."""
    scene = results.inputVolume.GetScene()
    if not 0 <= index < len(results.heatmaps):
        raise AFLocSlicerError(f"no heatmap number {index + 1} (there are {len(results.heatmaps)})")
    hideOverlays(scene, keep=results)
    heat = results.heatmaps[index]
    for composite in sliceCompositeNodes(scene):
        composite.SetBackgroundVolumeID(results.inputVolume.GetID())
        composite.SetForegroundVolumeID(heat.GetID())
        composite.SetForegroundOpacity(float(opacity))
        composite.SetLabelVolumeID(results.labelmap.GetID() if results.labelmap is not None else None)
    for other in results.heatmaps:
        legend = colorLegend(other, create=other is heat)
        if legend is not None:
            legend.SetVisibility(other is heat)
            if other is heat:
                legend.SetTitleText(f"{results.findings[index]} (heat)")
    display = results.segmentation.GetDisplayNode()
    if display is not None:
        display.SetVisibility(True)
        display.SetAllSegmentsVisibility(False)
        display.SetSegmentVisibility(results.segmentIds[index], True)
        display.SetVisibility2DFill(False)
        display.SetVisibility2DOutline(True)
        display.SetSliceIntersectionThickness(OUTLINE_THICKNESS)
        display.SetOpacity2DOutline(1.0)


def showInput(scene: Any, inputVolume: Any, opacity: float = 0.8, index: int = 0) -> AFLocResults | None:
    """Show ``inputVolume`` in every slice view with its newest run (prompt ``index``), or alone when it has
    none; other inputs' AFLoc overlays are hidden either way. Returns the run shown, or None."""
    results = SceneResults.resultsFor(scene, inputVolume)
    if results is not None:
        showResults(results, min(index, len(results.heatmaps) - 1), opacity)
        return results
    hideOverlays(scene, keep=None)
    for composite in sliceCompositeNodes(scene):
        if inputVolume is not None:
            composite.SetBackgroundVolumeID(inputVolume.GetID())
        composite.SetForegroundVolumeID(None)
    return None


def setOpacity(scene: Any, opacity: float) -> None:
    """Foreground (heatmap) opacity in every slice view, 0..1."""
    for composite in sliceCompositeNodes(scene):
        composite.SetForegroundOpacity(float(opacity))
