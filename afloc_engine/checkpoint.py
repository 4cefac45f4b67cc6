"""Model folders: ``config.json`` + ``model.safetensors``; never pickle.

``config.json``::

    {"format": "afloc", "format_version": 1,
     "model": {...AFLocConfig...},
     "meta": {"name": ..., "version": ..., "trained": true, "text_weights": "package"|"checkpoint", ...}}

``text_weights = "package"`` means the transformer weights are those of ``model.text_model`` as
installed (frozen during training), so the file holds only the image encoder and the projections;
``"checkpoint"`` means the fine-tuned transformer weights are in ``model.safetensors`` too.
Writes go to a temporary folder renamed into place, so a crash never leaves half a model.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from afloc_engine.config import AFLocConfig
from afloc_engine.errors import CheckpointError
from afloc_engine.models import AFLocModel

FORMAT = "afloc"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TEXT_PREFIX = "text_encoder.transformer."


@dataclass
class ModelInfo:
    """What a model folder says about itself."""

    name: str = "untitled"
    version: str = "0"
    trained: bool = False
    text_weights: str = "package"
    description: str = ""
    sha256: str = ""
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        """``name@version:sha12``, recorded in results and adapters."""
        return f"{self.name}@{self.version}:{self.sha256[:12] or 'unsaved'}"

    def to_meta(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "trained": self.trained,
            "text_weights": self.text_weights,
            "description": self.description,
            **self.extra,
        }


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<tag>[A-Za-z0-9_]+)\.tmp$")
_LEGACY_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<tag>[A-Za-z0-9_]{8})\.tmp$")


def _pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (a PID of this process counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def recover_folder(final: Path) -> None:
    """Finish what an interrupted :func:`commit_folder` / :func:`atomic_folder` for ``final`` left behind.

    A backup (``.NAME.PID.old.tmp``, or the older ``NAME.old.tmp``) of a dead writer is put back when
    ``final`` is missing (the kill fell between the two renames: the previous state returns) and deleted
    otherwise; temporary folders ``.NAME.PID.XXXXXXXX.tmp`` of dead writers are deleted. Leftovers of a
    live process are left alone.
    """
    parent = final.parent
    if not parent.is_dir():
        return
    backups = [parent / f"{final.name}.old.tmp"]
    temps = []
    for entry in parent.iterdir():
        match = _TMP_NAME.match(entry.name)
        if match and match["name"] == final.name and not _pid_alive(int(match["pid"])):
            (backups if match["tag"] == "old" else temps).append(entry)
        elif (legacy := _LEGACY_TMP.match(entry.name)) and legacy["name"] == final.name:
            temps.append(entry)
    for backup in backups:
        if not backup.exists():
            continue
        if final.exists():
            _remove(backup)
        else:
            os.replace(backup, final)
    for temp in temps:
        _remove(temp)


def clean_leftovers(parent: Path) -> list[Path]:
    """:func:`recover_folder` for every interrupted write found directly in ``parent``; returns the finals.

    Call it with the folder's lock held (see :mod:`afloc_engine.locks`) or where only one writer runs.
    """
    finals = set()
    if parent.is_dir():
        for entry in parent.iterdir():
            match = _TMP_NAME.match(entry.name) or _LEGACY_TMP.match(entry.name)
            if match:
                finals.add(parent / match["name"])
            elif entry.name.endswith(".old.tmp"):
                finals.add(parent / entry.name[: -len(".old.tmp")])
    for final in sorted(finals):
        recover_folder(final)
    return sorted(finals)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and every folder (so their entries are on disk too)."""
    for path in [*folder.rglob("*"), folder]:
        if path.is_symlink():
            continue
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        elif path.is_dir():
            fsync_dir(path)


def fsync_dir(folder: Path) -> None:
    """fsync a folder's entry list (after a rename into it); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows: folders cannot be opened; renames are durable there already
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where not supported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # a file system without exchange: the backup route
    raise OSError(err, os.strerror(err), str(b))


def atomic_folder(final: Path) -> Path:
    """A fresh temporary folder ``.NAME.PID.XXXXXXXX.tmp`` beside ``final``; pass it to :func:`commit_folder`.

    Leftovers of an earlier interrupted write of ``final`` by a dead process are recovered first
    (:func:`recover_folder`), so interrupted runs leave no temporary folders behind after the next one.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(final)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent))


