"""AFLocLogic: what the module does, without any GUI.

Every network run is the engine CLI in a background process (:mod:`AFLocSlicerLib.Process`):

- localisation: the input volume is exported to a temporary NRRD (with its IJK-to-RAS), the CLI
  ``afloc localize`` writes heatmaps, masks and probabilities, and :mod:`AFLocSlicerLib.Results`
  imports them beside the input (all or nothing);
- few-shot fine-tuning: (volume, segment) training examples are exported as image + mask NRRDs,
  ``afloc finetune`` trains an adapter in the temporary folder, and the finished adapter is moved
  into the adapter store, where :meth:`AFLocLogic.listAdapters` finds it;
- "suggest next image": ``afloc localize`` on every not-yet-annotated volume, ranked by
  :func:`uncertaintyScore`; nothing is added to the scene.

A task (:class:`EngineTask`) is started, then polled (a ``QTimer`` in the GUI, :meth:`EngineTask.wait`
in scripts and tests); Cancel kills the process and the scene stays as it was.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import slicer

from AFLocSlicerLib import Process, Results
from AFLocSlicerLib.Errors import AFLocSlicerError, JobCancelled
from AFLocSlicerLib.Parameters import AFLocParameters

log = logging.getLogger(__name__)

DEVICES = {"auto": "auto", "cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}
AMBIGUITY_MARGIN = 0.1
"""Heatmap values within this distance of the threshold count as ambiguous (see :func:`uncertaintyScore`)."""


# --- uncertainty ----------------------------------------------------------------------------------
def binaryEntropy(p: np.ndarray | float) -> np.ndarray:
    """Entropy of Bernoulli(p) in bits (0 when certain, 1 at p = 0.5)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def uncertaintyScore(
    probabilities: np.ndarray | list[float],
    heatmaps: list[np.ndarray],
    threshold: float,
    margin: float = AMBIGUITY_MARGIN,
) -> dict[str, float]:
    """How unsure the model is about one image, in [0, 1] (higher: annotate it first).

    ``score = (mean binary entropy of the P zero-shot probabilities + mean fraction of heatmap
    voxels within ``margin`` of the threshold) / 2``: a probability near 0.5 and a heatmap with
    much of the image on the mask border both mean a mask drawn there teaches the model the most.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    entropy = float(binaryEntropy(probs).mean()) if probs.size else 1.0
    ambiguity = (
        float(np.mean([np.mean(np.abs(np.asarray(h, dtype=np.float32) - threshold) < margin) for h in heatmaps]))
        if heatmaps
        else 0.0
    )
    return {"score": 0.5 * (entropy + ambiguity), "entropy": entropy, "ambiguity": ambiguity}


@dataclass
class Suggestion:
    """One candidate volume for annotation with its uncertainty (see :func:`uncertaintyScore`)."""

    volume: Any
    score: float
    entropy: float
    ambiguity: float
    probabilities: list[float]


@dataclass
class TrainingExample:
    """A (volume, segment) pair the user marked as a training example for ``finding``."""

    volume: Any
    segmentation: Any
    segmentId: str
    finding: str

    @property
    def label(self) -> str:
        seg = self.segmentation.GetSegmentation().GetSegment(self.segmentId)
        return f"{self.volume.GetName()} / {seg.GetName() if seg else self.segmentId} ({self.finding})"


# --- tasks ----------------------------------------------------------------------------------------
class EngineTask:
    """One background engine run and what happens when it ends (import, move, rank).

    ``state`` is running / succeeded / failed / cancelled; ``result`` and ``error`` are set at the end.
    """

    def __init__(
        self,
        logic: AFLocLogic,
        subcommand: str,
        arguments: list[str],
        workDir: Path,
        device: str = "auto",
        onProgress: Callable[[Process.Progress], None] | None = None,
        onLog: Callable[[str], None] | None = None,
    ) -> None:
        self.logic = logic
        self.subcommand = subcommand
        self.arguments = arguments
        self.workDir = workDir
        self.device = DEVICES.get(device, device)
        self.onProgress = onProgress
        self.onLog = onLog
        self.state = Process.PENDING
        self.result: Any = None
        self.error = ""
        self.process: Process.EngineProcess | None = None
        self.retriedOnCpu = False

    def _argv(self) -> list[str]:
        return Process.engine_command(self.logic.python, self.subcommand, [*self.arguments, "--device", self.device])

    def start(self) -> EngineTask:
        """Start the engine process; returns self."""
        self.process = Process.EngineProcess(self._argv(), self.logic.env, onProgress=self.onProgress, onLog=self._log)
        self.state = Process.RUNNING
        self.process.start()
        return self

    def _log(self, text: str) -> None:
        log.debug("afloc: %s", text)
        if self.onLog:
            self.onLog(text)

    def poll(self) -> bool:
        """Advance the task (non-blocking); True while it is still running."""
        if self.state != Process.RUNNING:
            return False
        if self.process.poll():
            return True
        if (
            self.process.state == Process.FAILED
            and self.process.outOfMemory
            and self.device != "cpu"
            and not self.retriedOnCpu
        ):
            self.retriedOnCpu = True
            self._log("The GPU ran out of memory; running on the CPU instead.")
            self.device = "cpu"
            self.process = Process.EngineProcess(
                self._argv(), self.logic.env, onProgress=self.onProgress, onLog=self._log
            )
            self.process.start()
            return True
        try:
            if self.process.state == Process.CANCELLED:
                self.state, self.error = Process.CANCELLED, "cancelled by the user; nothing was added to the scene"
            elif self.process.state == Process.FAILED:
                self.state = Process.FAILED
                self.error = f"afloc {self.subcommand} failed: {self.process.errorMessage}"
            else:
                try:
                    self.result = self.finish()
                    self.state = Process.SUCCEEDED
                except AFLocSlicerError as err:
                    self.state, self.error = Process.FAILED, str(err)
                except Exception as err:  # import failures must never leave the task running
                    log.exception("finishing afloc %s failed", self.subcommand)
                    self.state, self.error = Process.FAILED, f"{type(err).__name__}: {err}"
        finally:
            self.cleanup()
        return False

    def finish(self) -> Any:
        """Turn the finished job's outputs into the task's result (subclasses)."""
        return None

    def cancel(self) -> None:
        """Kill the engine process; the task ends as cancelled at the next poll."""
        if self.process is not None:
            self.process.cancel()
        elif self.state == Process.PENDING:
            self.state = Process.CANCELLED

    def cleanup(self) -> None:
        """Delete the task's temporary folder."""
        shutil.rmtree(self.workDir, ignore_errors=True)

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> Any:
        """Poll until the end; returns the result or raises :class:`AFLocSlicerError` / :class:`JobCancelled`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                while self.poll():
                    time.sleep(interval)
                raise AFLocSlicerError(f"afloc {self.subcommand} did not finish within {timeout} s and was stopped")
            time.sleep(interval)
        return self.outcome()

    def outcome(self) -> Any:
        """The result of a finished task, or its error raised."""
        if self.state == Process.SUCCEEDED:
            return self.result
        if self.state == Process.CANCELLED:
            raise JobCancelled(self.error)
        raise AFLocSlicerError(self.error or f"afloc {self.subcommand} did not run")


class LocalizationTask(EngineTask):
    """``afloc localize`` on one volume; the result is the imported :class:`Results.AFLocResults`."""

    def __init__(self, logic: AFLocLogic, inputVolume: Any, outDir: Path, **kwargs: Any) -> None:
        super().__init__(logic, "localize", **kwargs)
        self.inputVolume = inputVolume
        self.outDir = outDir

    def finish(self) -> Results.AFLocResults:
        if self.inputVolume.GetScene() is None:
            raise AFLocSlicerError(f"the input volume '{self.inputVolume.GetName()}' was removed from the scene")
        folders = (
            [p for p in self.outDir.iterdir() if p.is_dir() and not p.name.startswith(".")]
            if self.outDir.is_dir()
            else []
        )
        if len(folders) != 1:
            raise AFLocSlicerError(f"the engine wrote {len(folders)} result folders in {self.outDir}, expected 1")
        previous = Results.resultsFor(self.logic.scene, self.inputVolume)
        results = Results.importResults(self.logic.scene, self.inputVolume, folders[0])
        if previous is not None:  # replace the earlier run of the same input, only now that the new one is in
            Results.removeResults(previous)
        return results


class SuggestionTask(EngineTask):
    """``afloc localize`` on candidate volumes; the result is a list of :class:`Suggestion`, most uncertain first."""

    def __init__(
        self, logic: AFLocLogic, candidates: dict[str, Any], outDir: Path, threshold: float | None, **kwargs: Any
    ) -> None:
        super().__init__(logic, "localize", **kwargs)
        self.candidates = candidates
        self.outDir = outDir
        self.threshold = threshold

    def finish(self) -> list[Suggestion]:
        suggestions = []
        for stem, volume in self.candidates.items():
            folder = self.outDir / stem
            data = Results.readResultsJson(folder)
            threshold = float(data.get("threshold", 0.3) if self.threshold is None else self.threshold)
            heatmaps = [readVolumeArray(folder / str(e["heatmap"])) for e in data["prompts"]]
            probabilities = [float(e.get("probability", math.nan)) for e in data["prompts"]]
            score = uncertaintyScore(probabilities, heatmaps, threshold)
            suggestions.append(Suggestion(volume, score["score"], score["entropy"], score["ambiguity"], probabilities))
        suggestions.sort(key=lambda s: -s.score)
        return suggestions


class FinetuneTask(EngineTask):
    """``afloc finetune`` on the training examples; the result is the installed adapter folder."""

    def __init__(self, logic: AFLocLogic, finding: str, outDir: Path, **kwargs: Any) -> None:
        super().__init__(logic, "finetune", **kwargs)
        self.finding = finding
        self.outDir = outDir
        self.warnings: list[str] = []
        """What the engine says a user should know about the adapter (e.g. one example, a tiny mask)."""

    def finish(self) -> Path:
        adapter = self._findAdapter()
        self.warnings = [str(w) for w in self._doneEvent().get("warnings") or []]
        for warning in self.warnings:
            self._log(f"Warning: {warning}")
        store = self.logic.adaptersDir
        store.mkdir(parents=True, exist_ok=True)
        name = adapter.name if adapter != self.outDir else f"{slugify(self.finding)}-{time.strftime('%Y%m%d-%H%M%S')}"
        target = store / name
        n = 1
        while target.exists():
            n += 1
            target = store / f"{name}-{n}"
        shutil.move(str(adapter), str(target))
        return target

    def _doneEvent(self) -> dict[str, Any]:
        """The engine's ``done`` line (empty when it sent none)."""
        return (self.process.doneEvent or {}) if self.process else {}

    def _findAdapter(self) -> Path:
        done = self._doneEvent()
        for key in ("adapter", "output", "out"):
            value = done.get(key)
            if isinstance(value, str) and (Path(value) / "adapter.json").is_file():
                return Path(value)
        found = sorted(
            (
                p.parent
                for p in self.outDir.rglob("adapter.json")
                if not any(part.startswith(".") for part in p.parts[-3:-1])
            ),
            key=lambda p: p.stat().st_mtime,
        )
        if not found:
            raise AFLocSlicerError(f"afloc finetune finished but wrote no adapter (adapter.json) in {self.outDir}")
        return found[-1]


