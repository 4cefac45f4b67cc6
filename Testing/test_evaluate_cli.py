"""`afloc evaluate` end to end: a tiny model folder and both baselines on generated covid-cxr, NIH and RSNA
layouts; bad input reported and exit 2 when nothing is left; the real covid-cxr dev split."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from test_evaluation import RECTS, write_covid

from afloc_engine.checkpoint import ModelInfo, save_model
from afloc_engine.cli import main


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    return save_model(tiny_model, tmp_path_factory.mktemp("m") / "tiny", ModelInfo(name="tiny", trained=False))


def run(*args: str) -> int:
    return main(["evaluate", "--progress", "none", "--bootstrap", "50", *args])


def test_covid_end_to_end_with_model_and_baselines(model_dir, tmp_path, capsys):
    data = write_covid(tmp_path / "covid")
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(
        "ground_glass_opacity: [Findings suggesting ground glass opacity, Hazy bilateral opacities]\n"
        "consolidation:\n  simple: [Findings suggesting consolidation]\n  precise: [Dense left lower consolidation]\n"
    )
    out = tmp_path / "out"
    code = run("--model", str(model_dir), "--data", str(data), "--split", "dev", "--prompts", str(prompts))
    assert code == 0
    first = capsys.readouterr()
    assert "| tiny | simple |" in first.out and "UNTRAINED MODEL" in first.err
    code = run(
        *("--model", str(model_dir), "--data", str(data), "--split", "dev", "--prompts", str(prompts)),
        *("--out", str(out), "--cases", "1"),
    )
    assert code == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert [m["name"] for m in result["methods"]] == ["tiny", "constant", "prior", "lung_field"]
    assert result["dataset"]["counts"]["ground_glass_opacity"] == {
        "positive_listed": 2,
        "negative_listed": 1,
        "positive_evaluated": 2,
        "negative_evaluated": 1,
    }
    tiny = result["results"]["tiny"]["findings"]["consolidation"]
    assert set(tiny["kinds"]) == {"simple", "precise", "all"}
    for metric in ("iou", "dice", "cnr", "pointing"):
        entry = tiny["kinds"]["all"][metric]
        assert entry["ci"][0] <= entry["mean"] <= entry["ci"][1]
    assert 0.0 <= tiny["kinds"]["all"]["auroc"]["value"] <= 1.0  # one positive, two declared negatives
    assert result["skipped_counts"] == {"no masks": 1}
    md = (out / "evaluation.md").read_text()
    assert "## consolidation (1 positive images, 2 negatives)" in md and "img_d" in md
    for name in ("cases_ground_glass_opacity.png", "cases_consolidation.png"):
        with Image.open(out / name) as png:
            assert png.size[0] == 5 * 192  # image with ground truth, the model, three baselines
    # a second run replaces its own previous output
    assert run("--data", str(data), "--split", "dev", "--out", str(out), "--baselines", "prior") == 0
    assert [m["name"] for m in json.loads((out / "evaluation.json").read_text())["methods"]] == ["prior"]


def _box_images(folder, names, size=256):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for n in names:
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(folder / f"{n}.png")


def test_nih_and_rsna_box_tables_end_to_end(model_dir, tmp_path, capsys):
    _box_images(tmp_path / "images", ["00000001_000", "00000002_000", "p1", "p2", "p3"])
    nih = tmp_path / "BBox_List_2017.csv"
    nih.write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00000001_000.png,Atelectasis,100,200,400,300\n"
        "00000002_000.png,Pneumothorax,600,100,200,500\n"
    )
    out = tmp_path / "nih"
    assert run("--model", str(model_dir), "--data", str(nih), "--out", str(out), "--cases", "0") == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert result["dataset"]["format"] == "nih-bbox" and result["findings"] == ["atelectasis", "pneumothorax"]
    assert result["results"]["tiny"]["findings"]["atelectasis"]["kinds"]["all"]["auroc"] is None  # no negatives
    rsna_dir = tmp_path / "rsna"
    rsna_dir.mkdir()
    (rsna_dir / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\np1,100,100,300,500,1\np2,,,,,0\np3,,,,,0\n"
    )
    out = tmp_path / "rsna_out"
    code = run(
        *("--model", str(model_dir), "--data", str(rsna_dir), "--images", str(tmp_path / "images")),
        *("--format", "rsna", "--out", str(out), "--cases", "0", "--split", "dev"),
    )
    assert code == 0
    result = json.loads((out / "evaluation.json").read_text())
    auroc = result["results"]["tiny"]["findings"]["pneumonia"]["kinds"]["all"]["auroc"]
    assert (auroc["n_positive"], auroc["n_negative"]) == (1, 2)
    assert any("--split dev ignored" in n for n in result["notes"])
    capsys.readouterr()


def test_bad_input_is_reported_and_evaluation_goes_on(tmp_path, capsys):
    data = write_covid(tmp_path / "d", mask_shape={("img_b", "ground_glass_opacity"): (32, 32)})
    (data / "images" / "img_c.png").unlink()
    out = tmp_path / "out"
    code = run(
        "--data",
        str(data),
        "--split",
        "dev",
        "--out",
        str(out),
        "--finding",
        "GGO",
        "--finding",
        "ground glass opacity",
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "mask of the wrong size: 1" in err and "img_c: image file not found" in err and "GGO" in err
    result = json.loads((out / "evaluation.json").read_text())
    assert result["dataset"]["counts"]["ground_glass_opacity"]["positive_evaluated"] == 1
    assert {s["category"] for s in result["skipped"]} == {
        "image file not found",
        "no masks",
        "mask of the wrong size",
        "unknown finding",
    }
    assert "| mask of the wrong size | 1 |" in (out / "evaluation.md").read_text()


def test_nothing_evaluable_exits_2_and_writes_nothing(tmp_path, capsys):
    wrong = {key: (16, 16) for key in RECTS}
    data = write_covid(tmp_path / "d", mask_shape=wrong)
    out = tmp_path / "out"
    assert run("--data", str(data), "--split", "dev", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "nothing could be evaluated" in err and "img_a [ground_glass_opacity]: mask is 16x16 px" in err
    assert not out.exists() and not list(tmp_path.glob(".out.*.tmp"))  # no temporary copy (the lock file stays)
    assert run("--data", str(data), "--finding", "pneumothorax", "--out", str(out)) == 2
    assert "unknown finding" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_pairs", "pairs.csv: file not found"),
        ("bad_prompts", "expected a list of prompt strings"),
        ("foreign_out", "refusing to replace it"),
        ("bad_baseline", "unknown baseline"),
        ("no_format", "cannot tell the dataset format"),
    ],
)
def test_unusable_input_exits_2_naming_the_problem(case, message, tmp_path, capsys):
    data = write_covid(tmp_path / "d")
    args = ["--data", str(data), "--split", "dev", "--out", str(tmp_path / "out")]
    if case == "no_pairs":
        (data / "pairs.csv").unlink()
    elif case == "bad_prompts":
        (tmp_path / "p.json").write_text('{"consolidation": 3}')
        args += ["--prompts", str(tmp_path / "p.json")]
    elif case == "foreign_out":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
    elif case == "bad_baseline":
        args += ["--baselines", "prior,oracle"]
    elif case == "no_format":
        args[1] = str(tmp_path)
    assert run(*args) == 2
    assert message in capsys.readouterr().err
    if case == "foreign_out":
        assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_progress_json_lines(tmp_path, capsys):
    data = write_covid(tmp_path / "d")
    assert main(["evaluate", "--data", str(data), "--progress", "json", "--bootstrap", "20", "--split", "dev"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines[-1]["event"] == "done" and lines[-1]["methods"] == ["constant", "prior", "lung_field"]
    assert any(line["event"] == "progress" for line in lines)


@pytest.mark.shared_data
def test_real_covid_dev_split_baselines(shared_data, tmp_path, capsys):
    root = shared_data / "covid-cxr"
    out = tmp_path / "out"
    assert main(["evaluate", "--data", str(root), "--split", "dev", "--out", str(out), "--progress", "none"]) == 0
    capsys.readouterr()
    result = json.loads((out / "evaluation.json").read_text())
    with (root / "pairs.csv").open(newline="") as fh:
        dev = {r["image_id"]: r for r in csv.DictReader(fh) if r["split"] == "dev"}
    with (root / "masks.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["image_id"] in dev]
    assert result["findings"] == ["ground_glass_opacity", "consolidation"]
    for finding in result["findings"]:
        mine = [r for r in rows if r["class"] == finding]
        counts = result["dataset"]["counts"][finding]
        assert counts["positive_listed"] == counts["positive_evaluated"] == len(mine)
        # the constant baseline's IoU is each mask's share of its image
        shares = []
        for r in mine:
            with Image.open(root / dev[r["image_id"]]["image"]) as im:
                shares.append(int(r["pixels"]) / (im.size[0] * im.size[1]))
        const = result["results"]["constant"]["findings"][finding]["kinds"]["all"]
        assert const["n"] == len(mine)
        assert const["iou"]["mean"] == pytest.approx(np.mean(shares), rel=1e-6)
        prior = result["results"]["prior"]["findings"][finding]["kinds"]["all"]
        assert prior["cnr"]["mean"] > 0 and prior["iou"]["ci"][0] <= prior["iou"]["mean"] <= prior["iou"]["ci"][1]
    assert result["dataset"]["counts"]["consolidation"]["negative_listed"] == len(
        {r["image_id"] for r in rows} - {r["image_id"] for r in rows if r["class"] == "consolidation"}
    )
    assert (out / "cases_ground_glass_opacity.png").is_file()


@pytest.mark.shared_data
def test_real_chestx_det_specificity_prompt_blind_baselines_score_chance(shared_data, tmp_path, capsys):
    """ChestX-Det outlines: the 13 candidate prompts, 11 findings with >= 3 outlines, and a baseline that
    ignores the prompt ranks its own finding exactly at chance (1/13, rank 7); effusion localised beside it."""
    out = tmp_path / "cx"
    code = run(
        *("--data", str(shared_data / "chestx-det-nih"), "--baselines", "prior", "--finding", "effusion"),
        *("--specificity", "--shuffles", "20", "--out", str(out), "--cases", "0"),
    )
    assert code == 0
    capsys.readouterr()
    result = json.loads((out / "evaluation.json").read_text())
    spec = result["specificity"]
    assert len(spec["candidates"]) == 13 and spec["n_images"] == 100
    assert spec["outlines"]["consolidation"] == 54 and spec["outlines"]["effusion"] == 40
    assert len(spec["counted"]) == 11  # mass has no outline, diffuse nodule 2
    prior = spec["results"]["prior"]
    assert prior["model"]["top1"]["mean"] == pytest.approx(1 / 13)
    assert prior["model"]["mean_rank"]["mean"] == pytest.approx(7.0)
    assert result["results"]["prior"]["findings"]["effusion"]["n_images"] == 40
    assert (
        "## Prompt specificity (chestx-det-nih: 100 images, 13 candidate prompts)"
        in (out / "evaluation.md").read_text()
    )


@pytest.mark.shared_data
def test_real_tbx11k_heldout_part_is_fixed(shared_data, tmp_path, capsys):
    """The held-out TBX11K part is the same 189 images in every run (training leaves exactly these out)."""
    out = tmp_path / "tb"
    code = run(
        *("--data", str(shared_data / "tbx11k-tb"), "--split", "dev", "--baselines", "constant,prior"),
        *("--out", str(out), "--cases", "0"),
    )
    assert code == 0
    capsys.readouterr()
    result = json.loads((out / "evaluation.json").read_text())
    counts = result["dataset"]["counts"]["tuberculosis"]
    assert counts["positive_listed"] == counts["positive_evaluated"] == 189
    assert result["findings"] == ["tuberculosis"]
    ids = sorted({r["image_id"] for r in result["per_image"]["prior"]["localization"]})
    assert ids[:3] == ["tb0027", "tb0028", "tb0050"]
