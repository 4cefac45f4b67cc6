"""TrainConfig: the whole training recipe, read from YAML or JSON; unknown keys are errors.

Sections (every key optional; the defaults are the reference recipe)::

    model:    AFLocConfig keys (backbone, embed_dim, loss weights = level switches, taus, ...)
    init:     a model folder to start from (null: fresh weights)
    data:     train / val sources, the prepared store, masks for localisation metrics
    augment:  MONAI image augmentation and report sentence sub-sampling
    optim:    Adam(2e-5, betas (0.5, 0.999), wd 1e-6), x0.9 per epoch, clip 0.25, batch 128
    freeze:   frozen text encoder, first text layers, first image stages, batch-norm statistics
    runtime:  device, bf16, channels_last, torch.compile, workers, seed
    log:      metrics, checkpoints, validation
    fvlm:     false-negative calibration of the contrastive targets (none | soft)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afloc_engine.config import AFLocConfig
from afloc_engine.errors import ConfigError

SOURCE_FORMATS = ("manifest", "store", "mimic", "covid", "nih", "iu")


@dataclass
class SourceConfig:
    """One data source. ``format``: manifest (CSV/JSONL), store (a prepared folder), mimic, covid, nih, iu."""

    format: str = "manifest"
    path: str = ""
    """Manifest file, store folder, or the dataset's root folder (iu: the reports .tgz, "" = torchxrayvision's)."""
    root: str | None = None
    """Folder that relative image paths of a manifest start from (default: the manifest's folder)."""
    split: str | None = None
    """Keep only rows of this split (``train``, ``val``, ``dev``, ...); None keeps all rows."""
    limit: int | None = None
    """Keep at most this many rows (quick experiments)."""


@dataclass
class DataConfig:
    """Where the pairs come from, the prepared store, the masks dataset and the loader workers."""

    train: list[SourceConfig] = field(default_factory=list)
    val: list[SourceConfig] = field(default_factory=list)
    """Held-out pairs for retrieval recall@k; empty: ``val_fraction`` of the training patients."""
    val_fraction: float = 0.0
    store_size: int = 256
    """Side of the square letterboxed uint8 images in the prepared store (>= model.image_size)."""
    store: str | None = None
    """Where ``prepare`` writes the store (default: ``<run>/store``); reused when it matches."""
    masks: str | None = None
    """covid-cxr root: localisation metrics (IoU, CNR) on its dev split each epoch."""
    text_negatives: list[SourceConfig] = field(default_factory=list)
    """Text-only reports (e.g. ``format: iu``) added as extra negatives on the image->text side."""
    negatives_per_step: int = 0
    """How many text-only reports join each step (0: off)."""
    workers: int = 2
    """DataLoader worker processes (0: load in the training process)."""
    prepare_workers: int = 2


@dataclass
class TrainAugmentConfig:
    """The trainer's image augmentation (MONAI) and report augmentation (sentence sub-sampling and
    shuffling). (Few-shot fine-tuning has its own: :class:`afloc_engine.finetune.FinetuneAugmentConfig`.)"""

    image: bool = True
    crop_scale: tuple[float, float] = (0.8, 1.0)
    """Random resized crop: fraction of the store image's area kept."""
    rotate_deg: float = 5.0
    translate: float = 0.05
    """Fraction of the image side."""
    scale: float = 0.05
    contrast_gamma: tuple[float, float] = (0.8, 1.25)
    intensity_shift: float = 0.05
    text: bool = True
    keep_fraction: float = 0.7
    """Text augmentation: keep this fraction of the sentences (at least one), shuffled."""


@dataclass
class OptimConfig:
    """The optimiser recipe; defaults are the reference (Adam 2e-5, x0.9 per epoch, batch 128, clip 0.25)."""

    lr: float = 2e-5
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 1e-6
    gamma: float = 0.9
    """Learning rate x gamma after each epoch (StepLR)."""
    epochs: int = 5
    batch_size: int = 128
    """Global batch: the pairs whose negatives are shared (across all processes)."""
    accumulate: int = 1
    """Gradient accumulation: optimizer steps every this many batches."""
    grad_clip: float = 0.25
    """Clip the gradient norm to this (0: off)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (smoke tests, benchmarks)."""
    dropout: float | None = None
    """Override the dropout probability of every dropout layer (None keeps the model's)."""
    loss_chunk: int | None = None
    """Reports per chunk of the local losses (None: automatic, memory-bounded)."""


@dataclass
class FreezeConfig:
    """What stays fixed during training."""

    text_encoder: bool = False
    """Freeze the whole transformer (its projection still trains); the checkpoint then omits it."""
    text_layers: int = 0
    """Freeze the embeddings and the first N transformer layers."""
    image_stages: int = 0
    """Freeze the image stem and the first N of its 4 stages."""
    batchnorm: bool = False
    """Keep batch-norm layers in eval mode (running statistics; small batches, exact DDP parity)."""


@dataclass
class RuntimeConfig:
    """Device, precision and speed settings."""

    device: str = "auto"
    """auto, cpu, cuda or cuda:N (under torchrun each process takes cuda:LOCAL_RANK)."""
    precision: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32."""
    channels_last: bool = True
    compile: bool = False
    """torch.compile the image encoder and the local-loss kernel (GPU)."""
    compile_text: bool = False
    """Also torch.compile the text transformer (dynamic sequence length; not yet measured on a GPU)."""
    seed: int = 0
    sync_batchnorm: bool = True
    """SyncBatchNorm under multi-GPU DDP (batch statistics over the global batch)."""
    deterministic: bool = False


@dataclass
class LogConfig:
    """Metrics, checkpoints and validation."""

    every: int = 10
    """Write a metrics row every this many optimizer steps."""
    checkpoint_every: int = 0
    """Also checkpoint every this many optimizer steps (0: at the end of each epoch only)."""
    keep: int = 2
    """Checkpoints kept (the newest)."""
    recall_k: tuple[int, ...] = (1, 5, 10)
    tensorboard: bool = True
    prompts: dict[str, str] = field(
        default_factory=lambda: {
            "ground_glass_opacity": "Findings suggesting ground glass opacity",
            "consolidation": "Findings suggesting consolidation",
        }
    )
    """Mask class -> localisation prompt for the masks dataset."""


@dataclass
class FVLMConfig:
    """fVLM false-negative calibration of the patient-level losses (issue 8; :mod:`training.fvlm`)."""

    false_negative: str = "none"
    """``none`` (identity targets), ``soft`` (report pairs that are both normal or share a disease label
    become soft positives) or ``masked`` (those pairs leave the softmax as negatives)."""
    organs: tuple[str, ...] = ()
    """Organs of the keyword map used to qualify disease labels (empty: every organ of the map)."""
    keywords: str | None = None
    """A JSON/YAML anatomy keyword map (organ -> words); null: the built-in map."""
    disease_keywords: tuple[str, ...] = ()
    """Words that label a sentence with a disease (empty: the built-in list)."""


@dataclass
class TrainConfig:
    """The whole training configuration (see the module docstring for its sections)."""

    model: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    augment: TrainAugmentConfig = field(default_factory=TrainAugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    log: LogConfig = field(default_factory=LogConfig)
    fvlm: FVLMConfig = field(default_factory=FVLMConfig)
    source: str | None = None
    """The file this config was read from (not a setting)."""

    def model_config(self) -> AFLocConfig:
        """The AFLocConfig of the ``model`` section (validated)."""
        return AFLocConfig.from_dict(dict(self.model), self.source)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what config.yaml holds)."""
        data = dataclasses.asdict(self)
        data.pop("source", None)
        return data

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid value (and the config file)."""
        problems = _problems(self)
        if problems:
            raise ConfigError(problems[0], self.source)


def _problems(c: TrainConfig) -> list[str]:
    out = []
    try:
        model = c.model_config()
    except ConfigError as err:
        return [err.problem]
    o = c.optim
    if o.lr <= 0 or o.batch_size < 2 or o.epochs < 1 or o.accumulate < 1:
        out.append("optim: lr > 0, batch_size >= 2, epochs >= 1 and accumulate >= 1 are required")
    if not (0 < o.gamma <= 1) or o.grad_clip < 0 or o.weight_decay < 0:
        out.append("optim: 0 < gamma <= 1, grad_clip >= 0 and weight_decay >= 0 are required")
    if o.max_steps is not None and o.max_steps < 1:
        out.append("optim.max_steps must be >= 1 or null")
    if o.dropout is not None and not 0 <= o.dropout < 1:
        out.append("optim.dropout must be in [0, 1)")
    if model.weight_word == model.weight_sentence == model.weight_global == 0:
        out.append("model: every loss weight is 0; switch on at least one level")
    if c.runtime.precision not in ("auto", "bf16", "fp32"):
        out.append(f"runtime.precision must be auto, bf16 or fp32, not {c.runtime.precision!r}")
    dev = c.runtime.device
    if not (dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:")):
        out.append(f"runtime.device must be auto, cpu, cuda or cuda:N, not {dev!r}")
    d = c.data
    for kind, sources in (("train", d.train), ("val", d.val), ("text_negatives", d.text_negatives)):
        for s in sources:
            if s.format not in SOURCE_FORMATS:
                out.append(f"data.{kind}: unknown format {s.format!r} (use {', '.join(SOURCE_FORMATS)})")
            if s.format != "iu" and not s.path:
                out.append(f"data.{kind}: a {s.format} source needs a path")
    if not d.train:
        out.append("data.train lists no source")
    if not 0 <= d.val_fraction < 1:
        out.append("data.val_fraction must be in [0, 1)")
    if d.store_size < model.image_size:
        out.append(f"data.store_size ({d.store_size}) must be >= model.image_size ({model.image_size})")
    if d.negatives_per_step < 0 or d.workers < 0:
        out.append("data.negatives_per_step and data.workers must be >= 0")
    if d.negatives_per_step and not d.text_negatives:
        out.append("data.negatives_per_step > 0 needs data.text_negatives sources")
    a = c.augment
    if not (0 < a.crop_scale[0] <= a.crop_scale[1] <= 1) or not 0 < a.keep_fraction <= 1:
        out.append("augment: 0 < crop_scale[0] <= crop_scale[1] <= 1 and 0 < keep_fraction <= 1 are required")
    if c.freeze.text_layers < 0 or not 0 <= c.freeze.image_stages <= 4:
        out.append("freeze: text_layers >= 0 and 0 <= image_stages <= 4 are required")
    if c.fvlm.false_negative not in ("none", "soft", "masked"):
        out.append(f"fvlm.false_negative must be none, soft or masked, not {c.fvlm.false_negative!r}")
    if c.log.every < 1 or c.log.keep < 1 or c.log.checkpoint_every < 0 or not c.log.recall_k:
        out.append("log: every >= 1, keep >= 1, checkpoint_every >= 0 and a non-empty recall_k are required")
    return out


# --- reading ---------------------------------------------------------------------------------
def _build(cls: type, data: Any, where: str, source: str | None) -> Any:  # noqa: ANN401
    """Dataclass ``cls`` from a dict, recursively; unknown keys raise ConfigError naming them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, not {type(data).__name__}", source)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields) - {"source"})
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}", source)
    kwargs = {}
    for name, value in data.items():
        if name == "source":
            continue
        f = fields[name]
        sub = f"{where}.{name}" if where else name
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value or {}, sub, source)
        elif name in ("train", "val", "text_negatives"):
            if isinstance(value, dict):
                value = [value]
            if not isinstance(value, list):
                raise ConfigError(f"{sub} must be a list of sources", source)
            kwargs[name] = [_build(SourceConfig, v, f"{sub}[{i}]", source) for i, v in enumerate(value)]
        elif isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{sub} must be a list, not {value!r}", source)
            kwargs[name] = tuple(value)
        elif name == "model":
            if not isinstance(value, dict):
                raise ConfigError("model must be a mapping of AFLocConfig keys", source)
            kwargs[name] = dict(value)
        else:
            kwargs[name] = _check_scalar(value, default, sub, source)
    return cls(**kwargs)


