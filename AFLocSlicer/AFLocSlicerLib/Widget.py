"""The module panel: binds the widgets of ``Resources/UI/AFLocSlicer.ui`` to :class:`AFLocLogic`.

The panel never blocks: a job is an engine process polled by a ``QTimer`` (progress bar, Cancel
kills it), the threshold slider re-thresholds the heatmaps already in the scene (debounced), and
the first run asks once to install the Python packages the engine needs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import qt
import slicer

from AFLocSlicerLib import Display
from AFLocSlicerLib.Errors import AFLocSlicerError, JobCancelled
from AFLocSlicerLib.InstallLogic import DependencyInstaller
from AFLocSlicerLib.Logic import AFLocLogic
from AFLocSlicerLib.Process import JobProgress
from AFLocSlicerLib.SceneResults import AFLocResults
from AFLocSlicerLib.Tasks import EngineTask, FinetuneTask, LocalizationTask, SuggestionTask

log = logging.getLogger(__name__)

DEVICE_CHOICES = [("auto (GPU if available)", "auto"), ("CPU", "cpu"), ("GPU (CUDA)", "gpu")]
NO_ADAPTER = "None (zero-shot)"
POLL_MS = 200
THRESHOLD_DEBOUNCE_MS = 150


class AFLocWidgetController:
    """Everything the panel does; :class:`AFLocSlicer.AFLocSlicerWidget` only creates it.

    Args:
        ui: the named widgets of the .ui file (``slicer.util.childWidgetVariables``).
        logic: the module logic.
        installer: the dependency installer (injectable for tests).
    """

    def __init__(self, ui: Any, logic: AFLocLogic, installer: DependencyInstaller | None = None) -> None:
        self.ui = ui
        self.logic = logic
        self.installer = installer or DependencyInstaller()
        self.task: EngineTask | None = None
        self.dependenciesReady = False
        self._updating = False
        self._suggestionIds: list[str] = []
        self._shown: list[tuple[AFLocResults, int]] = []
        """(run, prompt index) of each item of the result combo box."""
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_MS)
        self.pollTimer.timeout.connect(self.onPoll)
        self.thresholdTimer = qt.QTimer()
        self.thresholdTimer.setSingleShot(True)
        self.thresholdTimer.setInterval(THRESHOLD_DEBOUNCE_MS)
        self.thresholdTimer.timeout.connect(self.applyThreshold)
        self.setup()

    # --- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Fill the choices and connect the widgets."""
        ui = self.ui
        for text, value in DEVICE_CHOICES:
            ui.deviceComboBox.addItem(text, value)
        self.refreshPresets()
        self.refreshModels()
        self.refreshAdapters()
        ui.inputSelector.currentNodeChanged.connect(self.onInputChanged)
        ui.presetComboBox.currentIndexChanged.connect(self.onPresetChosen)
        ui.addAllPresetsButton.clicked.connect(self.onAddAllPresets)
        ui.promptsTextEdit.textChanged.connect(self.updateParametersFromGUI)
        ui.thresholdSliderWidget.valueChanged.connect(self.onThresholdChanged)
        ui.deviceComboBox.currentIndexChanged.connect(self.updateParametersFromGUI)
        ui.modelComboBox.currentIndexChanged.connect(self.updateParametersFromGUI)
        ui.adapterComboBox.currentIndexChanged.connect(self.updateParametersFromGUI)
        ui.applyButton.clicked.connect(self.onApply)
        ui.cancelButton.clicked.connect(self.onCancel)
        ui.resultComboBox.currentIndexChanged.connect(self.onResultChosen)
        ui.opacitySliderWidget.valueChanged.connect(self.onOpacityChanged)
        ui.createLabelmapCheckBox.toggled.connect(self.onCreateLabelmapToggled)
        ui.replaceResultsCheckBox.toggled.connect(self.updateParametersFromGUI)
        ui.epochsSpinBox.valueChanged.connect(self.updateParametersFromGUI)
        ui.removeResultsButton.clicked.connect(self.onRemoveResults)
        ui.addExampleButton.clicked.connect(self.onAddExample)
        ui.removeExampleButton.clicked.connect(self.onRemoveExample)
        ui.finetuneButton.clicked.connect(self.onFinetune)
        ui.suggestButton.clicked.connect(self.onSuggest)
        ui.suggestionsListWidget.itemDoubleClicked.connect(self.onSuggestionChosen)
        ui.installButton.clicked.connect(self.onInstall)
        self.updateGUIFromParameters()

    def refreshPresets(self) -> None:
        """The preset findings (from the engine; a hint to install it when it is not there yet)."""
        combo = self.ui.presetComboBox
        combo.clear()
        try:
            from afloc_engine.prompts import CXR_FINDINGS, TEMPLATE
        except ImportError:
            combo.addItem("(install the AFLoc engine first: Advanced)", "")
            return
        combo.addItem("Choose a chest finding…", "")
        for finding in CXR_FINDINGS:
            combo.addItem(finding, TEMPLATE.format(finding=finding))

    def refreshModels(self) -> None:
        """Model choices: the embedded default and installed models."""
        combo = self.ui.modelComboBox
        current = self.logic.parameters.model
        combo.clear()
        for name in self.logic.listModels():
            combo.addItem(name, name)
        index = combo.findData(current)
        combo.setCurrentIndex(index if index >= 0 else 0)

    def refreshAdapters(self, select: str | None = None) -> None:
        """Adapter choices: none, then the finished adapters (newest first)."""
        combo = self.ui.adapterComboBox
        current = select if select is not None else self.logic.parameters.adapter
        combo.clear()
        combo.addItem(NO_ADAPTER, "")
        for adapter in self.logic.listAdapters():
            base = f", base {adapter['base_model']}" if adapter["base_model"] else ""
            combo.addItem(f"{adapter['name']} ({adapter['finding']}{base})", adapter["path"])
        index = combo.findData(current)
        combo.setCurrentIndex(index if index >= 0 else 0)

    # --- parameters <-> GUI --------------------------------------------------------------------------
    def prompts(self) -> list[str]:
        """The prompt lines typed or added (empty lines dropped)."""
        return [line.strip() for line in self.ui.promptsTextEdit.toPlainText().splitlines() if line.strip()]

    def updateParametersFromGUI(self, *args: Any) -> None:
        """Store the panel's settings in the parameter node (saved with the scene)."""
        if self._updating:
            return
        params = self.logic.parameters
        params.inputVolume = self.ui.inputSelector.currentNode()
        params.prompts = self.prompts()
        params.device = self.ui.deviceComboBox.currentData or "auto"
        params.model = self.ui.modelComboBox.currentData or "default"
        params.adapter = self.ui.adapterComboBox.currentData or ""
        params.opacity = float(self.ui.opacitySliderWidget.value)
        params.createLabelmap = bool(self.ui.createLabelmapCheckBox.checked)
        params.replaceResults = bool(self.ui.replaceResultsCheckBox.checked)
        params.epochs = int(self.ui.epochsSpinBox.value)
        self.updateButtons()

    def updateGUIFromParameters(self) -> None:
        """Show the parameter node's settings in the panel."""
        params = self.logic.parameters
        self._updating = True
        try:
            self.ui.inputSelector.setCurrentNode(params.inputVolume)
            self.ui.promptsTextEdit.setPlainText("\n".join(params.prompts))
            if params.threshold is not None:  # else: the model's default, shown once results are in
                self.ui.thresholdSliderWidget.value = params.threshold
            index = self.ui.deviceComboBox.findData(params.device)
            self.ui.deviceComboBox.setCurrentIndex(max(index, 0))
            self.ui.opacitySliderWidget.value = params.opacity
            self.ui.createLabelmapCheckBox.checked = params.createLabelmap
            self.ui.replaceResultsCheckBox.checked = params.replaceResults
            self.ui.epochsSpinBox.value = params.epochs
        finally:
            self._updating = False
        self.refreshResults()
        self.refreshExamples()
        self.updateButtons()

    def updateButtons(self) -> None:
        """Enable what can be done now (a job runs: only Cancel)."""
        busy = self.task is not None
        hasInput = self.ui.inputSelector.currentNode() is not None
        self.ui.applyButton.enabled = not busy and hasInput and bool(self.prompts())
        self.ui.cancelButton.enabled = busy
        self.ui.finetuneButton.enabled = not busy
        self.ui.suggestButton.enabled = not busy
        self.ui.installButton.enabled = not busy
        self.ui.removeResultsButton.enabled = not busy and self.currentResults() is not None

    # --- dependencies -------------------------------------------------------------------------------
    def ensureDependencies(self) -> bool:
        """Install what the engine needs on first use (one confirmation). False if declined or failed."""
        if self.dependenciesReady:
            return True
        try:
            ready = self.installer.ensure(
                lambda text: slicer.util.confirmOkCancelDisplay(text, windowTitle="AFLoc: install Python packages")
            )
        except AFLocSlicerError as err:
            slicer.util.errorDisplay(f"AFLoc could not install its Python packages.\n\n{err}")
            return False
        if not ready:
            self.setStatus("The AFLoc engine is not installed; nothing was run.")
            return False
        self.dependenciesReady = True
        self.refreshPresets()
        self.refreshModels()
        return True

    def onInstall(self) -> None:
        self.dependenciesReady = False
        if self.ensureDependencies():
            self.setStatus("The AFLoc engine and its packages are installed.")

    # --- prompts ------------------------------------------------------------------------------------
    def onPresetChosen(self, index: int) -> None:
        prompt = self.ui.presetComboBox.itemData(index) if index >= 0 else ""
        if prompt:
            self.addPrompts([prompt])
            self.ui.presetComboBox.setCurrentIndex(0)

    def onAddAllPresets(self) -> None:
        combo = self.ui.presetComboBox
        self.addPrompts([combo.itemData(i) for i in range(combo.count) if combo.itemData(i)])

    def addPrompts(self, prompts: list[str]) -> None:
        """Append prompts that are not in the list yet."""
        current = self.prompts()
        added = [p for p in prompts if p not in current]
        if added:
            self.ui.promptsTextEdit.setPlainText("\n".join(current + added))
            self.updateParametersFromGUI()

    # --- localisation ---------------------------------------------------------------------------------
    def onInputChanged(self, node: Any) -> None:
        """Showing an input shows its results (and hides other inputs' AFLoc overlays)."""
        self.updateParametersFromGUI()
        if node is not None:
            self.logic.showInput(node, float(self.ui.opacitySliderWidget.value))
        self.refreshResults()

    def onApply(self) -> None:
        """Check the input, then start localisation in the background."""
        self.updateParametersFromGUI()
        params = self.logic.parameters
        volume = params.inputVolume
        self.runJob(
            lambda: self.logic.startLocalization(
                volume,
                self.prompts(),
                threshold=params.threshold,
                model=params.model,
                adapter=params.adapter,
                device=params.device,
                replace=params.replaceResults,
                opacity=params.opacity,
                onProgress=self.onProgress,
                onLog=self.appendLog,
            ),
            lambda task: f"Localizing {len(self.prompts())} prompt(s) on '{volume.GetName()}'...",
            check=lambda: self.logic.checkInputVolume(volume),
        )

    def runJob(
        self,
        start: Callable[[], EngineTask],
        status: Callable[[EngineTask], str],
        check: Callable[[], None] | None = None,
    ) -> None:
        """``check`` the inputs, install the engine's packages on first use, ``start`` the job and poll it;
        a problem the user can fix is a message box and nothing runs."""
        try:
            if check is not None:
                check()
            if not self.ensureDependencies():
                return
            task = start()
        except AFLocSlicerError as err:
            slicer.util.errorDisplay(f"AFLoc: {err}")
            return
        self.startPolling(task, status(task))

    def startPolling(self, task: EngineTask, status: str) -> None:
        self.task = task
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.visible = True
        self.setStatus(status)
        self.updateButtons()
        self.pollTimer.start()

    def onPoll(self) -> None:
        """QTimer tick: advance the job; when it ends, show its result or its error."""
        task = self.task
        if task is None:
            self.pollTimer.stop()
            return
        if task.poll():
            return
        self.pollTimer.stop()
        self.task = None
        self.ui.progressBar.visible = False
        try:
            result = task.outcome()
        except JobCancelled:
            self.setStatus("Cancelled. Nothing was added to the scene.")
            self.updateButtons()
            return
        except AFLocSlicerError as err:
            self.setStatus("Failed.")
            self.updateButtons()
            slicer.util.errorDisplay(f"AFLoc: {err}")
            return
        if isinstance(task, LocalizationTask):
            self.onLocalizationDone(result, task.replaced)
        elif isinstance(task, FinetuneTask):
            self.onFinetuneDone(result, task.warnings)
        elif isinstance(task, SuggestionTask):
            self.onSuggestionsDone(result)
        if task.retriedOnCpu:
            self.appendLog("Note: the GPU ran out of memory, so this ran on the CPU.")
        self.updateButtons()

    def onCancel(self) -> None:
        if self.task is not None:
            self.setStatus("Cancelling...")
            self.task.cancel()

    def onProgress(self, progress: JobProgress) -> None:
        self.ui.progressBar.setValue(int(round(100 * progress.fraction)))
        text = progress.message or "working"
        if progress.fields.get("fold_total"):
            text += f": leave-one-out fit {progress.fields.get('fold')}, {100 * progress.fraction:.0f} % in all"
        elif progress.total > 0:
            text += f": step {progress.step} of {progress.total}"
        if progress.eta_s is not None:
            text += f", about {progress.eta_s:.0f} s left"
        loss = progress.fields.get("loss")
        if loss is not None:
            text += f", loss {float(loss):.4f}"
        self.setStatus(text)

    def onLocalizationDone(self, results: AFLocResults, replaced: list[str] | None = None) -> None:
        params = self.logic.parameters
        if params.createLabelmap:
            self.logic.exportLabelmap(results)
        warning = "" if results.trained else " (untrained model: the outputs mean nothing)"
        note = f"; replaced {', '.join(replaced)}" if replaced else ""
        self.setStatus(f"Done: {len(results.heatmaps)} heatmap(s), run [{results.label}]{note}{warning}.")
        self.refreshResults(select=results)

    # --- results --------------------------------------------------------------------------------------
    def currentResults(self) -> AFLocResults | None:
        """The run shown in the result combo box (the input's newest when none is chosen)."""
        index = self.ui.resultComboBox.currentIndex
        if 0 <= index < len(self._shown):
            run, _ = self._shown[index]
            if run.segmentation is not None and run.segmentation.GetScene() is not None:
                return run
        return self.logic.resultsFor(self.ui.inputSelector.currentNode())

    @staticmethod
    def resultText(run: AFLocResults, index: int, share: float) -> str:
        """'pneumothorax: p 0.81, 10.7 % [default #1]': finding, probability, the mask's share of the image, run."""
        shareText = "" if share != share else f", {100 * share:.1f} %"  # NaN: unknown
        return f"{run.findings[index]}: p {run.probabilities[index]:.2f}{shareText} [{run.label}]"

    def refreshResults(self, select: AFLocResults | None = None) -> None:
        """List the selected input's runs and prompts; show the chosen one (newest run by default)."""
        runs = self.logic.runsFor(self.ui.inputSelector.currentNode())
        combo = self.ui.resultComboBox
        self._updating = True
        try:
            combo.clear()
            self._shown = []
            chosen = 0
            for run in runs:
                if select is not None and run.runId == select.runId:
                    chosen = len(self._shown)
                for index, share in enumerate(run.maskShares()):
                    combo.addItem(self.resultText(run, index, share))
                    self._shown.append((run, index))
            if self._shown:
                if select is None:  # the newest run's first prompt
                    chosen = len(self._shown) - len(runs[-1].heatmaps)
                combo.setCurrentIndex(chosen)
        finally:
            self._updating = False
        self.showChosen()

    def showChosen(self) -> None:
        """Show the run and prompt chosen in the combo box (table, slider, views)."""
        index = self.ui.resultComboBox.currentIndex
        if not 0 <= index < len(self._shown):
            self.ui.probabilityTableView.setMRMLTableNode(None)
            self.updateButtons()
            return
        run, prompt = self._shown[index]
        self.ui.probabilityTableView.setMRMLTableNode(run.table)
        self._updating = True
        try:
            self.ui.thresholdSliderWidget.value = run.threshold
        finally:
            self._updating = False
        self.logic.showResults(run, prompt, float(self.ui.opacitySliderWidget.value))
        self.updateButtons()

    def onResultChosen(self, index: int) -> None:
        if self._updating or index < 0:
            return
        self.showChosen()

    def onOpacityChanged(self, value: float) -> None:
        self.updateParametersFromGUI()
        Display.setOpacity(self.logic.scene, float(value))

    def onThresholdChanged(self, value: float) -> None:
        if self._updating:
            return
        self.updateParametersFromGUI()
        self.logic.parameters.threshold = float(value)  # the user's choice from now on
        if self.currentResults() is not None:
            self.thresholdTimer.start()  # debounce: re-threshold once the slider rests

    def applyThreshold(self) -> None:
        """Re-threshold the shown results at the slider's value (no network run)."""
        results = self.currentResults()
        if results is None:
            return
        try:
            self.logic.updateMasks(results, float(self.ui.thresholdSliderWidget.value))
        except AFLocSlicerError as err:
            slicer.util.errorDisplay(f"AFLoc: {err}")

    def onCreateLabelmapToggled(self, on: bool) -> None:
        self.updateParametersFromGUI()
        results = self.currentResults()
        if on and results is not None and results.labelmap is None:
            self.logic.exportLabelmap(results)

    def onRemoveResults(self) -> None:
        results = self.currentResults()
        if results is not None:
            label = results.label
            self.logic.removeResults(results)
            self.setStatus(f"Run [{label}] removed.")
        self.refreshResults()
        if not self._shown:
            self.logic.showInput(self.ui.inputSelector.currentNode(), float(self.ui.opacitySliderWidget.value))

    # --- few-shot ------------------------------------------------------------------------------------
    def refreshExamples(self) -> None:
        self.ui.examplesListWidget.clear()
        for example in self.logic.trainingExamples():
            self.ui.examplesListWidget.addItem(example.label)

    def onAddExample(self) -> None:
        volume = self.ui.inputSelector.currentNode()
        segmentation = self.ui.trainingSegmentSelector.currentNode()
        segmentId = self.ui.trainingSegmentSelector.currentSegmentID()
        finding = self.ui.findingLineEdit.text.strip()
        try:
            example = self.logic.addTrainingExample(volume, segmentation, segmentId, finding)
        except AFLocSlicerError as err:
            slicer.util.errorDisplay(f"AFLoc: {err}")
            return
        self.refreshExamples()
        self.setStatus(f"Training example added: {example.label}.")

    def onRemoveExample(self) -> None:
        row = self.ui.examplesListWidget.currentRow
        if row < 0:
            slicer.util.errorDisplay("AFLoc: select the training example to remove in the list first.")
            return
        try:
            self.logic.removeTrainingExample(int(row))
        except AFLocSlicerError as err:
            slicer.util.errorDisplay(f"AFLoc: {err}")
            return
        self.refreshExamples()

    def onFinetune(self) -> None:
        params = self.logic.parameters
        finding = self.ui.findingLineEdit.text.strip()
        if not finding:
            examples = self.logic.trainingExamples()
            finding = examples[-1].finding if examples else ""
        self.runJob(
            lambda: self.logic.startFinetune(
                finding,
                model=params.model,
                device=params.device,
                epochs=params.epochs or None,  # 0: the engine's "auto"
                onProgress=self.onProgress,
                onLog=self.appendLog,
            ),
            lambda task: f"Fine-tuning '{finding}' on {len(self.logic.trainingExamples(finding))} example(s)...",
        )

    def onFinetuneDone(self, adapter: Any, warnings: list[str] | None = None) -> None:
        self.refreshAdapters(select=str(adapter))
        self.updateParametersFromGUI()
        status = f"Adapter ready and selected: {adapter}. Localize the next image to use it."
        if warnings:  # each is in the log too
            more = " (more in the log)" if len(warnings) > 1 else ""
            status += f" {len(warnings)} warning(s): {warnings[0]}{more}"
        self.setStatus(status)

    def onSuggest(self) -> None:
        params = self.logic.parameters
        self.runJob(
            lambda: self.logic.startSuggestion(
                self.prompts(),
                model=params.model,
                adapter=params.adapter,
                device=params.device,
                threshold=params.threshold,
                onProgress=self.onProgress,
                onLog=self.appendLog,
            ),
            lambda task: f"Ranking {len(task.candidates)} image(s) by model uncertainty...",
        )

    def onSuggestionsDone(self, suggestions: list) -> None:
        self.ui.suggestionsListWidget.clear()
        self._suggestionIds = []
        for s in suggestions:
            probs = ", ".join(f"{p:.2f}" for p in s.probabilities)
            self.ui.suggestionsListWidget.addItem(f"{s.volume.GetName()}: uncertainty {s.score:.2f} (p = {probs})")
            self._suggestionIds.append(s.volume.GetID())
        if suggestions:
            self.setStatus(f"Annotate '{suggestions[0].volume.GetName()}' next (the model is least sure about it).")

    def onSuggestionChosen(self, *args: Any) -> None:
        row = self.ui.suggestionsListWidget.currentRow
        if 0 <= row < len(self._suggestionIds):
            self.ui.inputSelector.setCurrentNode(self.logic.scene.GetNodeByID(self._suggestionIds[int(row)]))

    # --- misc -----------------------------------------------------------------------------------------
    def setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text
        log.info(text)

    def appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def onSceneStartClose(self) -> None:
        """The scene is closing: stop any job (its results could not be added anyway)."""
        if self.task is not None:
            self.task.cancel()
            while self.task.poll():
                time.sleep(0.05)
            self.task = None
        self.pollTimer.stop()

    def cleanup(self) -> None:
        """The module is unloaded (or Slicer exits): stop timers, jobs and the warm engine."""
        self.onSceneStartClose()
        self.thresholdTimer.stop()
        self.logic.shutdown()
