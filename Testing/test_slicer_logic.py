"""AFLocSlicer logic on a real (headless) MRML scene, with the real engine CLI in a background process.

Only the GUI shell is faked (see slicer_fakes.py); these tests need no qt.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (headless MRML) is not installed")

import slicer  # noqa: E402
import slicer_fakes as sf  # noqa: E402
from AFLocSlicerLib import Process, Scene, SceneResults, Server  # noqa: E402
from AFLocSlicerLib.Errors import AFLocSlicerError, JobCancelled  # noqa: E402
from AFLocSlicerLib.Logic import AFLocLogic  # noqa: E402
from AFLocSlicerLib.Tasks import uncertaintyScore  # noqa: E402

TIMEOUT = 180


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model):
    """The tiny test model saved as a model folder the CLI can load (--model DIR)."""
    from afloc_engine.checkpoint import ModelInfo, save_model

    return save_model(tiny_model, tmp_path_factory.mktemp("models") / "tiny", ModelInfo(name="tiny", version="test"))


@pytest.fixture()
def scene():
    return sf.make_scene()


@pytest.fixture()
def engine_env(tmp_path):
    env = dict(os.environ)
    env["AFLOC_HOME"] = str(tmp_path / "afloc_home")
    env["OMP_NUM_THREADS"] = "2"
    return env


@pytest.fixture()
def logic(scene, engine_env, tmp_path):
    """The logic as Slicer makes it: jobs run on the session's warm engine (stopped at the end)."""
    lg = AFLocLogic(scene, python=sys.executable, env=engine_env, adaptersDir=tmp_path / "adapters")
    assert lg.parameters.node is not None  # the parameter node exists before any snapshot, as in Slicer
    yield lg
    lg.shutdown()


@pytest.fixture()
def cold_logic(scene, engine_env, tmp_path):
    """One engine process per job (``warm=False``): for stand-in engines that only speak the one-shot CLI."""
    lg = AFLocLogic(scene, python=sys.executable, env=engine_env, adaptersDir=tmp_path / "adapters", warm=False)
    assert lg.parameters.node is not None
    return lg


def assert_mask_is_heat_above(mask, heat, threshold):
    """mask == heat > threshold, except within half a step of the heatmap files' 8-bit precision
    (the engine thresholds the computed heatmap, the files hold it rounded to multiples of 1/127)."""
    differ = mask != (heat > threshold)
    assert np.all(np.abs(heat[differ] - threshold) <= 0.5 / 127 + 1e-6), int(differ.sum())


def ijk_to_ras(node):
    return Scene.ijkToRasArray(node)


def assert_same_geometry(node, reference):
    """IJK-to-RAS equal to the reference's. Slicer re-normalises direction vectors whenever a volume's
    orientation is set, so oblique directions can differ in the last bit (1e-17); nothing more is allowed."""
    np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras(reference), rtol=0, atol=1e-12)


