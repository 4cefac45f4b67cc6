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

import hashlib
import json
import os
import shutil
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


def atomic_folder(final: Path) -> Path:
    """A fresh temporary folder beside ``final``; pass it to :func:`commit_folder` when complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))


def commit_folder(tmp: Path, final: Path, overwrite: bool = False) -> None:
    """Move a completed temporary folder into place (replacing ``final`` only if ``overwrite``).

    Permissions become the usual 755 (folders) / 644 (files): ``mkdtemp`` makes 700.
    """
    for path in [tmp, *tmp.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    if final.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError("already exists; refusing to overwrite it", final)
        backup = final.with_name(final.name + ".old.tmp")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(final, backup)
        os.replace(tmp, final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, final)


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
    folder: str | Path, expected_sha256: str | None = None, text_model_dir: str | Path | None = None
) -> tuple[AFLocModel, ModelInfo]:
    """Build the model a folder describes and load its weights (eval mode, CPU)."""
    folder = Path(folder)
    config, info = read_config(folder)
    state, digest = load_weights(folder, expected_sha256)
    # every weight comes from the file: skip fetching ImageNet weights for the backbone's init
    model = AFLocModel(config.replace(pretrained_backbone=False), text_model_dir)
    model.config = config
    model.image_encoder.config = config
    apply_state(model, state, info.text_weights == "checkpoint", folder / WEIGHTS_FILE)
    info.sha256 = digest
    model.eval()
    return model, info
