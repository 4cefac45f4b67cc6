"""DICOM Segmentation output (highdicom): the prompt masks of a DICOM input, for a PACS.

One binary segment per prompt, labelled with the finding the prompt names; the object references
the source instance(s) (same patient, study and frame of reference), so a PACS viewer overlays it
on the radiograph it came from. A single DICOM file gives one frame per segment; a DICOM series
folder (read as a volume) gives one frame per slice and segment, matched to the slices in the
order the volume reader sorted them. The file is written to a temporary name and renamed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from afloc_engine.errors import AFLocError, ImageReadError
from afloc_engine.io import quiet_libraries

MANUFACTURER = "AFLocSlicer"
MODEL_NAME = "afloc_engine"
SERIES_NUMBER = 9701
SERIES_DESCRIPTION = "AFLoc prompt masks - research only, not for clinical use"
UNTRAINED_SERIES_DESCRIPTION = "UNTRAINED AFLoc prompt masks - meaningless, not for clinical use"


def _read_sources(source: Path) -> list[Any]:
    """Source datasets (headers only) in the order of the masks' slices: one file, or a series folder."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if source.is_dir():
        import SimpleITK as sitk

        with quiet_libraries():  # GDCM's and pydicom's messages stay off the terminal
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(source))
            files = list(reader.GetGDCMSeriesFileNames(str(source), series[0])) if series else []
        if not series:
            raise ImageReadError("folder holds no DICOM series", source)
        # files: the same order as io.read_image
    elif source.is_file():
        files = [str(source)]
    else:
        raise ImageReadError("DICOM source not found", source)
    datasets = []
    for f in files:
        try:
            with quiet_libraries():
                datasets.append(pydicom.dcmread(f, stop_before_pixels=True))
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as err:
            raise ImageReadError(f"cannot read the DICOM header: {err}", f) from None
    for ds, f in zip(datasets, files):
        for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns"):
            if keyword not in ds:
                raise ImageReadError(f"DICOM source lacks {keyword}; cannot reference it from a SEG", f)
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise ImageReadError("multi-frame DICOM sources are not supported", f)
    return datasets


def _without_bare_pixel_spacing(ds: Any) -> Any:  # noqa: ANN401
    """A projection image (no frame of reference) with Pixel Spacing but no Slice Thickness would get an
    incomplete Pixel Measures macro; leave the spacing out (the SEG overlays the source pixel for pixel)."""
    if "FrameOfReferenceUID" not in ds and "PixelSpacing" in ds and "SliceThickness" not in ds:
        ds = ds.copy()
        del ds.PixelSpacing
    return ds


def _lab_color(rgb: tuple[float, float, float]) -> Any:  # noqa: ANN401
    from highdicom.color import CIELabColor

    return CIELabColor.from_rgb(*(int(round(255 * c)) for c in rgb))


def write_dicom_seg(
    source_dicom_path: str | Path,
    result: Any,  # noqa: ANN401 (inference.LocalizationResult; imported lazily to keep this module light)
    out_path: str | Path,
) -> Path:
    """Write ``result.masks`` as a binary DICOM Segmentation referencing the source instance(s).

    Args:
        source_dicom_path: the DICOM file the result was computed on (or its series folder).
        result: a :class:`afloc_engine.inference.LocalizationResult`; ``masks`` (P, Rows, Columns)
            bool for a file, (P, Slices, Rows, Columns) for a series; ``prompts`` name the segments.
        out_path: the ``.dcm`` file to write (atomically).

    Returns ``out_path``. Raises :class:`ImageReadError` for an unusable source and
    :class:`AFLocError` when the masks do not fit it.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import afloc_engine
    from afloc_engine.outputs import SEGMENT_COLORS
    from afloc_engine.prompts import finding_of

    source = Path(source_dicom_path)
    out_path = Path(out_path)
    datasets = _read_sources(source)
    masks = np.asarray(result.masks).astype(bool)
    prompts = list(result.prompts)
    if masks.ndim == 3 and len(datasets) == 1:
        masks = masks[:, None]
    expected = (len(prompts), len(datasets), int(datasets[0].Rows), int(datasets[0].Columns))
    if masks.shape != expected:
        raise AFLocError(
            f"masks of shape {tuple(result.masks.shape)} do not fit the DICOM source "
            f"({len(prompts)} prompts x {len(datasets)} slice(s) of {expected[2]}x{expected[3]} px)",
            source,
        )
    if not prompts:
        raise AFLocError("no prompts, so no segments to write", source)
    model_id = str(getattr(result, "model_id", "") or "unknown")
    trained = bool(getattr(result, "trained", False))
    algorithm = hd.AlgorithmIdentificationSequence(
        name="AFLoc",
        family=codes.DCM.ArtificialIntelligence,
        version=model_id[:64],
        source=MANUFACTURER,
        parameters={"threshold": f"{float(getattr(result, 'threshold', 0.0)):g}", "trained": str(trained)},
    )
    descriptions = []
    for i, prompt in enumerate(prompts):
        label = finding_of(prompt)[:64] or f"prompt {i + 1}"
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=i + 1,
                segment_label=label,
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Finding,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_id=prompt[:64],
                tracking_uid=hd.UID(),
                display_color=_lab_color(SEGMENT_COLORS[i % len(SEGMENT_COLORS)]),
            )
        )
    # highdicom wants (frames, rows, columns, segments): one frame per source slice
    pixel_array = np.ascontiguousarray(np.moveaxis(masks, 0, -1)).astype(np.uint8)
    sources = [_without_bare_pixel_spacing(ds) for ds in datasets]
    try:
        with quiet_libraries():
            seg = hd.seg.Segmentation(
                source_images=sources,
                pixel_array=pixel_array,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=hd.UID(),
                series_number=SERIES_NUMBER,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer=MANUFACTURER,
                manufacturer_model_name=MODEL_NAME,
                software_versions=f"afloc_engine {afloc_engine.__version__}",
                device_serial_number="none",
                content_label="AFLOC",
                content_description=("" if trained else "UNTRAINED MODEL - ")
                + "AFLoc prompt masks; not for clinical use",
                omit_empty_frames=bool(masks.any()),
            )
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise AFLocError(f"cannot build a DICOM SEG for this source: {err}", source) from None
    seg.SeriesDescription = SERIES_DESCRIPTION if trained else UNTRAINED_SERIES_DESCRIPTION
    seg.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: segment labels of prompts in any script ('胸腔积液', '≥')
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        seg.save_as(tmp)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path