def read_nrrd(path):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# --- end to end ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_dicom_radiograph_end_to_end(scene, logic, sample_dicom, tiny_model_dir):
    study = sf.study_item(scene)
    volume = sf.load_dicom_volume(scene, sample_dicom, parent_item=study)
    before = sf.scene_snapshot(scene)
    prompts = ["Findings suggesting pneumothorax", "pleural effusion"]
    progress = []
    task = logic.startLocalization(volume, prompts, model=str(tiny_model_dir), device="cpu", onProgress=progress.append)
    work_dir = task.workDir
    results = task.wait(TIMEOUT)

    assert progress and progress[-1].step == progress[-1].total == 1
    assert not work_dir.exists(), "the temporary folder must be removed after the run"
    # heatmaps: float scalar volumes with exactly the input's geometry and voxel grid
    assert len(results.heatmaps) == 2
    for heat in results.heatmaps:
        assert heat.IsA("vtkMRMLScalarVolumeNode") and not heat.IsA("vtkMRMLLabelMapVolumeNode")
        assert heat.GetImageData().GetScalarTypeAsString() == "float"
        assert heat.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
        assert np.array_equal(ijk_to_ras(heat), ijk_to_ras(volume))
        values = Scene.volumeArray(heat)
        assert values.min() >= -1.0001 and values.max() <= 1.0001
        display = heat.GetDisplayNode()
        assert display.GetColorNode().GetAttribute(Scene.ROLE) == "colormap"
        assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
    # the colour table reads as a heatmap: perceptually ordered (luminance rises with heat), transparent
    # where the finding is unlikely, opacity rising smoothly (no step: the old table jumped 0 -> 0.3 in 0.05)
    lut = results.heatmaps[0].GetDisplayNode().GetColorNode().GetLookupTable()
    rgba = np.array([lut.GetTableValue(i) for i in range(256)])
    luminance = rgba[:, :3] @ [0.2126, 0.7152, 0.0722]
    assert np.all(np.diff(luminance) > 0)
    assert np.all(rgba[:26, 3] == 0.0) and rgba[-1, 3] > 0.9
    assert np.all(np.diff(rgba[:, 3]) >= 0) and np.abs(np.diff(rgba[:, 3])).max() < 0.02  # 8-bit alpha steps
    # segmentation: one segment per prompt, names = findings, standard codes, input as reference geometry
    seg_node = results.segmentation
    assert seg_node.IsA("vtkMRMLSegmentationNode")
    assert results.findings == ["pneumothorax", "pleural effusion"]
    terms = [seg_node.GetSegmentation().GetSegment(s).GetTerminology() for s in results.segmentIds]
    assert "SCT^36118008^Pneumothorax" in terms[0] and "SCT^60046008^Pleural effusion" in terms[1]
    assert seg_node.GetNodeReference(seg_node.GetReferenceImageGeometryReferenceRole()).GetID() == volume.GetID()
    # masks: the engine's masks.seg.nrrd landed on the input's grid = heatmap > threshold
    for heat, segment_id in zip(results.heatmaps, results.segmentIds):
        mask = Scene.segmentMask(seg_node, segment_id, volume)
        assert_mask_is_heat_above(mask, Scene.volumeArray(heat), results.threshold)
    # probabilities in a table, in prompt order
    table = results.table.GetTable()
    assert results.table.IsA("vtkMRMLTableNode") and table.GetNumberOfRows() == 2
    assert [table.GetValueByName(r, "Finding").ToString() for r in range(2)] == results.findings
    probs = [table.GetValueByName(r, "Probability").ToDouble() for r in range(2)]
    assert probs == pytest.approx(results.probabilities) and all(0 <= p <= 1 for p in probs)
    # beside the input (in its study) in the subject hierarchy
    sh = Scene.subjectHierarchy(scene)
    for node in results.nodes():
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    # found again from the scene alone
    again = logic.resultsFor(volume)
    assert [n.GetID() for n in again.heatmaps] == [n.GetID() for n in results.heatmaps]
    assert again.segmentIds == results.segmentIds and again.prompts == results.prompts
    # removing the outputs leaves the scene as it was
    logic.removeResults(results)
    assert sf.scene_snapshot(scene) == before


def test_export_shows_the_model_what_the_clinician_sees(scene, sample_dicom, tmp_path):
    """MONOCHROME1: Slicer keeps the stored values and inverts the display; the exported image is inverted,
    so the engine gets the same pixels as when it reads the DICOM itself."""
    from afloc_engine.io import read_image

    volume = sf.load_dicom_volume(scene, sample_dicom)
    assert volume.GetDisplayNode().GetInvertDisplayScalarRange()
    exported = read_image(Scene.exportVolume(volume, tmp_path / "x.nrrd"))
    direct = read_image(sample_dicom)
    assert exported.array.shape == direct.array.shape
    assert np.allclose(exported.array, direct.array)
    assert np.allclose(exported.spacing, direct.spacing)


@pytest.mark.slow
def test_covid_image_oblique_geometry_and_heatmap_voxels(scene, logic, shared_data, tiny_model_dir):
    image = shared_data / "covid-cxr" / "images" / "bfa05dd7fa04.jpg"
    m = sf.oblique_ijk_to_ras((0.6, 0.7, 1.5), (12.0, -40.0, 7.5))
    volume = sf.load_raster_volume(scene, image, m)
    assert not np.allclose(ijk_to_ras(volume)[:3, :3], np.diag(np.diag(ijk_to_ras(volume)[:3, :3])))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    volume.SetAndObserveTransformNodeID(transform.GetID())

    task = logic.startLocalization(volume, ["ground glass opacity"], model=str(tiny_model_dir), device="cpu")
    engine_files = {}

    original_finish = task.finish

    def keep_copy():  # read what the engine wrote (the folder its done line names) before the task cleans up
        folder = Path(task.doneEvent()["outputs"][0])
        engine_files["heat"] = read_nrrd(next(folder.glob("heatmap_*.nrrd")))
        return original_finish()

    task.finish = keep_copy
    results = task.wait(TIMEOUT)
    heat = results.heatmaps[0]
    assert_same_geometry(heat, volume)  # the oblique direction is kept
    assert heat.GetTransformNodeID() == transform.GetID() == results.segmentation.GetTransformNodeID()
    engine = engine_files["heat"].reshape(Scene.volumeArray(heat).shape)
    assert np.array_equal(Scene.volumeArray(heat), engine)  # same voxels, not transposed or flipped


