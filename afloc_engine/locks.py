"""One writer per folder: an OS file lock with the holder's PID in it.

A training run folder and a ``localize`` output folder each get a lock file ``.afloc.lock`` inside the
folder (:func:`folder_lock`). A folder that must hold nothing but its own content (the model cache, the
adapter store) or that is replaced as a whole (``evaluate --out``) is locked from beside it, by the file
``.<name>.afloc.lock`` in its parent (:func:`sibling_lock`). The lock is an OS lock (``fcntl.flock`` on POSIX,
``msvcrt.locking`` on Windows), so the OS releases it when the holder exits or is killed (kill -9
included); the file itself stays and is harmless. While held, the file holds the holder's PID and
command so a second writer can say who it is waiting for::

    with folder_lock(out_dir, "afloc localize", wait=args.wait):
        ...  # only this process writes into out_dir

A second writer gets :class:`FolderLockedError` (one line, exit code 2 through the CLI) naming the PID,
or, with ``wait=True``, blocks until the holder is done.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from afloc_engine.errors import AFLocError

LOCK_FILE = ".afloc.lock"
_PID_OFFSET = 64  # Windows locks byte 0 only; the PID lives after it so others can read it


class FolderLockedError(AFLocError):
    """Another process holds the folder's lock."""


def add_wait_argument(parser: argparse.ArgumentParser) -> None:
    """``--wait``: wait for another afloc process writing the same folder instead of exiting with code 2."""
    parser.add_argument(
        "--wait",
        action="store_true",
        help="if another afloc process is writing the same folder, wait for it (default: exit 2 naming its PID)",
    )


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":  # pragma: no cover (exercised on Windows only)
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    if sys.platform == "win32":  # pragma: no cover
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def holder(folder: str | Path, lock_name: str = LOCK_FILE) -> str | None:
    """What the lock file of ``folder`` says about its holder (``'PID 123 (afloc localize)'``), or None."""
    try:
        with open(Path(folder) / lock_name, "rb") as fh:
            fh.seek(_PID_OFFSET)
            text = fh.read(512).decode("utf-8", "replace").strip("\0 \n")
    except OSError:
        return None
    return text or None


@contextlib.contextmanager
def folder_lock(
    folder: str | Path,
    command: str,
    wait: bool = False,
    poll_s: float = 0.2,
    timeout_s: float | None = None,
    lock_name: str = LOCK_FILE,
    guarded: str | Path | None = None,
) -> Iterator[Path]:
    """Hold the exclusive writer lock of ``folder`` (created if missing) for the ``with`` block.

    folder: where the lock file ``lock_name`` lives (the folder guarded, unless ``guarded`` names another,
    e.g. the model cache locked from its parent so the cache holds only models); command: what the holder is
    doing (shown to the next writer); wait: block until the lock is free instead of raising; timeout_s:
    give up waiting after this many seconds.
    Yields the folder. Raises :class:`FolderLockedError` when another live process holds it (and
    ``wait`` is false or the timeout passed), an :class:`AFLocError` when the folder cannot be created or
    the lock file cannot be opened (a file in the way, no permission, read-only disk).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / lock_name, os.O_RDWR | os.O_CREAT, 0o644)
    except FileExistsError:
        raise AFLocError("exists and is not a folder", folder) from None
    except NotADirectoryError:
        raise AFLocError("a path component is a file, not a folder", folder) from None
    except OSError as err:
        raise AFLocError(f"cannot write here ({err.strerror})", folder) from None
    try:
        start = time.monotonic()
        waiting = False
        named = folder if guarded is None else guarded
        while not _try_lock(fd):
            who = holder(folder, lock_name)
            if not wait or (timeout_s is not None and time.monotonic() - start > timeout_s):
                holder_note = f" ({who})" if who else ""
                raise FolderLockedError(
                    f"in use by another afloc process{holder_note}; wait for it to finish or pass --wait", named
                )
            if not waiting:  # say once why nothing happens
                print(f"afloc: {named}: waiting for {who or 'another process'} to finish", file=sys.stderr)
                waiting = True
            time.sleep(poll_s)
        note = f"PID {os.getpid()} ({command})".encode()
        try:
            os.ftruncate(fd, _PID_OFFSET)
            os.lseek(fd, _PID_OFFSET, os.SEEK_SET)
            os.write(fd, note)
        except OSError:  # a full disk must not stop the writer: the PID is only for the message
            pass
        try:
            yield folder
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, _PID_OFFSET)
            _unlock(fd)
    finally:
        os.close(fd)


def sibling_lock_name(folder: str | Path) -> str:
    """The name of the lock file :func:`sibling_lock` keeps beside ``folder``: ``.<name>.afloc.lock``."""
    return f".{Path(folder).name}.afloc.lock"


@contextlib.contextmanager
def sibling_lock(folder: str | Path, command: str, wait: bool = False) -> Iterator[Path]:
    """:func:`folder_lock` of ``folder`` through the file :func:`sibling_lock_name` in its parent.

    For folders that must hold only their own content or are swapped as a whole; ``folder`` itself need not
    exist (its parent is created). Yields ``folder``; errors name ``folder``; raises as :func:`folder_lock`.
    """
    folder = Path(folder).absolute()
    with folder_lock(folder.parent, command, wait=wait, lock_name=sibling_lock_name(folder), guarded=folder):
        yield folder
