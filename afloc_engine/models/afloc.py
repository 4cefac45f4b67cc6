"""AFLocModel: the image encoder and the text encoder that the three losses align."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from afloc_engine.config import AFLocConfig
from afloc_engine.losses import AFLocLoss, AFLocLosses
from afloc_engine.models.image_encoder import ImageEncoder, ImageFeatures
from afloc_engine.models.text_encoder import TextEncoder, TextFeatures, TokenizedReports


class AFLocModel(nn.Module):
    """Image encoder + text encoder sharing an embedding of ``config.embed_dim``.

    ``lazy_text``: the text transformer is read on first use (see :class:`TextEncoder`).
    """

    def __init__(self, config: AFLocConfig, text_model_dir: str | Path | None = None, lazy_text: bool = False) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.text_encoder = TextEncoder(config, text_model_dir, lazy=lazy_text)

    def encode_images(self, images: torch.Tensor) -> ImageFeatures:
        """(B, C, H, W[, D]) normalised images -> :class:`ImageFeatures`."""
        return self.image_encoder(images)

    def encode_text(self, tokens: TokenizedReports) -> TextFeatures:
        return self.text_encoder(tokens)

    def loss(
        self,
        image_features: ImageFeatures,
        text_features: TextFeatures,
        targets: torch.Tensor | None = None,
        chunk_size: int | None = None,
    ) -> AFLocLosses:
        """The weighted AFLoc loss of a batch of matched pairs (see :func:`features_loss`)."""
        return features_loss(image_features, text_features, self.config, targets, chunk_size)

    def forward(self, images: torch.Tensor, tokens: TokenizedReports) -> AFLocLosses:
        return self.loss(self.encode_images(images), self.encode_text(tokens))


def features_loss(
    image: ImageFeatures,
    text: TextFeatures,
    config: AFLocConfig,
    targets: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> AFLocLosses:
    """:class:`afloc_engine.losses.AFLocLoss` of B matched pairs with ``config``'s temperatures, level
    weights and Z aggregation (default memory policy). targets: optional (B, B) false-negative calibration."""
    return AFLocLoss.from_config(config, chunk_size=chunk_size)(image, text, targets)
