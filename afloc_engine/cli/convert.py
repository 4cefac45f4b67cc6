"""``afloc convert-reference CKPT OUT [--text-model DIR]``: import a reference AFLoc Lightning checkpoint.

The output folder runs the reference's own inference computation (``inference_mode: reference``)
and holds its own copy of the text model, so it can be moved or installed with ``afloc models install``.
"""

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
        help=(
            "Hugging Face folder of the reference's text encoder, e.g. a download of emilyalsentzer/Bio_ClinicalBERT: "
            "its tokenizer (tokenizer.json, or vocab.txt + tokenizer_config.json), config.json and weights "
            "(model.safetensors or pytorch_model.bin; transformers needs them to build the model, the checkpoint's "
            "replace them). Copied into OUT/text_model, so OUT is self-contained. Default: the engine's MiniLM "
            "(fits only a checkpoint of the same width)"
        ),
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
    print(
        f"wrote {folder}: {config.backbone}, D={config.embed_dim}, text model {info.extra.get('text_model_source')} "
        f"copied to {config.text_model}/, inference {config.inference_mode}, "
        f"settings from {'hyper_parameters' if info.extra.get('hyper_parameters_read') else 'the released defaults'}"
    )
    dropped = info.extra.get("dropped_unused") or {}
    for key, why in dropped.items():
        print(f"dropped {key}: {why}; inference does not use it")
    skipped = info.extra.get("not_loaded") or []
    if skipped:
        print(f"not loaded (placeholders, never executed): {', '.join(skipped)}")
    return 0
