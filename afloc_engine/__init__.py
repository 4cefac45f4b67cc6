"""afloc_engine: AFLoc annotation-free pathology localisation from text prompts.

>>> import afloc_engine
>>> model = afloc_engine.load_model("default")          # doctest: +SKIP
>>> result = model.localize("chest.dcm", ["Findings suggesting pneumothorax"])  # doctest: +SKIP
>>> result.heatmaps.shape, result.masks.dtype, result.probabilities  # doctest: +SKIP
"""

from afloc_engine.config import AFLocConfig
from afloc_engine.errors import AFLocError, CheckpointError, ConfigError, DataError, ImageReadError, PromptError

__version__ = "0.1.0"


def load_model(name_or_path: str = "default", device: str = "auto"):  # noqa: ANN201 (lazy import keeps `import afloc_engine` light)
    """Load a model by name (``default``, an installed model) or folder; see :mod:`afloc_engine.inference`."""
    from afloc_engine.inference import load_model as _load_model

    return _load_model(name_or_path, device)


def finetune(model, examples, finding, **options):  # noqa: ANN001, ANN003, ANN201 (lazy import, see afloc_engine.finetune)
    """Few-shot fine-tuning on (image, mask) pairs -> an Adapter; see :func:`afloc_engine.finetune.finetune`."""
    from afloc_engine.finetune import finetune as _finetune

    return _finetune(model, examples, finding, **options)


def load_adapter(path, model=None):  # noqa: ANN001, ANN201 (lazy import, see afloc_engine.finetune)
    """Read an adapter folder (checked against ``model`` when given); see :func:`afloc_engine.finetune.load_adapter`."""
    from afloc_engine.finetune import load_adapter as _load_adapter

    return _load_adapter(path, model)


__all__ = [
    "AFLocConfig",
    "AFLocError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ImageReadError",
    "PromptError",
    "finetune",
    "load_adapter",
    "load_model",
    "__version__",
]
