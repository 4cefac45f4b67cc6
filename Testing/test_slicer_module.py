"""The AFLocSlicer module as Slicer loads it: the .ui file, the thin module file, the panel, the self-test.

The panel runs against the real MRML scene and the real engine; only qt/ctk/slicer.app and the
ScriptedLoadableModule base classes are fakes (slicer_fakes.py). A fake QTimer is fired by the test,
as Qt's event loop would.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (headless MRML) is not installed")

import slicer_fakes as sf  # noqa: E402
from AFLocSlicerLib import Scene  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "AFLocSlicer"
TIMEOUT = 180


def names_used_by_the_code() -> set[str]:
    names = set()
    for path in [MODULE_DIR / "AFLocSlicer.py", *(MODULE_DIR / "AFLocSlicerLib").glob("*.py")]:
        names |= set(re.findall(r"\bui\.([A-Za-z_][A-Za-z0-9_]*)", path.read_text()))
    return names


def test_ui_file_parses_and_has_every_widget_the_code_uses():
    root = ET.parse(sf.UI_FILE).getroot()
    assert root.tag == "ui" and root.find("widget").get("name") == "AFLocSlicer"
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    used = names_used_by_the_code()
    assert len(used) > 20
    assert used <= set(widgets), f"missing in the .ui: {sorted(used - set(widgets))}"
    # every custom (CTK / MRML) class is declared, and the MRML widgets get the scene
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    custom = {cls for cls in widgets.values() if cls.startswith(("ctk", "qMRML"))}
    assert custom <= declared, custom - declared
    receivers = {c.findtext("receiver") for c in root.iter("connection")}
    mrml = {
        name
        for name, cls in widgets.items()
        if cls in ("qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget", "qMRMLTableView")
    }
    assert mrml <= receivers
    assert widgets["inputSelector"] == "qMRMLNodeComboBox"


LIBRARY = sorted(p.stem for p in (MODULE_DIR / "AFLocSlicerLib").glob("*.py") if p.stem != "__init__")


def test_nothing_is_installed_or_imported_at_import_time():
    """Importing the module (AFLocSlicer.py, with Slicer's shell faked) and every file of its library pulls in
    neither torch nor the engine, and calls no installer."""
    assert {"Logic", "Tasks", "Scene", "SceneResults", "Display", "Terminology", "Server", "Widget"} <= set(LIBRARY)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]);"
        "import slicer; slicer.util.pip_install = lambda *a, **k: sys.exit('pip_install called');"
        "import slicer_fakes as sf;"
        "sys.modules['qt'] = sf.fake_qt(); sys.modules['ctk'] = type(sys)('ctk');"
        "sys.modules['slicer.ScriptedLoadableModule'] = slicer.ScriptedLoadableModule = "
        "sf.fake_scripted_loadable_module();"
        "import AFLocSlicer;"
        + "".join(f"import AFLocSlicerLib.{name};" for name in LIBRARY)
        + "bad = [m for m in ('torch', 'afloc_engine', 'monai', 'transformers') if m in sys.modules];"
        "sys.exit(f'imported at import time: {bad}' if bad else 0)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(MODULE_DIR), str(MODULE_DIR.parent / "Testing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:] + run.stdout[-500:]


# --- the panel ----------------------------------------------------------------------------------
@pytest.fixture()
def gui(monkeypatch, tmp_path, tiny_model_dir):
    """The module's panel built by AFLocSlicerWidget.setup() on a real scene, with the GUI shell faked."""
    scene = sf.make_scene()
    record = sf.install_gui_fakes(monkeypatch, scene, tmp_path)
    monkeypatch.setenv("AFLOC_HOME", str(tmp_path / "afloc_home"))
    for name in [m for m in sys.modules if m == "AFLocSlicer" or m.startswith("AFLocSlicerLib.Widget")]:
        monkeypatch.delitem(sys.modules, name)
    module = importlib.import_module("AFLocSlicer")
    parent = type("ModuleParent", (), {"isEntered": True})()
    sf_module = module.AFLocSlicer(parent)
    widget = module.AFLocSlicerWidget(parent)
    widget.setup()
    controller = widget.controller
    controller.logic.python = sys.executable
    ui = widget.ui
    ui.modelComboBox.addItem("tiny (test)", str(tiny_model_dir))  # as an installed model would appear
    ui.modelComboBox.choose("tiny")
    ui.deviceComboBox.choose("CPU")
    yield type(
        "Gui",
        (),
        {
            "scene": scene,
            "record": record,
            "module": module,
            "widget": widget,
            "ui": ui,
            "c": controller,
            "info": sf_module,
        },
    )
    widget.cleanup()  # as when Slicer exits: stops the warm engine
    if controller.logic.server is not None:
        assert not controller.logic.server.alive


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model):
    from afloc_engine.checkpoint import ModelInfo, save_model

    return save_model(tiny_model, tmp_path_factory.mktemp("models") / "tiny", ModelInfo(name="tiny", version="test"))


