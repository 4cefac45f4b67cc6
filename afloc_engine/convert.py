"""Import a reference AFLoc checkpoint (PyTorch Lightning, github YH0517/AFLoc) as an engine model folder.

The reference checkpoint holds ``state_dict`` (and ``hyper_parameters``, an OmegaConf object).
Its keys keep what follows their last ``afloc.``:

=========================================== ==========================================
reference key                               engine key
=========================================== ==========================================
``img_encoder.model.<torchvision ResNet>``  ``image_encoder.backbone.<same name>``
``img_encoder.local2_embedder.weight``      ``image_encoder.shallow_proj.weight`` (layer2, 512 ch)
``img_encoder.local_embedder.weight``       ``image_encoder.deep_proj.weight`` (layer3, 1024 ch)
``img_encoder.global_embedder.{weight,bias}`` ``image_encoder.global_proj.{weight,bias}``
``text_encoder.model.<BERT>``               ``text_encoder.transformer.<same name>``
(none: the reference has no text projection) ``text_encoder.projection``: identity, zero bias
=========================================== ==========================================

MONAI's ResNet (:class:`afloc_engine.models.image_encoder.MonaiResNetBackbone`, built with
``conv1_t_stride=2``, shortcut type B without bias) uses torchvision's parameter names and
layout (7x7/2 stem, 3x3/2 max-pool, stride in the bottleneck's 3x3 conv, 1x1 conv + BN
downsample), so the backbone tensors map name for name. The reference feeds RGB copies of a
grey image, so a 1-channel engine model gets the stem's kernels summed over RGB (exactly equal
on grey input). ``embeddings.position_ids`` (a buffer old transformers saved),
``num_batches_tracked``, a torchvision ``fc`` head and the ``use_ce_loss`` variant's
``img_encoder.local_f_embedder.weight`` (training only; named in the output's meta) are dropped.

Settings (token length, BERT layers summed, temperatures, loss weights, normalisation) come
from ``hyper_parameters`` (:func:`reference_settings`; the released values where absent), and
variants whose inference the engine does not reproduce are refused in one sentence. The output
runs the reference's inference (:data:`afloc_engine.config.REFERENCE_INFERENCE`) and keeps its
own copy of the text model in ``text_model/`` (see ``docs/convert-reference.md``).

Loading never runs code from the file: ``torch.load(weights_only=True)`` first; if the
checkpoint's ``hyper_parameters`` make that refuse, it is read again with an unpickler that
resolves only the globals torch's weights-only loader allows and turns every other global
(OmegaConf classes, or anything hostile) into an inert placeholder that is never called; the
configuration is read from the placeholders' pickled state (``_content`` / ``_val``).
"""

from __future__ import annotations

import logging
import pickle
import shutil
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from afloc_engine.config import REFERENCE_INFERENCE, AFLocConfig
from afloc_engine.errors import CheckpointError

log = logging.getLogger(__name__)

IMG = "img_encoder."
TXT = "text_encoder.model."
BACKBONE = "img_encoder.model."
PROJECTIONS = {
    "image_encoder.shallow_proj.weight": "img_encoder.local2_embedder.weight",
    "image_encoder.deep_proj.weight": "img_encoder.local_embedder.weight",
    "image_encoder.global_proj.weight": "img_encoder.global_embedder.weight",
    "image_encoder.global_proj.bias": "img_encoder.global_embedder.bias",
}
RESNET_LAYOUTS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152, (3, 24, 36, 3): 200}
"""Bottleneck blocks per stage -> ResNet depth (torchvision / MONAI agree)."""
UNUSED_AT_INFERENCE = {"img_encoder.local_f_embedder.weight": "use_ce_loss's projection of layer4 (training only)"}
"""Reference tensors a variant adds that inference never uses: dropped, and named in the model's meta."""
IGNORED_SUFFIXES = ("num_batches_tracked",)
IGNORED_KEYS = {"text_encoder.model.embeddings.position_ids", "text_encoder.model.embeddings.token_type_ids"}


