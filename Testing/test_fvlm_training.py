"""fVLM options in the trainer: `fvlm.false_negative: soft` targets from the reports, the anatomy loss as a hook."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from test_training_data import base_config, make_pairs

from afloc_engine.errors import ConfigError
from training.fvlm import (
    AnatomyAligner,
    AnatomyConfig,
    DiseaseAwareTargets,
    anatomy_extra_loss,
    report_findings,
    soft_targets,
)

REPORTS = [
    "Dense opacity in the right upper zone. Heart size is normal. No pleural effusion.",
    "No acute abnormality.",
    "Small left pleural effusion.",
    "Heart size is normal.",
    "Dense opacity in the left lower zone.",
    "Moderate right pleural effusion. Mild cardiomegaly.",
]


def _metrics(run):
    with (run / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_report_findings_and_disease_aware_targets():
    targets = DiseaseAwareTargets()
    findings = [report_findings(r, targets.organs, targets.keywords) for r in REPORTS]
    assert findings == [
        {"report:opacity"},  # no organ word in the sentence; "No pleural effusion" is negated
        set(),
        {"lung:effusion"},
        set(),
        {"report:opacity"},
        {"lung:effusion", "heart:cardiomegaly"},
    ]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 1, 0],
            [0, 1, 0, 1, 0, 0],  # normal reports are not negatives of each other
            [0, 0, 1, 0, 0, 1],  # the two effusions are not either
            [0, 1, 0, 1, 0, 0],
            [1, 0, 0, 0, 1, 0],
            [0, 0, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert targets.pairs(REPORTS).equal(expected)
    torch.testing.assert_close(targets(REPORTS), soft_targets(expected))
    # a context object with .texts (the trainer's BatchContext) works the same way
    torch.testing.assert_close(targets(type("Ctx", (), {"texts": REPORTS})()), soft_targets(expected))
    # masked mode: the matches themselves, for the losses to drop from the softmax
    assert DiseaseAwareTargets(mode="masked")(REPORTS).equal(expected)
    with pytest.raises(ConfigError, match="soft or masked"):
        DiseaseAwareTargets(mode="hard")
    # restricting the organs changes the qualification, not the normality
    lungs_only = DiseaseAwareTargets(organs=["lung"])
    assert report_findings(REPORTS[5], lungs_only.organs, lungs_only.keywords) == {
        "lung:effusion",
        "report:cardiomegaly",
    }


def test_fvlm_config_section(tmp_path):
    from training.config import config_from_dict

    manifest = make_pairs(tmp_path / "d", n=4)
    cfg = config_from_dict(base_config(manifest, fvlm={"false_negative": "soft", "organs": ["lung", "heart"]}))
    assert cfg.fvlm.false_negative == "soft" and cfg.fvlm.organs == ("lung", "heart")
    assert config_from_dict(base_config(manifest)).fvlm.false_negative == "none"
    assert config_from_dict(base_config(manifest, fvlm={"false_negative": "masked"})).fvlm.false_negative == "masked"
    with pytest.raises(ConfigError, match="fvlm.false_negative must be none, soft or masked"):
        config_from_dict(base_config(manifest, fvlm={"false_negative": "hard"}))
    with pytest.raises(ConfigError, match="unknown config key"):
        config_from_dict(base_config(manifest, fvlm={"false_negatives": "soft"}))


def test_trainer_builds_its_targets_from_the_config_and_reports_bad_keyword_maps(tmp_path):
    from training.config import config_from_dict
    from training.trainer import Trainer

    manifest = make_pairs(tmp_path / "d", n=4)
    cfg = config_from_dict(base_config(manifest, fvlm={"false_negative": "soft"}))
    trainer = Trainer(cfg, tmp_path / "run", progress="none")
    assert isinstance(trainer.target_fn, DiseaseAwareTargets)
    masked = config_from_dict(base_config(manifest, fvlm={"false_negative": "masked"}))
    assert Trainer(masked, tmp_path / "run", progress="none").target_fn.mode == "masked"
    with pytest.raises(ConfigError, match="use one"):
        Trainer(cfg, tmp_path / "run", progress="none", target_fn=lambda ctx: None)
    bad = tmp_path / "organs.json"
    bad.write_text(json.dumps({"lung": []}))
    cfg = config_from_dict(base_config(manifest, fvlm={"false_negative": "soft", "keywords": str(bad)}))
    with pytest.raises(ConfigError, match="fvlm: organ 'lung' needs") as err:
        Trainer(cfg, tmp_path / "run", progress="none")
    assert err.value.path == bad
    cfg = config_from_dict(base_config(manifest, fvlm={"false_negative": "soft", "organs": ["brain"]}))
    with pytest.raises(ConfigError, match="no keywords for organ"):
        Trainer(cfg, tmp_path / "run", progress="none")


def _rewrite_reports(manifest, reports):
    with manifest.open() as fh:
        rows = list(csv.DictReader(fh))
    for row, text in zip(rows, reports):
        row["text"] = text
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.slow
def test_training_with_calibrated_targets_and_the_anatomy_hook(tmp_path):
    """Two steps each: soft targets change the loss when a batch holds false negatives; the anatomy
    loss joins through extra_losses on 2D label maps."""
    from training.config import config_from_dict
    from training.trainer import Trainer

    manifest = make_pairs(tmp_path / "d", n=8)
    # four normal reports and two pairs sharing a finding, all worded differently: any 4 of them hold a
    # false-negative pair (with identical texts the soft and hard losses would coincide)
    normal = ["No acute abnormality.", "Heart size is normal.", "The lungs are clear.", "Normal chest."]
    findings = ["Small left pleural effusion.", "Moderate right pleural effusion.", "Dense opacity, left base.",
                "Patchy opacity in the right upper zone."]  # fmt: skip
    _rewrite_reports(manifest, normal + findings)
    common = dict(optim={"max_steps": 2}, augment={"image": False, "text": False})
    plain = config_from_dict(base_config(manifest, **common))
    soft = config_from_dict(base_config(manifest, fvlm={"false_negative": "soft"}, **common))
    Trainer(plain, tmp_path / "plain", progress="none").fit()
    Trainer(soft, tmp_path / "soft", progress="none").fit()
    p, s = _metrics(tmp_path / "plain"), _metrics(tmp_path / "soft")
    assert float(s[0]["loss"]) != pytest.approx(float(p[0]["loss"]), rel=1e-4)

    aligner = AnatomyAligner(AnatomyConfig(organs={"lung": 1, "heart": 2}, weight=0.5))
    size = plain.model_config().image_size

    def label_maps(out):  # a fixed 2D layout: lungs above, heart below
        maps = torch.ones(out.batch.images.shape[0], size, size, dtype=torch.long)
        maps[:, size // 2 :] = 2
        return maps

    Trainer(plain, tmp_path / "anatomy", progress="none", extra_losses=[anatomy_extra_loss(aligner, label_maps)]).fit()
    rows = _metrics(tmp_path / "anatomy")
    assert all(float(r["extra_anatomy"]) > 0 for r in rows)
    assert float(rows[0]["loss"]) == pytest.approx(float(p[0]["loss"]) + float(rows[0]["extra_anatomy"]), rel=1e-5)