# --- threshold, label map ---------------------------------------------------------------------------
def engine_results_folder(tmp_path, image_path, heatmaps, prompts, threshold=0.3, probabilities=None):
    """An engine output folder written by the engine's own writer from heatmaps we choose."""
    from afloc_engine.inference import LocalizationResult
    from afloc_engine.io import read_image
    from afloc_engine.outputs import write_results
    from afloc_engine.prompts import negative_prompt

    image = read_image(image_path)
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    result = LocalizationResult(
        prompts,
        heatmaps,
        heatmaps > threshold,
        np.asarray(probabilities or [0.5] * len(prompts), dtype=np.float32),
        threshold,
        image,
        "test@1:constructed",
        True,
        [negative_prompt(p) for p in prompts],
    )
    return write_results(result, tmp_path / "engine_out" / "input", overlay=False)


def square_heatmap(shape, box, low=-1.0, high=1.0):
    """(H, W) heatmap: a smooth bump inside ``box`` = (row0, row1, col0, col1), ``low`` elsewhere."""
    h = np.full(shape, low, dtype=np.float32)
    r0, r1, c0, c1 = box
    rows = np.linspace(-1, 1, r1 - r0)[:, None]
    cols = np.linspace(-1, 1, c1 - c0)[None, :]
    bump = 1 - np.maximum(np.abs(rows), np.abs(cols))  # 1 at the centre, 0 at the edge
    h[r0:r1, c0:c1] = low + (high - low) * (0.4 + 0.6 * bump)
    return h


@pytest.fixture()
def constructed(scene, logic, tmp_path):
    """A volume with engine results imported from heatmaps we know (no network)."""
    rng = np.random.default_rng(0)
    array = (rng.random((1, 96, 128)) * 1000).astype(np.int16)
    volume = sf.add_volume(scene, array, sf.oblique_ijk_to_ras((0.5, 0.4, 1.0), (3.0, 4.0, 5.0)), "chest")
    exported = Scene.exportVolume(volume, tmp_path / "chest.nrrd")
    heat_a = square_heatmap((96, 128), (20, 60, 30, 90))
    heat_b = np.clip(np.linspace(-1, 1, 96 * 128).reshape(96, 128), -1, 1).astype(np.float32)
    folder = engine_results_folder(
        tmp_path, exported, [heat_a, heat_b], ["Findings suggesting pneumothorax", "lung lesion"]
    )
    before = sf.scene_snapshot(scene)
    results = SceneResults.importResults(scene, volume, folder)
    return volume, results, before, [heat_a, heat_b]


def test_threshold_slider_updates_masks_without_the_network(logic, constructed, monkeypatch):
    volume, results, before, heats = constructed
    monkeypatch.setattr(Process.EngineProcess, "start", lambda self: pytest.fail("the network must not run"))
    monkeypatch.setattr(Server.EngineServer, "start", lambda self: pytest.fail("the network must not run"))
    heats = [Scene.volumeArray(h)[0].copy() for h in results.heatmaps]  # as the files hold them (8-bit steps)
    for threshold in (0.5, -0.2, 0.9):
        masks = logic.updateMasks(results, threshold)
        for heat, segment_id, mask in zip(heats, results.segmentIds, masks):
            expected = heat[None] > threshold
            assert np.array_equal(mask, expected)
            assert np.array_equal(Scene.segmentMask(results.segmentation, segment_id, volume), expected)
        pixels = [results.table.GetTable().GetValueByName(r, "Mask pixels").ToInt() for r in range(2)]
        assert pixels == [int((h > threshold).sum()) for h in heats]
    assert logic.resultsFor(volume).threshold == 0.9
    with pytest.raises(AFLocSlicerError, match="outside"):
        logic.updateMasks(results, 1.5)


def test_labelmap_on_request_follows_the_threshold_and_is_removed(scene, logic, constructed):
    volume, results, before, _ = constructed
    heats = [Scene.volumeArray(h)[0].copy() for h in results.heatmaps]  # as the files hold them (8-bit steps)
    label = logic.exportLabelmap(results)
    assert label.IsA("vtkMRMLLabelMapVolumeNode")
    assert_same_geometry(label, volume)
    values = Scene.volumeArray(label)
    assert values.shape == (1, 96, 128)
    assert set(np.unique(values)) <= {0, 1, 2}
    assert np.array_equal(values > 0, (heats[0] > 0.3)[None] | (heats[1] > 0.3)[None])
    logic.updateMasks(results, 0.8)
    assert np.array_equal(Scene.volumeArray(label) > 0, (heats[0] > 0.8)[None] | (heats[1] > 0.8)[None])
    logic.removeResults(logic.resultsFor(volume))
    assert sf.scene_snapshot(scene) == before


