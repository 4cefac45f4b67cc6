"""Datasets, augmentation, the global-batch sampler and the collate function.

Augmentation is seeded per sample from (seed, epoch, sample index), so a sample looks the same
whatever the number of processes or loader workers, and a resumed run sees exactly the images
and reports an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from afloc_engine.models.text_encoder import TextEncoder, TokenizedReports, tokenize_reports
from afloc_engine.text import augment_report, split_sentences
from training.config import TrainAugmentConfig
from training.store import Store


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one sample of one epoch (independent streams per sample)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class ImageAugment:
    """MONAI augmentation of a letterboxed uint8 (S, S) image -> (1, size, size) float in [0, 1].

    Random resized crop (area fraction ``crop_scale``, aspect 3/4..4/3; MONAI SpatialCrop + Resize),
    then a small random affine (rotation, translation, scale) and random gamma / intensity shift.
    """

    def __init__(self, config: TrainAugmentConfig, size: int) -> None:
        from monai.data import set_track_meta
        from monai.transforms import Compose, RandAdjustContrast, RandAffine, RandShiftIntensity

        set_track_meta(False)
        self.config, self.size = config, size
        t = config.translate * size
        self.random = Compose(
            [
                RandAffine(
                    prob=1.0,
                    rotate_range=(math.radians(config.rotate_deg),),
                    translate_range=(t, t),
                    scale_range=(config.scale, config.scale),
                    padding_mode="zeros",
                ),
                RandAdjustContrast(prob=0.5, gamma=config.contrast_gamma),
                RandShiftIntensity(offsets=config.intensity_shift, prob=0.5),
            ]
        )

    def crop_box(self, side: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a random resized crop of an S x S image."""
        low, high = self.config.crop_scale
        for _ in range(10):
            area = side * side * rng.uniform(low, high)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            h, w = round(math.sqrt(area / ratio)), round(math.sqrt(area * ratio))
            if 0 < h <= side and 0 < w <= side:
                return int(rng.integers(0, side - h + 1)), int(rng.integers(0, side - w + 1)), h, w
        return 0, 0, side, side

    def __call__(self, image: np.ndarray, seed: int) -> torch.Tensor:
        from monai.transforms import Resize, SpatialCrop

        rng = np.random.default_rng(seed)
        x = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255.0).unsqueeze(0)
        top, left, h, w = self.crop_box(x.shape[-1], rng)
        x = SpatialCrop(roi_start=(top, left), roi_end=(top + h, left + w))(x)
        x = Resize((self.size, self.size), mode="area" if h >= self.size else "bilinear")(x)
        self.random.set_random_state(seed=int(rng.integers(0, 2**31 - 1)))
        x = self.random(x)
        return torch.as_tensor(x).float().clamp_(0.0, 1.0)


def resize_plain(image: np.ndarray, size: int) -> torch.Tensor:
    """Letterboxed uint8 (S, S) -> (1, size, size) float in [0, 1] (validation: no augmentation)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255.0)[None, None]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0].clamp_(0.0, 1.0)


class Sample(NamedTuple):
    """One item: image (C, S, S) normalised, report as sentences of words, the raw text, store index."""

    image: torch.Tensor
    report: list[list[str]]
    text: str
    index: int


class PairDataset(torch.utils.data.Dataset):
    """Pairs of a :class:`Store` (a subset given by ``indices``), augmented per sample and epoch."""

    def __init__(
        self,
        store: Store,
        indices: list[int],
        image_size: int,
        mean: float = 0.5,
        std: float = 0.5,
        channels: int = 1,
        augment: TrainAugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.store, self.indices = store, list(indices)
        self.image_size, self.mean, self.std, self.channels = image_size, mean, std, channels
        self.augment = augment
        self.image_augment = ImageAugment(augment, image_size) if augment is not None and augment.image else None
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Augmentation of the coming epoch (seeded by epoch and sample)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sample:
        index = self.indices[i]
        seed = sample_seed(self.seed, self.epoch, index)
        pixels = self.store.image(index)
        x = self.image_augment(pixels, seed) if self.image_augment else resize_plain(pixels, self.image_size)
        x = (x - self.mean) / self.std
        if self.channels == 3:
            x = x.expand(3, -1, -1).contiguous()
        record = self.store.records[index]
        sentences = split_sentences(record.text)
        if self.augment is not None and self.augment.text:
            sentences = augment_report(sentences, random.Random(seed), self.augment.keep_fraction)
        return Sample(x, sentences, record.text, index)


def tokens_to(tokens: TokenizedReports, device: torch.device) -> TokenizedReports:
    """Move token tensors to ``device`` but keep the (B,) counts on the CPU: the text encoder reads
    their maximum with ``int()``, which on a GPU tensor would stall the host once per batch."""
    non_blocking = device.type == "cuda"
    return TokenizedReports(
        tokens.input_ids.to(device, non_blocking=non_blocking),
        tokens.attention_mask.to(device, non_blocking=non_blocking),
        tokens.word_index.to(device, non_blocking=non_blocking),
        tokens.sentence_index.to(device, non_blocking=non_blocking),
        tokens.n_words.cpu(),
        tokens.n_sentences.cpu(),
    )


class Batch(NamedTuple):
    """A collated batch: images (B, C, S, S), tokens, the report texts, dataset indices (B,)."""

    images: torch.Tensor
    tokens: TokenizedReports
    texts: list[str]
    indices: torch.Tensor


class Collate:
    """Stacks images and tokenises the (augmented) reports with the model's tokenizer (picklable)."""

    def __init__(self, text_encoder: TextEncoder) -> None:
        text_encoder.load_transformer()
        self.tokenizer, self.config = text_encoder.tokenizer, text_encoder.config

    def tokenize(self, reports: list) -> TokenizedReports:
        """Reports (strings or sentences of words) -> TokenizedReports (CPU)."""
        return tokenize_reports(self.tokenizer, self.config, reports)  # the engine's tokenisation, not a copy

    def __call__(self, samples: list[Sample]) -> Batch:
        return Batch(
            torch.stack([s.image for s in samples]),
            self.tokenize([s.report for s in samples]),
            [s.text for s in samples],
            torch.tensor([s.index for s in samples], dtype=torch.long),
        )


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Per-epoch shuffled global batches; rank r gets the r-th contiguous slice of each.

    Concatenating the slices of all ranks in rank order gives exactly the batch one process would
    draw, so N processes see the same global batches as one (the basis of exact DDP parity).
    ``start_step`` skips the first batches of the epoch (an exact mid-epoch resume).
    """

    def __init__(
        self,
        size: int,
        global_batch: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
        self.size, self.global_batch, self.rank, self.world = size, global_batch, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Order of ``epoch``, starting at global batch ``start_step``."""
        self.epoch, self.start_step = epoch, start_step

    def steps_per_epoch(self) -> int:
        """Full global batches per epoch (the last partial batch is dropped)."""
        return self.size // self.global_batch

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch() - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        local = self.global_batch // self.world
        for step in range(self.start_step, self.steps_per_epoch()):
            start = step * self.global_batch + self.rank * local
            yield order[start : start + local]
