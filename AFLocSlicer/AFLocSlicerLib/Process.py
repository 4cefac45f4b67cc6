"""The engine CLI in a background process, polled without ever blocking the GUI.

``EngineProcess`` starts ``python -m afloc_engine <command> ... --progress json`` as a child
process in its own process group (a *cold* run: it loads the model itself; the warm engine that
keeps it loaded is :mod:`AFLocSlicerLib.Server`). A reader thread moves its output lines into a
queue and :meth:`EngineProcess.poll` (called by a ``QTimer`` in Slicer, or by :meth:`wait` in
scripts and tests) parses the JSON-line events of ``afloc_engine.protocol`` (progress, done,
error). Other lines (warnings, tracebacks) are kept as the log. :meth:`cancel` kills the whole
process group (the engine and anything it started), so Cancel really stops the work.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

PENDING = "pending"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

OUT_OF_MEMORY_MARKERS = ("out of memory", "outofmemoryerror", "cuda error: out of memory", "cublas_status_alloc_failed")
KILL_GRACE_S = 3.0
"""After Cancel, seconds between SIGTERM and SIGKILL of the process group."""


@dataclass
class JobProgress:
    """The last progress report of a job: ``step`` of ``total`` steps, ``eta_s`` seconds left (None: unknown)."""

    step: int = 0
    total: int = 0
    message: str = ""
    eta_s: float | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """Done fraction in [0, 1] (0 when the total is unknown); inside a fine-tuning validation fold
        (``fold_step`` of ``fold_total``) the fold's own progress counts as part of the current step."""
        if self.total <= 0:
            return 0.0
        inner = 0.0
        foldTotal = self.fields.get("fold_total")
        if foldTotal:
            inner = min(1.0, float(self.fields.get("fold_step") or 0) / float(foldTotal))
        return min(1.0, (self.step + inner) / self.total)


def engine_command(python: str, subcommand: str, arguments: Sequence[str]) -> list[str]:
    """``[python, -m, afloc_engine, subcommand, *arguments, --progress, json]`` (the argv of a job)."""
    args = [str(a) for a in arguments]
    if "--progress" not in args:
        args += ["--progress", "json"]
    return [python, "-m", "afloc_engine", subcommand, *args]


class JobEvents:
    """What a background job has said so far: progress, the done and error events, the log.

    Shared by a cold run (:class:`EngineProcess`) and a request to the warm engine
    (``Server.ServerJob``). ``onProgress(JobProgress)`` is called for every progress event and
    ``onLog(str)`` for every other line, both from ``poll`` (the GUI thread when a QTimer drives it).
    """

    state: str = PENDING
    returncode: int | None = None

    def _initEvents(
        self, onProgress: Callable[[JobProgress], None] | None, onLog: Callable[[str], None] | None
    ) -> None:
        self.onProgress = onProgress
        self.onLog = onLog
        self.progress = JobProgress()
        self.doneEvent: dict[str, Any] | None = None
        self.errorEvent: dict[str, Any] | None = None
        self.logLines: deque[str] = deque(maxlen=200)
        self.startTime: float | None = None
        self.endTime: float | None = None

    def _handleLine(self, line: str) -> None:
        from afloc_engine import protocol

        event = protocol.parse_line(line)
        if event is None:
            text = line.rstrip("\r\n")
            if text:
                self.logLines.append(text)
                if self.onLog:
                    self.onLog(text)
            return
        self._handleEvent(event)

    def _handleEvent(self, event: dict[str, Any]) -> None:
        from afloc_engine import protocol

        kind = event[protocol.EVENT]
        if kind == protocol.PROGRESS:
            self.progress = JobProgress(
                int(event.get(protocol.STEP) or 0),
                int(event.get(protocol.TOTAL) or 0),
                str(event.get(protocol.MESSAGE) or ""),
                event.get(protocol.ETA_S),
                {k: v for k, v in event.items() if k not in protocol.PROGRESS_KEYS},
            )
            if self.onProgress:
                self.onProgress(self.progress)
        elif kind == protocol.DONE:
            self.doneEvent = event
        elif kind == protocol.ERROR:
            self.errorEvent = event
            if self.onLog:
                self.onLog(f"error: {event.get(protocol.ERROR_MESSAGE, '')}")
        elif self.onLog:
            self.onLog(json.dumps(event))

    def _reportPhase(self, message: str, phase: str) -> None:
        """A progress report made here (e.g. 'starting the engine') before the engine says anything."""
        self.progress = JobProgress(0, 0, message, None, {"phase": phase})
        if self.onProgress:
            self.onProgress(self.progress)

    def poll(self) -> bool:  # pragma: no cover (subclasses)
        raise NotImplementedError

    def cancel(self) -> None:  # pragma: no cover (subclasses)
        raise NotImplementedError

    def _killNow(self) -> None:
        """After a timeout: stop at once (subclasses)."""

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> str:
        """Poll until the job ends (for scripts and tests; the GUI uses a QTimer). Returns the final state.

        On timeout the job is cancelled and killed, and :class:`TimeoutError` is raised.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                self._killNow()
                while self.poll():
                    time.sleep(interval)
                raise TimeoutError(f"engine job did not finish within {timeout} s")
            time.sleep(interval)
        return self.state

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def elapsed(self) -> float:
        """Seconds since start (until the end once finished)."""
        if self.startTime is None:
            return 0.0
        return (self.endTime or time.monotonic()) - self.startTime

    @property
    def outOfMemory(self) -> bool:
        """True when the job failed because the GPU (or host) ran out of memory."""
        text = " ".join([str((self.errorEvent or {}).get("message", "")), *list(self.logLines)[-30:]]).lower()
        return self.state == FAILED and any(marker in text for marker in OUT_OF_MEMORY_MARKERS)

    @property
    def errorMessage(self) -> str:
        """What went wrong, for a message box: the engine's own error line, else the end of its log."""
        if self.state == CANCELLED:
            return "cancelled"
        if self.errorEvent:
            message = str(self.errorEvent.get("message", "")).strip()
            path = self.errorEvent.get("path")
            return f"{path}: {message}" if path and str(path) not in message else message
        lines = [ln for ln in self.logLines if ln.strip()]
        for line in reversed(lines):  # the last exception line of a traceback says the most
            if "Error" in line or "error:" in line:
                return line.strip()
        tail = "\n".join(lines[-5:])
        return tail or f"the engine exited with code {self.returncode}"


