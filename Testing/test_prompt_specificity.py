"""Prompt specificity: the per-prompt score and warning (afloc_engine.specificity), the evaluation's metric
functions (ranks, contrasts, nulls, invariance) on hand-built arrays whose answers are known by
construction, and the new dataset readers (TBX11K, ChestX-Det, NIH labels) on generated layouts."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from afloc_engine.errors import DataError
from afloc_engine.evaluation import FunctionPredictor, PriorPredictor, evaluate_localization, load_dataset
from afloc_engine.evaluation.datasets import CHESTX_DET_FINDINGS, heldout_part, read_tbx11k
from afloc_engine.evaluation.prompt_specificity import (
    contrasts,
    evaluate_specificity,
    mean_invariance,
    own_rank,
    per_finding_mean,
    score_specificity,
    specificity_markdown,
)
from afloc_engine.specificity import (
    LUNG_WARN_R,
    assess,
    correlation_matrix,
    lung_correlations,
    lung_field_map,
    specificity_scores,
)

S = 64  # side of the generated images


# --- afloc_engine.specificity ----------------------------------------------------------------------
def test_identical_maps_score_zero_and_unrelated_maps_score_about_one():
    rng = np.random.default_rng(0)
    lungs = lung_field_map((S, S))
    same = specificity_scores(np.stack([lungs, lungs, lungs]))
    assert np.allclose(same, 0.0, atol=1e-9)
    noise = rng.normal(size=(3, S, S))
    unrelated = specificity_scores(noise)
    assert all(abs(s - 1.0) < 0.05 for s in unrelated)
    # the opposite of the others: 2
    assert specificity_scores(np.stack([lungs, -lungs]))[0] == pytest.approx(2.0)


def test_single_prompt_or_constant_map_has_no_specificity():
    lungs = lung_field_map((S, S))
    assert specificity_scores(lungs[None]) == [None]
    scores = specificity_scores(np.stack([np.zeros((S, S)), lungs, -lungs]))
    assert scores[0] is None  # a constant map correlates with nothing
    assert scores[1] == pytest.approx(2.0)  # only its pair with -lungs counts
    assert np.isnan(correlation_matrix(np.stack([np.ones((4, 4)), lungs[:4, :4]]))[0, 1])


def test_warning_when_the_map_is_the_lungs_and_not_when_it_is_a_focal_spot():
    lungs = lung_field_map((S, S))
    spot = -np.ones((S, S), np.float32)
    spot[5:12, 5:12] = 1.0
    out = assess(np.stack([lungs, spot]), ["Findings suggesting effusion", "Findings suggesting nodule"])
    assert out[0].lung_correlation == pytest.approx(1.0)
    assert out[0].warning and "cannot tell this finding from the lungs" in out[0].warning
    assert out[1].lung_correlation < LUNG_WARN_R and out[1].warning is None
    # with one prompt only the lung check can warn
    alone = assess(lungs[None], ["Findings suggesting effusion"])[0]
    assert alone.specificity is None and alone.warning
    # two prompts with the same (non-lung) map: warned for not differing from each other
    twins = assess(np.stack([spot, spot]), ["a", "b"])
    assert all("hardly changes" in t.warning for t in twins)


def test_a_prompt_the_text_model_cannot_read_is_flagged_and_left_out():
    """'胸腔积液' has no word the text model reads: its (noise) map gets no specificity but a warning that
    says so, and it does not make the other prompts' maps look specific."""
    rng = np.random.default_rng(0)
    lungs = lung_field_map((48, 48))
    noise = rng.uniform(-1, 1, (48, 48)).astype(np.float32)
    readable = assess(np.stack([lungs, lungs * 0.9 + 0.05]), ["edema", "pneumonia"])
    with_noise = assess(np.stack([lungs, lungs * 0.9 + 0.05, noise]), ["edema", "pneumonia", "胸腔积液"])
    assert with_noise[2].specificity is None and "reads no word" in with_noise[2].warning
    assert [s.specificity for s in with_noise[:2]] == pytest.approx([s.specificity for s in readable])
    french, chinese = assess(np.stack([noise, lungs]), ["épanchement pleural", "气胸"])
    assert "reads no word" not in (french.warning or "") and "reads no word" in chinese.warning  # accents fold


