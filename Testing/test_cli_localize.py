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
    assert [e["event"] for e in lines] == ["progress"] * 5 + ["done"]
    # a GUI shows movement from the first second: the phases, then the finished image
    assert [e.get("phase") for e in lines[:4]] == ["reading", "loading", "running", "writing"]
    assert lines[4]["step"] == 1 and lines[4]["total"] == 1


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


def _localize(model_dir, inputs, out, *extra):
    args = ["localize", *map(str, inputs), "--out", str(out), "--model", str(model_dir), "--progress", "none"]
    return main([*args, *extra])


def _prompt_args(prompts):
    return [a for p in prompts for a in ("--prompt", p)]


def _slicer_segment_names(path):
    """Segment names as Slicer's own reader (slicer-core's vtkMRMLSegmentationStorageNode) reads them."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (headless MRML) is not installed")
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    seg = node.GetSegmentation()
    return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]


UNICODE_PROMPTS = [
    "Pleural effusion (≥ 2 cm)",
    "épanchement pleural",
    "胸腔积液",
    "Findings suggesting\nlarge right\tpneumothorax",  # pasted report text
]


def test_unicode_and_multiline_prompts_round_trip(model_dir, radiograph, tmp_path, capsys):
    out = tmp_path / "out"
    assert _localize(model_dir, [radiograph], out, *_prompt_args(UNICODE_PROMPTS)) == 0
    folder = out / "chest"
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    cleaned = [*UNICODE_PROMPTS[:3], "Findings suggesting large right pneumothorax"]
    assert [p["prompt"] for p in results["prompts"]] == cleaned
    expected = ["Pleural effusion (>= 2 cm)", "epanchement pleural", None, "large right pneumothorax"]
    names_io = slicerio.segment_names(slicerio.read_segmentation(str(folder / "masks.seg.nrrd")))
    names_slicer = _slicer_segment_names(folder / "masks.seg.nrrd")
    assert names_io == names_slicer == [p["segment"] for p in results["prompts"]]
    for name, want in zip(names_io, expected):
        assert name.isascii() and name.isprintable() and name
        assert want is None or name == want
    heat_files = [p["heatmap"] for p in results["prompts"]]
    assert len(set(heat_files)) == 4 and all((folder / f).is_file() for f in heat_files)
    err = capsys.readouterr().err
    assert err.count('reads no word of "胸腔积液"') == 1  # the English text model cannot read it: said once


def test_repeated_prompts_are_merged_with_one_warning(model_dir, radiograph, tmp_path, capsys):
    out = tmp_path / "out"
    code = _localize(
        model_dir, [radiograph], out, "--prompt", "Findings suggesting pneumothorax", "--preset", "cxr", "--no-overlay"
    )
    assert code == 0
    results = json.loads((out / "chest" / "results.json").read_text())
    prompts = [p["prompt"] for p in results["prompts"]]
    assert len(prompts) == 14 and prompts.count("Findings suggesting pneumothorax") == 1
    heat_files = [p["heatmap"] for p in results["prompts"]]
    assert len(set(heat_files)) == 14 and "heatmap_pneumothorax.nrrd" in heat_files
    names = slicerio.segment_names(slicerio.read_segmentation(str(out / "chest" / "masks.seg.nrrd")))
    assert len(names) == 14 and names.count("pneumothorax") == 1
    warnings = [line for line in capsys.readouterr().err.splitlines() if "repeated prompt" in line]
    assert len(warnings) == 1 and "pneumothorax" in warnings[0]


def _listed_files(results):
    files = results["files"]
    listed = [*files["heatmaps"], *(files[k] for k in files if k != "heatmaps")]
    assert len(listed) == len(set(listed)), f"a file is listed twice: {listed}"
    return set(listed)


def test_results_json_lists_exactly_the_files_written(model_dir, radiograph, tmp_path):
    out = tmp_path / "out"
    assert _localize(model_dir, [radiograph], out, "--prompt", "edema", "--prompt", "Edema of the left lung") == 0
    folder = out / "chest"
    results = json.loads((folder / "results.json").read_text())
    assert _listed_files(results) == {p.name for p in folder.iterdir()}
    assert results["files"]["heatmaps"] == [p["heatmap"] for p in results["prompts"]]


def test_dicom_seg_is_written_and_listed_for_a_dicom(model_dir, tmp_path):
    pydicom_data = pytest.importorskip("pydicom.data")
    dcm = pydicom_data.get_testdata_file("CT_small.dcm")
    if dcm is None:
        pytest.skip("pydicom-data is not installed")
    out = tmp_path / "out"
    prompts = ["edema", "Pleural effusion (≥ 2 cm)", "胸腔积液"]
    assert _localize(model_dir, [dcm], out, *_prompt_args(prompts), "--dicom-seg") == 0
    folder = out / "CT_small"
    results = json.loads((folder / "results.json").read_text())
    assert results["files"]["dicom_seg"] == "masks.dcm"
    assert _listed_files(results) == {p.name for p in folder.iterdir()}
    import pydicom

    seg = pydicom.dcmread(folder / "masks.dcm")
    assert seg.Modality == "SEG" and [s.SegmentLabel for s in seg.SegmentSequence] == prompts  # any script


def test_dicom_seg_on_a_non_dicom_says_so(model_dir, radiograph, tmp_path, capsys):
    out = tmp_path / "out"
    assert _localize(model_dir, [radiograph], out, "--prompt", "edema", "--dicom-seg") == 0
    assert not (out / "chest" / "masks.dcm").exists()
    lines = [line for line in capsys.readouterr().err.splitlines() if "--dicom-seg" in line]
    assert len(lines) == 1 and "not a DICOM" in lines[0] and str(radiograph) in lines[0]


def test_overlay_shows_the_mask_outline_on_a_large_image(model_dir, tmp_path):
    """The overlay of a radiograph-sized image keeps a visible outline (as the README's picture)."""
    from PIL import Image

    array = np.random.default_rng(1).normal(100, 10, (1500, 1200)).astype(np.float32)
    path = tmp_path / "large.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    out = tmp_path / "out"
    assert _localize(model_dir, [path], out, "--prompt", "edema", "--threshold", "0.2") == 0
    folder = out / "large"
    results = json.loads((folder / "results.json").read_text())
    assert results["prompts"][0]["mask_pixels"] > 0
    rgb = np.asarray(Image.open(folder / "overlay.png").convert("RGB")).astype(int)
    blue = np.array([80, 160, 255])  # the README picture's outline colour (outputs.MASK_OUTLINE_RGB)
    outline = np.all(np.abs(rgb - blue) <= 2, axis=-1)
    assert outline.sum() >= 100  # a closed 2 px line around the mask, not a few blurred pixels


def _assert_refused(capsys, code, *must_contain):
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    for text in must_contain:
        assert text in lines[0]
    return captured


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("progress", ["none", "json"])
def test_out_that_is_a_file_exits_2_with_one_line(model_dir, radiograph, tmp_path, capsys, progress):
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    before = _tree(tmp_path)
    code = main(["localize", str(radiograph), "--prompt", "edema", "--out", str(out), "--model", str(model_dir),
                 "--progress", progress])  # fmt: skip
    captured = _assert_refused(capsys, code, str(out), "is a file")
    assert out.read_text() == "keep me" and _tree(tmp_path) == before
    if progress == "json":
        events = [json.loads(line) for line in captured.out.splitlines()]
        assert events == [{"event": "error", "message": events[0]["message"], "path": str(out)}]
        assert "is a file" in events[0]["message"]


def test_out_below_a_file_exits_2_with_one_line(model_dir, radiograph, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    before = _tree(tmp_path)
    code = _localize(model_dir, [radiograph], blocker / "sub" / "out", "--prompt", "edema")
    _assert_refused(capsys, code, str(blocker))
    assert _tree(tmp_path) == before


def test_unwritable_out_exits_2_with_one_line(model_dir, radiograph, tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        target = "/sys/afloc-out"  # root ignores permission bits; sysfs refuses new folders to anyone
        if os.path.exists("/sys/afloc-out") or not os.path.isdir("/sys"):
            pytest.skip("no sysfs to test an unwritable folder as root")
        out = __import__("pathlib").Path(target) / "run"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        out = locked / "run"
    code = _localize(model_dir, [radiograph], out, "--prompt", "edema")
    _assert_refused(capsys, code, "cannot write")
    assert not out.exists()


@pytest.mark.parametrize("device", ["gpu", "cuda0", "tpu"])
def test_unknown_device_exits_2_before_the_model_is_loaded(radiograph, tmp_path, capsys, device):
    out = tmp_path / "out"
    missing_model = tmp_path / "no-such-model"  # never reached: the device is checked first
    code = main(["localize", str(radiograph), "--prompt", "edema", "--out", str(out), "--model", str(missing_model),
                 "--device", device, "--progress", "json"])  # fmt: skip
    captured = _assert_refused(capsys, code, f"unknown --device '{device}'")
    assert [json.loads(line)["event"] for line in captured.out.splitlines()] == ["error"]
    assert not out.exists()


def test_any_afloc_error_is_a_json_error_event(model_dir, radiograph, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["localize", str(radiograph), "--prompt", "\n\t", "--out", str(out), "--model", str(model_dir),
                 "--progress", "json"])  # fmt: skip
    captured = _assert_refused(capsys, code, "empty prompt")
    assert [json.loads(line)["event"] for line in captured.out.splitlines()] == ["error"]
    assert not out.exists()
