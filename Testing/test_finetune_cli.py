"""`afloc finetune` as a GUI runs it: a child process printing JSON progress lines, killed with SIGTERM
mid-run (exit 143, no adapter folder left), bad input exits 2 with an error line and writes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    # the step never goes back; inside a leave-one-out fit it stays while fold_step moves (a GUI bar keeps moving)
    assert [e["step"] for e in steps] == sorted(e["step"] for e in steps)
    inside = [e for e in steps if "fold_step" in e]
    assert inside and all(0 < e["fold_step"] <= e["fold_total"] for e in inside)
    assert {e["fold"] for e in inside} == {1, 2, 3}
    assert all(e["total"] == steps[0]["total"] and "eta_s" in e for e in steps)
    train = [e for e in steps if e["message"] == "train"]
    assert len(train) == 3 and all(np.isfinite(e["loss"]) for e in train)
    done = events[-1]
    assert done["event"] == "done" and done["finding"] == "blob"
    # three images: three leave-one-out fits (one progress step each) choose the correction's weight
    validate_steps = {e["step"] for e in steps if e["message"] == "validate" and "fold_step" not in e}
    assert len(validate_steps) == 3 and steps[-1]["step"] == steps[-1]["total"]
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


# --- the few-shot loop as the docs write it: finetune --out DIR, then localize --adapter DIR ------------------
def test_the_documented_loop_chains_through_the_shared_store(model_dir, files, tmp_path):
    """Without --out the adapter goes to $AFLOC_HOME/adapters (the Slicer module's store too); the path is
    printed; localize --adapter takes the store folder itself, and results.json and the CLI say which adapter
    it used, its weight and whether it kept the zero-shot map and why."""
    from afloc_engine.finetune.adapter import default_adapter_store

    home = tmp_path / "home"
    env = {**REPO_ENV, "AFLOC_HOME": str(home)}
    images, masks = files
    cmd = _command(model_dir, files, tmp_path / "unused", "--epochs", "2", "--seed", "1")
    out_at = cmd.index("--out")
    del cmd[out_at : out_at + 2]
    cmd[cmd.index("json")] = "none"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = Path(proc.stdout.strip().splitlines()[-1])
    store = home / "adapters"
    assert printed.parent == store and (printed / "adapter.json").is_file()
    assert "--adapter" in proc.stderr  # says how to use it
    os.environ["AFLOC_HOME"], old = str(home), os.environ.get("AFLOC_HOME")
    try:
        assert default_adapter_store() == store
    finally:
        if old is None:
            del os.environ["AFLOC_HOME"]
        else:
            os.environ["AFLOC_HOME"] = old
    out = tmp_path / "out"
    loc = subprocess.run(
        [sys.executable, "-m", "afloc_engine", "localize", str(images[0]), "--prompt", "Findings suggesting blob",
         "--prompt", "Findings suggesting something else", "--out", str(out), "--model", str(model_dir),
         "--device", "cpu", "--adapter", str(store), "--progress", "none"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert loc.returncode == 0, loc.stderr
    results = json.loads((out / "img0" / "results.json").read_text())
    used = results["adapter"]
    meta = json.loads((printed / "adapter.json").read_text())
    assert used["path"] == str(printed) and used["name"] == printed.name
    assert used["weight"] == meta["config"]["blend"]
    assert used["zero_shot_fallback"] == (meta["config"]["blend"] == 0)
    assert (used["fallback_reason"] is not None) == used["zero_shot_fallback"]
    assert used["prompts"] == ["Findings suggesting blob"]  # the other prompt stays zero-shot
    assert f"adapter {printed.name}" in loc.stderr


def _fake_adapter(folder, findings, created, base="tiny@1:abc"):
    folder.mkdir(parents=True)
    meta = {"format": "afloc-adapter", "findings": findings, "base_model_id": base, "created": created,
            "prompts": [f"Findings suggesting {f}" for f in findings]}  # fmt: skip
    (folder / "adapter.json").write_text(json.dumps(meta))
    return folder


def test_a_folder_of_adapters_resolves_to_the_newest_for_the_finding(tmp_path):
    from afloc_engine.errors import CheckpointError
    from afloc_engine.finetune.adapter import resolve_adapter

    old = _fake_adapter(tmp_path / "blob-1", ["blob"], "2026-01-01T10:00:00+00:00")
    new = _fake_adapter(tmp_path / "blob-2", ["blob"], "2026-01-02T10:00:00+00:00")
    other = _fake_adapter(tmp_path / "spot-1", ["spot"], "2026-01-03T10:00:00+00:00")
    foreign = _fake_adapter(tmp_path / "blob-3", ["blob"], "2026-01-04T10:00:00+00:00", base="other@1:def")
    (tmp_path / ".tmp-blob-9").mkdir()  # an unfinished fine-tune is never picked
    assert resolve_adapter(tmp_path, ["Findings suggesting blob"], "tiny@1:abc") == new
    assert resolve_adapter(tmp_path, ["Findings suggesting blob"], "other@1:def") == foreign
    assert resolve_adapter(tmp_path, ["Findings suggesting spot"]) == other
    assert resolve_adapter(old, ["anything at all"]) == old  # an adapter folder is itself
    with pytest.raises(CheckpointError, match="no adapter here for the findings"):
        resolve_adapter(tmp_path, ["Findings suggesting pneumothorax"], "tiny@1:abc")
    with pytest.raises(CheckpointError, match="ambiguous: the prompts name findings of different adapters"):
        resolve_adapter(tmp_path, ["Findings suggesting blob", "Findings suggesting spot"], "tiny@1:abc")
    _fake_adapter(tmp_path / "blob-2b", ["blob"], "2026-01-02T10:00:00+00:00")
    with pytest.raises(CheckpointError, match="created at the same time"):
        resolve_adapter(tmp_path, ["Findings suggesting blob"], "tiny@1:abc")
    with pytest.raises(CheckpointError, match="no adapter for base model"):
        resolve_adapter(tmp_path, ["Findings suggesting blob"], "third@1:000")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no adapter.json here and no adapter folder inside"):
        resolve_adapter(empty, ["Findings suggesting blob"])


def test_weight_0_is_said_in_results_json_and_on_the_overlay(tiny_afloc, tmp_path):
    """An adapter that kept the zero-shot map says so, and why, wherever its output is read."""
    from afloc_engine.finetune import create_adapter, localize_with_adapter
    from afloc_engine.finetune.adapter import adapter_note
    from afloc_engine.outputs import write_results

    adapter = create_adapter(tiny_afloc, "blob")
    adapter.config.blend = 0.0
    adapter.metrics = {"validation": {"dice_by_blend": {"0": 0.41, "0.5": 0.38, "1": 0.33}, "zero_shot_dice": 0.41}}
    folder = adapter.save(tmp_path / "store")
    image = np.random.default_rng(0).uniform(0, 255, (48, 40)).astype(np.float32)
    prompts = ["Findings suggesting blob", "Findings suggesting spot"]
    [result] = localize_with_adapter(tiny_afloc, tmp_path / "store", [image], prompts)
    assert result.adapter["path"] == str(folder) and result.adapter["zero_shot_fallback"] is True
    assert "did not beat the zero-shot heatmap" in result.adapter["fallback_reason"]
    assert "0.41" in result.adapter["fallback_reason"]
    write_results(result, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert summary["adapter"]["zero_shot_fallback"] is True and summary["adapter"]["prompts"] == prompts[:1]
    assert adapter_note(summary["adapter"], short=True) == "adapter w=0: zero-shot"
    assert "weight 0, zero-shot map kept (the leave-one-out fits" in adapter_note(summary["adapter"])
    assert adapter_note(summary["adapter"]).count("zero-shot map") == 1  # said once, not twice in one line
    # without an adapter, results.json has no adapter entry
    write_results(tiny_afloc.localize(image, prompts), tmp_path / "plain")
    assert "adapter" not in json.loads((tmp_path / "plain" / "results.json").read_text())
