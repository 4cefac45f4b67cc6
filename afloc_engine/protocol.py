"""What the engine's CLI and the Slicer module must agree on, in one torch-free module.

Both sides import this file: the engine when it writes (``afloc_engine.progress.emit``, the CLI's
done lines, ``outputs.py``'s file names and segment colours), the Slicer module when it reads (its
background process, the result import, the terminology of the segments). It imports only the
standard library, so Slicer's GUI process can use it without loading torch or numpy.

JSON-lines events (one object per line on stdout, ``--progress json``)::

    {"event": "progress", "step": 3, "total": 10, "message": "...", "eta_s": 4.2, "phase": "running"}
    {"event": "done", "outputs": ["/out/chest"], "model_id": "...", "trained": true}      (localize)
    {"event": "done", "adapter": "/adapters/ggo-20261129", "finding": "...", ...}          (finetune)
    {"event": "error", "message": "...", "path": "..."}
    {"event": "cancelled", "reason": "terminated", "exit_code": 143}

The warm engine (``afloc serve``) reads one request per line on stdin and answers with the same
events, each carrying the request's ``id``::

    <- {"event": "ready", "pid": 1234, "version": "0.1.0"}
    -> {"id": 1, "command": "localize", "args": ["img.nrrd", "--prompt", "...", "--out", "/tmp/o"]}
    <- {"event": "progress", "id": 1, ...} ... {"event": "done", "id": 1, ...}
    <- {"event": "finished", "id": 1, "exit_code": 0}
    -> {"command": "shutdown"}
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Any

from afloc_engine.prompts import finding_of  # standard library only, like this module

# --- events ------------------------------------------------------------------------------------------
EVENT = "event"
"""Key naming the kind of every JSON line."""
PROGRESS = "progress"
DONE = "done"
ERROR = "error"
CANCELLED = "cancelled"
READY = "ready"
"""``afloc serve``: the engine is up and reads requests (keys: ``pid``, ``version``)."""
FINISHED = "finished"
"""``afloc serve``: a request has ended (keys: ``id``, ``exit_code`` as the one-shot command's exit status)."""
EVENTS = (PROGRESS, DONE, ERROR, CANCELLED, READY, FINISHED)
EXIT_CODE = "exit_code"

# keys of a progress event
STEP = "step"
TOTAL = "total"
MESSAGE = "message"
ETA_S = "eta_s"
PHASE = "phase"
PROGRESS_KEYS = (EVENT, STEP, TOTAL, MESSAGE, ETA_S)
"""Keys every progress line has; any other key (loss, epoch, phase, ...) is an extra field."""

# phases of a localisation, in order, so a GUI shows movement from the first second
PHASE_LOADING = "loading"
PHASE_READING = "reading"
PHASE_RUNNING = "running"
PHASE_WRITING = "writing"
LOCALIZE_PHASES = (PHASE_READING, PHASE_LOADING, PHASE_RUNNING, PHASE_WRITING)

# keys of done events
DONE_OUTPUTS = "outputs"
"""``afloc localize``: list of the result folders written, one per input, in input order."""
DONE_ADAPTER = "adapter"
"""``afloc finetune``: the adapter folder written."""
DONE_WARNINGS = "warnings"
"""``afloc finetune``: what a user should act on (list of strings)."""
MODEL_ID = "model_id"
TRAINED = "trained"

# keys of an error event
ERROR_MESSAGE = "message"
ERROR_PATH = "path"

# the warm engine's requests
REQUEST_ID = "id"
REQUEST_COMMAND = "command"
REQUEST_ARGS = "args"
SERVE_COMMANDS = ("localize", "finetune")
"""Subcommands ``afloc serve`` runs in its warm process."""
SHUTDOWN = "shutdown"
"""Request ``{"command": "shutdown"}``: the server exits cleanly."""


def event_line(event: str, **fields: Any) -> str:  # noqa: ANN401
    """One JSON line (no newline) ``{"event": event, **fields}``; values JSON cannot hold become strings."""
    return json.dumps({EVENT: event, **fields}, default=str)


def parse_line(line: str) -> dict[str, Any] | None:
    """One output line -> the event dict, or None for a plain log line (warnings, tracebacks)."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and isinstance(data.get(EVENT), str) else None


# --- segment colours and codes ------------------------------------------------------------------------
SEGMENT_COLORS: list[tuple[float, float, float]] = [
    (0.25, 0.80, 0.80),
    (0.30, 0.75, 0.35),
    (0.20, 0.60, 0.90),
    (0.65, 0.40, 0.85),
    (0.85, 0.35, 0.60),
    (0.95, 0.75, 0.10),
    (0.95, 0.50, 0.15),
    (0.90, 0.30, 0.25),
]
"""Distinct segment colours (RGB in 0..1), cycled by prompt index; the .seg.nrrd, DICOM SEG and Slicer share them.

Cool colours first: mask outlines stand out from the heatmap's warm (inferno) colours."""


def segment_color(index: int) -> tuple[float, float, float]:
    """RGB (0..1) of segment ``index`` (0-based), cycling through :data:`SEGMENT_COLORS`."""
    return SEGMENT_COLORS[index % len(SEGMENT_COLORS)]


FINDING_CODES: dict[str, tuple[str, str]] = {
    "atelectasis": ("46621007", "Atelectasis"),
    "cardiomegaly": ("8186001", "Cardiomegaly"),
    "consolidation": ("95436008", "Lung consolidation"),
    "edema": ("19242006", "Pulmonary edema"),
    "pulmonary edema": ("19242006", "Pulmonary edema"),
    "fracture": ("72704001", "Fracture"),
    "pleural effusion": ("60046008", "Pleural effusion"),
    "effusion": ("60046008", "Pleural effusion"),
    "pneumonia": ("233604007", "Pneumonia"),
    "pneumothorax": ("36118008", "Pneumothorax"),
}
"""SNOMED CT (code, meaning) of findings; others get a local code in :data:`LOCAL_CODING_SCHEME`."""
SNOMED = "SCT"
LOCAL_CODING_SCHEME = "99AFLOC"
"""Coding scheme of findings without a SNOMED code (DICOM's private-scheme convention: 99 prefix)."""
CATEGORY_CODE = ("49755003", "Morphologically Altered Structure")
"""SNOMED category of every finding segment."""


def finding_code(finding: str) -> tuple[str, str, str]:
    """(scheme, code, meaning) of a finding: SNOMED CT when known, else a local ``99AFLOC`` code.

    The local code is the finding's lower-case words joined by ``-`` (at most 16 characters).
    """
    key = " ".join(finding.lower().replace("_", " ").split())
    if key in FINDING_CODES:
        code, meaning = FINDING_CODES[key]
        return SNOMED, code, meaning
    meaning = finding.strip().replace("^", " ").replace("~", " ")[:64] or "Finding"
    return LOCAL_CODING_SCHEME, "-".join(key.split())[:16] or "finding", meaning


# --- name slugs ---------------------------------------------------------------------------------------
def slug(text: str, max_len: int = 48) -> str:
    """File-safe ASCII name of a prompt or finding: 'Findings suggesting pneumothorax' -> 'pneumothorax'.

    Lower-case ``[a-z0-9_]`` only, at most ``max_len`` characters, never empty. Other scripts are
    transliterated as the segment names are (``anyascii``: '胸腔积液' -> 'xiongqiangjiye', 'Épanchement
    pleural' -> 'epanchement_pleural'), so a heatmap file is named like its segment; text with nothing
    left to spell becomes ``prompt_<8 hex digits of its SHA-1>``, so different texts get different names.
    """
    finding = finding_of(text)
    try:
        from anyascii import anyascii

        ascii_text = anyascii(finding)
    except ImportError:  # pragma: no cover (an engine dependency; the Slicer side only reads names)
        ascii_text = unicodedata.normalize("NFKD", finding).encode("ascii", "ignore").decode("ascii")
    s = re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")
    if not s and any(ch.isalnum() for ch in finding):
        s = "prompt_" + hashlib.sha1(finding.encode("utf-8")).hexdigest()[:8]
    return (s or "prompt")[: max(1, max_len)]


def unique_slugs(prompts: list[str]) -> list[str]:
    """:func:`slug` of each prompt, made unique by ``_2``, ``_3``, ... in order of appearance."""
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        s = slug(p)
        seen[s] = seen.get(s, 0) + 1
        out.append(s if seen[s] == 1 else f"{s}_{seen[s]}")
    return out
