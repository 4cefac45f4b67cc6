"""Writing results: heatmap volumes (.nrrd), a Slicer segmentation (.seg.nrrd), results.json, overlay PNG
and, for DICOM inputs on request, a DICOM SEG (masks.dcm); ``results.json`` lists every file once.

All files of one input are written into a temporary folder that is renamed into place at the
end, so an error or a kill never leaves a half-written result folder. Heatmaps are stored as
float32 rounded to steps of 1/127 (:data:`HEATMAP_STEP`; within 0.004 of the computed values), which
gzip shrinks about 30-fold: 14 prompts on a 1841 x 1955 radiograph write about 8 MB instead of 162 MB.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from afloc_engine.checkpoint import atomic_folder, commit_folder
from afloc_engine.io import ImageData
from afloc_engine.prompts import clean_prompt, finding_of
from afloc_engine.protocol import SEGMENT_COLORS, slug, unique_slugs  # noqa: F401 (slug: public here too)
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


HEATMAP_STEP = 1.0 / 127
"""Heatmap files hold multiples of this step (8-bit precision, written as float32): every reader gets
the values directly, within ``HEATMAP_STEP / 2`` (0.004) of the computed heatmap, and gzip shrinks
the smooth maps about 30-fold (a 1841 x 1955 radiograph: about 0.4 MB per prompt instead of 12 MB)."""
HEATMAP_COMPRESSION = 6
"""gzip level of the heatmap files (1 is faster but about twice as large, 9 is slower for 5 % less)."""
SEGMENTATION_COMPRESSION = 1
"""gzip level of ``masks.seg.nrrd`` (binary masks compress well at any level)."""


def quantize_heatmap(heatmap: np.ndarray) -> np.ndarray:
    """Heatmap values rounded to multiples of :data:`HEATMAP_STEP` (float32, same shape), as written to disk."""
    out = np.multiply(heatmap, 1.0 / HEATMAP_STEP, dtype=np.float32)
    np.rint(out, out=out)
    out *= np.float32(HEATMAP_STEP)
    return out


def write_heatmap(image: ImageData, heatmap: np.ndarray, path: Path, quantize: bool = True) -> None:
    """One heatmap ((H, W) or (Z, Y, X), values in [-1, 1]) with the input's geometry, as gzip NRRD
    (or any SimpleITK format by suffix); values are stored as :func:`quantize_heatmap` gives them
    (``quantize=False``: the caller has done it)."""
    import SimpleITK as sitk

    itk = image.to_sitk(quantize_heatmap(heatmap) if quantize else np.asarray(heatmap, dtype=np.float32))
    itk.SetMetaData("afloc_value_step", f"{HEATMAP_STEP:.9g}")
    sitk.WriteImage(itk, str(path), True, HEATMAP_COMPRESSION)


def _write_heatmaps(image: ImageData, heatmaps: np.ndarray, paths: list[Path], threshold: float) -> np.ndarray:
    """:func:`write_heatmap` of each heatmap, two at a time (numpy and gzip run outside Python's lock).

    Returns the masks (P, ...) bool of the written (quantised) heatmaps above ``threshold``; each map is
    quantised in its own thread, so no second full copy of all P heatmaps is made.
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(heat: np.ndarray, path: Path) -> np.ndarray:
        stored = quantize_heatmap(heat)
        write_heatmap(image, stored, path, quantize=False)
        return stored > threshold

    if len(paths) < 2:
        return np.stack([one(heat, path) for heat, path in zip(heatmaps, paths)])
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(one, heat, path) for heat, path in zip(heatmaps, paths)]
        return np.stack([job.result() for job in jobs])


def segment_name(prompt: str) -> str:
    """The segment name of a prompt in ``masks.seg.nrrd``: its finding as printable ASCII.

    Slicer's reader takes the header's bytes as UTF-8 while slicerio (pynrrd) drops every byte that is
    not ASCII, so only ASCII reads back the same in both: accents are dropped, symbols and other
    scripts transliterated ('Pleural effusion (≥ 2 cm)' -> 'Pleural effusion (>= 2 cm)', '胸腔积液' ->
    'XiongQiangJiYe'; ``anyascii`` when installed, else Unicode decomposition and ``U+XXXX`` codes).
    The exact prompt is in ``results.json``.
    """
    finding = clean_prompt(finding_of(prompt))
    try:
        from anyascii import anyascii

        text = anyascii(finding)
    except ImportError:  # pragma: no cover (anyascii is a dependency; this keeps a bare install working)
        text = unicodedata.normalize("NFKD", finding)
        text = "".join(
            ch if ord(ch) < 128 else ("" if unicodedata.combining(ch) else f" U+{ord(ch):04X} ") for ch in text
        )
    text = " ".join("".join(ch if 32 <= ord(ch) < 127 else " " for ch in text).split())
    return text or slug(prompt)


