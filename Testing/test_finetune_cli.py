"""`afloc finetune` as a GUI runs it: a child process printing JSON progress lines, killed with SIGTERM
mid-run (exit 143, no adapter folder left), bad input exits 2 with an error line and writes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from afloc_engine.checkpoint import ModelInfo, save_model

REPO_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    return save_model(tiny_model, tmp_path_factory.mktemp("m") / "tiny", ModelInfo(name="tiny", version="1"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three PNG images of different sizes with bright discs, and their 0/255 PNG masks."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    images, masks = [], []
    for i, (h, w) in enumerate([(72, 64), (90, 80), (64, 64)]):
        yy, xx = np.mgrid[:h, :w]
        mask = (yy - h / 2) ** 2 + (xx - w / 2 - i * 4) ** 2 <= (0.18 * min(h, w)) ** 2
        image = np.clip(rng.normal(80, 12, (h, w)) + 100 * mask, 0, 255)
        Image.fromarray(image.astype(np.uint8)).save(folder / f"img{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"img{i}_mask.png")
        images.append(folder / f"img{i}.png")
        masks.append(folder / f"img{i}_mask.png")
    return images, masks


def _command(model_dir, files, out, *extra):
    images, masks = files
    return [
        sys.executable, "-m", "afloc_engine", "finetune",
        "--images", *map(str, images), "--masks", *map(str, masks),
        "--finding", "blob", "--out", str(out), "--model", str(model_dir),
        "--device", "cpu", "--progress", "json", *extra,
    ]  # fmt: skip


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_cli_reports_json_steps_and_writes_the_adapter(model_dir, files, tmp_path):
    out = tmp_path / "adapters"
    proc = subprocess.run(
        _command(model_dir, files, out, "--epochs", "3", "--seed", "3"),
        capture_output=True, text=True, timeout=300, env=REPO_ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    events = _events(proc.stdout)  # stdout holds JSON lines only
    steps = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in steps] == sorted({e["step"] for e in steps})
    assert all(e["total"] == steps[0]["total"] and "eta_s" in e for e in steps)
    train = [e for e in steps if e["message"] == "train"]
    assert len(train) == 3 and all(np.isfinite(e["loss"]) for e in train)
    done = events[-1]
    assert done["event"] == "done" and done["finding"] == "blob"
    # three images: three leave-one-out fits (one progress step each) choose the correction's weight
    assert len([e for e in steps if e["message"] == "validate"]) == 3 and steps[-1]["step"] == steps[-1]["total"]
    assert len(done["validation"]["left_out"]) == 3 and done["blend"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    # warnings reach the GUI in the done line: weight 0 (the zero-shot map kept) is said, and only then
    assert all(isinstance(w, str) for w in done["warnings"])
    assert any("weight 0" in w for w in done["warnings"]) == (done["blend"] == 0)
    folder = out / os.path.basename(done["adapter"])
    assert folder.is_dir() and (folder / "adapter.safetensors").is_file()
    meta = json.loads((folder / "adapter.json").read_text())
    assert meta["config"]["blend"] == done["blend"]
    assert meta["training_examples"] == ["img0.png", "img1.png", "img2.png"]
    assert [p.name for p in out.iterdir()] == [folder.name]


@pytest.mark.parametrize(
    ("signum", "code", "reason"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_signal_mid_run_cancels_and_leaves_nothing(model_dir, files, tmp_path, signum, code, reason):
    out = tmp_path / "adapters"
    proc = subprocess.Popen(
        _command(model_dir, files, out, "--epochs", "100000"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=REPO_ENV,
    )  # fmt: skip
    try:
        seen = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(json.loads(line))
            if seen[-1].get("message") == "train":  # training has started
                break
        assert seen and seen[-1].get("message") == "train", seen
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    assert _events(stdout)[-1] == {"event": "cancelled", "reason": reason, "exit_code": code}
    assert not out.exists() or list(out.iterdir()) == []


def test_bad_mask_exits_2_with_an_error_line_and_writes_nothing(model_dir, files, tmp_path):
    images, masks = files
    out = tmp_path / "adapters"
    proc = subprocess.run(
        _command(model_dir, (images, [masks[1], masks[0], masks[2]]), out),
        capture_output=True, text=True, timeout=300, env=REPO_ENV,
    )  # fmt: skip
    assert proc.returncode == 2
    error = _events(proc.stdout)[-1]
    assert error["event"] == "error" and "must match its own image" in error["message"]
    assert error["path"].endswith("img1_mask.png")
    assert "img1_mask.png" in proc.stderr
    assert not out.exists()


def test_images_and_masks_must_pair_up(model_dir, files, tmp_path, capsys):
    from afloc_engine.cli import main

    images, masks = files
    code = main(["finetune", "--images", *map(str, images), "--masks", str(masks[0]), "--finding", "blob",
                 "--out", str(tmp_path / "a"), "--model", str(model_dir), "--progress", "none"])  # fmt: skip
    assert code == 2
    assert "3 images but 1 masks" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
