"""Regenerate the README's two overlay pictures with the embedded default model.

    python scripts/readme_figures.py [--data ../shared/data]

docs/overlay_rg1_uncr.png: the real radiograph RG1_UNCR.dcm (pydicom-data); docs/overlay_covid_dev.png:
covid-cxr dev image 037ba76e1c4f with its radiologist's ground-glass outline in green. Prompt:
"Findings suggesting ground glass opacity"; heat colours where the heatmap is above 0, the model's
mask (heatmap above the model's own threshold, ``config.json``) outlined in blue, as in the demo's overlay.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

import afloc_engine
import afloc_engine.inference
from afloc_engine.outputs import overlay_rgb
from afloc_engine.transforms import normalize_intensity

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Findings suggesting ground glass opacity"


def outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Boundary pixels of a binary mask, ``width`` px thick."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, iterations=width)


def picture(
    model: afloc_engine.inference.AFLoc, path: Path, out: Path, truth: Path | None = None, size: int = 420
) -> None:
    result = model.localize(str(path), [PROMPT])
    grey = normalize_intensity(result.image.array, result.image.window)
    rgb = overlay_rgb(grey, result.heatmaps[0], None)
    width = max(1, max(grey.shape) // 300)
    rgb[outline(result.masks[0], width)] = (80, 160, 255)  # the model's mask: blue
    if truth is not None:
        rgb[outline(np.asarray(Image.open(truth).convert("L")) > 127, width)] = (40, 255, 80)  # radiologist: green
    img = Image.fromarray(rgb)
    img.thumbnail((size, size), Image.LANCZOS)
    img.save(out)
    print(out, f"P(present) = {result.probabilities[0]:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()
    from pydicom.data import get_testdata_file

    model = afloc_engine.load_model("default", "cpu")
    picture(model, Path(get_testdata_file("RG1_UNCR.dcm")), REPO / "docs" / "overlay_rg1_uncr.png")
    covid = args.data / "covid-cxr"
    picture(
        model,
        covid / "images" / "037ba76e1c4f.jpg",
        REPO / "docs" / "overlay_covid_dev.png",
        covid / "masks" / "037ba76e1c4f__ground_glass_opacity.png",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
