"""``afloc serve``: the warm engine a GUI keeps for its session (JSON lines both ways)."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest

from afloc_engine import protocol
from afloc_engine.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model):
    from afloc_engine.checkpoint import ModelInfo, save_model

    return save_model(tiny_model, tmp_path_factory.mktemp("m") / "tiny", ModelInfo(name="tiny", version="test"))


@pytest.fixture()
def radiograph(tmp_path):
    from PIL import Image

    path = tmp_path / "cxr.png"
    Image.fromarray((np.random.default_rng(0).random((80, 96)) * 255).astype(np.uint8)).save(path)
    return path


def serve(monkeypatch, capsys, requests: list[dict | str]) -> list[dict]:
    """Run ``afloc serve`` on ``requests`` (stdin) in this process; its stdout as parsed lines."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in requests]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["serve"]) == 0
    out = capsys.readouterr().out.splitlines()
    events = [protocol.parse_line(line) for line in out]
    assert all(e is not None for e in events), out  # stdout holds protocol events only
    return events


def localize(request_id, image, out, model_dir, *extra):
    args = [str(image), "--prompt", "pneumothorax", "--out", str(out), "--model", str(model_dir), "--device", "cpu"]
    return {"id": request_id, "command": "localize", "args": [*args, *extra]}


def test_requests_are_answered_in_order_and_the_model_stays_loaded(
    monkeypatch, capsys, tmp_path, radiograph, model_dir
):
    import afloc_engine

    loads = []
    original = afloc_engine.load_model
    monkeypatch.setattr(afloc_engine, "load_model", lambda *a: loads.append(a) or original(*a))
    events = serve(
        monkeypatch,
        capsys,
        [
            localize(1, tmp_path / "missing.png", tmp_path / "o1", model_dir),
            localize(2, radiograph, tmp_path / "o2", model_dir),
            "not json",
            {"id": 3, "command": "train", "args": []},
            localize(4, radiograph, tmp_path / "o4", model_dir),
            {"command": "shutdown"},
            localize(5, radiograph, tmp_path / "o5", model_dir),  # after shutdown: never run
        ],
    )
    assert events[0][protocol.EVENT] == protocol.READY
    finished = {e["id"]: e[protocol.EXIT_CODE] for e in events if e[protocol.EVENT] == protocol.FINISHED}
    assert finished == {1: 2, 2: 0, 3: 2, 4: 0}  # the one-shot command's exit status per request
    errors = {e.get("id"): e for e in events if e[protocol.EVENT] == protocol.ERROR}
    assert str(tmp_path / "missing.png") in errors[1][protocol.ERROR_PATH]
    assert "bad request line" in errors[None][protocol.ERROR_MESSAGE]
    assert "not 'train'" in errors[3][protocol.ERROR_MESSAGE]
    done = {e["id"]: e for e in events if e[protocol.EVENT] == protocol.DONE}
    assert set(done) == {2, 4} and (tmp_path / "o4" / "cxr" / "results.json").is_file()
    assert not (tmp_path / "o5").exists()
    phases = [e.get(protocol.PHASE) for e in events if e.get("id") == 4 and e[protocol.EVENT] == protocol.PROGRESS]
    assert phases[:4] == list(protocol.LOCALIZE_PHASES)
    assert len(loads) == 1  # loaded once, for request 2; request 4 found it warm


def test_bad_arguments_end_the_request_not_the_server(monkeypatch, capsys, tmp_path, radiograph, model_dir):
    events = serve(
        monkeypatch,
        capsys,
        [{"id": "a", "command": "localize", "args": ["--bogus"]}, localize("b", radiograph, tmp_path / "o", model_dir)],
    )
    error = next(e for e in events if e[protocol.EVENT] == protocol.ERROR)
    assert error["id"] == "a" and "required" in error[protocol.ERROR_MESSAGE]
    assert [e[protocol.EXIT_CODE] for e in events if e[protocol.EVENT] == protocol.FINISHED] == [2, 0]


def test_localize_requests_leave_a_core_to_the_gui(monkeypatch, capsys, tmp_path, radiograph, model_dir):
    """One image's small network gains little from threads, and a busy machine loses much (spin-waits):
    the warm engine localizes with half the cores (at least 1); fine-tuning keeps them all."""
    import os

    import torch

    from afloc_engine.cli.serve import localize_threads

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert localize_threads(None) == max(1, cores // 2) and localize_threads(3) == 3
    before = torch.get_num_threads()
    try:
        serve(monkeypatch, capsys, [localize(1, radiograph, tmp_path / "o", model_dir)])
        assert torch.get_num_threads() == localize_threads(None)
    finally:
        torch.set_num_threads(before)
