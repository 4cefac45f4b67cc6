"""Where named models live: models shipped in the package, and models installed into a per-user cache.

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
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import ipaddress
import json
import os
import re
import shutil
import stat
import struct
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

from afloc_engine.errors import AFLocError, CheckpointError

PACKAGE_WEIGHTS = Path(__file__).parent / "weights"
MANIFEST = PACKAGE_WEIGHTS / "manifest.json"
MANIFEST_FORMAT = "afloc-models"
MANIFEST_KEYS = ("name", "version", "sha256", "size", "description")

RECORD_FILE = "install.json"
RECORD_FORMAT = "afloc-install"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "MODEL_CARD.md"
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)
"""The only files a model archive may hold."""

MAX_FILE_BYTES = {CONFIG_FILE: 1 << 20, CARD_FILE: 1 << 20, WEIGHTS_FILE: 8 << 30}
"""Largest accepted size of each file (1 MiB of JSON / Markdown, 8 GiB of weights)."""
DOWNLOAD_TIMEOUT_S = 60.0
CHUNK = 1 << 20
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHA_PATTERN = re.compile(r"^[0-9a-f]{64}$")
SAFETENSORS_DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
MODEL_KEY_PREFIXES = ("image_encoder.", "text_encoder.")


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


def _manifest_entry(name: str) -> dict[str, Any] | None:
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
    entry = _manifest_entry(name_or_path)
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
        if config_sha and _sha256(folder / CONFIG_FILE) != config_sha:
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
        actual = _sha256(path)
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


def __getattr__(attr: str) -> Any:  # noqa: ANN401
    """``registry.list()`` is :func:`list_models` (a module-level ``list`` would shadow the builtin here)."""
    if attr == "list":
        return list_models
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


# --- install / remove ----------------------------------------------------------------------------
def install(
    url_or_path: str | Path,
    sha256: str | None = None,
    name: str | None = None,
    *,
    force: bool = False,
    progress: str = "none",
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> dict[str, Any]:
    """Install a model into the user cache; returns its record (``cached: True`` if nothing was fetched).

    ``url_or_path``: a ``.zip`` / ``.tar.gz`` model archive (local file, or an ``https://`` URL;
    plain ``http://`` only for loopback hosts), a local model folder, or the name of a manifest
    entry with a URL. ``sha256``: the expected SHA-256 of that archive (of ``model.safetensors``
    for a folder); on mismatch nothing is installed. A model whose record already carries the
    same SHA-256 is not fetched again. ``name``: defaults to the model's own name (its
    ``config.json``) or the file name. ``force`` replaces an installed model of the same name
    with different contents. ``progress``: ``bar`` | ``json`` | ``none`` for downloads.
    """
    source = str(url_or_path)
    expected = _check_sha_arg(sha256)
    entry = None if _is_url(source) or Path(source).expanduser().exists() else _manifest_entry(source)
    if entry is not None:
        if "url" not in entry:
            raise CheckpointError(f"model {source!r} is shipped with the package; nothing to install")
        if expected and entry["sha256"] and expected != entry["sha256"]:
            raise CheckpointError(f"--sha256 {expected} differs from the manifest's {entry['sha256']} for {source!r}")
        expected = expected or entry["sha256"] or None
        name = name or entry["name"]
        source = entry["url"]
    if name is not None:
        _check_name(name)

    cached = _find_cached(expected, name)
    if cached is not None:
        return {**cached, "cached": True}

    root = models_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".install-", suffix=".tmp", dir=root))
    except OSError as err:
        raise CheckpointError(f"cannot write to the model cache ({err.strerror}); set AFLOC_HOME", root) from None
    try:
        if _is_url(source):
            archive = staging / "download.part"
            digest, size = download(source, archive, progress=progress, timeout=timeout)
            if expected and digest != expected:
                raise CheckpointError(f"SHA-256 mismatch: expected {expected}, the download has {digest}", source)
            folder = staging / "model"
            _extract_archive(archive, folder, source)
            archive.unlink()
            default_name = _name_from_source(urllib.parse.urlparse(source).path)
        else:
            local = Path(source).expanduser()
            if not local.exists():
                raise CheckpointError("no such file or folder (and no manifest entry of that name)", local)
            folder = staging / "model"
            if local.is_dir():
                _copy_folder(local, folder)
                digest, size = _sha256(folder / WEIGHTS_FILE), (folder / WEIGHTS_FILE).stat().st_size
                what = f"the weights ({WEIGHTS_FILE}) have"
            else:
                digest, size = _sha256(local), local.stat().st_size
                what = "the file has"
            if expected and digest != expected:
                raise CheckpointError(f"SHA-256 mismatch: expected {expected}, {what} {digest}", local)
            if not local.is_dir():
                _extract_archive(local, folder, local)
            default_name = _name_from_source(local.name)
        config_info = _validate_model_folder(folder, source)
        final_name = name or _pick_name(config_info.name, default_name, source)
        _check_name(final_name)
        final = root / final_name
        overwrite = force
        if final.exists():
            existing = _existing_record(final)
            if existing is not None and existing.get("sha256") == digest and not force:
                try:
                    return {**verify_installed(final_name), "path": str(final), "cached": True}
                except CheckpointError:
                    overwrite = True  # same model, damaged on disk: replace it
            if not overwrite:
                raise CheckpointError(
                    f"a different model named {final_name!r} is already installed "
                    f"(remove it with `afloc models remove {final_name}`, pick another --name, or use --force)",
                    final,
                )
        files = {f: _sha256(folder / f) for f in MODEL_FILES if (folder / f).is_file()}
        record = {
            "format": RECORD_FORMAT,
            "format_version": 1,
            "name": final_name,
            "version": config_info.version,
            "description": config_info.description,
            "trained": bool(config_info.trained),
            "source": source,
            "sha256": digest,
            "source_size": size,
            "size": sum((folder / f).stat().st_size for f in files),
            "files": files,
            "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (folder / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _commit(folder, final, overwrite=overwrite)
        return {**record, "path": str(final), "cached": False}
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise CheckpointError("not enough disk space to install the model", root) from None
        raise CheckpointError(f"cannot install the model: {err}", source) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove(name: str) -> Path:
    """Delete an installed model from the user cache; returns the folder it occupied."""
    entry = _manifest_entry(name)
    if entry is not None and "path" in entry:
        raise CheckpointError(f"model {name!r} is shipped with the package and cannot be removed")
    if not NAME_PATTERN.match(name):
        raise CheckpointError(f"invalid model name {name!r}")
    folder = models_dir() / name
    if not folder.is_dir():
        raise CheckpointError(f"no installed model named {name!r} (see `afloc models list`)", folder)
    trash = folder.with_name(f".{name}.{os.getpid()}.removed.tmp")
    os.replace(folder, trash)  # atomic: the model is gone at once, even if deleting the files fails
    shutil.rmtree(trash, ignore_errors=True)
    return folder


def pack(folder: str | Path, archive: str | Path) -> dict[str, Any]:
    """Write a model folder as an installable archive (``.zip`` or ``.tar.gz`` by suffix), atomically.

    Only ``config.json``, ``model.safetensors`` and ``MODEL_CARD.md`` go in, under one top folder
    named after the archive. The folder is validated first. Returns a manifest entry for the
    archive: ``name, version, url`` (to fill in), ``sha256, size, description``.
    """
    folder, archive = Path(folder), Path(archive)
    info = _validate_model_folder(folder, folder)
    lower = archive.name.lower()
    if not lower.endswith((".zip", ".tar.gz", ".tgz")):
        raise CheckpointError("archive name must end in .zip or .tar.gz", archive)
    top = _name_from_source(archive.name) or "model"
    files = [f for f in MODEL_FILES if (folder / f).is_file()]
    archive.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{archive.name}.", suffix=".tmp", dir=archive.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if lower.endswith(".zip"):
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
                for f in files:
                    zf.write(folder / f, f"{top}/{f}")
        else:
            with tarfile.open(tmp, "w:gz") as tf:
                for f in files:
                    tf.add(folder / f, f"{top}/{f}", recursive=False)
        os.replace(tmp, archive)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {
        "name": info.name,
        "version": info.version,
        "url": "",
        "sha256": _sha256(archive),
        "size": archive.stat().st_size,
        "description": info.description,
        "trained": bool(info.trained),
    }


def shipped_entry(folder: str | Path, name: str | None = None, description: str | None = None) -> dict[str, Any]:
    """A manifest entry for a model folder shipped under ``afloc_engine/weights/`` (``path`` relative to it)."""
    folder = Path(folder).resolve()
    info = _validate_model_folder(folder, folder)
    try:
        rel = folder.relative_to(PACKAGE_WEIGHTS.resolve())
    except ValueError:
        raise CheckpointError(f"a shipped model must live under {PACKAGE_WEIGHTS}", folder) from None
    weights = folder / WEIGHTS_FILE
    return {
        "name": name or info.name,
        "version": info.version,
        "path": rel.as_posix(),
        "sha256": _sha256(weights),
        "size": weights.stat().st_size,
        "description": description if description is not None else info.description,
    }


# --- downloads -----------------------------------------------------------------------------------
def _is_url(text: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text))


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str) -> None:
    """Refuse anything but ``https://`` (and ``http://`` to a loopback host, for tests)."""
    parts = urllib.parse.urlparse(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and _is_loopback(parts.hostname):
        return
    if parts.scheme == "http":
        raise CheckpointError("plain http:// downloads are refused (use https://)", url)
    raise CheckpointError(f"unsupported URL scheme {parts.scheme!r} (use https://)", url)


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to URLs :func:`check_url` accepts (no https -> http downgrade)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201
        check_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(url: str, dest: Path, progress: str = "none", timeout: float = DOWNLOAD_TIMEOUT_S) -> tuple[str, int]:
    """Stream ``url`` into the file ``dest``; returns (SHA-256 hex, size in bytes).

    ``timeout`` (s) bounds the connection and every read. Raises :class:`CheckpointError` for
    HTTP errors (404 ...), unreachable hosts, timeouts, truncated transfers and a full disk;
    ``dest`` is removed on any failure.
    """
    from afloc_engine.progress import Progress

    check_url(url)
    opener = urllib.request.build_opener(_SafeRedirects())
    request = urllib.request.Request(url, headers={"User-Agent": "afloc-engine"})
    digest, received = hashlib.sha256(), 0
    try:
        with opener.open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else 0
            if total:
                _check_free_space(dest.parent, total)
            with dest.open("wb") as out, Progress(total, progress, desc=f"download {Path(url).name}") as bar:
                while block := response.read(CHUNK):
                    out.write(block)
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
        if total and received != total:
            raise CheckpointError(f"download incomplete: received {received} of {total} bytes", url)
    except urllib.error.HTTPError as err:
        dest.unlink(missing_ok=True)
        raise CheckpointError(f"download failed: HTTP {err.code} {err.reason}", url) from None
    except urllib.error.URLError as err:
        dest.unlink(missing_ok=True)
        reason = err.reason
        if isinstance(reason, TimeoutError):
            raise CheckpointError(f"download timed out after {timeout:g} s", url) from None
        raise CheckpointError(f"cannot reach the server: {reason}", url) from None
    except TimeoutError:
        dest.unlink(missing_ok=True)
        raise CheckpointError(f"download timed out after {timeout:g} s", url) from None
    except http.client.HTTPException as err:
        dest.unlink(missing_ok=True)
        raise CheckpointError(f"download broken off: {type(err).__name__} {err}", url) from None
    except OSError as err:
        dest.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise CheckpointError("not enough disk space for the download", dest.parent) from None
        raise CheckpointError(f"download failed: {err}", url) from None
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return digest.hexdigest(), received


def _check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed + (64 << 20):
        raise CheckpointError(f"not enough disk space: need {needed / 1e6:.1f} MB, {free / 1e6:.1f} MB free", folder)


# --- archives ------------------------------------------------------------------------------------
def _member_target(name: str, archive: str | Path) -> tuple[str | None, str | None]:
    """(top folder or None, file name or None for a folder entry) of an archive member, or raise."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise CheckpointError(f"archive member {name!r} has an absolute path; refusing it", archive)
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise CheckpointError(f"archive member {name!r} points outside the archive ('..'); refusing it", archive)
    is_dir = name.endswith(("/", "\\"))
    if is_dir:
        if len(parts) > 1:
            raise CheckpointError(
                f"archive member {name!r}: nested folders are not allowed in a model archive", archive
            )
        return (parts[0] if parts else None), None
    if len(parts) == 1:
        top, fname = None, parts[0]
    elif len(parts) == 2:
        top, fname = parts
    else:
        raise CheckpointError(f"archive member {name!r}: nested folders are not allowed in a model archive", archive)
    if fname not in MODEL_FILES:
        raise CheckpointError(
            f"archive member {name!r} is not part of a model folder (only {', '.join(MODEL_FILES)})", archive
        )
    return top, fname


def _extract_archive(archive: Path, dest: Path, label: str | Path) -> None:
    """Copy the model files of a ``.zip`` / ``.tar.gz`` into the new folder ``dest``, refusing anything else."""
    with archive.open("rb") as fh:
        magic = fh.read(4)
    with ExitStack() as stack:
        if magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            members = _zip_members(archive, label, stack)
        elif magic.startswith(b"\x1f\x8b"):
            members = _tar_members(archive, label, stack)
        else:
            raise CheckpointError("not a model archive (expected a .zip or .tar.gz of a model folder)", label)
        plan: dict[str, Any] = {}
        tops = set()
        total = 0
        for name, size, opener in members:
            top, fname = _member_target(name, label)
            if top is not None:
                tops.add(top)
            if fname is None:
                continue
            if fname in plan:
                raise CheckpointError(f"archive holds {fname} twice", label)
            if size > MAX_FILE_BYTES[fname]:
                raise CheckpointError(f"archive member {name!r} is too large ({size} bytes)", label)
            plan[fname] = (name, size, opener)
            total += size
        if len(tops) > 1:
            raise CheckpointError(f"archive holds several folders ({', '.join(sorted(tops))}); expected one", label)
        for required in (CONFIG_FILE, WEIGHTS_FILE):
            if required not in plan:
                raise CheckpointError(f"archive holds no {required}; not a model folder", label)
        dest.mkdir(parents=True)
        _check_free_space(dest, total)
        for fname, (name, size, opener) in plan.items():
            with opener() as src, (dest / fname).open("wb") as out:
                written = _copy_limited(src, out, size, name, label)
            if written != size:
                raise CheckpointError(f"archive member {name!r} is truncated ({written} of {size} bytes)", label)


def _copy_limited(src: IO[bytes], out: IO[bytes], limit: int, name: str, label: str | Path) -> int:
    """Copy at most ``limit`` bytes (an archive member may not unpack to more than it declares)."""
    written = 0
    while block := src.read(CHUNK):
        written += len(block)
        if written > limit:
            raise CheckpointError(f"archive member {name!r} unpacks to more than its declared {limit} bytes", label)
        out.write(block)
    return written


Member = tuple[str, int, Any]
"""(name, declared size, context-manager factory giving a readable stream)"""


def _zip_members(archive: Path, label: str | Path, stack: ExitStack) -> list[Member]:
    try:
        zf = stack.enter_context(zipfile.ZipFile(archive))
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"not a readable .zip archive: {err}", label) from None
    members = []
    for info in zf.infolist():
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise CheckpointError(f"archive member {info.filename!r} is a link; refusing it", label)
        if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise CheckpointError(f"archive member {info.filename!r} is not a regular file; refusing it", label)
        if info.flag_bits & 0x1:
            raise CheckpointError(f"archive member {info.filename!r} is encrypted", label)
        members.append((info.filename, info.file_size, _zip_opener(zf, info, label)))
    return members


def _zip_opener(zf: zipfile.ZipFile, info: zipfile.ZipInfo, label: str | Path) -> Any:  # noqa: ANN401
    @contextmanager
    def opener() -> Iterator[IO[bytes]]:
        try:
            with zf.open(info) as fh:
                yield fh
        except (zipfile.BadZipFile, EOFError, ValueError, zlib.error) as err:
            raise CheckpointError(f"corrupt archive member {info.filename!r}: {err}", label) from None

    return opener


def _tar_members(archive: Path, label: str | Path, stack: ExitStack) -> list[Member]:
    try:
        tf = stack.enter_context(tarfile.open(archive, mode="r:gz"))
        infos = tf.getmembers()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise CheckpointError(f"not a readable .tar.gz archive: {err}", label) from None
    members = []
    for info in infos:
        if info.issym() or info.islnk():
            raise CheckpointError(f"archive member {info.name!r} is a link; refusing it", label)
        if not (info.isfile() or info.isdir()):
            raise CheckpointError(f"archive member {info.name!r} is not a regular file; refusing it", label)
        name = info.name + "/" if info.isdir() and not info.name.endswith("/") else info.name
        members.append((name, info.size, _tar_opener(tf, info, label)))
    return members


def _tar_opener(tf: tarfile.TarFile, info: tarfile.TarInfo, label: str | Path) -> Any:  # noqa: ANN401
    @contextmanager
    def opener() -> Iterator[IO[bytes]]:
        try:
            fh = tf.extractfile(info)  # a stream of the member's bytes; nothing is written by tarfile
            if fh is None:
                raise CheckpointError(f"archive member {info.name!r} is not a regular file", label)
            with fh:
                yield fh
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise CheckpointError(f"corrupt archive member {info.name!r}: {err}", label) from None

    return opener


def _copy_folder(src: Path, dest: Path) -> None:
    """Copy the model files of a local folder (nothing else) into the new folder ``dest``."""
    dest.mkdir(parents=True)
    for fname in MODEL_FILES:
        path = src / fname
        if path.is_symlink():
            raise CheckpointError(f"{fname} is a link; refusing it", path)
        if path.is_file():
            shutil.copyfile(path, dest / fname)
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (dest / required).is_file():
            raise CheckpointError(f"no {required} in the model folder", src)


# --- validation ----------------------------------------------------------------------------------
def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor table of a ``.safetensors`` file, checked for consistency without loading any tensor.

    Returns ``{name: {"dtype", "shape", "data_offsets"}}``; raises :class:`CheckpointError`
    naming the problem (bad header, unknown dtype, offsets outside the file or overlapping).
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError("not a safetensors file (too short)", path)
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > min(size - 8, 100 << 20):
            raise CheckpointError("not a safetensors file (bad header length)", path)
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"not a safetensors file (header is not JSON: {err})", path) from None
    if not isinstance(header, dict):
        raise CheckpointError("not a safetensors file (header is not an object)", path)
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {key!r} has an unknown dtype", path)
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise CheckpointError(f"tensor {key!r} has an invalid shape", path)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"tensor {key!r} has invalid data offsets", path)
        begin, end = offsets
        count = 1
        for s in shape:
            count *= s
        if not 0 <= begin <= end <= data_len or end - begin != count * SAFETENSORS_DTYPES[info["dtype"]]:
            raise CheckpointError(f"tensor {key!r} lies outside the file or has the wrong byte length", path)
        spans.append((begin, end, key))
    spans.sort()
    cursor = 0
    for begin, end, key in spans:
        if begin < cursor:
            raise CheckpointError(f"tensor {key!r} overlaps another tensor", path)
        cursor = end
    if cursor != data_len:
        raise CheckpointError("safetensors data length does not match its header (truncated?)", path)
    return header


def _validate_model_folder(folder: Path, source: str | Path) -> Any:  # noqa: ANN401 (checkpoint.ModelInfo)
    """Check config.json (architecture) and the weights header; returns the folder's ModelInfo."""
    from afloc_engine.checkpoint import TEXT_PREFIX, read_config

    try:
        _, info = read_config(folder)
    except AFLocError as err:
        raise CheckpointError(f"invalid {CONFIG_FILE} in the model: {err.problem}", source) from None
    try:
        header = read_safetensors_header(folder / WEIGHTS_FILE)
    except CheckpointError as err:
        raise CheckpointError(f"invalid {WEIGHTS_FILE} in the model: {err.problem}", source) from None
    bad = next((k for k in header if not k.startswith(MODEL_KEY_PREFIXES)), None)
    if bad is not None:
        raise CheckpointError(f"{WEIGHTS_FILE} holds a tensor {bad!r} that is not part of an AFLoc model", source)
    if not any(k.startswith("image_encoder.") for k in header):
        raise CheckpointError(f"{WEIGHTS_FILE} holds no image encoder weights", source)
    if info.text_weights == "checkpoint" and not any(k.startswith(TEXT_PREFIX) for k in header):
        raise CheckpointError(f'config says text_weights "checkpoint" but {WEIGHTS_FILE} holds none', source)
    return info


# --- helpers -------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _check_sha_arg(sha256: str | None) -> str | None:
    if sha256 is None or sha256 == "":
        return None
    sha = sha256.strip().lower()
    if not SHA_PATTERN.match(sha):
        raise CheckpointError(f"invalid SHA-256 {sha256!r} (expected 64 hex digits)")
    return sha


def _check_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise CheckpointError(f"invalid model name {name!r} (letters, digits, '.', '_', '-'; at most 64)")
    if name == "default":
        raise CheckpointError("the name 'default' is reserved for the model shipped with the package")
    entry = _manifest_entry(name)
    if entry is not None and "path" in entry:
        raise CheckpointError(f"the name {name!r} is reserved for a model shipped with the package")


def _name_from_source(filename: str) -> str:
    base = Path(filename).name
    for suffix in (".tar.gz", ".tgz", ".zip"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._")[:64]


def _pick_name(config_name: str, file_name: str, source: str | Path) -> str:
    for candidate in (config_name, file_name):
        if candidate and candidate not in ("untitled", "default") and NAME_PATTERN.match(candidate):
            entry = _manifest_entry(candidate)
            if entry is None or "path" not in entry:
                return candidate
    raise CheckpointError("cannot tell the model's name; give one with --name", source)


def _existing_record(folder: Path) -> dict[str, Any] | None:
    try:
        return read_record(folder)
    except CheckpointError:
        return None


def _find_cached(sha256: str | None, name: str | None) -> dict[str, Any] | None:
    """An installed, intact model whose record carries this SHA-256 (and name, if given)."""
    if not sha256:
        return None
    for record in installed_models():
        if record.get("sha256") != sha256 or (name is not None and record.get("name") != name):
            continue
        try:
            verified = verify_installed(record["name"])
        except CheckpointError:
            continue  # damaged: install afresh (with force semantics decided by the caller)
        return {**verified, "path": record["path"]}
    return None


def _commit(tmp: Path, final: Path, overwrite: bool) -> None:
    from afloc_engine.checkpoint import commit_folder

    commit_folder(tmp, final, overwrite=overwrite)
