"""fVLM's two ideas for CT pre-training: anatomy-level alignment and false-negative calibration.

*Anatomy-level alignment*: instead of one image against one report, every anatomy (organ) of a
volume is contrasted with the report sentences about that anatomy. Region features are pooled inside
each organ's mask (any label map); sentences are assigned to organs by a configurable keyword map;
an organ the report says nothing about gets "{Organ} shows no significant abnormalities.". For each
organ, the B x B matrix of organ-feature / organ-caption similarities of a batch is a contrastive task.

*False-negative calibration*: healthy organs read alike and one disease recurs across patients, so
patient-level pairing calls many true matches "negatives". Pairs whose captions are both normal, are
identical, or share a disease label are not pushed apart, either as soft targets (each row spreads
its target mass over its matches; rows sum to 1) or as masked negatives (those logits leave the
softmax; the target stays the diagonal). ``none`` keeps the plain identity.

>>> split_report_by_anatomy("Small nodule in the right lung. Heart size is normal.", DEFAULT_ANATOMY_KEYWORDS)["lung"]
['small nodule in the right lung.']
>>> anatomy_captions("Heart size is normal.", {"liver": ("liver",), "heart": ("heart",)})["liver"]
'Liver shows no significant abnormalities.'

The pieces (:func:`pool_anatomy_features`, :func:`false_negative_pairs`, :func:`soft_targets`,
:func:`calibrated_infonce`, :func:`anatomy_alignment_loss`) are plain functions on tensors;
:class:`AnatomyAligner` ties them to an :class:`~afloc_engine.models.AFLocModel` for a trainer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F

from afloc_engine.errors import ConfigError
from afloc_engine.losses import NEG_LOGIT
from afloc_engine.text import split_sentences

if TYPE_CHECKING:  # pragma: no cover
    from afloc_engine.models import AFLocModel
    from afloc_engine.models.image_encoder import ImageFeatures

NORMAL_TEMPLATE = "{organ} shows no significant abnormalities."
FALSE_NEGATIVE_MODES = ("none", "soft", "masked")

DEFAULT_ANATOMY_KEYWORDS: dict[str, tuple[str, ...]] = {
    "lung": ("lung", "lungs", "pulmonary", "lobe", "lobes", "pleural", "pneumothorax", "bronchi", "airway"),
    "heart": ("heart", "cardiac", "pericardial", "cardiomegaly", "coronary", "ventricle", "atrium"),
    "aorta": ("aorta", "aortic"),
    "esophagus": ("esophagus", "esophageal", "oesophagus", "hiatal"),
    "liver": ("liver", "hepatic", "hepatomegaly"),
    "gallbladder": ("gallbladder", "biliary", "cholelithiasis"),
    "spleen": ("spleen", "splenic", "splenomegaly"),
    "pancreas": ("pancreas", "pancreatic"),
    "kidney": ("kidney", "kidneys", "renal"),
    "bone": ("bone", "bones", "osseous", "vertebra", "vertebral", "rib", "ribs", "fracture"),
}
"""Organ -> words (or multi-word phrases) whose presence in a sentence assigns it to the organ."""

DEFAULT_DISEASE_KEYWORDS: tuple[str, ...] = (
    "mass",
    "nodule",
    "lesion",
    "tumor",
    "cyst",
    "effusion",
    "consolidation",
    "pneumonia",
    "opacity",
    "emphysema",
    "atelectasis",
    "fibrosis",
    "calcification",
    "stone",
    "pneumothorax",
    "cardiomegaly",
    "hepatomegaly",
    "splenomegaly",
    "aneurysm",
    "fracture",
    "hernia",
    "edema",
)
"""Words that label a sentence with a disease (unless negated: "no effusion" is not an effusion)."""

_NEGATIONS = {"no", "not", "without", "negative", "absent", "free", "resolved"}


# --- text side ----------------------------------------------------------------------------------
def load_keyword_map(spec: Mapping[str, Sequence[str]] | str | Path | None = None) -> dict[str, tuple[str, ...]]:
    """A keyword map from a dict, a JSON/YAML file, or the default (None).

    Raises :class:`ConfigError` (naming the file) for an empty map, an organ without keywords or
    a keyword that is not a string.
    """
    source: Path | None = None
    if spec is None:
        return dict(DEFAULT_ANATOMY_KEYWORDS)
    if isinstance(spec, (str, Path)):
        source = Path(spec)
        try:
            text = source.read_text()
            if source.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read the anatomy keyword map: {err}", source) from None
    else:
        data = spec
    if not isinstance(data, Mapping) or not data:
        raise ConfigError("anatomy keyword map must be a non-empty mapping organ -> [keywords]", source)
    out: dict[str, tuple[str, ...]] = {}
    for organ, words in data.items():
        if isinstance(words, str) or not isinstance(words, Sequence) or not words:
            raise ConfigError(f"organ {organ!r} needs a non-empty list of keywords", source)
        if not all(isinstance(w, str) and w.strip() for w in words):
            raise ConfigError(f"organ {organ!r} has a keyword that is not a non-empty string", source)
        out[str(organ)] = tuple(w.strip().lower() for w in words)
    return out


def normal_caption(organ: str) -> str:
    """fVLM's caption of an organ the report does not mention: 'Liver shows no significant abnormalities.'"""
    return NORMAL_TEMPLATE.format(organ=organ[:1].upper() + organ[1:])