def test_assess_rejects_mismatched_prompts_and_lung_map():
    with pytest.raises(ValueError):
        assess(np.zeros((2, S, S)), ["only one"])
    with pytest.raises(ValueError):
        lung_correlations(np.zeros((1, S, S)), np.zeros((S, S + 1)))


# --- metric functions ----------------------------------------------------------------------------
def test_own_rank_with_ties():
    scores = np.array([[3.0, 1.0, 2.0], [1.0, 1.0, 1.0], [0.0, 5.0, 1.0], [2.0, 2.0, 0.0]])
    rank, top1 = own_rank(scores, np.array([0, 0, 0, 1]))
    assert rank.tolist() == [1.0, 2.0, 3.0, 1.5]
    assert top1.tolist() == pytest.approx([1.0, 1 / 3, 0.0, 0.5])


def test_contrasts_by_hand():
    heat = np.zeros((1, 2, 4))
    heat[0, 0] = [1, 1, 0, 0]  # prompt 0 lights the first two pixels
    heat[0, 1] = [0, 0, 1, 1]
    outline = np.array([[True, True, False, False]])
    c = contrasts(heat, outline)
    assert c.shape == (1, 2, 1)
    assert c[0, :, 0].tolist() == [1.0, -1.0]
    with pytest.raises(ValueError):
        contrasts(heat, np.ones((1, 4), bool))


def test_per_finding_mean_counts_each_finding_once():
    values = np.array([1.0, 1.0, 1.0, 1.0, 0.0])
    finding = np.array([0, 0, 0, 0, 1])
    macro, per = per_finding_mean(values, finding, [0, 1])
    assert per == {0: 1.0, 1: 0.0} and macro == 0.5  # pooled would be 0.8


def _outline_world(n_images: int = 6, k: int = 4, seed: int = 0):
    """N images, K findings; each image has outlines of two findings at random cells of an 8 x 8 grid."""
    rng = np.random.default_rng(seed)
    g = 64
    outlines, o_img, o_f = [], [], []
    for i in range(n_images):
        for f in rng.choice(k, size=2, replace=False):
            m = np.zeros(g, bool)
            m[rng.choice(g, size=6, replace=False)] = True
            outlines.append(m)
            o_img.append(i)
            o_f.append(int(f))
    return np.stack(outlines), np.array(o_img), np.array(o_f), g


def test_a_predictor_that_lights_exactly_the_outline_ranks_first_above_the_shuffled_null():
    outlines, o_img, o_f, g = _outline_world()
    n, k = o_img.max() + 1, 4
    maps = np.full((n, k, g), -1.0)
    for m, i, f in zip(outlines, o_img, o_f):
        maps[i, f, m] = 1.0
    s = score_specificity(contrasts(maps, outlines), o_img, o_f, counted=range(k), n_bootstrap=50, n_shuffles=50)
    assert s["model"]["top1"]["mean"] == 1.0 and s["model"]["mean_rank"]["mean"] == 1.0
    assert s["shuffled_null"]["top1"]["p95"] < 1.0
    assert s["shuffled_null"]["p_top1"] <= 0.05


def test_a_predictor_that_ignores_the_prompt_ranks_at_chance():
    outlines, o_img, o_f, g = _outline_world()
    n, k = o_img.max() + 1, 4
    rng = np.random.default_rng(1)
    one = rng.normal(size=(n, 1, g))
    maps = np.repeat(one, k, axis=1)  # every prompt the same map: all contrasts tie
    s = score_specificity(contrasts(maps, outlines), o_img, o_f, counted=range(k), n_bootstrap=20, n_shuffles=20)
    assert s["model"]["top1"]["mean"] == pytest.approx(1 / k)
    assert s["model"]["mean_rank"]["mean"] == pytest.approx((k + 1) / 2)
    assert mean_invariance(maps.reshape(n, k, 8, 8)) == pytest.approx(np.ones(n))


