"""AFLoc results in the MRML scene: heatmap volumes, the segmentation, the probability table.

Everything here works on a plain ``vtkMRMLScene`` (the Slicer application's or a headless one):

- :func:`importResults` reads one engine output folder (``results.json``, ``heatmap_<slug>.nrrd``,
  ``masks.seg.nrrd``; see ``afloc_engine/outputs.py``) and adds, beside the input volume in the
  subject hierarchy, one heatmap scalar volume per prompt (float32, IJK-to-RAS copied from the
  input, shown with the heat colour table), one segmentation node (a segment per prompt with a
  terminology entry, reference geometry = the input) and a table of zero-shot probabilities.
  If anything fails, every node it added is removed again (:class:`SceneTransaction`).
- :func:`resultsFor` finds them again from the scene (node references and attributes survive
  saving and reloading the scene), :func:`updateMasks` re-thresholds the heatmaps into the
  segments without running the network, :func:`removeResults` removes all of it.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from AFLocSlicerLib.Errors import AFLocSlicerError

log = logging.getLogger(__name__)

ROLE = "AFLoc.Role"
PROMPT = "AFLoc.Prompt"
PROBABILITY = "AFLoc.Probability"
THRESHOLD = "AFLoc.Threshold"
MODEL_ID = "AFLoc.ModelId"
TRAINED = "AFLoc.Trained"
INPUT_REFERENCE = "AFLocInput"
HEATMAP_REFERENCE = "AFLocHeatmap"
COLOR_NODE_NAME = "AFLoc heat"

# heat colour table stops (value in [0, 1] -> RGBA); alpha 0 at 0 so that cold regions leave the image untouched
HEAT_STOPS = np.array(
    [
        [0.00, 0.00, 0.00, 0.00, 0.00],
        [0.05, 0.50, 0.00, 0.00, 0.30],
        [0.40, 0.90, 0.10, 0.00, 0.75],
        [0.75, 1.00, 0.55, 0.00, 0.90],
        [1.00, 1.00, 0.95, 0.20, 1.00],
    ]
)
"""Columns: value, R, G, B, alpha. Dark red -> red -> orange -> yellow; never white, so hot stays visible on bone."""

# SNOMED CT codes of findings, so that DICOM SEG export carries a standard property type.
# Findings not listed get a local code (designator "99AFLOC", DICOM's private-scheme convention).
FINDING_CODES = {
    "atelectasis": ("46621007", "Atelectasis"),
    "cardiomegaly": ("8186001", "Cardiomegaly"),
    "consolidation": ("95436008", "Lung consolidation"),
    "edema": ("19242006", "Pulmonary edema"),
    "pulmonary edema": ("19242006", "Pulmonary edema"),
    "fracture": ("72704001", "Fracture"),
    "pleural effusion": ("60046008", "Pleural effusion"),
    "effusion": ("60046008", "Pleural effusion"),
    "pneumonia": ("233604007", "Pneumonia"),
    "pneumothorax": ("36118008", "Pneumothorax"),
}
CATEGORY = "SCT^49755003^Morphologically Altered Structure"
SEGMENTATION_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMY_CONTEXT = "Anatomic codes - DICOM master list"


# --- small MRML helpers --------------------------------------------------------------------------
def ijkToRasArray(volumeNode: Any) -> np.ndarray:
    """(4, 4) IJK-to-RAS matrix of a volume node (mm)."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def volumeArray(volumeNode: Any) -> np.ndarray:
    """Voxels of a scalar volume as a (K, J, I) numpy view (no copy)."""
    image = volumeNode.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise AFLocSlicerError(f"volume '{volumeNode.GetName()}' has no voxels")
    shape = tuple(reversed(image.GetDimensions()))
    components = image.GetNumberOfScalarComponents()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return array.reshape(shape + ((components,) if components > 1 else ()))


def subjectHierarchy(scene: Any) -> Any:
    """The scene's subject hierarchy node."""
    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def placeBeside(scene: Any, node: Any, referenceNode: Any) -> int:
    """Put ``node`` under the same subject-hierarchy parent as ``referenceNode`` (e.g. its study); item ID."""
    sh = subjectHierarchy(scene)
    refItem = sh.GetItemByDataNode(referenceNode)
    parent = sh.GetItemParent(refItem) if refItem else sh.GetSceneItemID()
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:  # headless scenes have no plugin that creates items automatically
        item = sh.CreateItem(parent, node)
    return item