def commit_folder(tmp: Path, final: Path, overwrite: bool = False) -> None:
    """Move a completed temporary folder into place (replacing ``final`` only if ``overwrite``).

    Every file is fsynced before the rename and the parent folder after it, so a power cut leaves the old
    or the new folder, never a folder of empty files. Replacing is one atomic exchange on Linux
    (``renameat2``); elsewhere it goes through a backup ``.NAME.PID.old.tmp``, and a kill between the
    two renames is undone by the next :func:`atomic_folder` (the previous folder comes back).
    Permissions become the usual 755 (folders) / 644 (files): ``mkdtemp`` makes 700.
    Raises :class:`CheckpointError` if ``final`` exists and not ``overwrite``.
    """
    for path in [tmp, *tmp.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    fsync_tree(tmp)
    if final.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError("already exists; refusing to overwrite it", final)
        if _exchange(tmp, final):  # one atomic step: readers see the old folder or the new, never neither
            fsync_dir(final.parent)
            _remove(tmp)  # now the old folder; a kill here leaves a temporary folder the next write removes
            return
        backup = final.with_name(f".{final.name}.{os.getpid()}.old.tmp")
        _remove(backup)
        os.replace(final, backup)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        _remove(backup)
    else:
        os.replace(tmp, final)
        fsync_dir(final.parent)


def model_state(model: AFLocModel, include_text_transformer: bool, dtype: torch.dtype | None = None) -> dict:
    """The tensors a checkpoint stores (contiguous, optionally cast, e.g. to fp16)."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(TEXT_PREFIX) and not include_text_transformer:
            continue
        if key.endswith("num_batches_tracked"):
            continue
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state[key] = value.contiguous()
    return state


def save_model(
    model: AFLocModel,
    folder: str | Path,
    info: ModelInfo | None = None,
    include_text_transformer: bool = False,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors`` atomically. Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    info = info or ModelInfo()
    info.text_weights = "checkpoint" if include_text_transformer else "package"
    tmp = atomic_folder(folder)
    try:
        save_file(model_state(model, include_text_transformer, dtype), str(tmp / WEIGHTS_FILE))
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": model.config.to_dict(),
            "meta": info.to_meta(),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        commit_folder(tmp, folder, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_config(folder: str | Path) -> tuple[AFLocConfig, ModelInfo]:
    """Parse ``config.json`` of a model folder."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise CheckpointError("model folder not found", folder)
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in the model folder", folder)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"config is not valid JSON: {err}", path) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "model" not in data:
        raise CheckpointError(f'not an AFLoc model config (expected "format": "{FORMAT}")', path)
    if int(data.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"written by a newer afloc_engine (format {data['format_version']})", path)
    config = AFLocConfig.from_dict(data["model"], path)
    meta = dict(data.get("meta", {}))
    known = {k: meta.pop(k) for k in ("name", "version", "trained", "text_weights", "description") if k in meta}
    info = ModelInfo(**known, extra=meta, path=folder)
    return config, info


def load_weights(folder: str | Path, expected_sha256: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Read ``model.safetensors`` (checking its SHA-256 when one is expected). Returns (tensors, sha256)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"no {WEIGHTS_FILE} in the model folder", folder)
    digest = sha256_file(path)
    if expected_sha256 and digest != expected_sha256.lower():
        raise CheckpointError(f"SHA-256 mismatch: expected {expected_sha256}, file has {digest}", path)
    try:
        return load_file(str(path)), digest
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"corrupt weights file: {err}", path) from None


def apply_state(model: AFLocModel, state: dict[str, torch.Tensor], include_text: bool, source: Path) -> None:
    """Load tensors into ``model``, naming the first missing, unexpected or mis-shaped key."""
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    expected = {k for k in own if include_text or not k.startswith(TEXT_PREFIX)}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing:
        raise CheckpointError(f"missing key {missing[0]!r} ({len(missing)} missing in all)", source)
    if unexpected:
        raise CheckpointError(f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)", source)
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"key {key!r} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}", source
            )
    cast = {k: v.to(own[k].dtype) for k, v in state.items()}
    model.load_state_dict(cast, strict=False)


def load_model_folder(
    folder: str | Path,
    expected_sha256: str | None = None,
    text_model_dir: str | Path | None = None,
    lazy_text: bool = False,
) -> tuple[AFLocModel, ModelInfo]:
    """Build the model a folder describes and load its weights (eval mode, CPU).

    ``lazy_text``: for inference; when the text transformer's weights come from the installed package
    (not the checkpoint), it is read only when a text is first encoded.
    """
    folder = Path(folder)
    config, info = read_config(folder)
    state, digest = load_weights(folder, expected_sha256)
    bundled = folder / config.text_model  # a text model kept inside the folder (afloc convert-reference)
    if text_model_dir is None and not Path(config.text_model).is_absolute() and (bundled / "config.json").is_file():
        text_model_dir = bundled
    text_in_checkpoint = info.text_weights == "checkpoint"
    # every weight comes from the file: skip fetching ImageNet weights for the backbone's init
    model = AFLocModel(
        config.replace(pretrained_backbone=False), text_model_dir, lazy_text=lazy_text and not text_in_checkpoint
    )
    model.config = config
    model.image_encoder.config = config
    apply_state(model, state, text_in_checkpoint, folder / WEIGHTS_FILE)
    info.sha256 = digest
    model.eval()
    return model, info
