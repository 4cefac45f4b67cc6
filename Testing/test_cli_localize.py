"""`afloc localize` writes heatmaps, a Slicer segmentation, results.json and an overlay that read back
with the input's geometry; bad input exits 2 and writes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from afloc_engine.checkpoint import ModelInfo, save_model
from afloc_engine.cli import main


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    return save_model(tiny_model, tmp_path_factory.mktemp("m") / "tiny", ModelInfo(name="tiny", trained=True))


@pytest.fixture()
def radiograph(tmp_path):
    """A 2D NRRD with non-trivial spacing, origin and a rotated direction."""
    array = np.random.default_rng(0).normal(100, 10, (90, 120)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.4, 0.3))
    image.SetOrigin((12.5, -7.0))
    image.SetDirection((0.0, -1.0, 1.0, 0.0))
    path = tmp_path / "chest.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def test_localize_outputs_read_back_with_input_geometry(model_dir, radiograph, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "localize",
            str(radiograph),
            "--prompt",
            "Findings suggesting pneumothorax",
            "--prompt",
            "Small left pleural effusion",
            "--out",
            str(out),
            "--model",
            str(model_dir),
            "--threshold",
            "0.2",
            "--progress",
            "none",
        ]
    )
    assert code == 0
    folder = out / "chest"
    results = json.loads((folder / "results.json").read_text())
    assert results["threshold"] == 0.2 and results["trained"] is True
    assert [p["prompt"] for p in results["prompts"]] == [
        "Findings suggesting pneumothorax",
        "Small left pleural effusion",
    ]
    assert all(0 <= p["probability"] <= 1 for p in results["prompts"])
    src = sitk.ReadImage(str(radiograph))
    heat = sitk.ReadImage(str(folder / results["prompts"][0]["heatmap"]))
    assert heat.GetSize() == src.GetSize()
    assert heat.GetSpacing() == pytest.approx(src.GetSpacing())
    assert heat.GetOrigin() == pytest.approx(src.GetOrigin())
    assert heat.GetDirection() == pytest.approx(src.GetDirection())
    h = sitk.GetArrayFromImage(heat)
    assert h.dtype == np.float32 and -1 <= h.min() and h.max() <= 1
    seg = slicerio.read_segmentation(str(folder / "masks.seg.nrrd"))
    assert slicerio.segment_names(seg) == ["pneumothorax", "Small left pleural effusion"]
    mask = slicerio.segment_mask(seg, slicerio.segment_from_name(seg, "pneumothorax"))
    # slicerio voxels are (i, j, k): transpose back to the image's (row, col)
    np.testing.assert_array_equal(mask[..., 0].T, h > 0.2)
    assert seg["ijkToLPS"][:2, 3] == pytest.approx([12.5, -7.0])
    assert (folder / "overlay.png").stat().st_size > 1000
    assert str(folder) in capsys.readouterr().out


def test_json_progress_lines_for_a_gui(model_dir, radiograph, tmp_path, capsys):
    code = main(
        [
            "localize",
            str(radiograph),
            "--prompt",
            "edema",
            "--out",
            str(tmp_path / "o"),
            "--model",
            str(model_dir),
            "--progress",
            "json",
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in lines] == ["progress", "done"]
    assert lines[0]["step"] == 1 and lines[0]["total"] == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b""), "0 bytes"),
        (lambda p: p.write_text("plain text"), "not an image"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(model_dir, radiograph, tmp_path, capsys, make, message):
    bad = tmp_path / "bad.png"
    make(bad)
    out = tmp_path / "out"
    code = main(
        [
            "localize",
            str(radiograph),
            str(bad),
            "--prompt",
            "edema",
            "--out",
            str(out),
            "--model",
            str(model_dir),
            "--progress",
            "none",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and str(bad) in err
    assert not out.exists()  # the good input was not half-processed either


def test_bad_prompt_and_bad_model_exit_2(model_dir, radiograph, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["localize", str(radiograph), "--prompt", "  ", "--out", str(out), "--model", str(model_dir)]) == 2
    assert "empty prompt" in capsys.readouterr().err
    assert main(["localize", str(radiograph), "--prompt", "x" * 600, "--out", str(out), "--model", str(model_dir)]) == 2
    assert "characters long" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    assert main(["localize", str(radiograph), "--prompt", "edema", "--out", str(out), "--model", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and "model.safetensors" in err
    assert not out.exists() or not any(out.iterdir())
