"""Few-shot fine-tuning: an untrained adapter is the zero-shot model exactly, a few masks raise Dice on
new images, adapters round-trip through their folder, refuse other base models, never touch the base
model, and bad input gives one clear error with nothing written."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import afloc_engine
from afloc_engine.checkpoint import ModelInfo, save_model, sha256_file
from afloc_engine.errors import CheckpointError, DataError, PromptError
from afloc_engine.finetune import FinetuneCancelled, create_adapter, finetune, load_adapter
from afloc_engine.inference import AFLoc, load_model

PROMPT = "Findings suggesting blob"


def blob_example(rng: np.random.Generator, h: int = 72, w: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image with one bright disc and the disc's mask (the 'finding')."""
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    r = rng.uniform(0.13, 0.2) * min(h, w)
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    image = rng.normal(80, 12, (h, w)) + 100 * mask
    return image.astype(np.float32), mask


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum()))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny head trains fastest on one thread (two oversubscribe a busy 2-core CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def examples():
    rng = np.random.default_rng(1)
    return [blob_example(rng) for _ in range(5)]


@pytest.fixture(scope="module")
def quick_adapter(tiny_afloc, examples):
    """A short fine-tune on three examples (shared by the round-trip tests)."""
    return finetune(tiny_afloc, examples[:3], "blob", epochs=3, seed=0)


# --- 0 examples == zero-shot ----------------------------------------------------------------------
def test_untrained_adapter_gives_exactly_the_zero_shot_output(tiny_afloc, examples):
    adapter = create_adapter(tiny_afloc, "blob")
    images = [examples[0][0], examples[1][0][:60, :50]]
    plain = tiny_afloc.localize_batch(images, [PROMPT, "Findings suggesting pneumothorax"])
    adapted = tiny_afloc.localize_batch(images, [PROMPT, "Findings suggesting pneumothorax"], adapter=adapter)
    for a, b in zip(plain, adapted):
        assert np.array_equal(a.heatmaps, b.heatmaps)
        assert np.array_equal(a.masks, b.masks)
        assert np.array_equal(a.probabilities, b.probabilities)
        assert a.prompts == b.prompts


def test_zero_epochs_is_zero_shot_and_one_example_already_changes_it(tiny_afloc, examples):
    image, mask = examples[0]
    zero = finetune(tiny_afloc, examples[:1], "blob", epochs=0)
    plain = tiny_afloc.localize(image, PROMPT)
    assert np.array_equal(tiny_afloc.localize(image, PROMPT, adapter=zero).heatmaps, plain.heatmaps)

    one = finetune(tiny_afloc, examples[:1], "blob", epochs=40, seed=0)
    tuned = tiny_afloc.localize(image, PROMPT, adapter=one)
    assert not np.array_equal(tuned.heatmaps, plain.heatmaps)
    assert tuned.heatmaps.min() >= -1 and tuned.heatmaps.max() <= 1
    # one example: the fit on that example is better than zero-shot
    assert dice(tuned.masks[0], mask) > dice(plain.masks[0], mask) + 0.2
    assert one.metrics["train_dice"] > one.metrics["train_dice_zero_shot"]


def test_few_examples_raise_dice_on_held_out_images(tiny_afloc, examples):
    adapter = finetune(tiny_afloc, examples, "blob", seed=0)
    # >= 4 examples: one held out to pick the epoch count, then a refit on all five
    m = adapter.metrics
    assert m["heldout_example"] in adapter.example_ids and len(adapter.example_ids) == 5
    assert m["heldout_dice"] > m["heldout_dice_zero_shot"] and m["refit_epochs"] == m["best_epoch"]
    assert m["best_epoch"] <= m["epochs_run"] <= adapter.config.training["epochs"]
    rng = np.random.default_rng(123)
    tests = [blob_example(rng, int(rng.integers(60, 96)), int(rng.integers(60, 96))) for _ in range(8)]
    zero_shot = np.mean([dice(tiny_afloc.localize(i, PROMPT).masks[0], m) for i, m in tests])
    tuned = np.mean([dice(tiny_afloc.localize(i, PROMPT, adapter=adapter).masks[0], m) for i, m in tests])
    assert tuned > zero_shot + 0.2, (zero_shot, tuned)


def test_cross_validation_picks_the_correction_weight_and_zero_means_zero_shot(tiny_afloc, examples, tmp_path):
    adapter = finetune(tiny_afloc, examples[:3], "blob", epochs=25, seed=0, cv_folds=2)
    v = adapter.metrics["validation"]
    assert len(v["left_out"]) == 2 and set(v["left_out"]) <= set(adapter.example_ids)
    scores = {float(b): d for b, d in v["dice_by_blend"].items()}
    assert set(scores) == {0.0, 0.25, 0.5, 0.75, 1.0} and v["zero_shot_dice"] == scores[0.0]
    assert adapter.config.blend == v["blend"] == max(scores, key=lambda b: (scores[b], -b))
    # blobs are learnable: the left-out examples gain over zero-shot, so the head is kept
    assert adapter.config.blend > 0 and scores[adapter.config.blend] > scores[0.0]
    # the two fold heads stay as members, averaged with the main head; all of it survives a save
    assert len(adapter.members) == adapter.config.members == 2 and adapter.config.training["bag"]
    loaded = afloc_engine.load_adapter(adapter.save(tmp_path), tiny_afloc)
    assert loaded.config.blend == adapter.config.blend and len(loaded.members) == 2
    image = examples[4][0]
    before = tiny_afloc.localize(image, PROMPT, adapter=adapter).heatmaps
    assert np.array_equal(tiny_afloc.localize(image, PROMPT, adapter=loaded).heatmaps, before)
    alone = afloc_engine.load_adapter(adapter.path, tiny_afloc)
    alone.set_members([])
    assert not np.array_equal(tiny_afloc.localize(image, PROMPT, adapter=alone).heatmaps, before)
    # weight 0 reproduces the zero-shot output exactly
    loaded.config.blend = 0.0
    plain = tiny_afloc.localize(image, PROMPT)
    assert np.array_equal(tiny_afloc.localize(image, PROMPT, adapter=loaded).heatmaps, plain.heatmaps)
    # one example: nothing to leave out; bag=False: the folds choose the weight, the main head stays alone
    assert finetune(tiny_afloc, examples[:1], "blob", epochs=2).metrics["validation"] is None
    single = finetune(tiny_afloc, examples[:3], "blob", epochs=2, cv_folds=2, bag=False)
    assert single.members == [] and single.config.members == 0 and single.metrics["validation"] is not None


def test_components_reproduce_the_adapted_heatmap_at_every_weight(tiny_afloc, quick_adapter, examples):
    """The weight search scores clip(zero-shot + w * correction) from one pass; that must be what localize gives."""
    image = examples[4][0]
    [(zero_shot, correction)] = afloc_engine.finetune.adapter_components(tiny_afloc, quick_adapter, [image])
    assert zero_shot.shape == correction.shape == (1, *image.shape)
    assert np.array_equal(zero_shot, tiny_afloc.localize(image, PROMPT).heatmaps)
    assert np.abs(correction).max() > 0  # the quick adapter learnt something
    chosen = quick_adapter.config.blend
    try:
        for weight in (0.0, 0.5, 1.0):
            quick_adapter.config.blend = weight
            adapted = tiny_afloc.localize(image, PROMPT, adapter=quick_adapter).heatmaps
            np.testing.assert_allclose(adapted, np.clip(zero_shot + weight * correction, -1, 1), atol=1e-6)
    finally:
        quick_adapter.config.blend = chosen


def _constant_head(adapter, value: float):
    """A copy of the adapter's head whose correction is ``value`` everywhere (its last layer is zero)."""
    head = type(adapter.head)(adapter.config.head)
    head.load_state_dict(adapter.head.state_dict())
    with torch.no_grad():
        head.out.bias.fill_(value)
    return head.eval()


def test_one_wild_member_cannot_drag_the_adapted_map(tiny_afloc, examples, tmp_path):
    """Members combine by a pixel-wise median: one leave-one-out fit gone wrong (a huge negative
    correction here) leaves the map where the other heads put it; a saved adapter keeps that."""
    adapter = create_adapter(tiny_afloc, "blob")
    adapter.head = _constant_head(adapter, 0.2)
    adapter.set_members([(_constant_head(adapter, v), None) for v in (0.2, 0.3, -5.0)])
    image = examples[4][0]
    zero_shot = tiny_afloc.localize(image, PROMPT).heatmaps
    expected = np.clip(zero_shot + 0.2, -1, 1)  # median of (0.2, 0.2, 0.3, -5.0): 0.2
    adapted = tiny_afloc.localize(image, PROMPT, adapter=adapter).heatmaps
    np.testing.assert_allclose(adapted, expected, atol=1e-5)
    loaded = load_adapter(adapter.save(tmp_path), tiny_afloc)
    assert loaded.config.member_reduce == "median"
    np.testing.assert_allclose(tiny_afloc.localize(image, PROMPT, adapter=loaded).heatmaps, expected, atol=1e-5)
    # an adapter written before the median existed keeps its mean: (0.2 + 0.2 + 0.3 - 5) / 4 = -1.075
    meta = json.loads((loaded.path / "adapter.json").read_text())
    del meta["config"]["member_reduce"]
    (loaded.path / "adapter.json").write_text(json.dumps(meta))
    old = load_adapter(loaded.path, tiny_afloc)
    assert old.config.member_reduce == "mean"
    np.testing.assert_allclose(
        tiny_afloc.localize(image, PROMPT, adapter=old).heatmaps, np.clip(zero_shot - 1.075, -1, 1), atol=1e-5
    )
    meta["config"]["member_reduce"] = "mode"
    (loaded.path / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="member_reduce"):
        load_adapter(loaded.path, tiny_afloc)


def test_warnings_name_what_the_user_should_fix(tiny_afloc, examples):
    """One example, or a mask of a few pixels, is said in the adapter's metrics (the CLI and Slicer show them)."""
    one = finetune(tiny_afloc, examples[:1], "blob", epochs=1)
    assert len(one.metrics["warnings"]) == 1 and "give at least 3 examples" in one.metrics["warnings"][0]
    image, _ = examples[1]
    dot = np.zeros(image.shape, bool)
    dot[30, 30] = True  # one pixel of 4,608: a stray click
    warned = finetune(tiny_afloc, [examples[0], (image, dot, "stray")], "blob", epochs=1, cv_folds=0)
    text = " | ".join(warned.metrics["warnings"])
    assert "example stray" in text and "outline the whole finding" in text and "not checked" in text
    assert not any("example" in w and "mask covers" in w for w in one.metrics["warnings"])


def test_without_refit_the_best_held_out_state_is_kept(tiny_afloc, examples):
    adapter = finetune(tiny_afloc, examples[:4], "blob", epochs=30, patience=3, refit=False, seed=1)
    m = adapter.metrics
    assert adapter.heldout_ids == [m["heldout_example"]] and len(adapter.example_ids) == 3
    assert m["heldout_example"] not in adapter.example_ids
    assert m["refit_epochs"] is None and len(m["history"]) == m["epochs_run"]
    assert m["epochs_run"] >= 15  # not stopped before half of the epochs
    if m["heldout_informative"]:
        best = m["history"][m["best_epoch"] - 1]["heldout_dice"]
        assert best == max(r["heldout_dice"] for r in m["history"]) == m["heldout_dice"]


def test_same_seed_same_adapter_other_seed_other_adapter(tiny_afloc, examples):
    a = finetune(tiny_afloc, examples[:2], "blob", epochs=2, seed=7)
    b = finetune(tiny_afloc, examples[:2], "blob", epochs=2, seed=7)
    c = finetune(tiny_afloc, examples[:2], "blob", epochs=2, seed=8)
    ta, tb, tc = a.tensors(), b.tensors(), c.tensors()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)


