"""The module panel in a real Qt: the ``.ui`` loaded by Qt's own loader, driven through its controller.

Qt is PySide6 (offscreen platform, no X server needed). Slicer's CTK/MRML widgets do not exist
outside Slicer, so stand-ins of the same class names (``ctkSliderWidget``, ``qMRMLNodeComboBox``,
...) are registered with the loader; every other widget (buttons, combo boxes, text edits, the
layouts, the 440-px panel width) is real Qt. The controller talks to widgets PythonQt-style (Qt
properties as attributes), so each named widget is handed over through :class:`PythonQtStyle`,
which maps attributes to the widget's Qt properties exactly as PythonQt does. The scene and the
engine are real (slicer-core, the engine's warm process). Skips with the reason where no Qt can be had.
"""

from __future__ import annotations

import os
import re
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("slicer", reason="slicer-core (headless MRML) is not installed")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
try:
    from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets
except ImportError as err:  # pragma: no cover
    pytest.skip(f"PySide6 (Qt for Python) cannot be imported: {err}", allow_module_level=True)

import slicer_fakes as sf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WIDGET_PY = REPO / "AFLocSlicer" / "AFLocSlicerLib" / "Widget.py"
SCREENSHOT = REPO / "docs" / "slicer_panel.png"
PANEL_WIDTH = 440


@pytest.fixture(scope="module")
def app():
    application = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    if QtGui.QGuiApplication.platformName() == "":  # pragma: no cover
        pytest.skip("no Qt platform plugin could be loaded")
    return application


# --- stand-ins of Slicer's CTK/MRML widgets (same class names) -----------------------------------------
class qMRMLWidget(QtWidgets.QWidget):  # noqa: N801 (Slicer's class name)
    def setMRMLScene(self, scene: Any) -> None:  # noqa: N802
        self.scene = scene


class ctkCollapsibleButton(QtWidgets.QGroupBox):  # noqa: N801
    """A titled box (CTK's collapsible section): ``text`` is its title."""

    def _text(self) -> str:
        return self.title()

    def _setText(self, text: str) -> None:  # noqa: N802
        self.setTitle(text)

    text = QtCore.Property(str, _text, _setText)
    collapsed = QtCore.Property(bool, lambda self: False, lambda self, v: None)


class ctkSliderWidget(QtWidgets.QWidget):  # noqa: N801
    """A slider with a spin box; ``value`` in [minimum, maximum] (doubles), ``valueChanged(float)``."""

    valueChanged = QtCore.Signal(float)  # noqa: N815

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.spin = QtWidgets.QDoubleSpinBox(self)
        self.slider = QtWidgets.QSlider(QtCore.Qt.Horizontal, self)
        self.slider.setRange(0, 1000)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.slider, 1)
        layout.addWidget(self.spin)
        self.spin.valueChanged.connect(self._fromSpin)
        self.slider.valueChanged.connect(
            lambda v: self.spin.setValue(self.spin.minimum() + v / 1000 * (self.spin.maximum() - self.spin.minimum()))
        )

    def _fromSpin(self, value: float) -> None:
        span = max(self.spin.maximum() - self.spin.minimum(), 1e-12)
        self.slider.blockSignals(True)
        self.slider.setValue(round((value - self.spin.minimum()) / span * 1000))
        self.slider.blockSignals(False)
        self.valueChanged.emit(float(value))

    value = QtCore.Property(float, lambda self: self.spin.value(), lambda self, v: self.spin.setValue(v))
    minimum = QtCore.Property(float, lambda self: self.spin.minimum(), lambda self, v: self.spin.setMinimum(v))
    maximum = QtCore.Property(float, lambda self: self.spin.maximum(), lambda self, v: self.spin.setMaximum(v))
    singleStep = QtCore.Property(  # noqa: N815
        float, lambda self: self.spin.singleStep(), lambda self, v: self.spin.setSingleStep(v)
    )
    pageStep = QtCore.Property(float, lambda self: 0.1, lambda self, v: None)  # noqa: N815
    decimals = QtCore.Property(int, lambda self: self.spin.decimals(), lambda self, v: self.spin.setDecimals(v))


class qMRMLNodeComboBox(QtWidgets.QComboBox):  # noqa: N801
    """Lists the scene's nodes by name; ``currentNode()``, ``setCurrentNode``, ``currentNodeChanged(node)``."""

    currentNodeChanged = QtCore.Signal(object)  # noqa: N815

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.scene, self._nodes = None, [None]
        self.addItem("Select an image")
        self.currentIndexChanged.connect(lambda i: self.currentNodeChanged.emit(self.currentNode()))

    def setMRMLScene(self, scene: Any) -> None:  # noqa: N802
        self.scene = scene

    def currentNode(self) -> Any:  # noqa: N802
        index = self.currentIndex()
        return self._nodes[index] if 0 <= index < len(self._nodes) else None

    def setCurrentNode(self, node: Any) -> None:  # noqa: N802
        if node is not None and node not in self._nodes:
            self._nodes.append(node)
            self.addItem(node.GetName())
        self.setCurrentIndex(self._nodes.index(node) if node is not None else 0)

    for name in ("nodeTypes", "showChildNodeTypes", "noneEnabled", "addEnabled", "removeEnabled", "noneDisplay"):
        locals()[name] = QtCore.Property(str, lambda self: "", lambda self, v: None)
    del name


