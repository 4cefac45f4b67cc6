"""``afloc train`` (also ``python -m training``): prepare a store, check a config, train.

afloc train prepare --config cfg.yaml [--store DIR]
afloc train check   --config cfg.yaml
afloc train run     --config cfg.yaml --run-dir runs/x [--set optim.lr=1e-5 ...]
afloc train run     --resume --run-dir runs/x          (continues exactly where it stopped)
torchrun --nproc_per_node 8 -m training run --config cfg.yaml --run-dir runs/x
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

from afloc_engine.cli.common import add_progress_argument
from afloc_engine.errors import AFLocError, ConfigError
from afloc_engine.locks import add_wait_argument, folder_lock


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands of ``afloc train``."""
    sub = parser.add_subparsers(dest="train_command", metavar="ACTION")
    sub.required = True

    def common(p: argparse.ArgumentParser, config_required: bool) -> None:
        """--config, --set and --progress."""
        p.add_argument("--config", type=Path, required=config_required, help="YAML or JSON training config")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set optim.lr=1e-5 --set model.weight_word=0",
        )
        add_progress_argument(p)

    p = sub.add_parser("run", help="train (or --resume) into a run folder")
    common(p, config_required=False)
    p.add_argument("--run-dir", type=Path, required=True, help="run folder (config, metrics, checkpoints, model)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    add_wait_argument(p)
    p = sub.add_parser("prepare", help="decode the training images once into a memory-mapped store")
    common(p, config_required=True)
    p.add_argument("--store", type=Path, help="store folder (default: data.store of the config)")
    p = sub.add_parser("check", help="validate a config and its data paths; train nothing")
    common(p, config_required=True)


def _config(args: argparse.Namespace):  # noqa: ANN202 (TrainConfig)
    from training.config import load_config

    if args.config is not None:
        return load_config(args.config, args.overrides)
    if getattr(args, "resume", False):
        saved = args.run_dir / "config.yaml"
        if not saved.is_file():
            raise ConfigError("--resume: the run folder has no config.yaml", args.run_dir)
        return load_config(saved, args.overrides)
    raise ConfigError("give --config (or --resume with an existing --run-dir)")


def run(args: argparse.Namespace) -> int:
    """Run one ``afloc train`` action; returns the exit code."""
    config = _config(args)
    if args.train_command == "check":
        from training.distributed import DistInfo
        from training.trainer import check_data_paths, load_records, resolve_train_device

        check_data_paths(config)
        resolve_train_device(config.runtime.device, DistInfo(), config.source)
        records, skipped = load_records(config.data.train)
        print(f"config OK: {len(records)} training pairs, {len(skipped)} rows skipped")
        return 0
    if args.train_command == "prepare":
        from training.store import prepare_store
        from training.trainer import check_data_paths, load_records

        check_data_paths(config)
        store = args.store or (Path(config.data.store) if config.data.store else None)
        if store is None:
            raise ConfigError("prepare: give --store or set data.store in the config", config.source)
        records, skipped = load_records(config.data.train + config.data.val)
        prepare_store(records, store, config.data.store_size, config.data.prepare_workers, args.progress)
        print(f"store {store}: {len(records)} pairs ({len(skipped)} rows skipped while reading the sources)")
        return 0
    final = _train_locked(config, args)
    if args.progress != "json":
        print(f"model: {final}")
    return 0


def _train_locked(config, args: argparse.Namespace) -> Path:  # noqa: ANN001 (TrainConfig)
    """Train holding the run folder's lock (one writer per run folder; rank 0 of a torchrun job holds it).

    Leftovers of an interrupted run (temporary checkpoint folders, backups) are recovered first. A run
    that fails before writing anything leaves no run folder behind (the lock made it).
    """
    from contextlib import nullcontext

    from afloc_engine.checkpoint import clean_leftovers
    from afloc_engine.locks import LOCK_FILE
    from training.trainer import Trainer

    run_dir: Path = args.run_dir
    main_rank = int(os.environ.get("RANK", "0")) == 0
    created = not run_dir.exists()
    lock = folder_lock(run_dir, "afloc train run", wait=args.wait) if main_rank else nullcontext()
    with lock:
        try:
            if main_rank:
                clean_leftovers(run_dir)
                clean_leftovers(run_dir / "checkpoints")
            return Trainer(config, run_dir, resume=args.resume, progress=args.progress).fit()
        except BaseException:
            if main_rank and created and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m training``), with the same errors as ``afloc``."""
    parser = argparse.ArgumentParser(prog="python -m training", description="AFLoc contrastive training")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    from afloc_engine.cli import handle_error

    try:
        return run(args)
    except (AFLocError, OSError, MemoryError, RuntimeError, KeyboardInterrupt) as err:
        return handle_error(err, "train", getattr(args, "progress", None), args.verbose, args)
