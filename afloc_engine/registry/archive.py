"""Model archives and folders: unpacking a ``.zip`` / ``.tar.gz`` safely, and checking what it holds.

Archives are never extracted blindly: absolute paths, ``..``, links, nested folders and any file
other than ``config.json``, ``model.safetensors`` and ``MODEL_CARD.md`` are refused; each member is
copied (at most its declared size) into a fresh folder. The weights' safetensors header is parsed
and checked for consistency without loading any tensor. Nothing is executed or unpickled. Torch-free
(``afloc_engine.checkpoint`` is imported only to read a model's ``config.json``).
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

from afloc_engine.errors import AFLocError, CheckpointError
from afloc_engine.registry.download import CHUNK, check_free_space
from afloc_engine.registry.manifest import CARD_FILE, CONFIG_FILE, MODEL_FILES, PROMPT_TABLE_FILE, WEIGHTS_FILE

MAX_FILE_BYTES = {CONFIG_FILE: 1 << 20, CARD_FILE: 1 << 20, WEIGHTS_FILE: 8 << 30, PROMPT_TABLE_FILE: 64 << 20}
"""Largest accepted size of each file (1 MiB of JSON / Markdown, 8 GiB of weights, 64 MiB of prompt table)."""
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
"""Bytes per element of each safetensors dtype."""
MODEL_KEY_PREFIXES = ("image_encoder.", "text_encoder.")
TEXT_MODEL_DIR = "text_model"
"""The one sub-folder a local model folder may hold: its own text model (tokenizer files, config.json,
weights), which ``afloc convert-reference`` writes; copied file by file (no links, no deeper folders)."""


def name_from_archive(filename: str) -> str:
    """A model name from an archive's file name: the suffix (``.zip``, ``.tar.gz``, ``.tgz``) dropped,
    other characters than letters, digits, ``.``, ``_``, ``-`` turned into ``-``, at most 64 characters."""
    base = Path(filename).name
    for suffix in (".tar.gz", ".tgz", ".zip"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._")[:64]


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


def extract_archive(archive: Path, dest: Path, label: str | Path) -> None:
    """Copy the model files of a ``.zip`` / ``.tar.gz`` into the new folder ``dest``, refusing anything else.

    ``label`` names the source in errors (the URL or local path). Raises :class:`CheckpointError`
    for anything but one folder of model files, for oversized or truncated members, a full disk.
    """
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
        check_free_space(dest, total)
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


def copy_model_folder(src: Path, dest: Path) -> None:
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
    text = src / TEXT_MODEL_DIR  # a converted reference model's own text model (afloc convert-reference)
    if text.is_dir() and not text.is_symlink():
        (dest / TEXT_MODEL_DIR).mkdir()
        for path in sorted(text.iterdir()):
            if path.is_symlink() or not path.is_file():
                raise CheckpointError(f"{TEXT_MODEL_DIR}/{path.name} is a link or a folder; refusing it", path)
            shutil.copyfile(path, dest / TEXT_MODEL_DIR / path.name)


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


def validate_model_folder(folder: Path, source: str | Path) -> Any:  # noqa: ANN401 (checkpoint.ModelInfo)
    """Check config.json (architecture) and the weights header; returns the folder's ModelInfo.

    Raises :class:`CheckpointError` naming ``source`` when the config is invalid, the header is
    inconsistent, or the weights hold tensors that are not an AFLoc model's.
    """
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


# --- writing ---------------------------------------------------------------------------------------
ARCHIVE_TIME = (1980, 1, 1, 0, 0, 0)
"""Time stamp of every member of a written archive (the earliest a zip holds): bytes depend on content only."""


def write_archive(path: Path, members: list[tuple[Path, str]], zip_format: bool) -> None:
    """Write ``members`` (file, name in the archive) as a stored ``.zip`` or a ``.tar.gz`` whose bytes depend
    only on the files' contents and names: fixed time stamps, mode 0644, no owner names."""
    if zip_format:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
            for source, name in members:
                entry = zipfile.ZipInfo(name, date_time=ARCHIVE_TIME)
                entry.external_attr = 0o100644 << 16
                with source.open("rb") as src, zf.open(entry, "w", force_zip64=True) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        return
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for source, name in members:
                entry = tarfile.TarInfo(name)
                entry.size, entry.mode, entry.mtime = source.stat().st_size, 0o644, 0
                with source.open("rb") as src:
                    tf.addfile(entry, src)