class qMRMLTableView(QtWidgets.QTableWidget):  # noqa: N801
    """Shows a vtkMRMLTableNode's cells."""

    def setMRMLTableNode(self, node: Any) -> None:  # noqa: N802
        self.node = node
        table = node.GetTable() if node is not None else None
        self.clear()
        if table is None:
            self.setRowCount(0)
            self.setColumnCount(0)
            return
        self.setColumnCount(table.GetNumberOfColumns())
        self.setRowCount(table.GetNumberOfRows())
        self.setHorizontalHeaderLabels([table.GetColumnName(c) for c in range(table.GetNumberOfColumns())])
        for r in range(table.GetNumberOfRows()):
            for c in range(table.GetNumberOfColumns()):
                value = table.GetValue(r, c)
                text = f"{value.ToDouble():.2f}" if value.IsNumeric() and not value.IsInt() else value.ToString()
                self.setItem(r, c, QtWidgets.QTableWidgetItem(text))
        self.resizeColumnsToContents()

    def mrmlTableNode(self) -> Any:  # noqa: N802
        return getattr(self, "node", None)


class qMRMLSegmentSelectorWidget(QtWidgets.QComboBox):  # noqa: N801
    currentNodeChanged = QtCore.Signal(object)  # noqa: N815
    currentSegmentChanged = QtCore.Signal(str)  # noqa: N815

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.node, self.segmentId = None, ""
        self.addItem("Select the corrected segment")

    def setMRMLScene(self, scene: Any) -> None:  # noqa: N802
        self.scene = scene

    def currentNode(self) -> Any:  # noqa: N802
        return self.node

    def setCurrentNode(self, node: Any) -> None:  # noqa: N802
        self.node = node
        self.currentNodeChanged.emit(node)

    def currentSegmentID(self) -> str:  # noqa: N802
        return self.segmentId

    def setCurrentSegmentID(self, segmentId: str) -> None:  # noqa: N802
        self.segmentId = segmentId
        self.currentSegmentChanged.emit(segmentId)


STAND_INS = {
    cls.__name__: cls
    for cls in (
        qMRMLWidget,
        ctkCollapsibleButton,
        ctkSliderWidget,
        qMRMLNodeComboBox,
        qMRMLTableView,
        qMRMLSegmentSelectorWidget,
    )
}


class Loader(QtUiTools.QUiLoader):
    """Qt's .ui loader, creating the stand-ins for Slicer's widget classes."""

    def createWidget(self, className: str, parent: Any = None, name: str = "") -> Any:  # noqa: N802, N803
        if className in STAND_INS:
            widget = STAND_INS[className](parent)
            widget.setObjectName(name)
            return widget
        return super().createWidget(className, parent, name)


class PythonQtStyle:
    """A widget as PythonQt hands it to Slicer's Python: Qt properties are attributes (``label.text``,
    ``button.enabled = False``, ``combo.currentData``), everything else (methods, signals) passes through."""

    def __init__(self, widget: QtCore.QObject) -> None:
        object.__setattr__(self, "_w", widget)

    def _isProperty(self, name: str) -> bool:
        return self._w.metaObject().indexOfProperty(name) >= 0

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401
        if self._isProperty(name):
            return self._w.property(name)
        return getattr(self._w, name)

    def __setattr__(self, name: str, value: Any) -> None:  # noqa: ANN401
        if not self._isProperty(name):
            raise AttributeError(f"{type(self._w).__name__} has no Qt property {name!r}")
        self._w.setProperty(name, value)


def qt_shim() -> types.ModuleType:
    """The ``qt`` module the controller imports (PythonQt in Slicer), backed by PySide6."""
    qt = types.ModuleType("qt")
    qt.QTimer = QtCore.QTimer
    qt.QWidget = QtWidgets.QWidget
    qt.Qt = QtCore.Qt
    return qt


def names_the_code_uses() -> set[str]:
    return set(re.findall(r"\bui\.(\w+)", WIDGET_PY.read_text()))


