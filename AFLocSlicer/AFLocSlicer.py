"""AFLoc: pathology localisation from text prompts, as a 3D Slicer module.

This file only declares the module, its panel and its self-test; the work is done in
``AFLocSlicerLib`` (logic, background engine runner, scene results, installer, panel controller).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import slicer
from AFLocSlicerLib.Logic import AFLocLogic
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


class AFLocSlicer(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent: Any) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "AFLoc"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["AFLocSlicer developers"]
        self.parent.helpText = (
            "Localise findings on radiographs (and CT slice by slice) from text prompts with AFLoc "
            "(annotation-free pathology localisation): a heatmap per prompt, masks as a segmentation, "
            "and the zero-shot probability of each finding. Correct a few masks and fine-tune an adapter "
            "for your data. The first run installs the engine's Python packages after asking. "
            "See <a href='https://github.com/AFLocSlicer/AFLocSlicer'>the documentation</a>."
        )
        self.parent.acknowledgementText = (
            "AFLoc method: Yang et al., 'A multimodal vision-language model for generalizable annotation-free "
            "pathology localization'. Built on 3D Slicer, PyTorch and MONAI."
        )


class AFLocSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: loads the .ui file and hands it to AFLocWidgetController."""

    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.controller = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        from AFLocSlicerLib.Widget import AFLocWidgetController  # imports qt: only when the panel is built

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AFLocSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AFLocSlicerLogic()
        self.controller = AFLocWidgetController(self.ui, self.logic)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

    def cleanup(self) -> None:
        if self.controller is not None:
            self.controller.cleanup()
        self.removeObservers()

    def enter(self) -> None:
        if self.controller is not None:
            self.controller.refreshAdapters()
            self.controller.updateGUIFromParameters()

    def onSceneStartClose(self, caller: Any, event: Any) -> None:
        if self.controller is not None:
            self.controller.onSceneStartClose()

    def onSceneEndClose(self, caller: Any, event: Any) -> None:
        if self.parent is not None and self.controller is not None and self.parent.isEntered:
            self.controller.updateGUIFromParameters()


