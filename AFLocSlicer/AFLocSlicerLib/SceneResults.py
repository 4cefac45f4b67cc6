"""AFLoc results in the MRML scene: import an engine output folder, find runs again, re-threshold, remove.

:func:`importResults` reads one engine output folder (``results.json``, ``heatmap_<slug>.nrrd``,
``masks.seg.nrrd``; see ``afloc_engine/outputs.py``) and adds, beside the input volume in the
subject hierarchy, one *run*: a heatmap scalar volume per prompt (float32, the input's
IJK-to-RAS), one segmentation (a segment per prompt with its terminology, reference geometry =
the input) and a table of probabilities and mask sizes. All or nothing (:class:`Scene.SceneTransaction`).

Each run is named and tagged with its model and adapter (``AFLoc.ModelId``, ``AFLoc.Adapter``,
``AFLoc.Run``), so a zero-shot run and an adapter run of the same image sit side by side.
:func:`runsFor` / :func:`resultsFor` find them again from the scene (references and attributes
survive saving and reloading), :func:`updateMasks` re-thresholds without a network run,
:func:`removeResults` removes one run. How they are shown is :mod:`AFLocSlicerLib.Display`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from AFLocSlicerLib import Terminology
from AFLocSlicerLib.Errors import AFLocSlicerError
from AFLocSlicerLib.Scene import (
    ROLE,
    SceneTransaction,
    formatArea,
    placeBeside,
    removeNodeAndHelpers,
    setSegmentMask,
    volumeArray,
)

log = logging.getLogger(__name__)

PROMPT = "AFLoc.Prompt"
PROBABILITY = "AFLoc.Probability"
SEGMENT_ID = "AFLoc.SegmentID"
THRESHOLD = "AFLoc.Threshold"
MODEL_ID = "AFLoc.ModelId"
ADAPTER = "AFLoc.Adapter"
"""Node attribute: the adapter folder a run used ('' for zero-shot)."""
RUN_ID = "AFLoc.RunId"
"""Node attribute: the run's number among the runs of its input (1, 2, ...), on every node of the run."""
RUN_LABEL = "AFLoc.Run"
"""Node attribute: the run's label for people, e.g. 'default #1' or 'default + ggo-20261129 #2'."""
TRAINED = "AFLoc.Trained"
INPUT_REFERENCE = "AFLocInput"
HEATMAP_REFERENCE = "AFLocHeatmap"
OUTPUT_ROLES = ("heatmap", "segmentation", "table", "labelmap")


@dataclass
class AFLocResults:
    """One run (one localisation) of ``inputVolume`` in the scene, in prompt order."""

    inputVolume: Any
    prompts: list[str] = field(default_factory=list)
    heatmaps: list[Any] = field(default_factory=list)
    segmentIds: list[str] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    segmentation: Any = None
    table: Any = None
    labelmap: Any = None
    threshold: float = 0.3
    modelId: str = ""
    adapter: str = ""
    runId: int = 0
    label: str = ""
    trained: bool = False

    def nodes(self) -> list[Any]:
        """Every output node of the run (heatmaps, segmentation, table, label map)."""
        return [n for n in [*self.heatmaps, self.segmentation, self.table, self.labelmap] if n is not None]

    @property
    def findings(self) -> list[str]:
        """Segment names, in prompt order."""
        seg = self.segmentation.GetSegmentation()
        return [seg.GetSegment(s).GetName() for s in self.segmentIds]

    def maskShares(self) -> list[float]:
        """Share of the image each segment covers (0..1), in prompt order (from the table)."""
        table = self.table.GetTable() if self.table is not None else None
        column = table.GetColumnByName(SHARE_COLUMN) if table is not None else None
        if column is None:
            return [math.nan] * len(self.segmentIds)
        return [column.GetValue(i) / 100.0 for i in range(column.GetNumberOfTuples())]


def runLabel(modelId: str, adapter: str, runId: int) -> str:
    """'default #1', 'default + ggo-20261129-1200 #2': the model's name, the adapter folder's name, the run."""
    model = (modelId or "model").split("@", 1)[0]
    adapterName = Path(adapter).name if adapter else ""
    return f"{model}{' + ' + adapterName if adapterName else ''} #{runId}"