def test_show_results_puts_the_heatmap_over_the_input(scene, logic, constructed):
    volume, results, before, _ = constructed
    logic.showResults(results, index=1, opacity=0.7)
    composite = sf.slice_logic_of(scene).GetSliceCompositeNode()
    assert composite.GetBackgroundVolumeID() == volume.GetID()
    assert composite.GetForegroundVolumeID() == results.heatmaps[1].GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.7)
    logic.removeResults(results)
    assert composite.GetForegroundVolumeID() is None
    assert sf.scene_snapshot(scene) == before


def test_import_is_all_or_nothing(scene, logic, tmp_path):
    array = np.zeros((1, 40, 50), np.int16)
    volume = sf.add_volume(scene, array, name="img")
    exported = Scene.exportVolume(volume, tmp_path / "img.nrrd")
    folder = engine_results_folder(tmp_path, exported, [np.zeros((40, 50)), np.ones((40, 50)) * 0.5], ["a b", "c d"])
    second = next(p for p in folder.glob("heatmap_*.nrrd") if "c_d" in p.name)
    second.write_bytes(b"NRRD0004\ntruncated")
    before = sf.scene_snapshot(scene)
    with pytest.raises(AFLocSlicerError, match="heatmap"):
        SceneResults.importResults(scene, volume, folder)
    assert sf.scene_snapshot(scene) == before
    # a heatmap of the wrong size (results of another image) is refused too
    other = sf.add_volume(scene, np.zeros((1, 30, 50), np.int16), name="other")
    before = sf.scene_snapshot(scene)
    folder = engine_results_folder(tmp_path, exported, [np.zeros((40, 50))], ["a b"])
    with pytest.raises(AFLocSlicerError, match="voxels"):
        SceneResults.importResults(scene, other, folder)
    assert sf.scene_snapshot(scene) == before


# --- bad input ------------------------------------------------------------------------------------
def test_bad_inputs_give_clear_messages_and_add_nothing(scene, logic):
    good = sf.add_volume(scene, np.zeros((1, 32, 32), np.int16), name="good")
    rgb = sf.add_volume(scene, np.zeros((1, 32, 32, 3), np.uint8), name="photo", node_class="vtkMRMLVectorVolumeNode")
    four_d = None
    if hasattr(slicer, "vtkMRMLMultiVolumeNode"):  # MultiVolume nodes exist in the Slicer application only
        four_d = sf.add_volume(scene, np.zeros((4, 8, 8, 5), np.int16), name="dce", node_class="vtkMRMLMultiVolumeNode")
    frame = sf.add_volume(scene, np.zeros((4, 8, 8), np.int16), name="frame")
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "cine")
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "cine seq")
    browser.AddSynchronizedSequenceNodeID(sequence.GetID())
    browser.AddProxyNode(frame, sequence, False)
    label = sf.add_volume(scene, np.zeros((1, 8, 8), np.uint8), name="labels", node_class="vtkMRMLLabelMapVolumeNode")
    before = sf.scene_snapshot(scene)
    cases = [
        (None, ["pneumothorax"], "No input volume"),
        (rgb, ["pneumothorax"], "'photo' is a vector"),
        (frame, ["pneumothorax"], "'frame' is one frame of the 4D sequence 'cine'"),
        (label, ["pneumothorax"], "'labels' is a label map"),
        (good, ["   "], "empty prompt"),
        (good, ["?!"], "empty prompt"),
        (good, [], "no prompt"),
    ]
    if four_d is not None:
        cases.append((four_d, ["pneumothorax"], "'dce' is a 4D volume"))
    for volume, prompts, message in cases:
        with pytest.raises(AFLocSlicerError, match=message):
            logic.startLocalization(volume, prompts)
        assert sf.scene_snapshot(scene) == before


@pytest.mark.slow
def test_cancel_kills_the_job_and_leaves_the_scene(scene, logic, tiny_model_dir):
    volume = sf.add_volume(scene, np.zeros((1, 64, 64), np.int16), name="img")
    before = sf.scene_snapshot(scene)
    task = logic.startLocalization(volume, ["pneumothorax"], model=str(tiny_model_dir), device="cpu")
    pid, work_dir = logic.server.proc.pid, task.workDir
    time.sleep(0.5)
    assert task.poll()
    task.cancel()
    with pytest.raises(JobCancelled):
        task.wait(30)
    assert task.process.state == Process.CANCELLED
    with pytest.raises(ProcessLookupError):  # Cancel kills the warm engine (its whole process group)
        os.kill(pid, 0)
    assert not work_dir.exists()
    assert sf.scene_snapshot(scene) == before
    # the next job starts a new engine
    results = logic.localize(volume, ["pneumothorax"], model=str(tiny_model_dir), device="cpu", timeout=TIMEOUT)
    assert len(results.heatmaps) == 1 and logic.server.alive and logic.server.proc.pid != pid


