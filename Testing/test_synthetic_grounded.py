"""Synthetic-lesion pairs say what they paste and where; grounded pre-training learns where it is."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from afloc_engine.checkpoint import load_model_folder
from afloc_engine.text import split_sentences
from training.grounded import grounded_losses, kind_targets, pretrain
from training.synthetic import KIND_LABELS, PHRASES, Lesion, generate, lung_fields, paste_lesion, synthesize


def phantom_cxr(size=128, seed=0):
    """A bright body with two dark lung fields either side of a bright mediastinum, on dark air."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = ((xx - 0.5) / 0.45) ** 2 + ((yy - 0.55) / 0.5) ** 2 < 1
    image = np.where(body, 0.75, 0.05)
    for cx in (0.3, 0.7):
        image[((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1] = 0.3
    return np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1).astype(np.float32)


def test_lung_fields_find_both_lungs_and_not_the_air():
    image = phantom_cxr()
    fields = lung_fields(image)
    yy, xx = np.nonzero(fields)
    assert (xx < 64).any() and (xx >= 64).any()  # both lungs
    assert image[fields].mean() < 0.4  # the dark fields inside the body, not the bright body
    assert not fields[:, :5].any() and not fields[:5].any()  # not the air around it


def test_pasted_lesion_sits_on_the_named_side_and_brightens_it():
    image = phantom_cxr()
    before = image.copy()
    mask = paste_lesion(image, lung_fields(image), Lesion("consolidation", "right", "lower"), np.random.default_rng(1))
    assert mask.any()
    _, xx = np.nonzero(mask)
    assert xx.mean() < 64  # patient's right = image left on a frontal film
    assert image[mask].mean() > before[mask].mean() + 0.05


def test_synthesized_report_names_every_pasted_kind():
    rng = np.random.default_rng(3)
    for _ in range(10):
        image, labels, report = synthesize((phantom_cxr(seed=2) * 255).astype(np.uint8), rng)
        words = " ".join(w for s in split_sentences(report) for w in s)
        for kind, value in KIND_LABELS.items():
            if (labels == value).any():
                assert any(" ".join(w for s in split_sentences(p) for w in s) in words for p in PHRASES[kind])
        if not labels.any():
            assert "clear" in report


def test_the_all_recipe_names_each_painted_finding_in_its_report():
    """Every kind in a label map of the ``all`` recipe is named by one of its phrases in the report, and
    no normal sentence contradicts it (no "No pleural effusion." beside an effusion)."""
    rng = np.random.default_rng(5)
    seen = set()
    for i in range(40):
        image, labels, report = synthesize((phantom_cxr(seed=i % 4) * 255).astype(np.uint8), rng, "all")
        assert image.shape == labels.shape and image.dtype == np.uint8
        for kind, value in KIND_LABELS.items():
            if (labels == value).any():
                seen.add(kind)
                assert any(p.lower() in report.lower() for p in PHRASES[kind]), (kind, report)
        if (labels == KIND_LABELS["effusion"]).any():
            assert "No pleural effusion" not in report
    assert len(seen) >= 10  # the recipe paints most kinds within 40 images
    with pytest.raises(ValueError, match="recipe"):
        synthesize((phantom_cxr() * 255).astype(np.uint8), rng, "everything")


@pytest.mark.parametrize("side", ["right", "left"])
def test_anatomical_findings_sit_where_anatomy_puts_them(side):
    """Effusion at the base of its side, the heart shadow low and to the patient's left, pneumothorax a
    darker rim at the top and outer wall of its side: what the words are taught to point at."""
    from training import synthetic_findings as sf

    base = phantom_cxr(size=128)
    fields = lung_fields(base)
    own_half = slice(0, 64) if side == "right" else slice(64, 128)  # patient's right = image left

    image = base.copy()
    fluid = sf.effusion(image, fields, side, np.random.default_rng(0))
    ys, xs = np.nonzero(fluid)
    assert fluid[:, own_half].sum() == fluid.sum() and ys.mean() > 64  # its side, the lower half
    assert image[fluid].mean() > base[fluid].mean() + 0.1  # fluid is dense

    image = base.copy()
    heart = sf.cardiomegaly(image, fields, side, np.random.default_rng(0))
    ys, xs = np.nonzero(heart)
    assert ys.mean() > 64 and xs.mean() > 64 and xs.max() - xs.min() > 0.3 * 128  # low, patient's left, wide

    image = base.copy()
    air = sf.pneumothorax(image, fields, side, np.random.default_rng(0))
    ys, xs = np.nonzero(air)
    assert air[:, own_half].sum() == air.sum() and ys.mean() < np.nonzero(fields)[0].mean()  # its side, high
    assert image[air].mean() < base[air].mean()  # lucent


def test_kind_targets_are_cell_coverage_fractions():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :4, :4] = KIND_LABELS["nodule"]
    labels[0, 4:, 4:6] = KIND_LABELS["consolidation"]
    t = kind_targets(labels, (2, 2))
    k = list(KIND_LABELS)
    assert t[0, k.index("nodule"), 0, 0] == 1 and t[0, k.index("nodule")].sum() == 1
    assert t[0, k.index("consolidation"), 1, 1] == pytest.approx(0.5)
    assert t[0, k.index("ground glass opacity")].sum() == 0


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    backgrounds = root / "bg"
    backgrounds.mkdir()
    for i in range(6):
        Image.fromarray((phantom_cxr(seed=i) * 255).astype(np.uint8)).save(backgrounds / f"b{i}.png")
    return generate([backgrounds], 12, root / "pairs", size=96, seed=0, workers=1)