class AFLocSlicerLogic(ScriptedLoadableModuleLogic, AFLocLogic):
    """The module logic on Slicer's scene (see AFLocSlicerLib.Logic.AFLocLogic for the API).

    Jobs run on one warm engine process per logic (``afloc serve``), stopped by :meth:`shutdown`
    (the panel's cleanup) or at the latest when Slicer exits.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        AFLocLogic.__init__(self, slicer.mrmlScene)


class AFLocSlicerTest(ScriptedLoadableModuleTest):
    """Self-test, run inside Slicer (``Slicer --python-script`` / Reload and Test).

    Uses the same data as the pytest suite: RG1_UNCR.dcm from pydicom-data and, when present,
    a covid-cxr image from ../shared/data (or $AFLOC_SHARED_DATA). A tiny untrained model keeps it fast.
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_bad_input()
        self.setUp()
        self.test_dicom_radiograph()
        self.setUp()
        self.test_covid_image()

    # --- fixtures ---------------------------------------------------------------------------------
    def sampleDicom(self) -> Path | None:
        try:
            from pydicom.data import get_testdata_file

            path = get_testdata_file("RG1_UNCR.dcm")
        except ImportError:
            return None
        return Path(path) if path else None

    def sharedData(self) -> Path | None:
        here = Path(__file__).resolve().parents[1]
        root = Path(os.environ.get("AFLOC_SHARED_DATA", here.parent / "shared" / "data"))
        return root if (root / "covid-cxr" / "pairs.csv").is_file() else None

    def tinyModel(self) -> str:
        """A tiny untrained model folder (ResNet-10, D=32, 64 px), made once per test run."""
        if getattr(self, "_tinyModel", None):
            return self._tinyModel
        import torch

        from afloc_engine.checkpoint import ModelInfo, save_model
        from afloc_engine.config import AFLocConfig
        from afloc_engine.models import AFLocModel

        torch.manual_seed(0)
        config = AFLocConfig(
            backbone="resnet10", embed_dim=32, image_size=64, encoder_input_size=None, text_max_length=32
        )
        folder = Path(tempfile.mkdtemp(prefix="AFLocTest-")) / "tiny"
        self._tinyModel = str(save_model(AFLocModel(config).eval(), folder, ModelInfo(name="tiny", version="test")))
        return self._tinyModel

    def loadDicom(self, path: Path) -> Any:
        """Load a DICOM file as Slicer's DICOM module does (temporary database), or as a plain volume."""
        try:
            from DICOMLib import DICOMUtils

            folder = Path(tempfile.mkdtemp(prefix="AFLocDicom-"))
            (folder / path.name).write_bytes(path.read_bytes())
            with DICOMUtils.TemporaryDICOMDatabase() as db:
                DICOMUtils.importDicom(str(folder), db)
                nodeIds = DICOMUtils.loadPatientByUID(db.patients()[0])
            return slicer.mrmlScene.GetNodeByID(nodeIds[0])
        except (ImportError, IndexError, RuntimeError):
            return slicer.util.loadVolume(str(path))

    def snapshot(self) -> list[str]:
        return sorted(slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes()))

    # --- tests ------------------------------------------------------------------------------------
    def test_bad_input(self) -> None:
        from AFLocSlicerLib.Errors import AFLocSlicerError

        self.delayDisplay("Bad input: no volume, empty prompt")
        logic = AFLocSlicerLogic()
        _ = logic.parameters  # create the parameter node before the snapshot
        before = self.snapshot()
        for volume, prompts in ((None, ["pneumothorax"]),):
            with self.assertRaises(AFLocSlicerError):
                logic.startLocalization(volume, prompts)
        self.assertEqual(self.snapshot(), before)
        self.delayDisplay("Bad input: OK")

    def test_dicom_radiograph(self) -> None:
        import numpy as np
        from AFLocSlicerLib import Scene

        path = self.sampleDicom()
        if path is None:
            self.delayDisplay("pydicom-data is not installed: DICOM test skipped")
            return
        self.delayDisplay(f"Localizing on {path.name}")
        volume = self.loadDicom(path)
        self.assertIsNotNone(volume)
        logic = AFLocSlicerLogic()
        _ = logic.parameters
        before = self.snapshot()
        results = logic.localize(
            volume,
            ["Findings suggesting pneumothorax", "pleural effusion"],
            model=self.tinyModel(),
            device="cpu",
            timeout=600,
        )
        self.assertEqual(len(results.heatmaps), 2)
        for heat in results.heatmaps:
            self.assertTrue(np.allclose(Scene.ijkToRasArray(heat), Scene.ijkToRasArray(volume), rtol=0, atol=1e-12))
            self.assertEqual(heat.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        self.assertEqual(results.findings, ["pneumothorax", "pleural effusion"])
        seg = results.segmentation
        self.assertEqual(seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()).GetID(), volume.GetID())
        for heat, segmentId in zip(results.heatmaps, results.segmentIds):
            mask = Scene.segmentMask(seg, segmentId, volume)
            self.assertTrue(np.array_equal(mask, Scene.volumeArray(heat) > results.threshold))
        masks = logic.updateMasks(results, 0.6)
        self.assertTrue(np.array_equal(masks[0], Scene.volumeArray(results.heatmaps[0]) > 0.6))
        logic.showResults(results, 1, 0.5)
        logic.removeResults(results)
        logic.shutdown()
        self.assertEqual(self.snapshot(), before)
        self.delayDisplay("DICOM radiograph: OK")

    def test_covid_image(self) -> None:
        import numpy as np
        from AFLocSlicerLib import Scene

        data = self.sharedData()
        if data is None:
            self.delayDisplay("shared covid-cxr data not found: test skipped")
            return
        image = data / "covid-cxr" / "images" / "d45d56d1db55.jpg"
        volume = slicer.util.loadVolume(str(image))
        logic = AFLocSlicerLogic()
        results = logic.localize(volume, ["ground glass opacity"], model=self.tinyModel(), device="cpu", timeout=600)
        self.assertTrue(
            np.allclose(Scene.ijkToRasArray(results.heatmaps[0]), Scene.ijkToRasArray(volume), rtol=0, atol=1e-12)
        )
        self.assertEqual(results.findings, ["ground glass opacity"])
        logging.info("AFLoc probabilities: %s", results.probabilities)
        logic.shutdown()
        self.delayDisplay("covid-cxr image: OK")
