"""The training loss: the engine's AFLoc losses with negatives spanning the global batch.

One process with no extra negatives calls the engine's :class:`afloc_engine.losses.AFLocLoss`
itself. Under DDP (or with text-only negatives) each rank computes the rows of the global score
matrices that belong to its images (image -> report) and the columns that belong to its reports
(report -> image), with the loss's Z (:meth:`AFLocLoss.similarity`, its memory policy) and the
engine's :func:`global_similarity` against features gathered from every rank. The ranks' parts
sum to the loss of the whole global batch, and the gradient of any rank's part reaches the
features of every rank through the gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from afloc_engine.losses import NEG_LOGIT, AFLocLoss, AFLocLosses, as_regions, at_least_f32, global_similarity
from afloc_engine.models import ImageFeatures, TextFeatures
from training.distributed import DistInfo, gather, max_across


def training_loss(
    image: ImageFeatures,
    text: TextFeatures,
    loss: AFLocLoss,
    dist_info: DistInfo | None = None,
    targets: torch.Tensor | None = None,
    extra_text: TextFeatures | None = None,
) -> AFLocLosses:
    """This rank's share of the AFLoc loss of the global batch (the shares of all ranks sum to it).

    image / text: features of this rank's b matched pairs. loss: the AFLoc loss (temperatures, level
    weights, memory policy; ``AFLocLoss.from_config(model_config, ...)``). targets: optional (B, B) soft targets
    (float) or not-a-negative pairs (bool, masked negatives) of the global batch (B = world * b),
    rows image, columns report. extra_text: E text-only reports
    that join the image -> report side as negatives only.
    """
    info = dist_info or DistInfo()
    if not info.enabled and extra_text is None:
        return loss(image, text, targets)
    return _sharded_loss(image, text, loss, info, targets, extra_text)


def _pad_units(x: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (b, N, D) units and their (b, N) mask to N = n (masked padding)."""
    extra = n - x.shape[1]
    if extra <= 0:
        return x, mask
    return F.pad(x, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def _sharded_loss(
    image: ImageFeatures,
    text: TextFeatures,
    loss: AFLocLoss,
    info: DistInfo,
    targets: torch.Tensor | None,
    extra: TextFeatures | None,
) -> AFLocLosses:
    b = image.global_.shape[0]
    total_b = b * info.world
    offset = info.rank * b
    device = image.global_.device
    if targets is not None and targets.shape != (total_b, total_b):
        raise ValueError(f"targets must be ({total_b}, {total_b}) for the global batch, not {tuple(targets.shape)}")
    zero = at_least_f32(image.global_.new_zeros(()))
    parts = {"word": zero, "sentence": zero, "global": zero}

    def share(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """rows: (b, B [+E]) logits of this rank's images; cols: (b, B) logits of this rank's reports."""
        rows, cols = at_least_f32(rows) * loss.tau3, at_least_f32(cols) * loss.tau3
        labels = torch.arange(offset, offset + b, device=device)
        if targets is None:
            i2t = F.cross_entropy(rows, labels, reduction="sum")
            t2i = F.cross_entropy(cols, labels, reduction="sum")
        elif targets.dtype == torch.bool:  # masked negatives: matches other than the diagonal leave the softmax
            own = F.one_hot(labels, total_b).bool()
            ex_rows = F.pad(targets[offset : offset + b] & ~own, (0, rows.shape[1] - total_b), value=False)
            ex_cols = targets.t()[offset : offset + b] & ~own
            i2t = F.cross_entropy(rows.masked_fill(ex_rows, NEG_LOGIT), labels, reduction="sum")
            t2i = F.cross_entropy(cols.masked_fill(ex_cols, NEG_LOGIT), labels, reduction="sum")
        else:
            t_rows = targets[offset : offset + b].to(rows.dtype)
            t_rows = F.pad(t_rows, (0, rows.shape[1] - total_b))
            t_cols = targets.t()[offset : offset + b].to(cols.dtype)
            t_cols = t_cols / t_cols.sum(1, keepdim=True)
            i2t = F.cross_entropy(rows, t_rows, reduction="sum")
            t2i = F.cross_entropy(cols, t_cols, reduction="sum")
        return (i2t + t2i) / (2 * total_b)

    w_word, w_sentence, w_global = loss.weights
    levels = (
        ("word", w_word, image.shallow, text.words, text.word_mask),
        ("sentence", w_sentence, image.deep, text.sentences, text.sentence_mask),
    )
    for name, weight, feature_map, units, mask in levels:
        if weight <= 0:
            continue
        regions = as_regions(feature_map)
        n = max_across(units.shape[1], info, device)
        units, mask = _pad_units(units, mask, n)
        all_regions, all_units, all_mask = gather(regions, info), gather(units, info), gather(mask, info)
        rows = loss.similarity(regions, all_units, all_mask)
        if extra is not None:
            e_units, e_mask = (
                (extra.words, extra.word_mask) if name == "word" else (extra.sentences, extra.sentence_mask)
            )
            e_rows = loss.similarity(regions, e_units, e_mask)
            rows = torch.cat([rows, e_rows.to(rows.dtype)], dim=1)
        cols = loss.similarity(all_regions, units, mask).t()
        parts[name] = share(rows, cols)
    if w_global > 0:
        all_image, all_report = gather(image.global_, info), gather(text.report, info)
        rows = global_similarity(image.global_, all_report)
        if extra is not None:
            rows = torch.cat([rows, global_similarity(image.global_, extra.report).to(rows.dtype)], dim=1)
        cols = global_similarity(text.report, all_image)
        parts["global"] = share(rows, cols)
    total = w_word * parts["word"] + w_sentence * parts["sentence"] + w_global * parts["global"]
    return AFLocLosses(total, parts["word"], parts["sentence"], parts["global"])
