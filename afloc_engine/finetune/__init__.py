"""Few-shot fine-tuning: a few user-drawn masks -> an :class:`Adapter` that corrects the zero-shot heatmaps.

>>> import afloc_engine
>>> model = afloc_engine.load_model("default")                                   # doctest: +SKIP
>>> adapter = afloc_engine.finetune(model, [("a.png", "a_mask.png")], "ground glass opacity",
...                                 out_dir="adapters", epochs=50)               # doctest: +SKIP
>>> model.localize("b.png", "Findings suggesting ground glass opacity", adapter=adapter)  # doctest: +SKIP
>>> adapter = afloc_engine.load_adapter("adapters/ground_glass_opacity-20250101-120000", model)  # doctest: +SKIP

``afloc_engine.finetune`` is both this package and a function: importing the package replaces the
lazy function of ``afloc_engine/__init__.py`` by the package, so the package itself is callable
(``afloc_engine.finetune(model, examples, finding)`` works before and after the import).
"""

import sys
import types
from typing import Any

from afloc_engine.finetune.adapter import (
    Adapter,
    AdapterConfig,
    adapter_components,
    create_adapter,
    default_prompt,
    load_adapter,
    localize_with_adapter,
)
from afloc_engine.finetune.config import FinetuneConfig
from afloc_engine.finetune.data import Example, FinetuneAugmentConfig, check_mask, parse_examples
from afloc_engine.finetune.head import AdapterHead, HeadConfig
from afloc_engine.finetune.train import FinetuneCancelled, finetune

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdapterHead",
    "Example",
    "FinetuneAugmentConfig",
    "FinetuneCancelled",
    "FinetuneConfig",
    "HeadConfig",
    "check_mask",
    "create_adapter",
    "default_prompt",
    "finetune",
    "load_adapter",
    "adapter_components",
    "localize_with_adapter",
    "parse_examples",
]


class _CallablePackage(types.ModuleType):
    """This package, callable as :func:`finetune`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Adapter:  # noqa: ANN401
        return finetune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