@pytest.fixture()
def panel(app, monkeypatch, tmp_path):
    scene = sf.make_scene()
    record = sf.install_gui_fakes(monkeypatch, scene, tmp_path)
    monkeypatch.setitem(sys.modules, "qt", qt_shim())
    monkeypatch.setenv("AFLOC_HOME", str(tmp_path / "afloc_home"))
    for name in [m for m in sys.modules if m.startswith("AFLocSlicerLib.Widget")]:
        monkeypatch.delitem(sys.modules, name)
    from AFLocSlicerLib.Logic import AFLocLogic
    from AFLocSlicerLib.Widget import AFLocWidgetController

    root = Loader().load(str(sf.UI_FILE))
    assert root is not None, "Qt could not load the .ui file"
    root.setMRMLScene(scene)
    named = {w.objectName(): w for w in root.findChildren(QtCore.QObject) if w.objectName()}
    ui = types.SimpleNamespace(**{name: PythonQtStyle(w) for name, w in named.items()})
    installer = types.SimpleNamespace(ensure=lambda confirm: True)
    logic = AFLocLogic(scene, python=sys.executable, adaptersDir=tmp_path / "adapters")
    controller = AFLocWidgetController(ui, logic, installer)
    controller.dependenciesReady = True  # the engine is importable here (installing would refresh the model list)
    assert ui.modelComboBox.currentData == "default"  # the shipped model, as a user has it
    ui.deviceComboBox.setCurrentIndex(ui.deviceComboBox.findData("cpu"))
    root.resize(PANEL_WIDTH, 1000)
    root.show()
    app.processEvents()
    yield types.SimpleNamespace(
        root=root, ui=ui, named=named, c=controller, scene=scene, record=record, app=app, tmp=tmp_path
    )
    controller.cleanup()
    root.close()


def test_every_widget_the_code_uses_is_in_the_ui(panel):
    used = names_the_code_uses()
    assert len(used) > 25
    missing = sorted(used - set(panel.named))
    assert missing == [], f"the controller uses widgets the .ui file does not have: {missing}"


def test_preset_placeholder_is_not_cut_at_panel_width(panel):
    combo = panel.named["presetComboBox"]
    text = combo.itemText(0)
    assert text.startswith("Choose a chest finding")
    option = QtWidgets.QStyleOptionComboBox()
    combo.initStyleOption(option)
    room = combo.style().subControlRect(QtWidgets.QStyle.CC_ComboBox, option, QtWidgets.QStyle.SC_ComboBoxEditField)
    assert panel.root.width() == PANEL_WIDTH
    assert room.width() >= combo.fontMetrics().horizontalAdvance(text), (room.width(), text)


def run_until_idle(panel, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while panel.c.task is not None and time.monotonic() < deadline:
        panel.app.processEvents()
        time.sleep(0.02)
    panel.app.processEvents()
    assert panel.c.task is None, "the job did not finish"


@pytest.mark.slow
def test_panel_localizes_shows_runs_and_saves_a_screenshot(panel, sample_dicom):
    ui, c = panel.ui, panel.c
    volume = sf.load_dicom_volume(panel.scene, sample_dicom)
    ui.inputSelector.setCurrentNode(volume)
    ui.promptsTextEdit.setPlainText("")
    panel.named["presetComboBox"].setCurrentIndex(ui.presetComboBox.findText("pneumothorax"))
    panel.named["presetComboBox"].setCurrentIndex(ui.presetComboBox.findText("pleural effusion"))
    assert c.prompts() == ["Findings suggesting pneumothorax", "Findings suggesting pleural effusion"]
    assert ui.applyButton.enabled and not ui.cancelButton.enabled
    assert ui.epochsSpinBox.text == "auto" and c.logic.parameters.epochs == 0  # the engine's "auto"
    panel.named["applyButton"].click()
    assert c.pollTimer.isActive() and ui.cancelButton.enabled
    run_until_idle(panel)
    assert panel.record.errors == [], panel.record.errors
    assert ui.statusLabel.text == "Done: 2 heatmap(s), run [default #1]."
    assert ui.thresholdSliderWidget.value == pytest.approx(0.64)  # the model's calibrated threshold
    items = [ui.resultComboBox.itemText(i) for i in range(ui.resultComboBox.count)]
    assert [t.split(":")[0] for t in items] == ["pneumothorax", "pleural effusion"]
    assert all(re.search(r", \d+\.\d % \[default #1\]$", t) for t in items), items  # each mask's share
    table = panel.named["probabilityTableView"]
    assert table.rowCount() == 2 and table.horizontalHeaderItem(5).text() == "Mask area"
    # a second run sits beside the first, listed apart
    panel.named["applyButton"].click()
    run_until_idle(panel)
    items = [ui.resultComboBox.itemText(i) for i in range(ui.resultComboBox.count)]
    assert len(items) == 4 and items[2].endswith("[default #2]") and ui.resultComboBox.currentIndex == 2
    panel.app.processEvents()
    picture = panel.root.grab()
    assert picture.width() == PANEL_WIDTH
    image = picture.toImage()
    colours = {image.pixel(x, y) for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)}
    assert len(colours) > 20  # a drawn panel, not a blank image
    picture.save(str(panel.tmp / "slicer_panel.png"))
    if os.environ.get("AFLOC_UPDATE_DOCS") or not SCREENSHOT.exists():  # the docs copy, on request
        picture.save(str(SCREENSHOT))