def _canonical(text: str) -> str:
    return " ".join(w for sentence in split_sentences(text) for w in sentence)


def caption_is_normal(caption: str, organ: str) -> bool:
    """True when ``caption`` is the normal template of ``organ`` (case and punctuation ignored)."""
    return _canonical(caption) == _canonical(normal_caption(organ))


def _mentions(words: list[str], phrase: str) -> bool:
    parts = phrase.split()
    n = len(parts)
    return any(words[i : i + n] == parts for i in range(len(words) - n + 1))


def split_report_by_anatomy(
    report: str, keyword_map: Mapping[str, Sequence[str]], organs: Sequence[str] | None = None
) -> dict[str, list[str]]:
    """The report's sentences about each organ (lower-case, one trailing '.'); a sentence may go to several.

    organs: which organs to return (default: every organ of the map), in that order.
    """
    organs = list(keyword_map) if organs is None else list(organs)
    missing = [o for o in organs if o not in keyword_map]
    if missing:
        raise ConfigError(f"organ(s) {', '.join(missing)} have no entry in the anatomy keyword map")
    out: dict[str, list[str]] = {o: [] for o in organs}
    for words in split_sentences(report):
        for organ in organs:
            if any(_mentions(words, k) for k in keyword_map[organ]):
                out[organ].append(" ".join(words) + ".")
    return out


def anatomy_captions(
    report: str, keyword_map: Mapping[str, Sequence[str]], organs: Sequence[str] | None = None
) -> dict[str, str]:
    """One caption per organ: its sentences joined, or :func:`normal_caption` when it has none."""
    parts = split_report_by_anatomy(report, keyword_map, organs)
    return {organ: " ".join(s) if s else normal_caption(organ) for organ, s in parts.items()}


def disease_labels(text: str, disease_keywords: Sequence[str] = DEFAULT_DISEASE_KEYWORDS) -> frozenset[str]:
    """Disease words a text asserts, per sentence; a sentence with a negation cue before the word does not count.

    >>> sorted(disease_labels("Small mass in the liver. No pleural effusion."))
    ['mass']
    """
    found: set[str] = set()
    for words in split_sentences(text):
        for keyword in disease_keywords:
            parts = keyword.lower().split()
            for i in range(len(words) - len(parts) + 1):
                if words[i : i + len(parts)] == parts and not _NEGATIONS.intersection(words[:i]):
                    found.add(keyword.lower())
                    break
    return frozenset(found)


