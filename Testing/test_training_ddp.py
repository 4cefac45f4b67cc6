"""Two CPU processes under torchrun (gloo) train exactly like one process with the same global batch."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_training_data import base_config, make_pairs

REPO = Path(__file__).resolve().parents[1]


def _losses(run):
    with (Path(run) / "metrics.csv").open() as fh:
        return [
            (float(r["loss"]), float(r["word"]), float(r["sentence"]), float(r["global"])) for r in csv.DictReader(fh)
        ]


@pytest.mark.slow
def test_two_process_gloo_run_equals_one_process(tmp_path):
    from safetensors.torch import load_file

    from training.config import config_from_dict
    from training.trainer import Trainer

    manifest = make_pairs(tmp_path / "d", n=8)
    cfg = base_config(
        manifest,
        optim={"batch_size": 4, "lr": 1e-3, "max_steps": 2},
        freeze={"text_encoder": True, "batchnorm": True},  # BN on running statistics: no per-rank batch stats
        data={"store": str(tmp_path / "store")},
        log={"every": 1, "tensorboard": False},
    )
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "training", "run", "--config", str(path), "--run-dir", str(tmp_path / "ddp"), "--progress", "none"]
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert "2 process(es)" in (tmp_path / "ddp" / "log.txt").read_text()

    Trainer(config_from_dict(cfg), tmp_path / "one", progress="none").fit()  # reuses the prepared store
    ddp, one = _losses(tmp_path / "ddp"), _losses(tmp_path / "one")
    assert len(ddp) == len(one) == 2
    for a, b in zip(ddp, one):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (ddp, one)
    # the same gradients (equal norms), hence the same weights after two optimizer steps; Adam's first
    # steps are sign-like (m / sqrt(v)), so a gradient entry near zero may round to either side: allow
    # a rare element to differ by at most the two steps' size
    with (tmp_path / "ddp" / "metrics.csv").open() as fa, (tmp_path / "one" / "metrics.csv").open() as fb:
        norms = [(float(a["grad_norm"]), float(b["grad_norm"])) for a, b in zip(csv.DictReader(fa), csv.DictReader(fb))]
    assert all(a == pytest.approx(b, rel=1e-5) for a, b in norms)
    w_ddp = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    w_one = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    assert w_ddp.keys() == w_one.keys()
    for key in w_one:
        diff = (w_ddp[key].float() - w_one[key].float()).abs()
        assert (diff > 1e-5).float().mean() < 1e-3, key
        assert diff.max() <= 2 * 2 * 1e-3, key
