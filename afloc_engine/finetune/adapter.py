"""Adapters: a fine-tuned head saved beside (never inside) its base model, and inference with it.

Adapters are kept in one store, :func:`default_adapter_store` (``$AFLOC_HOME/adapters``), shared by
the ``afloc`` CLI and the Slicer module. An adapter folder ``<store>/<finding>-<timestamp>/`` holds::

    adapter.safetensors   head weights (and the tuned last encoder stage, if it was unfrozen)
    adapter.json          format, findings, prompts, base model id, head config, training example ids, created
    metrics.json          training history (loss, held-out Dice per epoch), timings

It is written to a hidden temporary folder and renamed at the end, so a cancelled or crashed
fine-tune leaves no adapter folder. An adapter refuses to run on another base model.

Wherever an adapter folder is expected, a folder of adapters (the store) also works: with the
prompts, :func:`resolve_adapter` picks the newest adapter for the finding they name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from afloc_engine.checkpoint import atomic_folder, commit_folder
from afloc_engine.errors import CheckpointError, ConfigError, PromptError
from afloc_engine.finetune.features import (
    TunedStage,
    correction_to_image,
    encode,
    image_channel,
    image_maps_to_head,
    tap_encoder,
)
from afloc_engine.finetune.head import AdapterHead, HeadConfig
from afloc_engine.prompts import TEMPLATE, finding_key, negative_prompt, validate_prompts
from afloc_engine.transforms import Letterbox

if TYPE_CHECKING:
    from afloc_engine.inference import AFLoc, ImageInput, LocalizationResult

ADAPTER_FORMAT = "afloc-adapter"
ADAPTER_FORMAT_VERSION = 1
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
ADAPTER_METRICS = "metrics.json"


def default_adapter_store() -> Path:
    """The folder both the ``afloc`` CLI and the Slicer module keep adapters in: ``$AFLOC_HOME/adapters``.

    ``$AFLOC_HOME`` defaults to ``~/.cache/afloc`` (see :func:`afloc_engine.registry.afloc_home`).
    ``afloc finetune`` writes ``<store>/<finding>-<timestamp>/`` there unless ``--out`` names
    another folder; the folder need not exist yet.
    """
    from afloc_engine.registry import afloc_home

    return afloc_home() / "adapters"


def finding_slug(finding: str, max_len: int = 40) -> str:
    """'Ground-glass opacity' -> 'ground_glass_opacity' (for folder names)."""
    s = re.sub(r"[^a-z0-9]+", "_", finding.lower()).strip("_")
    return (s or "finding")[:max_len]


def default_prompt(finding: str) -> str:
    """The prompt whose zero-shot heatmap the adapter starts from: 'Findings suggesting {finding}'."""
    return TEMPLATE.format(finding=finding)


def default_head_resolution(image_size: int) -> int:
    """R for a canvas of S px: S / 4, at least 32 (at most S)."""
    return int(min(image_size, max(32, image_size // 4)))


MEMBER_REDUCTIONS = ("median", "mean")


@dataclass
class AdapterConfig:
    """Everything needed to rebuild and apply an adapter (saved in ``adapter.json``).

    head_resolution: the head works on an R x R grid over the S x S canvas (default
    min(S, max(32, S / 4)): 56 for the 224 px default, 32 for small test models). logit_scale k:
    training probability = sigmoid(k * (heatmap - threshold)), so ``heatmap > threshold`` is the mask.
    """

    findings: list[str]
    prompts: list[str]
    head: HeadConfig
    image_size: int
    threshold: float
    similarity: str
    head_resolution: int = 0
    logit_scale: float = 4.0
    unfreeze_last_stage: bool = False
    blend: float = 1.0
    """Weight of the head's correction at inference (chosen by cross-validation on the examples;
    0 = the zero-shot heatmap unchanged)."""
    members: int = 0
    """Extra heads (the leave-one-out fits) whose corrections are combined with the main head's."""
    member_reduce: str = "median"
    """How the main head's and the members' corrections combine, pixel by pixel: ``median`` (one
    wild fit cannot drag the map; the middle two averaged for an even count) or ``mean`` (what
    adapters saved before the median existed use)."""
    training: dict[str, Any] = field(default_factory=dict)
    """What the fine-tuning run did (epochs, views per example, folds run ...)."""
    finetune: dict[str, Any] = field(default_factory=dict)
    """The settings it was asked for: ``FinetuneConfig.to_dict()`` (``FinetuneConfig.from_dict`` reads it back;
    empty for adapters saved before it was recorded)."""

    def __post_init__(self) -> None:
        if self.head_resolution <= 0:
            self.head_resolution = default_head_resolution(self.image_size)
        if self.member_reduce not in MEMBER_REDUCTIONS:
            raise ConfigError(f"member_reduce must be one of {MEMBER_REDUCTIONS}, not {self.member_reduce!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["head"] = self.head.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path | None = None) -> AdapterConfig:
        try:
            data = dict(data)
            data["head"] = HeadConfig(**data["head"])
            data.setdefault("member_reduce", "mean")  # written before the median existed
            return cls(**data)
        except (KeyError, TypeError, ConfigError) as err:
            raise CheckpointError(f"adapter config is invalid: {err}", source) from None


class Adapter:
    """A trained few-shot head for one or more findings of one base model.

    Use with ``model.localize(image, prompts, adapter=adapter)``; prompts naming one of
    ``adapter.findings`` (or equal to one of ``adapter.prompts``) get the adapted heatmap, others
    the zero-shot one.
    """

    def __init__(
        self,
        config: AdapterConfig,
        base_model_id: str,
        head: AdapterHead | None = None,
        stage: TunedStage | None = None,
        example_ids: Sequence[str] = (),
        heldout_ids: Sequence[str] = (),
        created: str | None = None,
        metrics: dict[str, Any] | None = None,
        path: Path | None = None,
        members: Sequence[tuple[AdapterHead, TunedStage | None]] = (),
    ) -> None:
        self.config = config
        self.base_model_id = base_model_id
        self.head = (head or AdapterHead(config.head)).eval()
        self.stage = stage.eval() if stage is not None else None
        self.example_ids = list(example_ids)
        self.heldout_ids = list(heldout_ids)
        self.created = created or datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.metrics = dict(metrics or {})
        self.path = path
        self.members: list[tuple[AdapterHead, TunedStage | None]] = []
        self.set_members(members)

    def set_members(self, members: Sequence[tuple[AdapterHead, TunedStage | None]]) -> None:
        """Heads (with their tuned stage, if any) combined with the main head; ``config.members`` follows."""
        self.members = [(h.eval(), st.eval() if st is not None else None) for h, st in members]
        self.config.members = len(self.members)

    # --- identity ------------------------------------------------------------------------------
    @property
    def findings(self) -> list[str]:
        return list(self.config.findings)

    @property
    def prompts(self) -> list[str]:
        return list(self.config.prompts)

    def __repr__(self) -> str:
        return f"Adapter(findings={self.findings}, base={self.base_model_id!r}, examples={len(self.example_ids)})"

    def check_base(self, model: AFLoc) -> None:
        """Raise :class:`CheckpointError` unless ``model`` is the base model this adapter was trained on."""
        if model.model_id != self.base_model_id:
            raise CheckpointError(
                f"adapter was trained on base model {self.base_model_id!r}, not on {model.model_id!r}; "
                "fine-tune a new adapter for this model",
                self.path,
            )
        if model.config.image_size != self.config.image_size or model.config.embed_dim != self.config.head.embed_dim:
            raise CheckpointError("adapter does not fit this model's image size or embedding width", self.path)

    def match(self, prompts: Sequence[str]) -> list[int | None]:
        """For each prompt, the index of the adapter finding it names (by prompt text or finding), or None."""
        # case, underscores and extra spaces do not count: 'ground glass opacity' names 'ground_glass_opacity'
        by_prompt = {finding_key(p): i for i, p in enumerate(self.config.prompts)}
        by_finding = {finding_key(f): i for i, f in enumerate(self.config.findings)}
        out: list[int | None] = []
        for p in prompts:
            key = finding_key(p)
            idx = by_prompt.get(key)
            if idx is None:
                idx = by_finding.get(key)
            out.append(idx)
        return out

    def to(self, device: torch.device | str) -> Adapter:
        for head, stage in [(self.head, self.stage), *self.members]:
            head.to(device)
            if stage is not None:
                stage.to(device)
        return self

    # --- the head ------------------------------------------------------------------------------
    def correction(
        self,
        shallow: torch.Tensor,
        deep: torch.Tensor,
        zero_shot: torch.Tensor,
        image: torch.Tensor,
        s8: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Heatmap correction (B, F, R, R) from encoder features (B, D, g, g) and head-grid inputs.

        See :class:`AdapterHead`; the features are reduced by each head's PCA first; with members,
        the median (or mean, ``config.member_reduce``) of the main head's and the members' corrections.

        With a tuned last stage, ``s8`` (the frozen stride-8 map) replaces the base deep features.
        """
        corrections = []
        for head, stage in [(self.head, self.stage), *self.members]:
            level = deep
            if stage is not None:
                if s8 is None:
                    raise ValueError("this adapter tunes the last encoder stage and needs the stride-8 features")
                level = stage(s8)
            corrections.append(head(head.reduce(shallow, "shallow"), head.reduce(level, "deep"), zero_shot, image))
        if len(corrections) == 1:
            return corrections[0]
        stacked = torch.stack(corrections)
        return stacked.mean(0) if self.config.member_reduce == "mean" else torch.quantile(stacked, 0.5, dim=0)

    # --- files ---------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Weights to save: ``head.*`` (and ``stage.*``), ``member<i>.head.*`` ..., contiguous CPU float32."""
        state = {}
        for prefix, (head, stage) in zip(self._prefixes(), [(self.head, self.stage), *self.members]):
            state.update({f"{prefix}head.{k}": v for k, v in head.state_dict().items()})
            if stage is not None:
                state.update({f"{prefix}stage.{k}": v for k, v in stage.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in state.items() if not k.endswith("num_batches_tracked")}

    def _prefixes(self) -> list[str]:
        return [""] + [f"member{i}." for i in range(len(self.members))]

    def describe(self) -> dict[str, Any]:
        """The content of ``adapter.json``."""
        from afloc_engine import __version__

        return {
            "format": ADAPTER_FORMAT,
            "format_version": ADAPTER_FORMAT_VERSION,
            "finding": self.config.findings[0] if len(self.config.findings) == 1 else self.config.findings,
            "findings": self.config.findings,
            "prompts": self.config.prompts,
            "base_model_id": self.base_model_id,
            "training_examples": self.example_ids,
            "heldout_examples": self.heldout_ids,
            "created": self.created,
            "engine_version": __version__,
            "config": self.config.to_dict(),
        }

    def folder_name(self) -> str:
        stamp = datetime.fromisoformat(self.created).strftime("%Y%m%d-%H%M%S")
        return "+".join(finding_slug(f) for f in self.config.findings) + f"-{stamp}"

    def save(self, root: str | Path = "adapters", name: str | None = None) -> Path:
        """Write ``root/<finding>-<timestamp>/`` atomically (temp folder renamed at the end). Returns it."""
        from safetensors.torch import save_file

        root = Path(root)
        base = name or self.folder_name()
        final, n = root / base, 1
        while final.exists():
            n += 1
            final = root / f"{base}_{n}"
        tmp = atomic_folder(final)
        try:
            save_file(self.tensors(), str(tmp / ADAPTER_WEIGHTS))
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(self.describe(), indent=2) + "\n")
            (tmp / ADAPTER_METRICS).write_text(json.dumps(self.metrics, indent=2, default=float) + "\n")
            for f in tmp.iterdir():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
            commit_folder(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = final
        return final


def create_adapter(
    model: AFLoc, findings: str | Sequence[str], prompts: Sequence[str] | None = None, **head: Any
) -> Adapter:  # noqa: ANN401
    """An untrained adapter (zero correction): its heatmaps equal the zero-shot ones exactly.

    findings: one name or several; prompts: the zero-shot prompt per finding (default
    'Findings suggesting {finding}'); ``head``: :class:`HeadConfig` fields (width, ...).
    """
    findings = [findings] if isinstance(findings, str) else list(findings)
    findings = [f.strip() for f in findings]
    if not findings or any(not f for f in findings):
        raise PromptError("give at least one non-empty finding name")
    if len({f.lower() for f in findings}) != len(findings):
        raise PromptError(f"findings are repeated: {findings}")
    prompts = validate_prompts(list(prompts)) if prompts else [default_prompt(f) for f in findings]
    if len(prompts) != len(findings):
        raise PromptError(f"give one prompt per finding ({len(findings)} findings, {len(prompts)} prompts)")
    c = model.config
    config = AdapterConfig(
        findings=findings,
        prompts=prompts,
        head=HeadConfig(embed_dim=c.embed_dim, n_findings=len(findings), **head),
        image_size=c.image_size,
        threshold=c.threshold,
        similarity=c.similarity,
    )
    return Adapter(config, model.model_id)


def load_adapter(path: str | Path, model: AFLoc | None = None, prompts: Sequence[str] | None = None) -> Adapter:
    """Read an adapter folder (``adapter.json`` + ``adapter.safetensors``); with ``model``, check it is the base.

    ``path`` may also be a folder of adapters (the store, or an ``afloc finetune --out`` folder): the
    newest adapter of ``model`` for the finding ``prompts`` name is read (:func:`resolve_adapter`).
    Raises :class:`CheckpointError` naming the file for a missing, corrupt or foreign adapter, or a
    folder of adapters holding none (or more than one newest) for these prompts.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    if folder.is_dir() and not (folder / ADAPTER_CONFIG).is_file() and list_adapters(folder):
        folder = resolve_adapter(folder, prompts, model.model_id if model is not None else None)
    cfg_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not folder.is_dir():
        raise CheckpointError("adapter folder not found", folder)
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"no {p.name} in the adapter folder", folder)
    try:
        meta = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"adapter config is not valid JSON: {err}", cfg_path) from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f'not an AFLoc adapter (expected "format": "{ADAPTER_FORMAT}")', cfg_path)
    if int(meta.get("format_version", 0)) > ADAPTER_FORMAT_VERSION:
        raise CheckpointError(f"written by a newer afloc_engine (format {meta['format_version']})", cfg_path)
    config = AdapterConfig.from_dict(meta.get("config", {}), cfg_path)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"corrupt adapter weights: {err}", weights_path) from None
    head = AdapterHead(config.head)
    stage = None
    if config.unfreeze_last_stage:
        if model is None:
            raise _stage_error(folder)
        stage = TunedStage.from_encoder(model.model.image_encoder)
    _load_module(head, state, "head.", weights_path)
    if stage is not None:
        _load_module(stage, state, "stage.", weights_path)
    members = []
    for i in range(config.members):
        member_head, member_stage = AdapterHead(config.head), None
        _load_module(member_head, state, f"member{i}.head.", weights_path)
        if stage is not None:
            member_stage = TunedStage.from_encoder(model.model.image_encoder)
            _load_module(member_stage, state, f"member{i}.stage.", weights_path)
        members.append((member_head, member_stage))
    metrics = {}
    if (folder / ADAPTER_METRICS).is_file():
        try:
            metrics = json.loads((folder / ADAPTER_METRICS).read_text())
        except (OSError, json.JSONDecodeError):
            metrics = {}
    adapter = Adapter(
        config,
        str(meta.get("base_model_id", "")),
        head,
        stage,
        meta.get("training_examples", []),
        meta.get("heldout_examples", []),
        meta.get("created"),
        metrics,
        folder,
        members,
    )
    if model is not None:
        adapter.check_base(model)
        adapter.to(model.device)
    return adapter


def _stage_error(folder: Path) -> CheckpointError:
    return CheckpointError(
        "this adapter tunes the encoder's last stage: load it with its base model, load_adapter(path, model)", folder
    )


def _load_module(module: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str, source: Path) -> None:
    own = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    mine = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = sorted(set(own) - set(mine)), sorted(set(mine) - set(own))
    if missing or unexpected:
        what = f"missing {prefix}{missing[0]}" if missing else f"unexpected {prefix}{unexpected[0]}"
        raise CheckpointError(f"adapter weights do not match its config ({what})", source)
    for k, v in mine.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"adapter weight {prefix}{k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}", source
            )
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in mine.items()}, strict=False)


# --- the store -----------------------------------------------------------------------------------
def list_adapters(store: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """The adapter folders directly inside ``store`` with their ``adapter.json``, newest first.

    Folders whose ``adapter.json`` is missing, unreadable or not an AFLoc adapter, and hidden
    (temporary) folders, are left out. Order: ``created`` (ISO time, UTC), then folder name.
    """
    store = Path(store)
    found = []
    if not store.is_dir():
        return found
    for folder in store.iterdir():
        cfg = folder / ADAPTER_CONFIG
        if folder.name.startswith(".") or not cfg.is_file():
            continue
        try:
            meta = json.loads(cfg.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(meta, dict) and meta.get("format") == ADAPTER_FORMAT:
            found.append((folder, meta))
    found.sort(key=lambda fm: (_created(fm[1]), fm[0].name), reverse=True)
    return found


def _created(meta: dict[str, Any]) -> datetime:
    try:
        t = datetime.fromisoformat(str(meta.get("created")))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _meta_matches(meta: dict[str, Any], prompts: Sequence[str]) -> bool:
    """Whether one of ``prompts`` names one of the adapter's findings (as :meth:`Adapter.match`)."""
    own = {finding_key(str(t)) for t in [*meta.get("prompts", []), *meta.get("findings", [])]}
    return any(finding_key(p) in own for p in prompts)


def resolve_adapter(path: str | Path, prompts: Sequence[str] | None = None, base_model_id: str | None = None) -> Path:
    """The adapter folder to use for ``path``: itself when it holds ``adapter.json``, else, for a folder of
    adapters (e.g. :func:`default_adapter_store` or an ``afloc finetune --out`` folder), the newest adapter
    whose finding one of ``prompts`` names (any adapter without prompts), of ``base_model_id`` when given.

    Raises :class:`CheckpointError` (one line naming the folder) when the folder does not exist, holds no
    such adapter, or when the choice is ambiguous: the prompts name findings of different adapters, or
    two matching adapters were created in the same second.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError("adapter folder not found", folder)
    if (folder / ADAPTER_CONFIG).is_file():
        return folder
    adapters = list_adapters(folder)
    if not adapters:
        raise CheckpointError(
            f"no {ADAPTER_CONFIG} here and no adapter folder inside: give an adapter folder or a folder of "
            "adapters (afloc finetune --out)",
            folder,
        )
    if base_model_id is not None:
        mine = [(f, m) for f, m in adapters if m.get("base_model_id") == base_model_id]
        if not mine:
            others = sorted({str(m.get("base_model_id")) for _, m in adapters})
            raise CheckpointError(
                f"no adapter for base model {base_model_id!r} here (only for {', '.join(others)})", folder
            )
        adapters = mine
    if prompts is not None:
        matching = [(f, m) for f, m in adapters if _meta_matches(m, prompts)]
        if not matching:
            have = sorted({"+".join(m.get("findings", [])) for _, m in adapters})
            raise CheckpointError(
                f"no adapter here for the findings these prompts name (adapters here: {', '.join(have)})", folder
            )
        adapters = matching
    kinds = sorted({"+".join(str(f).lower() for f in m.get("findings", [])) for _, m in adapters})
    if len(kinds) > 1:
        raise CheckpointError(
            f"ambiguous: the prompts name findings of different adapters ({', '.join(kinds)}); give one adapter folder",
            folder,
        )
    if len(adapters) > 1 and _created(adapters[0][1]) == _created(adapters[1][1]):
        raise CheckpointError(
            f"ambiguous: {adapters[0][0].name} and {adapters[1][0].name} were created at the same time; "
            "give one adapter folder",
            folder,
        )
    return adapters[0][0]


def fallback_reason(adapter: Adapter) -> str | None:
    """Why the adapter leaves the zero-shot heatmap unchanged (its weight ``blend`` is 0), or None when it
    does not: a plain clause for results.json, the CLI and the Slicer log (that the zero-shot map is kept is
    said beside it: ``zero_shot_fallback``)."""
    if adapter.config.blend != 0:
        return None
    validation = adapter.metrics.get("validation") or {}
    scores = validation.get("dice_by_blend") or {}
    if scores:
        best_other = max((v for k, v in scores.items() if float(k) != 0), default=None)
        detail = f" (Dice {scores.get('0', validation.get('zero_shot_dice'))} at weight 0"
        detail += f", at most {best_other} with the correction)" if best_other is not None else ")"
        return (
            "the leave-one-out fits did not beat the zero-shot heatmap on their left-out examples"
            + detail
            + "; more or more representative masks may help"
        )
    return "its correction weight was set to 0"


def adapter_usage(adapter: Adapter, prompts: Sequence[str]) -> dict[str, Any]:
    """What ``results.json`` says about the adapter a run used: its folder and name, findings, base model,
    created, the correction's weight, whether it fell back to the zero-shot map and why, the prompts it
    changed, the number of training examples and its fine-tuning warnings."""
    matches = adapter.match(list(prompts))
    reason = fallback_reason(adapter)
    return {
        "path": str(adapter.path) if adapter.path is not None else None,
        "name": adapter.path.name if adapter.path is not None else None,
        "findings": adapter.findings,
        "base_model_id": adapter.base_model_id,
        "created": adapter.created,
        "weight": float(adapter.config.blend),
        "zero_shot_fallback": reason is not None,
        "fallback_reason": reason,
        "prompts": [p for p, m in zip(prompts, matches) if m is not None],
        "training_examples": len(adapter.example_ids),
        "warnings": list(adapter.metrics.get("warnings", [])),
    }


def adapter_note(usage: dict[str, Any], short: bool = False) -> str:
    """One line for the CLI summary: ``adapter NAME, weight 0.5`` or ``adapter NAME: weight 0, zero-shot
    map kept (REASON)``; ``short`` (an overlay title): ``adapter w=0.5`` or ``adapter w=0: zero-shot``."""
    if short:
        return "adapter w=0: zero-shot" if usage.get("zero_shot_fallback") else f"adapter w={usage['weight']:g}"
    name = usage.get("name") or "(unsaved)"
    if usage.get("zero_shot_fallback"):
        return f"adapter {name}: weight 0, zero-shot map kept ({usage.get('fallback_reason')})"
    return f"adapter {name}, weight {usage['weight']:g}"


# --- inference ---------------------------------------------------------------------------------
def localize_with_adapter(
    model: AFLoc,
    adapter: Adapter | str | Path,
    images: list[ImageInput],
    prompts: list[str] | str,
    threshold: float | None = None,
    similarity: str | None = None,
    negative_prompts: list[str] | None = None,
) -> list[LocalizationResult]:
    """:meth:`AFLoc.localize_batch` with an adapter: the adapter's findings get corrected heatmaps.

    ``adapter``: an :class:`Adapter`, its folder, or a folder of adapters (the newest for the
    prompts' finding is used). Each result's ``adapter`` field records which adapter was used, its
    weight, and whether (and why) it kept the zero-shot map (:func:`adapter_usage`).

    The zero-shot heatmaps come from the unchanged base path (one encoder pass, whose features the
    head reuses); heatmap = clip(zero-shot + blend * correction, -1, 1); masks = heatmap > threshold.
    Probabilities are the zero-shot ones. Raises :class:`CheckpointError` for another base model,
    :class:`PromptError` when no prompt names one of the adapter's findings.
    """
    prompts = validate_prompts(prompts)
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter, model, prompts)
    adapter.check_base(model)
    matches = adapter.match(prompts)
    if all(m is None for m in matches):
        raise PromptError(
            f"no prompt names the adapter's finding(s) {adapter.findings}; use e.g. {adapter.prompts[0]!r}",
            adapter.path,
        )
    if similarity is not None and similarity != adapter.config.similarity:
        raise ConfigError(f"this adapter was trained on {adapter.config.similarity} similarity maps, not {similarity}")
    # every finding's zero-shot map is a head input, so all of them are computed (not only those asked for)
    extra = [p for p in adapter.prompts if p not in prompts]
    all_prompts = prompts + extra
    all_negatives = None
    if negative_prompts:
        all_negatives = validate_prompts(negative_prompts) + [negative_prompt(p) for p in extra]
    base, corrections = _base_and_corrections(model, adapter, images, all_prompts, threshold, all_negatives)
    zs_index = [all_prompts.index(p) for p in adapter.prompts]
    usage = adapter_usage(adapter, prompts)
    out = []
    for r, delta in zip(base, corrections):
        heat = r.heatmaps[: len(prompts)].copy()
        for p, j in enumerate(matches):
            if j is not None:
                refined = r.heatmaps[zs_index[j]] + adapter.config.blend * delta[j]
                heat[p] = np.clip(refined, -1.0, 1.0).astype(np.float32)
        out.append(
            dataclasses.replace(
                r,
                prompts=list(prompts),
                heatmaps=heat,
                masks=heat > r.threshold,
                probabilities=r.probabilities[: len(prompts)],
                negative_prompts=r.negative_prompts[: len(prompts)],
                adapter=usage,
            )
        )
    return out


def adapter_components(model: AFLoc, adapter: Adapter, images: list[ImageInput]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image, (zero-shot heatmaps, the head's correction), each (F, H, W) float32 for the adapter's
    findings on the image grid, neither weighted by ``blend`` nor clipped: the adapted heatmap is
    ``clip(zero_shot + blend * correction, -1, 1)``. One encoder pass serves every blend weight."""
    adapter.check_base(model)
    base, corrections = _base_and_corrections(model, adapter, images, adapter.prompts, None, None)
    return [(r.heatmaps.astype(np.float32), c) for r, c in zip(base, corrections)]


def _base_and_corrections(
    model: AFLoc,
    adapter: Adapter,
    images: list[ImageInput],
    prompts: list[str],
    threshold: float | None,
    negative_prompts: list[str] | None,
) -> tuple[list[LocalizationResult], list[np.ndarray]]:
    """Zero-shot results for ``prompts`` (which include every adapter prompt) and, per image, the
    head's correction (F, H, W) on the image grid, from one encoder pass whose features the head reuses."""
    adapter.to(model.device)
    want_s8 = adapter.stage is not None
    with tap_encoder(model.model.image_encoder, want_s8) as tap:
        base = model.localize_batch(images, prompts, threshold, adapter.config.similarity, negative_prompts)
    if tap.features is None or tap.inputs is None or tap.inputs.shape[0] != len(base) or (want_s8 and tap.s8 is None):
        # the base path did not go through the encoder's __call__: encode again
        batch = torch.stack([model.prepare(r.image)[0] for r in base]).to(model.device)
        tap = encode(model.model.image_encoder, batch, want_s8)
    res = adapter.config.head_resolution
    zs_index = [prompts.index(p) for p in adapter.prompts]
    corrections = []
    with torch.inference_mode():
        head_image = image_channel(tap.inputs, res)
        for i, r in enumerate(base):
            h, w = r.heatmaps.shape[-2:]
            box = Letterbox.fit(h, w, model.config.image_size)
            zs = torch.from_numpy(r.heatmaps[zs_index]).to(model.device)
            zs_head = image_maps_to_head(zs, box, res)[None]
            s8 = tap.s8[i : i + 1].float() if want_s8 else None
            delta = adapter.correction(
                tap.features.shallow[i : i + 1].float(),
                tap.features.deep[i : i + 1].float(),
                zs_head,
                head_image[i : i + 1],
                s8,
            )[0]
            corrections.append(correction_to_image(delta, box).float().cpu().numpy())
    return base, corrections
