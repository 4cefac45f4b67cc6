"""AFLocLogic: what the module does, without any GUI; the list of its steps.

Every network run is the engine in a background process: the warm engine of the session
(:mod:`AFLocSlicerLib.Server`, ``afloc serve``; default) or a one-shot ``afloc`` process
(``warm=False``). The steps of each action:

- *localize*: check the input and prompts -> export the volume to a temporary NRRD -> the
  engine's ``localize`` -> import the folder its done line names as a new run beside the input
  (:mod:`AFLocSlicerLib.SceneResults`) -> show it (:mod:`AFLocSlicerLib.Display`);
- *fine-tune*: export each training example (volume + segment) -> the engine's ``finetune`` ->
  move the adapter its done line names into the store, where :meth:`AFLocLogic.listAdapters` finds it;
- *suggest the next image*: the engine's ``localize`` on every not-yet-annotated volume -> rank
  them by :func:`Tasks.uncertaintyScore`; nothing is added to the scene.

A task (:mod:`AFLocSlicerLib.Tasks`) is started, then polled; Cancel stops the engine and the
scene stays as it was.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import slicer

from AFLocSlicerLib import Display, Process, SceneResults
from AFLocSlicerLib.Errors import AFLocSlicerError
from AFLocSlicerLib.Parameters import AFLocParameters, TrainingExample
from AFLocSlicerLib.Process import JobProgress
from AFLocSlicerLib.Scene import ROLE, exportVolume, segmentMask, tempFolder, writeMask
from AFLocSlicerLib.SceneResults import AFLocResults
from AFLocSlicerLib.Server import EngineServer
from AFLocSlicerLib.Tasks import EngineTask, FinetuneTask, LocalizationTask, SuggestionTask

log = logging.getLogger(__name__)

ProgressCallback = Callable[[JobProgress], None] | None
LogCallback = Callable[[str], None] | None


class AFLocLogic:
    """Localisation, results, few-shot fine-tuning and suggestions on one MRML scene.

    Args:
        scene: the MRML scene (default: ``slicer.mrmlScene``).
        python: interpreter that runs ``-m afloc_engine`` (default: PythonSlicer in Slicer, else this one).
        env: environment of the engine processes (default: Slicer's startup environment / ours).
        adaptersDir: where finished adapters are kept (default: ``$AFLOC_HOME/adapters``).
        warm: run jobs on the session's warm engine (default; one per interpreter, shared by every logic
            object), else one process per job.
    """

    def __init__(
        self,
        scene: Any = None,
        python: str | None = None,
        env: dict[str, str] | None = None,
        adaptersDir: str | Path | None = None,
        warm: bool = True,
    ) -> None:
        self.scene = scene if scene is not None else slicer.mrmlScene
        self.python = python or Process.defaultPython()
        self.env = env if env is not None else Process.defaultEnvironment()
        self.adaptersDir = Path(adaptersDir) if adaptersDir else aflocHome() / "adapters"
        self.server: EngineServer | None = EngineServer.shared(self.python, self.env) if warm else None

    @property
    def parameters(self) -> AFLocParameters:
        """The module's parameter node (created on first use)."""
        return AFLocParameters.get(self.scene)

    def shutdown(self) -> None:
        """Stop the warm engine (module cleanup, Slicer exit); the next job starts a new one."""
        if self.server is not None:
            self.server.stop()

    # --- input checks ---------------------------------------------------------------------------
    def checkInputVolume(self, volumeNode: Any) -> None:
        """Raise :class:`AFLocSlicerError` unless ``volumeNode`` is a single-component scalar 2D/3D volume."""
        if volumeNode is None:
            raise AFLocSlicerError("No input volume is selected. Load an image (DICOM, PNG, NRRD, ...) and select it.")
        name = volumeNode.GetName()
        if volumeNode.GetAttribute(ROLE) in ("heatmap", "labelmap"):
            raise AFLocSlicerError(f"'{name}' is an AFLoc output; select the image it was computed from.")
        if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise AFLocSlicerError(f"'{name}' is a label map, not an image. Select the image volume.")
        image = volumeNode.GetImageData() if volumeNode.IsA("vtkMRMLVolumeNode") else None
        if image is None or image.GetNumberOfPoints() == 0:
            raise AFLocSlicerError(f"'{name}' has no voxels.")
        components = image.GetNumberOfScalarComponents()
        if volumeNode.IsA("vtkMRMLMultiVolumeNode") or volumeNode.IsA("vtkMRMLDiffusionWeightedVolumeNode"):
            raise AFLocSlicerError(
                f"'{name}' is a 4D volume ({components} frames). AFLoc works on one 2D image or 3D volume: "
                "extract one frame first."
            )
        if volumeNode.IsA("vtkMRMLVectorVolumeNode") or components > 1 or not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
            raise AFLocSlicerError(
                f"'{name}' is a vector (colour/multi-component) volume with {components} components. "
                "Convert it to a scalar volume first (Volumes module: Convert to scalar volume)."
            )
        for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
            browser = self.scene.GetNthNodeByClass(i, "vtkMRMLSequenceBrowserNode")
            if browser.IsProxyNodeID(volumeNode.GetID()):
                raise AFLocSlicerError(
                    f"'{name}' is one frame of the 4D sequence '{browser.GetName()}'. AFLoc works on one 2D image "
                    "or 3D volume: clone the frame into its own volume first."
                )

    def checkPrompts(self, prompts: list[str] | str) -> list[str]:
        """Stripped prompts; :class:`AFLocSlicerError` for none, empty or over-long ones (engine rules)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        from afloc_engine.errors import PromptError
        from afloc_engine.prompts import validate_prompts

        try:
            return validate_prompts(list(prompts))
        except PromptError as err:
            raise AFLocSlicerError(
                f"Prompt: {err.problem}. Type a finding (e.g. 'pleural effusion') or pick a preset."
            ) from None

    def listModels(self) -> list[str]:
        """Names of the usable models: ``default`` first, then installed ones."""
        names = ["default"]
        try:
            from afloc_engine import registry

            for entry in registry.list_models():
                name = str(entry.get("name", ""))
                if name and name not in names and entry.get("installed", True) is not False:
                    names.append(name)
        except Exception as err:  # an unreadable cache must not break the module panel
            log.warning("cannot list AFLoc models: %s", err)
        return names

    def listAdapters(self) -> list[dict[str, Any]]:
        """Finished adapters in the store: ``{path, name, finding, base_model, created}``, newest first."""
        adapters = []
        if not self.adaptersDir.is_dir():
            return adapters
        for folder in self.adaptersDir.iterdir():
            meta = folder / "adapter.json"
            if folder.name.startswith(".") or not meta.is_file():
                continue
            try:
                data = json.loads(meta.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            findings = data.get("findings") or [data.get("finding", "")]
            adapters.append(
                {
                    "path": str(folder),
                    "name": folder.name,
                    "finding": ", ".join(str(f) for f in findings if f),
                    "base_model": str(data.get("base_model_id") or data.get("base_model") or ""),
                    "created": str(data.get("created", "")),
                    "mtime": folder.stat().st_mtime,
                }
            )
        adapters.sort(key=lambda a: -a["mtime"])
        return adapters

    # --- localisation -----------------------------------------------------------------------------
    def _localizeArguments(self, prompts: list[str], threshold: float | None, model: str, adapter: str) -> list[str]:
        args: list[str] = []
        for prompt in prompts:
            args += ["--prompt", prompt]
        if threshold is not None:
            if not -1.0 <= float(threshold) <= 1.0:
                raise AFLocSlicerError(f"threshold {threshold} is outside the heatmap range [-1, 1]")
            args += ["--threshold", repr(float(threshold))]
        args += ["--model", model or "default", "--no-overlay"]
        if adapter:
            if not (Path(adapter) / "adapter.json").is_file():
                raise AFLocSlicerError(f"{adapter}: not an AFLoc adapter folder (no adapter.json)")
            args += ["--adapter", str(adapter)]
        return args

    def startLocalization(
        self,
        inputVolume: Any,
        prompts: list[str],
        threshold: float | None = None,
        model: str = "default",
        adapter: str = "",
        device: str = "auto",
        replace: bool = False,
        opacity: float = 0.8,
        onProgress: ProgressCallback = None,
        onLog: LogCallback = None,
    ) -> LocalizationTask:
        """Check the input, export it and start the engine's ``localize``; poll the returned task.

        When it ends, the results are added as a new run beside the input's earlier runs (``replace``:
        the earlier runs of the same model and adapter are removed) and shown: the input as background,
        the first prompt's heatmap as foreground at ``opacity`` with its legend and mask outline, other
        inputs' AFLoc overlays hidden. ``threshold`` None: the model's calibrated default.
        """
        self.checkInputVolume(inputVolume)
        prompts = self.checkPrompts(prompts)
        args = self._localizeArguments(prompts, threshold, model, adapter)

        def task(workDir: Path) -> LocalizationTask:
            image = exportVolume(inputVolume, workDir / "input.nrrd")
            return LocalizationTask(
                self,
                inputVolume,
                adapter=str(adapter or ""),
                replace=replace,
                opacity=opacity,
                arguments=[str(image), *args, "--out", str(workDir / "out")],
                workDir=workDir,
                device=device,
                onProgress=onProgress,
                onLog=onLog,
            )

        return self._start("AFLoc-", task)

    def _start(self, prefix: str, makeTask: Callable[[Path], EngineTask]) -> EngineTask:
        """Make a temporary folder, let ``makeTask`` export its inputs there, start the task; on any error
        before it runs the folder goes again."""
        workDir = tempFolder(prefix)
        try:
            return makeTask(workDir).start()
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise

    def localize(
        self, inputVolume: Any, prompts: list[str], timeout: float | None = None, **kwargs: Any
    ) -> AFLocResults:
        """:meth:`startLocalization` and wait (scripts, tests, batch use); shown as the panel shows them."""
        return self.startLocalization(inputVolume, prompts, **kwargs).wait(timeout)

    def resultsFor(self, inputVolume: Any) -> AFLocResults | None:
        """The newest AFLoc run of ``inputVolume`` in the scene, or None."""
        return SceneResults.resultsFor(self.scene, inputVolume)

    def runsFor(self, inputVolume: Any) -> list[AFLocResults]:
        """Every AFLoc run of ``inputVolume`` in the scene, oldest first."""
        return SceneResults.runsFor(self.scene, inputVolume)

    def updateMasks(self, results: AFLocResults, threshold: float) -> list[np.ndarray]:
        """Re-threshold the heatmaps into the segments (live threshold slider; no network run)."""
        return SceneResults.updateMasks(results, threshold)

    def showResults(self, results: AFLocResults, index: int = 0, opacity: float = 0.8) -> None:
        """Heatmap ``index`` of one run over its input in every slice view, its mask outlined, a legend;
        other inputs' and runs' AFLoc overlays hidden."""
        Display.showResults(results, index, opacity)

    def showInput(self, inputVolume: Any, opacity: float = 0.8, index: int = 0) -> AFLocResults | None:
        """Show an input with its newest run (or alone); other inputs' AFLoc overlays hidden. Returns the run."""
        return Display.showInput(self.scene, inputVolume, opacity, index)

    def exportLabelmap(self, results: AFLocResults) -> Any:
        """A label map volume of the segments, beside the input (kept up to date by :meth:`updateMasks`)."""
        return SceneResults.exportLabelmap(results)

    def removeResults(self, results: AFLocResults) -> None:
        """Remove every output of one run; the scene is as it was before it."""
        SceneResults.removeResults(results)

    # --- few-shot: training examples ------------------------------------------------------------------
    def addTrainingExample(self, volume: Any, segmentation: Any, segmentId: str, finding: str = "") -> TrainingExample:
        """Store (volume, segment) as a training example of ``finding`` (default: the segment's name).

        Raises :class:`AFLocSlicerError` for a missing or empty segment, or one that covers the whole image.
        """
        self.checkInputVolume(volume)
        if segmentation is None or not segmentation.IsA("vtkMRMLSegmentationNode"):
            raise AFLocSlicerError("Select the segmentation that holds the corrected mask.")
        segment = segmentation.GetSegmentation().GetSegment(segmentId) if segmentId else None
        if segment is None:
            raise AFLocSlicerError(f"Select a segment of '{segmentation.GetName()}' to use as the training mask.")
        finding = (finding or segment.GetName()).strip()
        if not finding:
            raise AFLocSlicerError("The training example needs a finding name (e.g. 'pneumothorax').")
        mask = segmentMask(segmentation, segmentId, volume)
        if not mask.any():
            raise AFLocSlicerError(
                f"Segment '{segment.GetName()}' of '{segmentation.GetName()}' is empty on '{volume.GetName()}'. "
                "Paint the finding with the Segment Editor first."
            )
        if mask.all():
            raise AFLocSlicerError(
                f"Segment '{segment.GetName()}' covers all of '{volume.GetName()}'; "
                "a training mask must mark only the finding."
            )
        params = self.parameters
        example = TrainingExample(volume, segmentation, segmentId, finding)
        kept = [e for e in params.trainingExamples if not e.same(volume, segmentation, segmentId)]
        params.trainingExamples = [*kept, example]
        return example

    def trainingExamples(self, finding: str | None = None) -> list[TrainingExample]:
        """The stored examples whose nodes are still in the scene (optionally of one finding)."""
        examples = self.parameters.trainingExamples
        return [e for e in examples if not finding or e.finding.lower() == finding.lower()]

    def removeTrainingExample(self, index: int) -> None:
        """Forget stored example number ``index`` (0-based, in :meth:`trainingExamples` order without a filter)."""
        kept = self.trainingExamples()
        if not 0 <= index < len(kept):
            raise AFLocSlicerError(f"there is no training example number {index + 1}")
        del kept[index]
        self.parameters.trainingExamples = kept

    def clearTrainingExamples(self) -> None:
        """Forget all training examples (the segmentations stay in the scene)."""
        self.parameters.trainingExamples = []

    def annotatedVolumes(self) -> set[str]:
        """IDs of volumes that are training examples."""
        return {e.volume.GetID() for e in self.trainingExamples()}

    # --- few-shot: fine-tuning ------------------------------------------------------------------------
    def startFinetune(
        self,
        finding: str,
        model: str = "default",
        device: str = "auto",
        epochs: int | None = None,
        onProgress: ProgressCallback = None,
        onLog: LogCallback = None,
    ) -> FinetuneTask:
        """Export the examples of ``finding`` and start the engine's ``finetune`` (``epochs`` None or 0: auto)."""
        finding = (finding or "").strip()
        if not finding:
            raise AFLocSlicerError("Name the finding to fine-tune (e.g. 'pneumothorax').")
        examples = self.trainingExamples(finding)
        if not examples:
            raise AFLocSlicerError(
                f"There are no training examples of '{finding}'. Correct a mask in the Segment Editor and press "
                "'Add to training examples' first."
            )

        def task(workDir: Path) -> FinetuneTask:
            images, masks, names = [], [], {}
            for i, example in enumerate(examples):
                mask = segmentMask(example.segmentation, example.segmentId, example.volume)
                if not mask.any():
                    raise AFLocSlicerError(
                        f"training example {example.label} is empty now; remove it or paint the mask"
                    )
                image = exportVolume(example.volume, workDir / f"image_{i:03d}.nrrd")
                images.append(image)
                masks.append(writeMask(mask, example.volume, workDir / f"mask_{i:03d}.nrrd"))
                segment = example.segmentation.GetSegmentation().GetSegment(example.segmentId)
                names[image.name] = f"{example.volume.GetName()} / {segment.GetName()}"
            out = workDir / "out"
            args = ["--images", *map(str, images), "--masks", *map(str, masks), "--finding", finding, "--out", str(out)]
            args += ["--model", model or "default"]
            if epochs:
                args += ["--epochs", str(int(epochs))]
            return FinetuneTask(
                self, finding, names, arguments=args, workDir=workDir, device=device, onProgress=onProgress, onLog=onLog
            )

        return self._start("AFLocFinetune-", task)

    # --- few-shot: which image next -----------------------------------------------------------------
    def suggestionCandidates(self) -> list[Any]:
        """Loaded image volumes that are not training examples yet and not AFLoc outputs."""
        annotated = self.annotatedVolumes()
        candidates = []
        for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
            node = self.scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
            if node.GetID() in annotated or node.GetHideFromEditors():
                continue
            try:
                self.checkInputVolume(node)
            except AFLocSlicerError:
                continue
            candidates.append(node)
        return candidates

    def startSuggestion(
        self,
        prompts: list[str],
        model: str = "default",
        adapter: str = "",
        device: str = "auto",
        threshold: float | None = None,
        candidates: list[Any] | None = None,
        onProgress: ProgressCallback = None,
        onLog: LogCallback = None,
    ) -> SuggestionTask:
        """Run the model on the not-yet-annotated volumes in the background to rank them by uncertainty."""
        prompts = self.checkPrompts(prompts)
        candidates = self.suggestionCandidates() if candidates is None else list(candidates)
        if not candidates:
            raise AFLocSlicerError("There is no loaded image left that is not already a training example.")
        for volume in candidates:
            self.checkInputVolume(volume)
        args = self._localizeArguments(prompts, threshold, model, adapter)

        def task(workDir: Path) -> SuggestionTask:
            files = [str(exportVolume(v, workDir / f"candidate_{i:04d}.nrrd")) for i, v in enumerate(candidates)]
            return SuggestionTask(
                self,
                candidates,
                threshold,
                arguments=[*files, *args, "--out", str(workDir / "out")],
                workDir=workDir,
                device=device,
                onProgress=onProgress,
                onLog=onLog,
            )

        return self._start("AFLocSuggest-", task)


def aflocHome() -> Path:
    """The engine's per-user folder (``$AFLOC_HOME``, default ``~/.cache/afloc``)."""
    try:
        from afloc_engine.registry import afloc_home

        return Path(afloc_home())
    except (ImportError, AttributeError):
        return Path(os.environ.get("AFLOC_HOME") or Path.home() / ".cache" / "afloc")