def test_images_of_mixed_sizes(tiny_afloc):
    rng = np.random.default_rng(5)
    shapes = [(64, 80), (120, 70), (40, 40)]
    mixed = [blob_example(rng, h, w) for h, w in shapes]
    adapter = finetune(tiny_afloc, mixed, "blob", epochs=2)
    for (image, _), shape in zip(mixed, shapes):
        result = tiny_afloc.localize(image, PROMPT, adapter=adapter)
        assert result.heatmaps.shape == (1, *shape) and result.masks.shape == (1, *shape)


def test_several_findings_in_one_call(tiny_afloc):
    rng = np.random.default_rng(2)
    (i1, m1), (i2, m2) = blob_example(rng), blob_example(rng)
    dark = np.where(m2, 20.0, i2).astype(np.float32)
    data = [(i1, {"blob": m1}), (dark, {"hole": m2}), (i2, {"blob": m2, "hole": ~m2 & (np.roll(m2, 9, 0))})]
    adapter = finetune(tiny_afloc, data, ["blob", "hole"], epochs=3)
    assert adapter.findings == ["blob", "hole"] and adapter.config.head.n_findings == 2
    plain = tiny_afloc.localize(i1, [PROMPT, "Findings suggesting hole", "Findings suggesting fracture"])
    tuned = tiny_afloc.localize(
        i1, [PROMPT, "Findings suggesting hole", "Findings suggesting fracture"], adapter=adapter
    )
    assert not np.array_equal(tuned.heatmaps[0], plain.heatmaps[0])
    assert not np.array_equal(tuned.heatmaps[1], plain.heatmaps[1])
    assert np.array_equal(tuned.heatmaps[2], plain.heatmaps[2])  # not an adapter finding: zero-shot
    # asking for one finding gives the same map as asking for both (every zero-shot input is computed)
    alone = tiny_afloc.localize(i1, "Findings suggesting hole", adapter=adapter)
    np.testing.assert_allclose(alone.heatmaps[0], tuned.heatmaps[1], atol=1e-5)
    with pytest.raises(DataError, match="not among the findings"):
        finetune(tiny_afloc, [(i1, {"tumour": m1})], ["blob", "hole"])


