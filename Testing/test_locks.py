"""Issue 18, the quick cases: one writer per folder, no silent loss, leftovers recovered, and environment
faults (disk full, read-only, permission denied, out of memory) as one line with exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from afloc_engine.checkpoint import ModelInfo, atomic_folder, clean_leftovers, commit_folder, recover_folder, save_model
from afloc_engine.cli import main
from afloc_engine.locks import LOCK_FILE, FolderLockedError, folder_lock, holder, sibling_lock

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
HOLD = (
    "import sys, time; from afloc_engine.locks import folder_lock\n"
    "with folder_lock(sys.argv[1], 'afloc test-holder'):\n"
    "    print('held', flush=True); time.sleep(float(sys.argv[2]))\n"
)


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    return save_model(tiny_model, tmp_path_factory.mktemp("m") / "tiny", ModelInfo(name="tiny", trained=True))


@pytest.fixture()
def image(tmp_path) -> Path:
    array = np.random.default_rng(0).normal(100, 10, (80, 96)).astype(np.float32)
    path = tmp_path / "chest.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def _holder(folder: Path, seconds: float) -> subprocess.Popen:
    """Another process holding ``folder``'s lock for ``seconds``; returns once it holds it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True, env=ENV, cwd=REPO
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _localize(model_dir, image, out, *extra) -> list[str]:
    return ["localize", str(image), "--out", str(out), "--model", str(model_dir), "--device", "cpu", *extra]


# --- the lock ----------------------------------------------------------------------------------------
def test_second_writer_is_refused_naming_the_holders_pid_and_waits_when_asked(tmp_path, capsys):
    folder = tmp_path / "run"
    proc = _holder(folder, 1.5)
    try:
        with pytest.raises(FolderLockedError, match=rf"PID {proc.pid} \(afloc test-holder\).*--wait"):
            with folder_lock(folder, "afloc second"):
                pass
        start = time.monotonic()
        with folder_lock(folder, "afloc second", wait=True, poll_s=0.05):
            waited = time.monotonic() - start
            assert holder(folder) == f"PID {os.getpid()} (afloc second)"
        assert waited > 0.3  # it blocked until the holder let go
        # and said once why nothing happened meanwhile
        assert capsys.readouterr().err.count(f"{folder}: waiting for PID {proc.pid} (afloc test-holder)") == 1
    finally:
        proc.kill()
        proc.wait()


def test_the_os_releases_the_lock_of_a_killed_holder(tmp_path):
    folder = tmp_path / "out"
    proc = _holder(folder, 60)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with folder_lock(folder, "afloc next"):  # no stale lock after kill -9
        pass


def test_a_file_in_the_way_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception, match="exists and is not a folder"):
        with folder_lock(tmp_path / "file", "afloc localize"):
            pass


# --- atomic folders ----------------------------------------------------------------------------------
def test_leftovers_of_dead_writers_are_recovered_and_live_ones_kept(tmp_path):
    final = tmp_path / "result"
    final.mkdir()
    (final / "a").write_text("new")
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f".result.{dead}.abcd1234.tmp"
    live = tmp_path / f".result.{os.getpid()}.efgh5678.tmp"
    legacy = tmp_path / ".result.ijkl9012.tmp"
    for folder in (stale, live, legacy):
        folder.mkdir()
    old_backup = tmp_path / "result.old.tmp"
    old_backup.mkdir()
    recover_folder(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["result", live.name])
    # a kill between the two renames of the backup route: the previous folder comes back
    shutil.rmtree(final)
    backup = tmp_path / f".result.{dead}.old.tmp"
    backup.mkdir()
    (backup / "a").write_text("previous")
    assert clean_leftovers(tmp_path) == [final]
    assert (final / "a").read_text() == "previous" and not backup.exists()