@dataclass
class AnatomyTexts:
    """The text side of a batch for anatomy alignment.

    captions: B lists of K organ captions; normal: (B, K) bool; labels: B lists of K frozensets of
    disease labels; organs: the K organ names.
    """

    organs: tuple[str, ...]
    captions: list[list[str]]
    normal: torch.Tensor
    labels: list[list[frozenset[str]]]

    def __len__(self) -> int:
        return len(self.captions)

    def patient_labels(self) -> list[frozenset[str]]:
        """Per sample, its organ-qualified disease labels ('liver:mass'), for the patient-level targets."""
        return [frozenset(f"{o}:{d}" for o, ds in zip(self.organs, row) for d in ds) for row in self.labels]


def build_anatomy_texts(
    reports: Sequence[str],
    organs: Sequence[str],
    keyword_map: Mapping[str, Sequence[str]] | None = None,
    labels: Sequence[Mapping[str, Sequence[str]]] | None = None,
    disease_keywords: Sequence[str] = DEFAULT_DISEASE_KEYWORDS,
) -> AnatomyTexts:
    """Organ captions, normal flags and disease labels of B reports.

    labels: optional per-report mapping organ -> disease labels (e.g. from structured data); when
    absent they are read from the captions with ``disease_keywords``. An organ is normal when its
    caption is the normal template or it has no disease label.
    """
    keyword_map = DEFAULT_ANATOMY_KEYWORDS if keyword_map is None else keyword_map
    organs = tuple(organs)
    captions, normal, all_labels = [], [], []
    for b, report in enumerate(reports):
        caps = anatomy_captions(report, keyword_map, organs)
        row_caps, row_normal, row_labels = [], [], []
        for organ in organs:
            cap = caps[organ]
            if labels is not None:
                lab = frozenset(str(v).lower() for v in labels[b].get(organ, ()))
            else:
                lab = disease_labels(cap, disease_keywords)
            row_caps.append(cap)
            row_labels.append(lab)
            row_normal.append(caption_is_normal(cap, organ) or not lab)
        captions.append(row_caps)
        normal.append(row_normal)
        all_labels.append(row_labels)
    return AnatomyTexts(organs, captions, torch.tensor(normal, dtype=torch.bool).reshape(len(reports), -1), all_labels)


# --- false-negative calibration -------------------------------------------------------------------
def _shared_labels(labels: Sequence[frozenset[str]]) -> torch.Tensor:
    """(B, B) bool: samples i and j have a label in common."""
    vocab = {name: n for n, name in enumerate(sorted(set().union(*labels)))} if labels else {}
    hot = torch.zeros(len(labels), max(1, len(vocab)))
    for i, labs in enumerate(labels):
        for name in labs:
            hot[i, vocab[name]] = 1.0
    return (hot @ hot.t()) > 0


def false_negative_pairs(
    captions: Sequence[Sequence[str]],
    normal: torch.Tensor,
    labels: Sequence[Sequence[frozenset[str]]] | None = None,
) -> torch.Tensor:
    """(K, B, B) bool: pairs (i, j) of the same organ that must not be pushed apart.

    True on the diagonal, when both captions are normal, when the captions are identical (case and
    punctuation ignored), or when they share a disease label. captions: B lists of K; normal (B, K);
    labels: B lists of K frozensets.
    """
    batch, k = normal.shape
    if len(captions) != batch or any(len(row) != k for row in captions):
        raise ValueError(f"captions must be {batch} lists of {k}, like normal")
    nrm = normal.bool().t()  # (K, B)
    pairs = torch.eye(batch, dtype=torch.bool).repeat(k, 1, 1) | (nrm[:, :, None] & nrm[:, None, :])
    for o in range(k):
        canon = [_canonical(row[o]) for row in captions]
        ids = torch.tensor([canon.index(c) for c in canon])
        pairs[o] |= ids[:, None] == ids[None, :]
        if labels is not None:
            pairs[o] |= _shared_labels([row[o] for row in labels])
    return pairs