# --- the adapter folder ---------------------------------------------------------------------------
def test_adapter_round_trip(tiny_afloc, quick_adapter, examples, tmp_path):
    folder = quick_adapter.save(tmp_path / "adapters")
    assert folder.parent == tmp_path / "adapters"
    assert re.fullmatch(r"blob-\d{8}-\d{6}", folder.name)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.json", "adapter.safetensors", "metrics.json"]
    meta = json.loads((folder / "adapter.json").read_text())
    assert meta["finding"] == "blob" and meta["base_model_id"] == tiny_afloc.model_id
    assert meta["training_examples"] == quick_adapter.example_ids and len(meta["training_examples"]) == 3
    assert meta["created"] and meta["config"]["head"]["embed_dim"] == tiny_afloc.config.embed_dim
    metrics = json.loads((folder / "metrics.json").read_text())
    assert len(metrics["history"]) == 3 and "seconds" in metrics

    loaded = afloc_engine.load_adapter(folder, tiny_afloc)
    original, again = quick_adapter.tensors(), loaded.tensors()
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    image = examples[4][0]
    a = tiny_afloc.localize(image, PROMPT, adapter=quick_adapter)
    b = tiny_afloc.localize(image, PROMPT, adapter=folder)  # a folder works too
    assert np.array_equal(a.heatmaps, b.heatmaps)
    # a second save in the same second gets its own folder
    assert quick_adapter.save(tmp_path / "adapters") != folder