def test_engine_error_is_reported_and_nothing_added(scene, logic, tmp_path):
    volume = sf.add_volume(scene, np.zeros((1, 64, 64), np.int16), name="img")
    before = sf.scene_snapshot(scene)
    missing = tmp_path / "no_such_model"
    with pytest.raises(AFLocSlicerError) as err:
        logic.localize(volume, ["pneumothorax"], model=str(missing), device="cpu", timeout=TIMEOUT)
    assert "model folder not found" in str(err.value) and str(missing) in str(err.value)
    assert sf.scene_snapshot(scene) == before


def fake_python(tmp_path, body: str) -> str:
    """An executable standing in for the interpreter: runs ``body`` (bash) with the engine argv in "$@"."""
    path = tmp_path / "fake_python.sh"
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.slow
def test_gpu_out_of_memory_falls_back_to_cpu(scene, cold_logic, tmp_path, tiny_model_dir):
    logic = cold_logic
    calls = tmp_path / "calls.txt"
    logic.python = fake_python(
        tmp_path,
        f"""
        echo "$@" >> {calls}
        if [[ " $* " == *" --device cuda "* ]]; then
          echo "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB" >&2
          exit 1
        fi
        exec {sys.executable} "$@"
        """,
    )
    volume = sf.add_volume(scene, np.zeros((1, 64, 64), np.int16), name="img")
    logs = []
    results = logic.localize(
        volume, ["pneumothorax"], model=str(tiny_model_dir), device="gpu", onLog=logs.append, timeout=TIMEOUT
    )
    assert len(results.heatmaps) == 1
    runs = calls.read_text().splitlines()
    assert len(runs) == 2 and "--device cuda" in runs[0] and "--device cpu" in runs[1]
    assert any("running on the CPU" in line for line in logs)


# --- few-shot ---------------------------------------------------------------------------------------
def painted_segmentation(scene, volume, mask, name="pneumothorax"):
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume.GetName()} corrected")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment_id = seg.GetSegmentation().AddEmptySegment("", name, [1, 0, 0])
    Scene.setSegmentMask(seg, segment_id, mask, volume)
    return seg, segment_id


def test_training_examples_are_checked_and_stored(scene, logic):
    volume = sf.add_volume(scene, np.zeros((1, 40, 40), np.int16), name="a")
    mask = np.zeros((1, 40, 40), bool)
    mask[0, 5:15, 8:20] = True
    seg, sid = painted_segmentation(scene, volume, mask)
    example = logic.addTrainingExample(volume, seg, sid)
    assert example.finding == "pneumothorax"
    empty_seg, empty_id = painted_segmentation(scene, volume, np.zeros((1, 40, 40), bool), "effusion")
    with pytest.raises(AFLocSlicerError, match="'effusion' .* is empty on 'a'"):
        logic.addTrainingExample(volume, empty_seg, empty_id)
    full_seg, full_id = painted_segmentation(scene, volume, np.ones((1, 40, 40), bool), "all")
    with pytest.raises(AFLocSlicerError, match="covers all"):
        logic.addTrainingExample(volume, full_seg, full_id)
    with pytest.raises(AFLocSlicerError, match="Select a segment"):
        logic.addTrainingExample(volume, seg, "no-such-segment")
    logic.addTrainingExample(volume, seg, sid)  # the same pair again replaces, not duplicates
    assert [(e.volume.GetID(), e.segmentId) for e in logic.trainingExamples()] == [(volume.GetID(), sid)]
    assert logic.trainingExamples("Pneumothorax") and not logic.trainingExamples("effusion")
    scene.RemoveNode(seg)
    assert logic.trainingExamples() == []


FAKE_FINETUNE = """
import json, sys, time
from pathlib import Path
import numpy as np, SimpleITK as sitk
args = sys.argv[1:]
assert args[:3] == ["-m", "afloc_engine", "finetune"], args
def values(flag):
    i = args.index(flag) + 1
    out = []
    while i < len(args) and not args[i].startswith("--"):
        out.append(args[i]); i += 1
    return out
images, masks = values("--images"), values("--masks")
finding, out, device = values("--finding")[0], Path(values("--out")[0]), values("--device")[0]
checks = []
for image, mask in zip(images, masks):
    a, m = sitk.ReadImage(image), sitk.ReadImage(mask)
    checks.append({"same_grid": a.GetSize() == m.GetSize() and np.allclose(a.GetDirection(), m.GetDirection())
                   and np.allclose(a.GetOrigin(), m.GetOrigin()), "mask_pixels": int(sitk.GetArrayFromImage(m).sum())})
steps = int(values("--epochs")[0]) if "--epochs" in args else 3
for step in range(1, steps + 1):
    print(json.dumps({"event": "progress", "step": step, "total": steps, "loss": 1.0 / step, "eta_s": 0.1}), flush=True)
    time.sleep(SLEEP)
adapter = out / f"{finding}-20260101-000000"
adapter.mkdir(parents=True)
meta = {"finding": finding, "base_model_id": "tiny@test", "checks": checks, "device": device,
        "training_examples": [Path(i).name for i in images]}
(adapter / "adapter.json").write_text(json.dumps(meta))
(adapter / "adapter.safetensors").write_bytes(b"")
warnings = ["one example: give at least 3 examples"] if len(images) < 2 else []
print(json.dumps({"event": "done", "adapter": str(adapter), "warnings": warnings}), flush=True)
"""


