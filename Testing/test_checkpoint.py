"""Model folders round-trip without pickle; broken ones fail with an error that names the key or file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file

from afloc_engine.checkpoint import ModelInfo, load_model_folder, read_config, save_model
from afloc_engine.config import AFLocConfig
from afloc_engine.errors import CheckpointError, ConfigError
from afloc_engine.inference import AFLoc


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(tiny_model, folder, ModelInfo(name="tiny", version="1", trained=True, description="test model"))
    return folder


def test_round_trip_gives_identical_outputs(tiny_model, saved):
    loaded, info = load_model_folder(saved)
    assert info.name == "tiny" and info.trained and len(info.sha256) == 64
    image = np.random.default_rng(0).random((70, 90)).astype(np.float32)
    a = AFLoc(tiny_model, info, "cpu").localize(image, ["Findings suggesting edema"])
    b = AFLoc(loaded, info, "cpu").localize(image, ["Findings suggesting edema"])
    np.testing.assert_allclose(a.heatmaps, b.heatmaps, atol=1e-5)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)
    # only image encoder + projections are stored: the frozen text transformer comes from its package
    keys = load_file(str(saved / "model.safetensors")).keys()
    assert not any(k.startswith("text_encoder.transformer.") for k in keys)
    assert "text_encoder.projection.weight" in keys


def test_fp16_storage_round_trips_closely(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "half", dtype=torch.float16)
    loaded, _ = load_model_folder(tmp_path / "half")
    w = dict(tiny_model.named_parameters())["image_encoder.deep_proj.weight"]
    torch.testing.assert_close(
        dict(loaded.named_parameters())["image_encoder.deep_proj.weight"], w, atol=1e-3, rtol=1e-3
    )


def test_refuses_to_overwrite_and_leaves_no_temp_folders(tiny_model, saved):
    before = (saved / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        save_model(tiny_model, saved)
    assert (saved / "model.safetensors").read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == ["tiny"]


def test_wrong_shape_names_the_key(saved, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((saved / "config.json").read_text())
    state = load_file(str(saved / "model.safetensors"))
    state["image_encoder.deep_proj.weight"] = torch.zeros(3, 3, 1, 1)
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"image_encoder\.deep_proj\.weight.*shape"):
        load_model_folder(bad)


def test_missing_key_and_unexpected_key_are_named(saved, tmp_path):
    state = load_file(str(saved / "model.safetensors"))
    for name, change in {"missing": lambda s: s.pop("image_encoder.global_proj.bias"), "extra": None}.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((saved / "config.json").read_text())
        s = dict(state)
        if change:
            change(s)
        else:
            s["image_encoder.surprise"] = torch.zeros(1)
        save_file(s, str(folder / "model.safetensors"))
        with pytest.raises(CheckpointError, match="global_proj.bias" if change else "surprise"):
            load_model_folder(folder)


def test_corrupt_weights_and_configs_fail_clearly(saved, tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "config.json").write_text((saved / "config.json").read_text())
    (folder / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt") as err:
        load_model_folder(folder)
    assert "model.safetensors" in str(err.value)
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        load_model_folder(saved, expected_sha256="0" * 64)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_config(folder)
    with pytest.raises(CheckpointError, match="not found"):
        read_config(tmp_path / "nowhere")


def test_unknown_config_key_is_an_error(saved, tmp_path):
    data = json.loads((saved / "config.json").read_text())
    data["model"]["embed_dims"] = 64  # typo
    folder = tmp_path / "typo"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="embed_dims"):
        read_config(folder)
    with pytest.raises(ConfigError, match="backbone"):
        AFLocConfig(backbone="vgg16")


def test_efficientnet_lite_backbone_starts_from_imagenet_weights():
    from afloc_engine.models.image_encoder import ImageEncoder, _efficientnet_lite_weights

    enc = ImageEncoder(tiny_config(backbone="efficientnet-lite0", pretrained_backbone=True, image_size=96))
    imagenet = _efficientnet_lite_weights("efficientnet-lite0")
    block = enc.backbone.blocks[3]._depthwise_conv.weight
    torch.testing.assert_close(block, imagenet["_blocks.3._depthwise_conv.weight"])
    # grey stem = the RGB kernels averaged, so a grey image gives the ImageNet response
    torch.testing.assert_close(enc.backbone.stem[0].weight[:, 0], imagenet["_conv_stem.weight"].sum(1) / 1)
    feats = enc(torch.randn(2, 1, 96, 96))
    assert feats.shallow.shape[:2] == (2, 32) and feats.deep.shape[-1] == 6 and feats.global_.shape == (2, 32)
