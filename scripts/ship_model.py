"""Copy a trained model into the package as the embedded default (fp16), and record it in the manifest.

    python scripts/ship_model.py MODEL_DIR [--name default] [--description TEXT] [--card MODEL_CARD.md]
                                           [--smoothing-sigma S]

Writes afloc_engine/weights/<name>/ (config.json + model.safetensors [+ MODEL_CARD.md] + the preset
prompts' table prompt_embeddings.safetensors) and the manifest entry (sha256, size) that `load_model`
checks at every load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_default_model import export  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--name", default="default")
    parser.add_argument("--description", default=None)
    parser.add_argument("--card", type=Path, default=None, help="a MODEL_CARD.md to ship beside the weights")
    parser.add_argument("--smoothing-sigma", type=float, default=None, help="heatmap smoothing (grid cells) to ship")
    args = parser.parse_args()
    from afloc_engine.checkpoint import read_config
    from afloc_engine.inference import load_model
    from afloc_engine.prompt_table import write_prompt_table
    from afloc_engine.registry import shipped_entry
    from afloc_engine.registry.manifest import MANIFEST, PACKAGE_WEIGHTS

    _, info = read_config(args.model)
    dest = PACKAGE_WEIGHTS / args.name
    card = (
        args.card.read_text()
        if args.card
        else (dest / "MODEL_CARD.md").read_text()
        if (dest / "MODEL_CARD.md").is_file()
        else None
    )
    changes = {} if args.smoothing_sigma is None else {"smoothing_sigma": args.smoothing_sigma}
    extra = {**info.extra, "source": info.name}
    export(args.model, dest, args.name, args.description or info.description, extra, changes)
    if card:
        (dest / "MODEL_CARD.md").write_text(card)
    manifest = json.loads(MANIFEST.read_text())
    entry = shipped_entry(dest, name=args.name)
    manifest["models"] = [m for m in manifest["models"] if m["name"] != args.name] + [entry | {"trained": True}]
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    write_prompt_table(load_model(dest, device="cpu"))
    print(json.dumps(entry, indent=2))
    shutil.rmtree(dest / "__pycache__", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
