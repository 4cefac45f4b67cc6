"""fVLM pieces on small hand-made batches: report splitting, false-negative targets, calibrated loss, pooling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from afloc_engine.errors import ConfigError
from afloc_engine.losses import symmetric_infonce
from training.fvlm import (
    DEFAULT_ANATOMY_KEYWORDS,
    AnatomyAligner,
    AnatomyConfig,
    anatomy_alignment_loss,
    anatomy_captions,
    build_anatomy_texts,
    calibrated_infonce,
    caption_is_normal,
    disease_labels,
    false_negative_pairs,
    grounding_loss,
    load_keyword_map,
    normal_caption,
    organ_masks,
    patient_pairs,
    pool_anatomy_features,
    soft_targets,
    split_report_by_anatomy,
)

KEYWORDS = {"lung": ("lung", "lungs", "pleural"), "liver": ("liver", "hepatic"), "aorta": ("aortic arch", "aorta")}


# --- text -------------------------------------------------------------------------------------------
def test_sentences_go_to_the_organs_they_mention():
    report = "There is a large mass in the liver.\nThe lungs are clear. Calcified aortic arch; no pleural effusion."
    parts = split_report_by_anatomy(report, KEYWORDS)
    assert parts == {
        "lung": ["the lungs are clear.", "no pleural effusion."],
        "liver": ["there is a large mass in the liver."],
        "aorta": ["calcified aortic arch."],  # a two-word keyword
    }
    # "aortic" alone is not the phrase "aortic arch"; the organ is then unmentioned and gets the template
    caps = anatomy_captions("Aortic valve calcification.", KEYWORDS, organs=["aorta", "liver"])
    assert caps == {"aorta": "Aorta shows no significant abnormalities.", "liver": normal_caption("liver")}
    assert caption_is_normal("aorta shows NO significant abnormalities", "aorta")
    assert not caption_is_normal("the lungs are clear.", "lung")
    # a sentence about two organs goes to both
    both = split_report_by_anatomy("Hepatic and pleural metastases.", KEYWORDS)
    assert both["lung"] == both["liver"] == ["hepatic and pleural metastases."]


def test_disease_labels_skip_negated_findings():
    assert disease_labels("Small mass in the liver. No pleural effusion. Without nodule.") == {"mass"}
    assert disease_labels("Liver shows no significant abnormalities.") == frozenset()
    assert disease_labels("Pleural effusion and a nodule.", ("effusion", "nodule", "pleural effusion")) == {
        "effusion",
        "nodule",
        "pleural effusion",
    }


def test_keyword_map_from_files_and_errors(tmp_path):
    path = tmp_path / "organs.json"
    path.write_text(json.dumps({"Liver": ["Liver", "hepatic"]}))
    assert load_keyword_map(path) == {"Liver": ("liver", "hepatic")}
    yml = tmp_path / "organs.yaml"
    yml.write_text("kidney:\n  - kidney\n  - renal\n")
    assert load_keyword_map(yml) == {"kidney": ("kidney", "renal")}
    assert load_keyword_map(None) == DEFAULT_ANATOMY_KEYWORDS
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"liver": []}))
    with pytest.raises(ConfigError, match="liver") as err:
        load_keyword_map(bad)
    assert err.value.path == bad
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read") as err:
        load_keyword_map(broken)
    assert err.value.path == broken
    with pytest.raises(ConfigError, match="no entry"):
        split_report_by_anatomy("text", KEYWORDS, organs=["spleen"])


# --- false-negative targets on a hand-made batch ------------------------------------------------------
# 4 patients x 2 organs (liver, lung):
#   0: liver mass            | lung unmentioned (normal)
#   1: liver unmentioned     | lung nodule
#   2: the same liver mass   | lung clear (normal, other wording)
#   3: liver normal sentence | lung: another nodule sentence (shares the label "nodule" with patient 1)
REPORTS = [
    "There is a mass in the liver.",
    "Small nodule in the right lung.",
    "There is a mass in the liver. The lungs are clear.",
    "The liver is unremarkable. A nodule in the left lung.",
]


@pytest.fixture()
def texts():
    return build_anatomy_texts(REPORTS, ["liver", "lung"], KEYWORDS)


def test_captions_normal_flags_and_labels(texts):
    assert texts.captions[1] == ["Liver shows no significant abnormalities.", "small nodule in the right lung."]
    assert texts.normal.tolist() == [[False, True], [True, False], [False, True], [True, False]]
    assert texts.labels[3] == [frozenset(), frozenset({"nodule"})]
    assert texts.patient_labels()[0] == {"liver:mass"}


def test_false_negative_pairs_match_the_hand_made_matrix(texts):
    pairs = false_negative_pairs(texts.captions, texts.normal, texts.labels)
    liver = [  # 0 and 2: identical mass sentence; 1 and 3: both normal
        [1, 0, 1, 0],
        [0, 1, 0, 1],
        [1, 0, 1, 0],
        [0, 1, 0, 1],
    ]
    lung = [  # 0 and 2: both normal; 1 and 3: share the disease label "nodule"
        [1, 0, 1, 0],
        [0, 1, 0, 1],
        [1, 0, 1, 0],
        [0, 1, 0, 1],
    ]
    assert pairs.int().tolist() == [liver, lung]
    # without labels, the two different nodule sentences are negatives again
    no_labels = false_negative_pairs(texts.captions, texts.normal)
    assert no_labels[1].int().tolist() == [[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]]
    targets = soft_targets(pairs)
    assert targets[0].tolist() == [[0.5, 0, 0.5, 0], [0, 0.5, 0, 0.5], [0.5, 0, 0.5, 0], [0, 0.5, 0, 0.5]]
    np.testing.assert_allclose(targets.sum(-1).numpy(), 1.0)


def test_patient_pairs():
    normal = torch.tensor([True, False, True, False, False])
    mass, nodule, none = frozenset({"liver:mass"}), frozenset({"lung:nodule"}), frozenset()
    labels = [none, mass, none, nodule, mass]
    expected = [
        [1, 0, 1, 0, 0],
        [0, 1, 0, 0, 1],
        [1, 0, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 1, 0, 0, 1],
    ]
    assert patient_pairs(normal, labels).int().tolist() == expected
    t = soft_targets(patient_pairs(normal, labels), valid=torch.tensor([True, True, False, True, True]))
    assert t[0].tolist() == [1, 0, 0, 0, 0] and t[2].sum() == 0  # invalid column gets no mass, invalid row none


# --- the calibrated loss ----------------------------------------------------------------------------------
def _reference_loss(logits: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor) -> float:
    """Row-by-row cross-entropy in plain Python (both directions), only over allowed columns."""
    total, rows = 0.0, 0
    for lg, tg, al in ((logits, targets, allowed), (logits.t(), targets.t(), allowed.t())):
        for i in range(lg.shape[0]):
            cols = [j for j in range(lg.shape[1]) if al[i, j]]
            logz = np.log(sum(np.exp(float(lg[i, j])) for j in cols))
            t = tg[i] / tg[i].sum()
            total += -sum(float(t[j]) * (float(lg[i, j]) - logz) for j in cols)
            rows += 1
    return total / rows


def test_none_mode_is_the_plain_symmetric_infonce():
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(0)) * 3
    pairs = torch.ones(5, 5, dtype=torch.bool)
    expected = symmetric_infonce(logits)
    assert calibrated_infonce(logits, None, "none") == pytest.approx(float(expected), rel=1e-6)
    assert calibrated_infonce(logits, pairs, "none") == pytest.approx(float(expected), rel=1e-6)
    assert calibrated_infonce(logits, torch.eye(5, dtype=torch.bool), "soft") == pytest.approx(float(expected))


def test_soft_and_masked_modes_match_a_row_by_row_computation(texts):
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) * 4
    pairs = false_negative_pairs(texts.captions, texts.normal, texts.labels)[0]
    soft = calibrated_infonce(logits, pairs, "soft")
    assert float(soft) == pytest.approx(_reference_loss(logits, pairs.float(), torch.ones(4, 4, dtype=torch.bool)))
    # the engine's soft-target InfoNCE agrees
    assert float(soft) == pytest.approx(float(symmetric_infonce(logits, soft_targets(pairs))), rel=1e-5)
    masked = calibrated_infonce(logits, pairs, "masked")
    allowed = ~pairs | torch.eye(4, dtype=torch.bool)
    assert float(masked) == pytest.approx(_reference_loss(logits, torch.eye(4), allowed))


def test_false_negatives_are_not_pushed_apart():
    """Gradient on the logit of a normal-normal pair: pushed down without calibration, not with it."""
    pairs = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    grads = {}
    for mode in ("none", "soft", "masked"):
        logits = torch.zeros(3, 3, requires_grad=True)
        calibrated_infonce(logits, pairs, mode).backward()
        grads[mode] = logits.grad
    assert grads["none"][0, 1] > 0  # gradient descent lowers the logit: pushed apart
    assert grads["soft"][0, 1] < 0  # raised: treated as a match
    assert grads["masked"][0, 1] == 0  # ignored
    for mode in grads:  # the true negatives are pushed apart in every mode
        assert grads[mode][0, 2] > 0


def test_invalid_samples_and_lonely_groups_do_not_count():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 4, generator=g, requires_grad=True)
    valid = torch.tensor([[True, True, False, True], [True, False, False, False]])  # organ 2 in one sample only
    loss = calibrated_infonce(logits, None, "soft", valid)
    keep = [0, 1, 3]
    sub = logits[0][keep][:, keep]
    assert loss.item() == pytest.approx(symmetric_infonce(sub).item(), rel=1e-5)
    loss.backward()
    assert float(logits.grad[0, 2].abs().sum() + logits.grad[0, :, 2].abs().sum()) == 0.0
    assert float(logits.grad[1].abs().sum()) == 0.0
    nothing = calibrated_infonce(logits, None, "soft", torch.tensor([[True, False, False, False]] * 2))
    assert nothing.item() == 0.0
    with pytest.raises(ConfigError, match="false_negative"):
        calibrated_infonce(logits, None, "drop")


# --- image side -------------------------------------------------------------------------------------------
def test_pooling_weights_cells_by_organ_coverage_2d():
    # a 2 x 2 feature grid (D = 1: the cell's value) and a 4 x 4 mask at twice the resolution
    features = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    mask = torch.zeros(1, 2, 4, 4)
    mask[0, 0, :2, :2] = 1  # organ 0 fills cell (0, 0)
    mask[0, 0, 2, 2] = 1  # and a quarter of cell (1, 1)
    pooled, present = pool_anatomy_features(features, mask)
    assert float(pooled[0, 0, 0]) == pytest.approx((1.0 * 1 + 4.0 * 0.25) / 1.25)
    assert present.tolist() == [[True, False]]  # organ 1 is absent
    pooled, _ = pool_anatomy_features(features, mask, min_fraction=0.5)
    assert float(pooled[0, 0, 0]) == pytest.approx(1.0)


def test_pooling_3d_and_label_maps():
    features = torch.arange(8.0).reshape(1, 1, 2, 2, 2).repeat(1, 3, 1, 1, 1)  # (1, 3, 2, 2, 2)
    labels = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    labels[0, 2:, :2, 2:] = 5  # the octant (1, 0, 1) = cell index 5
    labels[0, :2, :2, :2] = 7  # the octant (0, 0, 0) = cell 0
    masks = organ_masks(labels, [5, (5, 7), 9])
    assert masks.shape == (1, 3, 4, 4, 4)
    pooled, present = pool_anatomy_features(features, masks)
    assert pooled[0, 0].tolist() == [5.0, 5.0, 5.0]
    assert pooled[0, 1].tolist() == [2.5, 2.5, 2.5]  # two labels merged into one organ
    assert present.tolist() == [[True, True, False]]


def test_anatomy_loss_on_3d_grids_trains_the_regions():
    """Gradients reach 3D region features; optimising them reaches the soft-target floor (entropy of the targets)."""
    g = torch.Generator().manual_seed(3)
    regions = torch.randn(4, 8, 2, 2, 2, generator=g, requires_grad=True)
    labels = torch.zeros(4, 4, 4, 4, dtype=torch.long)
    labels[:, :2] = 1
    labels[:, 2:, 2:] = 2
    text = torch.randn(4, 2, 8, generator=g)
    pairs = torch.eye(4, dtype=torch.bool).repeat(2, 1, 1)
    pairs[1, 0, 1] = pairs[1, 1, 0] = True  # organ 2: patients 0 and 1 read alike
    opt = torch.optim.Adam([regions], lr=0.1)
    masks = organ_masks(labels, [1, 2])
    first = None
    for _ in range(150):
        pooled, present = pool_anatomy_features(regions, masks)
        loss = anatomy_alignment_loss(pooled, text, present, pairs, "soft", scale=10.0)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    t = soft_targets(pairs)
    floor = float(-(t * t.clamp(min=1e-12).log()).sum(-1).mean())
    assert loss.item() < first and loss.item() == pytest.approx(floor, abs=0.02)


def test_similarity_pooling_gives_the_mean_cell_cosine():
    """pooling='similarity': the logit is scale x the organ's mean cell-caption cosine, the value a heatmap shows."""
    g = torch.Generator().manual_seed(4)
    regions = torch.randn(2, 6, 2, 2, 2, generator=g)
    text = torch.randn(2, 1, 6, generator=g)
    mask = torch.zeros(2, 1, 2, 2, 2)
    mask[:, :, 0] = 1  # the first z-plane of cells
    pooled, present = pool_anatomy_features(F.normalize(regions, dim=1), mask)
    cos = torch.einsum("bdzyx,jd->bjzyx", F.normalize(regions, dim=1), F.normalize(text[:, 0], dim=-1))
    expected = cos[:, :, 0].flatten(2).mean(-1)  # (B_img, B_txt)
    logits = torch.einsum("ikd,jkd->ij", pooled, F.normalize(text, dim=-1))
    torch.testing.assert_close(logits, expected)
    loss = anatomy_alignment_loss(pooled, text, present, None, "none", 7.0, normalize_features=False)
    assert float(loss) == pytest.approx(float(symmetric_infonce(expected * 7.0)), rel=1e-5)


