"""Report text into sentences and words, as the reference does, minus its one-word-drop quirk.

Newlines become spaces; a report splits at numbered items ("1.", "2)") and at sentence ends
('.', '?', '!', ';'); words are ``\\w+`` runs, lower-cased, ASCII only (accents dropped: é -> e).
Unlike the reference, one-word sentences are kept, so the prompt "pneumothorax" is not empty.
"""

from __future__ import annotations

import random
import re
import unicodedata

_NUMBERED_ITEM = re.compile(r"(?:^|\s)\d+\s*[.)]\s+")
_SENTENCE_END = re.compile(r"[.?!;]+(?=\s|$)")
_WORD = re.compile(r"\w+")


def split_sentences(report: str, fold_accents: bool = True) -> list[list[str]]:
    """Split a report into sentences of words.

    ``fold_accents``: True (engine) turns accented letters into their ASCII letter (é -> e);
    False drops every non-ASCII character from the words, as the reference does (é -> nothing:
    "opacité" -> "opacit"), which converted reference models use.

    >>> split_sentences("1. No pneumothorax. Small left effusion.")
    [['no', 'pneumothorax'], ['small', 'left', 'effusion']]
    """
    text = report.replace("\r", " ").replace("\n", " ")
    if fold_accents:
        text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()  # é -> e
    sentences: list[list[str]] = []
    for item in _NUMBERED_ITEM.split(text):
        for sentence in _SENTENCE_END.split(item):
            words = _WORD.findall(sentence.lower())
            if not fold_accents:
                words = [w for w in (w.encode("ascii", "ignore").decode() for w in words) if w]
            if words:
                sentences.append(words)
    return sentences


def augment_report(sentences: list[list[str]], rng: random.Random, keep_fraction: float = 0.7) -> list[list[str]]:
    """Reference text augmentation: randomly sub-sample sentences (at least one) and shuffle them."""
    if not sentences:
        return sentences
    keep = max(1, round(len(sentences) * keep_fraction))
    chosen = rng.sample(sentences, k=min(keep, len(sentences)))
    rng.shuffle(chosen)
    return chosen
