"""The AFLoc evaluation protocol: datasets with masks or boxes, models and baselines, metrics with CIs.

>>> from afloc_engine.evaluation import load_dataset, evaluate_localization, write_evaluation  # doctest: +SKIP
>>> data = load_dataset("../shared/data/covid-cxr", split="dev")                            # doctest: +SKIP
>>> result = evaluate_localization(afloc_engine.load_model("my-model"), data)               # doctest: +SKIP
>>> write_evaluation(result, "eval-out")  # evaluation.md, evaluation.json, cases_*.png      # doctest: +SKIP

Command line: ``afloc evaluate --model M --data DIR --split dev --out DIR [--specificity]`` (see
:mod:`afloc_engine.cli.evaluate`). Prompt specificity (does each prompt light up its own
finding?): :mod:`afloc_engine.evaluation.prompt_specificity`.
"""

from afloc_engine.evaluation.datasets import (
    Box,
    EvalDataset,
    MaskSource,
    Sample,
    Skip,
    finding_key,
    heldout_part,
    load_dataset,
    load_target,
    rasterize_boxes,
    read_chestx_det,
    read_covid,
    read_nih_bbox,
    read_nih_labels,
    read_rsna,
    read_tbx11k,
)
from afloc_engine.evaluation.predictors import (
    ConstantPredictor,
    FunctionPredictor,
    LungFieldPredictor,
    ModelPredictor,
    Prediction,
    Predictor,
    PriorPredictor,
    as_predictor,
    lung_prior,
)
from afloc_engine.evaluation.prompt_specificity import evaluate_specificity, specificity_markdown
from afloc_engine.evaluation.prompts import EvalPrompt, default_prompts, load_prompt_file
from afloc_engine.evaluation.report import skip_report, to_json, to_markdown, write_evaluation
from afloc_engine.evaluation.runner import evaluate_localization

__all__ = [
    "Box",
    "ConstantPredictor",
    "EvalDataset",
    "EvalPrompt",
    "FunctionPredictor",
    "LungFieldPredictor",
    "MaskSource",
    "ModelPredictor",
    "Prediction",
    "Predictor",
    "PriorPredictor",
    "Sample",
    "Skip",
    "as_predictor",
    "default_prompts",
    "evaluate_localization",
    "evaluate_specificity",
    "finding_key",
    "heldout_part",
    "load_dataset",
    "load_prompt_file",
    "load_target",
    "lung_prior",
    "rasterize_boxes",
    "read_chestx_det",
    "read_covid",
    "read_nih_bbox",
    "read_nih_labels",
    "read_rsna",
    "read_tbx11k",
    "skip_report",
    "specificity_markdown",
    "to_json",
    "to_markdown",
    "write_evaluation",
]