def test_commit_replaces_in_place_and_leaves_no_temporary(tmp_path):
    final = tmp_path / "x"
    for text in ("1", "2"):
        tmp = atomic_folder(final)
        assert tmp.name.startswith(f".x.{os.getpid()}.") and tmp.name.endswith(".tmp")
        (tmp / "a").write_text(text)
        commit_folder(tmp, final, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["x"] and (final / "a").read_text() == "2"
    assert oct((final / "a").stat().st_mode & 0o777) == "0o644"


# --- localize: no silent loss, one writer --------------------------------------------------------------
def test_localize_keeps_earlier_results_unless_overwrite(model_dir, image, tmp_path, capsys):
    out = tmp_path / "seq"
    assert main(_localize(model_dir, image, out, "--prompt", "pleural effusion", "--progress", "none")) == 0
    first = (out / "chest" / "results.json").read_text()
    capsys.readouterr()
    code = main(_localize(model_dir, image, out, "--prompt", "cardiomegaly", "--progress", "json"))
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "already holds results for chest" in lines[0] and "--overwrite" in lines[0]
    assert json.loads(captured.out.strip().splitlines()[-1])["event"] == "error"
    assert (out / "chest" / "results.json").read_text() == first  # the effusion result is still there
    assert main(_localize(model_dir, image, out, "--prompt", "cardiomegaly", "--overwrite", "--progress", "none")) == 0
    result = json.loads((out / "chest" / "results.json").read_text())
    assert [p["prompt"] for p in result["prompts"]] == ["cardiomegaly"]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "chest"]


