"""``afloc models list | install | remove`` through the CLI entry point."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch

from afloc_engine.cli import main


@pytest.fixture(scope="module")
def archive(tmp_path_factory, tiny_model) -> Path:
    from afloc_engine.checkpoint import ModelInfo, save_model

    root = tmp_path_factory.mktemp("cli-src")
    folder = save_model(tiny_model, root / "cli-model", ModelInfo(name="cli-model", version="2"), dtype=torch.float16)
    path = root / "cli-model.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for f in ("config.json", "model.safetensors"):
            zf.write(folder / f, f"cli-model/{f}")
    return path


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("AFLOC_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_install_list_remove(home, archive, capsys):
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert main(["models", "install", str(archive), "--sha256", digest, "--progress", "none"]) == 0
    out = capsys.readouterr().out
    assert "installed: cli-model" in out and digest in out
    assert "not trained" in out  # ModelInfo(trained=False): the CLI says so
    assert (home / "models" / "cli-model" / "model.safetensors").is_file()

    assert main(["models", "install", str(archive), "--sha256", digest, "--progress", "json"]) == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["event"] == "done" and done["cached"] is True and done["name"] == "cli-model"

    assert main(["models", "list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["home"] == str(home)
    row = next(r for r in listing["models"] if r["name"] == "cli-model")
    assert row["sha256"] == digest and row["source"] == "installed" and row["trained"] is False

    assert main(["models", "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["NAME", "VERSION", "SOURCE"]
    # the table shows one kind of hash for every model: that of model.safetensors (the one in model_id)
    weights = hashlib.sha256((home / "models" / "cli-model" / "model.safetensors").read_bytes()).hexdigest()
    assert table[0].split()[5] == "WEIGHTS_SHA256"
    assert any(line.startswith("cli-model") and weights[:12] in line and digest[:12] not in line for line in table)

    assert main(["models", "remove", "cli-model"]) == 0
    assert "removed: cli-model" in capsys.readouterr().out
    assert not (home / "models" / "cli-model").exists()
    assert main(["models", "list", "--json"]) == 0
    assert all(r["name"] != "cli-model" for r in json.loads(capsys.readouterr().out)["models"])


def test_errors_exit_2_with_one_line(home, archive, tmp_path, capsys):
    code = main(["models", "install", str(archive), "--sha256", "ab" * 32, "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "SHA-256 mismatch" in err and str(archive) in err
    assert not (home / "models" / "cli-model").exists()

    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip")
    code = main(["models", "install", str(junk), "--progress", "json"])
    captured = capsys.readouterr()
    assert code == 2 and "not a model archive" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["event"] == "error"

    assert main(["models", "remove", "nothing-here"]) == 2
    assert "no installed model named 'nothing-here'" in capsys.readouterr().err
    assert main(["models", "install", str(tmp_path / "missing.zip")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_install_from_loopback_url_reports_json_progress(home, archive, capsys):
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(archive.parent))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/{archive.name}"
        assert main(["models", "install", url, "--name", "web", "--progress", "json"]) == 0
    finally:
        httpd.shutdown()
        httpd.server_close()
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["step"] == progress[-1]["total"] == archive.stat().st_size
    assert events[-1]["event"] == "done" and events[-1]["name"] == "web" and events[-1]["cached"] is False
    assert (home / "models" / "web" / "model.safetensors").is_file()


def test_pack_prints_an_installable_entry(home, archive, tmp_path, capsys):
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(folder)
    out = tmp_path / "dist" / "cli-model-2.tar.gz"
    assert main(["models", "pack", str(folder / "cli-model"), str(out)]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and entry["version"] == "2"
    assert main(["models", "install", str(out), "--sha256", entry["sha256"], "--progress", "none"]) == 0
    assert (home / "models" / "cli-model" / "config.json").is_file()


def test_install_under_another_name_is_known_by_that_name(home, archive, capsys):
    import afloc_engine

    assert main(["models", "install", str(archive), "--name", "mytest", "--progress", "none"]) == 0
    out = capsys.readouterr().out
    weights = hashlib.sha256((home / "models" / "mytest" / "model.safetensors").read_bytes()).hexdigest()
    assert f"model_id: mytest@2:{weights[:12]}" in out
    with pytest.warns(UserWarning):
        model = afloc_engine.load_model("mytest", "cpu")
    assert model.model_id == f"mytest@2:{weights[:12]}"  # not cli-model@..., the name inside its config
    assert main(["models", "install", str(archive), "--name", "mytest", "--progress", "json"]) == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["model_id"] == model.model_id and done["cached"] is True


def test_list_gives_the_weights_hash_of_every_model(home, archive, capsys):
    from afloc_engine.registry.manifest import PACKAGE_WEIGHTS

    assert main(["models", "install", str(archive), "--progress", "none"]) == 0
    capsys.readouterr()
    assert main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    installed = home / "models" / "cli-model" / "model.safetensors"
    assert rows["cli-model"]["weights_sha256"] == hashlib.sha256(installed.read_bytes()).hexdigest()
    assert rows["cli-model"]["archive_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    shipped = PACKAGE_WEIGHTS / "default" / "model.safetensors"
    if shipped.is_file():
        assert rows["default"]["weights_sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()


def test_an_untrained_test_model_warns_under_its_own_name(tiny_model, tmp_path):
    """The loud UNTRAINED line names the model loaded (not 'the default model'), in a category a test
    suite can silence."""
    import warnings

    import afloc_engine
    from afloc_engine.checkpoint import ModelInfo, save_model
    from afloc_engine.cli.info import describe
    from afloc_engine.inference import UntrainedModelWarning

    folder = save_model(tiny_model, tmp_path / "tiny", ModelInfo(name="tiny", version="1"))
    with pytest.warns(UntrainedModelWarning) as caught:
        afloc_engine.load_model(folder, "cpu")
    message = str(caught[0].message)
    assert message.startswith("UNTRAINED MODEL: 'tiny'") and "default model" not in message
    assert "'tiny'" in describe(str(folder), "cpu")["warning"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=UntrainedModelWarning)
        afloc_engine.load_model(folder, "cpu")  # silenced by its category alone


def test_an_error_names_the_action_that_failed(home, tmp_path, capsys):
    """'afloc models install: error: ...' (was 'afloc models: error: ...', which leaves the user guessing)."""
    assert main(["models", "install", str(tmp_path / "missing.zip"), "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("afloc models install: error: ") and "missing.zip" in err and "\n" not in err
