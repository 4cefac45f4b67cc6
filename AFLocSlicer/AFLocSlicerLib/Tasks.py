"""Background jobs of the module and what happens when they end (import, move, rank).

A task is started, then polled (a ``QTimer`` in the GUI, :meth:`EngineTask.wait` in scripts and
tests); it runs on the warm engine (:mod:`AFLocSlicerLib.Server`, the default) or in a one-shot
engine process (:mod:`AFLocSlicerLib.Process`). Cancel stops the engine and the scene stays as it was.

- :class:`LocalizationTask`: ``afloc localize`` on one volume; the result folder named by the
  engine's done line is imported as a new run beside the input and shown;
- :class:`FinetuneTask`: ``afloc finetune``; the adapter named by the done line moves into the store;
- :class:`SuggestionTask`: ``afloc localize`` on candidates, ranked by :func:`uncertaintyScore`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from AFLocSlicerLib import Display, SceneResults
from AFLocSlicerLib.Errors import AFLocSlicerError, JobCancelled
from AFLocSlicerLib.Process import (
    CANCELLED,
    FAILED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    EngineProcess,
    JobEvents,
    JobProgress,
    engine_command,
)
from AFLocSlicerLib.Scene import readVolumeArray

if TYPE_CHECKING:
    from AFLocSlicerLib.Logic import AFLocLogic

log = logging.getLogger(__name__)

DEVICES = {"auto": "auto", "cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}
AMBIGUITY_MARGIN = 0.1
"""Heatmap values within this distance of the threshold count as ambiguous (see :func:`uncertaintyScore`)."""


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


class EngineTask:
    """One engine job and what happens when it ends.

    ``state`` is pending / running / succeeded / failed / cancelled; ``result`` and ``error`` are set at the end.
    """

    def __init__(
        self,
        logic: AFLocLogic,
        subcommand: str,
        arguments: list[str],
        workDir: Path,
        device: str = "auto",
        onProgress: Callable[[JobProgress], None] | None = None,
        onLog: Callable[[str], None] | None = None,
    ) -> None:
        self.logic = logic
        self.subcommand = subcommand
        self.arguments = arguments
        self.workDir = workDir
        self.device = DEVICES.get(device, device)
        self.onProgress = onProgress
        self.onLog = onLog
        self.state = PENDING
        self.result: Any = None
        self.error = ""
        self.process: JobEvents | None = None
        self.retriedOnCpu = False

    def _launch(self) -> JobEvents:
        arguments = [*self.arguments, "--device", self.device]
        server = self.logic.server
        if server is not None:
            server.python, server.env = self.logic.python, self.logic.env  # for its next start
            return server.submit(self.subcommand, arguments, onProgress=self.onProgress, onLog=self._log)
        process = EngineProcess(
            engine_command(self.logic.python, self.subcommand, arguments),
            self.logic.env,
            onProgress=self.onProgress,
            onLog=self._log,
        )
        process.start()
        return process

    def start(self) -> EngineTask:
        """Start the job on the engine; returns self."""
        self.state = RUNNING
        self.process = self._launch()
        return self

    def _log(self, text: str) -> None:
        log.debug("afloc: %s", text)
        if self.onLog:
            self.onLog(text)

    def doneEvent(self) -> dict[str, Any]:
        """The engine's ``done`` event (empty when it sent none)."""
        return (self.process.doneEvent or {}) if self.process else {}

    def poll(self) -> bool:
        """Advance the task (non-blocking); True while it is still running."""
        if self.state != RUNNING:
            return False
        if self.process.poll():
            return True
        if self.process.state == FAILED and self.process.outOfMemory and self.device != "cpu" and not self.retriedOnCpu:
            self.retriedOnCpu = True
            self._log("The GPU ran out of memory; running on the CPU instead.")
            self.device = "cpu"
            self.process = self._launch()
            return True
        try:
            if self.process.state == CANCELLED:
                self.state, self.error = CANCELLED, "cancelled by the user; nothing was added to the scene"
            elif self.process.state == FAILED:
                self.state = FAILED
                self.error = f"afloc {self.subcommand} failed: {self.process.errorMessage}"
            else:
                try:
                    self.result = self.finish()
                    self.state = SUCCEEDED
                except AFLocSlicerError as err:
                    self.state, self.error = FAILED, str(err)
                except Exception as err:  # import failures must never leave the task running
                    log.exception("finishing afloc %s failed", self.subcommand)
                    self.state, self.error = FAILED, f"{type(err).__name__}: {err}"
        finally:
            self.cleanup()
        return False

    def finish(self) -> Any:
        """Turn the finished job's outputs into the task's result (subclasses)."""
        return None

    def cancel(self) -> None:
        """Stop the engine's work; the task ends as cancelled at the next poll."""
        if self.process is not None:
            self.process.cancel()
        elif self.state == PENDING:
            self.state = CANCELLED

    def cleanup(self) -> None:
        """Delete the task's temporary folder."""
        shutil.rmtree(self.workDir, ignore_errors=True)

    def wait(self, timeout: float | None = None, interval: float = 0.02) -> Any:
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
        if self.state == SUCCEEDED:
            return self.result
        if self.state == CANCELLED:
            raise JobCancelled(self.error)
        raise AFLocSlicerError(self.error or f"afloc {self.subcommand} did not run")


