"""AFLoc's three contrastive losses, batched over every image-report pair with no loop over samples.

``L = w_w * L_SW + w_s * L_DS + w_g * L_GR``: shallow regions vs words, deep regions vs
sentences (both through the GLoRIA-style local matching score Z), global image vs report.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

_NEG = -1e4  # a large negative logit that stays finite in bf16/fp16


def local_similarity(
    regions: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    tau1: float = 4.0,
    tau2: float = 5.0,
    aggregation: str = "sum",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Local matching score Z for every image-report pair.

    Args:
        regions: (B_img, M, D) region features of one level (M = grid cells).
        text: (B_txt, N, D) text-unit features (words or sentences), padded to N.
        text_mask: (B_txt, N) bool, True for real units.
        tau1: attention sharpening over regions.
        tau2: scale of the text-unit/context cosine inside the log-sum-exp.
        aggregation: ``sum`` -> Z = log sum_i exp(tau2 cos_i); ``mean`` -> log of the mean.
        chunk_size: reports processed at a time (bounds memory at B_img * chunk * N * M).

    Returns:
        (B_img, B_txt) matrix of Z. A report with no real unit gets Z = 0.

    For each pair: s = t v^T (N x M); attention is first normalised over the text units, then
    sharpened by tau1 and normalised over regions; c_i = sum_j a_ij v_j; Z pools cos(c_i, t_i).
    """
    if regions.dim() != 3 or text.dim() != 3 or text_mask.shape != text.shape[:2]:
        raise ValueError("expected regions (B_img, M, D), text (B_txt, N, D), text_mask (B_txt, N)")
    if aggregation not in ("sum", "mean"):
        raise ValueError(f"aggregation must be 'sum' or 'mean', not {aggregation!r}")
    b_txt = text.shape[0]
    chunk = b_txt if not chunk_size else max(1, chunk_size)
    parts = [
        _local_similarity_chunk(regions, text[i : i + chunk], text_mask[i : i + chunk], tau1, tau2, aggregation)
        for i in range(0, b_txt, chunk)
    ]
    return torch.cat(parts, dim=1)


def _local_similarity_chunk(
    regions: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, tau1: float, tau2: float, aggregation: str
) -> torch.Tensor:
    mask = text_mask.bool()
    # s[b, t, n, m] = <text[t, n], regions[b, m]>
    scores = torch.einsum("tnd,bmd->btnm", text, regions)
    unit_mask = mask[None, :, :, None]
    # softmax over the text units (padding excluded), then over regions after sharpening by tau1
    attn = torch.softmax(scores.masked_fill(~unit_mask, _NEG), dim=2)
    attn = torch.softmax(attn * tau1, dim=3)
    context = torch.einsum("btnm,bmd->btnd", attn, regions)
    cos = F.cosine_similarity(context, text.unsqueeze(0).expand_as(context), dim=-1, eps=1e-8)  # (B, T, N)
    logits = (cos * tau2).masked_fill(~mask.unsqueeze(0), _NEG)
    z = torch.logsumexp(logits, dim=2)
    counts = mask.sum(dim=1)
    if aggregation == "mean":
        z = z - torch.log(counts.clamp(min=1).to(z.dtype)).unsqueeze(0)
    return torch.where(counts.unsqueeze(0) > 0, z, torch.zeros_like(z))


def global_similarity(image: torch.Tensor, report: torch.Tensor) -> torch.Tensor:
    """(B_img, D) x (B_txt, D) -> (B_img, B_txt) cosine similarities."""
    return F.normalize(image, dim=-1) @ F.normalize(report, dim=-1).t()


def symmetric_infonce(logits: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy on a (B, B) logit matrix.

    ``targets`` (B, B) soft targets (rows sum to 1) replace the identity when given.
    """
    if targets is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    return 0.5 * (
        F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets.t() / targets.t().sum(1, keepdim=True))
    )


class AFLocLosses(NamedTuple):
    """Weighted total and the three (unweighted) components; a switched-off level is 0."""

    total: torch.Tensor
    word: torch.Tensor
    sentence: torch.Tensor
    global_: torch.Tensor


def afloc_loss(
    shallow: torch.Tensor,
    deep: torch.Tensor,
    image_global: torch.Tensor,
    words: torch.Tensor,
    word_mask: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: torch.Tensor,
    report: torch.Tensor,
    tau1: float = 4.0,
    tau2: float = 5.0,
    tau3: float = 10.0,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    aggregation: str = "sum",
    targets: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> AFLocLosses:
    """L_SW + L_DS + L_GR for a batch of B matched image-report pairs.

    shallow: (B, D, *grid) or (B, M_s, D); deep likewise; image_global (B, D); words (B, W, D),
    word_mask (B, W); sentences (B, S, D), sentence_mask (B, S); report (B, D). ``targets``:
    optional (B, B) soft targets (false-negative calibration); identity otherwise.
    """
    w_word, w_sent, w_glob = weights
    zero = image_global.new_zeros(())
    loss_word = loss_sent = loss_glob = zero
    if w_word > 0:
        z = local_similarity(as_regions(shallow), words, word_mask, tau1, tau2, aggregation, chunk_size)
        loss_word = symmetric_infonce(z * tau3, targets)
    if w_sent > 0:
        z = local_similarity(as_regions(deep), sentences, sentence_mask, tau1, tau2, aggregation, chunk_size)
        loss_sent = symmetric_infonce(z * tau3, targets)
    if w_glob > 0:
        loss_glob = symmetric_infonce(global_similarity(image_global, report) * tau3, targets)
    total = w_word * loss_word + w_sent * loss_sent + w_glob * loss_glob
    return AFLocLosses(total, loss_word, loss_sent, loss_glob)


def as_regions(features: torch.Tensor) -> torch.Tensor:
    """(B, D, *grid) feature map -> (B, M, D) regions; (B, M, D) passes through."""
    if features.dim() == 3:
        return features
    return features.flatten(2).transpose(1, 2)
