"""The trainer: AFLoc contrastive training on one process or many (torchrun), resumable exactly.

Run folder::

    <run>/config.yaml           the resolved configuration
    <run>/log.txt               data summary, skipped rows (with reasons), validation results
    <run>/metrics.csv           step, epoch, losses, lr, pairs/s (every ``log.every`` steps)
    <run>/validation.csv        per epoch: recall@k, localisation metrics
    <run>/events/               TensorBoard event files
    <run>/store/                the prepared image store (unless ``data.store`` names another)
    <run>/checkpoints/          step-XXXXXXXX folders + LATEST (see :mod:`training.state`)
    <run>/model/                the final model folder (``afloc localize --model <run>/model``)

Hooks (fVLM, issue 8): ``Trainer(config, run_dir, target_fn=..., extra_losses=(...))``; the config's
``fvlm.false_negative: soft|masked`` installs :class:`training.fvlm.DiseaseAwareTargets` as ``target_fn``.
``target_fn(ctx: BatchContext) -> (B, B) tensor | None`` gives soft contrastive targets for the
global batch (rows: images, columns: reports; each row sums to 1); ``extra_losses`` are callables
``fn(out: StepOutputs) -> tensor | dict[str, tensor]`` whose values are added to the loss (per
process, averaged across processes by DDP) and logged as ``extra_<name>``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from afloc_engine.checkpoint import ModelInfo, load_model_folder
from afloc_engine.config import AFLocConfig
from afloc_engine.errors import AFLocError, CheckpointError, ConfigError, DataError
from afloc_engine.losses import SAVE_ELEMENTS, AFLocLoss, AFLocLosses
from afloc_engine.models import AFLocModel, ImageFeatures, TextFeatures, TokenizedReports
from afloc_engine.progress import Progress, emit
from training import distributed as D
from training.config import SourceConfig, TrainConfig, save_config
from training.data import PairRecord, load_source, split_by_patient
from training.dataset import Batch, Collate, GlobalBatchSampler, PairDataset, sample_seed, tokens_to
from training.loss import training_loss
from training.state import (
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    rank_rng,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from training.store import Store, prepare_store

log = logging.getLogger(__name__)


@dataclass
class BatchContext:
    """What a target function sees of the global batch (all processes, in rank order).

    texts: B report texts (before augmentation); indices: (B,) store indices; records: B records.
    """

    texts: list[str]
    indices: torch.Tensor
    records: list[PairRecord]
    device: torch.device


@dataclass
class StepOutputs:
    """What an extra loss sees: this process's features and batch, the global context, the model."""

    image: ImageFeatures
    text: TextFeatures
    batch: Batch
    context: BatchContext
    model: AFLocModel
    losses: AFLocLosses
    dist: D.DistInfo


TargetFn = Callable[[BatchContext], "torch.Tensor | None"]
ExtraLoss = Callable[[StepOutputs], "torch.Tensor | dict[str, torch.Tensor]"]


class _Net(nn.Module):
    """The forward DDP wraps: images and reports (and optional text-only negatives) -> features."""

    def __init__(self, model: AFLocModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: torch.Tensor, tokens: TokenizedReports, extra: TokenizedReports | None = None
    ) -> tuple[ImageFeatures, TextFeatures, TextFeatures | None]:
        image = self.model.encode_images(images)
        text = self.model.encode_text(tokens)
        extra_text = self.model.encode_text(extra) if extra is not None else None
        return image, text, extra_text