class EngineProcess(JobEvents):
    """One engine CLI run in a child process (a cold run): start, poll (non-blocking), cancel, wait."""

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        onProgress: Callable[[JobProgress], None] | None = None,
        onLog: Callable[[str], None] | None = None,
        popen: Callable[..., subprocess.Popen] = subprocess.Popen,
    ) -> None:
        self._initEvents(onProgress, onLog)
        self.argv = [str(a) for a in argv]
        self.env = env
        self.cwd = cwd
        self._popen = popen
        self.proc: subprocess.Popen | None = None
        self.state = PENDING
        self.returncode: int | None = None
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None
        self._eof = False
        self._cancelTime: float | None = None
        self._killed = False

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Launch the child process and the thread that reads its output."""
        if self.state != PENDING:
            raise RuntimeError(f"process already {self.state}")
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("PYTHONIOENCODING", "utf-8")
        kwargs: dict[str, Any] = dict(
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=self.cwd
        )
        if os.name == "posix":
            kwargs["start_new_session"] = True  # own process group: cancel kills children too
        else:  # pragma: no cover (Windows)
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        log.info("Starting: %s", subprocess.list2cmdline(self.argv))
        self.startTime = time.monotonic()
        try:
            self.proc = self._popen(self.argv, **kwargs)
        except OSError as err:
            self.state = FAILED
            self.endTime = time.monotonic()
            self.errorEvent = {"event": "error", "message": f"cannot start {self.argv[0]}: {err}"}
            return
        self.state = RUNNING
        self._reader = threading.Thread(target=self._readOutput, name="AFLocEngineOutput", daemon=True)
        self._reader.start()

    def _readOutput(self) -> None:
        stream = self.proc.stdout
        try:
            for raw in iter(stream.readline, b""):
                self._queue.put(raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw)
        except (OSError, ValueError):  # stream closed under us by a kill
            pass
        finally:
            self._queue.put(None)

    def poll(self) -> bool:
        """Handle the output that arrived since the last call; True while the job is still running."""
        if self.state != RUNNING:
            return False
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._eof = True
                break
            self._handleLine(line)
        if self._cancelTime is not None and not self._killed and time.monotonic() - self._cancelTime > KILL_GRACE_S:
            self._signal(kill=True)
        if self._eof and self.proc.poll() is not None:
            self._finish()
            return False
        return True

    def _finish(self) -> None:
        self.returncode = self.proc.returncode
        self.endTime = time.monotonic()
        if self._cancelTime is not None:
            self.state = CANCELLED
        elif self.returncode == 0:
            self.state = SUCCEEDED
        else:
            self.state = FAILED
        if self.proc.stdout:
            self.proc.stdout.close()

    def cancel(self) -> None:
        """Stop the job: SIGTERM to its process group now, SIGKILL if it is still alive after a grace time."""
        if self.state == PENDING:
            self.state = CANCELLED
            return
        if self.state != RUNNING or self._cancelTime is not None:
            return
        self._cancelTime = time.monotonic()
        self._signal(kill=False)

    def _signal(self, kill: bool) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            if os.name == "posix":
                os.killpg(os.getpgid(self.proc.pid), signal.SIGKILL if kill else signal.SIGTERM)
            else:  # pragma: no cover (Windows: taskkill takes the whole tree)
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.proc.pid)], capture_output=True, check=False)
        except (ProcessLookupError, PermissionError):
            pass
        self._killed = self._killed or kill

    def _killNow(self) -> None:
        self._signal(kill=True)


def defaultPython() -> str:
    """The interpreter to run the engine with: Slicer's ``PythonSlicer`` inside Slicer, else this one."""
    import shutil

    try:
        import slicer

        if hasattr(slicer, "app"):
            found = shutil.which("PythonSlicer")
            if found:
                return found
    except ImportError:  # pragma: no cover
        pass
    return sys.executable


def defaultEnvironment() -> dict[str, str]:
    """Environment for the child: Slicer's startup environment inside Slicer (as launched), else ours."""
    try:
        import slicer

        if hasattr(slicer, "app") and hasattr(slicer.util, "startupEnvironment"):
            env = slicer.util.startupEnvironment()
            if env:
                return dict(env)
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover
        pass
    return dict(os.environ)