def removeNodeAndHelpers(scene: Any, node: Any) -> None:
    """Remove a node with its display and storage nodes."""
    if node is None or scene.GetNodeByID(node.GetID()) is None:
        return
    helpers = []
    if hasattr(node, "GetNumberOfDisplayNodes"):
        helpers += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if hasattr(node, "GetNumberOfStorageNodes"):
        helpers += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    for display in list(helpers):  # a colour table made for this node only (label map export) goes too
        color = display.GetColorNode() if display is not None and hasattr(display, "GetColorNode") else None
        if color is not None and color.GetAttribute(ROLE) == "labelcolors":
            helpers.append(color)
    sh = subjectHierarchy(scene)
    item = sh.GetItemByDataNode(node) if sh is not None else 0
    if item:
        sh.RemoveItem(item, False, False)  # the item first: removing the data node alone may leave it behind
    if scene.GetNodeByID(node.GetID()) is not None:
        scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and scene.GetNodeByID(helper.GetID()) is not None:
            scene.RemoveNode(helper)


class SceneTransaction:
    """Context manager: if the block raises, every node added to the scene inside it is removed again."""

    def __init__(self, scene: Any) -> None:
        self.scene = scene
        self.before: set[str] = set()

    def __enter__(self) -> SceneTransaction:
        self.before = {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}
        return self

    def added(self) -> list[Any]:
        """Nodes added since the block started, newest first."""
        nodes = [self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes())]
        return [n for n in reversed(nodes) if n.GetID() not in self.before]

    def __exit__(self, excType: Any, exc: Any, tb: Any) -> bool:
        if excType is not None:
            for node in self.added():
                if self.scene.GetNodeByID(node.GetID()) is not None and not node.GetSingletonTag():
                    self.scene.RemoveNode(node)
        return False


# --- colours and terminology ------------------------------------------------------------------------
def heatColorNode(scene: Any, create: bool = True) -> Any:
    """The module's heat colour table (black-red-yellow-white, transparent at 0), created on first use."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
        if node.GetAttribute(ROLE) == "colormap":
            return node
    if not create:
        return None
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(COLOR_NODE_NAME)
    node.SetTypeToUser()
    node.SetAttribute(ROLE, "colormap")
    node.SetAttribute("Category", "AFLoc")
    node.SetHideFromEditors(False)
    count = 256
    node.SetNumberOfColors(count)
    node.GetLookupTable().SetTableRange(0, count - 1)
    for i in range(count):
        v = i / (count - 1)
        r, g, b, a = (float(np.interp(v, HEAT_STOPS[:, 0], HEAT_STOPS[:, c])) for c in (1, 2, 3, 4))
        node.SetColor(i, f"heat {i}", r, g, b, a)
    node.SetDescription("AFLoc heatmap colours: transparent where the prompt is unlikely, hot where it is likely")
    return scene.AddNode(node)


def segmentColor(index: int) -> tuple[float, float, float]:
    """A distinct RGB colour (0..1) for segment ``index``: the engine's, so the scene matches its files."""
    from afloc_engine.outputs import SEGMENT_COLORS

    return SEGMENT_COLORS[index % len(SEGMENT_COLORS)]


def terminologyEntry(finding: str, color: tuple[float, float, float] | None = None) -> str:
    """Slicer terminology string of a finding: SNOMED CT when known, a local ``99AFLOC`` code otherwise."""
    key = " ".join(finding.lower().replace("_", " ").split())
    if key in FINDING_CODES:
        code, meaning = FINDING_CODES[key]
        typeCode = f"SCT^{code}^{meaning}"
    else:
        slugText = "-".join(key.split())[:16] or "finding"
        meaning = finding.strip().replace("^", " ").replace("~", " ")[:64] or "Finding"
        typeCode = f"99AFLOC^{slugText}^{meaning}"
    return f"{SEGMENTATION_CONTEXT}~{CATEGORY}~{typeCode}~^^~{ANATOMY_CONTEXT}~^^~^^"


# --- the results of one input ---------------------------------------------------------------------
@dataclass
class AFLocResults:
    """The outputs of one localisation of ``inputVolume``, in prompt order."""

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
    trained: bool = False

    def nodes(self) -> list[Any]:
        """Every output node (heatmaps, segmentation, table, label map)."""
        return [n for n in [*self.heatmaps, self.segmentation, self.table, self.labelmap] if n is not None]

    @property
    def findings(self) -> list[str]:
        """Segment names, in prompt order."""
        seg = self.segmentation.GetSegmentation()
        return [seg.GetSegment(s).GetName() for s in self.segmentIds]


