"""Where named models live: the shipped manifest, the per-user cache and its install records, and name lookup.

``resolve_model(name_or_path) -> (folder | None, expected sha256 of model.safetensors | None)``;
``(None, None)`` for the default means its weights are not shipped (an untrained stand-in is used).

Shipped manifest ``afloc_engine/weights/manifest.json``::

    {"format": "afloc-models", "format_version": 1,
     "models": [{"name": "default", "version": "1", "path": "default",            # folder under weights/
                 "sha256": "<model.safetensors>", "size": 12345, "description": "..."},
                {"name": "big", "version": "2", "url": "https://.../big.tar.gz",  # installable archive
                 "sha256": "<the archive>", "size": 67890, "description": "..."}]}

Each entry has ``name, version, sha256, size, description`` and exactly one of ``path`` (a model
folder shipped under ``weights/``; ``sha256``/``size`` of its ``model.safetensors``) or ``url``
(an archive ``afloc models install NAME`` fetches; ``sha256``/``size`` of the archive).

Installed models live in ``$AFLOC_HOME/models/<name>/`` (default ``~/.cache/afloc``): the model
folder (``config.json`` + ``model.safetensors`` [+ ``MODEL_CARD.md``]) and ``install.json``, a
record of where it came from and the SHA-256 of every file, checked whenever the model is loaded.
A model archive is a ``.zip`` or ``.tar.gz`` of one model folder. Archives are never extracted
blindly: absolute paths, ``..``, links and any file other than those three are refused, the
files are copied one by one into a temporary folder, validated (config and safetensors header),
then renamed into place. Nothing in an archive is ever executed or unpickled.

Downloading is in :mod:`.download`, archive unpacking and safetensors checks in :mod:`.archive`,
installing, removing and packing in :mod:`.installer`. Torch-free.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from afloc_engine.errors import AFLocError, CheckpointError
from afloc_engine.registry.download import sha256_file

PACKAGE_WEIGHTS = Path(__file__).parent.parent / "weights"
"""``afloc_engine/weights/``: the models shipped in the package."""
MANIFEST = PACKAGE_WEIGHTS / "manifest.json"
MANIFEST_FORMAT = "afloc-models"
MANIFEST_KEYS = ("name", "version", "sha256", "size", "description")

RECORD_FILE = "install.json"
RECORD_FORMAT = "afloc-install"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "MODEL_CARD.md"
PROMPT_TABLE_FILE = "prompt_embeddings.safetensors"
"""Optional: the preset prompts' embeddings (:mod:`afloc_engine.prompt_table`)."""
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, PROMPT_TABLE_FILE)
"""The only files a model folder (and a model archive) may hold."""
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHA_PATTERN = re.compile(r"^[0-9a-f]{64}$")


# --- places --------------------------------------------------------------------------------------
def afloc_home() -> Path:
    """The per-user folder: ``$AFLOC_HOME`` or ``~/.cache/afloc``."""
    env = os.environ.get("AFLOC_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "afloc"


def models_dir() -> Path:
    """Where installed models live: ``afloc_home()/models``."""
    return afloc_home() / "models"


# --- the shipped manifest ------------------------------------------------------------------------
def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Validated entries of a model manifest file; raises :class:`CheckpointError` naming the bad entry."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"model manifest is not valid JSON: {err}", path) from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("models"), list):
        raise CheckpointError(
            f'not a model manifest (expected "format": "{MANIFEST_FORMAT}" and a "models" list)', path
        )
    entries, seen = [], set()
    for i, entry in enumerate(data["models"]):
        where = f"manifest entry {i}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} is not an object", path)
        missing = [k for k in MANIFEST_KEYS if k not in entry]
        if missing:
            raise CheckpointError(f"{where} lacks {', '.join(missing)}", path)
        if ("path" in entry) == ("url" in entry):
            raise CheckpointError(f"{where} ({entry['name']!r}) needs exactly one of 'path' or 'url'", path)
        name = str(entry["name"])
        if not NAME_PATTERN.match(name) or name in seen:
            raise CheckpointError(f"{where} has an invalid or duplicate name {name!r}", path)
        seen.add(name)
        sha = str(entry["sha256"]).lower()
        if sha and not SHA_PATTERN.match(sha):
            raise CheckpointError(f"{where} ({name!r}) has an invalid sha256 {entry['sha256']!r}", path)
        if "path" in entry and (Path(entry["path"]).is_absolute() or ".." in Path(entry["path"]).parts):
            raise CheckpointError(f"{where} ({name!r}) path must be relative, inside weights/", path)
        entries.append({**entry, "name": name, "sha256": sha, "version": str(entry["version"])})
    return entries


def packaged_manifest() -> list[dict[str, Any]]:
    """Entries of the shipped model manifest (``name, version, path|url, sha256, size, description``)."""
    if not MANIFEST.is_file():
        return []
    return read_manifest(MANIFEST)


def manifest_entry(name: str) -> dict[str, Any] | None:
    """The shipped manifest's entry named ``name``, or None."""
    return next((e for e in packaged_manifest() if e["name"] == name), None)


