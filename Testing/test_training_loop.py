"""The trainer end to end on generated pairs: loss falls, kill -9 + resume is exact, bad input, hooks."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_training_data import base_config, make_pairs

from afloc_engine.errors import CheckpointError, ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]


def _config(data):
    from training.config import config_from_dict

    return config_from_dict(data)


def _metrics(run):
    with (Path(run) / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_tiny_training_loss_goes_down_and_writes_a_loadable_model(tmp_path):
    from afloc_engine.checkpoint import load_model_folder
    from training.trainer import Trainer

    manifest = make_pairs(tmp_path / "d", n=8)
    cfg = base_config(
        manifest,
        optim={"batch_size": 8, "lr": 1e-4, "epochs": 5},
        augment={"image": False, "text": False},
        freeze={"text_encoder": True, "batchnorm": True},
        log={"every": 1, "tensorboard": True},
        data={"val": [{"format": "manifest", "path": str(make_pairs(tmp_path / "v", n=4, seed=5))}]},
    )
    run = tmp_path / "run"
    final = Trainer(_config(cfg), run, progress="none").fit()
    rows = _metrics(run)
    assert [int(r["step"]) for r in rows] == list(range(1, 6))  # one batch of all 8 pairs x 5 epochs
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < losses[0] - 0.1, losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 3, losses  # falls step after step
    assert losses[-1] < 3 * math.log(8), losses  # below chance (three 8-way choices)
    # lr x 0.9 after each epoch
    assert float(rows[-1]["lr"]) == pytest.approx(1e-4 * 0.9**4)
    model, info = load_model_folder(final)
    assert info.trained and info.text_weights == "package"  # frozen transformer: not stored
    assert (run / "config.yaml").is_file() and list((run / "events").glob("events.out.tfevents.*"))
    with (run / "validation.csv").open() as fh:
        val = list(csv.DictReader(fh))
    assert len(val) == 5 and 0 <= float(val[-1]["i2t_r@1"]) <= 1
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step-00000005"


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import training.state as state
    from training.config import config_from_dict
    from training.trainer import Trainer
    import json

    real, calls = state.save_model, []

    def save_then_die(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        if len(calls) == int(sys.argv[3]):  # killed half-way through writing this checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    state.save_model = save_then_die
    Trainer(config_from_dict(json.loads(open(sys.argv[1]).read())), sys.argv[2], progress="none").fit()
    """
)


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_same_next_step_losses(tmp_path):
    """A run killed while writing its 3rd checkpoint resumes from the 2nd; steps 3-5 match an uninterrupted run."""
    from training.state import latest_checkpoint
    from training.trainer import Trainer

    manifest = make_pairs(tmp_path / "d", n=12)
    cfg = base_config(
        manifest,
        optim={"batch_size": 4, "lr": 1e-3, "epochs": 2, "max_steps": 5, "dropout": 0.1},
        freeze={"text_encoder": False, "text_layers": 5},  # dropout in the trained layer uses the RNG
        log={"every": 1, "checkpoint_every": 1, "tensorboard": False},
    )
    Trainer(_config(cfg), tmp_path / "a", progress="none").fit()
    want = {int(r["step"]): float(r["loss"]) for r in _metrics(tmp_path / "a")}

    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "cfg.json"), str(tmp_path / "b"), "3"],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-00000002"
    assert list((tmp_path / "b" / "checkpoints").glob(".step-00000003.*"))  # the half-written one
    Trainer(_config(cfg), tmp_path / "b", resume=True, progress="none").fit()
    got = {int(r["step"]): float(r["loss"]) for r in _metrics(tmp_path / "b")}
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step in (3, 4, 5):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), (step, got, want)
    assert not list((tmp_path / "b" / "checkpoints").glob(".step-*"))  # leftovers pruned