def fake_finetune_engine(tmp_path, sleep=0.0):
    script = tmp_path / "fake_finetune.py"
    script.write_text(FAKE_FINETUNE.replace("SLEEP", repr(sleep)))
    return fake_python(tmp_path, f'exec {sys.executable} {script} "$@"\n')


def test_finetune_runs_in_background_and_installs_the_adapter(scene, cold_logic, tmp_path):
    """Against the documented ``afloc finetune`` interface, with a stand-in engine (the real one may not be here)."""
    logic = cold_logic
    logic.python = fake_finetune_engine(tmp_path)
    volumes = []
    for i in range(2):
        volume = sf.add_volume(
            scene, np.zeros((1, 40, 48), np.int16), sf.oblique_ijk_to_ras((0.5, 0.5, 1), (i, 0, 0)), f"v{i}"
        )
        mask = np.zeros((1, 40, 48), bool)
        mask[0, 10 + i : 20, 5:25] = True
        seg, sid = painted_segmentation(scene, volume, mask)
        logic.addTrainingExample(volume, seg, sid)
        volumes.append((volume, int(mask.sum())))
    assert logic.listAdapters() == []
    before = sf.scene_snapshot(scene)
    progress = []
    task = logic.startFinetune("pneumothorax", device="cpu", epochs=4, onProgress=progress.append)
    adapter = task.wait(60)
    assert [p.step for p in progress] == [1, 2, 3, 4] and progress[-1].fields["loss"] == pytest.approx(0.25)
    assert adapter.parent == logic.adaptersDir and (adapter / "adapter.json").is_file()
    meta = json.loads((adapter / "adapter.json").read_text())
    assert [c["mask_pixels"] for c in meta["checks"]] == [n for _, n in volumes]
    assert all(c["same_grid"] for c in meta["checks"])
    assert meta["training_examples"] == ["v0 / pneumothorax", "v1 / pneumothorax"]  # node names, not temp files
    listed = logic.listAdapters()
    assert [a["path"] for a in listed] == [str(adapter)] and listed[0]["finding"] == "pneumothorax"
    assert sf.scene_snapshot(scene) == before
    assert not task.workDir.exists()
    assert task.warnings == []  # two examples: the stand-in has nothing to warn about
    with pytest.raises(AFLocSlicerError, match="no training examples of 'effusion'"):
        logic.startFinetune("effusion")


def test_cancelled_finetune_installs_nothing(scene, cold_logic, tmp_path):
    logic = cold_logic
    logic.python = fake_finetune_engine(tmp_path, sleep=5.0)
    volume = sf.add_volume(scene, np.zeros((1, 40, 48), np.int16), name="v")
    mask = np.zeros((1, 40, 48), bool)
    mask[0, 10:20, 5:25] = True
    seg, sid = painted_segmentation(scene, volume, mask)
    logic.addTrainingExample(volume, seg, sid)
    task = logic.startFinetune("pneumothorax", epochs=50)
    deadline = time.monotonic() + 30
    while task.poll() and task.process.progress.step < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    task.cancel()
    with pytest.raises(JobCancelled):
        task.wait(30)
    assert logic.listAdapters() == [] and not task.workDir.exists()


def test_finetune_needs_an_engine_that_can(scene, cold_logic, tmp_path):
    """An engine without ``afloc finetune``: its own error is the message (no peeking at its argparse)."""
    logic = cold_logic
    logic.python = fake_python(
        tmp_path, "echo \"afloc: error: argument COMMAND: invalid choice: 'finetune'\" >&2\nexit 2\n"
    )
    volume = sf.add_volume(scene, np.zeros((1, 40, 48), np.int16), name="v")
    mask = np.zeros((1, 40, 48), bool)
    mask[0, 1:5, 1:5] = True
    seg, sid = painted_segmentation(scene, volume, mask)
    logic.addTrainingExample(volume, seg, sid)
    before = sf.scene_snapshot(scene)
    with pytest.raises(AFLocSlicerError, match="afloc finetune failed: .*invalid choice: 'finetune'"):
        logic.startFinetune("pneumothorax").wait(30)
    assert logic.listAdapters() == [] and sf.scene_snapshot(scene) == before


