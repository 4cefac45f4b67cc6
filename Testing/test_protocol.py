"""afloc_engine.protocol: the torch-free names the engine CLI and the Slicer module share."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from afloc_engine import protocol
from afloc_engine.progress import Progress, emit


def test_import_is_light() -> None:
    """The Slicer GUI process imports the protocol: it must not pull torch or numpy in."""
    code = (
        "import sys, afloc_engine.protocol, afloc_engine; "
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_slug_ascii_unchanged() -> None:
    assert protocol.slug("Findings suggesting pneumothorax") == "pneumothorax"
    assert protocol.slug("Large right-sided Pneumothorax.") == "large_right_sided_pneumothorax"
    assert protocol.slug("  ") == "prompt"
    assert protocol.slug("a" * 80) == "a" * 48
    assert protocol.unique_slugs(["pneumothorax", "Findings suggesting pneumothorax", "edema"]) == [
        "pneumothorax",
        "pneumothorax_2",
        "edema",
    ]


def test_slug_any_unicode_is_file_safe_and_distinct() -> None:
    assert protocol.slug("Épanchement pleural") == "epanchement_pleural"
    names = [protocol.slug(t) for t in ("气胸", "胸腔积液", "пневмоторакс", "🫁")]
    for name in names:
        assert name and all(c.isascii() and (c.isalnum() or c == "_") for c in name), name
    assert len(set(names)) == len(names)  # different texts, different file names
    assert protocol.slug("气胸") == protocol.slug("气胸")  # and stable


def test_a_heatmap_file_is_named_like_its_segment() -> None:
    """Non-Latin prompts: the file name spells what the segment name spells (not an opaque hash)."""
    from afloc_engine.outputs import segment_name

    for prompt in ("胸腔积液", "Findings suggesting пневмоторакс", "Épanchement pleural (≥ 2 cm)", "pneumothorax"):
        assert protocol.slug(prompt) == protocol.slug(segment_name(prompt)), prompt
    assert protocol.slug("胸腔积液") == "xiongqiangjiye"


def test_emit_writes_protocol_events() -> None:
    stream = io.StringIO()
    with Progress(2, "json", desc="localize", stream=stream) as progress:
        progress.update(1, message="reading", phase=protocol.PHASE_READING)
    emit(protocol.DONE, stream, **{protocol.DONE_OUTPUTS: ["/x"]})
    lines = [protocol.parse_line(line) for line in stream.getvalue().splitlines()]
    assert lines[0][protocol.EVENT] == protocol.PROGRESS
    assert set(protocol.PROGRESS_KEYS) <= set(lines[0])
    assert lines[0][protocol.PHASE] == "reading"
    assert lines[1] == {protocol.EVENT: protocol.DONE, protocol.DONE_OUTPUTS: ["/x"]}
    assert protocol.parse_line("Traceback (most recent call last):") is None
    assert protocol.parse_line(json.dumps({"no": "event"})) is None


def test_finding_codes() -> None:
    assert protocol.finding_code("Pleural_effusion") == ("SCT", "60046008", "Pleural effusion")
    scheme, code, meaning = protocol.finding_code("ground glass opacity")
    assert (scheme, code, meaning) == ("99AFLOC", "ground-glass-opa", "ground glass opacity")


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as stderr is in an interactive shell."""

    def isatty(self) -> bool:
        return True


def test_a_line_said_during_a_bar_is_not_glued_to_it() -> None:
    """A fresh user saw 'localize:   0%|…|afloc localize: …': lines go above the bar, each on its own."""
    from afloc_engine.progress import Progress

    stream = Terminal()
    with Progress(2, "bar", desc="localize", stream=stream) as progress:
        progress.update(1)
        progress.say("afloc localize: one line")
        progress.update(1)
    lines = stream.getvalue().split("\n")
    said = [line for line in lines if "one line" in line]
    assert len(said) == 1 and said[0].split("\r")[-1] == "afloc localize: one line"
    assert "100%" in stream.getvalue()  # the bar was drawn


def test_a_bar_on_a_log_file_writes_only_the_lines_said() -> None:
    """stderr redirected to a file or a pipe: no redraw lines ('\\r localize: 50%|...'), only what was said."""
    from afloc_engine.progress import Progress

    stream = io.StringIO()
    with Progress(2, "bar", desc="localize", stream=stream) as progress:
        progress.update(1)
        progress.say("afloc localize: one line")
        progress.update(1)
    assert stream.getvalue() == "afloc localize: one line\n"