def _check_scalar(value: Any, default: Any, where: str, source: str | None) -> Any:  # noqa: ANN401
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {value!r}", source)
    elif isinstance(default, (int, float)):
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, not {value!r}", source)
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(f"{where} must be an integer, not {value!r}", source)
            value = int(value)
    elif isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, not {value!r}", source)
    return value


def config_from_dict(data: dict[str, Any], source: str | Path | None = None) -> TrainConfig:
    """Build and validate a TrainConfig; errors name the key and the file."""
    src = None if source is None else str(source)
    config = _build(TrainConfig, data, "", src)
    config.source = src
    config.validate()
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML (``.yaml``/``.yml``) or JSON config; ``overrides`` are ``section.key=value`` strings."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", path)
    try:
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"cannot parse config: {err}", path) from None
    except Exception as err:  # yaml.YAMLError and friends
        raise ConfigError(f"cannot parse config: {err}", path) from None
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping of sections", path)
    apply_overrides(data, overrides or [], path)
    return config_from_dict(data, path)


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str | Path | None = None) -> None:
    """Set ``a.b.c=value`` (value parsed as YAML) in a nested dict, in place."""
    import yaml

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not section.key=value", source)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section", source)
        node[parts[-1]] = yaml.safe_load(raw)


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    import yaml

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(_plain(config.to_dict()), sort_keys=False))
    tmp.replace(path)


def _plain(value: Any) -> Any:  # noqa: ANN401
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