def test_uncertainty_score_prefers_unsure_images():
    sure = uncertaintyScore([0.99, 0.01], [np.full((10, 10), -0.9)], threshold=0.3)
    unsure = uncertaintyScore([0.5, 0.55], [np.full((10, 10), 0.32)], threshold=0.3)
    assert 0 <= sure["score"] < unsure["score"] <= 1
    assert unsure["entropy"] > 0.95 and unsure["ambiguity"] == 1.0
    assert sure["ambiguity"] == 0.0


@pytest.mark.slow
def test_suggest_next_image_ranks_unannotated_volumes_and_adds_nothing(scene, logic, tiny_model_dir):
    rng = np.random.default_rng(1)
    volumes = [sf.add_volume(scene, (rng.random((1, 48, 48)) * 100).astype(np.int16), name=f"cxr{i}") for i in range(3)]
    mask = np.zeros((1, 48, 48), bool)
    mask[0, 5:15, 5:15] = True
    seg, sid = painted_segmentation(scene, volumes[0], mask)
    logic.addTrainingExample(volumes[0], seg, sid)
    candidates = logic.suggestionCandidates()
    assert [v.GetName() for v in candidates] == ["cxr1", "cxr2"]
    before = sf.scene_snapshot(scene)
    task = logic.startSuggestion(["pneumothorax"], model=str(tiny_model_dir), device="cpu")
    suggestions = task.wait(TIMEOUT)
    assert {s.volume.GetName() for s in suggestions} == {"cxr1", "cxr2"}
    assert suggestions[0].score >= suggestions[1].score
    assert all(0 <= s.score <= 1 and len(s.probabilities) == 1 for s in suggestions)
    assert sf.scene_snapshot(scene) == before


@pytest.mark.slow
def test_finetune_with_the_real_engine(scene, logic, tiny_model_dir):
    import importlib.util

    if importlib.util.find_spec("afloc_engine.cli.finetune") is None:
        pytest.skip("this engine has no afloc finetune yet")
    rng = np.random.default_rng(0)
    for i in range(2):
        array = (rng.random((1, 64, 64)) * 200).astype(np.int16)
        array[0, 20 + i : 40, 10:30] += 800  # a bright "finding"
        volume = sf.add_volume(scene, array, name=f"train{i}")
        mask = np.zeros((1, 64, 64), bool)
        mask[0, 20 + i : 40, 10:30] = True
        seg, sid = painted_segmentation(scene, volume, mask, "nodule")
        logic.addTrainingExample(volume, seg, sid)
    before = sf.scene_snapshot(scene)
    progress = []
    task = logic.startFinetune("nodule", model=str(tiny_model_dir), device="cpu", epochs=2, onProgress=progress.append)
    adapter = task.wait(TIMEOUT)
    assert progress and progress[-1].step == progress[-1].total
    assert adapter.parent == logic.adaptersDir and (adapter / "adapter.json").is_file()
    listed = logic.listAdapters()
    assert listed[0]["path"] == str(adapter) and listed[0]["finding"] == "nodule"
    assert listed[0]["base_model"].startswith("tiny@test")
    assert sf.scene_snapshot(scene) == before


@pytest.mark.slow
def test_ct_volume_slice_by_slice(scene, logic, tiny_model_dir):
    """A 3D volume (CT-like, HU) gets 3D heatmaps and masks with the volume's exact geometry."""
    rng = np.random.default_rng(2)
    array = (rng.normal(-700, 200, size=(6, 40, 48))).astype(np.int16)
    array[:, 10:30, 10:38] = 40  # soft tissue
    m = sf.oblique_ijk_to_ras((0.8, 0.8, 2.5), (-100.0, 50.0, 300.0), angles=(0.1, 0.05, 0.2))
    volume = sf.add_volume(scene, array, m, "ct")
    before = sf.scene_snapshot(scene)
    results = logic.localize(
        volume, ["Findings suggesting pneumothorax"], model=str(tiny_model_dir), device="cpu", timeout=TIMEOUT
    )
    heat = results.heatmaps[0]
    assert Scene.volumeArray(heat).shape == (6, 40, 48)
    assert_same_geometry(heat, volume)
    mask = Scene.segmentMask(results.segmentation, results.segmentIds[0], volume)
    assert mask.shape == (6, 40, 48)
    assert_mask_is_heat_above(mask, Scene.volumeArray(heat), results.threshold)
    logic.removeResults(results)
    assert sf.scene_snapshot(scene) == before