def test_generate_writes_a_manifest_the_trainer_reads(synthetic_set):
    rows = list(csv.DictReader(synthetic_set.open()))
    assert len(rows) == 12 and all(r["text"] for r in rows)
    labels = np.asarray(Image.open(synthetic_set.parent / rows[0]["mask"]))
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, *KIND_LABELS.values()}


def test_grounded_steps_lower_the_loss_and_pretrain_writes_a_model(synthetic_set, tmp_path):
    from afloc_engine.models import AFLocModel
    from training.grounded import GroundedSynthetic

    torch.manual_seed(0)
    config = tiny_config(image_size=64)
    model = AFLocModel(config)
    data = GroundedSynthetic(synthetic_set, 64, augment=False)
    images, labels = map(torch.stack, zip(*[data[i] for i in range(8)]))
    scale, bias = torch.nn.Parameter(torch.tensor(10.0)), torch.nn.Parameter(torch.tensor(-4.0))
    params = [p for n, p in model.named_parameters() if "transformer" not in n] + [scale, bias]
    opt = torch.optim.Adam(params, lr=3e-3)
    phrases = [PHRASES[k][0] for k in KIND_LABELS]
    negatives = [f"No {k}." for k in KIND_LABELS]
    first = None
    for _ in range(8):
        loss = grounded_losses(model, images, labels, phrases, negatives, scale, bias)["total"]
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first
    out = pretrain(synthetic_set, tmp_path / "g", config, epochs=1, batch_size=4, workers=0, progress="none")
    loaded, info = load_model_folder(out)
    assert info.trained and info.extra["stage"] == "grounded-synthetic"


def test_a_short_grounded_run_trains_and_too_few_images_is_one_line(synthetic_set, tmp_path, capsys):
    """A smoke test on a few images: exactly 10 steps crashed one-cycle's warm-up (ZeroDivisionError);
    fewer images than one batch is one line, exit 2, and no model folder."""
    from training.grounded import main

    out = pretrain(synthetic_set, tmp_path / "g10", tiny_config(image_size=64), epochs=5, batch_size=6, workers=0,
                   progress="none")  # fmt: skip
    assert load_model_folder(out)[1].trained
    assert (synthetic_set.parent / "labels.json").is_file()  # the masks' key
    code = main(["--manifest", str(synthetic_set), "--out", str(tmp_path / "none"), "--batch-size", "64",
                 "--progress", "none"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no full batch of 64" in err[0]
    assert not (tmp_path / "none").exists()


def test_strong_augmentation_mirrors_image_and_labels_together():
    """``--augment strong`` flips half the chests left-right (so a finding's usual side stops telling which
    finding it is); the label map always moves with the image."""
    import random

    from training.grounded import AUGMENTATIONS, _random_affine

    image = torch.zeros(1, 16, 16)
    image[0, :, :3] = 1.0  # a bright band at the image's left edge
    labels = (image * 3).round()
    random.seed(0)
    flipped = 0
    for _ in range(40):
        warped, warped_labels = _random_affine(image, labels, AUGMENTATIONS["strong"])
        on_labels, on_pixels = warped_labels > 0, warped > 0.5
        overlap = (on_labels & on_pixels).sum() / max(1, int((on_labels | on_pixels).sum()))
        assert overlap > 0.7  # the labels follow the pixels (nearest vs bilinear differ at the edges)
        flipped += bool(warped[0, :, 8:].sum() > warped[0, :, :8].sum())
    assert 10 <= flipped <= 30
    standard = [_random_affine(image, labels)[0] for _ in range(20)]
    assert all(w[0, :, :8].sum() > w[0, :, 8:].sum() for w in standard)  # never mirrored
