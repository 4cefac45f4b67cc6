"""``afloc convert-reference CKPT OUT [--text-model DIR]``: import a reference AFLoc Lightning checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``afloc convert-reference``."""
    parser.add_argument("checkpoint", type=Path, metavar="CKPT", help="reference AFLoc checkpoint (.ckpt)")
    parser.add_argument("out", type=Path, metavar="OUT", help="engine model folder to write")
    parser.add_argument(
        "--text-model",
        type=Path,
        default=None,
        help="Hugging Face BERT folder (tokenizer + config) of the reference text encoder, e.g. Bio_ClinicalBERT",
    )
    parser.add_argument("--in-channels", type=int, choices=(1, 3), default=1, help="1 = grey input (default), 3 = RGB")
    parser.add_argument("--name", default="afloc-reference", help="model name recorded in config.json")
    parser.add_argument("--version", default="reference", help="model version recorded in config.json")
    parser.add_argument("--fp16", action="store_true", help="store the weights as float16 (half the size)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    """Convert, then print the folder and what was not loaded."""
    import torch

    from afloc_engine.checkpoint import read_config
    from afloc_engine.convert import convert_reference

    folder = convert_reference(
        args.checkpoint,
        args.out,
        text_model=args.text_model,
        in_channels=args.in_channels,
        name=args.name,
        version=args.version,
        dtype=torch.float16 if args.fp16 else None,
        overwrite=args.overwrite,
    )
    config, info = read_config(folder)
    print(f"wrote {folder}: {config.backbone}, D={config.embed_dim}, text model {config.text_model}")
    skipped = info.extra.get("not_loaded") or []
    if skipped:
        print(f"not loaded (placeholders, never executed): {', '.join(skipped)}")
    return 0
