"""How far a converted reference checkpoint's heatmap is from the reference's, per inference piece.

Builds the reference-layout checkpoint of ``Testing/test_convert.py`` (torchvision ResNet-50 names, a
MiniLM-architecture text encoder with random weights, Lightning keys, ``hyper_parameters``), converts it
with ``afloc convert-reference``, and compares ``localize()`` with the reference's own computation (written
in the test from reading YH0517/AFLoc) on real covid-cxr radiographs: first in the recorded ``reference``
mode, then with each piece switched back to the engine's choice. Writes JSON::

    python benchmarks/reference_pieces.py --data ../shared/data --out docs/results/reference_pieces.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
ENGINE_PIECES = {
    "intensity_scaling": "percentile",
    "letterbox_resize": "bilinear-antialias",
    "encoder_align_corners": False,
    "text_pooling": "engine",
    "similarity": "cosine",
    "smoothing_mode": "replicate",
    "heatmap_range": "image",
}
SWITCHES = [
    (),
    ("intensity_scaling", "letterbox_resize"),
    ("encoder_align_corners",),
    ("text_pooling",),
    ("similarity",),
    ("smoothing_mode",),
    ("heatmap_range",),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "reference_pieces.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "Testing"))
    import test_convert as tc  # the reference-layout checkpoint and the reference's computation
    from transformers import AutoModel, AutoTokenizer

    import afloc_engine
    from afloc_engine.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        class Factory:
            def mktemp(self, name: str) -> Path:
                (root / name).mkdir()
                return root / name

        ckpt, sd, minilm = tc.minilm_checkpoint.__wrapped__(Factory())
        out = root / "converted"
        assert cli(["convert-reference", str(ckpt), str(out), "--text-model", str(minilm)]) == 0
        tokenizer = AutoTokenizer.from_pretrained(minilm)
        bert = AutoModel.from_pretrained(minilm).eval()
        prefix = "text_encoder.model."
        bert.load_state_dict(
            {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix) and "position_ids" not in k}
        )
        reports = {p: tc.reference_text(tokenizer, bert, p, tc.WORD_NUM)[2] for p in tc.PROMPTS}
        images = [args.data / "covid-cxr" / "images" / f"{i}.jpg" for i in tc.COVID_IMAGES]
        expected = {}
        for path in images:
            for prompt in tc.PROMPTS:
                heat, _, (top, left, rows, cols) = tc.reference_heatmap(path, sd, reports[prompt])
                expected[path.name, prompt] = heat[top : top + rows, left : left + cols]
        config = json.loads((out / "config.json").read_text())
        rows_out = []
        for switch in SWITCHES:
            changed = json.loads(json.dumps(config))
            changed["model"].update({k: ENGINE_PIECES[k] for k in switch})
            (out / "config.json").write_text(json.dumps(changed))
            model = afloc_engine.load_model(out, "cpu")
            worst = 0.0
            for path in images:
                result = model.localize(path, tc.PROMPTS)
                for p, prompt in enumerate(tc.PROMPTS):
                    valid = expected[path.name, prompt]
                    shown = F.interpolate(valid[None, None], size=result.heatmaps.shape[1:], mode="bilinear")[0, 0]
                    worst = max(worst, float(np.abs(result.heatmaps[p] - shown.numpy()).max()))
            rows_out.append({"engine_choice_for": list(switch) or "none (reference mode)", "max_abs_diff": worst})
            print(f"{', '.join(switch) or 'reference mode':<45} max |heatmap - reference| = {worst:.3g}", flush=True)
    record = {
        "command": "python benchmarks/reference_pieces.py --data ../shared/data "
        "--out docs/results/reference_pieces.json",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "images": [p.name for p in images],
        "prompts": tc.PROMPTS,
        "heatmap_scale": "[-1, 1]",
        "rows": rows_out,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
