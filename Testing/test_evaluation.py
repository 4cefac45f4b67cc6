"""Evaluation readers and runner: covid-cxr layout, NIH and RSNA box tables, baselines, an oracle and the
tiny model, checked against counts and metric values worked out from the generated masks."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from afloc_engine.errors import DataError, PromptError
from afloc_engine.evaluation import (
    Box,
    ConstantPredictor,
    EvalPrompt,
    FunctionPredictor,
    ModelPredictor,
    evaluate_localization,
    load_dataset,
    load_prompt_file,
    lung_prior,
    rasterize_boxes,
    read_covid,
    to_markdown,
)
from afloc_engine.evaluation.runner import NothingEvaluatedError
from afloc_engine.io import read_image

H, W = 64, 80
# rectangles (top, bottom, left, right) of the generated masks
RECTS = {
    ("img_a", "ground_glass_opacity"): (10, 30, 10, 40),
    ("img_a", "consolidation"): (40, 60, 50, 75),
    ("img_a", "left_lung"): (5, 60, 45, 78),
    ("img_b", "ground_glass_opacity"): (5, 20, 40, 70),
}
# image id -> (split, has_masks)
IMAGES = {"img_a": ("dev", 1), "img_b": ("dev", 1), "img_c": ("dev", 1), "img_d": ("dev", 0), "img_e": ("train", 0)}


def rect_mask(rect, shape=(H, W)):
    top, bottom, left, right = rect
    m = np.zeros(shape, bool)
    m[top:bottom, left:right] = True
    return m


def write_covid(root: Path, rects=RECTS, images=IMAGES, mask_shape=None, pixels=None) -> Path:
    """A tiny dataset in the covid-cxr layout; ``mask_shape``/``pixels`` override per (image, class)."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    with (root / "pairs.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "image", "split", "patient_id", "view", "finding", "text", "has_masks"])
        for i, (image_id, (split, has)) in enumerate(images.items()):
            Image.fromarray(rng.integers(0, 255, (H, W), dtype=np.uint8)).save(root / "images" / f"{image_id}.png")
            w.writerow([image_id, f"images/{image_id}.png", split, i, "PA", "COVID-19", "note", has])
    with (root / "masks.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "class", "mask", "pixels"])
        for (image_id, cls), rect in rects.items():
            shape = (mask_shape or {}).get((image_id, cls))
            mask = rect_mask(rect) if shape is None else np.ones(shape, bool)  # a wrong-size mask is all set
            name = f"masks/{image_id}__{cls}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / name)
            w.writerow([image_id, cls, name, (pixels or {}).get((image_id, cls), int(mask.sum()))])
    return root


@pytest.fixture()
def covid(tmp_path):
    return write_covid(tmp_path / "covid")


def oracle(masks_by_image: dict[str, dict[str, np.ndarray]], finding_of: dict[str, str], invert: bool = False):
    """A predictor that knows the answer: +-0.8 (+ small noise) in / out of the region, P = 0.9 / 0.1."""

    def predict(images, prompts):
        heatmaps, probs = [], []
        for im in images:
            truth = masks_by_image[Path(im.source).stem]
            noise = np.random.default_rng(0).uniform(-0.05, 0.05, im.array.shape)
            maps, ps = [], []
            for p in prompts:
                region = truth.get(finding_of[p], np.zeros(im.array.shape, bool))
                if invert:
                    region = ~region
                maps.append(np.where(region, 0.8, -0.8) + noise)
                ps.append(0.9 if (finding_of[p] in truth) != invert else 0.1)
            heatmaps.append(np.stack(maps))
            probs.append(ps)
        return heatmaps, np.asarray(probs)

    return predict


def test_covid_reader_positives_negatives_and_skips(covid):
    ds = read_covid(covid, "dev")
    counts = ds.counts()
    assert counts["ground_glass_opacity"] == {"positive": 2, "negative": 1}  # img_c is a declared negative
    assert counts["consolidation"] == {"positive": 1, "negative": 2}  # img_b, img_c
    assert ds.default_findings == ["ground_glass_opacity", "consolidation"]  # anatomy is not a default finding
    assert "left_lung" in ds.findings
    assert {s.image_id for s in ds.samples} == {"img_a", "img_b", "img_c"}  # img_d has no masks, img_e is train
    assert [(s.item, s.group) for s in ds.skipped] == [("img_d", "no masks")]
    with pytest.raises(DataError, match="no image in split 'test'"):
        read_covid(covid, "test")


def test_covid_without_has_masks_column_has_no_negatives(covid):
    with (covid / "pairs.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    with (covid / "pairs.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[k for k in rows[0] if k != "has_masks"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    ds = read_covid(covid, "dev")
    assert ds.counts()["consolidation"] == {"positive": 1, "negative": 0}
    assert not ds.labels_complete and "no has_masks column" in ds.notes[0]


def test_covid_reader_missing_files(covid):
    (covid / "images" / "img_b.png").unlink()
    (covid / "masks" / "img_a__consolidation.png").unlink()
    ds = read_covid(covid, "dev")
    groups = {(s.item, s.finding): s.group for s in ds.skipped}
    assert groups[("img_b", None)] == "image file not found"
    assert groups[("img_a", "consolidation")] == "mask file not found"
    assert ds.counts()["ground_glass_opacity"]["positive"] == 1
    (covid / "pairs.csv").unlink()
    with pytest.raises(DataError, match="pairs.csv"):
        load_dataset(covid)


def test_rasterize_boxes_scales_from_the_box_frame():
    # a 50 x 60 box at (100, 200) in a 1024 frame on a 256 x 256 image: x 25..37.5, y 50..65
    mask = rasterize_boxes([Box(100, 200, 50, 60)], (256, 256), (1024, 1024))
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (25, 38, 50, 65)
    assert not rasterize_boxes([Box(2000, 2000, 10, 10)], (256, 256), (1024, 1024)).any()
    own = rasterize_boxes([Box(1.5, 2, 2, 1)], (8, 8), None)
    assert own.sum() == 3 and own[2, 1:4].all()  # x 1.5..3.5 touches columns 1, 2, 3 of row 2


def test_runner_oracle_and_baselines_match_hand_values(covid):
    ds = read_covid(covid, "dev")
    truth = {
        "img_a": {f: rect_mask(r) for (i, f), r in RECTS.items() if i == "img_a"},
        "img_b": {"ground_glass_opacity": rect_mask(RECTS[("img_b", "ground_glass_opacity")])},
        "img_c": {},
    }
    prompts = {"ground_glass_opacity": ["hazy opacity"], "consolidation": ["dense opacity"]}
    finding_of = {"hazy opacity": "ground_glass_opacity", "dense opacity": "consolidation"}
    result = evaluate_localization(
        {"oracle": oracle(truth, finding_of), "inverse": oracle(truth, finding_of, invert=True)},
        ds,
        prompts,
        n_bootstrap=200,
        figures=False,
    )
    assert [m["name"] for m in result["methods"]] == ["oracle", "inverse", "constant", "prior"]
    o = result["results"]["oracle"]
    ggo = o["findings"]["ground_glass_opacity"]["kinds"]["all"]
    assert ggo["n"] == 2 and ggo["iou"]["mean"] == 1.0 and ggo["dice"]["mean"] == 1.0
    assert ggo["pointing"]["mean"] == 1.0 and ggo["cnr"]["mean"] > 5
    assert ggo["auroc"]["value"] == 1.0 and (ggo["auroc"]["n_positive"], ggo["auroc"]["n_negative"]) == (2, 1)
    inv = result["results"]["inverse"]["findings"]["consolidation"]["kinds"]["all"]
    assert inv["iou"]["mean"] == 0.0 and inv["pointing"]["mean"] == 0.0 and inv["auroc"]["value"] == 0.0
    # constant 1.0 predicts the whole image: IoU = region area / image area, CNR 0, no AUROC
    areas = [20 * 30 / (H * W), 15 * 30 / (H * W)]
    const = result["results"]["constant"]["findings"]["ground_glass_opacity"]["kinds"]["all"]
    assert const["iou"]["mean"] == pytest.approx(np.mean(areas))
    assert const["dice"]["mean"] == pytest.approx(np.mean([2 * a / (1 + a) for a in areas]))
    assert const["cnr"]["mean"] == 0.0 and const["auroc"] is None
    lo, hi = const["iou"]["ci"]
    assert min(areas) <= lo <= hi <= max(areas)
    overall = result["results"]["constant"]["overall"]["all"]
    assert overall["n"] == 3 and overall["n_images"] == 2
    assert overall["iou"]["mean"] == pytest.approx(np.mean([*areas, 20 * 25 / (H * W)]))
    assert result["results"]["oracle"]["overall"]["precise"]["auroc"]["value"] == 1.0
    # the same images for every method, listed per image
    ids = {m: {r["image_id"] for r in result["per_image"][m]["localization"]} for m in result["results"]}
    assert len({frozenset(v) for v in ids.values()}) == 1
    assert result["cases"]["ground_glass_opacity"]["ranked_by"] == "oracle"
    md = to_markdown(result)
    assert "| oracle | precise | 3 | 1.000" in md and "## ground_glass_opacity (2 positive images, 1 negatives)" in md


def test_prompt_kinds_are_aggregated_per_image(covid):
    ds = read_covid(covid, "dev")
    # a predictor that is right for the 'precise' prompt and empty for the 'simple' one
    good = rect_mask(RECTS[("img_a", "consolidation")])

    def predict(images, prompts):
        maps = []
        for im in images:
            right = good if Path(im.source).stem == "img_a" else np.zeros((H, W), bool)
            maps.append(
                np.stack([np.where(right, 0.9, -0.9) if "precise" in p else np.full((H, W), -1.0) for p in prompts])
            )
        return maps, None

    prompts = {"consolidation": [EvalPrompt("precise words", "precise"), EvalPrompt("simple words", "simple")]}
    result = evaluate_localization(predict, ds, prompts, baselines=(), n_bootstrap=50, figures=False)
    kinds = result["results"]["predict"]["findings"]["consolidation"]["kinds"]
    assert kinds["precise"]["iou"]["mean"] == 1.0 and kinds["simple"]["iou"]["mean"] == 0.0
    assert kinds["all"]["iou"]["mean"] == 0.5 and kinds["all"]["n"] == 1  # one image, mean of its two prompts
    assert set(result["results"]["predict"]["findings"]["consolidation"]["prompts"]) == {
        "precise words",
        "simple words",
    }


def test_unknown_findings_and_nothing_to_evaluate(covid):
    ds = read_covid(covid, "dev")
    result = evaluate_localization(None, ds, findings=["Consolidation", "pneumothorax"], n_bootstrap=20, figures=False)
    assert result["findings"] == ["consolidation"]
    unknown = [s for s in result["skipped"] if s["category"] == "unknown finding"]
    assert [s["item"] for s in unknown] == ["pneumothorax"] and "available" in unknown[0]["reason"]
    with pytest.raises(NothingEvaluatedError, match="unknown finding: 1") as err:
        evaluate_localization(None, ds, findings=["pneumothorax"], n_bootstrap=20)
    assert any(s.item == "pneumothorax" for s in err.value.skipped)


def test_wrong_size_and_empty_masks_are_skipped(tmp_path):
    root = write_covid(
        tmp_path / "d",
        mask_shape={("img_b", "ground_glass_opacity"): (32, 32)},
        pixels={("img_a", "consolidation"): 0},
    )
    # img_a's GGO mask file is emptied although masks.csv claims pixels
    Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "masks" / "img_a__ground_glass_opacity.png")
    ds = read_covid(root, "dev")
    assert any(s.group == "empty mask" and s.finding == "consolidation" for s in ds.skipped)
    with pytest.raises(NothingEvaluatedError) as err:
        evaluate_localization(None, ds, n_bootstrap=20)
    groups = {(s.item, s.finding): s.group for s in err.value.skipped}
    assert groups[("img_b", "ground_glass_opacity")] == "mask of the wrong size"
    assert groups[("img_a", "ground_glass_opacity")] == "empty mask"
    assert "mask of the wrong size: 1" in str(err.value)
    # the lungs still evaluate, and the skips are in the result
    result = evaluate_localization(
        None, ds, findings=["left_lung", "ground_glass_opacity"], n_bootstrap=20, figures=False
    )
    assert result["findings"] == ["left_lung", "ground_glass_opacity"]
    assert result["dataset"]["counts"]["ground_glass_opacity"]["positive_evaluated"] == 0
    assert result["skipped_counts"]["mask of the wrong size"] == 1
    assert "mask is 32x32 px but its image is 80x64 px" in to_markdown(result)


def test_min_mask_pixels_skips_tiny_regions(covid):
    ds = read_covid(covid, "dev")
    result = evaluate_localization(None, ds, min_mask_pixels=500, n_bootstrap=20, figures=False)
    # GGO regions are 600 and 450 px: the second is skipped and reported; the 500 px consolidation stays
    assert result["dataset"]["counts"]["ground_glass_opacity"]["positive_evaluated"] == 1
    assert result["dataset"]["counts"]["consolidation"]["positive_evaluated"] == 1
    assert result["skipped_counts"]["region too small"] == 1


def test_box_tables_nih_and_rsna(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("00000001_000", "00000002_000", "p1", "p2"):
        Image.fromarray(rng.integers(0, 255, (256, 256), dtype=np.uint8)).save(images / f"{name}.png")
    nih = tmp_path / "BBox_List_2017.csv"
    nih.write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00000001_000.png,Atelectasis,100,200,400,300\n"
        "00000001_000.png,Effusion,0,0,512,512\n"
        "00000002_000.png,Atelectasis,512,512,256,256\n"
        "00000003_000.png,Nodule,10,10,20,20\n"
    )
    ds = load_dataset(nih, images=images)
    assert ds.format == "nih-bbox" and ds.findings == ["atelectasis", "effusion"]
    assert ds.counts()["atelectasis"] == {"positive": 2, "negative": 0}
    assert [s.group for s in ds.skipped] == ["image file not found"]
    result = evaluate_localization(None, ds, n_bootstrap=20, figures=False)
    # constant IoU = box area share: (100 x 75) / 256^2 and (64 x 64) / 256^2 after scaling by 1/4
    const = result["results"]["constant"]["findings"]["atelectasis"]["kinds"]["all"]
    assert const["iou"]["mean"] == pytest.approx(np.mean([100 * 75 / 256**2, 64 * 64 / 256**2]))
    rsna = tmp_path / "stage_2_train_labels.csv"
    rsna.write_text("patientId,x,y,width,height,Target\np1,0,0,512,1024,1\np1,512,0,256,1024,1\np2,,,,,0\np9,,,,,0\n")
    ds = load_dataset(rsna, images=images)
    assert ds.format == "rsna" and ds.counts()["pneumonia"] == {"positive": 1, "negative": 1}
    result = evaluate_localization(None, ds, n_bootstrap=20, figures=False)
    iou = result["results"]["constant"]["findings"]["pneumonia"]["kinds"]["all"]["iou"]["mean"]
    assert iou == pytest.approx(0.75)  # two boxes cover three quarters of the image


def test_prompt_files(tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text(
        "Ground-glass opacity:\n  simple: [Findings suggesting ground glass opacity]\n  precise: [Hazy opacity]\n"
        "consolidation: [Findings suggesting consolidation, Dense right lower lobe consolidation]\n"
    )
    p = load_prompt_file(y)
    assert p["ground_glass_opacity"] == [
        EvalPrompt("Findings suggesting ground glass opacity", "simple"),
        EvalPrompt("Hazy opacity", "precise"),
    ]
    assert [q.kind for q in p["consolidation"]] == ["simple", "precise"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"consolidation": [""]}')
    with pytest.raises(PromptError, match="consolidation"):
        load_prompt_file(bad)
    with pytest.raises(PromptError, match="not found"):
        load_prompt_file(tmp_path / "missing.yaml")


def test_lung_prior_is_a_fixed_anatomical_template():
    prior = lung_prior((100, 200))
    assert prior.min() == -1.0 and prior.max() == pytest.approx(1.0)
    # peaks in the left and right thirds, symmetric, low in the mediastinum and at the borders
    assert np.allclose(prior, prior[:, ::-1], atol=1e-5)
    row = prior[48]
    assert row[60] > row[100] and row[60] > row[5]
    assert prior[48, 60] > prior[5, 60] and prior[48, 60] > prior[95, 60]


def test_model_predictor_batches_like_localize(tiny_afloc, covid):
    images = [str(covid / "images" / f"img_{c}.png") for c in "abc"]
    prompts = ["Findings suggesting consolidation", "Dense opacity"]
    pred = ModelPredictor(tiny_afloc, "tiny", batch_size=2)([read_image(i) for i in images], prompts)
    for image, heat, prob in zip(images, pred.heatmaps, pred.probabilities):
        single = tiny_afloc.localize(image, prompts)
        np.testing.assert_allclose(heat, single.heatmaps, atol=1e-5)
        np.testing.assert_allclose(prob, single.probabilities, atol=1e-5)


def test_model_predictor_restores_training_mode(covid):
    from conftest import tiny_config

    from afloc_engine.models import AFLocModel

    model = AFLocModel(tiny_config()).train()
    ds = read_covid(covid, "dev")
    result = evaluate_localization(model, ds, n_bootstrap=20, cases=1, figures=True)
    assert model.training  # back in training mode for the trainer
    assert result["results"]["model"]["findings"]["consolidation"]["kinds"]["all"]["auroc"] is not None
    assert set(result["figures"]) == {"cases_ground_glass_opacity.png", "cases_consolidation.png"}
    grid = result["figures"]["cases_consolidation.png"]
    assert grid.dtype == np.uint8 and grid.shape[1] == 4 * 192  # image, the model, two baselines
    # also after an error in another predictor
    bad = FunctionPredictor(lambda images, prompts: ([], None), "bad")
    with pytest.raises(ValueError, match="bad: 0 heatmap sets"):
        evaluate_localization([model, bad], ds, n_bootstrap=10)
    assert model.training


def test_function_predictor_shape_errors(covid):
    ds = read_covid(covid, "dev")
    bad = FunctionPredictor(lambda images, prompts: ([np.zeros((1, 3, 3))] * len(images), None), "bad")
    with pytest.raises(ValueError, match="bad: heatmaps of shape"):
        evaluate_localization(bad, ds, baselines=(), n_bootstrap=10)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ConstantPredictor(2.0)