# --- bad input: one clear error before any work ----------------------------------------------
def test_missing_data_root_no_usable_rows_and_absent_gpu_fail_before_any_work(tmp_path):
    from training.trainer import Trainer

    manifest = make_pairs(tmp_path / "d", n=4)
    run = tmp_path / "run"
    cfg = base_config(manifest)
    cfg["data"]["train"][0]["root"] = str(tmp_path / "no-such-root")
    with pytest.raises(DataError, match="data root not found") as err:
        Trainer(_config(cfg), run, progress="none").fit()
    assert "no-such-root" in str(err.value)
    cfg = base_config(tmp_path / "absent.csv")
    with pytest.raises(DataError, match="not found"):
        Trainer(_config(cfg), run, progress="none").fit()
    empty = tmp_path / "empty.csv"
    empty.write_text("image,text\nimg000.png,\nmissing.png,Clear.\n")
    with pytest.raises(DataError, match="no usable rows"):
        Trainer(_config(base_config(empty)), run, progress="none").fit()
    if not torch.cuda.is_available():
        cfg = base_config(manifest, runtime={"device": "cuda"})
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            Trainer(_config(cfg), run, progress="none").fit()
    assert not run.exists()  # nothing written
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Trainer(_config(base_config(manifest)), tmp_path / "fresh", resume=True, progress="none").fit()


def test_cli_unknown_key_is_exit_code_2_with_one_line(tmp_path):
    manifest = make_pairs(tmp_path / "d", n=4)
    cfg = base_config(manifest)
    cfg["runtime"] = {"devices": "cpu"}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    from afloc_engine.cli import main

    code = main(["train", "run", "--config", str(path), "--run-dir", str(tmp_path / "run"), "--progress", "none"])
    assert code == 2
    assert not (tmp_path / "run").exists()


# --- hooks for fVLM (issue 8) and the level switches ------------------------------------------
@pytest.mark.slow
def test_target_fn_and_extra_losses_hooks(tmp_path):
    from training.trainer import BatchContext, StepOutputs, Trainer

    manifest = make_pairs(tmp_path / "d", n=8)
    cfg = base_config(manifest, optim={"max_steps": 2}, model={"weight_word": 0})
    seen: list[BatchContext] = []

    def identity_targets(ctx: BatchContext) -> torch.Tensor:
        seen.append(ctx)
        return torch.eye(len(ctx.texts))

    def feature_norm(out: StepOutputs) -> dict[str, torch.Tensor]:
        return {"norm": 1e-3 * out.image.global_.float().pow(2).mean()}

    Trainer(_config(cfg), tmp_path / "plain", progress="none").fit()
    Trainer(_config(cfg), tmp_path / "hooked", progress="none", target_fn=identity_targets).fit()
    plain, hooked = _metrics(tmp_path / "plain"), _metrics(tmp_path / "hooked")
    # identity soft targets are the hard labels: the same training, step for step
    assert [float(r["loss"]) for r in hooked] == pytest.approx([float(r["loss"]) for r in plain], rel=1e-6)
    assert len(seen) == 2 and len(seen[0].texts) == 4 and seen[0].records[0].text == seen[0].texts[0]
    assert all(float(r["word"]) == 0 for r in plain)  # the word level is switched off
    Trainer(_config(cfg), tmp_path / "extra", progress="none", extra_losses=[feature_norm]).fit()
    extra = _metrics(tmp_path / "extra")
    assert float(extra[0]["extra_norm"]) > 0
    assert float(extra[0]["loss"]) == pytest.approx(float(plain[0]["loss"]) + float(extra[0]["extra_norm"]))


def test_cli_check_and_prepare(tmp_path, capsys):
    from afloc_engine.cli import main

    manifest = make_pairs(tmp_path / "d", n=5, bad=(1,))
    cfg = base_config(manifest, data={"store": str(tmp_path / "store")})
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    assert main(["train", "check", "--config", str(path)]) == 0
    assert "5 training pairs" in capsys.readouterr().out  # the broken image is found when decoding
    assert main(["train", "prepare", "--config", str(path), "--progress", "none"]) == 0
    index = json.loads((tmp_path / "store" / "index.json").read_text())
    assert index["count"] == 4 and len(index["skipped"]) == 1
    del cfg["data"]["store"]
    path.write_text(json.dumps(cfg))
    assert main(["train", "prepare", "--config", str(path), "--progress", "none"]) == 2
    assert "give --store" in capsys.readouterr().err


