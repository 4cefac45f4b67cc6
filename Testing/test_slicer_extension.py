"""The extension as the Slicer Extensions Index builds it: CMake metadata, module file lists, catalog entry, icon."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "AFLocSlicer"

# the catalog-entry schema (Slicer/Slicer Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json), as checks
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}
CATALOG_TYPES = {
    "$schema": str,
    "category": str,
    "scm_url": str,
    "scm_revision": str,
    "scm_type": str,
    "build_dependencies": list,
    "build_subdirectory": str,
    "enabled": bool,
    "tier": int,
}


def cmake_sets(path: Path) -> dict[str, str]:
    text = path.read_text()
    return {m.group(1): m.group(2) for m in re.finditer(r'set\((EXTENSION_\w+)\s+"((?:[^"\\]|\\.)*)"\)', text)}


def test_top_level_cmake_has_the_extension_metadata():
    text = (REPO / "CMakeLists.txt").read_text()
    meta = cmake_sets(REPO / "CMakeLists.txt")
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert meta.get(f"EXTENSION_{key}", "").strip(), f"EXTENSION_{key} is missing or empty"
    assert "PyTorch" in meta["EXTENSION_DEPENDS"].split()
    assert len(meta["EXTENSION_DESCRIPTION"]) > 100
    assert "add_subdirectory(AFLocSlicer)" in text
    assert "find_package(Slicer REQUIRED)" in text
    assert "${Slicer_EXTENSION_GENERATE_CONFIG}" in text and "${Slicer_EXTENSION_CPACK}" in text
    # the icon and screenshot URLs name files that are in this repository
    for url in [meta["EXTENSION_ICONURL"], *meta["EXTENSION_SCREENSHOTURLS"].split()]:
        relative = url.split("/main/", 1)[1]
        assert (REPO / relative).is_file(), url


def test_module_cmake_lists_exactly_the_module_files():
    text = (MODULE / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert re.search(r"set\(MODULE_NAME AFLocSlicer\)", text)
    listed = {
        line.strip().replace("${MODULE_NAME}", "AFLocSlicer")
        for line in text.splitlines()
        if line.strip().endswith((".py", ".png", ".ui"))
    }
    for item in listed:
        assert (MODULE / item).is_file(), item
    on_disk = {str(p.relative_to(MODULE)) for p in (MODULE / "AFLocSlicerLib").glob("*.py")}
    assert on_disk <= listed, f"not installed by CMake: {sorted(on_disk - listed)}"
    assert {"AFLocSlicer.py", "Resources/UI/AFLocSlicer.ui", "Resources/Icons/AFLocSlicer.png"} <= listed
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_catalog_entry_matches_the_schema_and_the_cmake_metadata():
    entry = json.loads((REPO / "AFLocSlicer.json").read_text())
    assert CATALOG_REQUIRED <= set(entry)
    assert set(entry) <= set(CATALOG_TYPES), set(entry) - set(CATALOG_TYPES)
    for key, value in entry.items():
        assert isinstance(value, CATALOG_TYPES[key]), key
    assert entry["$schema"].startswith(
        "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v"
    )
    assert entry.get("tier", 1) in (1, 3, 5) and entry.get("scm_type", "git") in ("git", "local")
    assert all(isinstance(d, str) for d in entry.get("build_dependencies", []))
    meta = cmake_sets(REPO / "CMakeLists.txt")
    assert entry["category"] == meta["EXTENSION_CATEGORY"]
    assert set(meta["EXTENSION_DEPENDS"].split()) <= set(entry["build_dependencies"])
    assert meta["EXTENSION_HOMEPAGE"].startswith(entry["scm_url"])


def test_icon_is_a_128_pixel_png():
    from PIL import Image

    with Image.open(MODULE / "Resources" / "Icons" / "AFLocSlicer.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


def test_user_guide_shows_the_screenshot():
    guide = REPO / "docs" / "slicer.md"
    if not guide.is_file():
        pytest.fail("docs/slicer.md is missing")
    text = guide.read_text()
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (guide.parent / image).is_file(), image
    assert "slicer_overlay.png" in text
