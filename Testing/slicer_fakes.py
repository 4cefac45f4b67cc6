"""Test helper for the AFLocSlicer module: a real headless MRML scene, and fakes of the GUI shell only.

REAL (from the ``slicer-core`` wheel): ``vtkMRMLScene``, every MRML node, the Colors, Volumes,
Segmentations and Subject Hierarchy logics, ``vtkMRMLSliceLogic`` (slice compositing), the MRML
storage nodes that read and write NRRD and ``.seg.nrrd`` files, and ``slicer.util``.

FAKED here, because the wheel has no Qt: ``qt``, ``ctk``, ``slicer.app`` (temporary path, the
IO manager behind ``slicer.util.loadVolume``) and ``slicer.ScriptedLoadableModule``'s base classes.
The fake IO manager reads PNG/JPEG and DICOM radiographs the way Slicer's readers do (ITK in the
wheel has no PNG/JPEG/X-ray DICOM reader): pixels as stored, LPS geometry converted to RAS, and
MONOCHROME1 shown inverted through the display node, like Slicer's DICOM plugin.

Nothing here replaces code under test: the module's logic runs unchanged against the real scene.
"""

from __future__ import annotations

import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "AFLocSlicer"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "AFLocSlicer.ui"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import slicer  # noqa: E402  (the real slicer-core package)
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# --- a real scene ---------------------------------------------------------------------------------
def make_scene() -> Any:
    """A headless ``vtkMRMLScene`` with the Colors, Volumes, Segmentations, Subject Hierarchy and Sequences logics
    and one slice view ("Red": slice node + slice composite node), as the Slicer application would have."""
    import logging

    scene = slicer.vtkMRMLScene()
    logics = []
    vtk.vtkObject.GlobalWarningDisplayOff()  # the colour logic complains about missing colour files; harmless
    for cls in (
        slicer.vtkSlicerColorLogic,
        slicer.vtkSlicerVolumesLogic,
        slicer.vtkSlicerSegmentationsModuleLogic,
        slicer.vtkSlicerSubjectHierarchyModuleLogic,
        slicer.vtkSlicerSequencesLogic,
    ):
        logic = cls()
        logic.SetMRMLScene(scene)
        logics.append(logic)
    vtk.vtkObject.GlobalWarningDisplayOn()
    slice_logic = slicer.vtkMRMLSliceLogic()
    slice_logic.SetMRMLScene(scene)
    slice_logic.AddSliceNode("Red")
    logics.append(slice_logic)
    scene._aflocTestLogics = logics  # keep the logics alive as long as the scene
    logging.getLogger("AFLocSlicerLib").setLevel(logging.INFO)
    return scene


def slice_logic_of(scene: Any) -> Any:
    """The "Red" slice logic created by :func:`make_scene`."""
    return next(lg for lg in scene._aflocTestLogics if lg.IsA("vtkMRMLSliceLogic"))


def scene_snapshot(scene: Any) -> dict[str, Any]:
    """What must be unchanged after removing outputs or a failed/cancelled job: node IDs and SH items."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    items = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), items, True)
    return {
        "nodes": sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())),
        "items": sorted(items.GetId(i) for i in range(items.GetNumberOfIds())),
    }


def add_volume(
    scene: Any,
    array: np.ndarray,
    ijk_to_ras: np.ndarray | None = None,
    name: str = "volume",
    node_class: str = "vtkMRMLScalarVolumeNode",
    parent_item: int | None = None,
) -> Any:
    """A volume node from a (K, J, I) or (K, J, I, C) array with a 4x4 IJK-to-RAS, in the subject hierarchy."""
    array = np.ascontiguousarray(array)
    node = scene.AddNewNodeByClass(node_class, name)
    image = vtk.vtkImageData()
    components = array.shape[3] if array.ndim == 4 else 1
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.AllocateScalars(numpy_support.get_vtk_array_type(array.dtype), components)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = array.reshape(-1, components).squeeze()
    node.SetAndObserveImageData(image)
    matrix = vtk.vtkMatrix4x4()
    m = LPS_TO_RAS if ijk_to_ras is None else np.asarray(ijk_to_ras, dtype=float)
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(m[r, c]))
    node.SetIJKToRASMatrix(matrix)
    node.CreateDefaultDisplayNodes()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if not sh.GetItemByDataNode(node):
        sh.CreateItem(parent_item if parent_item is not None else sh.GetSceneItemID(), node)
    return node


def study_item(scene: Any, patient: str = "Patient", study: str = "Study") -> int:
    """A patient/study branch in the subject hierarchy (where DICOM loading puts a series); the study item ID."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient_item = sh.CreateSubjectItem(sh.GetSceneItemID(), patient)
    return sh.CreateStudyItem(patient_item, study)


