"""The docs run as written: every ```bash / ```python block of README.md, docs/*.md, training/README.md and
the model card is run, in order, in a scratch copy of the repository, after the README's set-up block.

How a block is run
    In ``<tmp>/repo``, a mirror of the repository (symlinks to its folders; ``docs/`` and ``benchmarks/``
    copied, so a documented command that writes results there cannot touch the committed ones), beside
    ``<tmp>/shared`` -> the shared data, so ``../shared/data`` means what the docs say. ``AFLOC_HOME`` is a
    scratch folder (installed models and the adapter store). Bash blocks run under ``bash -euo pipefail``
    after the README's set-up block (the one marked ``# docs-test: setup``: ``./scripts/setup.sh`` and
    ``source .venv/bin/activate``); python blocks run with the activated ``python``. The blocks of one
    file share one scratch folder, in file order.

Markers, one comment line in a block (a block in a page another engineer owns can be marked here,
in ``MARKS``, by its file and a piece of its text)
    ``# docs-test: skip (REASON)``   never run (a synopsis with placeholders, needs 3D Slicer, the full suite)
    ``# docs-test: slow``            run only with ``-m slow`` or ``AFLOC_DOCS_SLOW=1`` (takes minutes)
    ``# docs-test: setup``           the README's set-up, run before every bash block
    ``# docs-test: shared-data``     needs ../shared/data (implied when the block names ``../shared/data``)
A block that needs the shared data is skipped, with that reason, on a clone without it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA

PAGES = [
    "README.md",
    *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")),
    "training/README.md",
    "afloc_engine/weights/default/MODEL_CARD.md",
]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[A-Za-z]*)[ \t]*$")
RUNNABLE = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
MARKER = re.compile(r"#\s*docs-test:\s*(?P<kind>skip|slow|setup|shared-data)\b\s*(?:\((?P<reason>[^)]*)\))?")

# blocks in pages this file's owner does not write: (page, a piece of the block's text) -> (kind, reason)
MARKS: dict[tuple[str, str], tuple[str, str]] = {
    ("docs/slicer.md", "slicer.util.getModuleLogic"): ("skip", "runs inside 3D Slicer's Python console"),
    ("docs/results.md", "scripts/run_ablation.py"): ("slow", "trains four models: 10-15 minutes on 2 CPU cores"),
    ("docs/results.md", "benchmarks/finetune.py"): ("slow", "few-shot benchmark: minutes on 2 CPU cores"),
    ("docs/results.md", "benchmarks/finetune_ceiling.py"): ("slow", "few-shot ceilings: minutes on 2 CPU cores"),
    ("afloc_engine/weights/default/MODEL_CARD.md", "training.synthetic"): (
        "skip",
        "retrains the default model: about 45 minutes on 2 CPU cores; run it by hand",
    ),
}
TIMEOUT_S = {"fast": 600, "slow": 3600}


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    def marks(self) -> list[tuple[str, str]]:
        found = [(m["kind"], (m["reason"] or "").strip()) for m in MARKER.finditer(self.code)]
        found += [mark for (page, piece), mark in MARKS.items() if page == self.page and piece in self.code]
        return found

    def kind(self) -> tuple[str, str]:
        """('run' | 'slow' | 'skip' | 'setup', reason)."""
        marks = dict(self.marks())
        for kind in ("skip", "setup", "slow"):
            if kind in marks:
                return kind, marks[kind]
        return "run", ""


def code_blocks(page: str) -> list[Block]:
    """The fenced blocks of a markdown page, in order, dedented, with their language."""
    lines = (REPO / page).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        blocks.append(Block(page, start + 1, m["lang"].lower(), textwrap.dedent("\n".join(body)) + "\n"))
        i += 1
    return blocks


def runnable_blocks() -> list[Block]:
    return [b for page in PAGES for b in code_blocks(page) if b.lang in RUNNABLE]


def setup_block() -> Block:
    setups = [b for b in code_blocks("README.md") if b.kind()[0] == "setup"]
    assert len(setups) == 1, "README.md needs exactly one set-up block (marked '# docs-test: setup')"
    return setups[0]


def slow_enabled(config: pytest.Config) -> bool:
    return os.environ.get("AFLOC_DOCS_SLOW") == "1" or "slow" in (config.getoption("-m") or "")


# --- the scratch repository --------------------------------------------------------------------------------
COPIED = ("docs", "benchmarks")
OUTPUTS = ("out", "runs", "eval", "adapters", "results")


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory):
    """One scratch repository per page (made on first use)."""
    made: dict[str, Path] = {}

    def get(page: str) -> Path:
        if page not in made:
            root = tmp_path_factory.mktemp("docs")
            repo = root / "repo"
            repo.mkdir()
            for entry in REPO.iterdir():
                if entry.name in OUTPUTS or entry.name in (".git", ".pytest_cache", ".ruff_cache"):
                    continue
                if entry.name in COPIED:
                    shutil.copytree(entry, repo / entry.name, symlinks=True)
                else:
                    (repo / entry.name).symlink_to(entry)
            if SHARED_DATA.is_dir():
                (root / "shared").mkdir()
                (root / "shared" / "data").symlink_to(SHARED_DATA)
            (root / "home").mkdir()
            made[page] = repo
        return made[page]

    return get


def environment(repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "AFLOC_SHARED_DATA")}
    venv_bin = str(REPO / ".venv" / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env["AFLOC_HOME"] = str(repo.parent / "home")
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    env["PYTHONUNBUFFERED"] = "1"
    env["MPLBACKEND"] = "Agg"
    if SHARED_DATA.is_dir():
        env["AFLOC_SHARED_DATA"] = str(repo.parent / "shared" / "data")
    return env


def script_for(block: Block) -> str:
    """The bash script that runs ``block`` after the README's set-up."""
    setup = setup_block().code
    if block.lang in ("python", "py"):
        body = "python - <<'AFLOC_DOCS_PYTHON'\n" + block.code + "AFLOC_DOCS_PYTHON\n"
    else:
        body = block.code
    return "set -euo pipefail\n" + setup + "\n" + body


