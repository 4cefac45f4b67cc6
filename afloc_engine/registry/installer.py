"""Installing a model into the per-user cache, removing it, and packing a model folder for release.

An install stages everything in a temporary folder under ``models_dir()``: the archive is
downloaded (:mod:`.download`) or copied, its SHA-256 checked, unpacked and validated
(:mod:`.archive`), an ``install.json`` record written (:mod:`.manifest` reads it), and only then
the folder is renamed into place. On any failure nothing is installed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from afloc_engine.errors import CheckpointError
from afloc_engine.registry import manifest
from afloc_engine.registry.archive import (
    copy_model_folder,
    extract_archive,
    name_from_archive,
    validate_model_folder,
    write_archive,
)
from afloc_engine.registry.download import DOWNLOAD_TIMEOUT_S, download_file, is_url, sha256_file
from afloc_engine.registry.manifest import (
    MODEL_FILES,
    NAME_PATTERN,
    RECORD_FILE,
    RECORD_FORMAT,
    SHA_PATTERN,
    WEIGHTS_FILE,
    installed_models,
    manifest_entry,
    models_dir,
    read_record,
    verify_installed,
)


# --- install / remove ----------------------------------------------------------------------------
def _cache_lock(command: str, wait: bool):  # noqa: ANN202 (a context manager)
    """The model cache's writer lock (one install/remove at a time; see :mod:`afloc_engine.locks`)."""
    import contextlib

    from afloc_engine.checkpoint import clean_leftovers
    from afloc_engine.locks import sibling_lock

    @contextlib.contextmanager
    def held():  # noqa: ANN202
        root = models_dir()  # locked from its parent: the cache itself holds only models
        with sibling_lock(root, command, wait=wait):
            root.mkdir(parents=True, exist_ok=True)
            for staging in root.glob(".install-*.tmp"):  # an interrupted install (we hold the lock)
                shutil.rmtree(staging, ignore_errors=True)
            clean_leftovers(root)
            yield root

    return held()


def install(
    url_or_path: str | Path,
    sha256: str | None = None,
    name: str | None = None,
    *,
    force: bool = False,
    progress: str = "none",
    timeout: float = DOWNLOAD_TIMEOUT_S,
    wait: bool = False,
) -> dict[str, Any]:
    """Install a model into the user cache; returns its record (``cached: True`` if nothing was fetched).

    ``url_or_path``: a ``.zip`` / ``.tar.gz`` model archive (local file, or an ``https://`` URL;
    plain ``http://`` only for loopback hosts), a local model folder, or the name of a manifest
    entry with a URL. ``sha256``: the expected SHA-256 of that archive (of ``model.safetensors``
    for a folder); on mismatch nothing is installed. A model whose record already carries the
    same SHA-256 is not fetched again. ``name``: defaults to the model's own name (its
    ``config.json``) or the file name. ``force`` replaces an installed model of the same name
    with different contents. ``progress``: ``bar`` | ``json`` | ``none`` for downloads.

    Holds the model cache's lock: a second writer gets :class:`~afloc_engine.locks.FolderLockedError`
    naming the holder's PID, or waits when ``wait``.
    """
    with _cache_lock("afloc models install", wait):
        source = str(url_or_path)
        expected = _check_sha_arg(sha256)
        entry = None if is_url(source) or Path(source).expanduser().exists() else manifest_entry(source)
        if entry is not None:
            if "url" not in entry:
                raise CheckpointError(f"model {source!r} is shipped with the package; nothing to install")
            if expected and entry["sha256"] and expected != entry["sha256"]:
                raise CheckpointError(
                    f"--sha256 {expected} differs from the manifest's {entry['sha256']} for {source!r}"
                )
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
            if is_url(source):
                archive = staging / "download.part"
                digest, size = download_file(source, archive, progress=progress, timeout=timeout)
                if expected and digest != expected:
                    raise CheckpointError(f"SHA-256 mismatch: expected {expected}, the download has {digest}", source)
                folder = staging / "model"
                extract_archive(archive, folder, source)
                archive.unlink()
                default_name = name_from_archive(urllib.parse.urlparse(source).path)
            else:
                local = Path(source).expanduser()
                if not local.exists():
                    raise CheckpointError("no such file or folder (and no manifest entry of that name)", local)
                folder = staging / "model"
                if local.is_dir():
                    copy_model_folder(local, folder)
                    digest, size = sha256_file(folder / WEIGHTS_FILE), (folder / WEIGHTS_FILE).stat().st_size
                    what = f"the weights ({WEIGHTS_FILE}) have"
                else:
                    digest, size = sha256_file(local), local.stat().st_size
                    what = "the file has"
                if expected and digest != expected:
                    raise CheckpointError(f"SHA-256 mismatch: expected {expected}, {what} {digest}", local)
                if not local.is_dir():
                    extract_archive(local, folder, local)
                default_name = name_from_archive(local.name)
            config_info = validate_model_folder(folder, source)
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
            files = {f: sha256_file(folder / f) for f in MODEL_FILES if (folder / f).is_file()}
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