def _outputsOf(scene: Any, inputVolume: Any) -> list[Any]:
    found = []
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node.GetAttribute(ROLE) in OUTPUT_ROLES:
            ref = node.GetNodeReference(INPUT_REFERENCE)
            if ref is not None and ref.GetID() == inputVolume.GetID():
                found.append(node)
    return found


def _runOf(node: Any) -> int:
    try:
        return int(node.GetAttribute(RUN_ID) or 0)
    except ValueError:
        return 0


def _results(inputVolume: Any, segNode: Any, nodes: list[Any]) -> AFLocResults:
    runId = _runOf(segNode)
    results = AFLocResults(inputVolume, segmentation=segNode, runId=runId)
    results.threshold = float(segNode.GetAttribute(THRESHOLD) or 0.3)
    results.modelId = segNode.GetAttribute(MODEL_ID) or ""
    results.adapter = segNode.GetAttribute(ADAPTER) or ""
    results.label = segNode.GetAttribute(RUN_LABEL) or runLabel(results.modelId, results.adapter, runId)
    results.trained = (segNode.GetAttribute(TRAINED) or "false") == "true"
    for i in range(segNode.GetNumberOfNodeReferences(HEATMAP_REFERENCE)):
        heat = segNode.GetNthNodeReference(HEATMAP_REFERENCE, i)
        if heat is None:
            continue
        results.heatmaps.append(heat)
        results.prompts.append(heat.GetAttribute(PROMPT) or heat.GetName())
        results.probabilities.append(float(heat.GetAttribute(PROBABILITY) or "nan"))
        results.segmentIds.append(heat.GetAttribute(SEGMENT_ID) or "")
    for node in nodes:
        if _runOf(node) != runId:
            continue
        role = node.GetAttribute(ROLE)
        if role == "table":
            results.table = node
        elif role == "labelmap":
            results.labelmap = node
    return results


def runsFor(scene: Any, inputVolume: Any) -> list[AFLocResults]:
    """Every AFLoc run of ``inputVolume`` in the scene, oldest first (empty list when none)."""
    if inputVolume is None:
        return []
    nodes = _outputsOf(scene, inputVolume)
    segmentations = sorted((n for n in nodes if n.GetAttribute(ROLE) == "segmentation"), key=_runOf)
    return [_results(inputVolume, seg, nodes) for seg in segmentations]


def resultsFor(scene: Any, inputVolume: Any) -> AFLocResults | None:
    """The newest AFLoc run of ``inputVolume`` in the scene, or None."""
    runs = runsFor(scene, inputVolume)
    return runs[-1] if runs else None


def allRuns(scene: Any) -> list[AFLocResults]:
    """Every AFLoc run in the scene, of every input."""
    inputs: dict[str, Any] = {}
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node.GetAttribute(ROLE) == "segmentation":
            ref = node.GetNodeReference(INPUT_REFERENCE)
            if ref is not None:
                inputs[ref.GetID()] = ref
    return [run for volume in inputs.values() for run in runsFor(scene, volume)]