def slugify(text: str) -> str:
    """File-safe lower-case name of a finding ('Pleural effusion' -> 'pleural_effusion')."""
    out = "".join(ch if ch.isalnum() else "_" for ch in text.strip().lower())
    return "_".join(filter(None, out.split("_")))[:48] or "finding"


def readVolumeArray(path: Path) -> np.ndarray:
    """Voxels of an image file Slicer can read (NRRD) as a (K, J, I) float32 array."""
    node = slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(True)
    if not storage.ReadData(node):
        raise AFLocSlicerError(f"{path}: cannot read the heatmap")
    return np.array(Results.volumeArray(node), dtype=np.float32)


# --- the logic ------------------------------------------------------------------------------------
class AFLocLogic:
    """Localisation, results, few-shot fine-tuning and suggestions on one MRML scene.

    Args:
        scene: the MRML scene (default: ``slicer.mrmlScene``).
        python: interpreter that runs ``-m afloc_engine`` (default: PythonSlicer in Slicer, else this one).
        env: environment of the engine processes (default: Slicer's startup environment / ours).
        adaptersDir: where finished adapters are kept (default: ``$AFLOC_HOME/adapters``).
    """

    def __init__(
        self,
        scene: Any = None,
        python: str | None = None,
        env: dict[str, str] | None = None,
        adaptersDir: str | Path | None = None,
    ) -> None:
        self.scene = scene if scene is not None else slicer.mrmlScene
        self.python = python or Process.defaultPython()
        self.env = env if env is not None else Process.defaultEnvironment()
        self.adaptersDir = Path(adaptersDir) if adaptersDir else aflocHome() / "adapters"

    @property
    def parameters(self) -> AFLocParameters:
        """The module's parameter node (created on first use)."""
        return AFLocParameters.get(self.scene)

    # --- input checks ---------------------------------------------------------------------------
    def checkInputVolume(self, volumeNode: Any) -> None:
        """Raise :class:`AFLocSlicerError` unless ``volumeNode`` is a single-component scalar 2D/3D volume."""
        if volumeNode is None:
            raise AFLocSlicerError("No input volume is selected. Load an image (DICOM, PNG, NRRD, ...) and select it.")
        name = volumeNode.GetName()
        if volumeNode.GetAttribute(Results.ROLE) in ("heatmap", "labelmap"):
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

    # --- engine queries -------------------------------------------------------------------------
    def engineOptions(self, subcommand: str) -> set[str]:
        """Option strings of an engine subcommand (e.g. whether ``localize`` takes ``--adapter``)."""
        import argparse
        import importlib
        import importlib.util

        from afloc_engine.cli import SUBCOMMANDS

        if subcommand not in SUBCOMMANDS:
            raise AFLocSlicerError(f"the installed afloc_engine has no '{subcommand}' command")
        module = SUBCOMMANDS[subcommand][0]
        if importlib.util.find_spec(module) is None:
            raise AFLocSlicerError(
                f"the installed afloc_engine has no '{subcommand}' command yet ({module}); update it"
            )
        parser = argparse.ArgumentParser()
        importlib.import_module(module).add_arguments(parser)
        return {option for action in parser._actions for option in action.option_strings}

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
            if "--adapter" not in self.engineOptions("localize"):
                raise AFLocSlicerError(
                    "the installed afloc_engine cannot apply adapters yet (no localize --adapter); update it"
                )
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
        onProgress: Callable[[Process.Progress], None] | None = None,
        onLog: Callable[[str], None] | None = None,
    ) -> LocalizationTask:
        """Check the input, export it and start ``afloc localize`` in the background; poll the returned task."""
        self.checkInputVolume(inputVolume)
        prompts = self.checkPrompts(prompts)
        args = self._localizeArguments(prompts, threshold, model, adapter)
        workDir = Results.tempFolder()
        try:
            image = Results.exportVolume(inputVolume, workDir / "input.nrrd")
            task = LocalizationTask(
                self,
                inputVolume,
                workDir / "out",
                arguments=[str(image), *args, "--out", str(workDir / "out")],
                workDir=workDir,
                device=device,
                onProgress=onProgress,
                onLog=onLog,
            )
            return task.start()
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise

    def localize(
        self, inputVolume: Any, prompts: list[str], timeout: float | None = None, **kwargs: Any
    ) -> Results.AFLocResults:
        """:meth:`startLocalization` and wait (scripts, tests, batch use)."""
        return self.startLocalization(inputVolume, prompts, **kwargs).wait(timeout)

    def resultsFor(self, inputVolume: Any) -> Results.AFLocResults | None:
        """The AFLoc outputs of ``inputVolume`` in the scene, or None."""
        return Results.resultsFor(self.scene, inputVolume)

    def updateMasks(self, results: Results.AFLocResults, threshold: float) -> list[np.ndarray]:
        """Re-threshold the heatmaps into the segments (live threshold slider; no network run)."""
        return Results.updateMasks(results, threshold)

    def showResults(self, results: Results.AFLocResults, index: int = 0, opacity: float = 0.5) -> None:
        """Heatmap ``index`` over the input in every slice view, with its segment outlined."""
        Results.showResults(results, index, opacity)

    def exportLabelmap(self, results: Results.AFLocResults) -> Any:
        """A label map volume of the segments, beside the input (kept up to date by :meth:`updateMasks`)."""
        return Results.exportLabelmap(results)

    def removeResults(self, results: Results.AFLocResults) -> None:
        """Remove every output of one localisation; the scene is as it was before."""
        Results.removeResults(results)

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
        mask = Results.segmentMask(segmentation, segmentId, volume)
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
        stored = [
            e
            for e in params.trainingExamples
            if not (
                e.get("volume") == volume.GetID()
                and e.get("segment") == segmentId
                and e.get("segmentation") == segmentation.GetID()
            )
        ]
        stored.append(
            {"volume": volume.GetID(), "segmentation": segmentation.GetID(), "segment": segmentId, "finding": finding}
        )
        params.trainingExamples = stored
        return TrainingExample(volume, segmentation, segmentId, finding)

    def trainingExamples(self, finding: str | None = None) -> list[TrainingExample]:
        """The stored examples whose nodes are still in the scene (optionally of one finding)."""
        examples = []
        for entry in self.parameters.trainingExamples:
            volume = self.scene.GetNodeByID(entry.get("volume", ""))
            segmentation = self.scene.GetNodeByID(entry.get("segmentation", ""))
            if volume is None or segmentation is None:
                continue
            if segmentation.GetSegmentation().GetSegment(entry.get("segment", "")) is None:
                continue
            if finding and entry.get("finding", "").lower() != finding.lower():
                continue
            examples.append(TrainingExample(volume, segmentation, entry["segment"], entry.get("finding", "")))
        return examples

    def removeTrainingExample(self, index: int) -> None:
        """Forget stored example number ``index`` (0-based, in :meth:`trainingExamples` order without a filter)."""
        kept = self.trainingExamples()
        if not 0 <= index < len(kept):
            raise AFLocSlicerError(f"there is no training example number {index + 1}")
        del kept[index]
        self.parameters.trainingExamples = [
            {
                "volume": e.volume.GetID(),
                "segmentation": e.segmentation.GetID(),
                "segment": e.segmentId,
                "finding": e.finding,
            }
            for e in kept
        ]

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
        onProgress: Callable[[Process.Progress], None] | None = None,
        onLog: Callable[[str], None] | None = None,
    ) -> FinetuneTask:
        """Export the examples of ``finding`` and start ``afloc finetune`` in the background."""
        finding = (finding or "").strip()
        if not finding:
            raise AFLocSlicerError("Name the finding to fine-tune (e.g. 'pneumothorax').")
        examples = self.trainingExamples(finding)
        if not examples:
            raise AFLocSlicerError(
                f"There are no training examples of '{finding}'. Correct a mask in the Segment Editor and press "
                "'Add to training examples' first."
            )
        self.engineOptions("finetune")  # clear error if this engine cannot fine-tune yet
        workDir = Results.tempFolder("AFLocFinetune-")
        try:
            images, masks = [], []
            for i, example in enumerate(examples):
                mask = Results.segmentMask(example.segmentation, example.segmentId, example.volume)
                if not mask.any():
                    raise AFLocSlicerError(
                        f"training example {example.label} is empty now; remove it or paint the mask"
                    )
                images.append(Results.exportVolume(example.volume, workDir / f"image_{i:03d}.nrrd"))
                masks.append(writeMask(mask, example.volume, workDir / f"mask_{i:03d}.nrrd"))
            out = workDir / "out"
            args = ["--images", *map(str, images), "--masks", *map(str, masks), "--finding", finding, "--out", str(out)]
            args += ["--model", model or "default"]
            if epochs:
                args += ["--epochs", str(int(epochs))]
            task = FinetuneTask(
                self, finding, out, arguments=args, workDir=workDir, device=device, onProgress=onProgress, onLog=onLog
            )
            return task.start()
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise

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
        onProgress: Callable[[Process.Progress], None] | None = None,
        onLog: Callable[[str], None] | None = None,
    ) -> SuggestionTask:
        """Run the model on the not-yet-annotated volumes in the background to rank them by uncertainty."""
        prompts = self.checkPrompts(prompts)
        candidates = self.suggestionCandidates() if candidates is None else list(candidates)
        if not candidates:
            raise AFLocSlicerError("There is no loaded image left that is not already a training example.")
        for volume in candidates:
            self.checkInputVolume(volume)
        args = self._localizeArguments(prompts, threshold, model, adapter)
        workDir = Results.tempFolder("AFLocSuggest-")
        try:
            files, byStem = [], {}
            for i, volume in enumerate(candidates):
                stem = f"candidate_{i:04d}"
                files.append(str(Results.exportVolume(volume, workDir / f"{stem}.nrrd")))
                byStem[stem] = volume
            out = workDir / "out"
            task = SuggestionTask(
                self,
                byStem,
                out,
                threshold,
                arguments=[*files, *args, "--out", str(out)],
                workDir=workDir,
                device=device,
                onProgress=onProgress,
                onLog=onLog,
            )
            return task.start()
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise


def writeMask(mask: np.ndarray, referenceVolume: Any, path: Path) -> Path:
    """Write a (K, J, I) bool mask as a uint8 0/1 NRRD with ``referenceVolume``'s geometry."""
    node = slicer.vtkMRMLLabelMapVolumeNode()
    node.SetAndObserveImageData(Results.maskImageData(mask))
    node.CopyOrientation(referenceVolume)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(node):
        raise AFLocSlicerError(f"cannot write the training mask {path}")
    return Path(path)


def aflocHome() -> Path:
    """The engine's per-user folder (``$AFLOC_HOME``, default ``~/.cache/afloc``)."""
    try:
        from afloc_engine.registry import afloc_home

        return Path(afloc_home())
    except (ImportError, AttributeError):
        return Path(os.environ.get("AFLOC_HOME") or Path.home() / ".cache" / "afloc")
