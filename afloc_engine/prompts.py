"""Prompt presets and templates.

The 13 chest findings of the AFLoc paper (CheXpert's labels) plus ground-glass opacity; any free
sentence works as a prompt too ("Large right-sided pneumothorax").
"""

from __future__ import annotations

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

PRESETS: dict[str, tuple[str, ...]] = {"cxr": CXR_FINDINGS}


def preset_prompts(name: str) -> list[str]:
    """The template prompts of a preset, e.g. ``preset_prompts("cxr")``."""
    try:
        return [TEMPLATE.format(finding=f) for f in PRESETS[name]]
    except KeyError:
        raise PromptError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None


def finding_of(prompt: str) -> str:
    """The finding a prompt names: the template's blank, or the prompt itself."""
    text = prompt.strip().rstrip(".").strip()
    head = TEMPLATE.split("{")[0].lower()
    return text[len(head) :].strip() if text.lower().startswith(head) else text


def negative_prompt(prompt: str) -> str:
    """'Findings suggesting pneumothorax' -> 'No pneumothorax' (the zero-shot negative)."""
    finding = finding_of(prompt)
    return NEGATIVE_TEMPLATE.format(finding=finding[:1].lower() + finding[1:])


def validate_prompts(prompts: list[str] | tuple[str, ...] | str) -> list[str]:
    """Strip prompts; raise :class:`PromptError` for none, empty or over-long ones."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = [p.strip() for p in prompts]
    if not prompts:
        raise PromptError("no prompt given")
    for p in prompts:
        if not p or not any(ch.isalnum() for ch in p):
            raise PromptError("empty prompt (it has no words)")
        if len(p) > MAX_PROMPT_CHARS:
            raise PromptError(f"prompt is {len(p)} characters long; at most {MAX_PROMPT_CHARS} are allowed")
    return prompts