def write_segmentation(image: ImageData, masks: np.ndarray, names: list[str], path: Path) -> None:
    """Masks (P, H, W) or (P, Z, Y, X) bool as a Slicer ``.seg.nrrd``, one segment per prompt.

    Each segment has its own layer (label value 1), as Slicer stores overlapping segments, so the
    file is written in one pass whatever the overlaps (slicerio's writer; ``add_segment`` would test
    every pair). ``names`` are the prompts; segments are named :func:`segment_name` of each (ASCII).
    """
    import slicerio

    vol = masks if image.is_volume else masks[:, None]  # (P, Z, Y, X) = (P, K, J, I)
    segments = []
    for i, (mask, name) in enumerate(zip(vol, names)):
        if mask.any():
            extent = []
            for axis in (2, 1, 0):  # i, j, k
                hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
                extent += [int(hit[0]), int(hit[-1])]
        else:
            extent = [0, -1, 0, -1, 0, -1]
        segments.append(
            {
                "id": f"Segment_{i + 1}",
                "name": segment_name(name),
                "color": tuple(SEGMENT_COLORS[i % len(SEGMENT_COLORS)]),
                "layer": i if len(vol) > 1 else 0,
                "labelValue": 1,
                "extent": extent,
            }
        )
    # slicerio writes in Fortran order: (layer, i, j, k) with the layer varying fastest
    voxels = np.transpose(vol, (0, 3, 2, 1)).astype(np.uint8)
    seg = {
        "voxels": voxels if len(vol) > 1 else voxels[0],
        "ijkToLPS": ijk_to_lps(image),
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
    }
    slicerio.write_segmentation(str(path), seg, compression_level=SEGMENTATION_COMPRESSION)


HEAT_STOPS = np.array(
    [[0.0, 0, 0, 0], [0.35, 0.5, 0, 0], [0.6, 1.0, 0.3, 0], [0.85, 1.0, 0.85, 0.1], [1.0, 1.0, 1.0, 0.9]]
)


