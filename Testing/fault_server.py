"""Fork server for the fault-injection test (Testing/test_faults.py).

Imports torch and every ``afloc`` command once, then reads one JSON request per line on stdin::

    {"argv": ["localize", ...], "cwd": DIR, "log": FILE, "env": {...}, "kill_after": SECONDS | null}

and runs ``afloc ARGV`` in a forked child (stdout and stderr to LOG). With ``kill_after`` the child
is sent SIGKILL that many seconds after the fork if it is still running. One JSON line answers each
request: ``{"rc": EXIT_CODE (-9 when killed), "killed": bool, "seconds": float}``. A fork skips the
2-4 s of imports a fresh ``afloc`` process pays, so hundreds of runs fit in a test. The parent never
runs a torch operation (so no OpenMP pool exists to be broken by the fork).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback


def _child(request: dict) -> int:
    os.chdir(request["cwd"])
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(request.get("env") or {})
    from afloc_engine.cli import main

    try:
        return int(main(request["argv"]) or 0)
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def serve() -> None:
    """Warm the imports, say ready, then answer requests until stdin closes."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import monai.networks.nets  # noqa: F401  (10-20 s on a loaded 2-core machine)
    import SimpleITK  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401
    from transformers import AutoModel, AutoTokenizer  # noqa: F401

    import afloc_engine.checkpoint  # noqa: F401
    import afloc_engine.evaluation  # noqa: F401
    import afloc_engine.finetune  # noqa: F401
    import afloc_engine.inference  # noqa: F401
    import afloc_engine.outputs  # noqa: F401
    import training.trainer  # noqa: F401
    from afloc_engine.cli import build_parser

    build_parser()  # imports every command module
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(request)
            finally:
                os._exit(code)
        killed = False
        deadline = None if request.get("kill_after") is None else start + float(request["kill_after"])
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline is not None and time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                killed = True
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.002)
        rc = os.waitstatus_to_exitcode(status)
        killed = killed and rc == -signal.SIGKILL  # it may have ended just before the signal
        answer = {"rc": rc, "killed": killed, "seconds": time.monotonic() - start}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    serve()