def run_timer_until_idle(gui, timeout=TIMEOUT):
    """Fire the poll timer like Qt's event loop until the job is over."""
    deadline = time.monotonic() + timeout
    while gui.c.pollTimer.isActive():
        assert time.monotonic() < deadline, "the job did not finish"
        gui.c.pollTimer.fire()
        time.sleep(0.05)


def test_module_metadata(gui):
    parent = gui.info.parent
    assert parent.title == "AFLoc" and parent.categories == ["Segmentation"]
    assert "prompt" in parent.helpText and parent.contributors


def test_panel_choices_come_from_the_engine(gui):
    from afloc_engine.prompts import CXR_FINDINGS

    ui = gui.ui
    assert [ui.presetComboBox.itemText(i) for i in range(1, ui.presetComboBox.count)] == list(CXR_FINDINGS)
    assert [ui.deviceComboBox.itemData(i) for i in range(ui.deviceComboBox.count)] == ["auto", "cpu", "gpu"]
    assert ui.modelComboBox.itemData(0) == "default"
    assert ui.adapterComboBox.itemText(0) == "None (zero-shot)"
    ui.promptsTextEdit.setPlainText("")
    ui.presetComboBox.choose("pleural effusion")
    assert ui.promptsTextEdit.toPlainText() == "Findings suggesting pleural effusion"
    ui.addAllPresetsButton.click()
    assert len(gui.c.prompts()) == len(CXR_FINDINGS)


@pytest.mark.slow
def test_panel_localize_threshold_opacity_remove(gui, sample_dicom):
    ui, scene = gui.ui, gui.scene
    assert not ui.applyButton.enabled  # nothing selected yet
    volume = sf.load_dicom_volume(scene, sample_dicom)
    before = sf.scene_snapshot(scene)
    ui.inputSelector.setCurrentNode(volume)
    ui.promptsTextEdit.setPlainText("Findings suggesting pneumothorax\n\ncardiomegaly\n")
    assert ui.applyButton.enabled and not ui.cancelButton.enabled
    ui.applyButton.click()
    assert gui.c.pollTimer.isActive() and ui.cancelButton.enabled and not ui.applyButton.enabled
    run_timer_until_idle(gui)
    assert gui.record.errors == []
    assert ui.statusLabel.text.startswith("Done: 2 heatmap(s)") and "untrained" in ui.statusLabel.text
    assert [ui.resultComboBox.itemText(i).split(":")[0] for i in range(ui.resultComboBox.count)] == [
        "pneumothorax",
        "cardiomegaly",
    ]
    results = gui.c.currentResults()
    assert ui.probabilityTableView.mrmlTableNode() is results.table
    composite = sf.slice_logic_of(scene).GetSliceCompositeNode()
    assert composite.GetForegroundVolumeID() == results.heatmaps[0].GetID()
    ui.resultComboBox.setCurrentIndex(1)
    assert composite.GetForegroundVolumeID() == results.heatmaps[1].GetID()
    ui.opacitySliderWidget.value = 0.8
    assert composite.GetForegroundOpacity() == pytest.approx(0.8)
    # the threshold slider re-thresholds live (debounced), without a new engine run
    ui.thresholdSliderWidget.value = 0.65
    assert gui.c.thresholdTimer.isActive() and not gui.c.pollTimer.isActive()
    gui.c.thresholdTimer.fire()
    for heat, segment_id in zip(results.heatmaps, results.segmentIds):
        mask = Scene.segmentMask(results.segmentation, segment_id, volume)
        assert np.array_equal(mask, Scene.volumeArray(heat) > 0.65)
    assert gui.c.logic.parameters.threshold == pytest.approx(0.65)
    # label map on request
    ui.createLabelmapCheckBox.checked = True
    assert gui.c.currentResults().labelmap is not None
    ui.removeResultsButton.click()
    assert sf.scene_snapshot(scene) == before
    assert ui.resultComboBox.count == 0 and not ui.removeResultsButton.enabled


@pytest.mark.slow
def test_panel_cancel_leaves_the_scene(gui):
    ui, scene = gui.ui, gui.scene
    volume = sf.add_volume(scene, np.zeros((1, 64, 64), np.int16), name="img")
    before = sf.scene_snapshot(scene)
    ui.inputSelector.setCurrentNode(volume)
    ui.promptsTextEdit.setPlainText("pneumothorax")
    ui.applyButton.click()
    gui.c.pollTimer.fire()
    ui.cancelButton.click()
    run_timer_until_idle(gui, 60)
    assert ui.statusLabel.text == "Cancelled. Nothing was added to the scene."
    assert gui.record.errors == [] and ui.applyButton.enabled
    assert sf.scene_snapshot(scene) == before


