"""DICOM SEG output: written with highdicom, read back with pydicom/highdicom, compared with the masks."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from afloc_engine.dicom_seg import write_dicom_seg
from afloc_engine.errors import AFLocError, ImageReadError
from afloc_engine.inference import LocalizationResult
from afloc_engine.io import read_image

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def make_result(image, masks: np.ndarray, prompts: list[str], trained: bool = False) -> LocalizationResult:
    p = len(prompts)
    heat = np.where(masks, 0.9, -0.5).astype(np.float32)
    return LocalizationResult(prompts, heat, masks, np.full(p, 0.5, np.float32), 0.3, image, "test@1:abc", trained)


def random_masks(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Rectangles at random places, one per leading index; the last one left empty."""
    masks = np.zeros(shape, bool)
    for i in range(shape[0] - 1):
        sl = []
        for n in shape[1:]:
            a = int(rng.integers(0, n - 2))
            sl.append(slice(a, int(rng.integers(a + 1, n))))
        masks[(i, *sl)] = True
    return masks


def test_seg_of_a_radiograph(sample_dicom, tmp_path, rng):
    import highdicom as hd

    image = read_image(sample_dicom)
    source = pydicom.dcmread(sample_dicom, stop_before_pixels=True)
    prompts = ["Findings suggesting pneumothorax", "Large right-sided pleural effusion", "Findings suggesting edema"]
    masks = random_masks(rng, (3, *image.array.shape))
    out = write_dicom_seg(sample_dicom, make_result(image, masks, prompts), tmp_path / "masks.dcm")
    assert out == tmp_path / "masks.dcm" and [p.name for p in tmp_path.iterdir()] == ["masks.dcm"]

    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == SEG_SOP_CLASS and ds.SegmentationType == "BINARY"
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    ref = ds.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == source.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns)
    assert [s.SegmentLabel for s in ds.SegmentSequence] == [
        "pneumothorax",
        "Large right-sided pleural effusion",
        "edema",
    ]
    assert "UNTRAINED" in ds.SeriesDescription  # an untrained model's masks say so

    seg = hd.seg.segread(out)
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1, 2, 3])
    assert pixels.shape == (1, source.Rows, source.Columns, 3)
    for i in range(3):
        np.testing.assert_array_equal(pixels[0, ..., i].astype(bool), masks[i], err_msg=f"segment {i + 1}")
    assert not masks[2].any()  # the empty segment reads back empty


def ct_series(folder: Path, n: int = 3) -> list[str]:
    """n copies of pydicom's CT_small.dcm as one series, slices 5 mm apart, written in scrambled order."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir()
    series, uids = generate_uid(), []
    for k in (2, 0, 1)[:n]:
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        x, y, z = (float(v) for v in base.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * k]
        ds.SliceLocation = z + 5.0 * k
        ds.save_as(folder / f"file{len(uids)}.dcm")
        uids.append((z + 5.0 * k, ds.SOPInstanceUID))
    return [uid for _, uid in sorted(uids)]  # by position along the normal = the volume's slice order


def test_seg_of_a_series_matches_slices(tmp_path, rng):
    import highdicom as hd

    folder = tmp_path / "series"
    uids_by_z = ct_series(folder)
    volume = read_image(folder)
    assert volume.array.shape == (3, 128, 128)
    masks = random_masks(rng, (3, 3, 128, 128))
    masks[0, :, 10:20, 10:20] = False
    masks[0, 1, 10:20, 10:20] = True  # a mark only on the middle slice
    out = write_dicom_seg(folder, make_result(volume, masks, ["opacity", "nodule", "empty"], True), tmp_path / "s.dcm")
    seg = hd.seg.segread(out)
    assert seg.SeriesDescription.startswith("AFLoc")
    ref = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert ref == set(uids_by_z)
    pixels = seg.get_pixels_by_source_instance(uids_by_z, segment_numbers=[1, 2, 3])
    assert pixels.shape == (3, 128, 128, 3)
    np.testing.assert_array_equal(np.moveaxis(pixels.astype(bool), -1, 0), masks)


def test_bad_inputs_write_nothing(sample_dicom, tmp_path):
    image = read_image(sample_dicom)
    wrong = make_result(image, np.zeros((1, 10, 10), bool), ["edema"])
    with pytest.raises(AFLocError, match="do not fit the DICOM source") as err:
        write_dicom_seg(sample_dicom, wrong, tmp_path / "x.dcm")
    assert str(sample_dicom) in str(err.value)
    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(ImageReadError, match="cannot read the DICOM header"):
        write_dicom_seg(png, make_result(image, np.zeros((1, 8, 8), bool), ["edema"]), tmp_path / "x.dcm")
    no_uid = tmp_path / "no_uid.dcm"
    shutil.copy(sample_dicom, no_uid)
    ds = pydicom.dcmread(no_uid)
    del ds.StudyInstanceUID
    ds.save_as(no_uid)
    with pytest.raises(ImageReadError, match="lacks StudyInstanceUID"):
        write_dicom_seg(
            no_uid, make_result(image, np.zeros((1, *image.array.shape), bool), ["edema"]), tmp_path / "x.dcm"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png", "no_uid.dcm"]


def test_cli_localize_writes_seg(sample_dicom, tmp_path, tiny_model):
    """``afloc localize --dicom-seg`` on the real radiograph: masks.dcm agrees with results.json."""
    import highdicom as hd

    from afloc_engine.checkpoint import ModelInfo, save_model
    from afloc_engine.cli import main

    model = save_model(tiny_model, tmp_path / "tiny", ModelInfo(name="tiny", version="1"), dtype=torch.float16)
    prompts = ["Findings suggesting pneumothorax", "Findings suggesting cardiomegaly"]
    args = ["localize", str(sample_dicom), "--out", str(tmp_path / "out"), "--model", str(model), "--device", "cpu"]
    args += [a for p in prompts for a in ("--prompt", p)] + ["--dicom-seg", "--no-overlay", "--progress", "none"]
    with pytest.warns(UserWarning, match="UNTRAINED"):
        assert main(args) == 0
    folder = tmp_path / "out" / sample_dicom.stem
    summary = json.loads((folder / "results.json").read_text())
    seg = hd.seg.segread(folder / "masks.dcm")
    uid = pydicom.dcmread(sample_dicom, stop_before_pixels=True).SOPInstanceUID
    pixels = seg.get_pixels_by_source_instance([uid], segment_numbers=[1, 2])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["pneumothorax", "cardiomegaly"]
    assert [int(pixels[0, ..., i].sum()) for i in range(2)] == [p["mask_pixels"] for p in summary["prompts"]]
