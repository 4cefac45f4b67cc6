"""Training data: config errors, manifest/MIMIC/covid/NIH/IU readers, the prepared store, sampler, augmentation."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from afloc_engine.errors import ConfigError, DataError

PLACES = ("left upper", "right upper", "left lower", "right lower")


def make_pairs(folder, n=16, size=(48, 40), seed=0, bad=()):
    """n generated radiograph-like PNGs with a bright patch, and reports saying where it is.

    Returns the manifest path. Rows in ``bad`` get an unreadable image file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "text", "patient_id", "split"])
        for i in range(n):
            k = i % 4
            img = rng.normal(80, 12, size).clip(0, 255)
            y, x = (6 if k < 2 else size[0] - 18), (4 if k % 2 == 0 else size[1] - 16)
            img[y : y + 12, x : x + 12] = 220
            path = folder / f"img{i:03d}.png"
            if i in bad:
                path.write_bytes(b"\x89PNG\r\n\x1a\n broken")
            else:
                Image.fromarray(img.astype(np.uint8)).save(path)
            text = f"Dense opacity in the {PLACES[k]} zone. Heart size is normal. No pleural effusion."
            writer.writerow([path.name, text, f"p{i}", "train"])
    return manifest


def base_config(manifest, **sections):
    """A tiny CPU training config dict (ResNet-10, D=32, 64 px, frozen text transformer)."""
    cfg = {
        "model": {
            "backbone": "resnet10",
            "embed_dim": 32,
            "image_size": 64,
            "encoder_input_size": None,
            "text_max_length": 32,
        },
        "data": {
            "train": [{"format": "manifest", "path": str(manifest)}],
            "store_size": 72,
            "workers": 0,
            "prepare_workers": 0,
        },
        "optim": {"batch_size": 4, "lr": 1e-3, "epochs": 1},
        "freeze": {"text_encoder": True},
        "log": {"every": 1, "tensorboard": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


# --- config ------------------------------------------------------------------------------------
def test_unknown_keys_are_errors_naming_key_and_file(tmp_path):
    from training.config import load_config

    manifest = make_pairs(tmp_path / "d", n=4)
    cfg = base_config(manifest)
    cfg["optim"]["learning_rate"] = 1e-4
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "optim.learning_rate" in str(err.value) and str(path) in str(err.value)
    cfg = base_config(manifest)
    cfg["model"]["backbone_name"] = "resnet50"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="backbone_name"):
        load_config(path)
    cfg = base_config(manifest)
    cfg["data"]["train"][0]["paht"] = "x"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"data\.train\[0\]\.paht"):
        load_config(path)


def test_yaml_config_defaults_overrides_and_bad_values(tmp_path):
    import yaml

    from training.config import load_config

    manifest = make_pairs(tmp_path / "d", n=4)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": [{"format": "manifest", "path": str(manifest)}]}}))
    c = load_config(path)
    # the reference recipe is the default
    assert (c.optim.lr, c.optim.weight_decay, c.optim.gamma, c.optim.grad_clip, c.optim.batch_size) == (
        2e-5,
        1e-6,
        0.9,
        0.25,
        128,
    )
    assert c.optim.betas == (0.5, 0.999)
    c = load_config(path, ["optim.lr=1e-4", "model.weight_word=0"])
    assert c.optim.lr == 1e-4 and c.model_config().weight_word == 0
    with pytest.raises(ConfigError, match="optim.epochs must be a number"):
        load_config(path, ["optim.epochs=many"])
    with pytest.raises(ConfigError, match="every loss weight is 0"):
        load_config(path, ["model.weight_word=0", "model.weight_sentence=0", "model.weight_global=0"])
    with pytest.raises(ConfigError, match="precision"):
        load_config(path, ["runtime.precision=fp8"])


# --- readers -----------------------------------------------------------------------------------
def test_manifest_skips_bad_rows_and_counts_them(tmp_path):
    from training.data import read_manifest

    manifest = make_pairs(tmp_path, n=4)
    with manifest.open("a", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["img000.png", "   ", "p9", "train"])  # no text
        writer.writerow(["missing.png", "Small effusion.", "p9", "train"])  # no image
    records, skipped = read_manifest(manifest)
    assert len(records) == 4
    assert [reason.split(":")[0] for _, reason in skipped] == ["empty report text", "image not found"]
    assert all(r.image.endswith(".png") and r.patient_id for r in records)


def test_jsonl_manifest_and_missing_columns(tmp_path):
    from training.data import read_manifest

    make_pairs(tmp_path, n=2)
    jl = tmp_path / "m.jsonl"
    jl.write_text('{"image": "img000.png", "report": "Clear lungs."}\n\n{"image": "img001.png", "report": ""}\n')
    records, skipped = read_manifest(jl)
    assert [r.text for r in records] == ["Clear lungs."] and len(skipped) == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("file,caption\na.png,x\n")
    with pytest.raises(DataError, match="image column"):
        read_manifest(bad)


def test_no_usable_rows_is_one_clear_error(tmp_path):
    from training.data import load_source

    manifest = tmp_path / "m.csv"
    manifest.write_text("image,text\nnope.png,Some text.\nalso.png,\n")
    with pytest.raises(DataError, match="no usable rows") as err:
        load_source("manifest", str(manifest))
    assert str(manifest) in str(err.value)
    with pytest.raises(DataError, match="not found"):
        load_source("manifest", str(tmp_path / "absent.csv"))


