"""Geometry and features shared by training and inference, so both see the same head inputs.

The head works on the letterboxed canvas (S x S, the network input) at resolution R = S / stride.
Zero-shot heatmaps and masks live on the image's own grid; they are letterboxed onto the canvas
and area-averaged to R. The head's correction goes back with the exact inverse of the letterbox.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from afloc_engine.errors import ConfigError
from afloc_engine.models.image_encoder import ImageFeatures, MonaiResNetBackbone
from afloc_engine.transforms import Letterbox


def to_head_grid(canvas: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, C, S, S) canvas maps -> (B, C, R, R) by area averaging (identity when R == S)."""
    if canvas.shape[-1] == resolution:
        return canvas
    return F.interpolate(canvas, size=(resolution, resolution), mode="area")


def image_maps_to_head(maps: torch.Tensor, box: Letterbox, resolution: int) -> torch.Tensor:
    """(F, H, W) maps on the image grid (heatmaps, masks) -> (F, R, R) on the head grid (padding = 0)."""
    return to_head_grid(box.apply(maps.float()).unsqueeze(0), resolution)[0]


def valid_on_head(box: Letterbox, resolution: int, device: torch.device | None = None) -> torch.Tensor:
    """(R, R) fraction of each head cell that lies on the image (not on the letterbox padding)."""
    canvas = torch.zeros(1, 1, box.size, box.size, device=device)
    canvas[..., box.top : box.top + box.resized_height, box.left : box.left + box.resized_width] = 1.0
    return to_head_grid(canvas, resolution)[0, 0]


def image_channel(prepared: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, C, S, S) normalised network input -> (B, 1, R, R) grey image for the head."""
    return to_head_grid(prepared.float().mean(dim=1, keepdim=True), resolution)


def correction_to_image(delta: torch.Tensor, box: Letterbox) -> torch.Tensor:
    """(F, R, R) head output -> (F, H, W) on the image grid (bilinear to the canvas, letterbox undone)."""
    canvas = F.interpolate(delta.unsqueeze(0).float(), size=(box.size, box.size), mode="bilinear", align_corners=False)
    return box.invert(canvas[0])


class TunedStage(nn.Module):
    """A trainable copy of the encoder's last local stage (ResNet layer3 + deep projection).

    Takes the frozen stride-8 features (B, C8, g8, g8) and gives deep features (B, D, g16, g16).
    The base model's modules are copied, never modified.
    """

    def __init__(self, layer3: nn.Module, deep_proj: nn.Module) -> None:
        super().__init__()
        self.layer3 = layer3
        self.deep_proj = deep_proj

    @classmethod
    def from_encoder(cls, image_encoder: nn.Module) -> TunedStage:
        backbone = image_encoder.backbone
        if not isinstance(backbone, MonaiResNetBackbone):
            raise ConfigError(
                f"unfreezing the last stage needs a ResNet backbone, not {type(backbone).__name__}; "
                "fine-tune with the encoder frozen"
            )
        stage = cls(copy.deepcopy(backbone.layer3), copy.deepcopy(image_encoder.deep_proj))
        for p in stage.parameters():
            p.requires_grad_(True)
        return stage

    def train(self, mode: bool = True) -> TunedStage:
        """Batch-norm statistics stay frozen (a handful of images cannot estimate them)."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, s8: torch.Tensor) -> torch.Tensor:
        return self.deep_proj(self.layer3(s8))


class EncoderTap:
    """Captures what the image encoder computes during a call (its input, features and stride-8 map)."""

    def __init__(self) -> None:
        self.inputs: torch.Tensor | None = None
        self.features: ImageFeatures | None = None
        self.s8: torch.Tensor | None = None


@contextmanager
def tap_encoder(image_encoder: nn.Module, want_s8: bool = False) -> Iterator[EncoderTap]:
    """Record the last call of ``image_encoder`` (and of its backbone's layer2 when ``want_s8``)."""
    tap = EncoderTap()

    def on_encoder(_module: nn.Module, args: tuple, output: ImageFeatures) -> None:
        tap.inputs, tap.features = args[0], output

    def on_layer2(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        tap.s8 = output

    handles = [image_encoder.register_forward_hook(on_encoder)]
    if want_s8:
        handles.append(image_encoder.backbone.layer2.register_forward_hook(on_layer2))
    try:
        yield tap
    finally:
        for h in handles:
            h.remove()


def encode(image_encoder: nn.Module, batch: torch.Tensor, want_s8: bool = False) -> EncoderTap:
    """Run the image encoder on a (B, C, S, S) batch and return what it computed (no gradients).

    On a GPU it runs in bfloat16 autocast, as :meth:`AFLoc.encode_images` does at inference.
    """
    cuda = batch.device.type == "cuda"
    with (
        torch.no_grad(),
        torch.autocast(device_type=batch.device.type, dtype=torch.bfloat16, enabled=cuda),
        tap_encoder(image_encoder, want_s8) as tap,
    ):
        image_encoder(batch)
    return tap
