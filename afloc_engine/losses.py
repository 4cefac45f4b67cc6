"""AFLoc's three contrastive losses, batched over every image-report pair with no loop over samples.

``L = w_w * L_SW + w_s * L_DS + w_g * L_GR``: shallow regions vs words, deep regions vs
sentences (both through the GLoRIA-style local matching score Z), global image vs report.

:class:`AFLocLoss` (an ``nn.Module``, MONAI-style) holds the temperatures, the level weights and
the memory policy of Z on the instance; :func:`local_similarity`, :func:`global_similarity` and
:func:`symmetric_infonce` are the functional pieces it is made of. Nothing here is module state:
two losses with different policies can run side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from afloc_engine.config import AFLocConfig
    from afloc_engine.models import ImageFeatures, TextFeatures

NEG_LOGIT = -1e4
"""A large negative logit that stays finite in bf16/fp16 (masks a logit out of a softmax)."""

# Memory policy of ``local_similarity`` under autograd (defaults; an AFLocLoss carries its own).
# When the whole (B_img, B_txt, N, M) score tensor holds at most ``save_elements`` elements,
# autograd keeps the intermediates (fastest); above that, or when a ``chunk_size`` is given, a
# custom autograd function keeps only the inputs and recomputes one chunk of reports at a time in
# backward, each chunk holding about ``chunk_elements`` elements.
SAVE_ELEMENTS = 1 << 30
"""Default: largest (B_img, B_txt, N, M) score tensor whose intermediates autograd keeps."""
CHUNK_ELEMENTS = 1 << 27
"""Default: elements of one (B_img, chunk, N, M) score tensor when chunking automatically."""

ZKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float, str], torch.Tensor]
"""The Z kernel of one chunk: (regions, text, text_mask, tau1, tau2, aggregation) -> (B_img, T)."""


def at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32: half and bfloat16 are upcast, float32 and float64 stay."""
    return x if x.dtype == torch.float64 else x.float()