def test_adapter_of_another_base_model_is_refused(tiny_model, quick_adapter, examples, tmp_path):
    other = AFLoc(tiny_model, ModelInfo(name="other", version="1"), "cpu")
    with pytest.raises(CheckpointError, match="trained on base model"):
        other.localize(examples[0][0], PROMPT, adapter=quick_adapter)
    folder = quick_adapter.save(tmp_path)
    with pytest.raises(CheckpointError, match="trained on base model"):
        load_adapter(folder, other)


def test_prompt_not_naming_the_finding_is_an_error(tiny_afloc, quick_adapter, examples):
    with pytest.raises(PromptError, match="blob"):
        tiny_afloc.localize(examples[0][0], "Findings suggesting pneumothorax", adapter=quick_adapter)


def test_corrupt_or_foreign_adapter_folder(tmp_path, quick_adapter):
    with pytest.raises(CheckpointError, match="not found"):
        load_adapter(tmp_path / "missing")
    folder = quick_adapter.save(tmp_path)
    (folder / "adapter.json").write_text(json.dumps({"format": "afloc"}))
    with pytest.raises(CheckpointError, match="not an AFLoc adapter"):
        load_adapter(folder)
    folder = quick_adapter.save(tmp_path)
    (folder / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_adapter(folder)


def test_base_model_file_and_weights_unchanged(tiny_model, examples, tmp_path):
    model_dir = save_model(tiny_model, tmp_path / "base", ModelInfo(name="tiny", version="1", trained=True))
    digest = sha256_file(model_dir / "model.safetensors")
    model = load_model(model_dir, "cpu")
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    adapter = finetune(model, examples[:2], "blob", epochs=2, unfreeze_last_stage=True, out_dir=tmp_path / "adapters")
    assert adapter.stage is not None and adapter.path.is_dir()
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.model.parameters())
    assert sha256_file(model_dir / "model.safetensors") == digest
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]
    # the tuned stage travels in the adapter and needs the base model to load
    with pytest.raises(CheckpointError, match="base model"):
        load_adapter(adapter.path)
    loaded = load_adapter(adapter.path, model)
    a = model.localize(examples[3][0], PROMPT, adapter=adapter)
    b = model.localize(examples[3][0], PROMPT, adapter=loaded)
    assert np.array_equal(a.heatmaps, b.heatmaps)


