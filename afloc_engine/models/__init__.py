"""AFLoc networks: image encoder, text encoder, and the model that holds both."""

from afloc_engine.models.afloc import AFLocModel
from afloc_engine.models.image_encoder import ImageEncoder, ImageFeatures
from afloc_engine.models.text_encoder import TextEncoder, TextFeatures, TokenizedReports, resolve_text_model

__all__ = [
    "AFLocModel",
    "ImageEncoder",
    "ImageFeatures",
    "TextEncoder",
    "TextFeatures",
    "TokenizedReports",
    "resolve_text_model",
]