def readResultsJson(folder: Path) -> dict[str, Any]:
    """``results.json`` of an engine output folder, checked for what the import needs."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise AFLocSlicerError(f"the engine wrote no results.json in {folder}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AFLocSlicerError(f"{path}: results are not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), list) or not data["prompts"]:
        raise AFLocSlicerError(f"{path}: results hold no prompts")
    return data


def _readHeatmap(scene: Any, path: Path, inputVolume: Any, name: str) -> Any:
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(True)
    if not storage.ReadData(node):
        raise AFLocSlicerError(f"{path}: cannot read the heatmap volume")
    dims = node.GetImageData().GetDimensions()
    want = inputVolume.GetImageData().GetDimensions()
    if tuple(dims) != tuple(want):
        raise AFLocSlicerError(f"{path}: heatmap has {dims} voxels, the input '{inputVolume.GetName()}' {want}")
    # the input's geometry, exactly (file round trips through LPS/2D can lose an oblique direction)
    node.CopyOrientation(inputVolume)
    node.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
    if node.GetImageData().GetScalarType() != vtk.VTK_FLOAT:
        cast = vtk.vtkImageCast()
        cast.SetInputData(node.GetImageData())
        cast.SetOutputScalarTypeToFloat()
        cast.Update()
        node.SetAndObserveImageData(cast.GetOutput())
    return node


def _readMasks(path: Path, shape: tuple[int, ...], count: int) -> list[np.ndarray]:
    """The engine's ``masks.seg.nrrd`` -> ``count`` boolean (K, J, I) arrays on the input's voxel grid."""
    if not path.is_file():
        raise AFLocSlicerError(f"the engine wrote no segmentation file {path}")
    tmpScene = slicer.vtkMRMLScene()
    segNode = tmpScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(segNode):
        raise AFLocSlicerError(f"{path}: cannot read the segmentation")
    segmentation = segNode.GetSegmentation()
    if segmentation.GetNumberOfSegments() != count:
        raise AFLocSlicerError(f"{path}: {segmentation.GetNumberOfSegments()} segments for {count} prompts")
    masks = []
    for i in range(count):
        labelmap = slicer.vtkOrientedImageData()
        segNode.GetBinaryLabelmapRepresentation(segmentation.GetNthSegmentID(i), labelmap)
        mask = np.zeros(shape, dtype=bool)
        extent = labelmap.GetExtent()
        if extent[1] >= extent[0] and labelmap.GetPointData().GetScalars() is not None:
            dims = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
            values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims)
            k0, j0, i0 = extent[4], extent[2], extent[0]
            if (
                k0 < 0
                or j0 < 0
                or i0 < 0
                or k0 + dims[0] > shape[0]
                or j0 + dims[1] > shape[1]
                or i0 + dims[2] > shape[2]
            ):
                raise AFLocSlicerError(f"{path}: segment {i + 1} lies outside the input's voxel grid")
            mask[k0 : k0 + dims[0], j0 : j0 + dims[1], i0 : i0 + dims[2]] = values > 0
        masks.append(mask)
    return masks


SHARE_COLUMN = "Mask share (%)"
AREA_COLUMN = "Mask area"
PIXELS_COLUMN = "Mask pixels"


def _addTable(scene: Any, inputVolume: Any, data: dict[str, Any], findings: list[str], name: str) -> Any:
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    total = max(1, int(np.prod(inputVolume.GetImageData().GetDimensions())))
    columns = [
        ("Finding", vtk.vtkStringArray()),
        ("Prompt", vtk.vtkStringArray()),
        ("Probability", vtk.vtkDoubleArray()),
        (PIXELS_COLUMN, vtk.vtkIntArray()),
        (SHARE_COLUMN, vtk.vtkDoubleArray()),
        (AREA_COLUMN, vtk.vtkStringArray()),
    ]
    for column, array in columns:
        array.SetName(column)
    for finding, entry in zip(findings, data["prompts"]):
        pixels = int(entry.get("mask_pixels", 0))
        columns[0][1].InsertNextValue(finding)
        columns[1][1].InsertNextValue(str(entry.get("prompt", "")))
        columns[2][1].InsertNextValue(float(entry.get("probability", math.nan)))
        columns[3][1].InsertNextValue(pixels)
        columns[4][1].InsertNextValue(round(100.0 * pixels / total, 1))
        columns[5][1].InsertNextValue(formatArea(pixels, inputVolume))
    for _, array in columns:
        table.AddColumn(array)
    if hasattr(table, "SetUseColumnTitleAsColumnHeader"):
        table.SetUseColumnTitleAsColumnHeader(True)
    table.SetColumnDescription("Probability", "zero-shot P(finding present): the prompt against 'No <finding>'")
    table.SetColumnDescription(SHARE_COLUMN, "share of the image the mask covers")
    table.SetColumnDescription(AREA_COLUMN, "mask area; in pixels when the image has no pixel spacing (PNG/JPEG)")
    if not data.get("trained", False):
        table.SetAttribute("AFLoc.Warning", "untrained model: the probabilities mean nothing")
    return table


def _updateTablePixels(results: AFLocResults, masks: list[np.ndarray]) -> None:
    if results.table is None:
        return
    table = results.table.GetTable()
    pixels = table.GetColumnByName(PIXELS_COLUMN)
    share = table.GetColumnByName(SHARE_COLUMN)
    area = table.GetColumnByName(AREA_COLUMN)
    for row, mask in enumerate(masks):
        count = int(mask.sum())
        if pixels is not None and row < pixels.GetNumberOfTuples():
            pixels.SetValue(row, count)
        if share is not None and row < share.GetNumberOfTuples():
            share.SetValue(row, round(100.0 * count / max(1, mask.size), 1))
        if area is not None and row < area.GetNumberOfValues():
            area.SetValue(row, formatArea(count, results.inputVolume))
    table.Modified()
    results.table.Modified()


def importResults(scene: Any, inputVolume: Any, folder: Path, adapter: str = "") -> AFLocResults:
    """Add the engine's results for ``inputVolume`` from ``folder`` to the scene as a new run (all or nothing).

    ``adapter``: the adapter folder the engine applied ('' for zero-shot), recorded on the nodes and in
    their names. Earlier runs of the input stay. Returns the :class:`AFLocResults`; raises
    :class:`AFLocSlicerError` (scene unchanged) if the folder is incomplete or does not match the input.
    """
    folder = Path(folder)
    data = readResultsJson(folder)
    entries = data["prompts"]
    shape = tuple(reversed(inputVolume.GetImageData().GetDimensions()))
    base = inputVolume.GetName()
    runs = runsFor(scene, inputVolume)
    runId = max((r.runId for r in runs), default=0) + 1
    with SceneTransaction(scene):
        colorNode = Terminology.heatColorNode(scene)
        results = AFLocResults(inputVolume, runId=runId, adapter=str(adapter or ""))
        results.threshold = float(data.get("threshold", 0.3))
        results.modelId = str(data.get("model_id", ""))
        results.trained = bool(data.get("trained", False))
        results.label = runLabel(results.modelId, results.adapter, runId)
        findings = [str(e.get("segment") or e.get("prompt") or f"finding {i + 1}") for i, e in enumerate(entries)]
        for entry, finding in zip(entries, findings):
            heat = _readHeatmap(
                scene, folder / str(entry["heatmap"]), inputVolume, f"{base} AFLoc {finding} [{results.label}]"
            )
            heat.CreateDefaultDisplayNodes()
            display = heat.GetDisplayNode()
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(0.0, 1.0)
            display.SetAndObserveColorNodeID(colorNode.GetID())
            heat.SetAttribute(ROLE, "heatmap")
            heat.SetAttribute(PROMPT, str(entry.get("prompt", finding)))
            heat.SetAttribute(PROBABILITY, repr(float(entry.get("probability", math.nan))))
            heat.SetNodeReferenceID(INPUT_REFERENCE, inputVolume.GetID())
            results.heatmaps.append(heat)
            results.prompts.append(str(entry.get("prompt", finding)))
            results.probabilities.append(float(entry.get("probability", math.nan)))

        segNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{base} AFLoc segmentation [{results.label}]")
        segNode.CreateDefaultDisplayNodes()
        segNode.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        segNode.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        masks = _readMasks(
            folder / str(data.get("files", {}).get("segmentation", "masks.seg.nrrd")), shape, len(entries)
        )
        segmentation = segNode.GetSegmentation()
        for i, (finding, heat, mask) in enumerate(zip(findings, results.heatmaps, masks)):
            segmentId = segmentation.AddEmptySegment("", finding, list(Terminology.segmentColor(i)))
            segment = segmentation.GetSegment(segmentId)
            entry = Terminology.terminologyEntry(finding)
            if hasattr(segment, "SetTerminology"):
                segment.SetTerminology(entry)
            else:  # Slicer before 5.8 keeps the terminology in a tag
                segment.SetTag("TerminologyEntry", entry)
            setSegmentMask(segNode, segmentId, mask, inputVolume)
            heat.SetAttribute(SEGMENT_ID, segmentId)
            segNode.AddNodeReferenceID(HEATMAP_REFERENCE, heat.GetID())
            results.segmentIds.append(segmentId)
        segNode.SetAttribute(ROLE, "segmentation")
        segNode.SetAttribute(THRESHOLD, repr(results.threshold))
        segNode.SetNodeReferenceID(INPUT_REFERENCE, inputVolume.GetID())
        results.segmentation = segNode

        results.table = _addTable(scene, inputVolume, data, findings, f"{base} AFLoc probabilities [{results.label}]")
        results.table.SetAttribute(ROLE, "table")
        results.table.SetNodeReferenceID(INPUT_REFERENCE, inputVolume.GetID())
        for node in results.nodes():
            _tagRun(node, results)
            placeBeside(scene, node, inputVolume)
    return results


def _tagRun(node: Any, results: AFLocResults) -> None:
    node.SetAttribute(MODEL_ID, results.modelId)
    node.SetAttribute(ADAPTER, results.adapter)
    node.SetAttribute(RUN_ID, str(results.runId))
    node.SetAttribute(RUN_LABEL, results.label)
    node.SetAttribute(TRAINED, "true" if results.trained else "false")


def updateMasks(results: AFLocResults, threshold: float) -> list[np.ndarray]:
    """Re-threshold every heatmap at ``threshold`` into its segment (no network run); returns the masks."""
    if not -1.0 <= threshold <= 1.0:
        raise AFLocSlicerError(f"threshold {threshold} is outside the heatmap range [-1, 1]")
    masks = []
    segNode = results.segmentation
    wasModified = segNode.StartModify()
    try:
        for heat, segmentId in zip(results.heatmaps, results.segmentIds):
            mask = volumeArray(heat) > threshold
            setSegmentMask(segNode, segmentId, mask, results.inputVolume)
            masks.append(mask)
    finally:
        segNode.EndModify(wasModified)
    results.threshold = float(threshold)
    segNode.SetAttribute(THRESHOLD, repr(results.threshold))
    _updateTablePixels(results, masks)
    if results.labelmap is not None:
        exportLabelmap(results)
    return masks


def exportLabelmap(results: AFLocResults) -> Any:
    """A label map volume of all segments on the input's grid (label i+1 = prompt i), beside the input."""
    scene = results.inputVolume.GetScene()
    with SceneTransaction(scene):
        node = results.labelmap
        if node is None:
            node = scene.AddNewNodeByClass(
                "vtkMRMLLabelMapVolumeNode", f"{results.inputVolume.GetName()} AFLoc labels [{results.label}]"
            )
            node.SetAttribute(ROLE, "labelmap")
            node.SetNodeReferenceID(INPUT_REFERENCE, results.inputVolume.GetID())
            _tagRun(node, results)
        ids = vtk.vtkStringArray()
        for segmentId in results.segmentIds:
            ids.InsertNextValue(segmentId)
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.ExportSegmentsToLabelmapNode(results.segmentation, ids, node, results.inputVolume):
            raise AFLocSlicerError("cannot export the segments to a label map")
        node.CopyOrientation(results.inputVolume)
        display = node.GetDisplayNode()
        color = display.GetColorNode() if display is not None else None
        if (
            color is not None
            and color.GetAttribute(ROLE) is None
            and not color.GetSingletonTag()
            and not (color.GetID() or "").startswith(
                ("vtkMRMLColorTableNodeFile", "vtkMRMLColorTableNodeLabels", "vtkMRMLColorTableNodeGrey")
            )
        ):
            color.SetAttribute(ROLE, "labelcolors")  # made by the export for this label map: removed with it
        placeBeside(scene, node, results.inputVolume)
    results.labelmap = node
    return node


def removeResults(results: AFLocResults) -> None:
    """Remove every output node (and the heat colour table once no heatmap uses it)."""
    scene = results.inputVolume.GetScene()
    ids = {n.GetID() for n in results.nodes()}
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        for getter, setter in (
            ("GetForegroundVolumeID", "SetForegroundVolumeID"),
            ("GetBackgroundVolumeID", "SetBackgroundVolumeID"),
            ("GetLabelVolumeID", "SetLabelVolumeID"),
        ):
            if getattr(composite, getter)() in ids:
                getattr(composite, setter)(None)
    for node in results.nodes():
        for j in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0):
            display = node.GetNthDisplayNode(j)
            if display is not None and display.IsA("vtkMRMLColorLegendDisplayNode"):
                scene.RemoveNode(display)  # the heatmap's colour legend goes with it
        removeNodeAndHelpers(scene, node)
    colorNode = Terminology.heatColorNode(scene, create=False)
    if colorNode is not None and not any(
        scene.GetNthNode(i).GetAttribute(ROLE) == "heatmap" for i in range(scene.GetNumberOfNodes())
    ):
        scene.RemoveNode(colorNode)
