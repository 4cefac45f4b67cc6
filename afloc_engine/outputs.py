"""Writing results: heatmap volumes (.nrrd), a Slicer segmentation (.seg.nrrd), results.json, overlay PNG.

All files of one input are written into a temporary folder that is renamed into place at the
end, so an error or a kill never leaves a half-written result folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from afloc_engine.checkpoint import atomic_folder, commit_folder
from afloc_engine.io import ImageData
from afloc_engine.prompts import finding_of
from afloc_engine.protocol import SEGMENT_COLORS, slug, unique_slugs  # noqa: F401 (slug: public here too)
from afloc_engine.specificity import assess
from afloc_engine.transforms import normalize_intensity


def ijk_to_lps(image: ImageData) -> np.ndarray:
    """4x4 voxel (i, j, k) -> LPS mm matrix of an image (2D images get a unit-thick slice at z)."""
    dims = len(image.spacing)
    direction = np.asarray(image.direction, dtype=float).reshape(dims, dims)
    matrix = np.eye(4)
    if dims == 2:
        d3 = image.meta.get("direction3")
        if d3 is not None:
            matrix[:3, :3] = np.asarray(d3) @ np.diag([*image.spacing, image.meta.get("slice_spacing_z", 1.0)])
        else:
            matrix[:2, :2] = direction @ np.diag(image.spacing)
        matrix[:2, 3] = image.origin
        matrix[2, 3] = image.meta.get("slice_origin_z", 0.0)
    else:
        matrix[:3, :3] = direction @ np.diag(image.spacing)
        matrix[:3, 3] = image.origin
    return matrix


def write_heatmap(image: ImageData, heatmap: np.ndarray, path: Path) -> None:
    """One float32 heatmap with the input's geometry, as NRRD (or any SimpleITK format by suffix)."""
    import SimpleITK as sitk

    sitk.WriteImage(image.to_sitk(np.ascontiguousarray(heatmap, dtype=np.float32)), str(path), useCompression=True)


def write_segmentation(image: ImageData, masks: np.ndarray, names: list[str], path: Path) -> None:
    """Masks (P, H, W) or (P, Z, Y, X) as a Slicer ``.seg.nrrd``, one segment per prompt."""
    import slicerio

    vol = masks if image.is_volume else masks[:, None]  # (P, Z, Y, X)
    shape_ijk = vol.shape[1:][::-1]
    seg = slicerio.create_segmentation(shape_ijk, ijk_to_lps(image))
    for i, (mask, name) in enumerate(zip(vol, names)):
        color = SEGMENT_COLORS[i % len(SEGMENT_COLORS)]
        slicerio.add_segment(
            seg, np.transpose(mask, (2, 1, 0)), {"id": f"Segment_{i + 1}", "name": name, "color": color}
        )
    seg["containedRepresentationNames"] = ["Binary labelmap"]
    slicerio.write_segmentation(str(path), seg)


HEAT_STOPS = np.array(
    [[0.0, 0, 0, 0], [0.35, 0.5, 0, 0], [0.6, 1.0, 0.3, 0], [0.85, 1.0, 0.85, 0.1], [1.0, 1.0, 1.0, 0.9]]
)


