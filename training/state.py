"""Training checkpoints: the engine's model folder plus the training state, all without pickle.

A checkpoint is one folder, written under a temporary name and renamed into place::

    checkpoints/step-00001234/
        model/                        the engine's model folder (config.json + model.safetensors)
        training_state.safetensors    optimizer tensors, torch/CUDA/numpy RNG states (per rank)
        training_state.json           optimizer param groups, scheduler, epoch/step, python RNG, ...
    checkpoints/LATEST                name of the newest complete checkpoint (replaced atomically)

A kill -9 at any moment leaves ``LATEST`` naming a complete folder (or, before the first
checkpoint, no ``LATEST``): the pointer moves only after the folder is in place.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from afloc_engine.checkpoint import (
    ModelInfo,
    apply_state,
    atomic_folder,
    clean_leftovers,
    commit_folder,
    fsync_dir,
    load_weights,
    save_model,
)
from afloc_engine.errors import CheckpointError
from afloc_engine.models import AFLocModel

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
MODEL_DIR = "model"
LATEST = "LATEST"
STATE_VERSION = 1


# --- RNG -------------------------------------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states as (tensors, JSON-able values)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, py_state, gauss = random.getstate()
    plain = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(py_state), gauss]}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(tensors["torch"].to(torch.uint8))
    cuda = sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k].to(torch.uint8) for k in cuda][: torch.cuda.device_count()])
    kind, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = plain["python"]
    random.setstate((version, tuple(py_state), gauss))


# --- optimizer -----------------------------------------------------------------------------------
def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state split into tensors (``optimizer/<param>/<key>``) and JSON (param groups, scalars)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{pid}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], plain: dict) -> None:
    """Inverse of :func:`optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer/"):
            _, pid, key = name.split("/", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in plain["scalars"].items():
        pid, key = name.split("/", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


# --- checkpoint folders ----------------------------------------------------------------------------
def save_checkpoint(
    folder: Path,
    model: AFLocModel,
    info: ModelInfo,
    include_text: bool,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,  # noqa: ANN401 (an LR scheduler)
    progress: dict[str, Any],
    rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
    keep: int = 2,
) -> Path:
    """Write ``folder`` (a complete checkpoint) atomically, point LATEST at it, prune old ones."""
    from safetensors.torch import save_file

    tmp = atomic_folder(folder)
    try:
        save_model(model, tmp / MODEL_DIR, info, include_text_transformer=include_text)
        tensors, opt_plain = optimizer_state(optimizer)
        rng_plain = []
        for rank, (rt, rp) in enumerate(rng):
            tensors.update({f"rng/{rank}/{k}": v.contiguous() for k, v in rt.items()})
            rng_plain.append(rp)
        save_file(tensors, str(tmp / STATE_TENSORS))
        plain = {
            "version": STATE_VERSION,
            "progress": progress,
            "optimizer": opt_plain,
            "scheduler": scheduler.state_dict(),
            "rng": rng_plain,
        }
        (tmp / STATE_JSON).write_text(json.dumps(plain, indent=1))
        commit_folder(tmp, folder, overwrite=True)  # fsyncs the files, then the folder after the rename
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_pointer(folder.parent, folder.name)
    prune(folder.parent, keep)
    return folder


def write_pointer(checkpoints: Path, name: str) -> None:
    """Point ``LATEST`` at ``name`` atomically: temporary file, fsync, rename, fsync of the folder."""
    pointer = checkpoints / LATEST
    tmp_pointer = checkpoints / f".{LATEST}.tmp"
    with tmp_pointer.open("w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp_pointer, pointer)
    fsync_dir(checkpoints)


def prune(checkpoints: Path, keep: int) -> None:
    """Remove all but the ``keep`` newest complete checkpoints and any leftover temporary folders.

    Leftovers of an interrupted write are recovered first (:func:`afloc_engine.checkpoint.clean_leftovers`:
    a backup whose checkpoint is missing is put back, temporary folders of dead writers are deleted).
    """
    clean_leftovers(checkpoints)
    (checkpoints / f".{LATEST}.tmp").unlink(missing_ok=True)
    latest = latest_checkpoint(checkpoints)
    done = sorted(p for p in checkpoints.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        if latest is None or old != latest:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in checkpoints.glob(".step-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint LATEST names, if it is complete; else the newest complete one; else None."""
    pointer = checkpoints / LATEST
    if pointer.is_file():
        folder = checkpoints / pointer.read_text().strip()
        if is_complete(folder):
            return folder
    candidates = sorted(p for p in checkpoints.glob("step-*") if is_complete(p))
    return candidates[-1] if candidates else None


def is_complete(folder: Path) -> bool:
    """A checkpoint folder with its model and both training-state files."""
    return (
        folder.is_dir()
        and (folder / STATE_JSON).is_file()
        and (folder / STATE_TENSORS).is_file()
        and (folder / MODEL_DIR / "model.safetensors").is_file()
    )


def load_checkpoint(folder: Path, model: AFLocModel) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load the model weights of a checkpoint into ``model``; return its (state tensors, state JSON)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from afloc_engine.checkpoint import read_config

    _, info = read_config(folder / MODEL_DIR)
    state, _ = load_weights(folder / MODEL_DIR)
    apply_state(model, state, info.text_weights == "checkpoint", folder / MODEL_DIR)
    try:
        tensors = load_file(str(folder / STATE_TENSORS))
        plain = json.loads((folder / STATE_JSON).read_text())
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"corrupt training state: {err}", folder) from None
    if plain.get("version", 0) > STATE_VERSION:
        raise CheckpointError("training state written by a newer version", folder)
    return tensors, plain


def rank_rng(tensors: dict[str, torch.Tensor], plain: dict[str, Any], rank: int) -> tuple[dict, dict] | None:
    """This rank's saved RNG state, or None when the checkpoint has none for it."""
    if rank >= len(plain.get("rng", [])):
        return None
    prefix = f"rng/{rank}/"
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, plain["rng"][rank]