@dataclass
class ReferenceCheckpoint:
    """The tensors of a reference checkpoint (keys after their last ``afloc.``) and what was skipped.

    state: name -> tensor; placeholders: globals of the file that were replaced by inert
    placeholders (not loaded); extra: plain top-level entries other than ``state_dict`` (epoch, ...);
    hyper: the training configuration (``hyper_parameters``) as plain dicts, lists and values.
    """

    state: dict[str, torch.Tensor]
    placeholders: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    hyper: dict[str, Any] = field(default_factory=dict)
    """``hyper_parameters`` as plain values (OmegaConf containers unwrapped from their pickled state;
    anything else that is not a plain value becomes None). Empty when the file has none."""


# --- reading the file without running code from it --------------------------------------------------
class _Inert:
    """Stands in for a global the checkpoint names but that is not allowed: built from its data, never run."""

    qualified_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:  # noqa: ANN401
        self.state = state

    def __repr__(self) -> str:
        return f"<not loaded: {self.qualified_name}>"


def _allowed_globals() -> dict[str, Any]:
    """Globals a checkpoint may really resolve: the ones torch's weights-only unpickler allows."""
    allowed: dict[str, Any] = {
        "collections.OrderedDict": __import__("collections").OrderedDict,
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        "torch.Size": torch.Size,
    }
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed.update(_get_allowed_globals())
    except (ImportError, AttributeError):  # pragma: no cover (older/newer torch: the minimal set above)
        pass
    return allowed


