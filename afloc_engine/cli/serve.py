"""``afloc serve``: a warm engine that runs ``localize`` and ``finetune`` requests read from stdin.

Made for a GUI (the Slicer module starts one per session): JSON lines both ways, as described in
:mod:`afloc_engine.protocol`. Each request is ``{"id": ..., "command": "localize", "args": [...]}``
with the arguments of the one-shot command; the answer is that command's JSON-line events (each
tagged with the request's ``id``) and a final ``{"event": "finished", "id": ..., "exit_code": N}``
with the exit status the one-shot command would have had (and the request's wall and CPU seconds).
Models stay loaded between requests (keyed by name and device), so only the first request pays for
loading one.

The server ends on ``{"command": "shutdown"}``, at the end of stdin, or when killed; it handles
one request at a time. Errors in one request (bad file, bad arguments) end that request only.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any, TextIO

from afloc_engine import protocol
from afloc_engine.errors import AFLocError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preload",
        default=None,
        help="load this model (name or folder) at start, before the first request (e.g. default)",
    )
    parser.add_argument("--device", default="auto", help="device of --preload (auto, cpu, cuda, cuda:N)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for localize requests (default: half the cores, at least 1: the GUI beside it keeps "
        "a core, and one image's small network gains little from more; on a busy 2-core machine 2 threads spin-waiting "
        "for each other were several times slower than 1). Fine-tuning requests use all (or their own --threads).",
    )


class TaggedStream(io.TextIOBase):
    """A text stream that adds ``"id": request_id`` to every JSON event line written to it (others pass)."""

    def __init__(self, out: TextIO, request_id: Any) -> None:  # noqa: ANN401 (any JSON value)
        self.out = out
        self.request_id = request_id
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            event = protocol.parse_line(line)
            if event is not None:
                event[protocol.REQUEST_ID] = self.request_id
                line = json.dumps(event, default=str)
            self.out.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self.write("\n")
        self.out.flush()


class ModelCache:
    """Models loaded once per (name, device) for the life of the server."""

    def __init__(self, load: Any) -> None:  # noqa: ANN401 (afloc_engine.load_model)
        self.load = load
        self.models: dict[tuple[str, str], Any] = {}

    def __call__(self, name_or_path: str = "default", device: str = "auto") -> Any:  # noqa: ANN401
        key = (str(name_or_path), str(device))
        if key not in self.models:
            self.models[key] = self.load(name_or_path, device)
        return self.models[key]


@contextlib.contextmanager
def warm_models(cache: ModelCache) -> Iterator[None]:
    """While serving, ``afloc_engine.load_model`` (which the subcommands call) answers from ``cache``."""
    import afloc_engine

    original = afloc_engine.load_model
    afloc_engine.load_model = cache
    try:
        yield
    finally:
        afloc_engine.load_model = original


def localize_threads(requested: int | None) -> int:
    """Torch threads for a localize request: ``requested``, else half the usable cores (at least 1)."""
    if requested:
        return max(1, requested)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def handle(request: dict[str, Any], parser: argparse.ArgumentParser, threads: dict[str, int] | None = None) -> int:
    """Run one request (stdout already tagged with its id); returns the one-shot command's exit status.

    ``threads``: torch threads per command (e.g. ``{"localize": 1, "finetune": 2}``), set before it runs."""
    command = request.get(protocol.REQUEST_COMMAND)
    args = request.get(protocol.REQUEST_ARGS) or []
    if command not in protocol.SERVE_COMMANDS:
        raise AFLocError(f"afloc serve runs {', '.join(protocol.SERVE_COMMANDS)}, not {command!r}")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise AFLocError("a request's args must be a list of strings")
    if "--progress" not in args:
        args = [*args, "--progress", "json"]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            namespace = parser.parse_args([command, *args])
    except SystemExit:
        lines = stderr.getvalue().strip().splitlines()
        raise AFLocError(lines[-1].split(": error: ", 1)[-1] if lines else "bad arguments") from None
    if threads and command in threads:
        import torch

        torch.set_num_threads(threads[command])
    return int(importlib.import_module(namespace._module).run(namespace) or 0)


def run(args: argparse.Namespace) -> int:
    import torch

    import afloc_engine
    from afloc_engine.cli import build_parser

    out = sys.stdout
    parser = build_parser()
    threads = {"localize": localize_threads(args.threads), "finetune": torch.get_num_threads()}
    cache = ModelCache(afloc_engine.load_model)
    with warm_models(cache):
        if args.preload:
            cache(args.preload, args.device)
        out.write(protocol.event_line(protocol.READY, pid=os.getpid(), version=afloc_engine.__version__) + "\n")
        out.flush()
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not a JSON object")
            except ValueError as err:
                out.write(protocol.event_line(protocol.ERROR, message=f"bad request line: {err}") + "\n")
                out.flush()
                continue
            if request.get(protocol.REQUEST_COMMAND) == protocol.SHUTDOWN:
                break
            request_id = request.get(protocol.REQUEST_ID)
            tagged = TaggedStream(out, request_id)
            start, cpu_start = time.monotonic(), time.process_time()
            sys.stdout = tagged
            try:
                code = handle(request, parser, threads)
            except AFLocError as err:
                tagged.write(
                    protocol.event_line(
                        protocol.ERROR,
                        **{protocol.ERROR_MESSAGE: err.problem, protocol.ERROR_PATH: err.path and str(err.path)},
                    )
                    + "\n"
                )
                print(f"afloc {request.get(protocol.REQUEST_COMMAND)}: error: {err}", file=sys.stderr)
                code = 2
            except Exception as err:  # noqa: BLE001 (one request's bug must not end the server)
                traceback.print_exc(file=sys.stderr)
                tagged.write(protocol.event_line(protocol.ERROR, message=f"{type(err).__name__}: {err}") + "\n")
                code = 1
            finally:
                tagged.flush()
                sys.stdout = out
            out.write(
                protocol.event_line(
                    protocol.FINISHED,
                    **{protocol.REQUEST_ID: request_id, protocol.EXIT_CODE: code},
                    seconds=round(time.monotonic() - start, 3),
                    cpu_seconds=round(time.process_time() - cpu_start, 3),
                )
                + "\n"
            )
            out.flush()
    return 0
