"""Evaluation prompts: finding -> prompts, each tagged with a kind (``simple`` / ``precise`` / ...).

A prompt file (JSON or YAML) maps a finding to a list of prompts, or to ``{kind: [prompts]}``::

    ground_glass_opacity:
      simple: [Findings suggesting ground glass opacity]
      precise: [Bilateral peripheral ground glass opacities]
    consolidation: [Findings suggesting consolidation, Patchy consolidation in the lower lobes]

In the list form a prompt of the paper's template ("Findings suggesting X") is ``simple`` and any
other phrasing ``precise``. Keys starting with ``_`` are comments. Finding names are matched
after :func:`~afloc_engine.evaluation.datasets.finding_key` (case, spaces and hyphens do not matter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from afloc_engine.errors import PromptError
from afloc_engine.evaluation.datasets import finding_key
from afloc_engine.prompts import TEMPLATE, validate_prompts

PRESET_FILE = Path(__file__).resolve().parents[1] / "presets" / "evaluation_prompts.json"


@dataclass(frozen=True)
class EvalPrompt:
    """One localisation prompt and its kind (``simple``, ``precise`` or a name from the prompt file)."""

    text: str
    kind: str


def prompt_kind(text: str) -> str:
    """``simple`` for the paper's template ("Findings suggesting X"), otherwise ``precise``."""
    head = TEMPLATE.split("{")[0].strip().lower()
    return "simple" if text.strip().lower().startswith(head) else "precise"


def parse_prompt_mapping(data: Any, source: str | Path | None = None) -> dict[str, list[EvalPrompt]]:  # noqa: ANN401
    """A decoded prompt file (see the module doc) -> finding key -> prompts. Raises :class:`PromptError`."""
    if not isinstance(data, dict) or not data:
        raise PromptError("a prompt file maps each finding to a list of prompts (or to {kind: [prompts]})", source)
    out: dict[str, list[EvalPrompt]] = {}
    for raw_key, value in data.items():
        if str(raw_key).startswith("_"):
            continue
        key = finding_key(str(raw_key))
        if not key:
            raise PromptError(f"finding name {raw_key!r} has no letters or digits", source)
        if isinstance(value, str):
            value = [value]
        prompts: list[EvalPrompt] = []
        if isinstance(value, dict):
            for kind, texts in value.items():
                texts = [texts] if isinstance(texts, str) else texts
                if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                    raise PromptError(f"{raw_key}.{kind}: expected a list of prompt strings", source)
                prompts += [EvalPrompt(t, str(kind)) for t in _valid(texts, source, f"{raw_key}.{kind}")]
        elif isinstance(value, list) and all(isinstance(t, str) for t in value):
            prompts = [EvalPrompt(t, prompt_kind(t)) for t in _valid(value, source, str(raw_key))]
        else:
            raise PromptError(f"{raw_key}: expected a list of prompt strings or {{kind: [prompts]}}", source)
        if not prompts:
            raise PromptError(f"{raw_key}: no prompt given", source)
        out.setdefault(key, [])
        out[key] += [p for p in prompts if p not in out[key]]
    if not out:
        raise PromptError("the prompt file names no finding", source)
    return out


def _valid(texts: list[str], source: str | Path | None, where: str) -> list[str]:
    try:
        return validate_prompts(texts) if texts else []
    except PromptError as err:
        raise PromptError(f"{where}: {err.problem}", source) from None


def load_prompt_file(path: str | Path) -> dict[str, list[EvalPrompt]]:
    """Read a JSON (``.json``) or YAML (anything else) prompt file -> finding key -> prompts."""
    path = Path(path)
    if not path.is_file():
        raise PromptError("prompt file not found", path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PromptError(f"cannot read prompt file: {err}", path) from None
    except Exception as err:  # yaml.YAMLError and its subclasses
        raise PromptError(f"cannot parse prompt file: {type(err).__name__}: {err}", path) from None
    return parse_prompt_mapping(data, path)


@lru_cache(maxsize=1)
def _presets() -> dict[str, list[EvalPrompt]]:
    return parse_prompt_mapping(json.loads(PRESET_FILE.read_text(encoding="utf-8")), PRESET_FILE)


def default_prompts(finding: str) -> list[EvalPrompt]:
    """The shipped prompts of a finding (simple template + precise phrasings); the template alone otherwise."""
    key = finding_key(finding)
    preset = _presets().get(key)
    if preset:
        return list(preset)
    return [EvalPrompt(TEMPLATE.format(finding=key.replace("_", " ")), "simple")]
