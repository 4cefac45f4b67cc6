"""The ``afloc`` command. Each subcommand lives in its own module with ``add_arguments`` and ``run``.

Errors a user can fix (:class:`afloc_engine.errors.AFLocError`) and faults of the environment (disk
full, read-only file system, permission denied, out of memory on the CPU or GPU) print one line naming
what failed and where and exit with code 2; with ``--progress json`` they are also a JSON ``error`` line.
Writes are atomic (temporary sibling, fsync, rename), so such a failure leaves no partial output.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

from afloc_engine.errors import AFLocError

# name -> module; modules are imported only when their command runs (fast --help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "localize": ("afloc_engine.cli.localize", "heatmaps, masks and probabilities for text prompts"),
    "info": ("afloc_engine.cli.info", "the model, its card, checksum and the device"),
    "models": ("afloc_engine.cli.models", "list, install, remove or pack models; write their prompt tables"),
    "evaluate": ("afloc_engine.cli.evaluate", "localisation metrics on a dataset with masks or boxes"),
    "finetune": ("afloc_engine.cli.finetune", "few-shot fine-tuning on user masks -> an adapter"),
    "train": ("training.cli", "contrastive (re)training of an AFLoc model"),
    "convert-reference": ("afloc_engine.cli.convert", "import a reference AFLoc Lightning checkpoint"),
    "serve": ("afloc_engine.cli.serve", "a warm engine for a GUI: localize/finetune requests as JSON lines on stdin"),
}


def build_parser() -> argparse.ArgumentParser:
    from afloc_engine import __version__

    parser = argparse.ArgumentParser(prog="afloc", description="AFLoc: pathology localisation from text prompts.")
    parser.add_argument("--version", action="version", version=f"afloc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        if importlib.util.find_spec(module.rsplit(".", 1)[0]) is None or importlib.util.find_spec(module) is None:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


_ERRNO_WORDS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large for this file system",
}


def _write_target(args: argparse.Namespace | None) -> Path | None:
    """The folder a command writes to (``--out``, ``--run-dir``, the model cache), for messages."""
    for attr in ("out", "run_dir", "store"):
        value = getattr(args, attr, None) if args is not None else None
        if value is not None:
            return Path(value)
    if args is not None and getattr(args, "command", None) == "models":
        try:
            from afloc_engine.registry import models_dir

            return models_dir()
        except Exception:  # pragma: no cover (only for a message)
            return None
    return None


def _diagnose(folder: Path | None) -> str | None:
    """Why writing under ``folder`` may fail: full, read-only or not writable (None when none of these)."""
    probe = folder
    while probe is not None and not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe is None:
        return None
    try:
        st = os.statvfs(probe)
    except (OSError, AttributeError):
        return None
    if st.f_flag & getattr(os, "ST_RDONLY", 1):
        return _ERRNO_WORDS[errno.EROFS]
    if st.f_bavail * st.f_frsize < 1 << 20:
        return _ERRNO_WORDS[errno.ENOSPC]
    if not os.access(probe, os.W_OK):
        return _ERRNO_WORDS[errno.EACCES]
    return None


def environment_problem(err: BaseException, args: argparse.Namespace | None = None) -> tuple[str, str | None] | None:
    """(problem, where) for a fault of the environment rather than of the program, else None.

    Disk full, read-only file system, permission denied (any ``OSError``, with the file it names), a
    SimpleITK/ITK write failure (diagnosed from the target folder: full, read-only, not writable), out of
    memory on the CPU (``MemoryError``) or the GPU (``torch.cuda.OutOfMemoryError`` or a "CUDA out of
    memory" ``RuntimeError``).
    """
    if isinstance(err, MemoryError):
        return "out of memory (CPU RAM): close other programs or give fewer/smaller inputs", None
    text = str(err)
    if type(err).__name__ == "OutOfMemoryError" or (isinstance(err, RuntimeError) and "out of memory" in text):
        first = text.strip().splitlines()[0] if text.strip() else "out of memory"
        return f"out of memory on the GPU ({first[:160]}): try --device cpu or fewer inputs at once", None
    if isinstance(err, OSError):
        words = _ERRNO_WORDS.get(err.errno or 0) or (err.strerror or type(err).__name__).lower()
        where = err.filename or _write_target(args)
        return words, None if where is None else str(where)
    if isinstance(err, RuntimeError) and "SimpleITK" in text and ("Writ" in text or "writ" in text):
        target = _write_target(args)
        why = _diagnose(target)
        if why is None:  # ITK does not say why: its last line (e.g. "failed to write to file") is the best clue
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            why = f"{lines[-1][:200]} (is the disk full?)"
        return f"could not write an output file: {why}", None if target is None else str(target)
    return None


def handle_error(
    err: BaseException,
    command: str,
    progress: str | None,
    verbose: bool = False,
    args: argparse.Namespace | None = None,
) -> int:
    """Turn an exception into one line on stderr (and a JSON ``error`` event); returns the exit code.

    :class:`AFLocError` and environment faults (:func:`environment_problem`) give exit code 2,
    ``KeyboardInterrupt`` 130; anything else is re-raised (a bug: the traceback is what helps).
    """
    if isinstance(err, KeyboardInterrupt):
        print(f"afloc {command}: cancelled", file=sys.stderr)
        return 130
    if isinstance(err, AFLocError):
        problem, where = err.problem, None if err.path is None else str(err.path)
        line = str(err)
    else:
        found = environment_problem(err, args)
        if found is None:
            raise err
        problem, where = found
        line = f"{where}: {problem}" if where else problem
        if verbose:
            import traceback

            traceback.print_exception(type(err), err, err.__traceback__)
    if progress == "json":
        from afloc_engine.progress import emit

        emit("error", message=problem, path=where)
    print(f"afloc {command}: error: {line}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None, own_process: bool = False) -> int:
    """Run one ``afloc`` command line; returns the exit code.

    ``own_process``: the process exists for this command (the console script), so process-wide
    start-up settings may be made (:func:`import_monai_without_transformers`).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    if own_process and args.command in TEXT_TABLE_COMMANDS:
        import_monai_without_transformers()
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (AFLocError, OSError, MemoryError, RuntimeError, KeyboardInterrupt) as err:
        return handle_error(err, command_name(args), getattr(args, "progress", None), args.verbose, args)


def command_name(args: argparse.Namespace) -> str:
    """The command as typed, sub-action included: 'localize', 'models install', 'train run'."""
    action = getattr(args, "models_action", None) or getattr(args, "train_command", None)
    return f"{args.command} {action}" if action else args.command


STARTUP_GC_THRESHOLD = (10_000, 10, 10)
"""Collector thresholds of the ``afloc`` process (Python's default is (700, 10, 10)). Importing torch,
transformers and MONAI creates millions of objects, and the default threshold runs ~1 s of full
collections over them on 2 cores (``benchmarks/localize_cli.py``); cycles are still collected."""


TEXT_TABLE_COMMANDS = frozenset({"localize", "info", "finetune", "serve"})
"""Commands that load MONAI and, for prompts in the model's prompt table, no text model."""


def import_monai_without_transformers() -> None:
    """Import MONAI while transformers is hidden, when neither is loaded yet (a process of our own only).

    MONAI's package import executes every sub-module, and ``monai.networks.nets.transchex`` imports
    transformers' BERT through ``optional_import``, for a network the engine never uses (MONAI's import:
    2.5 s with it, 1.3 s without, on 2 CPU cores: ``benchmarks/results/localize_cli-vm.json``). With
    transformers hidden that optional import fails and MONAI records it lazily (only ``Transchex``
    would raise, on use); transformers itself imports normally afterwards, when a prompt outside the
    model's prompt table needs the text model.
    """
    if "monai" in sys.modules or "transformers" in sys.modules:
        return
    sys.modules["transformers"] = None  # type: ignore[assignment]  # makes `import transformers` raise ImportError
    try:
        import monai  # noqa: F401
    finally:
        del sys.modules["transformers"]


def console_main() -> int:
    """The ``afloc`` console script and ``python -m afloc_engine``: :func:`main` in a process of its own.

    Collects less often while the heavy libraries load and freezes the heap before exit (``gc.freeze``:
    the interpreter's final collections over every module object took another ~1.3 s); atexit handlers
    and stream flushing run as usual. In-process callers (tests, the Slicer module) use :func:`main`.
    """
    import gc

    gc.set_threshold(*STARTUP_GC_THRESHOLD)
    try:
        return main(own_process=True)
    finally:
        gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(console_main())
