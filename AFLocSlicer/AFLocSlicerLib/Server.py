"""The warm engine: one ``afloc serve`` process per Slicer session, JSON lines both ways.

:class:`EngineServer` starts ``python -m afloc_engine serve`` on first use (in its own process
group), sends it one request at a time (``{"id", "command", "args"}``, see
``afloc_engine.protocol``) and reads its events on a thread; :class:`ServerJob` is one request,
polled like a cold :class:`Process.EngineProcess`. The model stays loaded in the server, so
only the first *Localize* of a session pays for loading it.

- the server is started again when it has died (the next request starts a fresh one);
- Cancel kills the server's whole process group (the work stops now; the next request restarts it);
- :meth:`EngineServer.stop` (module cleanup, Slicer exit) asks it to shut down and kills it after a grace time.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from AFLocSlicerLib.Process import CANCELLED, FAILED, PENDING, RUNNING, SUCCEEDED, JobEvents, JobProgress

log = logging.getLogger(__name__)

START_PHASE = "starting"
STOP_GRACE_S = 2.0


class EngineServer:
    """One warm engine process for the session.

    Args:
        python: interpreter that runs ``-m afloc_engine``.
        env: the process environment (default: ours).
    """

    _ids = itertools.count(1)
    _shared: dict[str, EngineServer] = {}

    @classmethod
    def shared(cls, python: str, env: dict[str, str] | None = None) -> EngineServer:
        """The session's server for ``python`` (one per interpreter, however many logic objects ask)."""
        server = cls._shared.get(python)
        if server is None:
            server = cls._shared[python] = cls(python, env)
        return server

    def __init__(self, python: str, env: dict[str, str] | None = None) -> None:
        self.python = python
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.job: ServerJob | None = None
        self.starts = 0
        """How many times a server process was started (1 in a session where it never died)."""
        atexit.register(self.stop)

    # --- the process ------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """True while the server process runs."""
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        return [self.python, "-m", "afloc_engine", "serve"]

    def start(self) -> None:
        """Start the server process (no-op while one is alive)."""
        if self.alive:
            return
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("PYTHONIOENCODING", "utf-8")
        kwargs: dict[str, Any] = dict(
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1
        )
        if os.name == "posix":
            kwargs["start_new_session"] = True
        else:  # pragma: no cover (Windows)
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        log.info("Starting the AFLoc engine: %s", subprocess.list2cmdline(self.argv()))
        self._queue = queue.Queue()
        self.proc = subprocess.Popen(self.argv(), **kwargs)
        self.starts += 1
        threading.Thread(
            target=self._read, args=(self.proc, self._queue), name="AFLocEngineServer", daemon=True
        ).start()

    @staticmethod
    def _read(proc: subprocess.Popen, lines: queue.Queue) -> None:
        try:
            for line in iter(proc.stdout.readline, ""):
                lines.put(line)
        except (OSError, ValueError):  # closed under us by a kill
            pass
        finally:
            lines.put(None)

    def kill(self) -> None:
        """Kill the server's process group now (Cancel); the next request starts a new one."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            if os.name == "posix":
                os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
            else:  # pragma: no cover
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass

    def stop(self) -> None:
        """Ask the server to shut down; kill it if it is still there after a grace time."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            self.proc = None
            return
        try:
            proc.stdin.write(json.dumps({"command": "shutdown"}) + "\n")
            proc.stdin.flush()
            proc.wait(timeout=STOP_GRACE_S)
            self.proc = None
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.kill()

    # --- requests ---------------------------------------------------------------------------
    def submit(
        self,
        command: str,
        arguments: Sequence[str],
        onProgress: Callable[[JobProgress], None] | None = None,
        onLog: Callable[[str], None] | None = None,
    ) -> ServerJob:
        """Send one request (starting the server if needed); poll the returned job."""
        if self.job is not None and self.job.state == RUNNING:
            raise RuntimeError("the AFLoc engine is busy with another request")
        job = ServerJob(self, command, [str(a) for a in arguments], next(self._ids), onProgress, onLog)
        self.job = job
        job.start()
        return job

    def _send(self, request: dict[str, Any]) -> None:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()


class ServerJob(JobEvents):
    """One request to the warm engine: start, poll (non-blocking), cancel, wait; the events of a cold run."""

    def __init__(
        self,
        server: EngineServer,
        command: str,
        arguments: list[str],
        requestId: int,
        onProgress: Callable[[JobProgress], None] | None = None,
        onLog: Callable[[str], None] | None = None,
    ) -> None:
        self._initEvents(onProgress, onLog)
        self.server = server
        self.command = command
        self.arguments = arguments
        self.requestId = requestId
        self.state = PENDING
        self.returncode: int | None = None
        self.coldStart = False
        """True when this request had to start the server (it pays for starting Python and loading the model)."""
        self._cancelled = False
        self.engineSeconds: float | None = None
        self.engineCpuSeconds: float | None = None
        """Seconds the engine spent on the request (its ``finished`` event), None until then."""

    def start(self) -> None:
        self.startTime = time.monotonic()
        self.coldStart = not self.server.alive
        if self.coldStart:
            self._reportPhase("starting the AFLoc engine", START_PHASE)
        try:
            self.server.start()
            self.server._send({"id": self.requestId, "command": self.command, "args": self.arguments})
        except OSError as err:
            self.state, self.endTime = FAILED, time.monotonic()
            self.errorEvent = {"event": "error", "message": f"cannot start the AFLoc engine: {err}"}
            self.server.kill()
            return
        self.state = RUNNING

    def poll(self) -> bool:
        """Handle the server's lines since the last call; True while the request runs."""
        from afloc_engine import protocol

        if self.state != RUNNING:
            return False
        while True:
            try:
                line = self.server._queue.get_nowait()
            except queue.Empty:
                return True
            if line is None:  # the server died (killed, crashed, out of memory)
                self.returncode = None if self.server.proc is None else self.server.proc.poll()
                self.server.proc = None
                self._end(CANCELLED if self._cancelled else FAILED)
                if not self._cancelled and not self.errorEvent:
                    self.logLines.append(f"the AFLoc engine process ended unexpectedly (exit code {self.returncode})")
                return False
            event = protocol.parse_line(line)
            if event is None:
                self._handleLine(line)
                continue
            if event.get(protocol.REQUEST_ID) not in (None, self.requestId):
                continue  # a late line of an earlier request
            kind = event[protocol.EVENT]
            if kind == protocol.READY:
                continue
            if kind == protocol.FINISHED:
                self.returncode = int(event.get(protocol.EXIT_CODE) or 0)
                self.engineSeconds = event.get("seconds")
                self.engineCpuSeconds = event.get("cpu_seconds")
                self._end(SUCCEEDED if self.returncode == 0 else FAILED)
                return False
            self._handleEvent(event)

    def _end(self, state: str) -> None:
        self.state = state
        self.endTime = time.monotonic()

    def cancel(self) -> None:
        """Stop the request now: the server's process group is killed (the next request starts a new one)."""
        if self.state == PENDING:
            self.state = CANCELLED
            return
        if self.state != RUNNING:
            return
        self._cancelled = True
        self.server.kill()

    def _killNow(self) -> None:
        self.server.kill()
