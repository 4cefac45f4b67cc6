"""Shared fixtures: a tiny model, the sample radiograph, the shared real data (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AFLOC_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_config(**changes):
    """A small but complete AFLoc configuration (ResNet-10, D=32, 64 px) with the real text model."""
    from afloc_engine.config import AFLocConfig

    base = dict(backbone="resnet10", embed_dim=32, image_size=64, encoder_input_size=None, text_max_length=32)
    base.update(changes)
    return AFLocConfig(**base)


@pytest.fixture(scope="session")
def tiny_model():
    """A seeded, randomly initialised tiny AFLocModel (eval mode). Do not modify it in tests."""
    from afloc_engine.models import AFLocModel

    torch.manual_seed(0)
    return AFLocModel(tiny_config()).eval()


@pytest.fixture(scope="session")
def tiny_afloc(tiny_model):
    """The tiny model wrapped for inference on the CPU."""
    from afloc_engine.checkpoint import ModelInfo
    from afloc_engine.inference import AFLoc

    return AFLoc(tiny_model, ModelInfo(name="tiny", version="test", trained=False), "cpu")


@pytest.fixture(scope="session")
def sample_dicom() -> Path:
    """The real adult PA chest radiograph RG1_UNCR.dcm (MONOCHROME1) from pydicom-data."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        pytest.skip("pydicom-data is not installed")
    return Path(path)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real chest X-rays); tests using it skip on a clone without it."""
    if not (SHARED_DATA / "covid-cxr" / "pairs.csv").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (set AFLOC_SHARED_DATA); runs in CI")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Every test starts with the suite's torch thread count: an in-process ``afloc serve`` sets its own
    (half the cores), and a leaked count made later tests compare runs made with different threads."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def pytest_configure(config: pytest.Config) -> None:
    """The tiny test models are untrained on purpose: their loud UNTRAINED warning is not news in a test
    run (tests that check it use ``pytest.warns``, which still sees it)."""
    config.addinivalue_line("filterwarnings", "ignore::afloc_engine.inference.UntrainedModelWarning")