def _outputsOf(scene: Any, inputVolume: Any) -> list[Any]:
    found = []
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node.GetAttribute(ROLE) in ("heatmap", "segmentation", "table", "labelmap"):
            ref = node.GetNodeReference(INPUT_REFERENCE)
            if ref is not None and ref.GetID() == inputVolume.GetID():
                found.append(node)
    return found


def resultsFor(scene: Any, inputVolume: Any) -> AFLocResults | None:
    """The AFLoc outputs of ``inputVolume`` found in the scene, or None."""
    if inputVolume is None:
        return None
    nodes = _outputsOf(scene, inputVolume)
    segmentations = [n for n in nodes if n.GetAttribute(ROLE) == "segmentation"]
    if not segmentations:
        return None
    segNode = segmentations[-1]
    results = AFLocResults(inputVolume, segmentation=segNode)
    results.threshold = float(segNode.GetAttribute(THRESHOLD) or 0.3)
    results.modelId = segNode.GetAttribute(MODEL_ID) or ""
    results.trained = (segNode.GetAttribute(TRAINED) or "false") == "true"
    for i in range(segNode.GetNumberOfNodeReferences(HEATMAP_REFERENCE)):
        heat = segNode.GetNthNodeReference(HEATMAP_REFERENCE, i)
        if heat is None:
            continue
        results.heatmaps.append(heat)
        results.prompts.append(heat.GetAttribute(PROMPT) or heat.GetName())
        results.probabilities.append(float(heat.GetAttribute(PROBABILITY) or "nan"))
        results.segmentIds.append(heat.GetAttribute("AFLoc.SegmentID") or "")
    for node in nodes:
        role = node.GetAttribute(ROLE)
        if role == "table":
            results.table = node
        elif role == "labelmap":
            results.labelmap = node
    return results


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


def maskImageData(mask: np.ndarray, imageClass: Any = None) -> Any:  # noqa: ANN401 (a vtkImageData)
    """A (K, J, I) bool mask as a 0/1 uint8 ``imageClass`` (default ``vtk.vtkImageData``), no geometry."""
    image = (imageClass or vtk.vtkImageData)()
    k, j, i = mask.shape
    image.SetDimensions(i, j, k)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.astype(np.uint8).ravel()
    return image


def setSegmentMask(segmentationNode: Any, segmentId: str, mask: np.ndarray, referenceVolume: Any) -> None:
    """Replace a segment's binary labelmap by ``mask`` (K, J, I) bool on ``referenceVolume``'s voxel grid."""
    labelmap = maskImageData(mask, slicer.vtkOrientedImageData)
    matrix = vtk.vtkMatrix4x4()
    referenceVolume.GetIJKToRASMatrix(matrix)
    labelmap.SetImageToWorldMatrix(matrix)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(
        labelmap, segmentationNode, segmentId, logic.MODE_REPLACE, labelmap.GetExtent()
    ):
        raise AFLocSlicerError(f"cannot set the mask of segment {segmentId}")


