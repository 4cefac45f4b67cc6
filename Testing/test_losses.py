"""The batched AFLoc losses equal the reference's per-pair loop, and gradients reach every level."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from afloc_engine.losses import afloc_loss, local_similarity, symmetric_infonce


def reference_local_similarity(regions, text, text_mask, tau1, tau2, aggregation="sum"):
    """GLoRIA/AFLoc reference: a Python loop over reports and images, one pair at a time."""
    b_img, b_txt = regions.shape[0], text.shape[0]
    out = torch.zeros(b_img, b_txt, dtype=torch.float64)
    for t in range(b_txt):
        units = text[t][text_mask[t]].double()  # (n, D): only the report's real units
        n = units.shape[0]
        for b in range(b_img):
            v = regions[b].double()  # (M, D)
            s = units @ v.t()  # (n, M)
            attn = torch.softmax(s, dim=0)  # normalised over the text units first
            attn = torch.softmax(attn * tau1, dim=1)  # then sharpened over regions
            context = attn @ v  # (n, D)
            cos = F.cosine_similarity(context, units, dim=1)
            total = torch.exp(cos * tau2).sum()
            if aggregation == "mean":
                total = total / n
            out[b, t] = torch.log(total) if n else 0.0
    return out


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_local_similarity_equals_per_pair_loop(aggregation):
    torch.manual_seed(0)
    b_img, b_txt, m, n, d = 5, 4, 23, 9, 16
    regions = torch.randn(b_img, m, d)
    text = torch.randn(b_txt, n, d)
    lengths = [9, 3, 1, 6]  # reports of different lengths, padding after
    mask = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    text = text.masked_fill(~mask[..., None], 7.0)  # padding holds junk that must not leak in
    got = local_similarity(regions, text, mask, tau1=4.0, tau2=5.0, aggregation=aggregation)
    want = reference_local_similarity(regions, text, mask, 4.0, 5.0, aggregation)
    assert got.shape == (b_img, b_txt)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_local_similarity_chunks_match_whole_batch():
    torch.manual_seed(1)
    regions, text = torch.randn(6, 10, 8), torch.randn(7, 5, 8)
    mask = torch.rand(7, 5) > 0.3
    mask[:, 0] = True
    whole = local_similarity(regions, text, mask)
    chunked = local_similarity(regions, text, mask, chunk_size=3)
    torch.testing.assert_close(whole, chunked)


def test_report_without_units_scores_zero_not_nan():
    regions, text = torch.randn(2, 4, 8), torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    z = local_similarity(regions, text, mask)
    assert torch.isfinite(z).all()
    assert (z[:, 1] == 0).all()


def test_symmetric_infonce_prefers_matched_pairs_and_soft_identity_equals_hard():
    logits = torch.randn(6, 6)
    matched = logits + 20 * torch.eye(6)
    assert symmetric_infonce(matched) < symmetric_infonce(logits)
    torch.testing.assert_close(symmetric_infonce(logits), symmetric_infonce(logits, torch.eye(6)))


def test_masked_negatives_leave_the_softmax_and_keep_the_diagonal_target():
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.3, 1.5, -1.0], [0.0, 2.5, 1.0]])
    pairs = torch.eye(3, dtype=torch.bool)
    pairs[0, 1] = pairs[1, 0] = True  # reports 0 and 1 say the same: not negatives of each other

    def ce(values, target):  # -log softmax(values)[target], by hand
        return -(values[target] - torch.logsumexp(values, 0))

    i2t = ce(logits[0, [0, 2]], 0) + ce(logits[1, [1, 2]], 0) + ce(logits[2], 2)
    t2i = ce(logits[[0, 2], 0], 0) + ce(logits[[1, 2], 1], 0) + ce(logits[:, 2], 2)
    expected = (i2t + t2i) / 6
    torch.testing.assert_close(symmetric_infonce(logits, pairs), expected)
    # no matches besides the diagonal: the plain loss
    torch.testing.assert_close(symmetric_infonce(logits, torch.eye(3, dtype=torch.bool)), symmetric_infonce(logits))


def _features(b=4, d=12, requires_grad=True):
    g = torch.Generator().manual_seed(2)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(requires_grad)

    feats = {
        "shallow": leaf(b, d, 6, 6),
        "deep": leaf(b, d, 3, 3),
        "image_global": leaf(b, d),
        "words": leaf(b, 7, d),
        "sentences": leaf(b, 3, d),
        "report": leaf(b, d),
    }
    feats["word_mask"] = torch.arange(7)[None] < torch.tensor([7, 4, 2, 5])[:, None]
    feats["sentence_mask"] = torch.arange(3)[None] < torch.tensor([3, 1, 2, 2])[:, None]
    return feats


def test_gradients_flow_through_all_three_losses():
    f = _features()
    losses = afloc_loss(**f)
    assert torch.isfinite(losses.total)
    torch.testing.assert_close(losses.total, losses.word + losses.sentence + losses.global_)
    losses.total.backward()
    for name in ("shallow", "deep", "image_global", "words", "sentences", "report"):
        grad = f[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # padded words receive no gradient: they are masked out, not averaged in
    assert f["words"].grad[2, 2:].abs().sum() == 0
    assert f["sentences"].grad[1, 1:].abs().sum() == 0


@pytest.mark.parametrize(
    "weights, off", [((0, 1, 1), ("shallow", "words")), ((1, 0, 1), ("deep", "sentences")), ((1, 1, 0), ("report",))]
)
def test_switched_off_level_contributes_nothing(weights, off):
    f = _features()
    losses = afloc_loss(**f, weights=weights)
    losses.total.backward()
    for name in off:
        assert f[name].grad is None or f[name].grad.abs().sum() == 0, name


def test_loss_falls_when_pairs_align():
    """Text units copied from their image's regions give a lower loss than shuffled ones."""
    torch.manual_seed(3)
    b, d = 6, 16
    deep = torch.randn(b, 9, d)
    shallow = torch.randn(b, 16, d)
    aligned = afloc_loss(
        shallow,
        deep,
        deep.mean(1),
        shallow[:, :5],
        torch.ones(b, 5, dtype=torch.bool),
        deep[:, :3],
        torch.ones(b, 3, dtype=torch.bool),
        deep.mean(1),
    )
    perm = torch.roll(torch.arange(b), 1)
    shuffled = afloc_loss(
        shallow,
        deep,
        deep.mean(1),
        shallow[perm, :5],
        torch.ones(b, 5, dtype=torch.bool),
        deep[perm, :3],
        torch.ones(b, 3, dtype=torch.bool),
        deep[perm].mean(1),
    )
    assert aligned.word < shuffled.word
    assert aligned.sentence < shuffled.sentence
    assert aligned.global_ < shuffled.global_


