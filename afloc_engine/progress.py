"""Progress for long work: a tqdm bar for people, JSON lines for a GUI that polls a child process.

JSON lines (``--progress json``), one object per line on stdout::

    {"event": "progress", "step": 3, "total": 10, "message": "...", "eta_s": 4.2, ...}
    {"event": "done", ...}        {"event": "error", "message": "...", "path": "..."}
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from afloc_engine import protocol


class Progress:
    """Reports steps of a job as a bar (``bar``), JSON lines (``json``) or not at all (``none``).

    The bar is drawn only on a terminal: on a pipe or a log file ``bar`` writes just the lines of :meth:`say`.
    """

    def __init__(self, total: int, mode: str = "bar", desc: str = "", stream: TextIO | None = None) -> None:
        if mode not in ("bar", "json", "none"):
            raise ValueError(f"progress mode must be bar, json or none, not {mode!r}")
        self.total, self.mode, self.desc = total, mode, desc
        self.stream = stream or (sys.stdout if mode == "json" else sys.stderr)
        self.step = 0
        self.start = time.monotonic()
        self._bar = None
        if mode == "bar" and _is_terminal(self.stream):  # a log file gets no redraw lines, only say()'s
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=self.stream, dynamic_ncols=True)

    def eta(self) -> float | None:
        if self.step == 0:
            return None
        rate = (time.monotonic() - self.start) / self.step
        return rate * (self.total - self.step)

    def update(self, n: int = 1, message: str = "", **fields: Any) -> None:  # noqa: ANN401
        """Advance by ``n`` steps; ``fields`` (loss, dice, ...) go into the JSON line / bar postfix."""
        self.step += n
        if self._bar is not None:
            if fields:
                self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()})
            self._bar.update(n)
        elif self.mode == "json":
            eta = self.eta()
            emit(
                protocol.PROGRESS,
                self.stream,
                **{
                    protocol.STEP: self.step,
                    protocol.TOTAL: self.total,
                    protocol.MESSAGE: message or self.desc,
                    protocol.ETA_S: None if eta is None else round(eta, 2),
                },
                **fields,
            )

    def say(self, line: str) -> None:
        """One line for people on stderr, above the bar (which is redrawn below it) rather than glued to it."""
        target = sys.stderr if self.mode == "json" else self.stream  # JSON lines own stdout
        if self._bar is not None:
            self._bar.write(line, file=target)
        else:
            print(line, file=target)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def emit(event: str, stream: TextIO | None = None, **fields: Any) -> None:  # noqa: ANN401
    """Write one JSON line ``{"event": event, **fields}`` (:func:`afloc_engine.protocol.event_line`) and flush."""
    stream = stream or sys.stdout
    stream.write(protocol.event_line(event, **fields) + "\n")
    stream.flush()
