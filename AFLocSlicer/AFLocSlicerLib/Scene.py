"""Small MRML helpers the module's other files share: arrays, geometry, the subject hierarchy, files.

Everything here works on a plain ``vtkMRMLScene`` (the Slicer application's or a headless one).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from AFLocSlicerLib.Errors import AFLocSlicerError

ROLE = "AFLoc.Role"
"""Node attribute naming what an AFLoc node is: heatmap, segmentation, table, labelmap, colormap, labelcolors."""


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


def writeMask(mask: np.ndarray, referenceVolume: Any, path: Path) -> Path:
    """Write a (K, J, I) bool mask as a uint8 0/1 NRRD with ``referenceVolume``'s geometry."""
    node = slicer.vtkMRMLLabelMapVolumeNode()
    node.SetAndObserveImageData(maskImageData(mask))
    node.CopyOrientation(referenceVolume)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(node):
        raise AFLocSlicerError(f"cannot write the training mask {path}")
    return Path(path)


def readVolumeArray(path: Path) -> np.ndarray:
    """Voxels of an image file Slicer can read (NRRD) as a (K, J, I) float32 array."""
    node = slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(True)
    if not storage.ReadData(node):
        raise AFLocSlicerError(f"{path}: cannot read the heatmap")
    return np.array(volumeArray(node), dtype=np.float32)


RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
"""Image files that carry no pixel spacing: Slicer gives them 1 mm pixels."""


def spacingKnown(volumeNode: Any) -> bool:
    """True when the volume's spacing is a real size (DICOM, NRRD, NIfTI, ...), False for a PNG/JPEG's 1 mm default."""
    if volumeNode.GetAttribute("DICOM.instanceUIDs"):
        return True
    storage = volumeNode.GetStorageNode() if hasattr(volumeNode, "GetStorageNode") else None
    fileName = (storage.GetFileName() or "") if storage is not None else ""
    return not fileName.lower().endswith(RASTER_SUFFIXES)


def pixelArea(volumeNode: Any) -> float:
    """Area of one voxel's in-plane face in mm^2 (for 2D images: one pixel)."""
    spacing = volumeNode.GetSpacing()
    return float(spacing[0] * spacing[1])


def formatArea(pixels: int, volumeNode: Any) -> str:
    """A mask's area for people: ``'12.4 cm²'`` / ``'85 mm²'`` with a known spacing, else ``'84,898 px'``."""
    if not spacingKnown(volumeNode):
        return f"{int(pixels):,} px"
    mm2 = float(pixels) * pixelArea(volumeNode)
    return f"{mm2 / 100:,.1f} cm²" if mm2 >= 100 else f"{mm2:.0f} mm²"