def _restricted_pickle_module(placeholders: list[str]) -> types.ModuleType:
    """A ``pickle``-like module whose Unpickler resolves only allowed globals; others become :class:`_Inert`."""
    allowed = _allowed_globals()
    made: dict[str, type] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:  # noqa: ANN401
            qualified = f"{module}.{name}"
            if qualified in allowed:
                return allowed[qualified]
            if qualified not in made:
                made[qualified] = type("Inert", (_Inert,), {"qualified_name": qualified})
                placeholders.append(qualified)
            return made[qualified]

    def load(file: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        return Unpickler(file, **kwargs).load()

    module = types.ModuleType("afloc_restricted_pickle")
    module.Unpickler = Unpickler  # type: ignore[attr-defined]
    module.load = load  # type: ignore[attr-defined]
    module.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    return module


def load_reference_checkpoint(path: str | Path) -> ReferenceCheckpoint:
    """Read the tensors of a reference AFLoc checkpoint (Lightning ``.ckpt`` or a bare state dict).

    Tries ``torch.load(weights_only=True)``; if that refuses (the OmegaConf ``hyper_parameters``),
    reads the file again resolving only torch's allow-listed globals, with inert placeholders for
    the rest, so nothing from the file is ever executed. Raises :class:`CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint file not found", path)
    if path.stat().st_size == 0:
        raise CheckpointError("checkpoint file is empty (0 bytes)", path)
    if _is_torchscript(path):
        raise CheckpointError("this is a TorchScript archive, not a Lightning checkpoint", path)
    _check_torch_file(path)
    placeholders: list[str] = []
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first:
        log.info("%s: weights-only load refused (%s); reading the state dict only", path, str(first)[:200])
        try:
            obj = torch.load(
                path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module(placeholders)
            )
        except Exception as err:  # a corrupt pickle raises assorted types
            raise CheckpointError(
                f"cannot read the checkpoint (corrupt, or not a PyTorch checkpoint): {type(err).__name__}: {err}", path
            ) from None
    except RuntimeError as err:
        raise CheckpointError(f"cannot read the checkpoint (truncated or not a torch file?): {err}", path) from None
    except Exception as err:  # torch raises assorted types for broken files
        raise CheckpointError(f"cannot read the checkpoint: {type(err).__name__}: {err}", path) from None

    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        raw, extra = obj["state_dict"], {k: v for k, v in obj.items() if k not in ("state_dict", "hyper_parameters")}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raw, extra = obj, {}
    else:
        raise CheckpointError("no 'state_dict' in the checkpoint (not a Lightning checkpoint or state dict)", path)
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"state_dict entry {key!r} is not a tensor", path)
        short = key.rsplit("afloc.", 1)[-1]
        if short in state:
            raise CheckpointError(f"two keys map to {short!r} (one is {key!r})", path)
        state[short] = value
    plain_extra = {k: v for k, v in extra.items() if isinstance(v, (int, float, str, bool))}
    hyper = _plain(obj.get("hyper_parameters")) if isinstance(obj, dict) and "state_dict" in obj else None
    return ReferenceCheckpoint(state, placeholders, plain_extra, hyper if isinstance(hyper, dict) else {})


def _check_torch_file(path: Path) -> None:
    """Refuse, in one line, a file that is neither torch's zip format nor a legacy pickle."""
    with path.open("rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK") or head[:1] == b"\x80":  # zip archive (torch >= 1.6) or pickle protocol >= 2
        return
    raise CheckpointError(
        f"not a PyTorch checkpoint (starts with bytes {head.hex()}; expected a zip archive or a pickle)", path
    )


def _plain(value: Any, depth: int = 0) -> Any:  # noqa: ANN401
    """A pickled configuration as plain Python: dicts, lists, str/int/float/bool/None.

    OmegaConf containers and nodes were read as inert placeholders holding their pickled state:
    a ``DictConfig``/``ListConfig`` keeps its children in ``_content``, a value node its value in
    ``_val``. Any other placeholder (never executed) becomes None.
    """
    if depth > 50:
        return None
    if isinstance(value, _Inert):
        state = value.state
        if isinstance(state, tuple) and state and isinstance(state[0], dict):  # (state, slotstate)
            state = state[0]
        if not isinstance(state, dict):
            state = {}
        for key in ("_content", "_val"):
            if key in state:
                return _plain(state[key], depth + 1)
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return None


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


# --- settings from hyper_parameters ----------------------------------------------------------------
FALLBACK_SETTINGS: dict[str, Any] = {
    "text_max_length": 97,
    "text_last_layers": 4,
    "text_layer_pooling": "sum",
    "tau1": 4.0,
    "tau2": 5.0,
    "tau3": 10.0,
    "weight_word": 1.0,
    "weight_sentence": 1.0,
    "weight_global": 1.0,
    "intensity_mean": 0.5,
    "intensity_std": 0.5,
}
"""The reference's released configuration (``config.yaml``), used where a checkpoint has no ``hyper_parameters``."""


def _get(tree: dict[str, Any], dotted: str) -> Any:  # noqa: ANN401
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def reference_settings(hyper: dict[str, Any], source: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Engine settings from the reference's ``hyper_parameters`` (its OmegaConf ``cfg``), fallbacks otherwise.

    Returns (AFLocConfig changes, notes for the model's meta: the reference values read, e.g. its
    ``bert_type``). Raises :class:`CheckpointError` with one sentence for each variant whose
    inference the engine does not reproduce (text pooling other than the released one, normalised
    embeddings, a DenseNet image encoder, ImageNet normalisation, ...).
    """
    changes = dict(FALLBACK_SETTINGS)
    notes: dict[str, Any] = {}

    def refuse(setting: str, value: Any, why: str) -> None:  # noqa: ANN401
        message = f"hyper_parameters {setting} = {value!r}: {why}; the converter cannot reproduce it"
        raise CheckpointError(message, source)

    phase = _get(hyper, "phase")
    if phase is not None and str(phase).lower() != "pretrain":
        refuse("phase", phase, "only the reference's pre-training model (phase 'pretrain') is an AFLoc model")
    name = _get(hyper, "model.vision.model_name")
    if name is not None:
        notes["model_name"] = name
        if not str(name).replace("_", "").lower().startswith("resnet"):
            refuse("model.vision.model_name", name, "only ResNet image encoders are supported")
    layers = _get(hyper, "model.text.last_n_layers")
    if layers is not None:
        if not isinstance(layers, int) or layers < 2:
            refuse("model.text.last_n_layers", layers, "with one layer the reference uses BERT's pooler output")
        changes["text_last_layers"] = layers
    aggregate = _get(hyper, "model.text.aggregate_method")
    if aggregate is not None and aggregate != "sum":
        refuse("model.text.aggregate_method", aggregate, "only 'sum' (pieces and layers summed) is supported")
    if _get(hyper, "model.text.agg_tokens") is False:
        refuse("model.text.agg_tokens", False, "the report embedding then averages the padding tokens' states")
    for key in ("model.text.norm", "model.norm"):
        if _get(hyper, key) is True:
            refuse(key, True, "L2-normalised text embeddings are not supported")
    word_num = _get(hyper, "data.text.word_num")
    if word_num is not None:
        if not isinstance(word_num, int) or word_num < 4:
            refuse("data.text.word_num", word_num, "the token length must be an integer >= 4")
        changes["text_max_length"] = word_num
    for i in (1, 2, 3):
        temp = _get(hyper, f"model.afloc.temp{i}")
        if temp is not None:
            if not isinstance(temp, (int, float)) or isinstance(temp, bool) or not temp > 0:
                refuse(f"model.afloc.temp{i}", temp, "a temperature must be a positive number")
            changes[f"tau{i}"] = float(temp)
    for level, flag in (("word", "local_word"), ("sentence", "local_sent"), ("global", "global_report")):
        weight = _get(hyper, f"model.afloc.{flag}_loss_weight")
        if isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight >= 0:
            changes[f"weight_{level}"] = float(weight)
        if _get(hyper, f"model.afloc.use_{flag}_loss") is False:
            changes[f"weight_{level}"] = 0.0
    norm = _get(hyper, "transforms.norm")
    if isinstance(_get(hyper, "transforms"), dict) and "norm" in hyper["transforms"]:
        if norm is None:
            changes["intensity_mean"], changes["intensity_std"] = 0.0, 1.0
        elif norm != "half":
            refuse("transforms.norm", norm, "only 'half' (mean = std = 0.5) or none is supported for grey input")
    for key in ("model.text.bert_type", "model.afloc.use_ce_loss", "model.text.embedding_dim"):
        value = _get(hyper, key)
        if value is not None:
            notes[key.rsplit(".", 1)[-1]] = value
    return changes, notes


# --- mapping ----------------------------------------------------------------------------------------
def infer_reference_config(
    state: dict[str, torch.Tensor],
    text_model: str | Path | None,
    in_channels: int,
    source: Path,
    hyper: dict[str, Any] | None = None,
) -> AFLocConfig:
    """The engine configuration matching a reference state dict (ResNet depth, D, text model).

    Settings come from ``hyper`` (the checkpoint's ``hyper_parameters``, see
    :func:`reference_settings`) where present, the released configuration otherwise; inference
    follows the reference (:data:`afloc_engine.config.REFERENCE_INFERENCE`).
    """
    blocks = []
    for stage in range(1, 5):
        prefix = f"{BACKBONE}layer{stage}."
        indices = {int(k[len(prefix) :].split(".", 1)[0]) for k in state if k.startswith(prefix)}
        blocks.append(max(indices) + 1 if indices else 0)
    depth = RESNET_LAYOUTS.get(tuple(blocks))
    if depth is None or f"{BACKBONE}layer1.0.conv3.weight" not in state:
        raise CheckpointError(
            f"image encoder is not a torchvision ResNet-50/101/152/200 (blocks per stage {tuple(blocks)}; "
            f"expected keys such as '{BACKBONE}layer1.0.conv3.weight')",
            source,
        )
    for engine_key, ref_key in PROJECTIONS.items():
        if ref_key not in state:
            why = " (trained with use_local_word_loss off? no shallow projection)" if "local2" in ref_key else ""
            raise CheckpointError(f"missing key {ref_key!r} (needed for {engine_key!r}){why}", source)
    dims = {state[k].shape[0] for k in PROJECTIONS.values() if k.endswith("weight")}
    if len(dims) != 1:
        raise CheckpointError(f"the three image embedders project to different widths {sorted(dims)}", source)
    embed_dim = dims.pop()
    word_key = f"{TXT}embeddings.word_embeddings.weight"
    if word_key not in state:
        raise CheckpointError(f"missing key {word_key!r} (the BERT text encoder)", source)
    width = state[word_key].shape[1]
    if width != embed_dim:
        raise CheckpointError(
            f"the image embedders project to {embed_dim} but the text encoder is {width} wide; "
            "the reference has no text projection, so they must agree",
            source,
        )
    settings, _ = reference_settings(hyper or {}, source)
    changes: dict[str, Any] = dict(
        backbone=f"resnet{depth}",
        in_channels=in_channels,
        embed_dim=embed_dim,
        image_size=224,
        encoder_input_size=299,
        conv1_stride=2,
        **settings,
        **REFERENCE_INFERENCE,
    )
    if text_model is not None:
        changes["text_model"] = str(Path(text_model).expanduser().resolve())
    return AFLocConfig(**changes)


def reference_key(engine_key: str) -> str | None:
    """The reference key an engine key is read from (None for the text projection, which is made)."""
    if engine_key.startswith("image_encoder.backbone."):
        return BACKBONE + engine_key[len("image_encoder.backbone.") :]
    if engine_key in PROJECTIONS:
        return PROJECTIONS[engine_key]
    if engine_key.startswith("text_encoder.transformer."):
        return TXT + engine_key[len("text_encoder.transformer.") :]
    return None


def map_reference_state(
    state: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], source: Path
) -> dict[str, torch.Tensor]:
    """Reference tensors -> engine tensors for every key of ``targets`` (the engine's state dict).

    Raises :class:`CheckpointError` naming the first missing reference key, the first reference
    key that belongs nowhere, or the first tensor whose shape does not fit.
    """
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for engine_key, target in targets.items():
        if engine_key.endswith(IGNORED_SUFFIXES):
            continue
        if engine_key == "text_encoder.projection.weight":
            out[engine_key] = torch.eye(target.shape[0], target.shape[1], dtype=target.dtype)
            continue
        if engine_key == "text_encoder.projection.bias":
            out[engine_key] = torch.zeros_like(target)
            continue
        ref = reference_key(engine_key)
        if ref is None:
            raise CheckpointError(f"no reference tensor for the engine's {engine_key!r}", source)
        if ref not in state:
            raise CheckpointError(f"missing key {ref!r} (needed for the engine's {engine_key!r})", source)
        value = state[ref]
        used.add(ref)
        if engine_key == "image_encoder.backbone.conv1.weight" and value.shape[1] != target.shape[1]:
            if value.shape[1] == 3 and target.shape[1] == 1:
                value = value.sum(dim=1, keepdim=True)  # R = G = B for a grey image: sum the RGB kernels
            elif value.shape[1] == 1 and target.shape[1] == 3:
                value = value.repeat(1, 3, 1, 1) / 3.0
        if tuple(value.shape) != tuple(target.shape):
            hint = " (give --text-model the BERT folder the checkpoint was trained with)" if ref.startswith(TXT) else ""
            raise CheckpointError(
                f"key {ref!r} has shape {tuple(value.shape)}, the engine's {engine_key!r} needs "
                f"{tuple(target.shape)}{hint}",
                source,
            )
        out[engine_key] = value.to(target.dtype).contiguous()
    leftover = sorted(
        k
        for k in state
        if k not in used
        and k not in IGNORED_KEYS
        and not k.endswith(IGNORED_SUFFIXES)
        and not k.startswith(f"{BACKBONE}fc.")
        and k not in UNUSED_AT_INFERENCE
    )
    if leftover:
        raise CheckpointError(
            f"unexpected key {leftover[0]!r} ({len(leftover)} not part of the reference AFLoc layout)", source
        )
    return out


TEXT_MODEL_FOLDER = "text_model"
"""Where the converted folder keeps its own copy of the text model (recorded relative in config.json)."""


def convert_reference(
    checkpoint: str | Path,
    out: str | Path,
    text_model: str | Path | None = None,
    in_channels: int = 1,
    name: str = "afloc-reference",
    version: str = "reference",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a reference AFLoc checkpoint into the engine model folder ``out``; returns ``out``.

    ``out`` is self-contained: ``config.json`` (settings from the checkpoint's ``hyper_parameters``,
    inference ``reference``), ``model.safetensors`` (every weight, the text transformer's included)
    and ``text_model/`` (the text model's tokenizer files, its ``config.json`` and the checkpoint's
    transformer weights as ``model.safetensors``), recorded as the relative path ``text_model``,
    so the folder still loads after it is moved. Written to a temporary folder renamed into place.

    Args:
        checkpoint: the Lightning ``.ckpt`` (or a bare state dict) of the reference code.
        out: the model folder to write.
        text_model: a Hugging Face folder of the reference's text encoder (e.g. Bio_ClinicalBERT)
            holding its tokenizer (``tokenizer.json``, or ``vocab.txt`` + ``tokenizer_config.json``),
            its ``config.json`` and weights (``model.safetensors`` or ``pytorch_model.bin``; they are
            replaced by the checkpoint's, but transformers needs them to build the model).
            Default: the engine's default text model (fits only if the shapes agree).
        in_channels: 1 (grey, the stem's RGB kernels summed) or 3.
        dtype: store floating tensors of ``model.safetensors`` in this dtype (e.g. ``torch.float16``).

    Raises :class:`CheckpointError` (one line naming the file) for unreadable or foreign files,
    missing, unexpected or mis-shaped tensors and unsupported ``hyper_parameters`` variants.
    """
    from afloc_engine.checkpoint import ModelInfo, apply_state, atomic_folder, commit_folder, save_model, sha256_file
    from afloc_engine.models import AFLocModel

    checkpoint = Path(checkpoint)
    ref = load_reference_checkpoint(checkpoint)
    _, notes = reference_settings(ref.hyper, checkpoint)
    config = infer_reference_config(ref.state, text_model, in_channels, checkpoint, ref.hyper)
    model = AFLocModel(config, None if text_model is None else Path(text_model).expanduser())
    targets = {k: v for k, v in model.state_dict().items() if not k.endswith(IGNORED_SUFFIXES)}
    mapped = map_reference_state(ref.state, targets, checkpoint)
    apply_state(model, mapped, include_text=True, source=checkpoint)
    dropped = sorted(k for k in UNUSED_AT_INFERENCE if k in ref.state)
    source_text = str(model.text_encoder.model_dir)
    model.config = config.replace(text_model=TEXT_MODEL_FOLDER)
    info = ModelInfo(
        name=name,
        version=version,
        trained=True,
        description=f"reference AFLoc checkpoint {checkpoint.name} converted by afloc convert-reference",
        extra={
            "converted_from": checkpoint.name,
            "source_sha256": sha256_file(checkpoint),
            "not_loaded": ref.placeholders,
            "dropped_unused": {k: UNUSED_AT_INFERENCE[k] for k in dropped},
            "text_model_source": Path(source_text).name,
            "hyper_parameters_read": bool(ref.hyper),
            **{f"reference_{k}": v for k, v in notes.items()},
            **{f"reference_{k}": v for k, v in ref.extra.items()},
        },
    )
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError("already exists; refusing to overwrite it (--overwrite replaces it)", out)
    staging = atomic_folder(out)
    try:
        inner = save_model(model.eval(), staging / "model", info, include_text_transformer=True, dtype=dtype)
        text_dir = inner / TEXT_MODEL_FOLDER
        model.text_encoder.tokenizer.save_pretrained(str(text_dir))
        model.text_encoder.transformer.save_pretrained(str(text_dir), safe_serialization=True)
        commit_folder(inner, out, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
