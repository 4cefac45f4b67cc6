"""Arguments several subcommands share, and the checks a command makes before it loads a model."""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import tempfile
from pathlib import Path

from afloc_engine.errors import AFLocError

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
"""What ``--device`` accepts (whether a GPU is present is checked when the device is resolved)."""

_WHY = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOENT: "the folder cannot hold new files",
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="model name or folder (default: the embedded model)")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda or cuda:N")


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        choices=("bar", "json", "none"),
        default="bar",
        help="progress as a bar on stderr, as JSON lines on stdout (for a GUI), or none",
    )


def parse_device(text: str) -> str:
    """``--device`` checked for its form: auto, cpu, mps, cuda or cuda:N. Returns it.

    Raises :class:`AFLocError` for anything else (``gpu``, ``cuda0``), before any model is loaded.
    """
    value = str(text).strip().lower()
    if not DEVICE_PATTERN.fullmatch(value):
        raise AFLocError(f"unknown --device {text!r}: use auto, cpu, cuda or cuda:N")
    return value


def check_out_folder(out: Path) -> Path:
    """Check that an output folder can be made and written, creating nothing that stays.

    ``out`` may exist (a folder) or not (its nearest existing parent must be a writable folder);
    writability is probed by making and removing an empty temporary folder, which also catches a
    read-only file system and, as root, what permission bits do not show.
    Raises :class:`AFLocError` naming the path: ``out`` is a file, a parent is a file, or the folder
    cannot be written (permission denied, read-only, full). Returns ``out``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AFLocError("is a file, not a folder; give --out a folder (it is created if missing)", out)
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise AFLocError(f"cannot create the output folder: {probe} is a file", out)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".afloc-probe-", dir=probe))
    except OSError as err:
        why = _WHY.get(err.errno or 0) or (err.strerror or type(err).__name__).lower()
        raise AFLocError(f"cannot write the output folder here: {why}", probe) from None
    return out


def warn(message: str, command: str = "localize") -> None:
    """One warning line on stderr: ``afloc COMMAND: warning: MESSAGE`` (JSON progress stays on stdout)."""
    print(f"afloc {command}: warning: {message}", file=sys.stderr)
