"""Prompt inference: an image and text prompts in, heatmaps, masks and probabilities out.

>>> model = load_model("default")                                    # doctest: +SKIP
>>> r = model.localize("chest.dcm", ["Findings suggesting pneumothorax"])  # doctest: +SKIP
>>> r.heatmaps.shape  # (P, H, W) float32 in [-1, 1], on the input's own pixel grid  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from afloc_engine.checkpoint import ModelInfo, load_model_folder
from afloc_engine.config import AFLocConfig
from afloc_engine.heatmap import grid_to_image, similarity_maps
from afloc_engine.io import ImageData, read_image
from afloc_engine.models import AFLocModel
from afloc_engine.models.text_encoder import report_key
from afloc_engine.prompts import negative_prompt, validate_prompts
from afloc_engine.results import LocalizationResult, VolumeResult
from afloc_engine.transforms import Letterbox, prepare_image, prepare_image_reference

if TYPE_CHECKING:
    from afloc_engine.prompt_table import PromptTable

log = logging.getLogger(__name__)

ImageInput = str | Path | np.ndarray | ImageData

UNTRAINED_WARNING = (
    "UNTRAINED MODEL: the default model's weights are random; heatmaps and probabilities mean nothing. "
    "Install a trained model (afloc models install) or pass a trained model folder."
)


class UntrainedModelWarning(UserWarning):
    """A model whose weights are untrained (random) was loaded; its outputs mean nothing.

    Its own category, so a test suite can silence it for its tiny test models
    (``filterwarnings = ignore::afloc_engine.inference.UntrainedModelWarning``).
    """


def untrained_warning(name: str = "default", folder: str | Path | None = None) -> str:
    """The loud line for an untrained model, naming that model (the shipped default's own text for it)."""
    if folder is None and name == "default":
        return UNTRAINED_WARNING
    where = f" ({folder})" if folder is not None else ""
    return f"UNTRAINED MODEL: {name!r}{where} says its weights are untrained; heatmaps and probabilities mean nothing."


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU. Raises ValueError for an unavailable GPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is available (use --device cpu)")
    return torch.device(device)


def as_image(image: ImageInput) -> ImageData:
    """A path, an array ((H, W), (H, W, 3) or (Z, Y, X)) or :class:`ImageData` -> :class:`ImageData`."""
    if isinstance(image, ImageData):
        return image
    if isinstance(image, (str, Path)):
        return read_image(image)
    return ImageData.from_array(np.asarray(image))


class AFLoc:
    """A loaded AFLoc model ready for prompt inference (the object :func:`load_model` returns)."""

    def __init__(
        self,
        model: AFLocModel,
        info: ModelInfo,
        device: str | torch.device = "auto",
        prompt_table: PromptTable | None = None,
    ) -> None:
        """``prompt_table``: the model folder's (:func:`afloc_engine.prompt_table.read_prompt_table`); its
        embeddings fill the prompt cache (none from a table that was ignored)."""
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self._channels_last = self.device.type == "cuda" and model.config.spatial_dims == 2
        if self._channels_last:
            self.model.image_encoder.to(memory_format=torch.channels_last)
        self.info = info
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self.prompt_table = prompt_table
        if prompt_table is not None:
            self.add_prompt_embeddings(prompt_table.embeddings_by_prompt())

    @property
    def config(self) -> AFLocConfig:
        return self.model.config

    @property
    def model_id(self) -> str:
        return self.info.model_id

    # --- text --------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(P, D) report embeddings of the prompts, cached by their words (:func:`report_key`: case,
        punctuation and spacing do not count); the text model loads on the first prompt not cached."""
        keys = [report_key(self.config, p) for p in prompts]
        todo = {k: p for k, p in zip(keys, prompts) if k not in self._prompt_cache}
        if todo:
            feats = self.model.text_encoder.encode(list(todo.values()))
            for k, emb in zip(todo, feats.report.float().cpu()):
                self._prompt_cache[k] = emb
        return torch.stack([self._prompt_cache[k] for k in keys]).to(self.device)

    def has_prompt_embedding(self, prompt: str) -> bool:
        """Whether ``prompt``'s embedding is cached (from the model's prompt table or an earlier run)."""
        return report_key(self.config, prompt) in self._prompt_cache

    def add_prompt_embeddings(self, embeddings: dict[str, torch.Tensor]) -> None:
        """Cache known (D,) report embeddings by prompt (a model's prompt table).

        Raises ValueError for an embedding that is not a finite vector of ``embed_dim`` values.
        """
        for prompt, embedding in embeddings.items():
            if tuple(embedding.shape) != (self.config.embed_dim,) or not bool(torch.isfinite(embedding).all()):
                raise ValueError(f"embedding of {prompt!r} is not {self.config.embed_dim} finite values")
            self._prompt_cache[report_key(self.config, prompt)] = embedding.float().cpu()

    # --- images ------------------------------------------------------------------------------
    def prepare(self, image: ImageData) -> tuple[torch.Tensor, Letterbox]:
        """(C, S, S) network input and the letterbox of one 2D image."""
        c = self.config
        if c.letterbox_resize == "area-uint8":  # with intensity_scaling "uint8" (AFLocConfig checks)
            return prepare_image_reference(image.array, c.image_size, c.intensity_mean, c.intensity_std, c.in_channels)
        rgb = image.rgb if image.rgb is not None and image.rgb.ndim == 3 else None
        return prepare_image(
            image.array, c.image_size, image.window, c.intensity_mean, c.intensity_std, c.in_channels, rgb=rgb
        )

    @torch.inference_mode()
    def encode_images(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, S, S) prepared images -> deep local (B, D, g, g) and global (B, D) features.

        On a GPU engine models run in bf16 autocast; converted reference models in float32, as the reference.
        """
        batch = batch.to(self.device)
        if self._channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        bf16 = self.device.type == "cuda" and self.config.inference_mode == "engine"
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=bf16):
            feats = self.model.encode_images(batch)
        return feats.deep.float(), feats.global_.float()

    def probabilities(self, global_features: torch.Tensor, prompts: list[str], negatives: list[str]) -> torch.Tensor:
        """(B, P) P(positive) = softmax over [positive, negative] of scale * similarity(global, prompt).

        Engine models: cosine similarity, scale tau3. Converted reference models: the dot product
        and scale 1 (the reference's zero-shot head: prompt embeddings as a bias-free linear layer).
        """
        c = self.config
        pos, neg, g = self.embed_prompts(prompts), self.embed_prompts(negatives), global_features
        if c.probability_similarity == "cosine":
            pos = torch.nn.functional.normalize(pos, dim=-1)
            neg = torch.nn.functional.normalize(neg, dim=-1)
            g = torch.nn.functional.normalize(g, dim=-1)
        scale = c.tau3 if c.probability_scale is None else c.probability_scale
        logits = torch.stack([g @ pos.t(), g @ neg.t()], dim=-1) * scale
        return torch.softmax(logits, dim=-1)[..., 0]

    # --- the public call ---------------------------------------------------------------------
    def localize(
        self,
        image: ImageInput,
        prompts: list[str] | str,
        threshold: float | None = None,
        similarity: str | None = None,
        negative_prompts: list[str] | None = None,
        adapter: object | None = None,
    ) -> LocalizationResult:
        """Heatmaps, masks and probabilities for ``prompts`` on one 2D image.

        Args:
            image: a file path, an (H, W) / (H, W, 3) array, or :class:`ImageData`.
            prompts: prompt sentences ("Findings suggesting pneumothorax", or free text).
            threshold: mask threshold on the [-1, 1] heatmap (default: the model's, 0.3).
            similarity: ``cosine`` or ``dot`` (default: the model's).
            negative_prompts: negatives for the probabilities (default: "No {finding}").
            adapter: a fine-tuned :class:`afloc_engine.finetune.Adapter` (or its folder): prompts naming
                its finding get its corrected heatmaps; an adapter of another base model is refused.
        """
        return self.localize_batch([image], prompts, threshold, similarity, negative_prompts, adapter)[0]

    def localize_batch(
        self,
        images: list[ImageInput],
        prompts: list[str] | str,
        threshold: float | None = None,
        similarity: str | None = None,
        negative_prompts: list[str] | None = None,
        adapter: object | None = None,
    ) -> list[LocalizationResult]:
        """:meth:`localize` for several 2D images in one network batch."""
        if adapter is not None:
            from afloc_engine.finetune import localize_with_adapter

            return localize_with_adapter(self, adapter, images, prompts, threshold, similarity, negative_prompts)
        prompts = validate_prompts(prompts)
        negatives = validate_prompts(negative_prompts) if negative_prompts else [negative_prompt(p) for p in prompts]
        if len(negatives) != len(prompts):
            raise ValueError("give one negative prompt per prompt")
        threshold = self.config.threshold if threshold is None else float(threshold)
        datas = [as_image(i) for i in images]
        for d in datas:
            if d.is_volume:
                raise ValueError("localize_batch takes 2D images; use localize_volume for 3D volumes")
        prepared = [self.prepare(d) for d in datas]
        deep, glob = self.encode_images(torch.stack([p[0] for p in prepared]))
        with torch.inference_mode():
            grids = similarity_maps(deep, self.embed_prompts(prompts), similarity or self.config.similarity)
            probs = self.probabilities(glob, prompts, negatives).cpu().numpy().astype(np.float32)
            results = []
            for i, (data, (_, box)) in enumerate(zip(datas, prepared)):
                c = self.config
                heat = grid_to_image(grids[i], box, c.smoothing_sigma, c.smoothing_mode, c.heatmap_range).cpu().numpy()
                results.append(
                    LocalizationResult(
                        list(prompts),
                        heat,
                        heat > threshold,
                        probs[i],
                        threshold,
                        data,
                        self.model_id,
                        self.info.trained,
                        negatives,
                    )
                )
        return results

    def localize_volume(
        self,
        image: ImageInput,
        prompts: list[str] | str,
        threshold: float | None = None,
        axis: int = 0,
        normalization: str = "volume",
        batch_size: int = 16,
        **options: Any,  # noqa: ANN401 (similarity, negative_prompts, window, progress: see volume.localize_volume)
    ) -> VolumeResult:
        """Heatmaps (P, Z, Y, X), masks and probabilities on a 3D volume (:func:`afloc_engine.volume.localize_volume`).

        A 2D model runs slice by slice along ``axis`` (batches of ``batch_size``); a 3D model runs once.
        ``normalization``: ``volume`` (min-max over the whole volume) or ``slice``.
        """
        from afloc_engine.volume import localize_volume

        return localize_volume(self, image, prompts, threshold, axis, normalization, batch_size, **options)