def local_similarity(
    regions: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    tau1: float = 4.0,
    tau2: float = 5.0,
    aggregation: str = "sum",
    chunk_size: int | None = None,
    *,
    save_elements: int = SAVE_ELEMENTS,
    chunk_elements: int = CHUNK_ELEMENTS,
    kernel: ZKernel | None = None,
) -> torch.Tensor:
    """Local matching score Z for every image-report pair.

    Args:
        regions: (B_img, M, D) region features of one level (M = grid cells).
        text: (B_txt, N, D) text-unit features (words or sentences), padded to N.
        text_mask: (B_txt, N) bool, True for real units.
        tau1: attention sharpening over regions.
        tau2: scale of the text-unit/context cosine inside the log-sum-exp.
        aggregation: ``sum`` -> Z = log sum_i exp(tau2 cos_i); ``mean`` -> log of the mean.
        chunk_size: reports processed at a time (bounds memory at B_img * chunk * N * M, recomputing
            in backward); by default the whole batch at once when it fits ``save_elements``, else
            chunks of about ``chunk_elements`` elements.
        save_elements: largest (B_img, B_txt, N, M) score tensor computed in one piece (0: always chunk).
        chunk_elements: elements of one automatic chunk's score tensor.
        kernel: the Z kernel of one chunk (e.g. a ``torch.compile``-d one, see :class:`AFLocLoss`);
            the eager kernel by default.

    Returns:
        (B_img, B_txt) matrix of Z. A report with no real unit gets Z = 0.

    For each pair: s = t v^T (N x M); attention is first normalised over the text units, then
    sharpened by tau1 and normalised over regions; c_i = sum_j a_ij v_j; Z pools cos(c_i, t_i).
    Memory-lean under autograd when the batch is large (or ``chunk_size`` is given): the forward then
    keeps no (B_img, B_txt, N, M) intermediate and the backward recomputes each chunk (a custom
    autograd function), so peak memory is one chunk's, not the batch's.
    """
    if regions.dim() != 3 or text.dim() != 3 or text_mask.shape != text.shape[:2]:
        raise ValueError("expected regions (B_img, M, D), text (B_txt, N, D), text_mask (B_txt, N)")
    if aggregation not in ("sum", "mean"):
        raise ValueError(f"aggregation must be 'sum' or 'mean', not {aggregation!r}")
    text_mask = text_mask.bool()
    b_img, m = regions.shape[:2]
    b_txt, n = text.shape[:2]
    per_report = max(1, b_img * max(n, 1) * m)
    needs_grad = torch.is_grad_enabled() and (regions.requires_grad or text.requires_grad)
    kernel = kernel or _local_similarity_chunk
    if not chunk_size and b_txt * per_report <= save_elements:
        return kernel(regions, text, text_mask, tau1, tau2, aggregation)
    chunk = max(1, int(chunk_size)) if chunk_size else max(1, chunk_elements // per_report)
    params = (tau1, tau2, aggregation, min(chunk, max(b_txt, 1)), kernel)
    if needs_grad:
        return _LocalSimilarity.apply(regions, text, text_mask, params)
    return _local_similarity_chunked(regions, text, text_mask, params)


def _local_similarity_chunked(
    regions: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, params: tuple
) -> torch.Tensor:
    tau1, tau2, aggregation, chunk, kernel = params
    parts = [
        kernel(regions, text[i : i + chunk], text_mask[i : i + chunk], tau1, tau2, aggregation)
        for i in range(0, text.shape[0], chunk)
    ]
    if not parts:
        return regions.new_zeros(regions.shape[0], 0)
    return torch.cat(parts, dim=1)


class _LocalSimilarity(torch.autograd.Function):
    """Z with activation recomputation: saves only the inputs, recomputes one chunk at a time in backward."""

    @staticmethod
    def forward(ctx, regions, text, text_mask, params):  # noqa: ANN001, ANN205
        device_type = regions.device.type
        ctx.autocast = (
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
            device_type,
        )
        ctx.params = params
        ctx.save_for_backward(regions, text, text_mask)
        with torch.no_grad():
            return _local_similarity_chunked(regions, text, text_mask, params)

    @staticmethod
    def backward(ctx, grad_z):  # noqa: ANN001, ANN205
        regions, text, text_mask = ctx.saved_tensors
        tau1, tau2, aggregation, chunk, kernel = ctx.params
        enabled, dtype, device_type = ctx.autocast
        need_r, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.float64 if regions.dtype == torch.float64 else torch.float32
        grad_regions = torch.zeros(regions.shape, dtype=acc, device=regions.device) if need_r else None
        grad_text = torch.zeros_like(text) if need_t else None
        leaf_r = regions.detach().requires_grad_(need_r)
        for i in range(0, text.shape[0], chunk):
            leaf_t = text[i : i + chunk].detach().requires_grad_(need_t)
            with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                z = kernel(leaf_r, leaf_t, text_mask[i : i + chunk], tau1, tau2, aggregation)
            inputs = [x for x, need in ((leaf_r, need_r), (leaf_t, need_t)) if need]
            grads = torch.autograd.grad(z, inputs, grad_z[:, i : i + chunk].to(z.dtype))
            grads = list(grads)
            if need_r:
                grad_regions += grads.pop(0).to(acc)
            if need_t:
                grad_text[i : i + chunk] = grads.pop(0)
        if grad_regions is not None:
            grad_regions = grad_regions.to(regions.dtype)
        return grad_regions, grad_text, None, None


def _local_similarity_chunk(
    regions: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, tau1: float, tau2: float, aggregation: str
) -> torch.Tensor:
    """Z of B_img images against T reports: (B_img, M, D), (T, N, D), (T, N) -> (B_img, T).

    Works in the layout (B_img, M, T, N), which one matrix product gives without a transposed copy
    and which the context product reads as it is. The attention over regions, softmax_m(tau1 * p),
    needs no max-subtraction: p, a softmax over the text units, lies in [0, 1], so e = exp(tau1 * p)
    lies in [1, e^tau1]. With a = e / sum_m e, the context c = a v gives <c, t> = sum_m a s (no pass
    over the context for the numerator) and |c| from the un-normalised product e v. Scores, softmax
    and reductions run in float32 (at least); the two matrix products in the input dtype.
    """
    mask = text_mask.bool()
    b, m, d = regions.shape
    t, n, _ = text.shape
    scores = (regions.reshape(b * m, d) @ text.reshape(t * n, d).t()).view(b, m, t, n)
    s32 = at_least_f32(scores)
    p = torch.softmax(s32.masked_fill(~mask, NEG_LOGIT), dim=3)  # over the text units (padding excluded)
    e = torch.exp(p * tau1)  # un-normalised attention over regions
    norm = e.sum(dim=1)  # (B, T, N)
    dot = (e * s32).sum(dim=1) / norm  # <c_n, t_n>
    context = torch.bmm(e.to(regions.dtype).view(b, m, t * n).transpose(1, 2), regions)  # (B, T*N, D)
    c_norm = at_least_f32(context).norm(dim=-1).view(b, t, n) / norm
    t_norm = at_least_f32(text).norm(dim=-1)  # (T, N)
    cos = dot / (c_norm * t_norm).clamp_min(1e-8)
    logits = (cos * tau2).masked_fill(~mask, NEG_LOGIT)
    z = torch.logsumexp(logits, dim=2)  # (B, T)
    counts = mask.sum(dim=1)
    if aggregation == "mean":
        z = z - torch.log(counts.clamp(min=1).to(z.dtype)).unsqueeze(0)
    return torch.where(counts.unsqueeze(0) > 0, z, torch.zeros_like(z))


def global_similarity(image: torch.Tensor, report: torch.Tensor) -> torch.Tensor:
    """(B_img, D) x (B_txt, D) -> (B_img, B_txt) cosine similarities."""
    return F.normalize(image, dim=-1) @ F.normalize(report, dim=-1).t()


def symmetric_infonce(logits: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy on a (B, B) logit matrix.

    ``targets`` (B, B), when given, calibrates false negatives: float soft targets (rows sum to 1)
    replace the identity; a bool matrix marks pairs that are *not* negatives of each other (masked
    negatives: those off-diagonal logits leave the softmax, the target stays the diagonal).
    """
    labels = torch.arange(logits.shape[0], device=logits.device)
    if targets is None:
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    if targets.dtype == torch.bool:
        exclude = targets & ~torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
        masked = at_least_f32(logits).masked_fill(exclude, NEG_LOGIT)
        return 0.5 * (F.cross_entropy(masked, labels) + F.cross_entropy(masked.t(), labels))
    return 0.5 * (
        F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets.t() / targets.t().sum(1, keepdim=True))
    )


class AFLocLosses(NamedTuple):
    """Weighted total and the three (unweighted) components; a switched-off level is 0."""

    total: torch.Tensor
    word: torch.Tensor
    sentence: torch.Tensor
    global_: torch.Tensor


class AFLocLoss(nn.Module):
    """L_SW + L_DS + L_GR of a batch of B matched image-report pairs, its settings on the instance.

    Args:
        tau1: attention sharpening over regions (inside Z).
        tau2: scale of the text-unit/context cosine inside Z's log-sum-exp.
        tau3: logit scale of the three contrastive (InfoNCE) terms.
        weights: (w_word, w_sentence, w_global), each >= 0; 0 switches a level off (its term is 0).
        aggregation: how Z pools the text units: ``sum`` (reference) or ``mean``.
        chunk_size: reports per chunk of Z (None: automatic, memory-bounded; see :func:`local_similarity`).
        save_elements: largest score tensor whose intermediates autograd keeps (0: always recompute).
        chunk_elements: elements of one automatic chunk of Z.
        compile: use a ``torch.compile``-d Z kernel (fuses softmax, exponentials, casts, reductions).

    Raises ``ValueError`` for an unknown aggregation or a negative weight. No parameters or
    buffers: a module only so that the settings travel with the object (``repr`` shows them).
    """

    def __init__(
        self,
        tau1: float = 4.0,
        tau2: float = 5.0,
        tau3: float = 10.0,
        weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
        aggregation: str = "sum",
        chunk_size: int | None = None,
        save_elements: int = SAVE_ELEMENTS,
        chunk_elements: int = CHUNK_ELEMENTS,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if aggregation not in ("sum", "mean"):
            raise ValueError(f"aggregation must be 'sum' or 'mean', not {aggregation!r}")
        if len(weights) != 3 or min(weights) < 0:
            raise ValueError(f"weights must be three numbers >= 0 (word, sentence, global), not {weights!r}")
        self.tau1, self.tau2, self.tau3 = float(tau1), float(tau2), float(tau3)
        self.weights = tuple(float(w) for w in weights)
        self.aggregation = aggregation
        self.chunk_size = chunk_size
        self.save_elements = max(0, int(save_elements))
        self.chunk_elements = max(1, int(chunk_elements))
        self.compiled = bool(compile)
        self._kernel: ZKernel = (
            torch.compile(_local_similarity_chunk, dynamic=True) if compile else _local_similarity_chunk
        )

    @classmethod
    def from_config(cls, config: AFLocConfig, **policy: object) -> AFLocLoss:
        """The loss of a model config (its temperatures, level weights and Z aggregation).

        ``policy``: ``chunk_size``, ``save_elements``, ``chunk_elements``, ``compile``.
        """
        c = config
        weights = (c.weight_word, c.weight_sentence, c.weight_global)
        return cls(c.tau1, c.tau2, c.tau3, weights, c.z_aggregation, **policy)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return (
            f"tau=({self.tau1:g}, {self.tau2:g}, {self.tau3:g}), weights={self.weights}, "
            f"aggregation={self.aggregation!r}, chunk_size={self.chunk_size}, "
            f"save_elements={self.save_elements}, chunk_elements={self.chunk_elements}, compile={self.compiled}"
        )

    def similarity(self, regions: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Z of (B_img, M, D) regions against (B_txt, N, D) text units -> (B_img, B_txt), this loss's settings."""
        settings = (self.tau1, self.tau2, self.aggregation, self.chunk_size)
        policy = {"save_elements": self.save_elements, "chunk_elements": self.chunk_elements}
        return local_similarity(regions, text, text_mask, *settings, **policy, kernel=self._kernel)

    def forward(
        self,
        image: ImageFeatures | Sequence[torch.Tensor],
        text: TextFeatures | Sequence[torch.Tensor],
        targets: torch.Tensor | None = None,
    ) -> AFLocLosses:
        """The loss of B matched pairs of encoder outputs.

        image: ``ImageFeatures`` or the tuple (shallow, deep, global): shallow (B, D, *grid) or
        (B, M_s, D), deep likewise, global (B, D). text: ``TextFeatures`` or the tuple (words (B, W, D),
        word_mask (B, W) bool, sentences (B, S, D), sentence_mask (B, S), report (B, D)). ``targets``:
        optional (B, B) false-negative calibration: float soft targets or bool not-a-negative pairs
        (see :func:`symmetric_infonce`); identity otherwise.
        """
        shallow, deep, image_global = image
        words, word_mask, sentences, sentence_mask, report = text
        w_word, w_sent, w_glob = self.weights
        zero = image_global.new_zeros(())
        loss_word = loss_sent = loss_glob = zero
        if w_word > 0:
            z = self.similarity(as_regions(shallow), words, word_mask)
            loss_word = symmetric_infonce(z * self.tau3, targets)
        if w_sent > 0:
            z = self.similarity(as_regions(deep), sentences, sentence_mask)
            loss_sent = symmetric_infonce(z * self.tau3, targets)
        if w_glob > 0:
            loss_glob = symmetric_infonce(global_similarity(image_global, report) * self.tau3, targets)
        total = w_word * loss_word + w_sent * loss_sent + w_glob * loss_glob
        return AFLocLosses(total, loss_word, loss_sent, loss_glob)


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
    """Functional form of :class:`AFLocLoss` (default memory policy): see :meth:`AFLocLoss.forward`."""
    loss = AFLocLoss(tau1, tau2, tau3, weights, aggregation, chunk_size)
    return loss((shallow, deep, image_global), (words, word_mask, sentences, sentence_mask, report), targets)


def as_regions(features: torch.Tensor) -> torch.Tensor:
    """(B, D, *grid) feature map -> (B, M, D) regions; (B, M, D) passes through."""
    if features.dim() == 3:
        return features
    return features.flatten(2).transpose(1, 2)