def test_panel_bad_input_messages(gui):
    ui, scene = gui.ui, gui.scene
    photo = sf.add_volume(scene, np.zeros((1, 16, 16, 3), np.uint8), name="photo", node_class="vtkMRMLVectorVolumeNode")
    before = sf.scene_snapshot(scene)
    ui.inputSelector.setCurrentNode(photo)
    ui.promptsTextEdit.setPlainText("pneumothorax")
    ui.applyButton.click()
    assert len(gui.record.errors) == 1 and "'photo' is a vector" in gui.record.errors[0]
    assert not gui.c.pollTimer.isActive() and sf.scene_snapshot(scene) == before
    ui.inputSelector.setCurrentNode(None)
    gui.c.onApply()  # e.g. from a keyboard shortcut while the button is disabled
    assert "No input volume is selected" in gui.record.errors[-1]
    # an empty segment cannot become a training example
    volume = sf.add_volume(scene, np.zeros((1, 16, 16), np.int16), name="v")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "corrections")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment_id = seg.GetSegmentation().AddEmptySegment("", "pneumothorax", [1, 0, 0])
    ui.inputSelector.setCurrentNode(volume)
    ui.trainingSegmentSelector.setCurrentNode(seg)
    ui.trainingSegmentSelector.setCurrentSegmentID(segment_id)
    ui.addExampleButton.click()
    assert "is empty on 'v'" in gui.record.errors[-1]
    assert ui.examplesListWidget.count == 0


def test_declined_install_runs_nothing(gui, monkeypatch):
    ui, scene = gui.ui, gui.scene
    gui.c.installer.engineImportable = lambda: False  # as on a fresh Slicer
    gui.record.confirm_answer = False
    volume = sf.add_volume(scene, np.zeros((1, 32, 32), np.int16), name="img")
    ui.inputSelector.setCurrentNode(volume)
    ui.promptsTextEdit.setPlainText("pneumothorax")
    ui.applyButton.click()
    assert len(gui.record.confirmations) == 1 and "afloc-engine" in gui.record.confirmations[0]
    assert gui.c.task is None and not gui.c.pollTimer.isActive()
    assert "not installed" in ui.statusLabel.text


def test_panel_few_shot_loop_with_a_stand_in_engine(gui, tmp_path, monkeypatch):
    """Add examples, fine-tune (stand-in engine: documented interface), the new adapter becomes the selected one."""
    from test_slicer_logic import fake_finetune_engine

    ui, scene, c = gui.ui, gui.scene, gui.c
    c.logic.server = None  # the stand-in speaks the one-shot CLI only: one process per job
    c.logic.python = fake_finetune_engine(tmp_path)
    for i in range(2):
        volume = sf.add_volume(scene, np.zeros((1, 32, 32), np.int16), name=f"case{i}")
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"case{i} corrected")
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segment_id = seg.GetSegmentation().AddEmptySegment("", "pneumothorax", [1, 0, 0])
        mask = np.zeros((1, 32, 32), bool)
        mask[0, 4:12, 6:20] = True
        Scene.setSegmentMask(seg, segment_id, mask, volume)
        ui.inputSelector.setCurrentNode(volume)
        ui.trainingSegmentSelector.setCurrentNode(seg)
        ui.trainingSegmentSelector.setCurrentSegmentID(segment_id)
        ui.addExampleButton.click()
    assert gui.record.errors == []
    assert [ui.examplesListWidget.itemText(i) for i in range(2)] == [
        "case0 / pneumothorax (pneumothorax)",
        "case1 / pneumothorax (pneumothorax)",
    ]
    ui.finetuneButton.click()
    run_timer_until_idle(gui, 60)
    assert gui.record.errors == []
    adapter = ui.adapterComboBox.currentData
    assert adapter and Path(adapter).parent == c.logic.adaptersDir
    assert c.logic.parameters.adapter == adapter
    assert "Adapter ready" in ui.statusLabel.text and "warning" not in ui.statusLabel.text
    ui.examplesListWidget.currentRow = 0
    ui.removeExampleButton.click()
    assert ui.examplesListWidget.count == 1
    # one example left: the engine warns, and the user sees it in the status line
    ui.finetuneButton.click()
    run_timer_until_idle(gui, 60)
    assert gui.record.errors == []
    assert "1 warning(s): one example: give at least 3 examples" in ui.statusLabel.text
    assert "Warning: one example" in ui.logTextEdit.toPlainText()


@pytest.mark.slow
def test_panel_suggests_the_next_image(gui):
    ui, scene = gui.ui, gui.scene
    rng = np.random.default_rng(3)
    for i in range(2):
        sf.add_volume(scene, (rng.random((1, 40, 40)) * 100).astype(np.int16), name=f"cxr{i}")
    ui.promptsTextEdit.setPlainText("pneumothorax")
    ui.suggestButton.click()
    run_timer_until_idle(gui)
    assert gui.record.errors == []
    assert ui.suggestionsListWidget.count == 2
    first = ui.suggestionsListWidget.itemText(0).split(":")[0]
    assert first in ("cxr0", "cxr1") and ui.statusLabel.text.startswith(f"Annotate '{first}' next")
    ui.suggestionsListWidget.currentRow = 0
    ui.suggestionsListWidget.itemDoubleClicked.emit(None)
    assert ui.inputSelector.currentNode().GetName() == first


@pytest.mark.slow
def test_self_test_runs_with_the_same_fixtures(gui, sample_dicom, monkeypatch):
    """AFLocSlicerTest (written for a real Slicer) runs here on the faked shell: same code, same data."""
    test = gui.module.AFLocSlicerTest()
    test.runTest()
    assert "DICOM radiograph: OK" in test.messages
    assert "Bad input: OK" in test.messages