# --- bad input ------------------------------------------------------------------------------------
def _png(path, array):
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize(
    ("make_mask", "message"),
    [
        (lambda m: np.zeros_like(m, dtype=np.uint8), "empty"),
        (lambda m: np.full(m.shape, 255, np.uint8), "all foreground"),
        (lambda m: m[:-4].astype(np.uint8) * 255, "must match its own image"),
        (lambda m: m.astype(np.uint8) * 255 + np.arange(m.shape[1], dtype=np.uint8)[None] % 3, "not binary"),
    ],
    ids=["empty", "all-ones", "wrong-size", "not-binary"],
)
def test_bad_mask_file_names_the_file_and_writes_nothing(tiny_afloc, examples, tmp_path, make_mask, message):
    image, mask = examples[0]
    img_path = _png(tmp_path / "img.png", np.clip(image, 0, 255))
    bad = _png(tmp_path / "bad_mask.png", make_mask(mask))
    out = tmp_path / "adapters"
    with pytest.raises(DataError, match=message) as err:
        finetune(tiny_afloc, [(examples[1][0], examples[1][1]), (img_path, bad)], "blob", out_dir=out)
    assert err.value.path == bad
    assert not out.exists()


def test_should_stop_cancels_and_writes_nothing(tiny_afloc, examples, tmp_path):
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 5

    events = []
    with pytest.raises(FinetuneCancelled):
        finetune(tiny_afloc, examples[:2], "blob", epochs=50, out_dir=tmp_path / "a", should_stop=stop,
                 progress=events.append)  # fmt: skip
    assert not (tmp_path / "a").exists()
    assert events and all(e["step"] <= e["total"] for e in events)