def test_selected_adapter_is_passed_to_the_engine(scene, cold_logic, tmp_path):
    """With an adapter selected, localize gets ``--adapter PATH``; a folder that is no adapter is a clear error."""
    logic = cold_logic
    adapter = tmp_path / "adapters" / "pneumothorax-20260101-000000"
    adapter.mkdir(parents=True)
    (adapter / "adapter.json").write_text(json.dumps({"finding": "pneumothorax", "base_model_id": "tiny@test:1"}))
    argv_file = tmp_path / "argv.txt"
    logic.python = fake_python(tmp_path, f'printf "%s\\n" "$@" > {argv_file}\nexit 3\n')
    volume = sf.add_volume(scene, np.zeros((1, 32, 32), np.int16), name="img")
    with pytest.raises(AFLocSlicerError, match="afloc localize failed"):
        logic.localize(volume, ["pneumothorax"], adapter=str(adapter), timeout=30)
    argv = argv_file.read_text().splitlines()
    assert argv[argv.index("--adapter") + 1] == str(adapter)
    with pytest.raises(AFLocSlicerError, match="not an AFLoc adapter folder"):
        logic.startLocalization(volume, ["pneumothorax"], adapter=str(tmp_path))
    assert [a["name"] for a in logic.listAdapters()] == [adapter.name]


def test_parameters_survive_saving_the_scene(scene, logic, tmp_path):
    from AFLocSlicerLib.Parameters import AFLocParameters

    volume = sf.add_volume(scene, np.zeros((1, 8, 8), np.int16), name="img")
    params = logic.parameters
    params.inputVolume = volume
    params.prompts = ["Findings suggesting pleural effusion", "a free sentence"]
    params.threshold = 0.42
    params.device = "cpu"
    params.createLabelmap = True
    mask = np.zeros((1, 8, 8), bool)
    mask[0, 2:5, 2:5] = True
    seg, sid = painted_segmentation(scene, volume, mask)
    example = logic.addTrainingExample(volume, seg, sid, "effusion")
    assert params.trainingExamples == [example]  # node references, not IDs in a string
    with pytest.raises(AttributeError):
        params.thresold = 0.1  # a typo is an error, not a silent new setting
    path = tmp_path / "scene.mrml"
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")  # the painted mask is saved too
    storage.SetFileName(str(tmp_path / "corrected.seg.nrrd"))
    seg.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.WriteData(seg)
    scene.SetURL(str(path))
    assert scene.Commit()
    reloaded = sf.make_scene()
    reloaded.SetURL(str(path))
    assert reloaded.Connect()
    again = AFLocParameters.get(reloaded)
    assert again.prompts == params.prompts and again.threshold == pytest.approx(0.42)
    assert again.device == "cpu" and again.createLabelmap is True and again.opacity == 0.8
    (kept,) = again.trainingExamples
    assert (kept.volume.GetName(), kept.segmentation.GetName(), kept.segmentId, kept.finding) == (
        "img",
        seg.GetName(),
        sid,
        "effusion",
    )
    assert kept.volume.GetScene() is reloaded and kept.segmentation.GetScene() is reloaded
    assert again.inputVolume is not None and again.inputVolume.GetName() == "img"


def test_mask_area_in_pixels_without_spacing_and_share_of_the_image(scene, tmp_path, shared_data):
    """A PNG/JPEG has no pixel spacing: its mask area is in px (not mm² of assumed 1 mm pixels), written
    readably; a DICOM's is in mm²/cm². The table holds each mask's share of the image."""
    from AFLocSlicerLib.Scene import formatArea, spacingKnown

    jpeg = sf.load_raster_volume(scene, shared_data / "covid-cxr" / "images" / "d45d56d1db55.jpg")
    assert not spacingKnown(jpeg)
    assert formatArea(1117370, jpeg) == "1,117,370 px"
    dicom = sf.add_volume(scene, np.zeros((1, 10, 10), np.int16), np.diag([-0.2, -0.2, 1.0, 1.0]), "dcm")
    dicom.SetAttribute("DICOM.instanceUIDs", "1.2.3")
    assert spacingKnown(dicom) and formatArea(84898, dicom) == "34.0 cm²" and formatArea(100, dicom) == "4 mm²"
    h, w = Scene.volumeArray(jpeg).shape[1:]
    heat = square_heatmap((h, w), (100, 300, 100, 300))
    exported = Scene.exportVolume(jpeg, tmp_path / "jpeg.nrrd")
    results = SceneResults.importResults(scene, jpeg, engine_results_folder(tmp_path, exported, [heat], ["edema"]))
    table = results.table.GetTable()
    pixels = int((Scene.volumeArray(results.heatmaps[0]) > 0.3).sum())
    assert table.GetValueByName(0, "Mask area").ToString() == f"{pixels:,} px"
    assert table.GetValueByName(0, "Mask share (%)").ToDouble() == pytest.approx(100 * pixels / (h * w), abs=0.05)
    assert results.maskShares()[0] == pytest.approx(pixels / (h * w), abs=5e-4)
