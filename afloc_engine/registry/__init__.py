"""Named models: the ones shipped in the package, and the ones installed into a per-user cache.

One module per idea:

- :mod:`.manifest`: where models live (``afloc_home()``, the shipped ``weights/manifest.json``,
  the ``install.json`` records), :func:`resolve_model` (a name at load time) and :func:`list_models`;
- :mod:`.download`: ``https://`` downloads with their SHA-256 (:func:`download_file`, :func:`check_url`);
- :mod:`.archive`: unpacking a model archive safely, parsing a safetensors header;
- :mod:`.installer`: :func:`install`, :func:`remove`, :func:`pack`, :func:`shipped_entry`.

``resolve_model(name_or_path) -> (folder | None, expected sha256 of model.safetensors | None)``;
``(None, None)`` for the default means its weights are not shipped (an untrained stand-in is used).
Everything here is torch-free (the Slicer module lists models without the engine's torch). The paths
``manifest.PACKAGE_WEIGHTS`` and ``manifest.MANIFEST`` are read at call time: patch them there.
"""

from __future__ import annotations

from afloc_engine.registry import archive, download, installer, manifest
from afloc_engine.registry.archive import read_safetensors_header, validate_model_folder
from afloc_engine.registry.download import check_url, download_file, sha256_file
from afloc_engine.registry.installer import install, pack, remove, shipped_entry
from afloc_engine.registry.manifest import (
    afloc_home,
    installed_models,
    list_models,
    models_dir,
    packaged_manifest,
    read_manifest,
    read_record,
    resolve_model,
    verify_installed,
)

list = list_models  # ``registry.list()`` reads as the CLI's ``afloc models list``
"""``registry.list()`` is :func:`list_models` (an alias; the builtin ``list`` is not used in this module)."""

__all__ = [
    "afloc_home",
    "archive",
    "download",
    "installer",
    "manifest",
    "check_url",
    "download_file",
    "install",
    "installed_models",
    "list",
    "list_models",
    "models_dir",
    "pack",
    "packaged_manifest",
    "read_manifest",
    "read_record",
    "read_safetensors_header",
    "remove",
    "resolve_model",
    "sha256_file",
    "shipped_entry",
    "validate_model_folder",
    "verify_installed",
]