def remove(name: str, wait: bool = False) -> Path:
    """Delete an installed model from the user cache (holding its lock); returns the folder it occupied."""
    with _cache_lock("afloc models remove", wait):
        return _remove(name)


def _remove(name: str) -> Path:
    entry = manifest_entry(name)
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

    Only the model files (``config.json``, ``model.safetensors``, ``MODEL_CARD.md``,
    ``prompt_embeddings.safetensors``) go in, under one top folder named after the archive; the same
    folder always gives the same bytes (:func:`write_archive`), so the printed SHA-256 can be checked
    by packing again. The folder is validated first. Returns a manifest entry for the archive:
    ``name, version, url`` (to fill in), ``sha256, size, description``.
    """
    folder, archive = Path(folder), Path(archive)
    info = validate_model_folder(folder, folder)
    lower = archive.name.lower()
    if not lower.endswith((".zip", ".tar.gz", ".tgz")):
        raise CheckpointError("archive name must end in .zip or .tar.gz", archive)
    top = name_from_archive(archive.name) or "model"
    files = [f for f in MODEL_FILES if (folder / f).is_file()]
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(f".{archive.name}.{os.getpid()}.tmp")  # opened as any new file: the umask's mode
    try:
        write_archive(tmp, [(folder / f, f"{top}/{f}") for f in files], zip_format=lower.endswith(".zip"))
        os.replace(tmp, archive)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {
        "name": info.name,
        "version": info.version,
        "url": "",
        "sha256": sha256_file(archive),
        "size": archive.stat().st_size,
        "description": info.description,
        "trained": bool(info.trained),
    }


def shipped_entry(folder: str | Path, name: str | None = None, description: str | None = None) -> dict[str, Any]:
    """A manifest entry for a model folder shipped under ``afloc_engine/weights/`` (``path`` relative to it)."""
    folder = Path(folder).resolve()
    info = validate_model_folder(folder, folder)
    try:
        rel = folder.relative_to(manifest.PACKAGE_WEIGHTS.resolve())
    except ValueError:
        raise CheckpointError(f"a shipped model must live under {manifest.PACKAGE_WEIGHTS}", folder) from None
    weights = folder / WEIGHTS_FILE
    return {
        "name": name or info.name,
        "version": info.version,
        "path": rel.as_posix(),
        "sha256": sha256_file(weights),
        "size": weights.stat().st_size,
        "description": description if description is not None else info.description,
    }


# --- helpers -------------------------------------------------------------------------------------
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
    entry = manifest_entry(name)
    if entry is not None and "path" in entry:
        raise CheckpointError(f"the name {name!r} is reserved for a model shipped with the package")


def _pick_name(config_name: str, file_name: str, source: str | Path) -> str:
    for candidate in (config_name, file_name):
        if candidate and candidate not in ("untitled", "default") and NAME_PATTERN.match(candidate):
            entry = manifest_entry(candidate)
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