def heat_colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB in [0, 1] (black-red-yellow-white, like Slicer's 'ColdToHotRainbow' warm half)."""
    v = np.clip(values, 0, 1)
    return np.stack([np.interp(v, HEAT_STOPS[:, 0], HEAT_STOPS[:, c]) for c in (1, 2, 3)], axis=-1)


def overlay_rgb(
    grey: np.ndarray, heatmap: np.ndarray, mask: np.ndarray | None = None, alpha: float = 0.55
) -> np.ndarray:
    """(H, W) uint8 RGB overlay: the image in grey, the heatmap's positive part in heat colours, mask outline."""
    base = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    strength = np.clip(heatmap, 0, 1)[..., None]
    rgb = base * (1 - alpha * strength) + heat_colormap(strength[..., 0]) * alpha * strength
    if mask is not None and mask.any():
        edge = mask & ~(_erode(mask))
        rgb[edge] = (0.2, 1.0, 0.3)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def _erode(mask: np.ndarray) -> np.ndarray:
    m = mask.copy()
    m[1:] &= mask[:-1]
    m[:-1] &= mask[1:]
    m[:, 1:] &= mask[:, :-1]
    m[:, :-1] &= mask[:, 1:]
    return m


def write_overlay_png(
    image: ImageData, heatmaps: np.ndarray, masks: np.ndarray, titles: list[str], path: Path, panel: int = 384
) -> None:
    """A grid of overlays, one panel per prompt with its title, for a person to look at."""
    from PIL import Image, ImageDraw

    array = image.array if not image.is_volume else image.array[image.array.shape[0] // 2]
    hm = heatmaps if not image.is_volume else heatmaps[:, heatmaps.shape[1] // 2]
    mk = masks if not image.is_volume else masks[:, masks.shape[1] // 2]
    grey = normalize_intensity(array, image.window)
    scale = panel / max(grey.shape)
    size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
    cols = min(4, len(titles))
    rows = (len(titles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * size[0], rows * (size[1] + 18)), "black")
    draw = ImageDraw.Draw(sheet)
    for i, title in enumerate(titles):
        tile = Image.fromarray(overlay_rgb(grey, hm[i], mk[i])).resize(size, Image.BILINEAR)
        x, y = (i % cols) * size[0], (i // cols) * (size[1] + 18)
        sheet.paste(tile, (x, y + 18))
        draw.text((x + 4, y + 3), title[:60], fill=(255, 255, 255))
    sheet.save(path)


def write_results(
    result: Any,  # noqa: ANN401 (LocalizationResult or VolumeResult: any object with the same fields)
    out_dir: Path,
    extra: dict[str, Any] | None = None,
    overlay: bool = True,
) -> Path:
    """Write every output of one result into ``out_dir`` atomically; returns ``out_dir``."""
    tmp = atomic_folder(out_dir)
    try:
        names = unique_slugs(result.prompts)
        files: dict[str, Any] = {"heatmaps": {}, "segmentation": "masks.seg.nrrd"}
        for prompt, name, heat in zip(result.prompts, names, result.heatmaps):
            fname = f"heatmap_{name}.nrrd"
            write_heatmap(result.image, heat, tmp / fname)
            files["heatmaps"][prompt] = fname
        write_segmentation(
            result.image, result.masks, [finding_of(p) for p in result.prompts], tmp / files["segmentation"]
        )
        adapter = getattr(result, "adapter", None)  # which few-shot adapter changed which prompts (or None)
        if overlay:
            titles = list(result.prompts)
            if adapter:
                from afloc_engine.finetune.adapter import adapter_note

                note = adapter_note(adapter, short=True)
                titles = [f"[{note}] {t}" if t in adapter["prompts"] else t for t in titles]
            write_overlay_png(result.image, result.heatmaps, result.masks, titles, tmp / "overlay.png")
            files["overlay"] = "overlay.png"
        summary = {
            "input": str(result.image.source) if result.image.source else None,
            "model_id": result.model_id,
            "trained": result.trained,
            "threshold": result.threshold,
            "prompts": [
                {
                    "prompt": p,
                    "negative_prompt": n,
                    "probability": float(prob),
                    "heatmap": files["heatmaps"][p],
                    "segment": finding_of(p),
                    "mask_pixels": int(m.sum()),
                    "specificity": spec.specificity,  # afloc_engine.specificity: 1 - mean r with the other maps
                    "lung_correlation": spec.lung_correlation,
                    "specificity_warning": spec.warning,
                }
                for p, n, prob, m, spec in zip(
                    result.prompts,
                    result.negative_prompts,
                    result.probabilities,
                    result.masks,
                    assess(result.heatmaps, result.prompts),
                )
            ],
            "files": files,
            **({"adapter": adapter} if adapter else {}),
            **(extra or {}),
        }
        if not result.trained:
            summary["warning"] = "UNTRAINED MODEL: random weights; these outputs mean nothing."
        (tmp / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        commit_folder(tmp, out_dir, overwrite=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