def resolve_train_device(name: str, dist_info: D.DistInfo, source: str | None = None) -> torch.device:
    """The device of this process; a GPU asked for where none exists is a ConfigError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"runtime.device {name!r} requested but no CUDA GPU is available", source)
        if name == "cuda":
            return torch.device("cuda", dist_info.local_rank if dist_info.enabled else 0)
        index = int(name.split(":", 1)[1])
        if index >= torch.cuda.device_count():
            raise ConfigError(f"runtime.device {name!r}: only {torch.cuda.device_count()} GPU(s)", source)
        return torch.device(name)
    return torch.device("cpu")


def check_data_paths(config: TrainConfig) -> None:
    """Every configured data path exists (one clear error before any work)."""
    sources: list[tuple[str, SourceConfig]] = [("data.train", s) for s in config.data.train]
    sources += [("data.val", s) for s in config.data.val]
    sources += [("data.text_negatives", s) for s in config.data.text_negatives]
    for where, s in sources:
        if s.format == "iu" and not s.path:
            continue
        if not Path(s.path).exists():
            raise DataError(f"{where}: data path not found", s.path)
        if s.root and not Path(s.root).is_dir():
            raise DataError(f"{where}: data root not found", s.root)
    if config.data.masks and not (Path(config.data.masks) / "masks.csv").is_file():
        raise DataError("data.masks: no masks.csv in the masks dataset root", config.data.masks)
    if config.init and not Path(config.init).is_dir():
        raise CheckpointError("init: model folder not found", config.init)


def load_records(sources: list[SourceConfig]) -> tuple[list[PairRecord], list[tuple[str, str]]]:
    """Records of several sources, concatenated, with every skipped row."""
    records, skipped = [], []
    for s in sources:
        r, k = load_source(s.format, s.path, s.root, s.split, s.limit)
        records += r
        skipped += k
    return records, skipped


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs :meth:`fit`."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | Path,
        resume: bool = False,
        progress: str = "bar",
        target_fn: TargetFn | None = None,
        extra_losses: Iterable[ExtraLoss] = (),
    ) -> None:
        config.validate()
        self.config = config
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.progress_mode = progress
        if config.fvlm.false_negative != "none":
            if target_fn is not None:
                raise ConfigError("fvlm.false_negative is set and a target_fn was given: use one", config.source)
            from training.fvlm import DiseaseAwareTargets

            f = config.fvlm
            try:
                target_fn = DiseaseAwareTargets(f.organs, f.keywords, f.disease_keywords, mode=f.false_negative)
            except ConfigError as err:
                raise ConfigError(f"fvlm: {err.problem}", err.path or config.source) from None
        self.target_fn = target_fn
        self.extra_losses = tuple(extra_losses)
        self.model_config: AFLocConfig = config.model_config()

    # --- set-up ------------------------------------------------------------------------------
    def check(self) -> None:
        """Everything that can be checked before any work: data paths, device, run folder."""
        c = self.config
        check_data_paths(c)
        resolve_train_device(c.runtime.device, D.DistInfo(), c.source)
        ckpt = self.run_dir / "checkpoints"
        if self.resume:
            if latest_checkpoint(ckpt) is None:
                raise CheckpointError("--resume: the run folder holds no complete checkpoint", self.run_dir)
        elif latest_checkpoint(ckpt) is not None:
            raise ConfigError("run folder already holds checkpoints: pass --resume, or choose another folder", ckpt)
        if c.optim.batch_size % max(1, int(os.environ.get("WORLD_SIZE", "1"))):
            raise ConfigError("optim.batch_size must be divisible by the number of processes", c.source)

    def _log(self, message: str) -> None:
        log.info(message)
        if self.dist.is_main:
            with (self.run_dir / "log.txt").open("a") as fh:
                fh.write(message.rstrip() + "\n")

    def _load_sources(self) -> None:
        """Read every source (no usable row in one: a DataError before the run folder is made)."""
        c = self.config
        self._train_records = load_records(c.data.train)
        self._val_records = load_records(c.data.val) if c.data.val else ([], [])
        self._negative_records = load_records(c.data.text_negatives) if c.data.negatives_per_step else ([], [])

    def _setup_data(self) -> None:
        c = self.config
        records, skipped = self._train_records
        val_records, val_skipped = self._val_records
        all_records = records + val_records
        store_dir = Path(c.data.store) if c.data.store else self.run_dir / "store"
        if self.dist.is_main:
            prepare_store(all_records, store_dir, c.data.store_size, c.data.prepare_workers, self.progress_mode)
        D.barrier(self.dist)
        self.store = Store(store_dir)
        # the store keeps the input order minus unreadable images: find the validation rows by (id, image)
        val_keys = {(r.id, r.image) for r in val_records}
        train_idx = [i for i, r in enumerate(self.store.records) if (r.id, r.image) not in val_keys]
        val_idx = [i for i, r in enumerate(self.store.records) if (r.id, r.image) in val_keys]
        if not val_records and c.data.val_fraction > 0:
            sub = [self.store.records[i] for i in train_idx]
            keep, held = split_by_patient(sub, c.data.val_fraction, c.runtime.seed)
            train_idx, val_idx = [train_idx[i] for i in keep], [train_idx[i] for i in held]
        if len(train_idx) < c.optim.batch_size:
            raise DataError(
                f"only {len(train_idx)} usable training pairs, fewer than one batch of {c.optim.batch_size}",
                store_dir,
            )
        mc = self.model_config
        common = dict(image_size=mc.image_size, mean=mc.intensity_mean, std=mc.intensity_std, channels=mc.in_channels)
        self.train_set = PairDataset(self.store, train_idx, augment=c.augment, seed=c.runtime.seed, **common)
        self.val_set = (
            PairDataset(self.store, val_idx, augment=None, seed=c.runtime.seed, **common) if val_idx else None
        )
        self.negatives: list[PairRecord] = []
        if c.data.negatives_per_step:
            self.negatives, neg_skipped = self._negative_records
            skipped += neg_skipped
        all_skipped = skipped + val_skipped + [tuple(s) for s in self.store.skipped]
        if self.dist.is_main:
            self._write_skipped(all_skipped)
        self._log(
            f"data: {len(train_idx)} training pairs, {len(val_idx)} validation pairs, "
            f"{len(self.negatives)} text-only negatives, {len(all_skipped)} rows skipped (see skipped.csv)"
        )

    def _write_skipped(self, skipped: list[tuple[str, str]]) -> None:
        with (self.run_dir / "skipped.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["where", "reason"])
            writer.writerows(skipped)
        for where, reason in skipped[:20]:
            self._log(f"skipped: {where}: {reason}")
        if len(skipped) > 20:
            self._log(f"skipped: ... and {len(skipped) - 20} more (skipped.csv)")

    def _build_model(self) -> None:
        c, mc = self.config, self.model_config
        self.init_text_in_checkpoint = False
        if c.init:
            model, info = load_model_folder(c.init)
            # architecture keys must agree; loss switches, taus and sizes may change for the new run
            arch = ("backbone", "spatial_dims", "in_channels", "embed_dim", "text_model", "conv1_stride")
            diff = [k for k in arch if getattr(model.config, k) != getattr(mc, k)]
            if diff:
                raise ConfigError(f"model.{diff[0]} differs from the init model's ({c.init})", c.source)
            model.config = mc
            model.image_encoder.config = mc
            model.text_encoder.config = mc
            self.init_text_in_checkpoint = info.text_weights == "checkpoint"
        else:
            torch.manual_seed(c.runtime.seed)
            model = AFLocModel(mc)
        if c.optim.dropout is not None:
            for m in model.modules():
                if isinstance(m, nn.Dropout):
                    m.p = c.optim.dropout
            tc = model.text_encoder.transformer.config
            for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
                if hasattr(tc, key):
                    setattr(tc, key, c.optim.dropout)
        self.frozen_modules = self._freeze(model)
        self.model = model.to(self.device)
        if c.runtime.channels_last and mc.spatial_dims == 2 and self.device.type == "cuda":
            self.model.image_encoder.to(memory_format=torch.channels_last)
        if self.dist.enabled and self.device.type == "cuda" and c.runtime.sync_batchnorm and not c.freeze.batchnorm:
            self.model.image_encoder = nn.SyncBatchNorm.convert_sync_batchnorm(self.model.image_encoder)
        save_elements = local_loss_save_elements(self.device) if self.device.type == "cuda" else SAVE_ELEMENTS
        self.loss_fn = AFLocLoss.from_config(
            mc, chunk_size=c.optim.loss_chunk, save_elements=save_elements, compile=c.runtime.compile
        )
        if c.runtime.compile:
            self.model.image_encoder.compile()
        if c.runtime.compile_text:
            self.model.text_encoder.transformer.compile(dynamic=True)  # report lengths vary per batch
        net = _Net(self.model)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net: nn.Module = nn.parallel.DistributedDataParallel(net, device_ids=ids, find_unused_parameters=True)
        else:
            self.net = net
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = c.optim
        fused = self.device.type == "cuda"  # one kernel for all parameters
        self.optimizer = torch.optim.Adam(self.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=o.gamma)
        self.collate = Collate(self.model.text_encoder)
        n_train = sum(p.numel() for p in self.params)
        n_all = sum(p.numel() for p in self.model.parameters())
        self._log(f"model: {mc.backbone} + {mc.text_model}, {n_train:,} of {n_all:,} parameters trained")

    def _freeze(self, model: AFLocModel) -> list[nn.Module]:
        """Apply the freeze section; returns modules to keep in eval mode."""
        f, source = self.config.freeze, self.config.source
        frozen: list[nn.Module] = []
        transformer = model.text_encoder.transformer

        def off(module: nn.Module) -> None:
            for p in module.parameters():
                p.requires_grad_(False)
            frozen.append(module)

        if getattr(transformer, "pooler", None) is not None:
            for p in transformer.pooler.parameters():  # AFLoc never uses the pooled output
                p.requires_grad_(False)
        if f.text_encoder:
            off(transformer)
        elif f.text_layers:
            layers = getattr(getattr(transformer, "encoder", None), "layer", None)
            if layers is None or not hasattr(transformer, "embeddings"):
                raise ConfigError("freeze.text_layers: the text model has no embeddings/encoder.layer", source)
            if f.text_layers > len(layers):
                raise ConfigError(f"freeze.text_layers: the text model has only {len(layers)} layers", source)
            off(transformer.embeddings)
            for layer in layers[: f.text_layers]:
                off(layer)
        if f.image_stages:
            backbone = model.image_encoder.backbone
            if not hasattr(backbone, "layer1"):
                raise ConfigError("freeze.image_stages works with ResNet backbones only", source)
            for name in ("conv1", "bn1", *[f"layer{i}" for i in range(1, f.image_stages + 1)]):
                off(getattr(backbone, name))
        if f.batchnorm:
            frozen += [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        return frozen

    def _train_mode(self) -> None:
        self.model.train()
        for m in self.frozen_modules:
            m.eval()

    # --- checkpoints ---------------------------------------------------------------------------
    def _save(self, epoch: int, step_in_epoch: int) -> None:
        states = D.gather_objects(_rng_as_lists(rng_state()), self.dist)  # every rank's RNG, to rank 0
        if not self.dist.is_main:
            return
        folder = self.run_dir / "checkpoints" / f"step-{self.global_step:08d}"
        info = ModelInfo(name=self.run_dir.name, version=f"step{self.global_step}", trained=True)
        progress = {
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": self.global_step,
            "world": self.dist.world,
            "samples": self.samples_seen,
        }
        save_checkpoint(
            folder,
            self.model,
            info,
            self._include_text(),
            self.optimizer,
            self.scheduler,
            progress,
            [_rng_from_lists(s) for s in states],
            self.config.log.keep,
        )

    def _include_text(self) -> bool:
        return not self.config.freeze.text_encoder or self.init_text_in_checkpoint

    def _restore(self) -> tuple[int, int]:
        folder = latest_checkpoint(self.run_dir / "checkpoints")
        if folder is None:
            raise CheckpointError("no complete checkpoint to resume from", self.run_dir / "checkpoints")
        tensors, plain = load_checkpoint(folder, self.model)
        load_optimizer_state(self.optimizer, tensors, plain["optimizer"])
        self.scheduler.load_state_dict(plain["scheduler"])
        p = plain["progress"]
        self.global_step, self.samples_seen = int(p["global_step"]), int(p.get("samples", 0))
        rng = rank_rng(tensors, plain, self.dist.rank) if p.get("world") == self.dist.world else None
        if rng is not None:
            self._resume_rng = rng
        else:
            self._log("resume: different number of processes; RNG streams restart from the seed")
            self._resume_rng = None
        self._log(f"resumed from {folder} (epoch {p['epoch']}, step {self.global_step})")
        return int(p["epoch"]), int(p["step_in_epoch"])

    # --- the loop -------------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train; returns the final model folder (``<run>/model``)."""
        self.check()
        c = self.config
        self.dist = D.init_distributed("cuda" if c.runtime.device.startswith("cuda") else _auto_type(c))
        try:
            return self._fit()
        finally:
            D.shutdown(self.dist)

    def _fit(self) -> Path:
        c = self.config
        self.device = resolve_train_device(c.runtime.device, self.dist, c.source)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = not c.runtime.deterministic
        if c.runtime.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        precision = c.runtime.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        self._load_sources()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "checkpoints").mkdir(exist_ok=True)
            if not self.resume:
                save_config(c, self.run_dir / "config.yaml")
        D.barrier(self.dist)
        self._log(f"run: {self.run_dir} on {self.device} x {self.dist.world} process(es), precision {precision}")
        self._setup_data()
        self._build_model()
        self.global_step, self.samples_seen, self._resume_rng = 0, 0, None
        start_epoch, start_step = self._restore() if self.resume else (0, 0)
        return self._loop(start_epoch, start_step)

    def _loop(self, start_epoch: int, start_step: int) -> Path:
        c = self.config
        o = c.optim
        sampler = GlobalBatchSampler(
            len(self.train_set), o.batch_size, self.dist.rank, self.dist.world, seed=c.runtime.seed
        )
        micro_per_epoch = sampler.steps_per_epoch()
        steps_per_epoch = micro_per_epoch // o.accumulate
        if steps_per_epoch < 1:
            raise DataError(
                f"{len(self.train_set)} training pairs give no optimizer step at batch {o.batch_size} "
                f"x accumulate {o.accumulate}",
                self.store.folder,
            )
        total_steps = steps_per_epoch * o.epochs
        if o.max_steps is not None:
            total_steps = min(total_steps, o.max_steps)
        metrics = _MetricsWriter(self.run_dir, self.dist.is_main, self.global_step, c.log.tensorboard)
        if self._resume_rng is not None:
            set_rng_state(*self._resume_rng)
        epoch = start_epoch
        stop = self.global_step >= total_steps
        while not stop and epoch < o.epochs:
            first = start_step if epoch == start_epoch else 0
            sampler.set_epoch(epoch, first * o.accumulate)
            self.train_set.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                self.train_set,
                batch_sampler=sampler,
                collate_fn=self.collate,
                num_workers=c.data.workers,
                pin_memory=self.device.type == "cuda",
                generator=torch.Generator().manual_seed(c.runtime.seed + epoch),
                persistent_workers=False,
                prefetch_factor=4 if c.data.workers else None,
            )
            remaining = min(steps_per_epoch - first, total_steps - self.global_step)
            bar = Progress(remaining, self.progress_mode if self.dist.is_main else "none", desc=f"epoch {epoch + 1}")
            self._train_mode()
            step_in_epoch, micro = first, 0
            window: dict[str, float] = {}
            t_window, n_window = time.perf_counter(), 0
            for batch in loader:
                sync = (micro + 1) % o.accumulate == 0
                values = self._micro_step(batch, epoch, first * o.accumulate + micro, sync)
                for k, v in values.items():
                    window[k] = window.get(k, 0.0) + v / o.accumulate
                micro += 1
                if not sync:
                    continue
                lr = self.optimizer.param_groups[0]["lr"]
                if o.grad_clip > 0:
                    norm = float(torch.nn.utils.clip_grad_norm_(self.params, o.grad_clip))
                else:
                    norm = float(torch.nn.utils.clip_grad_norm_(self.params, float("inf")))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                step_in_epoch += 1
                self.samples_seen += o.batch_size * o.accumulate
                n_window += o.batch_size * o.accumulate
                if not math.isfinite(window.get("loss", 0.0)):
                    raise AFLocError(f"loss became {window.get('loss')} at step {self.global_step}; lower optim.lr")
                elapsed = time.perf_counter() - t_window
                rate = n_window / elapsed if elapsed > 0 else 0.0
                bar.update(1, loss=window["loss"], pairs_s=round(rate, 1), lr=lr)
                if self.global_step % c.log.every == 0 or self.global_step == total_steps:
                    metrics.train(self.global_step, epoch + 1, {**window, "lr": lr, "grad_norm": norm, "pairs_s": rate})
                window = {}
                if step_in_epoch >= steps_per_epoch or self.global_step >= total_steps:
                    break
                if c.log.checkpoint_every and self.global_step % c.log.checkpoint_every == 0:
                    self._save(epoch, step_in_epoch)
                    t_window, n_window = time.perf_counter(), 0
            bar.close()
            end_of_epoch = step_in_epoch >= steps_per_epoch
            if end_of_epoch:
                self.scheduler.step()
                self._validate(epoch, metrics)
                self._save(epoch + 1, 0)
                epoch += 1
            else:
                self._save(epoch, step_in_epoch)
            stop = self.global_step >= total_steps
        metrics.close()
        final = self.run_dir / "model"
        if self.dist.is_main:
            from afloc_engine.checkpoint import save_model

            info = ModelInfo(
                name=self.run_dir.name,
                version=f"step{self.global_step}",
                trained=True,
                description=f"trained by afloc train ({self.samples_seen} pairs seen)",
            )
            save_model(self.model, final, info, include_text_transformer=self._include_text(), overwrite=True)
            self._log(f"final model: {final}")
            if self.progress_mode == "json":
                emit("done", model=str(final), step=self.global_step)
        D.barrier(self.dist)
        return final

    def _negatives(self, epoch: int, micro: int) -> TokenizedReports | None:
        n = self.config.data.negatives_per_step
        if not n or not self.negatives:
            return None
        rng = random.Random(sample_seed(self.config.runtime.seed, epoch, 1_000_000_000 + micro))
        chosen = rng.sample(self.negatives, k=min(n, len(self.negatives)))
        from afloc_engine.text import split_sentences

        return self.collate.tokenize([split_sentences(r.text) for r in chosen])

    def _context(self, batch: Batch) -> BatchContext:
        texts = sum(D.gather_objects(batch.texts, self.dist), [])
        idx = torch.cat([torch.as_tensor(x) for x in D.gather_objects(batch.indices.tolist(), self.dist)])
        return BatchContext(texts, idx, [self.store.records[int(i)] for i in idx], self.device)

    def _micro_step(self, batch: Batch, epoch: int, micro: int, sync: bool) -> dict[str, float]:
        c = self.config
        fmt = torch.channels_last if c.runtime.channels_last and self.device.type == "cuda" else torch.contiguous_format
        images = batch.images.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
        tokens = tokens_to(batch.tokens, self.device)
        extra = self._negatives(epoch, micro)
        extra = tokens_to(extra, self.device) if extra is not None else None
        need_context = self.target_fn is not None or bool(self.extra_losses)
        context = self._context(batch) if need_context else None
        targets = self.target_fn(context) if self.target_fn is not None else None
        if targets is not None:
            targets = targets.to(self.device, torch.bool if targets.dtype == torch.bool else torch.float32)
        no_sync = self.net.no_sync() if (self.dist.enabled and not sync) else nullcontext()
        with no_sync:
            with self.autocast:
                image, text, extra_text = self.net(images, tokens, extra)
                losses = training_loss(image, text, self.loss_fn, self.dist, targets, extra_text)
                extras: dict[str, torch.Tensor] = {}
                if self.extra_losses:
                    out = StepOutputs(image, text, batch, context, self.model, losses, self.dist)
                    for fn in self.extra_losses:
                        value = fn(out)
                        items = (
                            value.items() if isinstance(value, dict) else [(getattr(fn, "__name__", "extra"), value)]
                        )
                        for name, v in items:
                            extras[name] = v.float()
            # shares of the global-batch loss sum over ranks; DDP averages gradients, hence x world
            total = losses.total.float() * self.dist.world + sum(extras.values(), torch.zeros((), device=self.device))
            (total / c.optim.accumulate).backward()
        parts = torch.stack(
            [losses.total.detach().float(), losses.word.float(), losses.sentence.float(), losses.global_.float()]
        ).detach()
        parts = D.sum_across(parts, self.dist).tolist()
        values = {"loss": parts[0], "word": parts[1], "sentence": parts[2], "global": parts[3]}
        if extras:
            ex = D.sum_across(torch.stack([v.detach() for v in extras.values()]), self.dist) / self.dist.world
            for name, v in zip(extras, ex.tolist()):
                values[f"extra_{name}"] = v
                values["loss"] += v
        return values

    def _validate(self, epoch: int, metrics: _MetricsWriter) -> None:
        if not self.dist.is_main:
            D.barrier(self.dist)
            return
        c = self.config
        results: dict[str, float] = {}
        try:
            if self.val_set is not None and len(self.val_set) > 1:
                from training.validation import retrieval_metrics

                results.update(
                    retrieval_metrics(
                        self.model, self.val_set, self.collate, self.device, c.log.recall_k, autocast=self.autocast
                    )
                )
            if c.data.masks:
                from training.validation import localisation_metrics

                results.update(localisation_metrics(self.model, c.data.masks, c.log.prompts, self.device))
        finally:
            self._train_mode()
        if results:
            metrics.validation(self.global_step, epoch + 1, results)
            self._log(f"validation epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        D.barrier(self.dist)


def local_loss_save_elements(device: torch.device, bytes_per_element: int = 20) -> int:
    """The ``save_elements`` of :class:`AFLocLoss` on a GPU: autograd keeps the local losses'
    intermediates when they fit in its memory (fast), and recomputes chunk by chunk in backward only
    beyond (memory-lean). Returns the element budget (GPU memory / ``bytes_per_element``)."""
    total = torch.cuda.get_device_properties(device).total_memory
    return int(total // bytes_per_element)


def _auto_type(config: TrainConfig) -> str:
    return "cuda" if config.runtime.device == "auto" and torch.cuda.is_available() else "cpu"


def _rng_as_lists(state: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> tuple[dict[str, list], dict]:
    tensors, plain = state
    return {k: v.tolist() for k, v in tensors.items()}, plain


def _rng_from_lists(state: tuple[dict[str, list], dict]) -> tuple[dict[str, torch.Tensor], dict]:
    lists, plain = state
    tensors = {k: torch.tensor(v, dtype=torch.int64 if k == "numpy" else torch.uint8) for k, v in lists.items()}
    return tensors, plain


class _MetricsWriter:
    """metrics.csv / validation.csv (rows after the resumed step are dropped) and TensorBoard events."""

    TRAIN = ["step", "epoch", "loss", "word", "sentence", "global", "lr", "grad_norm", "pairs_s"]

    def __init__(self, run_dir: Path, active: bool, start_step: int, tensorboard: bool) -> None:
        self.active, self.run_dir = active, run_dir
        self.writer = None
        if not active:
            return
        for name in ("metrics.csv", "validation.csv"):
            _truncate_csv(run_dir / name, start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "events"), purge_step=start_step or None)
            except ImportError:
                log.warning("tensorboard is not installed (pip install tensorboard): no event files")

    def _append(self, name: str, row: dict[str, Any]) -> None:
        path = self.run_dir / name
        header = list(row)
        if path.is_file() and path.stat().st_size:
            with path.open(newline="") as fh:
                existing = next(csv.reader(fh), [])
            header = existing + [k for k in row if k not in existing]
            if header != existing:
                _rewrite_header(path, header)
        new = not path.is_file() or path.stat().st_size == 0
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def train(self, step: int, epoch: int, values: dict[str, float]) -> None:
        """One metrics.csv row (and TensorBoard scalars)."""
        if not self.active:
            return
        row = {"step": step, "epoch": epoch, **{k: values.get(k, "") for k in self.TRAIN[2:]}}
        row.update({k: v for k, v in values.items() if k not in row})
        self._append("metrics.csv", row)
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()

    def validation(self, step: int, epoch: int, values: dict[str, float]) -> None:
        """One validation.csv row (and TensorBoard scalars)."""
        if not self.active:
            return
        self._append("validation.csv", {"step": step, "epoch": epoch, **values})
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"val/{k}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _truncate_csv(path: Path, last_step: int) -> None:
    """Keep only rows with step <= ``last_step`` (a resumed run re-logs the steps after it)."""
    if not path.is_file():
        return
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(float(r[0])) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        csv.writer(fh).writerows(kept)
    tmp.replace(path)


def _rewrite_header(path: Path, header: list[str]) -> None:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
