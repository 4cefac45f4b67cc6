"""Metrics of the evaluation protocol against values worked out by hand (and MONAI where it has them)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from afloc_engine import metrics as M

# 4 x 4 heatmap whose top row is the target; thresholds 0.1..0.5 cut it at 5, 4, 3, 2, 1 pixels
HEAT = np.array(
    [
        [0.55, 0.45, 0.35, 0.25],
        [0.15, 0.05, -1.0, -1.0],
        [-1.0, -1.0, -1.0, -1.0],
        [-1.0, -1.0, -1.0, -0.5],
    ],
    dtype=np.float32,
)
TARGET = np.zeros((4, 4), bool)
TARGET[0] = True


def test_iou_and_dice_per_threshold_match_hand_counts():
    iou, dice = M.iou_dice_at_thresholds(HEAT, TARGET)
    # t=0.1: 5 predicted, 4 inside -> IoU 4/5, Dice 8/9; t=0.2: 4/4; t=0.3: 3 of 4; t=0.4: 2; t=0.5: 1
    np.testing.assert_allclose(iou, [4 / 5, 1, 3 / 4, 2 / 4, 1 / 4])
    np.testing.assert_allclose(dice, [8 / 9, 1, 6 / 7, 4 / 6, 2 / 5])
    assert M.mean_iou(HEAT, TARGET) == pytest.approx((0.8 + 1 + 0.75 + 0.5 + 0.25) / 5)
    assert M.mean_dice(HEAT, TARGET) == pytest.approx((8 / 9 + 1 + 6 / 7 + 4 / 6 + 2 / 5) / 5)


def test_threshold_is_strict():
    # a pixel exactly at the threshold is not in the mask (mask = heatmap > t)
    heat = np.full((2, 2), 0.3, np.float32)
    masks = M.threshold_masks(heat, (0.2, 0.3))
    assert masks[0].all() and not masks[1].any()


def test_iou_dice_equal_monai(rng):
    from monai.metrics import compute_dice, compute_iou

    heat = rng.uniform(-1, 1, (37, 53)).astype(np.float32)
    target = rng.random((37, 53)) > 0.6
    iou, dice = M.iou_dice_at_thresholds(heat, target)
    pred = torch.from_numpy(M.threshold_masks(heat)).unsqueeze(1).float()
    gt = torch.from_numpy(target)[None, None].float().expand_as(pred)
    np.testing.assert_allclose(iou, compute_iou(pred, gt, ignore_empty=False)[:, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(dice, compute_dice(pred, gt, ignore_empty=False)[:, 0].numpy(), rtol=1e-6)


def test_empty_prediction_scores_zero_and_bad_pairs_raise():
    low = np.full((4, 4), -1.0, np.float32)
    assert M.mean_iou(low, TARGET) == 0.0 and M.mean_dice(low, TARGET) == 0.0
    with pytest.raises(ValueError, match="empty"):
        M.mean_iou(HEAT, np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="shape"):
        M.mean_iou(HEAT, np.ones((4, 5), bool))


def test_cnr_by_hand():
    heat = np.array([[1.0, 3.0], [0.0, 0.0], [0.0, 2.0]], np.float32)
    target = np.array([[True, True], [False, False], [False, False]])
    # inside mean 2 var 1; outside (0, 0, 0, 2) mean 0.5 var 0.75
    assert M.cnr(heat, target) == pytest.approx(1.5 / math.sqrt(1.75))
    assert M.cnr(np.zeros((3, 2), np.float32), target) == 0.0  # no contrast, no noise
    assert math.isnan(M.cnr(heat, np.ones((3, 2), bool)))  # no outside
    assert math.isnan(M.cnr(target.astype(np.float32), target))  # contrast over zero noise: undefined


def test_pointing_game():
    heat = np.zeros((5, 5), np.float32)
    heat[1, 1] = 1.0
    target = np.zeros((5, 5), bool)
    target[0:3, 0:3] = True
    assert M.pointing_game(heat, target) == 1.0
    assert M.pointing_game(heat, ~target) == 0.0
    # the peak is one pixel left of a region: a miss, a hit with 1 px tolerance
    region = np.zeros((5, 5), bool)
    region[1, 2:] = True
    assert M.pointing_game(heat, region) == 0.0
    assert M.pointing_game(heat, region, tolerance=1) == 1.0
    # a constant map ties everywhere: the expected hit is the region's share of the image (9 / 25)
    assert M.pointing_game(np.ones((5, 5), np.float32), target) == pytest.approx(9 / 25)


def test_localization_scores_bundle():
    s = M.localization_scores(HEAT, TARGET)
    assert s.iou == pytest.approx(0.66)
    assert len(s.iou_at) == len(s.dice_at) == 5
    assert s.pointing == 1.0  # 0.55 is in the top row
    assert s.cnr > 0


def test_auroc_by_hand_and_ties():
    # pairs (pos, neg): (0.35 vs 0.1) win, (0.35 vs 0.4) lose, (0.8 vs both) win -> 3/4
    assert M.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert M.auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == pytest.approx(0.5)
    assert M.auroc([0.2, 0.2, 0.9], [0, 1, 1]) == pytest.approx((0.5 + 1) / 2)
    assert math.isnan(M.auroc([0.1, 0.2], [1, 1]))
    with pytest.raises(ValueError):
        M.auroc([0.1, 0.2], [0, 2])


def test_vectorised_auroc_equals_monai(rng):
    scores = rng.integers(0, 5, size=(6, 30)).astype(float)  # many ties
    labels = rng.random((6, 30)) > 0.5
    batch = M.auroc_batch(scores, labels)
    for row in range(6):
        assert batch[row] == pytest.approx(M.auroc(scores[row], labels[row]))
    assert math.isnan(M.auroc_batch(np.ones((1, 3)), np.ones((1, 3), bool))[0])


def test_bootstrap_mean_ci_width_and_seed(rng):
    values = rng.normal(0.0, 1.0, 400)
    low, high = M.bootstrap_mean_ci(values, 1000, seed=0)
    assert low < values.mean() < high
    # the 95% interval of a mean of 400 unit-variance values is about 2 * 1.96 / 20 = 0.196 wide
    assert high - low == pytest.approx(0.196, rel=0.15)
    assert M.bootstrap_mean_ci(values, 200, seed=3) == M.bootstrap_mean_ci(values, 200, seed=3)
    assert M.bootstrap_mean_ci(values, 200, seed=3) != M.bootstrap_mean_ci(values, 200, seed=4)
    assert M.bootstrap_mean_ci(np.full(10, 0.25), 100) == (0.25, 0.25)
    assert all(math.isnan(v) for v in M.bootstrap_mean_ci(np.array([np.nan]), 10))


def test_cluster_bootstrap_resamples_whole_groups():
    # group a holds three 0s, group b one 1: a resample of 2 groups is aa (0), ab (1/4) or bb (1)
    values = np.array([0.0, 0.0, 0.0, 1.0])
    groups = np.array(["a", "a", "a", "b"])
    low, high = M.bootstrap_mean_ci(values, 1000, seed=0, groups=groups)
    assert (low, high) == (0.0, 1.0)
    # resampling pairs one by one instead would give many other means (e.g. 0.5)
    plain = M.bootstrap_mean_ci(values, 1000, seed=0)
    assert plain != (0.0, 1.0)


def test_bootstrap_auroc_is_stratified(rng):
    labels = np.array([1] * 18 + [0] * 2, bool)
    idx = M.bootstrap_auroc_indices(labels, 50, seed=1)
    assert idx.shape == (50, 20)
    assert (labels[idx].sum(axis=1) == 18).all()  # every resample keeps 18 positives and 2 negatives
    scores = np.where(labels, rng.uniform(0.3, 1.0, 20), rng.uniform(0.0, 0.6, 20))
    low, high = M.bootstrap_auroc_ci(scores, labels, 500, seed=0)
    assert 0.0 <= low <= M.auroc(scores, labels) <= high <= 1.0
    assert all(math.isnan(v) for v in M.bootstrap_auroc_ci(scores[:5], np.ones(5, bool)))
