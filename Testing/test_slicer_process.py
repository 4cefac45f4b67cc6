"""The background runner: JSON progress parsed, errors made readable, Cancel kills the whole process tree."""

from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest
import slicer_fakes as sf  # noqa: F401  (puts AFLocSlicer/ on sys.path)
from AFLocSlicerLib import Process

from afloc_engine import protocol


def child(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_progress_lines_are_parsed_and_other_lines_logged():
    seen, logs = [], []
    proc = Process.EngineProcess(
        child(
            """
            import json, sys
            print("UserWarning: untrained model", file=sys.stderr, flush=True)
            for i in (1, 2):
                event = {"event": "progress", "step": i, "total": 2, "message": "x", "eta_s": 1.5, "loss": 0.5 / i}
                print(json.dumps(event), flush=True)
            print(json.dumps({"event": "done", "outputs": ["a"]}), flush=True)
            """
        ),
        onProgress=seen.append,
        onLog=logs.append,
    )
    proc.start()
    assert proc.wait(30) == Process.SUCCEEDED
    assert [(p.step, p.total, p.fields["loss"]) for p in seen] == [(1, 2, 0.5), (2, 2, 0.25)]
    assert seen[-1].fraction == 1.0 and seen[0].eta_s == 1.5
    assert proc.doneEvent == {"event": "done", "outputs": ["a"]}
    assert logs == ["UserWarning: untrained model"]


def test_error_message_prefers_the_engines_error_line_then_the_traceback():
    proc = Process.EngineProcess(
        child(
            """
            import json, sys
            print(json.dumps({"event": "error", "message": "file is empty (0 bytes)", "path": "/x/a.nrrd"}), flush=True)
            sys.exit(2)
            """
        )
    )
    proc.start()
    assert proc.wait(30) == Process.FAILED and proc.returncode == 2
    assert proc.errorMessage == "/x/a.nrrd: file is empty (0 bytes)"
    proc = Process.EngineProcess(
        child("import numpy\nraise RuntimeError('CUDA out of memory. Tried to allocate 2 GiB')")
    )
    proc.start()
    assert proc.wait(30) == Process.FAILED
    assert proc.errorMessage == "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"
    assert proc.outOfMemory


def test_cancel_kills_the_process_and_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    proc = Process.EngineProcess(
        child(
            f"""
            import subprocess, sys, time
            grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            open({str(pid_file)!r}, "w").write(str(grandchild.pid))
            print("started", flush=True)
            time.sleep(60)
            """
        )
    )
    proc.start()
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        proc.poll()
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    proc.cancel()
    assert proc.wait(30) == Process.CANCELLED
    assert proc.errorMessage == "cancelled"
    deadline = time.monotonic() + 10
    while True:  # the grandchild is gone (killed with the process group; reaped by init)
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        if open(f"/proc/{grandchild}/stat").read().split()[2] == "Z":
            break
        assert time.monotonic() < deadline, "the grandchild survived Cancel"
        time.sleep(0.1)


def test_wait_with_a_timeout_stops_the_job():
    proc = Process.EngineProcess(child("import time; time.sleep(60)"))
    proc.start()
    with pytest.raises(TimeoutError):
        proc.wait(0.5)
    assert proc.state == Process.CANCELLED and proc.proc.poll() is not None


def test_a_missing_interpreter_is_a_failure_not_a_crash(tmp_path):
    proc = Process.EngineProcess([str(tmp_path / "no_python"), "-m", "afloc_engine"])
    proc.start()
    assert proc.state == Process.FAILED and "cannot start" in proc.errorMessage
    assert not proc.poll()


def test_engine_command_adds_json_progress():
    argv = Process.engine_command("py", "localize", ["a.nrrd", "--prompt", "x"])
    assert argv == ["py", "-m", "afloc_engine", "localize", "a.nrrd", "--prompt", "x", "--progress", "json"]
    assert protocol.parse_line('{"event": "progress", "step": 1}') == {"event": "progress", "step": 1}
    assert protocol.parse_line("{not json}") is None and protocol.parse_line('{"no_event": 1}') is None


def test_progress_moves_inside_a_validation_fold():
    """Fine-tuning's validation (about half of a run) reports fold progress; the bar moves with it."""
    events = Process.JobProgress(10, 12, "validate", None, {"fold": 1, "fold_step": 5, "fold_total": 10})
    assert events.fraction == pytest.approx(10.5 / 12)
    assert Process.JobProgress(10, 12, "validate").fraction == pytest.approx(10 / 12)
    assert Process.JobProgress(0, 0, "starting the AFLoc engine").fraction == 0.0


# --- the warm engine (Server) -------------------------------------------------------------------------
STAND_IN_SERVER = r"""
import json, os, sys, time
print(json.dumps({"event": "ready", "pid": os.getpid()}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if request.get("command") == "shutdown":
        break
    rid, args = request["id"], request["args"]
    print(json.dumps({"event": "progress", "id": rid, "step": 0, "total": 1, "message": "running", "phase": "running"}),
          flush=True)
    print("a log line", flush=True)
    if "die" in args:
        os._exit(3)
    if "sleep" in args:
        time.sleep(60)
    print(json.dumps({"event": "done", "id": rid, "outputs": [f"/out/{os.getpid()}"]}), flush=True)
    print(json.dumps({"event": "finished", "id": rid, "exit_code": 0, "seconds": 0.01}), flush=True)
"""


@pytest.fixture()
def stand_in_server(tmp_path):
    """An EngineServer whose 'python -m afloc_engine serve' is a stand-in speaking the same protocol."""
    from AFLocSlicerLib.Server import EngineServer

    script = tmp_path / "serve.py"
    script.write_text(STAND_IN_SERVER)
    server = EngineServer(sys.executable)
    server.argv = lambda: [sys.executable, str(script)]
    yield server
    server.kill()


def test_one_server_serves_many_requests_and_restarts_after_it_died(stand_in_server):
    server = stand_in_server
    progress, logs = [], []
    first = server.submit("localize", ["a.nrrd"], onProgress=progress.append, onLog=logs.append)
    assert first.coldStart and progress[0].message == "starting the AFLoc engine"  # from the first instant
    assert first.wait(30) == Process.SUCCEEDED and first.doneEvent["outputs"] == [f"/out/{server.proc.pid}"]
    assert progress[-1].fields["phase"] == "running" and "a log line" in logs
    pid = server.proc.pid
    second = server.submit("localize", ["b.nrrd"])
    assert not second.coldStart and second.wait(30) == Process.SUCCEEDED and server.proc.pid == pid
    dying = server.submit("localize", ["die"])
    assert dying.wait(30) == Process.FAILED and "ended unexpectedly" in dying.errorMessage
    assert not server.alive
    again = server.submit("localize", ["c.nrrd"])  # restarted on the next request
    assert again.coldStart and again.wait(30) == Process.SUCCEEDED and server.proc.pid != pid
    assert server.starts == 2


def test_cancel_kills_the_server_and_stop_ends_it(stand_in_server):
    server = stand_in_server
    job = server.submit("localize", ["sleep"])
    deadline = time.monotonic() + 30
    while job.poll() and job.progress.fields.get("phase") != "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = server.proc.pid
    job.cancel()
    assert job.wait(30) == Process.CANCELLED and not server.alive
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    ok = server.submit("localize", ["x"])
    assert ok.wait(30) == Process.SUCCEEDED
    proc = server.proc
    server.stop()  # module cleanup / Slicer exit: asked to shut down, gone
    assert proc.poll() == 0 and not server.alive