@pytest.mark.shared_data
def test_localisation_metrics_on_covid_dev_masks(shared_data, tiny_model):
    from training.validation import localisation_metrics

    prompts = {"ground_glass_opacity": "Findings suggesting ground glass opacity"}
    out = localisation_metrics(tiny_model, shared_data / "covid-cxr", prompts, torch.device("cpu"), limit=2)
    assert set(out) == {
        "ground_glass_opacity_iou",
        "ground_glass_opacity_dice",
        "ground_glass_opacity_cnr",
        "mean_iou",
        "mean_cnr",
    }
    assert 0 <= out["mean_iou"] <= 1 and out["ground_glass_opacity_cnr"] >= 0
    assert not tiny_model.training


def test_layer_wise_freezing(tmp_path, tiny_model):
    """freeze.text_layers / image_stages / batchnorm switch off exactly the named parts."""
    import copy

    from torch import nn

    from training.trainer import Trainer

    manifest = make_pairs(tmp_path / "d", n=4)
    cfg = base_config(manifest, freeze={"text_encoder": False, "text_layers": 2, "image_stages": 1, "batchnorm": True})
    model = copy.deepcopy(tiny_model)
    frozen = Trainer(_config(cfg), tmp_path / "run")._freeze(model)
    t = model.text_encoder.transformer
    assert not any(p.requires_grad for p in t.embeddings.parameters())
    assert not any(p.requires_grad for layer in t.encoder.layer[:2] for p in layer.parameters())
    assert all(p.requires_grad for layer in t.encoder.layer[2:] for p in layer.parameters())
    bb = model.image_encoder.backbone
    assert not any(p.requires_grad for m in (bb.conv1, bb.bn1, bb.layer1) for p in m.parameters())
    assert all(p.requires_grad for p in bb.layer2.parameters())
    assert all(p.requires_grad for p in model.text_encoder.projection.parameters())
    assert any(isinstance(m, nn.BatchNorm2d) for m in frozen)  # kept in eval mode while training
    cfg["freeze"]["text_layers"] = 99
    with pytest.raises(ConfigError, match="only"):
        Trainer(_config(cfg), tmp_path / "run")._freeze(copy.deepcopy(tiny_model))


@pytest.mark.slow
def test_init_from_a_model_folder_and_gradient_accumulation(tmp_path):
    from afloc_engine.checkpoint import load_model_folder
    from training.distributed import DistInfo
    from training.trainer import Trainer

    manifest = make_pairs(tmp_path / "d", n=8)
    cfg = base_config(manifest, optim={"batch_size": 4, "accumulate": 2, "epochs": 2})
    first = Trainer(_config(cfg), tmp_path / "a", progress="none").fit()
    rows = _metrics(tmp_path / "a")
    assert [int(r["step"]) for r in rows] == [1, 2]  # 2 batches per optimizer step, 2 epochs
    cfg_init = base_config(manifest, model={"weight_word": 0})
    cfg_init["init"] = str(first)
    trainer = Trainer(_config(cfg_init), tmp_path / "b", progress="none")
    trainer.device, trainer.dist, trainer.run_dir = torch.device("cpu"), DistInfo(), tmp_path / "b"
    (tmp_path / "b").mkdir()
    trainer._build_model()
    saved, _ = load_model_folder(first)
    for (name, a), b in zip(trainer.model.state_dict().items(), saved.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert trainer.model.config.weight_word == 0  # the new run's loss switches apply
    cfg_bad = base_config(manifest, model={"embed_dim": 16})
    cfg_bad["init"] = str(first)
    trainer = Trainer(_config(cfg_bad), tmp_path / "c", progress="none")
    trainer.device, trainer.dist, trainer.run_dir = torch.device("cpu"), DistInfo(), tmp_path / "c"
    (tmp_path / "c").mkdir()
    with pytest.raises(ConfigError, match="embed_dim differs"):
        trainer._build_model()