def test_a_location_habit_is_caught_by_the_class_mean_null():
    """Each prompt always lights its finding's usual place: the model scores well, but so does its class mean."""
    k, g, n = 3, 30, 9
    home = [np.arange(10 * f, 10 * f + 10) for f in range(k)]
    outlines, o_img, o_f = [], [], []
    for i in range(n):
        f = i % k
        m = np.zeros(g, bool)
        m[home[f]] = True
        outlines.append(m)
        o_img.append(i)
        o_f.append(f)
    maps = np.full((n, k, g), -1.0)
    for f in range(k):
        maps[:, f, home[f]] = 1.0  # the same for every image
    s = score_specificity(contrasts(maps, np.stack(outlines)), np.array(o_img), np.array(o_f), range(k), 20, 20)
    assert s["model"]["top1"]["mean"] == 1.0
    assert s["class_mean_null"]["top1"]["mean"] == 1.0  # no image information needed
    assert s["shuffled_null"]["top1"]["p95"] == 1.0  # another image's maps do as well: not above the null


# --- generated datasets ----------------------------------------------------------------------------
def write_chestx_det(root: Path, n: int = 6) -> Path:
    """ChestX-Det layout: image i has an effusion outline at the bottom and (odd i) a nodule at the top."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(2)
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "image_id", "patient_id", "chestx_det_findings", "masks"])
        for i in range(n):
            iid = f"0000{i}_000"
            Image.fromarray(rng.integers(0, 255, (S, S), dtype=np.uint8)).save(root / "images" / f"{iid}.png")
            masks = []
            regions = {"Effusion": (slice(44, 60), slice(8, 56))}
            if i % 2:
                regions["Nodule"] = (slice(6 + i, 14 + i), slice(20, 28))
            for name, (ys, xs) in regions.items():
                m = np.zeros((S, S), np.uint8)
                m[ys, xs] = 255
                Image.fromarray(m).save(root / "masks" / f"{iid}__{name}.png")
                masks.append(f"masks/{iid}__{name}.png")
            w.writerow([f"images/{iid}.png", iid, f"{i:08d}", "|".join(regions), " ".join(masks)])
    return root


def outline_oracle(root: Path):
    """Lights exactly the image's outline of a prompt's finding (the prompt names it), -1 elsewhere."""
    names = {"findings suggesting pleural effusion": "Effusion", "findings suggesting nodule": "Nodule"}

    def fn(images, prompts):
        maps = []
        for im in images:
            iid = Path(str(im.source)).stem
            out = np.full((len(prompts), S, S), -1.0, np.float32)
            for j, p in enumerate(prompts):
                for key, name in names.items():
                    path = root / "masks" / f"{iid}__{name}.png"
                    if key == p.lower() and path.is_file():
                        out[j][np.asarray(Image.open(path)) > 0] = 1.0
            maps.append(out)
        return maps, None

    return FunctionPredictor(fn, name="oracle")


def test_chestx_det_reader_and_specificity_end_to_end(tmp_path):
    root = write_chestx_det(tmp_path / "cx")
    ds = load_dataset(root)
    assert ds.format == "chestx-det" and ds.label_set[:13] == list(CHESTX_DET_FINDINGS)
    assert ds.counts()["effusion"] == {"positive": 6, "negative": 0}
    assert ds.counts()["nodule"] == {"positive": 3, "negative": 3}
    spec = evaluate_specificity(
        [outline_oracle(root), PriorPredictor()], ds, n_bootstrap=30, n_shuffles=30, grid=32, min_outlines=3
    )
    assert spec["chance"] == {"top1": pytest.approx(1 / 13), "mean_rank": 7.0}
    assert spec["outlines"]["effusion"] == 6 and spec["counted"] == ["effusion", "nodule"]
    oracle = spec["results"]["oracle"]
    assert oracle["model"]["top1"]["mean"] == 1.0 and oracle["model"]["mean_rank"]["mean"] == 1.0
    low, high = oracle["model"]["top1"]["ci"]
    assert low <= 1.0 <= high
    prior = spec["results"]["prior"]
    assert prior["model"]["top1"]["mean"] == pytest.approx(1 / 13)
    assert prior["model"]["mean_rank"]["mean"] == pytest.approx(7.0)
    # the nodule sits in a different place on every image: another image's maps miss it
    assert oracle["shuffled_null"]["top1"]["mean"] < 1.0
    md = specificity_markdown(spec)
    assert "| oracle | 1.000" in md and "Chance: top-1 0.077" in md


def test_specificity_needs_a_finding_with_enough_outlines(tmp_path):
    root = write_chestx_det(tmp_path / "cx", n=2)
    with pytest.raises(DataError, match="outlines"):
        evaluate_specificity([PriorPredictor()], load_dataset(root), min_outlines=3, n_bootstrap=5, n_shuffles=5)


def write_tbx(root: Path, n: int = 9) -> Path:
    (root / "images").mkdir(parents=True)
    with (root / "labels.csv").open("w", newline="") as fh, (root / "boxes.csv").open("w", newline="") as fb:
        w, b = csv.writer(fh), csv.writer(fb)
        w.writerow(["image", "image_id", "labels", "released_width", "released_height"])
        b.writerow(["image", "finding", "x1", "y1", "x2", "y2"])
        for i in range(n):
            name = f"images/tb{i:04d}.png"
            Image.fromarray(np.zeros((S, S), np.uint8)).save(root / name)
            w.writerow([name, f"tb{i:04d}", "ActiveTuberculosis", 128, 128])  # boxes on a 128 px grid
            b.writerow([name, "ActiveTuberculosis", 0, 0, 64, 32])
            if i == 0:
                b.writerow([name, "ObsoletePulmonaryTuberculosis", 64, 64, 128, 128])
    return root


def test_tbx11k_reader_boxes_and_fixed_heldout_part(tmp_path):
    root = write_tbx(tmp_path / "tb")
    ds = load_dataset(root)
    assert ds.format == "tbx11k" and ds.default_findings == ["tuberculosis"]
    first = next(s for s in ds.samples if s.image_id == "tb0000")
    assert set(first.positives) == {"tuberculosis", "active_tuberculosis", "obsolete_pulmonary_tuberculosis"}
    from afloc_engine.evaluation import load_target

    tb = load_target(first.positives["tuberculosis"], (S, S))
    # (0, 0)-(64, 32) and (64, 64)-(128, 128) on the 128 px grid -> top-left 32 x 16 and bottom-right 32 x 32
    assert tb.sum() == 32 * 16 + 32 * 32 and tb[0, 0] and tb[-1, -1] and not tb[40, 10]
    dev, train = read_tbx11k(root, "dev"), read_tbx11k(root, "train")
    ids = {s.image_id for s in ds.samples}
    assert {s.image_id for s in dev.samples} | {s.image_id for s in train.samples} == ids
    assert not {s.image_id for s in dev.samples} & {s.image_id for s in train.samples}
    assert all(heldout_part(s.image_id) == "dev" for s in dev.samples)
    with pytest.raises(DataError, match="split"):
        read_tbx11k(root, "test")


def test_nih_labels_give_auroc_only(tmp_path):
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    labels = ["Effusion", "No Finding", "Effusion|Edema", "No Finding", "Edema", "No Finding"]
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "patient_id", "findings", "view", "age", "sex"])
        for i, lab in enumerate(labels):
            Image.fromarray(np.zeros((S, S), np.uint8)).save(root / "images" / f"n{i}.png")
            w.writerow([f"images/n{i}.png", i, lab, "PA", 50, "F"])
    ds = load_dataset(root)
    assert ds.format == "nih-labels" and ds.counts()["effusion"] == {"positive": 2, "negative": 4}
    truth = {f"n{i}": lab.lower() for i, lab in enumerate(labels)}

    def fn(images, prompts):  # P = 0.9 where the label names the prompt's finding
        probs = [
            [0.9 if p.split()[-1].lower() in truth[Path(str(im.source)).stem] else 0.1 for p in prompts]
            for im in images
        ]
        return [np.zeros((len(prompts), S, S), np.float32) for _ in images], np.array(probs)

    res = evaluate_localization(
        FunctionPredictor(fn, "labels"),
        ds,
        {"effusion": ["Findings suggesting effusion"]},
        n_bootstrap=20,
        figures=False,
    )
    entry = res["results"]["labels"]["findings"]["effusion"]["kinds"]["all"]
    assert entry["auroc"]["value"] == 1.0 and entry["auroc"]["n_positive"] == 2
    assert entry["iou"]["mean"] is None  # no region: no localisation
    assert [m["name"] for m in res["methods"]] == ["labels"]  # region baselines left out


# --- what the user sees: results.json, the CLI summary, LocalizationResult -----------------------------
def test_localize_reports_specificity_per_prompt(tiny_model, tiny_afloc, tmp_path, capsys):
    import json

    from afloc_engine.checkpoint import ModelInfo, save_model
    from afloc_engine.cli import main

    model_dir = save_model(tiny_model, tmp_path / "tiny", ModelInfo(name="tiny", trained=True))
    image = tmp_path / "chest.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (70, 90), dtype=np.uint8)).save(image)
    prompts = ["Findings suggesting pleural effusion", "Findings suggesting cardiomegaly", "Small nodule"]
    args = ["localize", str(image), "--model", str(model_dir), "--out", str(tmp_path / "out"), "--progress", "none"]
    assert main([*args, *(a for p in prompts for a in ("--prompt", p))]) == 0
    err = capsys.readouterr().err
    entries = json.loads(next((tmp_path / "out").glob("*/results.json")).read_text())["prompts"]
    expected = tiny_afloc.localize(str(image), prompts).specificity()
    assert [e["prompt"] for e in entries] == prompts
    for entry, spec in zip(entries, expected):
        assert entry["specificity"] == pytest.approx(spec.specificity, abs=2e-3)
        assert entry["lung_correlation"] == pytest.approx(spec.lung_correlation, abs=2e-3)
        assert bool(entry["specificity_warning"]) == bool(spec.warning)
        assert f'"{entry["prompt"]}": specificity {entry["specificity"]:.2f}' in err
        if entry["specificity_warning"]:
            assert f"    WARNING: {entry['specificity_warning']}" in err
    assert err.count(f"{image}: prompt specificity") == 1  # the input named once, not on every line
    # one prompt: nothing to compare with
    assert main([*args[:-4], "--out", str(tmp_path / "one"), "--progress", "none", "--prompt", prompts[0]]) == 0
    one = json.loads(next((tmp_path / "one").glob("*/results.json")).read_text())["prompts"][0]
    assert one["specificity"] is None and "specificity_warning" in one
    assert "specificity n/a (one prompt)" in capsys.readouterr().err


def test_large_maps_and_volumes():
    """A 2,048 x 1,024 map (over MAX_PIXELS) is strided: r agrees with all pixels; a volume gets specificity only."""
    y, x = np.mgrid[0:2048, 0:1024] / 1024.0
    a = np.sin(3 * x) + np.cos(2 * y)
    b = np.sin(3 * x + 0.5) + 0.3 * np.cos(5 * y)
    full = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert correlation_matrix(np.stack([a, b]))[0, 1] == pytest.approx(full, abs=0.01)
    volume = np.stack([np.stack([a[:64, :64]] * 4), np.stack([b[:64, :64]] * 4)])  # (P, Z, Y, X)
    out = assess(volume, ["one", "two"])
    assert out[0].specificity == pytest.approx(1 - np.corrcoef(a[:64, :64].ravel(), b[:64, :64].ravel())[0, 1])
    assert out[0].lung_correlation is None


def test_writing_results_and_showing_them_assess_each_image_once(tiny_afloc, tmp_path, monkeypatch):
    """results.json and the CLI summary show the same scores: the maps are assessed once per image (the
    copy write_results makes for the written masks used to drop the cache and assess them again)."""
    import afloc_engine.specificity as specificity
    from afloc_engine.outputs import write_results

    calls = []
    original = specificity.assess
    monkeypatch.setattr(specificity, "assess", lambda *a, **k: calls.append(1) or original(*a, **k))
    image = np.random.default_rng(0).uniform(0, 255, (40, 48)).astype(np.float32)
    result = tiny_afloc.localize(image, ["Findings suggesting edema", "Findings suggesting pneumonia"])
    write_results(result, tmp_path / "out")
    assert [s.prompt for s in result.specificity()] == result.prompts
    assert len(calls) == 1
