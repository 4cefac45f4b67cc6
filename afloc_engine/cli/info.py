"""``afloc info``: the model, its card summary, checksum and the device."""

from __future__ import annotations

import argparse
import json

from afloc_engine.cli.common import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print as JSON")


def describe(model_name: str, device: str) -> dict:
    import platform
    import warnings

    import torch

    import afloc_engine
    from afloc_engine.config import REFERENCE_INFERENCE
    from afloc_engine.inference import untrained_warning
    from afloc_engine.registry import resolve_model

    folder, expected = resolve_model(model_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = afloc_engine.load_model(model_name, device)
    c = model.config
    card = None
    if folder is not None and (folder / "MODEL_CARD.md").is_file():
        lines = [ln.strip() for ln in (folder / "MODEL_CARD.md").read_text().splitlines()]
        card = next((ln for ln in lines if ln and not ln.startswith("#")), None)
    info = {
        "model": model.model_id,
        "folder": None if folder is None else str(folder),
        "trained": model.info.trained,
        "description": model.info.description,
        "card_summary": card,
        "sha256": model.info.sha256 or None,
        "sha256_check": (
            "verified (manifest or install record)"
            if expected and model.info.sha256 == expected
            else "no manifest checksum"
            if folder is not None
            else "no weights"
        ),
        "backbone": c.backbone,
        "text_model": c.text_model,
        "embed_dim": c.embed_dim,
        "image_size": c.image_size,
        "similarity": c.similarity,
        "inference_mode": c.inference_mode,
        "inference_pieces": ", ".join(
            f"{k}={getattr(c, k)}" for k in REFERENCE_INFERENCE if k not in ("inference_mode", "similarity")
        ),
        "threshold": c.threshold,
        "prompt_table": (
            "none (the text model loads for every run)"
            if model.prompt_table is None
            else model.prompt_table.describe()
            + ("" if model.prompt_table.problem else " (the text model loads only for other prompts)")
        ),
        "device": str(model.device),
        "cuda_available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "afloc_engine": afloc_engine.__version__,
    }
    if not model.info.trained:
        info["warning"] = untrained_warning(model.info.name, folder)
    return info


def run(args: argparse.Namespace) -> int:
    info = describe(args.model, args.device)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if "warning" in info:
        print("!" * 78)
        print(f"!! {info['warning']}")
        print("!" * 78)
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key != "warning":
            print(f"{key:<{width}}  {value}")
    return 0
