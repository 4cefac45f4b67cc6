"""Prompt presets and templates.

The 13 chest findings of the AFLoc paper (CheXpert's labels) plus ground-glass opacity; any free
sentence works as a prompt too ("Large right-sided pneumothorax").
"""

from __future__ import annotations

import re
import unicodedata

from afloc_engine.errors import PromptError

TEMPLATE = "Findings suggesting {finding}"
NEGATIVE_TEMPLATE = "No {finding}"
MAX_PROMPT_CHARS = 500

CXR_FINDINGS: tuple[str, ...] = (
    "atelectasis",
    "cardiomegaly",
    "consolidation",
    "edema",
    "enlarged cardiomediastinum",
    "fracture",
    "lung lesion",
    "lung opacity",
    "pleural effusion",
    "pleural other",
    "pneumonia",
    "pneumothorax",
    "support devices",
    "ground glass opacity",
)

FUNDUS_FINDINGS: tuple[str, ...] = (
    "microaneurysms",
    "haemorrhages",
    "hard exudates",
    "cotton wool spots",
    "drusen",
    "neovascularisation",
    "optic disc cupping",
)
"""Retinal lesions graded on colour fundus photographs (diabetic retinopathy, AMD, glaucoma)."""

HISTOPATHOLOGY_FINDINGS: tuple[str, ...] = (
    "tumour cells",
    "necrosis",
    "lymphocytic infiltrate",
    "mitotic figures",
    "stroma",
    "mucin",
    "adipose tissue",
)
"""Tissue classes and lesions on H&E tiles."""

PRESETS: dict[str, tuple[str, ...]] = {
    "cxr": CXR_FINDINGS,
    "fundus": FUNDUS_FINDINGS,
    "histopathology": HISTOPATHOLOGY_FINDINGS,
}
"""Prompt presets by modality. The embedded default model knows chest radiographs only: the fundus and
histopathology presets are for 3-channel models trained on those images (``in_channels: 3``)."""


def preset_prompts(name: str) -> list[str]:
    """The template prompts of a preset, e.g. ``preset_prompts("cxr")``."""
    try:
        return [TEMPLATE.format(finding=f) for f in PRESETS[name]]
    except KeyError:
        raise PromptError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None


def clean_prompt(text: str) -> str:
    """A prompt as the engine uses and records it: line breaks, tabs and other control or separator
    characters become spaces, runs of spaces become one, the ends are stripped (Unicode NFC).

    >>> clean_prompt("Small left\\n\\tpleural  effusion ")
    'Small left pleural effusion'
    """
    text = unicodedata.normalize("NFC", str(text))
    text = "".join(" " if unicodedata.category(ch)[0] in "CZ" and ch not in _KEEP_FORMAT else ch for ch in text)
    return " ".join(text.split())


# zero-width joiners shape some scripts' words (Indic, emoji); every other control character goes
_KEEP_FORMAT = {"\u200c", "\u200d"}


def finding_of(prompt: str) -> str:
    """The finding a prompt names: the template's blank, or the prompt itself (cleaned, without a final '.')."""
    text = clean_prompt(prompt).rstrip(".").strip()
    head = TEMPLATE.split("{")[0].lower()
    return text[len(head) :].strip() if text.lower().startswith(head) else text


def finding_key(text: str) -> str:
    """What two names of one finding share: case, underscores and extra spaces do not count.

    'ground_glass_opacity', 'Ground glass  opacity' and 'Findings suggesting ground glass opacity'
    all give 'ground glass opacity'.
    """
    return " ".join(re.sub(r"[_\s]+", " ", finding_of(text)).casefold().split())


def same_finding(a: str, b: str) -> bool:
    """Whether two prompts or finding names name the same finding (:func:`finding_key`)."""
    return finding_key(a) == finding_key(b)


def merge_duplicates(prompts: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Prompts naming a finding an earlier prompt already names are dropped (the first wording wins).

    Returns (kept prompts in order, [(dropped prompt, the kept prompt it repeats), ...]).
    """
    kept: dict[str, str] = {}
    dropped: list[tuple[str, str]] = []
    for p in prompts:
        key = finding_key(p)
        if key in kept:
            dropped.append((p, kept[key]))
        else:
            kept[key] = p
    return list(kept.values()), dropped


def negative_prompt(prompt: str) -> str:
    """'Findings suggesting pneumothorax' -> 'No pneumothorax' (the zero-shot negative)."""
    finding = finding_of(prompt)
    return NEGATIVE_TEMPLATE.format(finding=finding[:1].lower() + finding[1:])


def validate_prompts(prompts: list[str] | tuple[str, ...] | str) -> list[str]:
    """Clean prompts (:func:`clean_prompt`); raise :class:`PromptError` for none, empty or over-long ones."""
    if isinstance(prompts, str):
        prompts = [prompts]
    original = list(prompts)
    prompts = [clean_prompt(p) for p in prompts]
    if not prompts:
        raise PromptError("no prompt given")
    for given, p in zip(original, prompts):
        if not p or not any(ch.isalnum() for ch in p):
            raise PromptError(f"empty prompt {given!r} (it has no words)")
        if len(p) > MAX_PROMPT_CHARS:
            raise PromptError(f"prompt is {len(p)} characters long; at most {MAX_PROMPT_CHARS} are allowed")
    return prompts