def patient_pairs(normal: torch.Tensor, labels: Sequence[frozenset[str]]) -> torch.Tensor:
    """(B, B) bool for patient-level pairing: the diagonal, both reports normal, or a shared disease label.

    normal: (B,) bool (every organ normal); labels: per sample, organ-qualified labels ('liver:mass').
    """
    batch = len(labels)
    nrm = normal.bool().reshape(batch)
    return torch.eye(batch, dtype=torch.bool) | (nrm[:, None] & nrm[None, :]) | _shared_labels(labels)


def soft_targets(pairs: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(..., B, B) bool pairs -> float targets whose rows sum to 1 (only valid columns get mass).

    valid: optional (..., B) bool of samples that take part; an invalid row is all zero.
    """
    t = pairs.float()
    if valid is not None:
        v = valid.float()
        t = t * v[..., None, :] * v[..., :, None]
    return t / t.sum(-1, keepdim=True).clamp(min=1e-12)


def calibrated_infonce(
    logits: torch.Tensor,
    pairs: torch.Tensor | None = None,
    mode: str = "soft",
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE on (..., B, B) logits (rows: images, columns: texts) with false-negative calibration.

    pairs: (..., B, B) bool matches (from :func:`false_negative_pairs` / :func:`patient_pairs`);
    mode: ``none`` (identity targets), ``soft`` (row-normalised soft targets) or ``masked``
    (off-diagonal matches removed from the softmax, diagonal target). valid: (..., B) bool, samples
    that take part (e.g. the organ is in the volume); invalid rows and columns are ignored, and a
    group with fewer than two valid samples contributes nothing. Returns the mean over valid rows
    of both directions (0 when no group has two valid samples).
    """
    if mode not in FALSE_NEGATIVE_MODES:
        raise ConfigError(f"false_negative must be one of {', '.join(FALSE_NEGATIVE_MODES)}, not {mode!r}")
    batch = logits.shape[-1]
    if logits.shape[-2] != batch:
        raise ValueError(f"expected square (..., B, B) logits, got {tuple(logits.shape)}")
    eye = torch.eye(batch, dtype=torch.bool, device=logits.device)
    valid = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device) if valid is None else valid.bool()
    valid = valid.to(logits.device)
    groups_ok = valid.sum(-1, keepdim=True) >= 2  # (..., 1)
    rows = valid & groups_ok  # (..., B)
    if mode == "none" or pairs is None:
        pairs = eye.expand_as(logits)
    pairs = pairs.to(logits.device).bool() | eye
    total = logits.new_zeros(())
    for lg, pr in ((logits, pairs), (logits.transpose(-1, -2), pairs.transpose(-1, -2))):
        col_ok = valid[..., None, :].expand_as(lg)
        if mode == "masked":
            col_ok = col_ok & ~(pr & ~eye)
            target = eye.float().expand_as(lg)
        else:
            target = soft_targets(pr, valid)
        logp = torch.log_softmax(lg.float().masked_fill(~col_ok, NEG_LOGIT), dim=-1)
        per_row = -(target * logp.masked_fill(~col_ok, 0.0)).sum(-1)  # (..., B)
        total = total + (per_row * rows).sum()
    count = rows.sum()
    return total / (2 * count) if count > 0 else total * 0.0


# --- image side --------------------------------------------------------------------------------------
def organ_masks(label_maps: torch.Tensor, organ_labels: Sequence[int | Sequence[int]]) -> torch.Tensor:
    """(B, *spatial) integer label maps -> (B, K, *spatial) float masks; an organ may join several labels."""
    masks = []
    for values in organ_labels:
        vals = [values] if isinstance(values, int) else list(values)
        m = torch.zeros_like(label_maps, dtype=torch.bool)
        for v in vals:
            m |= label_maps == v
        masks.append(m)
    return torch.stack(masks, dim=1).float()


