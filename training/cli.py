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
import sys
from pathlib import Path

from afloc_engine.cli.common import add_progress_argument
from afloc_engine.errors import AFLocError, ConfigError


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
    from training.trainer import Trainer

    final = Trainer(config, args.run_dir, resume=args.resume, progress=args.progress).fit()
    if args.progress != "json":
        print(f"model: {final}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m training``), with the same errors as ``afloc``."""
    parser = argparse.ArgumentParser(prog="python -m training", description="AFLoc contrastive training")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return run(args)
    except AFLocError as err:
        if getattr(args, "progress", None) == "json":
            from afloc_engine.progress import emit

            emit("error", message=err.problem, path=None if err.path is None else str(err.path))
        print(f"afloc train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("afloc train: cancelled", file=sys.stderr)
        return 130