def oblique_ijk_to_ras(
    spacing: tuple[float, float, float], origin: tuple[float, float, float], angles=(0.3, 0.2, 0.1)
) -> np.ndarray:
    """A non-identity, non-axis-aligned IJK-to-RAS (rotations about three axes)."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def load_raster_volume(
    scene: Any, path: Path, ijk_to_ras: np.ndarray | None = None, parent_item: int | None = None
) -> Any:
    """A PNG/JPEG as Slicer's image reader loads it: grey pixels, 1 mm spacing, LPS identity (unless given)."""
    from PIL import Image

    with Image.open(path) as img:
        grey = np.asarray(img.convert("L"), dtype=np.uint8)
    # ITK puts image row 0 at the lowest y; Slicer shows it at the top of an axial view
    node = add_volume(scene, grey[None], ijk_to_ras, Path(path).stem, parent_item=parent_item)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")  # as Slicer's reader leaves it
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def load_dicom_volume(scene: Any, path: Path, parent_item: int | None = None) -> Any:
    """A single-frame DICOM radiograph as Slicer's DICOM plugins load it (stored values, RAS geometry,
    MONOCHROME1 displayed inverted, the file's window/level)."""
    import pydicom

    ds = pydicom.dcmread(str(path))
    pixels = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1) or 1) + float(
        getattr(ds, "RescaleIntercept", 0) or 0
    )
    row, col = 1.0, 1.0  # like the engine and Slicer: 1 mm when the header has no valid spacing
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = getattr(ds, tag, None)
        if value is not None and len(value) == 2 and float(value[0]) > 0 and float(value[1]) > 0:
            row, col = float(value[0]), float(value[1])
            break
    orientation = [float(v) for v in getattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    position = [float(v) for v in getattr(ds, "ImagePositionPatient", [0, 0, 0])]
    x, y = np.array(orientation[:3]), np.array(orientation[3:])
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = x * col, y * row, np.cross(x, y)
    lps[:3, 3] = position
    array = pixels.astype(np.int16 if pixels.max() < 32768 and pixels.min() >= -32768 else np.float32)
    node = add_volume(scene, array[None], LPS_TO_RAS @ lps, Path(path).stem, parent_item=parent_item)
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        display.SetInvertDisplayScalarRange(True)
    center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if center is not None and width is not None:
        center = float(center[0] if hasattr(center, "__len__") else center)
        width = float(width[0] if hasattr(width, "__len__") else width)
        display.AutoWindowLevelOff()
        display.SetWindowLevel(width, center)
    return node


def composite_png(
    scene: Any, background: Any, foreground: Any, opacity: float, label: Any = None, size: int = 512
) -> np.ndarray:
    """What a slice view shows: ``background`` + ``foreground`` (at ``opacity``) + ``label`` outlines,
    blended by the real ``vtkMRMLSliceLogic`` in the plane of the volume. Returns (H, W, 3) uint8, top row first."""
    composite = slice_logic_of(scene).GetSliceCompositeNode()
    composite.SetBackgroundVolumeID(background.GetID())
    composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
    composite.SetForegroundOpacity(opacity)
    composite.SetLabelVolumeID(label.GetID() if label is not None else None)
    return view_png(scene, size)


def view_png(scene: Any, size: int = 512) -> np.ndarray:
    """What the slice view shows now, with the layers its composite node holds (as the module set them),
    blended by the real ``vtkMRMLSliceLogic`` in the plane of the background volume. (H, W, 3) uint8."""
    logic = slice_logic_of(scene)
    slice_node = logic.GetSliceNode()
    composite = logic.GetSliceCompositeNode()
    background = scene.GetNodeByID(composite.GetBackgroundVolumeID())
    composite.SetLabelOpacity(1.0)
    slice_node.SetUseLabelOutline(True)
    # the slice plane = the image plane (a radiograph is one slice), through its centre
    ijk_to_ras = vtk.vtkMatrix4x4()
    background.GetIJKToRASMatrix(ijk_to_ras)
    m = np.array([[ijk_to_ras.GetElement(r, c) for c in range(4)] for r in range(4)])
    dims = background.GetImageData().GetDimensions()
    centre = m @ np.array([(dims[0] - 1) / 2, (dims[1] - 1) / 2, (dims[2] - 1) / 2, 1.0])
    x_axis = m[:3, 0] / np.linalg.norm(m[:3, 0])
    y_axis = -m[:3, 1] / np.linalg.norm(m[:3, 1])  # image row 0 at the top of the view
    normal = np.cross(x_axis, y_axis)
    slice_node.SetSliceToRASByNTP(*normal, *x_axis, *centre[:3], 0)
    slice_node.SetDimensions(size, size, 1)
    extent = max(dims[0] * np.linalg.norm(m[:3, 0]), dims[1] * np.linalg.norm(m[:3, 1]))
    slice_node.SetFieldOfView(extent, extent, 1.0)
    slice_node.UpdateMatrices()
    logic.UpdatePipeline()
    producer = logic.GetImageDataConnection().GetProducer()
    producer.Update()
    out = producer.GetOutputDataObject(0)
    w, h, _ = out.GetDimensions()
    rgba = numpy_support.vtk_to_numpy(out.GetPointData().GetScalars()).reshape(h, w, -1)
    return np.ascontiguousarray(rgba[::-1, :, :3])


def visible_legends(scene: Any) -> list[Any]:
    """Colour legend display nodes that are visible (what Slicer's colour legend displayable manager draws)."""
    nodes = [
        scene.GetNthNodeByClass(i, "vtkMRMLColorLegendDisplayNode")
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorLegendDisplayNode"))
    ]
    return [n for n in nodes if n.GetVisibility()]


def draw_legend(view: np.ndarray, legend: Any, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """``view`` with ``legend`` drawn as Slicer's colour legend shows it in a slice view: a vertical bar of
    its colour table (opaque colours), its title above, ``GetNumberOfLabels()`` labels in its label format,
    at the right edge, ``GetSize()`` of the view. The slice logic composites layers only (Slicer draws the
    legend with a displayable manager), so figures of a view add it here, from the node's own properties."""
    from PIL import Image, ImageDraw

    h, w = view.shape[:2]
    image = Image.fromarray(view)
    draw = ImageDraw.Draw(image)
    size = legend.GetSize()
    bar_w, bar_h = max(8, int(0.25 * size[0] * w)), int(size[1] * h)
    x0, y0 = w - bar_w - 30, (h - bar_h) // 2  # at the right edge of the view, labels to its right
    color = legend.GetColorNode() or legend.GetPrimaryDisplayNode().GetColorNode()  # a volume's legend: its own
    lut = color.GetLookupTable()
    count = lut.GetNumberOfTableValues()
    for row in range(bar_h):
        r, g, b, _ = lut.GetTableValue(int(round((1 - row / max(bar_h - 1, 1)) * (count - 1))))
        draw.line([(x0, y0 + row), (x0 + bar_w, y0 + row)], fill=(int(r * 255), int(g * 255), int(b * 255)))
    draw.rectangle([x0, y0, x0 + bar_w, y0 + bar_h], outline=(230, 230, 230))
    labels = max(2, legend.GetNumberOfLabels())
    for k in range(labels):
        value = value_range[0] + (value_range[1] - value_range[0]) * k / (labels - 1)
        y = y0 + bar_h - int(round(k / (labels - 1) * bar_h))
        draw.text((x0 + bar_w + 4, y - 6), legend.GetLabelFormat() % value, fill=(240, 240, 240))
    title = legend.GetTitleText()
    draw.text((max(0, w - 4 - 6 * len(title)), y0 - 18), title, fill=(240, 240, 240))  # above the bar
    return np.asarray(image)


def view_to_ijk(scene: Any, volume: Any, size: int = 512) -> np.ndarray:
    """(size, size, 2): for each pixel of :func:`composite_png`'s output (top row first), its (i, j) voxel index."""
    logic = slice_logic_of(scene)
    xy_to_ras = logic.GetSliceNode().GetXYToRAS()
    ras_to_ijk = vtk.vtkMatrix4x4()
    volume.GetRASToIJKMatrix(ras_to_ijk)
    a = np.array([[xy_to_ras.GetElement(r, c) for c in range(4)] for r in range(4)])
    b = np.array([[ras_to_ijk.GetElement(r, c) for c in range(4)] for r in range(4)])
    ys, xs = np.mgrid[0:size, 0:size]
    xy = np.stack([xs.ravel(), (size - 1 - ys).ravel(), np.zeros(xs.size), np.ones(xs.size)])
    ijk = (b @ a @ xy)[:2].T.reshape(size, size, 2)
    return ijk


# --- fakes of the GUI shell -----------------------------------------------------------------------
class Signal:
    """A Qt-like signal: ``connect(slot)``, ``disconnect(slot)``, ``emit(*args)``."""

    def __init__(self) -> None:
        self.slots: list[Any] = []

    def connect(self, slot: Any) -> None:
        self.slots.append(slot)

    def disconnect(self, slot: Any = None) -> None:
        self.slots = [] if slot is None else [s for s in self.slots if s is not slot]

    def emit(self, *args: Any) -> None:
        for slot in list(self.slots):
            slot(*args)

    __call__ = emit


class FakeTimer:
    """qt.QTimer without an event loop: tests call :meth:`fire` (what the event loop would do)."""

    instances: list[FakeTimer] = []

    def __init__(self, parent: Any = None) -> None:
        self.timeout = Signal()
        self.interval = 0
        self.active = False
        self.singleShot_ = False
        FakeTimer.instances.append(self)

    def setInterval(self, ms: int) -> None:
        self.interval = ms

    def setSingleShot(self, on: bool) -> None:
        self.singleShot_ = on

    def start(self, ms: int | None = None) -> None:
        if ms is not None:
            self.interval = ms
        self.active = True

    def stop(self) -> None:
        self.active = False

    def isActive(self) -> bool:
        return self.active

    def fire(self) -> None:
        if self.active:
            if self.singleShot_:
                self.active = False
            self.timeout.emit()

    @staticmethod
    def singleShot(ms: int, slot: Any) -> None:
        slot()


class FakeWidget:
    """Any widget of the .ui file, PythonQt style: Qt properties are attributes (``w.text``, ``w.value``,
    ``combo.currentData``, ``combo.count``, ``list.currentRow``), setters and other methods are methods,
    and it offers the signals the module connects to."""

    SIGNALS = (
        "clicked",
        "toggled",
        "valueChanged",
        "textChanged",
        "currentIndexChanged",
        "currentNodeChanged",
        "currentSegmentChanged",
        "itemDoubleClicked",
    )

    def __init__(self, name: str = "", cls: str = "QWidget", props: dict[str, Any] | None = None) -> None:
        self.name = name
        self.className_ = cls
        self.props: dict[str, Any] = {"enabled": True, "visible": True, "text": "", "value": 0.0, "checked": False}
        self.props.update(props or {})
        self.items: list[str] = []
        self.itemData_: list[Any] = []
        self.currentIndex_ = -1
        self.currentRow_ = -1
        self.node = None
        self.scene = None
        self.segmentId = ""
        for sig in self.SIGNALS:
            setattr(self, sig, Signal())

    # properties (PythonQt exposes Q_PROPERTYs as attributes)
    @property
    def enabled(self) -> bool:
        return self.props["enabled"]

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self.props["enabled"] = bool(on)

    @property
    def visible(self) -> bool:
        return self.props["visible"]

    @visible.setter
    def visible(self, on: bool) -> None:
        self.props["visible"] = bool(on)

    @property
    def text(self) -> str:
        return self.props["text"]

    @text.setter
    def text(self, value: str) -> None:
        self.setText(value)

    @property
    def value(self) -> float:
        return self.props["value"]

    @value.setter
    def value(self, v: float) -> None:
        self.setValue(v)

    @property
    def checked(self) -> bool:
        return self.props["checked"]

    @checked.setter
    def checked(self, on: bool) -> None:
        self.setChecked(on)

    @property
    def count(self) -> int:
        return len(self.items)

    @property
    def currentIndex(self) -> int:
        return self.currentIndex_

    @property
    def currentText(self) -> str:
        return self.items[self.currentIndex_] if 0 <= self.currentIndex_ < len(self.items) else ""

    @property
    def currentData(self) -> Any:
        return self.itemData_[self.currentIndex_] if 0 <= self.currentIndex_ < len(self.items) else None

    @property
    def currentRow(self) -> int:
        return self.currentRow_

    @currentRow.setter
    def currentRow(self, row: int) -> None:
        self.currentRow_ = row

    # methods
    def setEnabled(self, on: bool) -> None:
        self.props["enabled"] = bool(on)

    def setVisible(self, on: bool) -> None:
        self.props["visible"] = bool(on)

    def setText(self, text: str) -> None:
        changed = str(text) != self.props["text"]
        self.props["text"] = str(text)
        if changed:
            self.textChanged.emit(str(text))

    def setPlainText(self, text: str) -> None:
        self.setText(text)

    def toPlainText(self) -> str:
        return self.props["text"]

    def appendPlainText(self, text: str) -> None:
        self.setText((self.props["text"] + "\n" + text) if self.props["text"] else text)

    def setValue(self, value: float) -> None:
        changed = value != self.props["value"]
        self.props["value"] = value
        if changed:
            self.valueChanged.emit(value)

    def setChecked(self, on: bool) -> None:
        changed = bool(on) != self.props["checked"]
        self.props["checked"] = bool(on)
        if changed:
            self.toggled.emit(bool(on))

    def click(self) -> None:
        """What a user's click does: nothing when disabled."""
        if self.props["enabled"]:
            if self.props.get("checkable"):
                self.setChecked(not self.props["checked"])
            self.clicked.emit()

    def clear(self) -> None:
        self.items, self.itemData_ = [], []
        self.currentIndex_ = self.currentRow_ = -1

    def addItem(self, text: str, data: Any = None) -> None:
        self.items.append(str(text))
        self.itemData_.append(data)
        if self.currentIndex_ < 0 and self.className_ == "QComboBox":
            self.currentIndex_ = 0

    def itemText(self, i: int) -> str:
        return self.items[i]

    def itemData(self, i: int) -> Any:
        return self.itemData_[i]

    def findText(self, text: str) -> int:
        return self.items.index(text) if text in self.items else -1

    def findData(self, data: Any) -> int:
        return self.itemData_.index(data) if data in self.itemData_ else -1

    def setCurrentIndex(self, i: int) -> None:
        if i != self.currentIndex_:
            self.currentIndex_ = i
            self.currentIndexChanged.emit(i)

    def choose(self, text: str) -> None:
        """A user picks the combo box item whose text starts with ``text``."""
        self.setCurrentIndex(next(i for i, t in enumerate(self.items) if t.startswith(text)))

    # MRML widgets
    def setMRMLScene(self, scene: Any) -> None:
        self.scene = scene

    def mrmlScene(self) -> Any:
        return self.scene

    def currentNode(self) -> Any:
        return self.node

    def setCurrentNode(self, node: Any) -> None:
        if node is not self.node:
            self.node = node
            self.currentNodeChanged.emit(node)

    def currentSegmentID(self) -> str:
        return self.segmentId

    def setCurrentSegmentID(self, sid: str) -> None:
        self.segmentId = sid
        self.currentSegmentChanged.emit(sid)

    def setMRMLTableNode(self, node: Any) -> None:
        self.node = node

    def mrmlTableNode(self) -> Any:
        return self.node

    def children(self) -> list[FakeWidget]:
        return list(self.__dict__.get("children_", []))

    def __getattr__(self, name: str) -> Any:
        # other Qt setters (setSizePolicy, setFormat, ...) are accepted and remembered
        if name.startswith("set") and len(name) > 3:
            key = name[3].lower() + name[4:]
            return lambda *args: self.props.__setitem__(key, args[0] if len(args) == 1 else args)
        raise AttributeError(f"{self.className_} '{self.name}' has no attribute {name!r}")


def parse_ui(path: Path = UI_FILE) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every named widget of a Qt Designer file: name -> (class, {property: value})."""
    root = ET.parse(path).getroot()
    widgets = {}
    for element in root.iter("widget"):
        props = {}
        for prop in element.findall("property"):
            value = next(iter(prop), None)
            if value is None:
                continue
            text = value.text or ""
            if value.tag in ("double", "number"):
                props[prop.get("name")] = float(text)
            elif value.tag == "bool":
                props[prop.get("name")] = text == "true"
            else:
                props[prop.get("name")] = text
        widgets[element.get("name")] = (element.get("class"), props)
    return widgets


class FakeUiRoot(FakeWidget):
    """The top widget a QUiLoader returns, holding one :class:`FakeWidget` per named widget of the file."""

    def __init__(self, path: Path) -> None:
        super().__init__("root", "QWidget")
        self.children_ = [FakeWidget(name, cls, props) for name, (cls, props) in parse_ui(path).items()]


def fake_qt() -> types.ModuleType:
    """A ``qt`` module with what the module and ``slicer.util.loadUI`` touch."""
    qt = types.ModuleType("qt")

    class QFile:
        ReadOnly = 1

        def __init__(self, path: str) -> None:
            self.path = Path(path)

        def exists(self) -> bool:
            return self.path.is_file()

        def open(self, mode: int) -> bool:
            return True

    class QUiLoader:
        def load(self, qfile: QFile) -> FakeUiRoot:
            return FakeUiRoot(qfile.path)

    class QMessageBox:
        Ok, Cancel, Yes, No = 1, 2, 4, 8

    qt.QFile = QFile
    qt.QUiLoader = QUiLoader
    qt.QTimer = FakeTimer
    qt.QMessageBox = QMessageBox
    qt.QWidget = FakeWidget
    qt.QSettings = lambda *a: types.SimpleNamespace(value=lambda key, default=None: default, setValue=lambda k, v: None)
    qt.Qt = types.SimpleNamespace(UserRole=32, WaitCursor=3)
    qt.QApplication = types.SimpleNamespace(setOverrideCursor=lambda *a: None, restoreOverrideCursor=lambda: None)
    return qt


class FakeIOManager:
    """``slicer.app.coreIOManager()``: loads volumes into the real scene (NRRD via MRML; PNG/JPEG/DICOM as Slicer)."""

    def __init__(self, scene: Any) -> None:
        self.scene = scene

    def fileType(self, filename: str) -> str:
        return "VolumeFile"

    def loadNodes(self, filetype: str, properties: dict, loaded: Any, messages: Any = None) -> bool:
        path = Path(properties["fileName"])
        suffix = path.suffix.lower()
        if suffix in (".png", ".jpg", ".jpeg"):
            node = load_raster_volume(self.scene, path)
        elif suffix in (".dcm", ".dicom"):
            node = load_dicom_volume(self.scene, path)
        else:
            logic = next(lg for lg in self.scene._aflocTestLogics if lg.IsA("vtkSlicerVolumesLogic"))
            node = logic.AddArchetypeVolume(str(path), properties.get("name", path.stem), 0)
            if node is None:
                return False
        if properties.get("name"):
            node.SetName(properties["name"])
        loaded.AddItem(node)
        return True


class FakeApp:
    """``slicer.app``: temporary path, IO manager, no GUI (testing mode, no main window)."""

    def __init__(self, scene: Any, temporary_path: Path) -> None:
        self._scene = scene
        self.temporaryPath = str(temporary_path)
        self._io = FakeIOManager(scene)
        self.commandOptions = lambda: types.SimpleNamespace(noMainWindow=True)

    def coreIOManager(self) -> FakeIOManager:
        return self._io

    def mrmlScene(self) -> Any:
        return self._scene

    def testingEnabled(self) -> bool:
        return True

    def processEvents(self) -> None:
        pass

    def startupEnvironment(self) -> None:
        return None

    def layoutManager(self) -> None:
        return None


def fake_scripted_loadable_module() -> types.ModuleType:
    """``slicer.ScriptedLoadableModule``: the base classes of a scripted module (no Qt behind them)."""
    mod = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent: Any) -> None:
            self.parent = parent
            self.moduleName = type(self).__name__

        def resourcePath(self, filename: str) -> str:
            return str(MODULE_DIR / "Resources" / filename)

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent: Any = None) -> None:
            self.parent = parent
            self.moduleName = type(self).__name__.replace("Widget", "")
            self.layout = types.SimpleNamespace(
                widgets=[], addWidget=lambda w: self.layout.widgets.append(w), addStretch=lambda *a: None
            )
            self.developerMode = False

        def resourcePath(self, filename: str) -> str:
            return str(MODULE_DIR / "Resources" / filename)

        def setup(self) -> None:
            pass

        def cleanup(self) -> None:
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent: Any = None) -> None:
            self.moduleName = type(self).__name__.replace("Logic", "")

        def getParameterNode(self) -> Any:
            from AFLocSlicerLib.Parameters import AFLocParameters

            return AFLocParameters.get(slicer.mrmlScene, self.moduleName).node

    class ScriptedLoadableModuleTest:
        def __init__(self, *args: Any) -> None:
            self.messages: list[str] = []

        def delayDisplay(self, message: str, msec: int = 0) -> None:
            self.messages.append(message)

        def assertEqual(self, a: Any, b: Any, msg: str | None = None) -> None:
            assert a == b, msg or f"{a!r} != {b!r}"

        def assertTrue(self, a: Any, msg: str | None = None) -> None:
            assert a, msg

        def assertFalse(self, a: Any, msg: str | None = None) -> None:
            assert not a, msg

        def assertIsNotNone(self, a: Any, msg: str | None = None) -> None:
            assert a is not None, msg

        def assertIsNone(self, a: Any, msg: str | None = None) -> None:
            assert a is None, msg

        def assertIn(self, a: Any, b: Any, msg: str | None = None) -> None:
            assert a in b, msg or f"{a!r} not in {b!r}"

        def assertRaises(self, exc: type[BaseException], *args: Any) -> Any:
            import pytest

            return pytest.raises(exc)

    mod.ScriptedLoadableModule = ScriptedLoadableModule
    mod.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    mod.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    mod.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    return mod


def install_gui_fakes(monkeypatch: Any, scene: Any, temporary_path: Path) -> types.SimpleNamespace:
    """Put the fakes in place for one test (pytest ``monkeypatch`` undoes it): ``qt``, ``ctk``, ``slicer.app``,
    ``slicer.mrmlScene`` (the real test scene), ``slicer.ScriptedLoadableModule``, and dialogs that record
    instead of blocking. Returns a namespace with the recorded ``errors``, ``infos`` and ``confirmations``."""
    record = types.SimpleNamespace(errors=[], infos=[], warnings=[], confirmations=[], confirm_answer=True)
    qt = fake_qt()
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "ctk", types.ModuleType("ctk"))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", fake_scripted_loadable_module())
    monkeypatch.setattr(slicer, "app", FakeApp(scene, temporary_path), raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", sys.modules["slicer.ScriptedLoadableModule"], raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(), raising=False)

    def confirm(text: str, *args: Any, **kwargs: Any) -> bool:
        record.confirmations.append(text)
        return record.confirm_answer

    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, *a, **k: record.errors.append(str(text)))
    monkeypatch.setattr(slicer.util, "infoDisplay", lambda text, *a, **k: record.infos.append(str(text)))
    monkeypatch.setattr(slicer.util, "warningDisplay", lambda text, *a, **k: record.warnings.append(str(text)))
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm)
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", confirm)
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **kwargs: None)
    FakeTimer.instances.clear()
    return record