def test_config_errors():
    with pytest.raises(ConfigError, match="false_negative"):
        AnatomyConfig(organs={"liver": 3}, false_negative="hard")
    with pytest.raises(ConfigError, match="label value"):
        AnatomyConfig(organs={"liver": "three"})
    with pytest.raises(ConfigError, match="unknown anatomy config key"):
        AnatomyConfig.from_dict({"organs": {"liver": 3}, "wieght": 2})
    with pytest.raises(ConfigError, match="no keywords for organ"):
        AnatomyAligner(AnatomyConfig(organs={"brain": 1}))
    with pytest.raises(ConfigError, match="needs organs"):
        AnatomyAligner(AnatomyConfig())
    aligner = AnatomyAligner(AnatomyConfig(organs={"brain": 1}, keywords={"brain": ["brain", "cerebral"]}))
    assert aligner.texts(["Cerebral infarct."]).captions == [["cerebral infarct."]]


def test_grounding_matches_each_caption_to_its_own_organ():
    """Within one volume, a caption's target is its organ: the loss is the cross-entropy over the regions present."""
    text = torch.eye(3)[None, :2]  # captions of organs 0 and 1 point along axes 0 and 1
    regions = torch.tensor([[[1.0, 0.1, 0.0], [0.0, 1.0, 0.2]]])  # organ regions roughly along their captions
    background = torch.tensor([[0.3, 0.3, 1.0]])
    present = torch.tensor([[True, True]])
    loss = grounding_loss(regions, text, present, background, scale=5.0)
    logits = torch.einsum("rd,kd->kr", F.normalize(torch.cat([regions[0], background]), dim=-1), text[0]) * 5.0
    expected = F.cross_entropy(logits, torch.tensor([0, 1]))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    # an absent organ neither asks for its caption nor competes as a region
    absent = grounding_loss(regions, text, torch.tensor([[True, False]]), background, scale=5.0)
    expected = F.cross_entropy(logits[:1, [0, 2]], torch.tensor([0]))
    assert float(absent) == pytest.approx(float(expected), rel=1e-5)
    # the gradient pushes the background away from the caption it is not
    bg = background.clone().requires_grad_(True)
    grounding_loss(regions, text, present, bg, scale=5.0).backward()
    assert float(bg.grad[0, 0]) > 0 and float(bg.grad[0, 1]) > 0