# --- resolving a name at load time ---------------------------------------------------------------
def resolve_model(name_or_path: str) -> tuple[Path | None, str | None]:
    """A model name or folder -> (model folder, expected SHA-256 of its ``model.safetensors``).

    Order: an existing folder (or anything path-like); a model shipped in the package; a model
    installed in the user cache (its record is checked: config.json must be unchanged, and the
    weights' SHA-256 is returned for the loader to verify); ``default`` with no shipped weights
    gives ``(None, None)``. Anything else raises :class:`CheckpointError`.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir() or "/" in name_or_path or os.sep in name_or_path or name_or_path.startswith("."):
        if not path.is_dir():
            raise CheckpointError("model folder not found", path)
        return path, None
    entry = manifest_entry(name_or_path)
    if entry is not None and "path" in entry:
        folder = PACKAGE_WEIGHTS / entry["path"]
        if (folder / WEIGHTS_FILE).is_file():
            return folder, entry.get("sha256") or None
        if name_or_path != "default":
            raise CheckpointError(f"shipped model {name_or_path!r} has no weights in the package", folder)
        return None, None
    if NAME_PATTERN.match(name_or_path) and (models_dir() / name_or_path).is_dir():
        record = read_record(models_dir() / name_or_path)
        folder = models_dir() / name_or_path
        config_sha = record["files"].get(CONFIG_FILE)
        if config_sha and sha256_file(folder / CONFIG_FILE) != config_sha:
            raise CheckpointError(
                f"{CONFIG_FILE} of installed model {name_or_path!r} changed since it was installed "
                f"(reinstall it: afloc models remove {name_or_path}; afloc models install ...)",
                folder / CONFIG_FILE,
            )
        return folder, record["files"][WEIGHTS_FILE]
    if name_or_path == "default":
        return None, None
    if entry is not None:
        raise CheckpointError(f"model {name_or_path!r} is not installed yet: run `afloc models install {name_or_path}`")
    raise CheckpointError(f"no model named {name_or_path!r} (give a model folder, or see `afloc models list`)")


# --- install records -----------------------------------------------------------------------------
def read_record(folder: Path) -> dict[str, Any]:
    """The ``install.json`` of an installed model folder (validated)."""
    path = folder / RECORD_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"installed model has no {RECORD_FILE}; reinstall it", folder) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"install record is not valid JSON ({err}); reinstall the model", path) from None
    files = record.get("files") if isinstance(record, dict) else None
    if (
        not isinstance(record, dict)
        or record.get("format") != RECORD_FORMAT
        or not isinstance(files, dict)
        or not SHA_PATTERN.match(str(files.get(WEIGHTS_FILE, "")))
        or not SHA_PATTERN.match(str(record.get("sha256", "")))
    ):
        raise CheckpointError("install record is incomplete (no SHA-256 of the weights); reinstall the model", path)
    return record


def verify_installed(name: str) -> dict[str, Any]:
    """Re-hash every file of an installed model against its record; returns the record."""
    folder = models_dir() / name
    record = read_record(folder)
    for fname, expected in record["files"].items():
        if fname not in MODEL_FILES:
            raise CheckpointError(f"install record lists an unexpected file {fname!r}", folder / RECORD_FILE)
        path = folder / fname
        if not path.is_file():
            raise CheckpointError(f"installed model {name!r} lost its {fname}; reinstall it", path)
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(f"SHA-256 mismatch: the record says {expected}, the file has {actual}", path)
    return record


def installed_models() -> list[dict[str, Any]]:
    """Records of the models installed in the user cache (broken ones get an ``error`` field)."""
    root = models_dir()
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(root.iterdir()):
        hidden = folder.name.startswith(".") or folder.name.endswith(".tmp")
        if not folder.is_dir() or hidden or not NAME_PATTERN.match(folder.name):
            continue
        try:
            record = read_record(folder)
        except CheckpointError as err:
            record = {"name": folder.name, "error": err.problem, "files": {}, "sha256": ""}
        record["path"] = str(folder)
        out.append(record)
    return out


def list_models() -> list[dict[str, Any]]:
    """Every model known here: shipped in the package, installed, or installable from the manifest.

    Each row: ``name, version, source`` (``package`` | ``installed`` | ``available``), ``location``
    (folder or URL), ``sha256``, ``size`` (bytes), ``trained`` (bool, or None when unknown),
    ``description``, ``installed`` (bool). Also available as ``registry.list()``.
    """
    from afloc_engine.checkpoint import read_config

    rows: list[dict[str, Any]] = []
    installed = {r["name"]: r for r in installed_models()}
    for entry in packaged_manifest():
        if "path" in entry:
            folder = PACKAGE_WEIGHTS / entry["path"]
            present = (folder / WEIGHTS_FILE).is_file()
            trained = None
            if present:
                try:
                    trained = read_config(folder)[1].trained
                except AFLocError:
                    trained = None
            rows.append(
                {
                    "name": entry["name"],
                    "version": entry["version"] if present else "untrained",
                    "source": "package",
                    "location": str(folder),
                    "sha256": entry["sha256"] if present else "",
                    "size": int(entry["size"]) if present else 0,
                    "trained": bool(trained) if present else False,
                    "description": entry["description"]
                    if present
                    else "weights not shipped; a randomly initialised stand-in is used",
                    "installed": present,
                }
            )
        elif entry["name"] not in installed:
            rows.append(
                {
                    "name": entry["name"],
                    "version": entry["version"],
                    "source": "available",
                    "location": entry["url"],
                    "sha256": entry["sha256"],
                    "size": int(entry["size"]),
                    "trained": entry.get("trained"),
                    "description": entry["description"],
                    "installed": False,
                }
            )
    if not any(r["name"] == "default" for r in rows):
        rows.insert(
            0,
            {
                "name": "default",
                "version": "untrained",
                "source": "package",
                "location": "",
                "sha256": "",
                "size": 0,
                "trained": False,
                "description": "no trained weights shipped yet; a randomly initialised stand-in is used",
                "installed": False,
            },
        )
    for name, record in installed.items():
        rows.append(
            {
                "name": name,
                "version": record.get("version", ""),
                "source": "installed",
                "location": record["path"],
                "sha256": record.get("sha256", ""),
                "size": int(record.get("size", 0)),
                "trained": record.get("trained"),
                "description": record.get("error") or record.get("description", ""),
                "installed": "error" not in record,
            }
        )
    return rows
