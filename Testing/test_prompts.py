"""Prompts as users type them: pasted report text (line breaks, tabs), any script, repeated findings,
and finding names that differ only in case, underscores and spaces."""

from __future__ import annotations

import pytest

from afloc_engine.errors import PromptError
from afloc_engine.outputs import segment_name
from afloc_engine.prompts import (
    clean_prompt,
    finding_key,
    finding_of,
    merge_duplicates,
    preset_prompts,
    same_finding,
    validate_prompts,
)


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("Small left\npleural effusion", "Small left pleural effusion"),
        ("  Large\r\n\tright  pneumothorax \u2028", "Large right pneumothorax"),
        ("edema\x00\x1b[31m", "edema [31m"),
        ("Pleural effusion (≥ 2 cm)", "Pleural effusion (≥ 2 cm)"),
        ("e\u0301panchement pleural", "épanchement pleural"),  # decomposed é -> one character (NFC)
    ],
)
def test_prompts_are_cleaned_to_one_line(raw, clean):
    assert clean_prompt(raw) == clean
    assert validate_prompts([raw]) == [clean]


def test_prompt_without_words_is_refused():
    with pytest.raises(PromptError, match="empty prompt"):
        validate_prompts(["\n\t \x00"])


def test_refused_prompt_is_named_among_several():
    with pytest.raises(PromptError, match="'≥ !!'"):
        validate_prompts(["pleural effusion", "≥ !!"])


def test_finding_names_match_regardless_of_case_underscores_and_spaces():
    assert finding_key("ground_glass_opacity") == "ground glass opacity"
    assert same_finding("ground_glass_opacity", "Findings suggesting  Ground glass\nopacity.")
    assert same_finding("GROUND GLASS OPACITY", "ground  glass_opacity")
    assert not same_finding("ground glass opacity", "ground-glass opacity")  # hyphens are part of a name
    assert not same_finding("pleural effusion", "pleural other")
    assert finding_of("Findings suggesting\n pneumothorax.") == "pneumothorax"


def test_repeated_findings_are_merged_first_wording_kept():
    prompts = ["Findings suggesting pneumothorax", "Small left effusion", *preset_prompts("cxr"), "PNEUMOTHORAX"]
    kept, dropped = merge_duplicates(prompts)
    assert len(kept) == 15  # the user's two + 13 other preset findings
    assert kept[:2] == ["Findings suggesting pneumothorax", "Small left effusion"]
    assert dropped == [
        ("Findings suggesting pneumothorax", "Findings suggesting pneumothorax"),
        ("PNEUMOTHORAX", "Findings suggesting pneumothorax"),
    ]
    assert len({finding_key(p) for p in kept}) == len(kept)


@pytest.mark.parametrize(
    "prompt, name",
    [
        ("Findings suggesting pneumothorax", "pneumothorax"),
        ("Pleural effusion (≥ 2 cm)", "Pleural effusion (>= 2 cm)"),
        ("épanchement pleural", "epanchement pleural"),
        ("Small left\n\tpleural effusion", "Small left pleural effusion"),
    ],
)
def test_segment_names_are_printable_ascii(prompt, name):
    assert segment_name(prompt) == name


def test_segment_name_of_another_script_is_readable_ascii():
    name = segment_name("胸腔积液")
    assert name and name.isascii() and name.isprintable()
    assert name != segment_name("气胸")  # different findings keep different names


def test_adapter_of_a_finding_accepts_its_prompt_in_any_spelling(tiny_afloc):
    """An adapter fine-tuned with ``--finding ground_glass_opacity`` applies to 'ground glass opacity'."""
    from afloc_engine.finetune import adapter as adapters

    adapter = adapters.create_adapter(tiny_afloc, "ground_glass_opacity")
    prompts = ["ground glass opacity", "Findings suggesting Ground  Glass_Opacity", "edema"]
    assert adapter.match(prompts) == [0, 0, None]
    assert adapters._meta_matches({"findings": ["ground_glass_opacity"], "prompts": []}, ["Ground glass opacity"])


def test_overlay_titles_are_ascii_the_built_in_font_can_draw():
    """Pillow's built-in font has no accented letters (a fresh user saw '□panchement pleural')."""
    from afloc_engine.outputs import _title

    assert _title("Findings suggesting pneumothorax") == "Findings suggesting pneumothorax"
    for prompt in ("épanchement pleural", "Pneumothorax (≥ 2 cm)", "胸腔积液"):
        assert _title(prompt).isascii() and _title(prompt).strip(), prompt
    assert _title("épanchement pleural") == "epanchement pleural"