def test_aligner_loss_on_a_phantom_batch_with_a_3d_model():
    from conftest import tiny_config
    from phantoms import ORGANS, make_dataset

    from afloc_engine.models import AFLocModel
    from afloc_engine.volume import CT_WINDOW, prepare_label_map, prepare_volume

    torch.manual_seed(0)
    model = AFLocModel(tiny_config(spatial_dims=3, image_size=32))
    data = make_dataset(3, 32, seed=1, organs=("liver", "lung", None))
    prepared = [prepare_volume(p.volume, 32, CT_WINDOW) for p in data]
    images = torch.stack([c for c, _ in prepared])
    labels = torch.stack([prepare_label_map(p.labels, box) for p, (_, box) in zip(data, prepared)])
    aligner = AnatomyAligner(AnatomyConfig(organs={o: v for v, o in ORGANS.items()}, false_negative="masked"))
    texts = aligner.texts([p.report for p in data], [p.findings for p in data])
    assert texts.normal[:, aligner.organs.index("liver")].tolist() == [False, True, True]
    losses = aligner.loss(model, model.encode_images(images), labels, texts)
    assert torch.isfinite(losses.total) and losses.alignment.item() > 0 and losses.grounding.item() > 0
    assert losses.total.item() == pytest.approx(losses.alignment.item() + losses.grounding.item(), rel=1e-5)
    losses.total.backward()
    assert float(model.image_encoder.deep_proj.weight.grad.abs().sum()) > 0
    assert float(model.text_encoder.projection.weight.grad.abs().sum()) > 0
    targets = aligner.patient_targets(texts)
    assert targets.shape == (3, 3) and torch.allclose(targets.sum(1), torch.ones(3))
    off = AnatomyAligner(AnatomyConfig(organs={"liver": 3}, false_negative="none"))
    assert off.patient_targets(off.texts(["Normal."])) is None