def heat_colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB in [0, 1] (black-red-yellow-white, like Slicer's 'ColdToHotRainbow' warm half)."""
    v = np.clip(values, 0, 1)
    return np.stack([np.interp(v, HEAT_STOPS[:, 0], HEAT_STOPS[:, c]) for c in (1, 2, 3)], axis=-1)


MASK_OUTLINE_RGB = (80 / 255, 160 / 255, 255 / 255)
"""The model's mask outline in the overlay (blue, as in the README's picture)."""


def overlay_rgb(
    grey: np.ndarray,
    heatmap: np.ndarray,
    mask: np.ndarray | None = None,
    alpha: float = 0.55,
    outline: int = 1,
    outline_rgb: tuple[float, float, float] = (0.2, 1.0, 0.3),
) -> np.ndarray:
    """(H, W, 3) uint8 overlay: ``grey`` (H, W) in [0, 1], the heatmap's positive part in heat colours,
    and the boundary of ``mask`` (H, W) bool, ``outline`` pixels wide, in ``outline_rgb`` (0..1; green
    by default, as reference outlines are drawn; ``overlay.png`` draws the model's mask in
    :data:`MASK_OUTLINE_RGB`)."""
    base = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    strength = np.clip(heatmap, 0, 1)[..., None]
    rgb = base * (1 - alpha * strength) + heat_colormap(strength[..., 0]) * alpha * strength
    if mask is not None and mask.any():
        inner = mask
        for _ in range(max(1, outline)):
            inner = _erode(inner)
        rgb[mask & ~inner] = outline_rgb
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def _erode(mask: np.ndarray) -> np.ndarray:
    m = mask.copy()
    m[1:] &= mask[:-1]
    m[:-1] &= mask[1:]
    m[:, 1:] &= mask[:, :-1]
    m[:, :-1] &= mask[:, 1:]
    return m


def _resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) float array resized to ``size`` = (width, height), averaging over the pixels it shrinks."""
    from PIL import Image

    if array.shape == (size[1], size[0]):
        return np.asarray(array, dtype=np.float32)
    # a writable copy (PIL's buffer is read-only; torch warns about read-only arrays)
    return np.array(Image.fromarray(np.ascontiguousarray(array, dtype=np.float32)).resize(size, Image.BOX))


def _title(text: str) -> str:
    """A panel title the built-in font can draw (ASCII only: it has no accented letters either): ASCII text
    as is, anything else transliterated as the segment names are ('épanchement' -> 'epanchement')."""
    return text if text.isascii() else segment_name(text)


def write_overlay_png(
    image: ImageData,
    heatmaps: np.ndarray,
    masks: np.ndarray | None,
    titles: list[str],
    path: Path,
    panel: int = 384,
    threshold: float | None = None,
) -> None:
    """A grid of overlays (at most 4 columns), one ``panel``-pixel panel per prompt with its title.

    The image and heatmaps are reduced to the panel size first (so a large radiograph costs little);
    the mask outline is drawn at that size, 2 px wide, from the reduced heatmap above ``threshold``
    when one is given, else from the reduced ``masks`` (P, H, W) bool. Volumes show their middle slice.
    """
    from PIL import Image, ImageDraw

    array = image.array if not image.is_volume else image.array[image.array.shape[0] // 2]
    hm = heatmaps if not image.is_volume else heatmaps[:, heatmaps.shape[1] // 2]
    mk = None if masks is None else (masks if not image.is_volume else masks[:, masks.shape[1] // 2])
    scale = min(1.0, panel / max(array.shape))
    size = (max(1, round(array.shape[1] * scale)), max(1, round(array.shape[0] * scale)))
    grey = normalize_intensity(_resize(array, size), image.window)
    cols = min(4, len(titles))
    rows = (len(titles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * size[0], rows * (size[1] + 18)), "black")
    draw = ImageDraw.Draw(sheet)
    # heatmaps are smooth (upsampled from the feature grid): every n-th pixel, then a resize, is enough
    stride = max(1, int(1 / scale) // 2)
    for i, title in enumerate(titles):
        heat = _resize(hm[i][::stride, ::stride], size)
        if threshold is not None:
            mask = heat > threshold
        elif mk is not None:
            mask = _resize(mk[i].astype(np.float32), size) >= 0.5
        else:
            mask = None
        tile = Image.fromarray(overlay_rgb(grey, heat, mask, outline=2, outline_rgb=MASK_OUTLINE_RGB))
        x, y = (i % cols) * size[0], (i // cols) * (size[1] + 18)
        sheet.paste(tile, (x, y + 18))
        draw.text((x + 4, y + 3), _title(title)[:60], fill=(255, 255, 255))
    sheet.save(path, compress_level=3)


def write_results(
    result: Any,  # noqa: ANN401 (LocalizationResult or VolumeResult: any object with the same fields)
    out_dir: Path,
    extra: dict[str, Any] | None = None,
    overlay: bool = True,
    dicom_seg_source: Path | None = None,
) -> Path:
    """Write every output of one result into ``out_dir`` atomically; returns ``out_dir``.

    Files: ``heatmap_<finding>.nrrd`` per prompt (:func:`write_heatmap`), ``masks.seg.nrrd``,
    ``overlay.png`` (unless ``overlay`` is False), ``masks.dcm`` (a DICOM SEG, when ``dicom_seg_source``
    names the DICOM file or series folder the result was computed on) and ``results.json``, whose
    ``files`` lists each of them once. Prompts naming the same finding get distinct file names.

    The heatmaps are written quantised (:func:`quantize_heatmap`) and every mask written (segmentation,
    DICOM SEG, overlay, ``mask_pixels``) is the written heatmap above ``result.threshold``, so a viewer
    that re-thresholds a heatmap file gets exactly the segment beside it (``result.masks`` may differ
    at pixels within ``HEATMAP_STEP / 2`` of the threshold).
    """
    tmp = atomic_folder(out_dir)
    try:
        names = unique_slugs(result.prompts)
        heat_files = [f"heatmap_{name}.nrrd" for name in names]
        files: dict[str, Any] = {"heatmaps": heat_files, "segmentation": "masks.seg.nrrd"}
        masks = _write_heatmaps(result.image, result.heatmaps, [tmp / f for f in heat_files], result.threshold)
        specificity = result.specificity()  # before the copy below: cached on the caller's result, which shows it too
        if dataclasses.is_dataclass(result):
            result = dataclasses.replace(result, masks=masks)  # the masks of the heatmaps as written (DICOM SEG)
        write_segmentation(result.image, masks, list(result.prompts), tmp / files["segmentation"])
        adapter = getattr(result, "adapter", None)  # which few-shot adapter changed which prompts (or None)
        if overlay:
            titles = list(result.prompts)
            if adapter:
                from afloc_engine.finetune.adapter import adapter_note

                note = adapter_note(adapter, short=True)
                titles = [f"[{note}] {t}" if t in adapter["prompts"] else t for t in titles]
            write_overlay_png(result.image, result.heatmaps, masks, titles, tmp / "overlay.png")
            files["overlay"] = "overlay.png"
        if dicom_seg_source is not None:
            from afloc_engine.dicom_seg import write_dicom_seg

            write_dicom_seg(dicom_seg_source, result, tmp / "masks.dcm")
            files["dicom_seg"] = "masks.dcm"
        files["results"] = "results.json"
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
                    "heatmap": fname,
                    "segment": segment_name(p),
                    "mask_pixels": int(m.sum()),
                    "specificity": spec.specificity,  # afloc_engine.specificity: 1 - mean r with the other maps
                    "lung_correlation": spec.lung_correlation,
                    "specificity_warning": spec.warning,
                }
                for p, fname, n, prob, m, spec in zip(
                    result.prompts,
                    heat_files,
                    result.negative_prompts,
                    result.probabilities,
                    masks,
                    specificity,
                )
            ],
            "heatmap_value_step": HEATMAP_STEP,
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
