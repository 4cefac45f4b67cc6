"""The trainer's loss: its per-rank (sharded) form sums to the engine's afloc_loss; recall@k."""

from __future__ import annotations

import pytest
import torch

from afloc_engine.config import AFLocConfig
from afloc_engine.losses import AFLocLoss
from afloc_engine.models import ImageFeatures, TextFeatures
from afloc_engine.models.afloc import features_loss


def _features(b=5, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True)

    image = ImageFeatures(leaf(b, d, 4, 4), leaf(b, d, 2, 2), leaf(b, d))
    lengths_w = torch.randint(1, 7, (b,), generator=g)
    lengths_s = torch.randint(1, 4, (b,), generator=g)
    text = TextFeatures(
        leaf(b, 6, d),
        torch.arange(6)[None] < lengths_w[:, None],
        leaf(b, 3, d),
        torch.arange(3)[None] < lengths_s[:, None],
        leaf(b, d),
    )
    return image, text


def _engine(image, text, c, targets=None):
    """The engine's loss of the whole batch in one process (what the trainer's shares must sum to)."""
    return features_loss(image, text, c, targets)


@pytest.mark.parametrize("soft", [False, True, "masked"])
def test_row_column_shares_equal_afloc_loss_and_its_gradients(soft):
    """The DDP form (rows of own images, columns of own reports) at world 1 equals afloc_loss exactly."""
    from training.distributed import DistInfo
    from training.loss import _sharded_loss

    c = AFLocConfig(embed_dim=8, weight_word=0.5, z_aggregation="mean")
    image, text = _features()
    targets = None
    if soft == "masked":  # not-a-negative pairs: 0~3 and 1~4 (symmetric, diagonal set)
        targets = torch.eye(5, dtype=torch.bool)
        targets[0, 3] = targets[3, 0] = targets[1, 4] = targets[4, 1] = True
    elif soft:
        targets = torch.eye(5, dtype=torch.float64) + 0.5 * (torch.rand(5, 5, dtype=torch.float64) > 0.6)
        targets = targets / targets.sum(1, keepdim=True)
    want = _engine(image, text, c, targets)
    got = _sharded_loss(image, text, AFLocLoss.from_config(c), DistInfo(), targets, None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-9, atol=1e-9)
    inputs = [*image, text.words, text.sentences, text.report]
    g_want = torch.autograd.grad(want.total, inputs)
    g_got = torch.autograd.grad(got.total, inputs)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_text_only_negatives_join_only_the_image_to_report_side():
    """With E extra reports, image -> report is a (B + E)-way choice; report -> image is unchanged."""
    import torch.nn.functional as F

    from afloc_engine.losses import global_similarity
    from training.distributed import DistInfo
    from training.loss import training_loss

    c = AFLocConfig(embed_dim=8)
    image, text = _features()
    _, extra = _features(b=3, seed=9)
    base = training_loss(image, text, AFLocLoss.from_config(c))
    with_neg = training_loss(image, text, AFLocLoss.from_config(c), DistInfo(), extra_text=extra)
    labels = torch.arange(5)
    sim = global_similarity(image.global_, text.report) * c.tau3
    rows = torch.cat([sim, global_similarity(image.global_, extra.report) * c.tau3], dim=1)
    want = 0.5 * (F.cross_entropy(rows, labels) + F.cross_entropy(sim.t(), labels))
    torch.testing.assert_close(with_neg.global_, want)
    assert with_neg.word > base.word and with_neg.sentence > base.sentence and with_neg.global_ > base.global_
    with_neg.total.backward()
    assert extra.report.grad is not None and extra.words.grad.abs().sum() > 0  # negatives are trained too


def test_recall_at_k_counts_identical_reports_as_correct():
    from training.validation import recall_at_k

    sim = torch.tensor([[0.9, 0.1, 0.2], [0.8, 0.7, 0.1], [0.1, 0.2, 0.3]])
    ids = torch.tensor([0, 1, 2])
    r = recall_at_k(sim, ids, (1, 2))
    assert r["i2t_r@1"] == pytest.approx(2 / 3)  # image 1 ranks report 0 first
    assert r["t2i_r@1"] == 1.0  # every report ranks its own image first
    assert r["i2t_r@2"] == 1.0
    same = recall_at_k(sim, torch.tensor([0, 0, 2]), (1,))  # reports 0 and 1 are the same text
    assert same["i2t_r@1"] == 1.0


def test_fallback_localisation_metrics():
    import numpy as np

    from training.validation import cnr, iou_dice

    mask = np.zeros((10, 10), bool)
    mask[2:6, 2:6] = True
    perfect = np.where(mask, 1.0, -1.0)
    assert iou_dice(perfect, mask) == (1.0, 1.0)
    assert iou_dice(-perfect, mask) == (0.0, 0.0)
    assert cnr(perfect + np.random.default_rng(0).normal(0, 0.1, mask.shape), mask) > 5


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_memory_lean_recompute_path_equals_plain_autograd(aggregation):
    """local_similarity's chunked recompute-in-backward path: same Z and gradients as keeping everything."""
    from afloc_engine import losses

    image, text = _features(b=6, seed=4)
    regions = losses.as_regions(image.shallow)
    mask = text.word_mask.clone()
    mask[2] = False  # a report with no unit
    weights = torch.randn(6, 6, dtype=torch.float64)
    whole = losses.local_similarity(regions, text.words, mask, aggregation=aggregation)
    g_whole = torch.autograd.grad((whole * weights).sum(), (regions, text.words))
    lean = losses.local_similarity(regions, text.words, mask, aggregation=aggregation, chunk_size=4)
    assert lean.grad_fn is not None and "LocalSimilarity" in type(lean.grad_fn).__name__
    g_lean = torch.autograd.grad((lean * weights).sum(), (regions, text.words))
    torch.testing.assert_close(lean, whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_lean, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert g_lean[1][2].abs().sum() == 0  # the empty report gets no gradient
    assert torch.autograd.gradcheck(
        lambda r, t: losses.local_similarity(r, t, mask[:3], aggregation=aggregation, chunk_size=2),
        (regions.detach()[:2, :5].requires_grad_(), text.words.detach()[:3].requires_grad_()),
    )