def run_script(script: str, repo: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``script`` under bash in ``repo``, in its own process group: on a timeout the whole group
    (the commands the block started, too) is killed."""
    with subprocess.Popen(
        ["bash", "-c", script],
        cwd=repo,
        env=environment(repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"timed out after {timeout} s:\n{script}\n{stderr[-3000:]}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


BLOCKS = runnable_blocks()


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_documented_block_runs_as_written(block: Block, workspaces, request):
    kind, reason = block.kind()
    if kind == "skip":
        pytest.skip(f"{block.id}: {reason or 'marked docs-test: skip'}")
    if kind == "setup":
        pytest.skip("the set-up block runs before every other block")
    needs_data = "../shared/data" in block.code or "shared-data" in dict(block.marks())
    if needs_data and not SHARED_DATA.is_dir():
        pytest.skip(f"{block.id} needs ../shared/data ({SHARED_DATA} is absent)")
    if kind == "slow" and not slow_enabled(request.config):
        pytest.skip(f"{block.id} is slow ({reason or 'minutes'}): run with -m slow or AFLOC_DOCS_SLOW=1")
    repo = workspaces(block.page)
    proc = run_script(script_for(block), repo, TIMEOUT_S["slow" if kind == "slow" else "fast"])
    assert proc.returncode == 0, (
        f"{block.id} failed (exit {proc.returncode}):\n{block.code}\n--- stdout ---\n{proc.stdout[-3000:]}"
        f"\n--- stderr ---\n{proc.stderr[-3000:]}"
    )


# --- what every page must hold, checked without running anything -------------------------------------------
def test_the_readme_sets_up_and_activates_the_venv_before_any_command():
    setup = setup_block()
    assert "./scripts/setup.sh" in setup.code and "source .venv/bin/activate" in setup.code
    first_command = next(b for b in code_blocks("README.md") if b.lang in RUNNABLE and b.kind()[0] != "setup")
    assert setup.line < first_command.line or not re.search(r"^(afloc|python)\b", first_command.code, re.M)


def test_every_block_is_runnable_or_says_why_not():
    """Placeholders are marked: a bash or python block either runs, or carries a skip reason."""
    for block in BLOCKS:
        kind, reason = block.kind()
        if kind in ("skip", "slow"):
            assert reason or kind == "slow", f"{block.id}: a skipped block says why: # docs-test: skip (REASON)"
    langs = {b.lang for page in PAGES for b in code_blocks(page)}
    assert langs <= {*RUNNABLE, "", "text", "yaml", "json", "csv"}, f"unexpected block languages: {langs}"


def test_documented_outputs_are_git_ignored():
    """Every folder a documented command writes to (``--out``, ``--run-dir``) is either git-ignored or a
    committed results folder (docs/results, benchmarks/results)."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    outs = set()
    for block in BLOCKS:
        if block.lang == "bash":
            outs |= set(re.findall(r"--(?:out|run-dir)\s+([\w./-]+)", block.code))
    assert outs, "no documented --out folder found"
    for out in sorted(outs):
        if out.startswith(("docs/results", "benchmarks/results", "/", "$", "~")) or out.startswith(".."):
            continue
        probe = out.rstrip("/") + "/probe.file"
        ignored = subprocess.run(["git", "check-ignore", "-q", probe], cwd=REPO).returncode == 0
        assert ignored, f"documented output {out} is not git-ignored"
        # the one-writer lock file afloc_engine.locks puts beside an output folder
        folder = Path(out.rstrip("/"))
        lock = folder.parent / f".{folder.name}.afloc.lock"
        assert subprocess.run(["git", "check-ignore", "-q", str(lock)], cwd=REPO).returncode == 0, lock


def test_the_readme_explains_the_warnings_the_demo_prints(sample_dicom, caplog):
    """Every warning reading the demo's radiograph logs is quoted (without its path) in the README."""
    import logging

    from afloc_engine.io import read_image

    with caplog.at_level(logging.WARNING):
        read_image(sample_dicom)
    said = [r.getMessage().replace(str(sample_dicom), sample_dicom.name) for r in caplog.records]
    assert said, "reading RG1_UNCR.dcm logs no warning any more: drop its explanation from the README"
    readme = (REPO / "README.md").read_text()
    for message in said:
        assert message in readme, f"the README does not explain the demo's warning {message!r}"


def test_the_readme_names_every_command_and_models_action():
    """The README's synopsis has a line for each ``afloc`` command and each ``afloc models`` action, and says
    where AFLOC_HOME keeps models and adapters."""
    import argparse

    from afloc_engine.cli import SUBCOMMANDS, build_parser

    readme = (REPO / "README.md").read_text()
    synopsis = next(b.code for b in code_blocks("README.md") if b.lang == "text" and "afloc localize" in b.code)
    for name in SUBCOMMANDS:
        assert re.search(rf"^afloc {re.escape(name)}\b", synopsis, re.M), f"README synopsis lacks afloc {name}"
    models = next(
        a
        for a in build_parser()._subparsers._group_actions[0].choices["models"]._actions  # noqa: SLF001
        if isinstance(a, argparse._SubParsersAction)  # noqa: SLF001
    )
    for action in models.choices:
        assert re.search(rf"\b{action}\b", synopsis.split("afloc models", 1)[1].splitlines()[0]), action
    assert "$AFLOC_HOME/models" in readme and "$AFLOC_HOME/adapters" in readme


def test_the_outputs_section_names_every_file_localize_writes(tiny_afloc, sample_dicom, tmp_path):
    """Each file ``write_results`` lists in ``results.json`` (a DICOM input with a DICOM SEG) has a row in
    the README's Outputs table."""
    import json

    import numpy as np

    from afloc_engine.io import read_image
    from afloc_engine.outputs import write_results

    readme = (REPO / "README.md").read_text()
    section = readme.split("## Outputs", 1)[1].split("\n## ", 1)[0]
    image = read_image(sample_dicom)
    result = tiny_afloc.localize(image, ["Findings suggesting pneumothorax"])
    folder = write_results(result, tmp_path / "out", dicom_seg_source=sample_dicom)
    files = json.loads((folder / "results.json").read_text())["files"]
    names = [n for v in files.values() for n in (v if isinstance(v, list) else [v])]
    assert names and all((folder / n).is_file() for n in names)
    for name in names:
        row = "heatmap_<finding>.nrrd" if name.startswith("heatmap_") else name
        assert f"| `{row}` |" in section, f"README Outputs has no row for {name}"
    assert np.isfinite(result.heatmaps).all()
