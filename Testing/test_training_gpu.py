"""CUDA checks of the training path (skipped without a GPU): bf16 local loss, compiled kernel, a trainer run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
REPO = Path(__file__).resolve().parents[1]


def _inputs(b=16, m=196, n=40, d=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(b, m, d, generator=g).cuda().requires_grad_(True)
    text = torch.randn(b, n, d, generator=g).cuda().requires_grad_(True)
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    mask = (torch.arange(n)[None] < lengths[:, None]).cuda()
    return regions, text, mask


def _rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def test_bf16_autocast_local_loss_and_gradients_track_fp32():
    from afloc_engine.losses import local_similarity

    regions, text, mask = _inputs()
    weights = torch.randn(16, 16, device="cuda")
    z32 = local_similarity(regions, text, mask, chunk_size=5)
    g32 = torch.autograd.grad((z32 * weights).sum(), (regions, text))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        z16 = local_similarity(regions, text, mask, chunk_size=5)
    g16 = torch.autograd.grad((z16.float() * weights).sum(), (regions, text))
    assert torch.isfinite(z16).all()
    assert _rel(z16, z32) < 2e-2
    for a, b in zip(g16, g32):
        assert _rel(a, b) < 0.1  # bf16 operands: ~3 significant digits


def test_compiled_kernel_equals_eager():
    from afloc_engine import losses

    regions, text, mask = _inputs(seed=1)
    eager = losses.local_similarity(regions, text, mask)
    g_eager = torch.autograd.grad(eager.sum(), (regions, text))
    comp = losses.AFLocLoss(compile=True).similarity(regions, text, mask)  # the setting lives on the instance
    g_comp = torch.autograd.grad(comp.sum(), (regions, text))
    assert _rel(comp, eager) < 1e-4
    for a, b in zip(g_comp, g_eager):
        assert _rel(a, b) < 1e-3


def test_trainer_runs_on_cuda_with_bf16_and_channels_last(tmp_path):
    from test_training_data import base_config, make_pairs

    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_throughput import text_model_folder

    from training.config import config_from_dict
    from training.trainer import Trainer

    folder, _ = text_model_folder()  # the default text model, or a same-shape stand-in
    cfg = base_config(
        make_pairs(tmp_path / "d", n=8),
        model={"text_model": folder},
        optim={"batch_size": 4, "epochs": 2, "max_steps": 3, "lr": 1e-4},
        runtime={"device": "cuda", "precision": "bf16", "channels_last": True},
    )
    final = Trainer(config_from_dict(cfg), tmp_path / "run", progress="none").fit()
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4 and "precision bf16" in (tmp_path / "run" / "log.txt").read_text()
    assert (final / "model.safetensors").is_file()