def test_localize_while_another_writes_the_folder_exits_2_naming_its_pid(model_dir, image, tmp_path, capsys):
    out = tmp_path / "busy"
    proc = _holder(out, 60)
    try:
        assert main(_localize(model_dir, image, out, "--prompt", "edema", "--progress", "none")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"PID {proc.pid}" in err[0] and "--wait" in err[0]
        assert not (out / "chest").exists()
    finally:
        proc.kill()
        proc.wait()
    # --wait: blocks while the folder is held, then writes
    proc = _holder(out, 1.0)
    try:
        assert main(_localize(model_dir, image, out, "--prompt", "edema", "--wait", "--progress", "none")) == 0
        assert (out / "chest" / "results.json").is_file()
    finally:
        proc.kill()
        proc.wait()


def test_leftover_temporary_folders_are_cleaned_by_the_next_localize(model_dir, image, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    stale = out / f".chest.{2**22 + 7}.abcd1234.tmp"
    stale.mkdir()
    (stale / "heatmap_x.nrrd").write_bytes(b"half")
    assert main(_localize(model_dir, image, out, "--prompt", "edema", "--progress", "none")) == 0
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "chest"]


# --- environment faults: one line, exit 2, nothing half-written -------------------------------------
@pytest.mark.parametrize(
    "error, words",
    [
        (MemoryError(), "out of memory (CPU RAM)"),
        ("cuda", "out of memory on the GPU"),
    ],
)
def test_out_of_memory_is_one_line_with_a_json_error(model_dir, image, tmp_path, capsys, monkeypatch, error, words):
    import torch

    from afloc_engine.inference import AFLoc

    if error == "cuda":
        error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(AFLoc, "localize", fail)
    out = tmp_path / "o"
    assert main(_localize(model_dir, image, out, "--prompt", "edema", "--progress", "json")) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("afloc localize: error: ") and words in err[0]
    event = json.loads(captured.out.strip().splitlines()[-1])
    assert event["event"] == "error" and words in event["message"]
    assert not out.exists()  # nothing written


def _unshare_ok() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs mounts are Linux")
@pytest.mark.parametrize("mount, words", [("size=96k", "no space left on the device"), ("ro", "read-only file system")])
def test_full_or_read_only_disk_is_one_line_and_leaves_nothing(model_dir, sample_dicom, tmp_path, mount, words):
    """A real, tiny (or read-only) file system, mounted in a private mount namespace (unshare -rm)."""
    if not _unshare_ok():
        pytest.skip("unprivileged mount namespaces are not available here")
    disk = tmp_path / "disk"
    disk.mkdir()
    prompts = ["--prompt", "pleural effusion", "--prompt", "cardiomegaly", "--prompt", "edema"]
    cmd = [sys.executable, "-m", "afloc_engine", *_localize(model_dir, sample_dicom, disk / "out"), *prompts]
    script = (
        f'mount -t tmpfs -o {mount} tmpfs "{disk}" && "$@"; code=$?; '
        f'echo "LEFT: $(cd "{disk}" && find . -mindepth 1 | tr "\\n" " ")"; exit $code'
    )
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", *cmd, "--progress", "json"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    err = [line for line in proc.stderr.strip().splitlines() if "error" in line or "Traceback" in line]
    assert proc.returncode == 2, proc.stderr
    assert len(err) == 1 and err[0].startswith("afloc localize: error: ") and words in err[0], proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "error" and words in events[-1]["message"]
    left = proc.stdout.split("LEFT:")[-1].split()
    assert left == [], f"left on the full disk: {left}"  # nothing half-written, no temporary folder


def test_permission_denied_is_one_line(model_dir, image, tmp_path):
    base = Path(tempfile.mkdtemp(prefix="afloc-perm-"))  # readable by an unprivileged user
    try:
        os.chmod(base, 0o755)
        for path in (model_dir, model_dir.parent):
            os.chmod(path, 0o755)
        shutil.copy(image, base / "chest.nrrd")
        os.chmod(base / "chest.nrrd", 0o644)
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        os.chmod(locked, 0o555)
        cmd = [sys.executable, "-m", "afloc_engine", *_localize(model_dir, base / "chest.nrrd", locked / "out")]
        cmd += ["--prompt", "edema", "--progress", "none"]
        if os.geteuid() == 0:  # root ignores permissions: run as nobody
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "HOME": str(base)}, timeout=300)
        err = [line for line in proc.stderr.strip().splitlines() if "error" in line or "Traceback" in line]
        assert proc.returncode == 2 and len(err) == 1, proc.stderr
        assert "permission denied" in err[0].lower() and str(locked) in err[0]
        assert list(locked.iterdir()) == []
    finally:
        os.chmod(base / "locked", 0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_an_itk_write_failure_is_one_line_naming_the_output(model_dir, image, tmp_path, capsys, monkeypatch):
    """ITK reports a full disk as a RuntimeError without errno (seen writing to /dev/full): still one line."""
    message = (
        "Exception thrown in SimpleITK ImageFileWriter_Execute: itkNrrdImageIO.cxx:1349:\n"
        "ITK ERROR: NrrdImageIO(0x1): Write: Error writing heatmap_edema.nrrd:\n"
        "[nrrd] _nrrdEncodingGzip_write: expected to write 360000 bytes, but only wrote 65536\n"
        "[nrrd] _nrrdGzWrite: failed to write to file\n"
    )

    def fail(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(sitk, "WriteImage", fail)
    out = tmp_path / "o"
    assert main(_localize(model_dir, image, out, "--prompt", "edema", "--progress", "none")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"afloc localize: error: {out}: could not write an output file")
    assert "failed to write to file" in err[0]
    assert not out.exists()


def test_evaluate_while_another_writes_its_out_exits_2(model_dir, tmp_path, capsys):
    from test_evaluation import write_covid

    data = write_covid(tmp_path / "covid")
    out = tmp_path / "eval"
    argv = ["evaluate", "--data", str(data), "--split", "dev", "--model", str(model_dir), "--out", str(out)]
    argv += ["--bootstrap", "10", "--baselines", "none", "--device", "cpu", "--progress", "none"]
    with sibling_lock(out, "afloc evaluate"):  # another evaluation running
        assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"afloc evaluate: error: {out}: in use by another afloc process (PID {os.getpid()}")
    assert not out.exists()
    assert main(argv) == 0 and (out / "evaluation.json").is_file()


def test_folders_locked_from_beside_use_one_lock_file_scheme(model_dir, image, tmp_path, monkeypatch, capsys):
    """The model cache, the adapter store and evaluate --out (folders that hold only their own content or
    are swapped whole) are all locked by ``.<name>.afloc.lock`` beside them: holding that lock stops each
    writer with one line naming the folder, and nothing is written."""
    from afloc_engine.registry import models_dir

    monkeypatch.setenv("AFLOC_HOME", str(tmp_path / "home"))
    cache = models_dir()
    with sibling_lock(cache, "afloc other"):
        assert main(["models", "install", str(model_dir), "--name", "mine", "--progress", "none"]) == 2
    assert f"{cache}: in use by another afloc process (PID {os.getpid()}" in capsys.readouterr().err
    assert not cache.exists() and (cache.parent / ".models.afloc.lock").is_file()

    mask = tmp_path / "mask.nrrd"
    pixels = np.zeros(sitk.GetArrayFromImage(sitk.ReadImage(str(image))).shape, np.uint8)
    pixels[8:24, 8:24] = 1
    sitk.WriteImage(sitk.GetImageFromArray(pixels), str(mask))
    store = tmp_path / "adapters"
    argv = ["finetune", "--images", str(image), "--masks", str(mask), "--finding", "blob", "--out", str(store)]
    with sibling_lock(store, "afloc other"):
        assert main([*argv, "--model", str(model_dir), "--progress", "none"]) == 2
    assert f"{store}: in use by another afloc process (PID {os.getpid()}" in capsys.readouterr().err
    assert not store.exists() and (tmp_path / ".adapters.afloc.lock").is_file()