def test_fewer_than_one_example(tiny_afloc, tmp_path):
    with pytest.raises(DataError, match="at least one"):
        finetune(tiny_afloc, [], "blob", out_dir=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_array_mask_errors_name_the_example(tiny_afloc, examples):
    image, mask = examples[0]
    with pytest.raises(DataError, match="example 1 mask of 'blob' is not binary"):
        finetune(tiny_afloc, [examples[0], (image, mask * 1.0 + 0.5 * np.eye(*mask.shape))], "blob")
    with pytest.raises(DataError, match="a mask must match its own image"):
        finetune(tiny_afloc, [(image, mask.T)], "blob")


# --- FinetuneConfig -------------------------------------------------------------------------------
def test_settings_are_one_config_recorded_in_the_adapter(tiny_afloc, examples, tmp_path):
    """A FinetuneConfig and keyword options give the same adapter; adapter.json records the settings,
    which read back into the same FinetuneConfig."""
    from afloc_engine.finetune import FinetuneAugmentConfig, FinetuneConfig

    config = FinetuneConfig(epochs=2, views=2, cv_folds=0, augment=FinetuneAugmentConfig(noise=0.02))
    a = finetune(tiny_afloc, examples[:2], "blob", config, seed=3, out_dir=tmp_path)
    b = finetune(tiny_afloc, examples[:2], "blob", epochs=2, views=2, cv_folds=0, seed=3,
                 augment=FinetuneAugmentConfig(noise=0.02))  # fmt: skip
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    [folder] = list(tmp_path.iterdir())
    saved = json.loads((folder / "adapter.json").read_text())["config"]["finetune"]
    assert saved["seed"] == 3 and saved["epochs"] == 2 and saved["augment"]["noise"] == 0.02
    assert FinetuneConfig.from_dict(saved) == FinetuneConfig(**{**config.__dict__, "seed": 3})
    assert FinetuneConfig.from_dict(load_adapter(folder, tiny_afloc).config.finetune).seed == 3


def test_invalid_settings_name_the_setting(tiny_afloc, examples):
    from afloc_engine.errors import ConfigError
    from afloc_engine.finetune import FinetuneConfig

    with pytest.raises(ConfigError, match="epochs must be >= 0"):
        finetune(tiny_afloc, examples[:1], "blob", epochs=-1)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        FinetuneConfig(batch_size=0)
    with pytest.raises(ConfigError, match="blend_grid"):
        FinetuneConfig(blend_grid=(0.5, -1.0))
    with pytest.raises(ConfigError, match="unknown fine-tuning setting 'epoch'"):
        FinetuneConfig.from_dict({"epoch": 3})
    with pytest.raises(TypeError, match="'epoch'"):  # a misspelt option, as before the config existed
        finetune(tiny_afloc, examples[:1], "blob", epoch=3)


def test_progress_reports_every_phase_in_order_up_to_the_total(tiny_afloc, examples):
    events = []
    finetune(tiny_afloc, examples[:4], "blob", epochs=4, cv_folds=2, progress=events.append)
    phases = [e["phase"] for e in events]
    assert phases[0] == "encode" and "train" in phases and phases[-2:] == ["validate", "validate"]
    assert [e["fold"] for e in events if e["phase"] == "validate" and "fold_step" not in e] == [1, 2]
    # validation reports progress inside each leave-one-out fit (it is about half of a run's time)
    inner = [e for e in events if "fold_step" in e]
    assert {e["fold"] for e in inner} == {1, 2} and all(0 < e["fold_step"] <= e["fold_total"] for e in inner)
    steps = [e["step"] for e in events]
    assert steps == sorted(steps) and all(e["total"] == events[0]["total"] for e in events)
    assert steps[-1] <= events[0]["total"]
