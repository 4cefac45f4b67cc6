"""Where named models live: the default model shipped in the package, and installed models.

``resolve_model(name_or_path) -> (folder | None, expected sha256 | None)``; ``None`` for the
default means its weights are not shipped (an untrained stand-in is used).
"""

from __future__ import annotations

import json
from pathlib import Path

from afloc_engine.errors import CheckpointError

PACKAGE_WEIGHTS = Path(__file__).parent / "weights"
MANIFEST = PACKAGE_WEIGHTS / "manifest.json"


def packaged_manifest() -> list[dict]:
    """Entries of the shipped model manifest (``name, version, path, sha256, size, description``)."""
    if not MANIFEST.is_file():
        return []
    return json.loads(MANIFEST.read_text()).get("models", [])


def resolve_model(name_or_path: str) -> tuple[Path | None, str | None]:
    path = Path(name_or_path).expanduser()
    if path.is_dir() or "/" in name_or_path or name_or_path.startswith("."):
        if not path.is_dir():
            raise CheckpointError("model folder not found", path)
        return path, None
    for entry in packaged_manifest():
        if entry["name"] == name_or_path:
            folder = PACKAGE_WEIGHTS / entry["path"]
            return (folder, entry.get("sha256")) if (folder / "model.safetensors").is_file() else (None, None)
    if name_or_path == "default":
        return None, None
    raise CheckpointError(f"no model named {name_or_path!r} (give a model folder, or see `afloc models list`)")