def load_model(name_or_path: str | Path = "default", device: str | torch.device = "auto") -> AFLoc:
    """Load a model by name (``default``; an installed model) or model folder.

    The default model ships inside the package. If its weights are absent, a randomly
    initialised model is returned with a loud warning; ``result.trained`` is then False.
    The folder's prompt table (:mod:`afloc_engine.prompt_table`) fills the prompt cache; the text
    transformer is read only when a prompt outside it is first encoded.
    """
    from afloc_engine.prompt_table import read_prompt_table, text_model_identity
    from afloc_engine.registry import models_dir, resolve_model

    folder, expected_sha = resolve_model(str(name_or_path))
    if folder is None:
        warnings.warn(UNTRAINED_WARNING, UntrainedModelWarning, stacklevel=2)
        log.warning(UNTRAINED_WARNING)
        return AFLoc(untrained_default(), ModelInfo(name="default", version="untrained", trained=False), device)
    model, info = load_model_folder(folder, expected_sha, lazy_text=True)
    if str(name_or_path) == folder.name and folder.parent == models_dir():
        info.name = folder.name  # installed under its own --name: model_id (results, adapters) says that name
    if not info.trained:
        warnings.warn(untrained_warning(info.name, folder), UntrainedModelWarning, stacklevel=2)
    identity = text_model_identity(model.config.text_model, info)
    return AFLoc(model, info, device, read_prompt_table(folder, info.sha256, identity, model.config.embed_dim))


def untrained_default(config: AFLocConfig | None = None, seed: int = 0) -> AFLocModel:
    """The default architecture with seeded random weights (stand-in until a trained model is installed)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return AFLocModel(config or AFLocConfig()).eval()
    finally:
        torch.random.set_rng_state(generator_state)