def segmentMask(segmentationNode: Any, segmentId: str, referenceVolume: Any) -> np.ndarray:
    """A segment as a (K, J, I) bool array on ``referenceVolume``'s voxel grid (resampled when needed).

    Works on the segment's binary labelmap directly: nothing is added to the scene.
    """
    labelmap = slicer.vtkOrientedImageData()
    segmentationNode.GetBinaryLabelmapRepresentation(segmentId, labelmap)
    image = referenceVolume.GetImageData()
    dims = image.GetDimensions()
    shape = (dims[2], dims[1], dims[0])
    extent = labelmap.GetExtent()
    if extent[1] < extent[0] or labelmap.GetPointData().GetScalars() is None:
        return np.zeros(shape, dtype=bool)
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(image.GetExtent())
    matrix = vtk.vtkMatrix4x4()
    referenceVolume.GetIJKToRASMatrix(matrix)
    reference.SetImageToWorldMatrix(matrix)
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference, resampled, False, True
    ):
        raise AFLocSlicerError(
            f"cannot read segment {segmentId} of '{segmentationNode.GetName()}' on '{referenceVolume.GetName()}'"
        )
    out = np.zeros(shape, dtype=bool)
    e = resampled.GetExtent()
    if e[1] < e[0] or resampled.GetPointData().GetScalars() is None:
        return out
    size = (e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(size) > 0
    # place the resampled extent into the reference grid (clipped to it)
    k0, j0, i0 = max(e[4], 0), max(e[2], 0), max(e[0], 0)
    k1, j1, i1 = min(e[5] + 1, shape[0]), min(e[3] + 1, shape[1]), min(e[1] + 1, shape[2])
    if k1 > k0 and j1 > j0 and i1 > i0:
        out[k0:k1, j0:j1, i0:i1] = values[k0 - e[4] : k1 - e[4], j0 - e[2] : j1 - e[2], i0 - e[0] : i1 - e[0]]
    return out


def _addTable(scene: Any, inputVolume: Any, data: dict[str, Any], findings: list[str], pixelArea: float) -> Any:
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{inputVolume.GetName()} AFLoc probabilities")
    columns = [
        ("Finding", vtk.vtkStringArray()),
        ("Prompt", vtk.vtkStringArray()),
        ("Probability", vtk.vtkDoubleArray()),
        ("Mask pixels", vtk.vtkIntArray()),
        ("Mask area (mm2)", vtk.vtkDoubleArray()),
    ]
    for name, array in columns:
        array.SetName(name)
    for finding, entry in zip(findings, data["prompts"]):
        columns[0][1].InsertNextValue(finding)
        columns[1][1].InsertNextValue(str(entry.get("prompt", "")))
        columns[2][1].InsertNextValue(float(entry.get("probability", math.nan)))
        columns[3][1].InsertNextValue(int(entry.get("mask_pixels", 0)))
        columns[4][1].InsertNextValue(int(entry.get("mask_pixels", 0)) * pixelArea)
    for _, array in columns:
        table.AddColumn(array)
    table.SetUseColumnTitleAsColumnHeader(True) if hasattr(table, "SetUseColumnTitleAsColumnHeader") else None
    table.SetColumnDescription("Probability", "zero-shot P(finding present): the prompt against 'No <finding>'")
    if not data.get("trained", False):
        table.SetAttribute("AFLoc.Warning", "untrained model: the probabilities mean nothing")
    return table


def _updateTablePixels(results: AFLocResults, masks: list[np.ndarray]) -> None:
    if results.table is None:
        return
    table = results.table.GetTable()
    pixels = table.GetColumnByName("Mask pixels")
    area = table.GetColumnByName("Mask area (mm2)")
    pixelArea = _pixelArea(results.inputVolume)
    for row, mask in enumerate(masks):
        if pixels is not None and row < pixels.GetNumberOfTuples():
            pixels.SetValue(row, int(mask.sum()))
        if area is not None and row < area.GetNumberOfTuples():
            area.SetValue(row, float(mask.sum()) * pixelArea)
    table.Modified()
    results.table.Modified()


def _pixelArea(volumeNode: Any) -> float:
    """Area of one voxel's in-plane face in mm^2 (for 2D images: one pixel)."""
    spacing = volumeNode.GetSpacing()
    return float(spacing[0] * spacing[1])


def importResults(scene: Any, inputVolume: Any, folder: Path) -> AFLocResults:
    """Add the engine's results for ``inputVolume`` from ``folder`` to the scene (all or nothing).

    Returns the :class:`AFLocResults`; raises :class:`AFLocSlicerError` (scene unchanged) if the
    folder is incomplete or does not match the input.
    """
    folder = Path(folder)
    data = readResultsJson(folder)
    entries = data["prompts"]
    shape = tuple(reversed(inputVolume.GetImageData().GetDimensions()))
    base = inputVolume.GetName()
    with SceneTransaction(scene):
        colorNode = heatColorNode(scene)
        results = AFLocResults(inputVolume)
        results.threshold = float(data.get("threshold", 0.3))
        results.modelId = str(data.get("model_id", ""))
        results.trained = bool(data.get("trained", False))
        findings = [str(e.get("segment") or e.get("prompt") or f"finding {i + 1}") for i, e in enumerate(entries)]
        for entry, finding in zip(entries, findings):
            heat = _readHeatmap(scene, folder / str(entry["heatmap"]), inputVolume, f"{base} AFLoc {finding}")
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

        segNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{base} AFLoc segmentation")
        segNode.CreateDefaultDisplayNodes()
        segNode.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        segNode.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        masks = _readMasks(
            folder / str(data.get("files", {}).get("segmentation", "masks.seg.nrrd")), shape, len(entries)
        )
        segmentation = segNode.GetSegmentation()
        for i, (finding, heat, mask) in enumerate(zip(findings, results.heatmaps, masks)):
            color = segmentColor(i)
            segmentId = segmentation.AddEmptySegment("", finding, list(color))
            segment = segmentation.GetSegment(segmentId)
            entry = terminologyEntry(finding, color)
            if hasattr(segment, "SetTerminology"):
                segment.SetTerminology(entry)
            else:  # Slicer before 5.8 keeps the terminology in a tag
                segment.SetTag("TerminologyEntry", entry)
            setSegmentMask(segNode, segmentId, mask, inputVolume)
            heat.SetAttribute("AFLoc.SegmentID", segmentId)
            segNode.AddNodeReferenceID(HEATMAP_REFERENCE, heat.GetID())
            results.segmentIds.append(segmentId)
        segNode.SetAttribute(ROLE, "segmentation")
        segNode.SetAttribute(THRESHOLD, repr(results.threshold))
        segNode.SetAttribute(MODEL_ID, results.modelId)
        segNode.SetAttribute(TRAINED, "true" if results.trained else "false")
        segNode.SetNodeReferenceID(INPUT_REFERENCE, inputVolume.GetID())
        results.segmentation = segNode

        results.table = _addTable(scene, inputVolume, data, findings, _pixelArea(inputVolume))
        results.table.SetAttribute(ROLE, "table")
        results.table.SetNodeReferenceID(INPUT_REFERENCE, inputVolume.GetID())
        for node in results.nodes():
            placeBeside(scene, node, inputVolume)
    return results


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
            node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{results.inputVolume.GetName()} AFLoc labels")
            node.SetAttribute(ROLE, "labelmap")
            node.SetNodeReferenceID(INPUT_REFERENCE, results.inputVolume.GetID())
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


def showResults(results: AFLocResults, index: int = 0, opacity: float = 0.5) -> None:
    """Show prompt ``index``: input as background, its heatmap as foreground at ``opacity``, in every slice view."""
    scene = results.inputVolume.GetScene()
    if not 0 <= index < len(results.heatmaps):
        raise AFLocSlicerError(f"no heatmap number {index + 1} (there are {len(results.heatmaps)})")
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        composite.SetBackgroundVolumeID(results.inputVolume.GetID())
        composite.SetForegroundVolumeID(results.heatmaps[index].GetID())
        composite.SetForegroundOpacity(float(opacity))
    display = results.segmentation.GetDisplayNode()
    if display is not None:
        display.SetVisibility(True)
        if hasattr(display, "SetAllSegmentsVisibility"):
            display.SetAllSegmentsVisibility(False)
            display.SetSegmentVisibility(results.segmentIds[index], True)
            display.SetVisibility2DFill(False)
            display.SetVisibility2DOutline(True)


def setOpacity(scene: Any, opacity: float) -> None:
    """Foreground (heatmap) opacity in every slice view, 0..1."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode").SetForegroundOpacity(float(opacity))


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
        removeNodeAndHelpers(scene, node)
    colorNode = heatColorNode(scene, create=False)
    if colorNode is not None and not any(
        scene.GetNthNode(i).GetAttribute(ROLE) == "heatmap" for i in range(scene.GetNumberOfNodes())
    ):
        scene.RemoveNode(colorNode)


def exportVolume(volumeNode: Any, path: Path) -> Path:
    """Write a scalar volume as NRRD with its IJK-to-RAS (the parent transform is not applied).

    If the volume is displayed inverted (MONOCHROME1 radiographs), the inverted values are written,
    so that the model sees what the clinician sees (bright = dense).
    """
    path = Path(path)
    display = volumeNode.GetDisplayNode()
    inverted = bool(
        display is not None
        and hasattr(display, "GetInvertDisplayScalarRange")
        and display.GetInvertDisplayScalarRange()
    )
    node = volumeNode
    if inverted:
        values = volumeArray(volumeNode).astype(np.float32)
        flipped = (float(values.min()) + float(values.max())) - values
        image = vtk.vtkImageData()
        image.SetDimensions(volumeNode.GetImageData().GetDimensions())
        image.AllocateScalars(vtk.VTK_FLOAT, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = flipped.ravel()
        node = slicer.vtkMRMLScalarVolumeNode()
        node.SetAndObserveImageData(image)
        node.CopyOrientation(volumeNode)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)
    if not storage.WriteData(node):
        raise AFLocSlicerError(f"cannot write volume '{volumeNode.GetName()}' to {path}")
    return path


def tempFolder(prefix: str = "AFLoc-") -> Path:
    """A new temporary folder (Slicer's temporary path when running in Slicer)."""
    base = None
    try:
        if hasattr(slicer, "app") and slicer.app is not None:
            base = slicer.app.temporaryPath
    except AttributeError:
        base = None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))