def test_mimic_layout_findings_and_impression(tmp_path):
    from training.data import read_mimic

    study = tmp_path / "files" / "p10" / "p10000032" / "s50414267"
    study.mkdir(parents=True)
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(study / "d1.jpg")
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(study / "d2.jpg")
    (study.parent / "s50414267.txt").write_text(
        "FINAL REPORT\n EXAMINATION: CHEST\n INDICATION: cough\n FINDINGS: Small left\n effusion.\n"
        " IMPRESSION: Effusion.\n"
    )
    empty = study.parent / "s2"
    empty.mkdir()
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(empty / "d3.jpg")
    (study.parent / "s2.txt").write_text("FINAL REPORT\n INDICATION: none\n")
    (tmp_path / "mimic-cxr-2.0.0-metadata.csv").write_text("dicom_id,ViewPosition\nd1,PA\nd2,LATERAL\nd3,AP\n")
    records, skipped = read_mimic(tmp_path)
    assert [(r.id, r.text, r.patient_id) for r in records] == [("d1", "Small left effusion. Effusion.", "p10000032")]
    reasons = sorted(reason for _, reason in skipped)
    assert reasons == ["no Findings or Impression section", "not a frontal view (LATERAL)"]


def test_nih_labels_become_sentences_the_engine_splits():
    from afloc_engine.text import split_sentences
    from training.data import nih_report

    text = nih_report("Effusion|Pleural_Thickening")
    assert split_sentences(text) == [
        ["findings", "suggesting", "pleural", "effusion"],
        ["findings", "suggesting", "pleural", "thickening"],
    ]
    assert "no acute" in nih_report("No Finding").lower()


def test_iu_reports_read_from_torchxrayvision_archive():
    from training.data import default_iu_archive, read_iu

    if not default_iu_archive().is_file():
        pytest.skip("torchxrayvision's NLMCXR_reports.tgz is not installed")
    records, skipped = read_iu()
    assert len(records) > 3000 and all(r.image is None for r in records)
    assert all("XXXX" not in r.text for r in records[:200])
    assert len({r.id for r in records}) == len(records)


@pytest.mark.shared_data
def test_covid_and_nih_readers_on_real_data(shared_data):
    from training.data import read_covid, read_nih

    records, skipped = read_covid(shared_data / "covid-cxr")
    train = [r for r in records if r.split == "train"]
    assert len(train) == 341  # the README: 341 train images have a non-empty note
    assert all(r.text.strip() for r in records) and skipped
    nih, _ = read_nih(shared_data / "nih-cxr14-sample")
    assert len(nih) == 923 and all("." in r.text for r in nih)


# --- store ---------------------------------------------------------------------------------------
def test_prepare_store_skips_unreadable_images_and_is_atomic(tmp_path):
    from training.data import read_manifest
    from training.store import Store, load_letterboxed, prepare_store

    manifest = make_pairs(tmp_path / "d", n=6, bad=(2,))
    records, _ = read_manifest(manifest)
    folder = prepare_store(records, tmp_path / "store", size=32, workers=0, progress="none")
    store = Store(folder)
    assert len(store) == 5 and store.size == 32
    assert len(store.skipped) == 1 and "img002" in store.skipped[0][0]
    # rows keep the input order; pixels are the letterboxed image
    assert [r.id for r in store.records] == ["img000", "img001", "img003", "img004", "img005"]
    np.testing.assert_array_equal(store.image(2), load_letterboxed(records[3].image, 32))
    assert not list(tmp_path.glob(".store.*"))  # no temporary folder left behind
    mtime = (folder / "index.json").stat().st_mtime_ns
    prepare_store(records, folder, size=32, workers=0, progress="none")  # same input: reused
    assert (folder / "index.json").stat().st_mtime_ns == mtime
    (folder / "images.u8").write_bytes(b"short")
    with pytest.raises(DataError, match="truncated"):
        Store(folder)


# --- sampler and augmentation --------------------------------------------------------------------
def test_rank_slices_of_global_batches_equal_the_single_process_batches():
    from training.dataset import GlobalBatchSampler

    one = GlobalBatchSampler(23, 6, seed=3)
    one.set_epoch(2)
    ranks = [GlobalBatchSampler(23, 6, rank=r, world=3, seed=3) for r in range(3)]
    for s in ranks:
        s.set_epoch(2)
    merged = [sum(parts, []) for parts in zip(*(list(s) for s in ranks))]
    assert merged == list(one) and len(merged) == 3
    resumed = GlobalBatchSampler(23, 6, seed=3)
    resumed.set_epoch(2, start_step=2)
    assert list(resumed) == list(one)[2:]
    other = GlobalBatchSampler(23, 6, seed=3)
    other.set_epoch(3)
    assert list(other) != list(one)


def test_augmentation_is_seeded_per_sample_and_epoch(tmp_path):
    from training.config import TrainAugmentConfig
    from training.data import read_manifest
    from training.dataset import PairDataset
    from training.store import Store, prepare_store

    records, _ = read_manifest(make_pairs(tmp_path / "d", n=4))
    store = Store(prepare_store(records, tmp_path / "s", size=72, workers=0, progress="none"))
    ds = PairDataset(store, [0, 1, 2, 3], image_size=64, augment=TrainAugmentConfig(keep_fraction=0.5), seed=1)
    a, b = ds[1], ds[1]
    assert a.image.shape == (1, 64, 64)
    torch.testing.assert_close(a.image, b.image)
    assert a.report == b.report and 1 <= len(a.report) <= 3
    ds.set_epoch(1)
    assert not torch.equal(ds[1].image, a.image)  # another epoch, another view
    plain = PairDataset(store, [0, 1], image_size=64, augment=None)
    assert plain[0].image.min() >= -1 and plain[0].image.max() <= 1
    assert len(plain[0].report) == 3  # no sentence dropped without text augmentation