def _doneOutputs(task: EngineTask, count: int) -> list[Path]:
    """The result folders the engine's done line names (``protocol.DONE_OUTPUTS``), checked."""
    from afloc_engine import protocol

    outputs = task.doneEvent().get(protocol.DONE_OUTPUTS)
    if not isinstance(outputs, list) or len(outputs) != count:
        raise AFLocSlicerError(
            f"afloc {task.subcommand} ended without naming its {count} result folder(s) in its done line"
        )
    return [Path(str(p)) for p in outputs]


class LocalizationTask(EngineTask):
    """``afloc localize`` on one volume; the result is the imported, shown :class:`SceneResults.AFLocResults`.

    The run is added beside the input's earlier runs; with ``replace`` the earlier runs of the same
    model and adapter are removed once the new one is in.
    """

    def __init__(
        self,
        logic: AFLocLogic,
        inputVolume: Any,
        adapter: str = "",
        replace: bool = False,
        opacity: float = 0.8,
        **kwargs: Any,
    ) -> None:
        super().__init__(logic, "localize", **kwargs)
        self.inputVolume = inputVolume
        self.adapter = adapter
        self.replace = replace
        self.opacity = opacity
        self.replaced: list[str] = []
        """Labels of the earlier runs this one replaced."""

    def finish(self) -> SceneResults.AFLocResults:
        if self.inputVolume.GetScene() is None:
            raise AFLocSlicerError(f"the input volume '{self.inputVolume.GetName()}' was removed from the scene")
        (folder,) = _doneOutputs(self, 1)
        scene = self.logic.scene
        previous = SceneResults.runsFor(scene, self.inputVolume)
        results = SceneResults.importResults(scene, self.inputVolume, folder, adapter=self.adapter)
        if self.replace:  # only now that the new run is in
            for run in previous:
                if run.modelId == results.modelId and run.adapter == results.adapter:
                    self.replaced.append(run.label)
                    SceneResults.removeResults(run)
        Display.showResults(results, 0, self.opacity)
        return results


class SuggestionTask(EngineTask):
    """``afloc localize`` on candidate volumes; the result is a list of :class:`Suggestion`, most uncertain first."""

    def __init__(self, logic: AFLocLogic, candidates: list[Any], threshold: float | None, **kwargs: Any) -> None:
        super().__init__(logic, "localize", **kwargs)
        self.candidates = candidates
        self.threshold = threshold

    def finish(self) -> list[Suggestion]:
        suggestions = []
        for volume, folder in zip(self.candidates, _doneOutputs(self, len(self.candidates))):
            data = SceneResults.readResultsJson(folder)
            threshold = float(data.get("threshold", 0.3) if self.threshold is None else self.threshold)
            heatmaps = [readVolumeArray(folder / str(e["heatmap"])) for e in data["prompts"]]
            probabilities = [float(e.get("probability", math.nan)) for e in data["prompts"]]
            score = uncertaintyScore(probabilities, heatmaps, threshold)
            suggestions.append(Suggestion(volume, score["score"], score["entropy"], score["ambiguity"], probabilities))
        suggestions.sort(key=lambda s: -s.score)
        return suggestions


class FinetuneTask(EngineTask):
    """``afloc finetune`` on the training examples; the result is the adapter folder in the store.

    ``exampleNames`` maps the exported files' names to the examples' node names, so that the
    adapter's ``adapter.json`` lists its training examples as the user knows them.
    """

    def __init__(self, logic: AFLocLogic, finding: str, exampleNames: dict[str, str], **kwargs: Any) -> None:
        super().__init__(logic, "finetune", **kwargs)
        self.finding = finding
        self.exampleNames = exampleNames
        self.warnings: list[str] = []
        """What the engine says a user should know about the adapter (e.g. one example, a tiny mask)."""

    def finish(self) -> Path:
        from afloc_engine import protocol

        done = self.doneEvent()
        adapter = Path(str(done.get(protocol.DONE_ADAPTER) or ""))
        if not done.get(protocol.DONE_ADAPTER) or not (adapter / "adapter.json").is_file():
            raise AFLocSlicerError("afloc finetune ended without naming the adapter it wrote in its done line")
        self.warnings = [str(w) for w in done.get(protocol.DONE_WARNINGS) or []]
        for warning in self.warnings:
            self._log(f"Warning: {warning}")
        store = self.logic.adaptersDir
        store.mkdir(parents=True, exist_ok=True)
        target = store / adapter.name
        n = 1
        while target.exists():
            n += 1
            target = store / f"{adapter.name}-{n}"
        shutil.move(str(adapter), str(target))
        self._nameExamples(target / "adapter.json")
        return target

    def _nameExamples(self, meta: Path) -> None:
        """Replace the exported files' names by the examples' node names in ``adapter.json``."""
        try:
            data = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            return
        for key in ("training_examples", "heldout_examples"):
            ids = data.get(key)
            if isinstance(ids, list):
                data[key] = [self._nodeName(str(i)) for i in ids]
        meta.write_text(json.dumps(data, indent=2) + "\n")

    def _nodeName(self, exampleId: str) -> str:
        name, sep, suffix = exampleId.partition("#")
        return self.exampleNames.get(name, name) + (sep + suffix if sep else "")
