"""A user's install: the wheel, built from the tracked sources, in a fresh venv without extras.

Only torch is installed first (``torch==2.13.0``, the CPU wheel, as the README says); then the wheel with
no extras. ``afloc info`` and ``afloc localize`` on a real radiograph must then work: the embedded default
model's every dependency (EfficientNet-Lite0, the DICOM codecs, ...) has to be a core dependency.
Nothing is cached in the repository: the sources are copied, built and installed under ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"

pytestmark = pytest.mark.slow


def _sources(dest: Path) -> Path:
    """Copy what a fresh clone holds (tracked + untracked-not-ignored files) into ``dest``."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.decode()
        files = [f for f in listed.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: cannot tell which files a clone holds")
    for rel in files:
        src = REPO / rel
        if src.is_file() and (rel in ("pyproject.toml", "README.md") or rel.startswith(("afloc_engine/", "training/"))):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return dest


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_plain_wheel_install_runs_info_and_localize(tmp_path, sample_dicom):
    import SimpleITK as sitk

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", AFLOC_HOME=str(tmp_path / "home"))
    src = _sources(tmp_path / "src")
    wheels = tmp_path / "wheels"
    # build the wheel as pip would for a user (isolated build environment from the index)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)], tmp_path, env, 600)
    (wheel,) = wheels.glob("afloc_engine-*.whl")

    user = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(user)
    python = user / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, TORCH], tmp_path, env, 900)
    _run([*pip, str(wheel)], tmp_path, env, 1200)  # no extras
    afloc = str(user / "bin" / "afloc")

    info = _run([afloc, "info"], tmp_path, env, 300)
    assert "default" in info.stdout

    out = tmp_path / "out"
    prompts = ["Findings suggesting ground glass opacity", "Large right pleural effusion"]
    cmd = [afloc, "localize", str(sample_dicom), "--out", str(out), "--progress", "none", "--device", "cpu"]
    for p in prompts:
        cmd += ["--prompt", p]
    _run(cmd, tmp_path, env, 600)
    (folder,) = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    results = json.loads((folder / "results.json").read_text())
    assert [p["prompt"] for p in results["prompts"]] == prompts
    reference = sitk.ReadImage(str(sample_dicom))
    for entry in results["prompts"]:
        heat = sitk.ReadImage(str(folder / entry["heatmap"]))
        assert heat.GetSize()[:2] == reference.GetSize()[:2]
        array = sitk.GetArrayFromImage(heat)
        assert np.isfinite(array).all() and array.std() > 0  # a real map, not a constant
    seg = sitk.ReadImage(str(folder / "masks.seg.nrrd"))
    assert seg.GetSize()[:2] == reference.GetSize()[:2]
    # the installed engine ran, not the repository's sources
    where = _run(
        [str(python), "-c", "import afloc_engine, efficientnet_lite_pytorch; print(afloc_engine.__file__)"],
        tmp_path,
        env,
        120,
    )
    assert str(user) in where.stdout