def pool_anatomy_features(
    features: torch.Tensor, masks: torch.Tensor, min_fraction: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean region feature inside each organ.

    features: (B, D, *grid) region features (2D or 3D grid); masks: (B, K, *spatial) organ masks
    (float or bool) on the network input's grid, any multiple of the feature grid. Each grid cell
    counts with the fraction of it the organ covers (cells covered less than ``min_fraction`` are
    dropped). Returns pooled (B, K, D) and present (B, K) bool (the organ covers some cell).
    """
    dims = features.dim() - 2
    if masks.dim() != dims + 2 or masks.shape[0] != features.shape[0]:
        raise ValueError(f"masks {tuple(masks.shape)} do not match features {tuple(features.shape)}")
    pool = F.adaptive_avg_pool2d if dims == 2 else F.adaptive_avg_pool3d
    occupancy = pool(masks.float(), features.shape[2:]).flatten(2)  # (B, K, M)
    if min_fraction > 0:
        occupancy = occupancy * (occupancy >= min_fraction)
    weight = occupancy.to(features.dtype)
    total = weight.sum(-1)  # (B, K)
    pooled = torch.einsum("bkm,bdm->bkd", weight, features.flatten(2)) / total.clamp(min=1e-6).unsqueeze(-1)
    return pooled, total > 0


def anatomy_alignment_loss(
    organ_features: torch.Tensor,
    organ_text: torch.Tensor,
    present: torch.Tensor,
    pairs: torch.Tensor | None = None,
    mode: str = "soft",
    scale: float = 10.0,
    normalize_features: bool = True,
) -> torch.Tensor:
    """Organ-by-organ contrastive loss.

    organ_features: (B, K, D) pooled region features; organ_text: (B, K, D) caption embeddings;
    present: (B, K) bool; pairs: (K, B, B) from :func:`false_negative_pairs`; scale: logit scale
    (1 / temperature). For organ k, logits[k, i, j] = scale * cos(image_i,k, caption_j,k); with
    ``normalize_features=False`` the image side is used as given (e.g. a mean of unit cell
    vectors, which makes the logit the organ's mean cell-caption cosine).
    """
    img = F.normalize(organ_features.float(), dim=-1) if normalize_features else organ_features.float()
    txt = F.normalize(organ_text.float(), dim=-1)
    logits = torch.einsum("ikd,jkd->kij", img, txt) * scale
    return calibrated_infonce(logits, pairs, mode, present.t())


def grounding_loss(
    organ_features: torch.Tensor,
    organ_text: torch.Tensor,
    present: torch.Tensor,
    background: torch.Tensor | None = None,
    scale: float = 10.0,
    normalize_features: bool = True,
) -> torch.Tensor:
    """Within each volume, an organ's caption must match that organ's region better than the others'.

    organ_features: (B, K, D) pooled regions; organ_text: (B, K, D) captions; present: (B, K) bool;
    background: optional (B, D) pooled region outside every organ (a K+1-th candidate region).
    For volume b and caption k: cross-entropy over the regions present of scale * sim(region, caption)
    with target region k. This is what makes a region map of "mass in the liver" light the liver
    rather than the air around the body (fVLM's batch contrast alone never compares regions of one
    volume). Returns the mean over present (volume, organ) pairs.
    """
    regions, ok = organ_features, present.bool()
    if background is not None:
        regions = torch.cat([organ_features, background.unsqueeze(1)], dim=1)
        ok = torch.cat([ok, torch.ones_like(ok[:, :1])], dim=1)
    img = F.normalize(regions.float(), dim=-1) if normalize_features else regions.float()
    txt = F.normalize(organ_text.float(), dim=-1)
    logits = torch.einsum("brd,bkd->bkr", img, txt) * scale  # (B, K captions, R regions)
    logits = logits.masked_fill(~ok.unsqueeze(1), NEG_LOGIT)
    k = organ_text.shape[1]
    target = torch.arange(k, device=logits.device).expand(logits.shape[0], k)
    per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    rows = present.bool().reshape(-1)
    return (per * rows).sum() / rows.sum().clamp(min=1)


class AnatomyLosses(NamedTuple):
    """Weighted total (alignment + grounding weight x grounding) and its two parts."""

    total: torch.Tensor
    alignment: torch.Tensor
    grounding: torch.Tensor


def report_findings(
    report: str,
    organs: Sequence[str],
    keyword_map: Mapping[str, Sequence[str]],
    disease_keywords: Sequence[str] = DEFAULT_DISEASE_KEYWORDS,
) -> frozenset[str]:
    """A report's disease labels for patient-level pairing: 'organ:disease' for sentences about an
    organ, 'report:disease' for sentences that name none (e.g. "Dense opacity in the upper zone.").

    An empty set means a normal report.
    """
    found: set[str] = set()
    for words in split_sentences(report):
        sentence = " ".join(words)
        labels = disease_labels(sentence, disease_keywords)
        if not labels:
            continue
        hit = [o for o in organs if any(_mentions(words, k) for k in keyword_map[o])]
        found.update(f"{o}:{d}" for o in hit or ["report"] for d in labels)
    return frozenset(found)


class DiseaseAwareTargets:
    """Patient-level false-negative calibration from report text, for a trainer's ``target_fn`` hook.

    Called with anything that has ``.texts`` (B reports; the trainer's ``BatchContext``) or with the
    reports themselves. Matches of a report: itself, every other normal report when it is normal, and
    every report sharing one of its disease labels (:func:`report_findings`). ``mode="soft"`` returns
    (B, B) float soft targets spread over the matches (rows sum to 1); ``mode="masked"`` the (B, B) bool
    matches, which the losses remove from the softmax as negatives
    (:func:`afloc_engine.losses.symmetric_infonce`).
    """

    def __init__(
        self,
        organs: Sequence[str] = (),
        keywords: Mapping[str, Sequence[str]] | str | Path | None = None,
        disease_keywords: Sequence[str] = (),
        mode: str = "soft",
    ) -> None:
        if mode not in ("soft", "masked"):
            raise ConfigError(f"false-negative mode must be soft or masked, not {mode!r}")
        self.mode = mode
        self.keywords = load_keyword_map(keywords)
        self.organs = tuple(organs) or tuple(self.keywords)
        missing = [o for o in self.organs if o not in self.keywords]
        if missing:
            raise ConfigError(f"no keywords for organ(s) {', '.join(missing)}; add them to the anatomy keyword map")
        self.disease_keywords = tuple(disease_keywords) or DEFAULT_DISEASE_KEYWORDS

    def pairs(self, reports: Sequence[str]) -> torch.Tensor:
        """(B, B) bool: report pairs that are not negatives of each other."""
        labels = [report_findings(r, self.organs, self.keywords, self.disease_keywords) for r in reports]
        normal = torch.tensor([not lab for lab in labels], dtype=torch.bool)
        return patient_pairs(normal, labels)

    def __call__(self, context: Any) -> torch.Tensor:  # noqa: ANN401 (BatchContext or a list of reports)
        reports = context.texts if hasattr(context, "texts") else context
        pairs = self.pairs(list(reports))
        return pairs if self.mode == "masked" else soft_targets(pairs)


# --- the trainer-facing piece ---------------------------------------------------------------------
@dataclass
class AnatomyConfig:
    """Options of anatomy-level alignment and false-negative calibration (a trainer's config block).

    organs: organ name -> label value(s) in the label maps. keywords: organ -> words (default:
    :data:`DEFAULT_ANATOMY_KEYWORDS`, which must then cover the organs). false_negative: ``none``,
    ``soft`` or ``masked``. weight: weight of the anatomy loss. level: ``deep`` or ``shallow``
    region features. scale: logit scale (None: the model's tau3). patient_level: also calibrate the
    targets of AFLoc's patient-level losses (soft targets; see :meth:`AnatomyAligner.patient_targets`).
    pooling: ``similarity`` (default: the logit is the organ's mean cell-caption cosine, the quantity
    a heatmap shows) or ``feature`` (fVLM: cosine of the organ's mean feature and the caption).
    grounding: weight of :func:`grounding_loss` (each caption against the regions of its own
    volume, background included); 0 gives fVLM's batch contrast only.
    """

    organs: dict[str, Any] = field(default_factory=dict)
    keywords: dict[str, Any] | str | None = None
    false_negative: str = "soft"
    weight: float = 1.0
    level: str = "deep"
    scale: float | None = None
    min_fraction: float = 0.0
    disease_keywords: tuple[str, ...] = DEFAULT_DISEASE_KEYWORDS
    patient_level: bool = True
    pooling: str = "similarity"
    grounding: float = 1.0

    def __post_init__(self) -> None:
        if self.false_negative not in FALSE_NEGATIVE_MODES:
            raise ConfigError(
                f"false_negative must be one of {', '.join(FALSE_NEGATIVE_MODES)}, not {self.false_negative!r}"
            )
        if self.pooling not in ("similarity", "feature"):
            raise ConfigError(f"anatomy pooling must be 'similarity' or 'feature', not {self.pooling!r}")
        if self.level not in ("deep", "shallow"):
            raise ConfigError(f"anatomy level must be 'deep' or 'shallow', not {self.level!r}")
        if self.weight < 0 or self.grounding < 0 or (self.scale is not None and self.scale <= 0):
            raise ConfigError("anatomy weight and grounding must be >= 0, scale > 0")
        if not 0 <= self.min_fraction < 1:
            raise ConfigError(f"min_fraction must be in [0, 1), not {self.min_fraction}")
        for organ, values in self.organs.items():
            vals = [values] if isinstance(values, int) else values
            if not isinstance(vals, Sequence) or not vals or not all(isinstance(v, int) and v > 0 for v in vals):
                raise ConfigError(f"organ {organ!r} needs one or more positive integer label values, not {values!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | Path | None = None) -> AnatomyConfig:
        """Build from a config dict; unknown keys raise :class:`ConfigError`."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown anatomy config key(s): {', '.join(unknown)}", source)
        try:
            return cls(**dict(data))
        except ConfigError as err:
            raise ConfigError(err.problem, source) from None


class AnatomyAligner:
    """Anatomy-level alignment + false-negative calibration for an :class:`AFLocModel`.

    >>> aligner = AnatomyAligner(AnatomyConfig(organs={"lung": 1, "liver": 3}))  # doctest: +SKIP
    >>> texts = aligner.texts(reports)                        # in the data loader   # doctest: +SKIP
    >>> feats = model.encode_images(images)                                          # doctest: +SKIP
    >>> loss = aligner.loss(model, feats, label_maps, texts).total                   # doctest: +SKIP
    >>> targets = aligner.patient_targets(texts)    # -> afloc_loss(..., targets=targets)  # doctest: +SKIP
    """

    def __init__(self, config: AnatomyConfig) -> None:
        if not config.organs:
            raise ConfigError("anatomy alignment needs organs: a mapping organ name -> label value(s)")
        self.config = config
        self.organs = tuple(config.organs)
        self.keywords = load_keyword_map(config.keywords)
        missing = [o for o in self.organs if o not in self.keywords]
        if missing:
            raise ConfigError(f"no keywords for organ(s) {', '.join(missing)}; add them to the anatomy keyword map")

    def texts(
        self, reports: Sequence[str], labels: Sequence[Mapping[str, Sequence[str]]] | None = None
    ) -> AnatomyTexts:
        """Organ captions, normal flags and disease labels of B reports (see :func:`build_anatomy_texts`)."""
        return build_anatomy_texts(reports, self.organs, self.keywords, labels, self.config.disease_keywords)

    def organ_text_features(self, model: AFLocModel, texts: AnatomyTexts) -> torch.Tensor:
        """(B, K, D) report embeddings of the organ captions (the model's text encoder; one batch)."""
        flat = [c for row in texts.captions for c in row]
        unique = list(dict.fromkeys(flat))
        device = next(model.parameters()).device
        feats = model.encode_text(model.text_encoder.tokenize(unique).to(device)).report  # (U, D)
        index = torch.tensor([unique.index(c) for c in flat], device=feats.device)
        return feats[index].reshape(len(texts), len(self.organs), -1)

    def loss(
        self,
        model: AFLocModel,
        image_features: ImageFeatures,
        label_maps: torch.Tensor,
        texts: AnatomyTexts,
        organ_text: torch.Tensor | None = None,
    ) -> AnatomyLosses:
        """The anatomy-level losses of a batch (``total`` is to be multiplied by ``config.weight``).

        image_features: the model's output on the batch; label_maps: (B, *spatial) integer organ
        labels on the network input's grid (e.g. :func:`afloc_engine.volume.prepare_label_map`);
        organ_text: optional precomputed (B, K, D) caption embeddings (e.g. cached for a frozen text
        tower); by default :meth:`organ_text_features` encodes the captions.
        """
        c = self.config
        regions = image_features.deep if c.level == "deep" else image_features.shallow
        if c.pooling == "similarity":
            regions = F.normalize(regions, dim=1)
        masks = organ_masks(label_maps.to(regions.device), [c.organs[o] for o in self.organs])
        pooled, present = pool_anatomy_features(regions, masks, c.min_fraction)
        text = self.organ_text_features(model, texts) if organ_text is None else organ_text.to(pooled.device)
        pairs = false_negative_pairs(texts.captions, texts.normal, texts.labels) if c.false_negative != "none" else None
        scale = c.scale if c.scale is not None else model.config.tau3
        raw = c.pooling == "feature"
        align = anatomy_alignment_loss(pooled, text, present, pairs, c.false_negative, scale, raw)
        ground = align.new_zeros(())
        if c.grounding > 0:
            outside = (1.0 - masks.sum(1, keepdim=True)).clamp(min=0.0)
            background, has_background = pool_anatomy_features(regions, outside)
            # a volume filled by organs has no background region: then compare organs only
            candidate = background[:, 0] if bool(has_background.all()) else None
            ground = grounding_loss(pooled, text, present, candidate, scale, raw)
        return AnatomyLosses(align + c.grounding * ground, align, ground)

    def patient_targets(self, texts: AnatomyTexts) -> torch.Tensor | None:
        """(B, B) soft targets for AFLoc's patient-level losses, or None (identity) when calibration is off.

        afloc_loss accepts soft targets only, so ``masked`` calibrates the patient level with soft targets too.
        """
        if self.config.false_negative == "none" or not self.config.patient_level:
            return None
        pairs = patient_pairs(texts.normal.all(dim=1), texts.patient_labels())
        return soft_targets(pairs)


def anatomy_extra_loss(
    aligner: AnatomyAligner, label_maps: Callable[[Any], torch.Tensor]
) -> Callable[[Any], dict[str, torch.Tensor]]:
    """The anatomy-level loss as a trainer ``extra_losses`` hook (``training.trainer.StepOutputs`` in).

    label_maps(out) must return this process's (b, *spatial) integer organ labels on the network
    input's grid (the image store holds none, so they come from the caller). The returned value,
    ``{"anatomy": config.weight x total}``, is added to the loss and logged as ``extra_anatomy``.
    """

    def anatomy(out: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401 (StepOutputs)
        texts = aligner.texts(out.batch.texts)
        maps = label_maps(out).to(out.image.deep.device)
        return {"anatomy": aligner.config.weight * aligner.loss(out.model, out.image, maps, texts).total}

    return anatomy