def test_memory_policy_lives_on_the_loss_instance():
    """Two AFLocLoss objects with different memory policies run side by side; neither changes the other
    or the functional default (no module-level setting to reset), and both give the same Z."""
    from afloc_engine.losses import AFLocLoss

    g = torch.Generator().manual_seed(3)
    regions = torch.randn(3, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    text = torch.randn(4, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(5)[None] < torch.tensor([[5], [2], [1], [4]])
    lean, keep = AFLocLoss(save_elements=0, chunk_elements=30), AFLocLoss()
    z_lean, z_keep = lean.similarity(regions, text, mask), keep.similarity(regions, text, mask)
    assert "LocalSimilarity" in type(z_lean.grad_fn).__name__  # recomputes in backward
    assert "LocalSimilarity" not in type(z_keep.grad_fn).__name__  # keeps autograd's intermediates
    assert "LocalSimilarity" not in type(local_similarity(regions, text, mask).grad_fn).__name__
    torch.testing.assert_close(z_lean, z_keep, rtol=1e-12, atol=1e-12)
    assert "save_elements=0" in repr(lean)


def test_afloc_loss_takes_a_model_configs_settings_and_refuses_bad_ones():
    from afloc_engine.config import AFLocConfig
    from afloc_engine.losses import AFLocLoss

    config = AFLocConfig(embed_dim=12, tau1=3.0, tau3=7.0, weight_word=0.0, weight_global=2.0, z_aggregation="mean")
    loss = AFLocLoss.from_config(config, chunk_size=2)
    assert (loss.tau1, loss.tau2, loss.tau3, loss.weights) == (3.0, 5.0, 7.0, (0.0, 1.0, 2.0))
    assert loss.aggregation == "mean" and loss.chunk_size == 2
    f = _features()
    image = (f["shallow"], f["deep"], f["image_global"])
    out = loss(image, (f["words"], f["word_mask"], f["sentences"], f["sentence_mask"], f["report"]))
    assert out.word.item() == 0 and out.sentence.item() > 0
    torch.testing.assert_close(out.total, out.sentence + 2 * out.global_)
    with pytest.raises(ValueError, match="aggregation"):
        AFLocLoss(aggregation="max")
    with pytest.raises(ValueError, match="weights"):
        AFLocLoss(weights=(1.0, -1.0, 1.0))
