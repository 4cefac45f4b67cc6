"""scripts/setup.sh installs through the virtualenv's real path, so console scripts outlive symlinks to it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_setup_installs_through_the_real_path_of_a_linked_venv(tmp_path):
    """The docs test runs setup.sh in scratch copies whose .venv is a link to the real one; pip writes the
    python it was started as into ``afloc``'s first line, so a link path there breaks ``afloc`` once the
    scratch copy is deleted. Here a stand-in python records how it was called."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    shutil.copy(REPO / "pyproject.toml", repo / "pyproject.toml")
    real = tmp_path / "real-venv"
    (real / "bin").mkdir(parents=True)
    log = tmp_path / "calls.txt"
    fake = real / "bin" / "python"
    fake.write_text(f'#!/bin/sh\necho "$0 $*" >> {log}\n')
    fake.chmod(0o755)
    (repo / ".venv").symlink_to(real)
    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=repo, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert calls and all(line.startswith(f"{real.resolve()}/bin/python ") for line in calls), calls
    assert any("-m pip install" in line and "-e ." in line for line in calls)
    assert list(real.glob(".afloc-setup-*")), "the stamp is written in the real venv"
    # a second run finds the stamp and installs nothing
    log.unlink()
    assert subprocess.run(["bash", "scripts/setup.sh"], cwd=repo, timeout=60).returncode == 0
    assert not log.exists()
    assert os.path.islink(repo / ".venv")
