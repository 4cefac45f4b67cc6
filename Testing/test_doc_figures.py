"""Every figure the docs quote equals the number in the committed result file it came from.

``FIGURES`` is the registry: (page, a piece of the page's text holding the figure, the figure as written,
result file, key path, scale). The piece must occur in the page (so a figure edited in the text without
its file, or the other way round, fails here), and the figure must equal ``value * scale`` rounded to the
figure's own decimals. A page quoting a new figure adds a row; a re-run benchmark that moves a figure
fails this test until the page is updated.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

EVAL = "docs/results/default_dev/evaluation.json"
GGO = "results/default/findings/ground_glass_opacity/kinds/simple"
CONST = "results/constant/findings/ground_glass_opacity/kinds/all"
PRIOR = "results/prior/findings/ground_glass_opacity/kinds/all"
BACKBONES = "docs/results/backbones_stage1/evaluation.json"
EFF = "results/model/findings/ground_glass_opacity/kinds/simple"
RES = "results/model_2/findings/ground_glass_opacity/kinds/simple"
ENGINE_CPU = "benchmarks/results/engine_cpu.json"
ENGINE_GPU = "docs/results/engine_gpu.json"
VOL_DEF = "docs/results/volume_gpu_default.json"
VOL_RES = "docs/results/volume_gpu_resnet50.json"
MANIFEST = "afloc_engine/weights/manifest.json"
CONFIG = "afloc_engine/weights/default/config.json"
CALIB = "benchmarks/results/threshold_calibration.json"
R = "README.md"
ROW_SIMPLE = "| **0.252** [0.205, 0.303] | 0.368 [0.309, 0.427] | **1.217** [1.122, 1.324] | 0.518 |"
ROW_PRECISE = "| 0.226 [0.182, 0.272] | 0.338 [0.282, 0.394] | 1.080 [0.982, 1.191] | 0.438 |"
GGO_PRECISE = "results/default/findings/ground_glass_opacity/kinds/precise"
RES_MD = "docs/results.md"
CARD = "afloc_engine/weights/default/MODEL_CARD.md"
SLICER = "docs/slicer.md"
WARM = "benchmarks/results/slicer_warm-vm.json"

# (page, text around the figure, the figure, result file, key path, scale)
FIGURES: list[tuple[str, str, str, str, str, float]] = [
    # the default model on covid-cxr dev (afloc evaluate)
    (R, "| **0.252** [0.205, 0.303] |", "0.252", EVAL, f"{GGO}/iou/mean", 1),
    (R, "| **0.252** [0.205, 0.303] |", "0.205", EVAL, f"{GGO}/iou/ci/0", 1),
    (R, "| **0.252** [0.205, 0.303] |", "0.303", EVAL, f"{GGO}/iou/ci/1", 1),
    (R, "| **1.22** [1.12, 1.32] | 0.52 |", "1.22", EVAL, f"{GGO}/cnr/mean", 1),
    (R, "| **1.22** [1.12, 1.32] | 0.52 |", "1.12", EVAL, f"{GGO}/cnr/ci/0", 1),
    (R, "| **1.22** [1.12, 1.32] | 0.52 |", "1.32", EVAL, f"{GGO}/cnr/ci/1", 1),
    (R, "| **1.22** [1.12, 1.32] | 0.52 |", "0.52", EVAL, f"{GGO}/pointing/mean", 1),
    (R, "| 0.165 [0.134, 0.198] | 0.96 [0.84, 1.08] | 0.37 |", "0.165", EVAL, f"{PRIOR}/iou/mean", 1),
    (R, "| 0.165 [0.134, 0.198] | 0.96 [0.84, 1.08] | 0.37 |", "0.134", EVAL, f"{PRIOR}/iou/ci/0", 1),
    (R, "| 0.165 [0.134, 0.198] | 0.96 [0.84, 1.08] | 0.37 |", "0.198", EVAL, f"{PRIOR}/iou/ci/1", 1),
    (R, "| 0.165 [0.134, 0.198] | 0.96 [0.84, 1.08] | 0.37 |", "0.96", EVAL, f"{PRIOR}/cnr/mean", 1),
    (R, "| 0.165 [0.134, 0.198] | 0.96 [0.84, 1.08] | 0.37 |", "0.84", EVAL, f"{PRIOR}/cnr/ci/0", 1),
    (R, "| 0.165 [0.134, 0.198] | 0.96 [0.84, 1.08] | 0.37 |", "1.08", EVAL, f"{PRIOR}/cnr/ci/1", 1),
    (R, "| 0.165 [0.134, 0.198] | 0.96 [0.84, 1.08] | 0.37 |", "0.37", EVAL, f"{PRIOR}/pointing/mean", 1),
    (R, "| 0.118 [0.094, 0.144] | 0 | 0.12 |", "0.118", EVAL, f"{CONST}/iou/mean", 1),
    (R, "| 0.118 [0.094, 0.144] | 0 | 0.12 |", "0.094", EVAL, f"{CONST}/iou/ci/0", 1),
    (R, "| 0.118 [0.094, 0.144] | 0 | 0.12 |", "0.144", EVAL, f"{CONST}/iou/ci/1", 1),
    (R, "| 0.118 [0.094, 0.144] | 0 | 0.12 |", "0", EVAL, f"{CONST}/cnr/mean", 1),
    (R, "| 0.118 [0.094, 0.144] | 0 | 0.12 |", "0.12", EVAL, f"{CONST}/pointing/mean", 1),
    # docs/slicer.md: warm engine vs one process per click (benchmarks/slicer_warm.py)
    (SLICER, "took **0.85 s warm** (the engine\n0.60 s;", "0.85", WARM, "warm/second/seconds", 1),
    (SLICER, "took **0.85 s warm** (the engine\n0.60 s;", "0.60", WARM, "warm/second/engine_seconds", 1),
    (SLICER, "against **20.8 s** on the cold path", "20.8", WARM, "cold/second/seconds", 1),
    (SLICER, "took 0.84 to 1.21 s (median 0.85 s)", "0.85", WARM, "warm/later_clicks_median_seconds", 1),
    (SLICER, "which starts the engine and loads the model, 11.1 s.", "11.1", WARM, "warm/first/seconds", 1),
    (SLICER, "(load average 5.5 to 6.1 during the run)", "5.5", WARM, "machine/load_average_start/0", 1),
    (SLICER, "(load average 5.5 to 6.1 during the run)", "6.1", WARM, "machine/load_average_end/0", 1),
    (SLICER, "2 CPU\ncores (AMD EPYC)", "2", WARM, "machine/cpu_cores", 1),
    # docs/results.md §1, the default model's ground-glass rows (afloc evaluate)
    (RES_MD, ROW_SIMPLE, "0.252", EVAL, f"{GGO}/iou/mean", 1),
    (RES_MD, ROW_SIMPLE, "0.205", EVAL, f"{GGO}/iou/ci/0", 1),
    (RES_MD, ROW_SIMPLE, "0.303", EVAL, f"{GGO}/iou/ci/1", 1),
    (RES_MD, ROW_SIMPLE, "0.368", EVAL, f"{GGO}/dice/mean", 1),
    (RES_MD, ROW_SIMPLE, "0.309", EVAL, f"{GGO}/dice/ci/0", 1),
    (RES_MD, ROW_SIMPLE, "0.427", EVAL, f"{GGO}/dice/ci/1", 1),
    (RES_MD, ROW_SIMPLE, "1.217", EVAL, f"{GGO}/cnr/mean", 1),
    (RES_MD, ROW_SIMPLE, "1.122", EVAL, f"{GGO}/cnr/ci/0", 1),
    (RES_MD, ROW_SIMPLE, "1.324", EVAL, f"{GGO}/cnr/ci/1", 1),
    (RES_MD, ROW_SIMPLE, "0.518", EVAL, f"{GGO}/pointing/mean", 1),
    (RES_MD, ROW_PRECISE, "0.226", EVAL, f"{GGO_PRECISE}/iou/mean", 1),
    (RES_MD, ROW_PRECISE, "0.182", EVAL, f"{GGO_PRECISE}/iou/ci/0", 1),
    (RES_MD, ROW_PRECISE, "0.272", EVAL, f"{GGO_PRECISE}/iou/ci/1", 1),
    (RES_MD, ROW_PRECISE, "0.338", EVAL, f"{GGO_PRECISE}/dice/mean", 1),
    (RES_MD, ROW_PRECISE, "0.282", EVAL, f"{GGO_PRECISE}/dice/ci/0", 1),
    (RES_MD, ROW_PRECISE, "0.394", EVAL, f"{GGO_PRECISE}/dice/ci/1", 1),
    (RES_MD, ROW_PRECISE, "1.080", EVAL, f"{GGO_PRECISE}/cnr/mean", 1),
    (RES_MD, ROW_PRECISE, "0.982", EVAL, f"{GGO_PRECISE}/cnr/ci/0", 1),
    (RES_MD, ROW_PRECISE, "1.191", EVAL, f"{GGO_PRECISE}/cnr/ci/1", 1),
    (RES_MD, ROW_PRECISE, "0.438", EVAL, f"{GGO_PRECISE}/pointing/mean", 1),
    (RES_MD, "| 0.28 [0.18, 0.39] (2 negatives only", "0.28", EVAL, f"{GGO}/auroc/value", 1),
    (RES_MD, "| 0.28 [0.18, 0.39] (2 negatives only", "0.18", EVAL, f"{GGO}/auroc/ci/0", 1),
    (RES_MD, "| 0.28 [0.18, 0.39] (2 negatives only", "0.39", EVAL, f"{GGO}/auroc/ci/1", 1),
    (RES_MD, "| 0.28 [0.18, 0.39] (2 negatives only", "2", EVAL, f"{GGO}/auroc/n_negative", 1),
    (CARD, "ground-glass AUROC on dev, 0.28 [0.18, 0.39], rests on 2", "0.28", EVAL, f"{GGO}/auroc/value", 1),
    # ResNet-50 vs EfficientNet-Lite0 (scripts/compare_backbones.sh)
    (R, "same IoU (0.205 vs 0.209)", "0.205", BACKBONES, f"{RES}/iou/mean", 1),
    (R, "same IoU (0.205 vs 0.209)", "0.209", BACKBONES, f"{EFF}/iou/mean", 1),
    (R, "CNR (1.08 vs 1.17)", "1.08", BACKBONES, f"{RES}/cnr/mean", 1),
    (R, "CNR (1.08 vs 1.17)", "1.17", BACKBONES, f"{EFF}/cnr/mean", 1),
    (R, "(34 % vs 57 %;", "34", BACKBONES, f"{RES}/pointing/mean", 100),
    (R, "(34 % vs 57 %;", "57", BACKBONES, f"{EFF}/pointing/mean", 100),
    # the shipped model's mask threshold (scripts/calibrate_threshold.py wrote it into config.json)
    (R, "(heatmap > 0.64, the default model's threshold,", "0.64", CONFIG, "model/threshold", 1),
    (R, "(heatmap > 0.64, the default model's threshold,", "0.64", CALIB, "recommended", 1),
    (R, "the model's own, 0.64 for the default model", "0.64", CONFIG, "model/threshold", 1),
    ("docs/architecture.md", "0.64 for the shipped model", "0.64", CONFIG, "model/threshold", 1),
    # the shipped weights
    (R, "fp16 safetensors, 7.8 MB;", "7.8", MANIFEST, "models/0/size", 1e-6),
    # engine benchmark on the CPU (benchmarks/engine.py)
    (R, "**3.7× / 7.8× / 7.9× faster**", "3.7", ENGINE_CPU, "loss/0/speedup", 1),
    (R, "**3.7× / 7.8× / 7.9× faster**", "7.8", ENGINE_CPU, "loss/1/speedup", 1),
    (R, "**3.7× / 7.8× / 7.9× faster**", "7.9", ENGINE_CPU, "loss/2/speedup", 1),
    (R, "max difference 4.8e-07", "4.8e-07", ENGINE_CPU, "loss/0/max_abs_diff", 1),
    (R, "2 cores of an AMD EPYC (23.5 GiB)", "2", ENGINE_CPU, "machine/cpu_cores", 1),
    (R, "2 cores of an AMD EPYC (23.5 GiB)", "23.5", ENGINE_CPU, "machine/memory_gib", 1),
    (R, "load average 3.2 at the end", "3.2", ENGINE_CPU, "machine/load_average_end/0", 1),
    (R, "| 0.85 s / 2.22 s on that shared machine |", "0.85", ENGINE_CPU, "cold_start/import_s", 1),
    (R, "| 0.85 s / 2.22 s on that shared machine |", "2.22", ENGINE_CPU, "cold_start/load_s", 1),
    (R, "| 0.13 s / 0.17 s on that shared machine |", "0.13", ENGINE_CPU, "cold_start/localize_13_prompts_s", 1),
    (R, "| 0.13 s / 0.17 s on that shared machine |", "0.17", ENGINE_CPU, "cold_start/localize_13_new_prompts_s", 1),
    (R, "| **1006 MB** |", "1006", ENGINE_CPU, "cold_start/peak_rss_mb", 1),
    # engine benchmark on the H100
    (R, "**12269** radiographs/s", "12269", ENGINE_GPU, "gpu_batch/0/radiographs_per_s", 1),
    (R, "**5815**/s with the ResNet-50", "5815", ENGINE_GPU, "gpu_batch/1/radiographs_per_s", 1),
    (R, "**8.0× / 12.6× / 10.0× faster**", "8.0", ENGINE_GPU, "loss/0/speedup", 1),
    (R, "**8.0× / 12.6× / 10.0× faster**", "12.6", ENGINE_GPU, "loss/1/speedup", 1),
    (R, "**8.0× / 12.6× / 10.0× faster**", "10.0", ENGINE_GPU, "loss/2/speedup", 1),
    # volumes on the H100 (benchmarks/volume_localize.py)
    (R, "| **0.36 s** | 1.11 s | 1245 / 1997 |", "0.36", VOL_DEF, "results/0/median_s", 1),
    (R, "| **0.36 s** | 1.11 s | 1245 / 1997 |", "1.11", VOL_DEF, "results/1/median_s", 1),
    (R, "| **0.36 s** | 1.11 s | 1245 / 1997 |", "1245", VOL_DEF, "results/0/peak_gpu_mib", 1),
    (R, "| **0.36 s** | 1.11 s | 1245 / 1997 |", "1997", VOL_DEF, "results/1/peak_gpu_mib", 1),
    (R, "| **0.44 s** | 0.90 s | 1575 / 2328 |", "0.44", VOL_RES, "results/0/median_s", 1),
    (R, "| **0.44 s** | 0.90 s | 1575 / 2328 |", "0.90", VOL_RES, "results/1/median_s", 1),
    (R, "| **0.44 s** | 0.90 s | 1575 / 2328 |", "1575", VOL_RES, "results/0/peak_gpu_mib", 1),
    (R, "| **0.44 s** | 0.90 s | 1575 / 2328 |", "2328", VOL_RES, "results/1/peak_gpu_mib", 1),
]

NUMBER = re.compile(r"(?<![\w.])(?<!\d,)\d+(?:\.\d+)?(?:e-\d+)?(?!\w|[.,]\d)")


def cells(page: str, piece: str, source: str, *keys: str | None, scale: float = 1) -> list[tuple]:
    """Registry rows for the numbers of ``piece`` in order: ``keys[i]`` is the key path of its i-th number
    in ``source`` (None: that number is not a measured figure, e.g. a count in a label)."""
    numbers = NUMBER.findall(piece)
    if len(numbers) != len(keys):
        raise ValueError(f"{piece!r} holds {len(numbers)} numbers, the registry gives {len(keys)} keys")
    return [(page, piece, n, source, k, scale) for n, k in zip(numbers, keys, strict=True) if k is not None]


def ci(base: str, metric: str) -> list[str]:
    """The key paths of 'mean [low, high]' of ``metric`` under ``base`` (an evaluation.json kind)."""
    return [f"{base}/{metric}/mean", f"{base}/{metric}/ci/0", f"{base}/{metric}/ci/1"]


def kind(method: str, finding: str, kind: str = "simple") -> str:
    """Key path of one method's metrics for one finding and prompt kind in an evaluation.json."""
    return f"results/{method}/findings/{finding}/kinds/{kind}"


GG, CO = "ground_glass_opacity", "consolidation"
ABL_A = "docs/results/ablation_cpu/evaluation.json"
ABL_B = "docs/results/ablation_grounded/evaluation.json"
PF = "docs/results/prompt_following_v2"
PF3 = "docs/results/prompt_following_stage3_try"
SPEC = "specificity/results/default"
SPEC3 = "specificity/results/model"

# docs/results.md §1: the default model on covid-cxr dev (afloc evaluate), full table
FIGURES += [
    *cells(
        RES_MD,
        "radiologist masks: 56 ground-glass opacity,\n19 consolidation",
        EVAL,
        "dataset/counts/ground_glass_opacity/positive_evaluated",
        "dataset/counts/consolidation/positive_evaluated",
    ),
    *cells(
        RES_MD,
        "| | constant | 0.118 [0.094, 0.144] | 0.199 [0.162, 0.238] | 0 | 0.118 | |",
        EVAL,
        *ci(kind("constant", GG, "all"), "iou"),
        *ci(kind("constant", GG, "all"), "dice"),
        f"{kind('constant', GG, 'all')}/cnr/mean",
        f"{kind('constant', GG, 'all')}/pointing/mean",
    ),
    *cells(
        RES_MD,
        "| | prior | 0.165 [0.134, 0.198] | 0.265 [0.221, 0.312] | 0.957 [0.841, 1.084] | 0.366 | |",
        EVAL,
        *ci(kind("prior", GG, "all"), "iou"),
        *ci(kind("prior", GG, "all"), "dice"),
        *ci(kind("prior", GG, "all"), "cnr"),
        f"{kind('prior', GG, 'all')}/pointing/mean",
    ),
    *cells(
        RES_MD,
        "| consolidation (19) | default v2, simple prompt | 0.181 [0.129, 0.235] | 0.289 [0.213, 0.363] "
        "| 1.292 [1.081, 1.571] | 0.421 | 0.51 [0.35, 0.68] |",
        EVAL,
        f"{kind('default', CO)}/n",
        *ci(kind("default", CO), "iou"),
        *ci(kind("default", CO), "dice"),
        *ci(kind("default", CO), "cnr"),
        f"{kind('default', CO)}/pointing/mean",
        f"{kind('default', CO)}/auroc/value",
        f"{kind('default', CO)}/auroc/ci/0",
        f"{kind('default', CO)}/auroc/ci/1",
    ),
    *cells(
        RES_MD,
        "| | default v2, precise prompts | 0.187 [0.133, 0.243] | 0.295 [0.217, 0.372] | 1.272 [1.048, 1.541] "
        "| 0.447 | 0.61 [0.46, 0.77] |",
        EVAL,
        *ci(kind("default", CO, "precise"), "iou"),
        *ci(kind("default", CO, "precise"), "dice"),
        *ci(kind("default", CO, "precise"), "cnr"),
        f"{kind('default', CO, 'precise')}/pointing/mean",
        f"{kind('default', CO, 'precise')}/auroc/value",
        f"{kind('default', CO, 'precise')}/auroc/ci/0",
        f"{kind('default', CO, 'precise')}/auroc/ci/1",
    ),
    *cells(
        RES_MD,
        "| | constant | 0.078 [0.050, 0.104] | 0.139 [0.092, 0.184] | 0 | 0.078 | |",
        EVAL,
        *ci(kind("constant", CO, "all"), "iou"),
        *ci(kind("constant", CO, "all"), "dice"),
        f"{kind('constant', CO, 'all')}/cnr/mean",
        f"{kind('constant', CO, 'all')}/pointing/mean",
    ),
    *cells(
        RES_MD,
        "| | prior | 0.121 [0.075, 0.168] | 0.201 [0.129, 0.270] | 0.891 [0.626, 1.179] | 0.184 | |",
        EVAL,
        *ci(kind("prior", CO, "all"), "iou"),
        *ci(kind("prior", CO, "all"), "dice"),
        *ci(kind("prior", CO, "all"), "cnr"),
        f"{kind('prior', CO, 'all')}/pointing/mean",
    ),
    (RES_MD, "| ground-glass opacity (56) | **default v2", "56", EVAL, f"{GGO}/n", 1),
    *cells(
        RES_MD,
        "Met by\nthe point estimates (1.22 and 0.252); the IoU CI reaches down to 0.205",
        EVAL,
        f"{GGO}/cnr/mean",
        f"{GGO}/iou/mean",
        f"{GGO}/iou/ci/0",
    ),
    (
        RES_MD,
        "| 5 | #4 at its best epoch (4 of 5), heatmap smoothing σ chosen from {0, 0.5, 0.75, 1, 1.5, 2} | CPU "
        "| 0.252 | 1.217 |",
        "0.252",
        EVAL,
        f"{GGO}/iou/mean",
        1,
    ),
    (
        RES_MD,
        "| 5 | #4 at its best epoch (4 of 5), heatmap smoothing σ chosen from {0, 0.5, 0.75, 1, 1.5, 2} | CPU "
        "| 0.252 | 1.217 |",
        "1.217",
        EVAL,
        f"{GGO}/cnr/mean",
        1,
    ),
]

# docs/results.md §1: EfficientNet-Lite0 vs ResNet-50 (scripts/compare_backbones.sh)
FIGURES += [
    *cells(
        RES_MD,
        "| EfficientNet-Lite0 (ImageNet) | 0.209 [0.169, 0.256] | **1.168** [1.091, 1.261] | **0.571** [0.446, 0.696] "
        "| 0.149 / 1.273 |",
        BACKBONES,
        *ci(EFF, "iou"),
        *ci(EFF, "cnr"),
        *ci(EFF, "pointing"),
        "results/model/findings/consolidation/kinds/simple/iou/mean",
        "results/model/findings/consolidation/kinds/simple/cnr/mean",
    ),
    *cells(
        RES_MD,
        "| ResNet-50 (random init) | 0.205 [0.166, 0.245] | 1.077 [0.972, 1.207] | 0.339 [0.214, 0.464] "
        "| 0.145 / 1.118 |",
        BACKBONES,
        None,
        *ci(RES, "iou"),
        *ci(RES, "cnr"),
        *ci(RES, "pointing"),
        "results/model_2/findings/consolidation/kinds/simple/iou/mean",
        "results/model_2/findings/consolidation/kinds/simple/cnr/mean",
    ),
    (RES_MD, "won 57 % vs 34 % of the time", "57", BACKBONES, f"{EFF}/pointing/mean", 100),
    (RES_MD, "won 57 % vs 34 % of the time", "34", BACKBONES, f"{RES}/pointing/mean", 100),
]


def ablation_row(page: str, piece: str, source: str, method: str) -> list[tuple]:
    """§2's rows: setting A quotes GGO IoU [CI] and CNR over all prompts and consolidation IoU (simple);
    setting B GGO IoU [CI] and CNR, consolidation IoU and CNR, all with the simple prompt."""
    simple = "simple" if method not in ("constant", "prior") else "all"
    if source == ABL_A:
        gg, co = kind(method, GG, "all"), kind(method, CO, simple)
        keys = [*ci(gg, "iou"), f"{gg}/cnr/mean", f"{co}/iou/mean"]
    else:
        gg, co = kind(method, GG, simple), kind(method, CO, simple)
        keys = [*ci(gg, "iou"), f"{gg}/cnr/mean", f"{co}/iou/mean", f"{co}/cnr/mean"]
    return cells(page, piece, source, *keys)


# docs/results.md §2: the ablation (scripts/run_ablation.py), setting A then B
FIGURES += [
    *ablation_row(RES_MD, "| global only | 0.068 [0.050, 0.088] | 0.448 | 0.009 |", ABL_A, "global_only"),
    *ablation_row(RES_MD, "| sentence only | 0.086 [0.064, 0.110] | 0.435 | 0.020 |", ABL_A, "sentence_only"),
    *ablation_row(RES_MD, "| word + global | 0.067 [0.050, 0.087] | 0.457 | 0.011 |", ABL_A, "word_global"),
    *ablation_row(RES_MD, "| all three | **0.088** [0.065, 0.112] | 0.444 | 0.020 |", ABL_A, "all_three"),
    *ablation_row(RES_MD, "| constant | 0.118 [0.094, 0.144] | 0 | 0.078 |", ABL_A, "constant"),
    *ablation_row(RES_MD, "| prior | 0.165 [0.134, 0.198] | 0.957 | 0.121 |", ABL_A, "prior"),
    *ablation_row(RES_MD, "| global only | 0.242 [0.198, 0.294] | 1.246 | 0.183 | 1.351 |", ABL_B, "global_only"),
    *ablation_row(
        RES_MD, "| sentence only | **0.247** [0.202, 0.299] | 1.261 | 0.181 | 1.332 |", ABL_B, "sentence_only"
    ),
    *ablation_row(RES_MD, "| word + global | 0.243 [0.199, 0.295] | 1.247 | 0.181 | 1.330 |", ABL_B, "word_global"),
    *ablation_row(RES_MD, "| all three | 0.246 [0.201, 0.297] | **1.263** | 0.181 | 1.315 |", ABL_B, "all_three"),
]

FT = "docs/results/finetune_cpu"
FT_CV, FT_BAG, FT_MED = f"{FT}/finetune_cpu.json", f"{FT}/finetune_cpu_bag.json", f"{FT}/finetune_cpu_median.json"
FT_K30 = f"{FT}/finetune_cpu_k30.json"
H1, H3 = "docs/results/finetune_h100/cv_k1.json", "docs/results/finetune_h100/cv_k3.json"
H510, HNOCV = "docs/results/finetune_h100/cv_k5_10.json", "docs/results/finetune_h100/nocv_unet_k5_10.json"
CEIL = "docs/results/finetune_ceiling.json"


def pm(source: str, row: int, field: str) -> list[str]:
    """The key paths of 'mean ± sd' of ``field`` in row ``row`` of a finetune benchmark's summary."""
    return [f"summary/{row}/{field}/0", f"summary/{row}/{field}/1"]


# docs/results.md §3 (all but the 2-CPU-core table and the paragraph under it): H100 table, ceilings
FIGURES += [
    (RES_MD, "masks drawn at random from the 56 dev", "56", EVAL, f"{GGO}/n", 1),
    *cells(
        RES_MD,
        "| 1 | 0.372 ± 0.008 | 0.294 ± 0.165 | (no fold) | 0.287 ± 0.108 |",
        H1,
        None,
        *pm(H1, 0, "zero_shot_dice"),
        *pm(H1, 0, "finetune_dice"),
        *pm(H1, 0, "unet_dice"),
    ),
    *cells(
        RES_MD,
        "| 3 | 0.360 ± 0.009 | — | **0.405** ± 0.053 | — |",
        H3,
        None,
        *pm(H3, 0, "zero_shot_dice"),
        *pm(H3, 0, "finetune_dice"),
    ),
    (
        RES_MD,
        "- **Time — met.** 5 masks → adapter in 21 s on 2 CPU cores",
        "21",
        FT_MED,
        "summary/1/finetune_seconds/0",
        1,
    ),
    (RES_MD, "(k = 5:\n  0.404 vs the U-Net's 0.356 ± 0.101", "0.404", FT_MED, "summary/1/finetune_dice/0", 1),
    (RES_MD, "(k = 5:\n  0.404 vs the U-Net's 0.356 ± 0.101", "0.356", HNOCV, "summary/0/unet_dice/0", 1),
    (RES_MD, "(k = 5:\n  0.404 vs the U-Net's 0.356 ± 0.101", "0.101", HNOCV, "summary/0/unet_dice/1", 1),
    (RES_MD, "was below it at k = 5 (0.324)", "0.324", H510, "summary/0/finetune_dice/0", 1),
    *cells(
        RES_MD,
        "| heatmap > 0.3, the model threshold then (56 images) | 0.376 |",
        CEIL,
        None,
        "images",
        "dice_by_threshold/0.3",
    ),
    (
        RES_MD,
        "| best single threshold (0.45), chosen on the evaluation images themselves | 0.403 |",
        "0.403",
        CEIL,
        "dice_by_threshold/0.45",
        1,
    ),
    *cells(
        RES_MD,
        "| threshold chosen on k = 5 masks, scored on other patients (200 draws) | 0.400 ± 0.025 |",
        CEIL,
        None,
        "draws",
        "calibrated/5/calibrated_dice",
        "calibrated/5/calibrated_sd",
    ),
    *cells(
        RES_MD,
        "| threshold chosen on k = 10 masks (200 draws) | 0.411 ± 0.031 |",
        CEIL,
        None,
        "draws",
        "calibrated/10/calibrated_dice",
        "calibrated/10/calibrated_sd",
    ),
    (
        RES_MD,
        "| *oracle*: the best threshold of each image, from its own mask | 0.464 |",
        "0.464",
        CEIL,
        "oracle_per_image_threshold",
        1,
    ),
    (RES_MD, "| *oracle*: the radiologists' lung masks alone | 0.408 |", "0.408", CEIL, "oracle_lungs_only", 1),
    *cells(
        RES_MD,
        "| *oracle*: heatmap > 0.4 inside the radiologists' lung masks | 0.456 |",
        CEIL,
        None,
        "oracle_heat_and_lungs/0.4",
    ),
    *cells(
        RES_MD,
        "(3 draws, 13–21 evaluation images; its own zero-shot 0.347) | 0.460 ± 0.029 |",
        FT_K30,
        "args/draws",
        None,
        None,
        "summary/0/zero_shot_dice/0",
        "summary/0/finetune_dice/0",
        "summary/0/finetune_dice/1",
    ),
]
# the H100 table's k = 5 and 10 rows: zero-shot and CV-weight columns from one run, weight 1 and U-Net from the other
for piece, row in [
    ("| 5 | 0.396 ± 0.022 | 0.248 ± 0.148 | 0.324 ± 0.152 | 0.356 ± 0.101 |", 0),
    ("| 10 | 0.395 ± 0.027 | 0.382 ± 0.087 | **0.439** ± 0.057 | 0.396 ± 0.035 |", 1),
]:
    FIGURES += cells(RES_MD, piece, H510, None, *pm(H510, row, "zero_shot_dice"), None, None,
                     *pm(H510, row, "finetune_dice"), None, None)  # fmt: skip
    FIGURES += cells(RES_MD, piece, HNOCV, None, None, None, *pm(HNOCV, row, "finetune_dice"), None, None,
                     *pm(HNOCV, row, "unet_dice"))  # fmt: skip

# docs/results.md §3, the 2-CPU-core tables: the re-run at the shipped threshold 0.64, then the 0.3 history
FT_K5 = f"{FT}/finetune_cpu_k5_2026-11-29.json"
FIGURES += [
    *cells(
        RES_MD,
        "| 5 | 5 | 46 | 0.377 ± 0.013 | **0.401** ± 0.041 |",
        FT_K5,
        "summary/0/k",
        "summary/0/draws",
        "summary/0/n_eval_mean",
        *pm(FT_K5, 0, "zero_shot_dice"),
        *pm(FT_K5, 0, "finetune_dice"),
    ),
    *cells(RES_MD, "(draw 0: 0.373 both)", FT_K5, "draws/0/draw", "draws/0/zero_shot_dice"),
    (RES_MD, "(draw 0: 0.373 both)", "0.373", FT_K5, "draws/0/finetune_dice", 1),
    *cells(
        RES_MD,
        "in draw 2 the\ncorrection was kept and raised the Dice from 0.357 to 0.474",
        FT_K5,
        "draws/2/draw",
        "draws/2/zero_shot_dice",
        "draws/2/finetune_dice",
    ),
    *cells(
        RES_MD,
        "A fine-tune took 11.4 s (draw 3) to 199.5 s (draw 2",
        FT_K5,
        "draws/3/finetune_seconds",
        "draws/3/draw",
        "draws/2/finetune_seconds",
        "draws/2/draw",
    ),
    *cells(
        RES_MD,
        "| 1 | 0.371 ± 0.008 | 0.295 ± 0.171 | (no fold with one example) | = | = | 6.2 ± 1.2 s |",
        FT_BAG,
        "summary/0/k",
        *pm(FT_BAG, 0, "zero_shot_dice"),
        *pm(FT_BAG, 0, "finetune_dice"),
        *pm(FT_BAG, 0, "finetune_seconds"),
    ),
]


def history_row(piece: str, k: int) -> list[tuple]:
    """A row of the threshold-0.3 table: zero-shot, CV weight (finetune_cpu), members' mean (finetune_cpu_bag),
    members' median (finetune_cpu_median, also the zero-shot and the time)."""
    med, cv = {3: 0, 5: 1, 10: 2}[k], {3: 1, 5: 2, 10: 3}[k]
    return [
        *cells(
            RES_MD,
            piece,
            FT_MED,
            None,
            *pm(FT_MED, med, "zero_shot_dice"),
            None,
            None,
            None,
            None,
            *pm(FT_MED, med, "finetune_dice"),
            *pm(FT_MED, med, "finetune_seconds"),
        ),
        *cells(
            RES_MD, piece, FT_CV, None, None, None, *pm(FT_CV, cv, "finetune_dice"), None, None, None, None, None, None
        ),
        *cells(
            RES_MD,
            piece,
            FT_BAG,
            None,
            None,
            None,
            None,
            None,
            *pm(FT_BAG, cv, "finetune_dice"),
            None,
            None,
            None,
            None,
        ),
    ]


FIGURES += [
    *history_row("| 3 | 0.359 ± 0.010 | — | 0.401 ± 0.049 | **0.405** ± 0.053 | **0.405** ± 0.053 | 24.5 ± 1.3 s |", 3),
    *history_row("| 5 | 0.397 ± 0.021 | — | **0.411** ± 0.041 | 0.348 ± 0.142 | 0.404 ± 0.040 | 21.0 ± 3.9 s |", 5),
    *history_row("| 10 | 0.394 ± 0.027 | — | 0.416 ± 0.044 | 0.445 ± 0.044 | **0.448** ± 0.046 | 20.6 ± 2.8 s |", 10),
    (RES_MD, "the\n  0.64 re-run's median draw took 17.6 s)", "17.6", FT_K5, "draws/0/finetune_seconds", 1),
    (RES_MD, "CUDA/cuDNN warm-up: draw 0 at k = 3 took 30.7 s.", "30.7", H3, "draws/0/finetune_seconds", 1),
]


# docs/results.md §4: prompt following (scripts/evaluate_prompt_following.sh, then the stage-3 try)
CXD, COV, TBX, NIH = (f"{PF}/{n}/evaluation.json" for n in ("chestx_det", "covid_dev", "tbx11k_dev", "nih_auroc"))
NIH_DEV = f"{PF}/nih_auroc_dev/evaluation.json"
CXD3, COV3, TBX3, NIH3 = (
    f"{PF3}/{n}/evaluation.json" for n in ("chestx_det", "covid_dev", "tbx11k_dev", "nih_auroc_dev")
)
SPEC_ROW = (
    "| **default v2** | 0.082 [0.034, 0.144] | 6.83 [6.13, 7.43] | 0.131 / 6.48 | 0.094 (0.145) / 6.56 (6.09) "
    "| 0.713 [0.703, 0.723] |"
)
NULL_ROW = (
    "| prior, lung_field, constant | 0.077 (= chance, exactly: every prompt ties) | 7.00 | 0.077 / 7.00 "
    "| 0.077 / 7.00 | 1 |"
)
FIGURES += [
    *cells(RES_MD, "(radiologist outlines of 13 findings on 100 NIH images)", CXD, None, "specificity/n_images"),
    *cells(
        RES_MD,
        "(the 11 findings with ≥ 3 outlines count once each; mass has none,\n  diffuse nodule 2)",
        CXD,
        None,
        None,
        "specificity/outlines/diffuse_nodule",
    ),
    *cells(
        RES_MD,
        "Chance: 1/13 = 0.077 and rank 7.",
        CXD,
        None,
        None,
        "specificity/chance/top1",
        "specificity/chance/mean_rank",
    ),
    *cells(
        RES_MD,
        SPEC_ROW,
        CXD,
        *ci(f"{SPEC}/model", "top1"),
        *ci(f"{SPEC}/model", "mean_rank"),
        f"{SPEC}/class_mean_null/top1/mean",
        f"{SPEC}/class_mean_null/mean_rank/mean",
        f"{SPEC}/shuffled_null/top1/mean",
        f"{SPEC}/shuffled_null/top1/p95",
        f"{SPEC}/shuffled_null/mean_rank/mean",
        f"{SPEC}/shuffled_null/mean_rank/p05",
        f"{SPEC}/invariance/mean",
        f"{SPEC}/invariance/ci/0",
        f"{SPEC}/invariance/ci/1",
    ),
    *(
        row
        for method in ("prior", "lung_field", "constant")
        for row in cells(
            RES_MD,
            NULL_ROW,
            CXD,
            f"specificity/results/{method}/model/top1/mean",
            f"specificity/results/{method}/model/mean_rank/mean",
            f"specificity/results/{method}/class_mean_null/top1/mean",
            f"specificity/results/{method}/class_mean_null/mean_rank/mean",
            f"specificity/results/{method}/shuffled_null/top1/mean",
            f"specificity/results/{method}/shuffled_null/mean_rank/mean",
            f"specificity/results/{method}/invariance/mean",
        )
    ),
    *cells(RES_MD, "| chance | 0.077 | 7.0 |", CXD, "specificity/chance/top1", "specificity/chance/mean_rank"),
    *(
        row
        for finding, piece in [
            ("consolidation", "consolidation (54 outlines) 0.17 / 5.6"),
            ("effusion", "effusion (40) 0.05 / 6.0"),
            ("fracture", "fracture (12) 0.08 / 4.6"),
            ("cardiomegaly", "cardiomegaly (12) 0.00 / 8.9"),
            ("fibrosis", "fibrosis (11)\n0.00 / 9.2"),
            ("nodule", "nodule (3) 0.00 / 9.7"),
            ("emphysema", "emphysema (6) 0.33 / 2.8"),
            ("atelectasis", "atelectasis (8) 0.12 / 6.0"),
            ("pleural_thickening", "pleural\nthickening (7) 0.14 / 7.6"),
            ("calcification", "calcification (4) 0.00 / 7.2"),
            ("pneumothorax", "pneumothorax (4) 0.00 / 7.5"),
        ]
        for row in cells(
            RES_MD,
            piece,
            CXD,
            f"{SPEC}/model/per_finding/{finding}/n",
            f"{SPEC}/model/per_finding/{finding}/top1",
            f"{SPEC}/model/per_finding/{finding}/mean_rank",
        )
    ),
    (
        RES_MD,
        "shuffled-image null beats the model in 64 % of the draws (p = 0.64 for top-1)",
        "64",
        CXD,
        f"{SPEC}/shuffled_null/p_top1",
        100,
    ),
    (
        RES_MD,
        "shuffled-image null beats the model in 64 % of the draws (p = 0.64 for top-1)",
        "0.64",
        CXD,
        f"{SPEC}/shuffled_null/p_top1",
        1,
    ),
    (RES_MD, "scores *higher* (0.131)", "0.131", CXD, f"{SPEC}/class_mean_null/top1/mean", 1),
]


def localisation_row(piece: str, source: str, finding: str) -> list[tuple]:
    """§4's localisation table: the finding's n, then IoU / CNR of v2 (simple prompt), prior, lung field, constant."""
    keys = [f"{kind('default', finding)}/n"]
    for method, k in (("default", "simple"), ("prior", "all"), ("lung_field", "all"), ("constant", "all")):
        keys += [f"{kind(method, finding, k)}/iou/mean", f"{kind(method, finding, k)}/cnr/mean"]
    return cells(RES_MD, piece, source, *keys)


def auroc(finding: str, k: str) -> list[str]:
    return [
        f"{kind('default', finding, k)}/auroc/value",
        f"{kind('default', finding, k)}/auroc/ci/0",
        f"{kind('default', finding, k)}/auroc/ci/1",
    ]


FIGURES += [
    *localisation_row(
        "| ground-glass opacity (56) | **0.252** / **1.217** | 0.165 / 0.957 | 0.231 / 1.066 | 0.118 / 0 |", COV, GG
    ),
    *localisation_row(
        "| consolidation (19) | **0.181** / **1.292** | 0.121 / 0.891 | 0.153 / 0.908 | 0.078 / 0 |", COV, CO
    ),
    *localisation_row(
        "| consolidation (54) | 0.183 / 1.012 | **0.221** / **1.314** | 0.164 / 0.767 | 0.089 / 0 |", CXD, CO
    ),
    *localisation_row(
        "| effusion (40) | **0.125** / **0.844** | 0.108 / 0.813 | 0.078 / 0.533 | 0.065 / 0 |", CXD, "effusion"
    ),
    *localisation_row(
        "| tuberculosis (189) | 0.147 / 0.827 | 0.097 / 0.714 | **0.195** / **1.011** | 0.089 / 0 |",
        TBX,
        "tuberculosis",
    ),
    *cells(
        RES_MD,
        "(Precise prompts: chestx-det effusion 0.139 / 0.900, consolidation 0.146 / 0.807;",
        CXD,
        f"{kind('default', 'effusion', 'precise')}/iou/mean",
        f"{kind('default', 'effusion', 'precise')}/cnr/mean",
        f"{kind('default', CO, 'precise')}/iou/mean",
        f"{kind('default', CO, 'precise')}/cnr/mean",
    ),
    *cells(
        RES_MD,
        "tuberculosis\n0.146 / 0.808.)",
        TBX,
        f"{kind('default', 'tuberculosis', 'precise')}/iou/mean",
        f"{kind('default', 'tuberculosis', 'precise')}/cnr/mean",
    ),
    *cells(
        RES_MD,
        "| effusion (76 / 847) | 0.484 [0.421, 0.547] | 0.533 [0.475, 0.600] |",
        NIH,
        "dataset/counts/effusion/positive_evaluated",
        "dataset/counts/effusion/negative_evaluated",
        *auroc("effusion", "simple"),
        *auroc("effusion", "precise"),
    ),
    *cells(
        RES_MD,
        "| atelectasis (103 / 820) | 0.515 [0.458, 0.570] | 0.472 [0.418, 0.532] |",
        NIH,
        "dataset/counts/atelectasis/positive_evaluated",
        "dataset/counts/atelectasis/negative_evaluated",
        *auroc("atelectasis", "simple"),
        *auroc("atelectasis", "precise"),
    ),
    *cells(
        RES_MD,
        "| edema (77 / 846) | 0.499 [0.431, 0.578] (",
        NIH,
        "dataset/counts/edema/positive_evaluated",
        "dataset/counts/edema/negative_evaluated",
        *auroc("edema", "simple"),
    ),
    *cells(
        RES_MD,
        "All at chance (mean 0.50 [0.46, 0.54])",
        NIH,
        "results/default/overall/simple/auroc/value",
        "results/default/overall/simple/auroc/ci/0",
        "results/default/overall/simple/auroc/ci/1",
    ),
    *cells(
        RES_MD,
        "- Specificity top-1 0.082 vs ≥ 0.25 (missed by 0.17; chance 0.077), mean rank 6.83 vs ≤ 4",
        CXD,
        None,
        f"{SPEC}/model/top1/mean",
        None,
        None,
        "specificity/chance/top1",
        f"{SPEC}/model/mean_rank/mean",
        None,
    ),
    (RES_MD, "95th percentile (0.145): at chance.", "0.145", CXD, f"{SPEC}/shuffled_null/top1/p95", 1),
    (RES_MD, "- Invariance r = 0.71 vs ≤ 0.4 (by 0.31)", "0.71", CXD, f"{SPEC}/invariance/mean", 1),
    (RES_MD, "v2's per-prompt maps correlate at r = 0.71 before", "0.71", CXD, f"{SPEC}/invariance/mean", 1),
]

# §4, the stage-3 try beside v2
FIGURES += [
    *cells(
        RES_MD,
        "| **0.082** / **6.83** | 0.071 [0.026, 0.123] / 6.84 |",
        CXD,
        f"{SPEC}/model/top1/mean",
        f"{SPEC}/model/mean_rank/mean",
        None,
        None,
        None,
        None,
    ),
    *cells(
        RES_MD,
        "| **0.082** / **6.83** | 0.071 [0.026, 0.123] / 6.84 |",
        CXD3,
        None,
        None,
        *ci(f"{SPEC3}/model", "top1"),
        f"{SPEC3}/model/mean_rank/mean",
    ),
    *cells(RES_MD, "| invariance r | **0.713** | 0.735 |", CXD, f"{SPEC}/invariance/mean", None),
    *cells(RES_MD, "| invariance r | **0.713** | 0.735 |", CXD3, None, f"{SPEC3}/invariance/mean"),
]
for piece, v2, try3, finding in [
    ("| covid-cxr dev GGO IoU / CNR | 0.252 / 1.217 | 0.252 / 1.216 |", COV, COV3, GG),
    ("| covid-cxr dev consolidation IoU / CNR | **0.181** / **1.292** | 0.177 / 1.286 |", COV, COV3, CO),
    ("| chestx-det consolidation IoU / CNR | 0.183 / 1.012 | **0.201** / **1.078** |", CXD, CXD3, CO),
    ("| chestx-det effusion IoU / CNR | **0.125** / **0.844** | 0.119 / 0.817 |", CXD, CXD3, "effusion"),
    ("| tbx11k held-out tuberculosis IoU / CNR | 0.147 / 0.827 | **0.152** / **0.898** |", TBX, TBX3, "tuberculosis"),
]:
    FIGURES += cells(
        RES_MD, piece, v2, f"{kind('default', finding)}/iou/mean", f"{kind('default', finding)}/cnr/mean", None, None
    )
    FIGURES += cells(
        RES_MD, piece, try3, None, None, f"{kind('model', finding)}/iou/mean", f"{kind('model', finding)}/cnr/mean"
    )
NIH_ROW = "(`--split dev`, 308 images) AUROC effusion / atelectasis / edema | 0.42 / 0.54 / 0.51 | 0.46 / 0.58 / 0.57 |"
FIGURES += [
    *cells(
        RES_MD,
        NIH_ROW,
        NIH_DEV,
        None,
        f"{kind('default', 'effusion')}/auroc/value",
        f"{kind('default', 'atelectasis')}/auroc/value",
        f"{kind('default', 'edema')}/auroc/value",
        None,
        None,
        None,
    ),
    *cells(
        RES_MD,
        NIH_ROW,
        NIH3,
        None,
        None,
        None,
        None,
        f"{kind('model', 'effusion')}/auroc/value",
        f"{kind('model', 'atelectasis')}/auroc/value",
        f"{kind('model', 'edema')}/auroc/value",
    ),
    (RES_MD, "(prior 0.221 / 1.314)", "0.221", CXD, f"{kind('prior', CO, 'all')}/iou/mean", 1),
    (RES_MD, "(prior 0.221 / 1.314)", "1.314", CXD, f"{kind('prior', CO, 'all')}/cnr/mean", 1),
    (RES_MD, "(lung field 0.195 / 1.011)", "0.195", TBX, f"{kind('lung_field', 'tuberculosis', 'all')}/iou/mean", 1),
    (RES_MD, "(lung field 0.195 / 1.011)", "1.011", TBX, f"{kind('lung_field', 'tuberculosis', 'all')}/cnr/mean", 1),
    (RES_MD, "Not better on specificity (0.071 vs 0.082,", "0.071", CXD3, f"{SPEC3}/model/top1/mean", 1),
    (RES_MD, "Not better on specificity (0.071 vs 0.082,", "0.082", CXD, f"{SPEC}/model/top1/mean", 1),
    *cells(
        RES_MD,
        "(simple prompts; 23 / 39 / 19 positives",
        NIH_DEV,
        "dataset/counts/effusion/positive_evaluated",
        "dataset/counts/atelectasis/positive_evaluated",
        "dataset/counts/edema/positive_evaluated",
    ),
    *cells(
        RES_MD,
        "moved consolidation's own-prompt rank from 5.6 to 4.5\nand took effusion's top-1 from 0.05 to 0",
        CXD,
        f"{SPEC}/model/per_finding/consolidation/mean_rank",
        None,
        None,
        f"{SPEC}/model/per_finding/effusion/top1",
        None,
    ),
    *cells(
        RES_MD,
        "moved consolidation's own-prompt rank from 5.6 to 4.5\nand took effusion's top-1 from 0.05 to 0",
        CXD3,
        None,
        f"{SPEC3}/model/per_finding/consolidation/mean_rank",
        None,
        None,
        f"{SPEC3}/model/per_finding/effusion/top1",
    ),
    (
        RES_MD,
        "every one of the 76 NIH images labelled effusion",
        "76",
        NIH,
        "dataset/counts/effusion/positive_evaluated",
        1,
    ),
    (RES_MD, "the 189 held-out\nimages left out", "189", TBX, f"{kind('default', 'tuberculosis')}/n", 1),
    (RES_MD, "(189: `tbx11k_dev/evaluation.json`", "189", TBX, f"{kind('default', 'tuberculosis')}/n", 1),
]

# docs/faults.md: kill -9 at seeded moments of every writing command (benchmarks/faults.py)
FAULTS_MD, FAULTS = "docs/faults.md", "benchmarks/results/faults.json"


def faults_row(piece: str, command: str) -> list[tuple]:
    """One row of the fault-injection table: kills, mid-write kills, kills after the new result, runs,
    violations, seconds of the command's trial loop."""
    fields = ("kills", "kills_mid_write", "kills_after_new_result", "runs", "violations", "seconds")
    return cells(FAULTS_MD, piece, FAULTS, *(f"results/{command}/{f}" for f in fields))


FIGURES += [
    *faults_row("| `localize` | 20 | 3 | 3 | 53 | **0** | 36 |", "localize"),
    *faults_row("| `finetune` | 20 | 2 | 0 | 47 | **0** | 29 |", "finetune"),
    *faults_row("| `train run` | 20 | 6 | 0 | 41 | **0** | 37 |", "train run"),
    *faults_row("| `models install` | 20 | 18 | 3 | 65 | **0** | 7 |", "models install"),
    *faults_row("| `convert-reference` | 20 | 2 | 2 | 47 | **0** | 44 |", "convert-reference"),
    *faults_row("| `evaluate` | 20 | 1 | 1 | 43 | **0** | 32 |", "evaluate"),
    (FAULTS_MD, "until 20 kills have landed", "20", FAULTS, "kills_per_command", 1),
    *cells(FAULTS_MD, "Seed 18, 2 cores of an AMD EPYC", FAULTS, "seed", "machine/cpu_cores"),
    *cells(
        FAULTS_MD,
        "(load average 1.5 at the start, 4.5 at the end)",
        FAULTS,
        "machine/load_average_start/0",
        "machine/load_average_end/0",
    ),
    *cells(FAULTS_MD, "(2 of 20 in this run)", FAULTS, "results/finetune/kills_mid_write", "results/finetune/kills"),
]

# docs/convert-reference.md: how close the reference mode is (benchmarks/reference_pieces.py)
CONVERT_MD, PIECES = "docs/convert-reference.md", "docs/results/reference_pieces.json"
FIGURES += [
    (CONVERT_MD, "is 3.9e-06 in the reference mode", "3.9e-06", PIECES, "rows/0/max_abs_diff", 1),
    (CONVERT_MD, "moves it by 0.0159 (align_corners)", "0.0159", PIECES, "rows/2/max_abs_diff", 1),
    (CONVERT_MD, "to 1.26 (cosine instead of the dot\nproduct)", "1.26", PIECES, "rows/4/max_abs_diff", 1),
]


# §4, attempt 2 (synthetic findings where anatomy puts them): v2 and three variants, one column each
V3 = "docs/results/prompt_following_v3_try"
V3_SETS = ("chestx_det", "covid_dev", "tbx11k_dev", "nih_auroc_dev")
V3_RUNS = [  # (its result files by set, its name in them)
    ({"chestx_det": CXD, "covid_dev": COV, "tbx11k_dev": TBX, "nih_auroc_dev": NIH_DEV}, "default"),
    *(
        ({n: f"{V3}/{run}/{n}/evaluation.json" for n in V3_SETS}, name)
        for run, name in (
            ("grounded_1epoch", "grounded_v3"),
            ("grounded_3epochs", "grounded_v3c"),
            ("grounded_contrastive", "model"),
        )
    ),
]


def v3_columns(piece: str, dataset: str, keys: Callable[[str], list[str]], trailing: int = 0) -> list[tuple]:
    """Registry rows of one table row of the attempt-2 table: each run's column (``keys(name)``, its key
    paths) checked against its own file; ``trailing`` numbers after the columns (targets) are not figures."""
    width = len(keys("x"))
    rows = []
    for i, (files, name) in enumerate(V3_RUNS):
        column: list[str | None] = [None] * (width * len(V3_RUNS) + trailing)
        column[i * width : (i + 1) * width] = keys(name)
        rows += cells(RES_MD, piece, files[dataset], *column)
    return rows


def _spec(name: str) -> str:
    return f"specificity/results/{name}"


FIGURES += [
    *v3_columns(
        "| 0.082 / 6.83 | 0.147 / 5.39 | 0.156 / 5.13 | 0.147 / 5.52 | ≥ 0.25 / ≤ 4 |",
        "chestx_det",
        lambda n: [f"{_spec(n)}/model/top1/mean", f"{_spec(n)}/model/mean_rank/mean"],
        trailing=2,
    ),
    *v3_columns(
        "| 0.094 (0.145) | 0.166 (0.226) | 0.214 (0.263) | 0.164 (0.226) | model above the p95 |",
        "chestx_det",
        lambda n: [f"{_spec(n)}/shuffled_null/top1/mean", f"{_spec(n)}/shuffled_null/top1/p95"],
    ),
    *v3_columns(
        "| 0.131 | 0.216 | 0.236 | 0.294 | |",
        "chestx_det",
        lambda n: [f"{_spec(n)}/class_mean_null/top1/mean"],
    ),
    *v3_columns(
        "| invariance r | 0.713 | 0.868 | 0.667 | 0.874 | ≤ 0.4 |",
        "chestx_det",
        lambda n: [f"{_spec(n)}/invariance/mean"],
        trailing=1,
    ),
]
for piece, dataset, finding in [
    ("| 0.252 / 1.217 | 0.263 / 1.304 | 0.262 / 1.242 | 0.258 / 1.255 |", "covid_dev", GG),
    ("| **0.181** / **1.292** | 0.147 / 1.086 | 0.123 / 0.853 | 0.147 / 1.096 |", "covid_dev", CO),
    ("| 0.183 / 1.012 | 0.225 / 1.195 | 0.220 / 1.150 | **0.234** / **1.284** |", "chestx_det", CO),
    ("| 0.125 / **0.844** | 0.132 / 0.776 | 0.110 / 0.730 | **0.133** / 0.769 |", "chestx_det", "effusion"),
    ("| 0.147 / 0.827 | 0.166 / 0.913 | 0.177 / 0.954 | **0.180** / **1.036** |", "tbx11k_dev", "tuberculosis"),
]:
    FIGURES += v3_columns(piece, dataset, lambda n, f=finding: [f"{kind(n, f)}/iou/mean", f"{kind(n, f)}/cnr/mean"])
FIGURES += v3_columns(
    "| 0.42 / 0.54 / 0.51 | 0.41 / 0.56 / 0.50 | 0.41 / 0.48 / 0.50 | **0.56** / **0.64** / **0.57** | ≥ 0.70 |",
    "nih_auroc_dev",
    lambda n: [f"{kind(n, f)}/auroc/value" for f in ("effusion", "atelectasis", "edema")],
    trailing=1,
)

V3S = f"{V3}/grounded_strong_augment"
STRONG = "top-1 0.105 / mean rank 5.68 (shuffled-image null 0.165), covid-cxr dev consolidation 0.150 / 1.067"
FIGURES += cells(
    RES_MD,
    STRONG,
    f"{V3S}/chestx_det/evaluation.json",
    None,  # the 1 of "top-1"
    f"{_spec('grounded_v3s')}/model/top1/mean",
    f"{_spec('grounded_v3s')}/model/mean_rank/mean",
    f"{_spec('grounded_v3s')}/shuffled_null/top1/mean",
    None,
    None,
)
FIGURES += cells(
    RES_MD,
    STRONG,
    f"{V3S}/covid_dev/evaluation.json",
    None,
    None,
    None,
    None,
    f"{kind('grounded_v3s', CO)}/iou/mean",
    f"{kind('grounded_v3s', CO)}/cnr/mean",
)

# §4 stage-3 try: the manifest's counts (scripts/prompt_following_manifest.py --summary)
PF3_COUNTS = f"{PF3}/manifest.json"
FIGURES += [
    (RES_MD, "533 images of the train part of the patients", "533", PF3_COUNTS, "nih_pairs", 1),
    (RES_MD, "patient: 256 held-out and", "256", PF3_COUNTS, "left_out/nih heldout", 1),
    (RES_MD, "134 ChestX-Det-patient images left out", "134", PF3_COUNTS, "left_out/nih chestx-det patient", 1),
    (RES_MD, "and 410 TBX11K images of the train part", "410", PF3_COUNTS, "tbx11k_pairs", 1),
    (RES_MD, 'tuberculosis."; the 189 held-out', "189", PF3_COUNTS, "left_out/tbx11k heldout", 1),
]

# §1 "What was tried": row 3 (the v1 recipe, re-run by scripts/compare_backbones.sh) and the lung field
ROW3 = "| CPU | 0.209 [0.169, 0.256] | 1.168 | shipped as v1 |"
FIGURES += [
    *cells(RES_MD, ROW3, BACKBONES, *ci(EFF, "iou"), f"{EFF}/cnr/mean"),
    *cells(
        RES_MD,
        "heatmap scores IoU 0.231, CNR 1.066 on the same split",
        COV,
        f"{kind('lung_field', GG, 'all')}/iou/mean",
        f"{kind('lung_field', GG, 'all')}/cnr/mean",
    ),
]

# README: afloc localize end to end, a cold process (benchmarks/localize_cli.py)
CLI = "benchmarks/results/localize_cli-vm.json"
FIGURES += [
    (R, "median **3.40 s** with this version against 4.79 s", "3.40", CLI, "current/median_wall_s", 1),
    (R, "median **3.40 s** with this version against 4.79 s", "4.79", CLI, "old/median_wall_s", 1),
    (R, "**1.32×** faster pair by pair", "1.32", CLI, "speedup_median_of_pairs", 1),
    (R, "1.32×** faster pair by pair in the same run; 7.82 MB written", "7.82", CLI, "current/output_mb", 1),
    (R, "MONAI's import took\n1.30 s instead of 2.51 s", "1.30", CLI, "current/phases/import_monai_s", 1),
    (R, "MONAI's import took\n1.30 s instead of 2.51 s", "2.51", CLI, "old/phases/import_monai_s", 1),
    (R, "torch 0.74 s, MONAI 1.30 s", "0.74", CLI, "current/phases/import_torch_s", 1),
    (R, "writing the 18 files 1.03 s", "18", CLI, "current/output_files", 1),
    (R, "writing the 18 files 1.03 s", "1.03", CLI, "current/phases/write_results_s", 1),
    (R, "model load 0.09 s", "0.09", CLI, "current/phases/load_model_s", 1),
    (R, "the network and heatmaps 0.13 s", "0.13", CLI, "current/phases/localize_s", 1),
    (R, "loads the text model: median 4.90 s", "4.90", CLI, "current_with_new_prompt/median_wall_s", 1),
]


# the model card: summary, dev table, targets, AUROC, v1, prompt following, threshold calibration
def dev_row(piece: str, finding: str, method: str, k: str, *, n: bool = False, cnr_ci: bool = True) -> list[tuple]:
    """A row of the card's dev table: (n,) IoU [CI], Dice [CI], CNR ([CI]), pointing of one method and kind."""
    base = kind(method, finding, k)
    cnr = ci(base, "cnr") if cnr_ci else [f"{base}/cnr/mean"]
    keys = [f"{base}/n"] * n + ci(base, "iou") + ci(base, "dice") + cnr + [f"{base}/pointing/mean"]
    return cells(CARD, piece, EVAL, *keys)


FIGURES += [
    (CARD, "`model.safetensors` is fp16 (7.8 MB)", "7.8", MANIFEST, "models/0/size", 1e-6),
    *cells(
        CARD,
        "ground-glass opacity (56 images) and consolidation (19).",
        EVAL,
        "dataset/counts/ground_glass_opacity/positive_evaluated",
        "dataset/counts/consolidation/positive_evaluated",
    ),
    (CARD, "| ground-glass opacity (56) | **default, simple prompt** |", "56", EVAL, f"{GGO}/n", 1),
    *dev_row(
        "| | constant heatmap | 0.118 [0.094, 0.144] | 0.199 [0.162, 0.238] | 0.000 | 0.118 |",
        GG,
        "constant",
        "all",
        cnr_ci=False,
    ),
    *dev_row(
        "| | lung-centre prior | 0.165 [0.134, 0.198] | 0.265 [0.221, 0.312] | 0.957 [0.841, 1.084] | 0.366 |",
        GG,
        "prior",
        "all",
    ),
    *dev_row(
        "| consolidation (19) | default, simple prompt | 0.181 [0.129, 0.235] | 0.289 [0.213, 0.363] "
        "| 1.292 [1.081, 1.571] | 0.421 |",
        CO,
        "default",
        "simple",
        n=True,
    ),
    *dev_row(
        "| | default, precise prompts | 0.187 [0.133, 0.243] | 0.295 [0.217, 0.372] | 1.272 [1.048, 1.541] | 0.447 |",
        CO,
        "default",
        "precise",
    ),
    *dev_row(
        "| | constant heatmap | 0.078 [0.050, 0.104] | 0.139 [0.092, 0.184] | 0.000 | 0.078 |",
        CO,
        "constant",
        "all",
        cnr_ci=False,
    ),
    *dev_row(
        "| | lung-centre prior | 0.121 [0.075, 0.168] | 0.201 [0.129, 0.270] | 0.891 [0.626, 1.179] | 0.184 |",
        CO,
        "prior",
        "all",
    ),
    *cells(
        CARD,
        "**CNR 1.22 ≥ 1.0 and IoU\n0.252 ≥ 0.25 are met** by the point estimates; "
        "the IoU CI's lower bound (0.205) is below 0.25.",
        EVAL,
        f"{GGO}/cnr/mean",
        None,
        f"{GGO}/iou/mean",
        None,
        f"{GGO}/iou/ci/0",
        None,
    ),
    *cells(
        CARD,
        "Consolidation AUROC (19 positives, 39 negatives): 0.51 [0.35, 0.68] (simple), 0.61 (precise)",
        EVAL,
        f"{kind('default', CO)}/auroc/n_positive",
        f"{kind('default', CO)}/auroc/n_negative",
        f"{kind('default', CO)}/auroc/value",
        f"{kind('default', CO)}/auroc/ci/0",
        f"{kind('default', CO)}/auroc/ci/1",
        f"{kind('default', CO, 'precise')}/auroc/value",
    ),
    (CARD, "(consolidation AUROC 0.51)", "0.51", EVAL, f"{kind('default', CO)}/auroc/value", 1),
    (CARD, "IoU is\n  near 0 (worst cases in", "0", EVAL, "cases/ground_glass_opacity/worst/0/iou", 1),
    *cells(
        CARD,
        "ground-glass AUROC on dev, 0.28 [0.18, 0.39], rests on 2",
        EVAL,
        None,  # 0.28: registered above
        f"{GGO}/auroc/ci/0",
        f"{GGO}/auroc/ci/1",
        f"{GGO}/auroc/n_negative",
    ),
    # v1, the same recipe re-run by scripts/compare_backbones.sh
    *cells(
        CARD, "had ground-glass IoU 0.209, CNR 1.17 on the same split", BACKBONES, f"{EFF}/iou/mean", f"{EFF}/cnr/mean"
    ),
    # "Does the heatmap follow the prompt?" (docs/results/prompt_following_v2)
    *cells(
        CARD,
        "| prompt specificity on chestx-det-nih, top-1 of the own prompt among 13, per finding | 0.082 [0.034, 0.144] "
        "| chance 0.077; shuffled-image null 0.094 (p95 0.145); class-mean null 0.131 | ≥ 0.25 |",
        CXD,
        None,  # the 1 of "top-1"
        None,  # 13 candidate prompts
        *ci(f"{SPEC}/model", "top1"),
        "specificity/chance/top1",
        f"{SPEC}/shuffled_null/top1/mean",
        f"{SPEC}/shuffled_null/top1/p95",
        f"{SPEC}/class_mean_null/top1/mean",
        None,  # target
    ),
    *cells(
        CARD,
        "| mean rank of the own prompt (of 13) | 6.83 [6.13, 7.43] | chance 7.0 | ≤ 4 |",
        CXD,
        None,
        *ci(f"{SPEC}/model", "mean_rank"),
        "specificity/chance/mean_rank",
        None,
    ),
    *cells(
        CARD,
        "| prompt invariance (mean r between prompts' maps) | 0.713 [0.703, 0.723] "
        "| 1 for any prompt-blind map | ≤ 0.4 |",
        CXD,
        f"{SPEC}/invariance/mean",
        f"{SPEC}/invariance/ci/0",
        f"{SPEC}/invariance/ci/1",
        None,
        None,
    ),
    *(
        row
        for piece, source, finding in (
            (
                "| chestx-det consolidation (54) IoU / CNR | 0.183 / 1.012 "
                "| prior 0.221 / 1.314; lung field 0.164 / 0.767 |",
                CXD,
                CO,
            ),
            (
                "| chestx-det effusion (40) IoU / CNR | 0.125 / 0.844 "
                "| prior 0.108 / 0.813; lung field 0.078 / 0.533 |",
                CXD,
                "effusion",
            ),
            (
                "| tbx11k-tb held-out part (189) tuberculosis IoU / CNR | 0.147 / 0.827 "
                "| prior 0.097 / 0.714; lung field 0.195 / 1.011 |",
                TBX,
                "tuberculosis",
            ),
        )
        for row in cells(
            CARD,
            piece,
            source,
            f"{kind('default', finding)}/n",
            f"{kind('default', finding)}/iou/mean",
            f"{kind('default', finding)}/cnr/mean",
            f"{kind('prior', finding, 'all')}/iou/mean",
            f"{kind('prior', finding, 'all')}/cnr/mean",
            f"{kind('lung_field', finding, 'all')}/iou/mean",
            f"{kind('lung_field', finding, 'all')}/cnr/mean",
        )
    ),
    *cells(
        CARD,
        "| (0.252 / 1.217; 0.181 / 1.292) | 0.231 / 1.066; 0.153 / 0.908 |",
        COV,
        f"{kind('default', GG)}/iou/mean",
        f"{kind('default', GG)}/cnr/mean",
        f"{kind('default', CO)}/iou/mean",
        f"{kind('default', CO)}/cnr/mean",
        f"{kind('lung_field', GG, 'all')}/iou/mean",
        f"{kind('lung_field', GG, 'all')}/cnr/mean",
        f"{kind('lung_field', CO, 'all')}/iou/mean",
        f"{kind('lung_field', CO, 'all')}/cnr/mean",
    ),
    *cells(
        CARD,
        "(simple prompts, 923 images) | 0.48 / 0.51 / 0.50 | chance 0.5 | ≥ 0.70 |",
        NIH,
        None,  # 923: DERIVED
        *(f"{kind('default', f)}/auroc/value" for f in ("effusion", "atelectasis", "edema")),
        None,
        None,
    ),
    # the threshold paragraph (scripts/calibrate_threshold.py)
    (CARD, "## Default mask threshold (0.64)", "0.64", CONFIG, "model/threshold", 1),
    (CARD, "The default 0.64 is calibrated", "0.64", CALIB, "recommended", 1),
    (CARD, "The default 0.64 is calibrated", "0.64", CALIB, "area_matched/threshold", 1),
    (CARD, "over the 75 (image, finding) pairs", "75", CALIB, "pairs", 1),
    *cells(
        CARD,
        "covers 10.7 % of the image against the radiologists' 10.8 %",
        CALIB,
        "area_matched/mean_area",
        "target_mean_area",
        scale=100,
    ),
    (CARD, "(mean Dice 0.350)", "0.350", CALIB, "area_matched/mean_dice", 1),
    (CARD, "is at 0.49 (0.388, masks of 20.1 %)", "0.49", CALIB, "best_dice/threshold", 1),
    (CARD, "is at 0.49 (0.388, masks of 20.1 %)", "0.388", CALIB, "best_dice/mean_dice", 1),
    (CARD, "is at 0.49 (0.388, masks of 20.1 %)", "20.1", CALIB, "best_dice/mean_area", 100),
    (CARD, "the former default 0.30 gave masks of 35.2 % (Dice 0.354)", "0.30", CALIB, "previous_threshold", 1),
    (CARD, "the former default 0.30 gave masks of 35.2 % (Dice 0.354)", "0.30", CALIB, "grid/80/threshold", 1),
    (CARD, "the former default 0.30 gave masks of 35.2 % (Dice 0.354)", "35.2", CALIB, "grid/80/mean_area", 100),
    (CARD, "the former default 0.30 gave masks of 35.2 % (Dice 0.354)", "0.354", CALIB, "grid/80/mean_dice", 1),
    (CARD, "`benchmarks/results/threshold_calibration.json`, 39 s on 2 CPU cores)", "39", CALIB, "seconds", 1),
]

# docs/slicer.md: the warm engine's image and the mask threshold
FIGURES += [
    *cells(
        SLICER,
        "(RG3_UNCR.dcm, 1760 × 1760, after RG1_UNCR.dcm)",
        WARM,
        "warm/second/size/0",
        "warm/second/size/1",
    ),
    (SLICER, "(the default model's 0.64 is calibrated", "0.64", CONFIG, "model/threshold", 1),
    (SLICER, "(the default model's 0.64 is calibrated", "0.64", CALIB, "recommended", 1),
]

# README: the engine benchmark's radiograph and the machine of the end-to-end run
FIGURES += [
    *cells(
        R,
        "`localize` RG1_UNCR.dcm (1955 × 1841) with 13 prompts",
        ENGINE_CPU,
        "cold_start/image_shape/0",
        "cold_start/image_shape/1",
        None,  # 13 prompts: the benchmark's setting
    ),
    (R, "`--preset cxr` prompts, on the same 2 cores:", "2", CLI, "machine/cpu_cores", 1),
]

# the model card and README repeat rows of docs/results.md word for word: those figures are checked there too
_PAGE_TEXT = {page: (REPO / page).read_text() for page in (CARD, R)}
_SEEN = {(row[0], row[1], row[2], row[4]) for row in FIGURES}
FIGURES += [
    (page, *row[1:])
    for page in (CARD, R)
    for row in list(FIGURES)
    if row[0] == RES_MD and row[1] in _PAGE_TEXT[page] and (page, row[1], row[2], row[4]) not in _SEEN
]

# result files of timing benchmarks: they must say which machine they ran on
TIMED = [ENGINE_CPU, WARM, FAULTS, FT_K5, CLI]


@cache
def load(path: str) -> Any:  # noqa: ANN401
    return json.loads((REPO / path).read_text())


def lookup(data: Any, key_path: str) -> Any:  # noqa: ANN401
    for key in key_path.split("/"):
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


def decimals(figure: str) -> int:
    mantissa = figure.lower().split("e")[0]
    return len(mantissa.split(".")[1]) if "." in mantissa else 0


def matches(figure: str, value: float) -> bool:
    """Whether ``figure`` (as written) is ``value`` rounded to the figure's own precision: within half a unit
    of its last digit (so 28.5 may be written 28 or 29, as either rounding rule gives)."""
    mantissa, exponent = (figure.lower().split("e") + ["0"])[:2]
    half_unit = 0.5 * 10 ** -decimals(figure)
    return abs(value / 10 ** int(exponent) - float(mantissa)) <= half_unit * (1 + 1e-9)


@pytest.mark.parametrize(
    ("page", "piece", "figure", "source", "key_path", "scale"),
    FIGURES,
    ids=[f"{p}:{fig}:{src.split('/')[-1]}:{'.'.join(k.split('/')[-2:])}" for p, _, fig, src, k, _ in FIGURES],
)
def test_quoted_figure_equals_its_result_file(page, piece, figure, source, key_path, scale):
    text = (REPO / page).read_text()
    assert piece in text, f"{page} no longer says {piece!r}: update the registry with the page"
    assert figure in piece, f"registry row: {figure!r} is not in {piece!r}"
    value = float(lookup(load(source), key_path)) * scale
    assert matches(figure, value), f"{page} quotes {figure}; {source} [{key_path}] gives {value}"


@pytest.mark.parametrize("source", TIMED)
def test_timing_results_name_their_machine(source):
    machine = load(source)["machine"]
    assert isinstance(machine, dict), f"{source}: machine must be a record (CPU model, cores)"
    assert machine.get("cpu_model") and int(machine.get("cpu_cores", 0)) >= 1
    assert machine.get("command", "").startswith("python benchmarks/")


def test_every_result_file_quoted_is_committed():
    import subprocess

    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split())
    for source in sorted({row[3] for row in FIGURES}):
        assert Path(source).as_posix() in tracked, f"{source} is quoted by the docs but not committed"


def test_architecture_page_describes_the_shipped_model():
    """docs/architecture.md's input size, grid and smoothing are those of the shipped default model."""
    config = load("afloc_engine/weights/default/config.json")["model"]
    size, sigma = config["image_size"], config["smoothing_sigma"]
    grid = size // 16
    assert config["encoder_input_size"] in (None, size)
    page = (REPO / "docs" / "architecture.md").read_text()
    assert f"{grid} × {grid}" in page and f"σ = {sigma:g}" in page and f"{size} px" in page
    for stale in ("299 px", "19 × 19", "σ = 1.5 cells"):
        assert stale not in page, f"architecture.md still says {stale}"


def test_every_result_file_the_docs_name_exists():
    """Each ``benchmarks/results/*.json`` or ``docs/results/*.json`` a page names (or links relative to
    docs/) is in the repository, so a reader can check the figure beside it."""
    import re

    pages = ["README.md", "training/README.md", CARD, *(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
    named = set()
    for page in pages:
        text = (REPO / page).read_text()
        named |= set(re.findall(r"(?:benchmarks|docs)/results/[\w./-]+\.json", text))
        if page.startswith("docs/"):
            named |= {f"docs/{m}" for m in re.findall(r"\]\((results/[\w./-]+\.json)\)", text)}
    assert named
    missing = sorted(n for n in named if not (REPO / n).is_file())
    assert not missing, f"pages name result files that are not in the repository: {missing}"


# --- figures computed from result files (differences, ranges, counts, medians) --------------------------------
def val(source: str, key_path: str) -> float:
    return float(lookup(load(source), key_path))


def setting_b_spread(metric: str) -> float:
    """Largest minus smallest ground-glass ``metric`` over setting B's four loss variants (§2)."""
    values = [
        val(ABL_B, f"{kind(m, GG)}/{metric}/mean") for m in ("global_only", "sentence_only", "word_global", "all_three")
    ]
    return max(values) - min(values)


AT_03, ZS_5, ZS_10 = "dice_by_threshold/0.3", "calibrated/5/zero_shot_dice", "calibrated/10/zero_shot_dice"


def gap(source_a: str, key_a: str, source_b: str, key_b: str) -> Callable[[], float]:
    """A figure that is one result minus another: ``source_a[key_a] - source_b[key_b]``."""
    return lambda: val(source_a, key_a) - val(source_b, key_b)


def draw(source: str, k: int, i: int) -> dict:
    """Draw ``i`` of the ``k``-shot runs of a finetune benchmark's JSON."""
    return next(d for d in load(source)["draws"] if d["k"] == k and d["draw"] == i)


def k_draws(source: str, k: int) -> list[dict]:
    return [d for d in load(source)["draws"] if d["k"] == k]


def median_of(source: str, k: int, field: str) -> float:
    return statistics.median(d[field] for d in k_draws(source, k))


def median_vs_mean(outcome: str) -> float:
    """How the members' median (finetune_cpu_median) fares against their mean (finetune_cpu_bag), draw by draw
    at k = 3, 5, 10 (Dice to 3 decimals): the count of 'win', 'lose' or 'tie', or 'worst' (largest loss)."""
    tally = {"win": 0, "lose": 0, "tie": 0, "worst": 0.0}
    for k in (3, 5, 10):
        for a, b in zip(k_draws(FT_MED, k), k_draws(FT_BAG, k), strict=True):
            med, mean = round(a["finetune_dice"], 3), round(b["finetune_dice"], 3)
            tally["win" if med > mean else "lose" if med < mean else "tie"] += 1
            if med < mean:
                tally["worst"] = max(tally["worst"], b["finetune_dice"] - a["finetune_dice"])
    return tally[outcome]


def kept_zero_shot() -> int:
    """H100 draws with k ≥ 3 whose adapter kept the zero-shot map exactly (CV weight 0)."""
    return sum(d["finetune_dice"] == d["zero_shot_dice"] for s in (H3, H510) for d in load(s)["draws"])


def gain(source: str, row: int) -> float:
    """Fine-tune minus zero-shot Dice (means) of one k of a finetune benchmark."""
    return val(source, f"summary/{row}/finetune_dice/0") - val(source, f"summary/{row}/zero_shot_dice/0")


def per_prompt(field: str) -> list[float]:
    return [p[field] for p in lookup(load(CXD), f"{SPEC}/per_prompt").values()]


GGO_N = f"{GGO}/n"

# (page, text around the figure, the figure, how it follows from the result files)
DERIVED: list[tuple[str, str, str, Callable[[], float]]] = [
    # §1 and the page head
    (
        RES_MD,
        "(61 images, 58 of them with radiologist masks",
        "61",
        lambda: (
            len({r["image_id"] for r in load(EVAL)["per_image"]["default"]["classification"]})
            + load(EVAL)["skipped_counts"]["no masks"]
        ),
    ),
    (
        RES_MD,
        "(61 images, 58 of them with radiologist masks",
        "58",
        lambda: len({r["image_id"] for r in load(EVAL)["per_image"]["default"]["classification"]}),
    ),
    # §2: the spread of setting B's four variants (simple prompt, ground-glass opacity)
    (RES_MD, "differ by at most 0.005 IoU and\n0.017 CNR", "0.005", lambda: setting_b_spread("iou")),
    (RES_MD, "differ by at most 0.005 IoU and\n0.017 CNR", "0.017", lambda: setting_b_spread("cnr")),
    # §3: protocol, the draw-by-draw comparison, the H100 table's medians, the targets, the failing draw
    (
        RES_MD,
        "patients (35–55 images)",
        "35",
        lambda: min(d["n_eval"] for s in (FT_CV, FT_MED) for d in load(s)["draws"]),
    ),
    (
        RES_MD,
        "patients (35–55 images)",
        "55",
        lambda: max(d["n_eval"] for s in (FT_CV, FT_MED) for d in load(s)["draws"]),
    ),
    (RES_MD, "the median beats the mean on 5 of the 15", "5", lambda: median_vs_mean("win")),
    (
        RES_MD,
        "the median beats the mean on 5 of the 15",
        "15",
        lambda: sum(median_vs_mean(o) for o in ("win", "lose", "tie")),
    ),
    (RES_MD, "loses on 3 (by 0.009 at most) and ties\non 7", "3", lambda: median_vs_mean("lose")),
    (RES_MD, "loses on 3 (by 0.009 at most) and ties\non 7", "0.009", lambda: median_vs_mean("worst")),
    (RES_MD, "loses on 3 (by 0.009 at most) and ties\non 7", "7", lambda: median_vs_mean("tie")),
    (RES_MD, "there the main head alone scores 0.44", "0.44", lambda: draw(FT_CV, 5, 0)["finetune_dice"]),
    (RES_MD, "corrections 0.11, their\nmedian 0.40.", "0.11", lambda: draw(FT_BAG, 5, 0)["finetune_dice"]),
    (RES_MD, "corrections 0.11, their\nmedian 0.40.", "0.40", lambda: draw(FT_MED, 5, 0)["finetune_dice"]),
    (
        RES_MD,
        "| 1 | 0.372 ± 0.008 | 0.294 ± 0.165 | (no fold) | 0.287 ± 0.108 | 2.1 s | 39 s |",
        "2.1",
        lambda: median_of(H1, 1, "finetune_seconds"),
    ),
    (
        RES_MD,
        "| 1 | 0.372 ± 0.008 | 0.294 ± 0.165 | (no fold) | 0.287 ± 0.108 | 2.1 s | 39 s |",
        "39",
        lambda: median_of(H1, 1, "unet_seconds"),
    ),
    (RES_MD, "| **0.405** ± 0.053 | — | 8.9 s |", "8.9", lambda: median_of(H3, 3, "finetune_seconds")),
    (RES_MD, "| 0.356 ± 0.101 | 7.9 s | 31.1 s |", "7.9", lambda: median_of(H510, 5, "finetune_seconds")),
    (RES_MD, "| 0.356 ± 0.101 | 7.9 s | 31.1 s |", "31.1", lambda: median_of(HNOCV, 5, "unet_seconds")),
    (RES_MD, "| 0.396 ± 0.035 | 7.4 s | 28.8 s |", "7.4", lambda: median_of(H510, 10, "finetune_seconds")),
    (RES_MD, "| 0.396 ± 0.035 | 7.4 s | 28.8 s |", "28.8", lambda: median_of(HNOCV, 10, "unet_seconds")),
    (RES_MD, "given as means, 30.9 and 28.6 s", "30.9", lambda: val(HNOCV, "summary/0/unet_seconds/0")),
    (RES_MD, "given as means, 30.9 and 28.6 s", "28.6", lambda: val(HNOCV, "summary/1/unet_seconds/0")),
    (RES_MD, "and 7.9 s on the H100\n  (≤ 10 s)", "7.9", lambda: median_of(H510, 5, "finetune_seconds")),
    (
        RES_MD,
        "6.3 s on the CPU at k = 1, 1.2–2.2 s on the H100",
        "6.3",
        lambda: median_of(FT_CV, 1, "finetune_seconds"),
    ),
    (
        RES_MD,
        "6.3 s on the CPU at k = 1, 1.2–2.2 s on the H100",
        "1.2",
        lambda: median_of(HNOCV, 10, "finetune_seconds"),
    ),
    (
        RES_MD,
        "6.3 s on the CPU at k = 1, 1.2–2.2 s on the H100",
        "2.2",
        lambda: median_of(HNOCV, 5, "finetune_seconds"),
    ),
    (RES_MD, "The gains are +0.05 at k = 10 and k = 3 and\n  +0.01 at k = 5", "0.05", lambda: gain(FT_MED, 2)),
    (RES_MD, "The gains are +0.05 at k = 10 and k = 3 and\n  +0.01 at k = 5", "0.05", lambda: gain(FT_MED, 0)),
    (RES_MD, "The gains are +0.05 at k = 10 and k = 3 and\n  +0.01 at k = 5", "0.01", lambda: gain(FT_MED, 1)),
    (RES_MD, "(the median default; the CV weight alone +0.014)", "0.014", lambda: gain(FT_CV, 2)),
    (
        RES_MD,
        "lose (0.03–0.44\nover the CPU and H100 runs",
        "0.03",
        lambda: min(draw(s, 5, 0)["finetune_dice"] for s in (FT_CV, FT_BAG, FT_MED, H510, HNOCV)),
    ),
    (
        RES_MD,
        "lose (0.03–0.44\nover the CPU and H100 runs",
        "0.44",
        lambda: max(draw(s, 5, 0)["finetune_dice"] for s in (FT_CV, FT_BAG, FT_MED, H510, HNOCV)),
    ),
    (
        RES_MD,
        "k = 1 draw 2 (Dice 0.01–0.04)",
        "0.01",
        lambda: min(draw(s, 1, 2)["finetune_dice"] for s in (FT_CV, FT_BAG, H1)),
    ),
    (
        RES_MD,
        "k = 1 draw 2 (Dice 0.01–0.04)",
        "0.04",
        lambda: max(draw(s, 1, 2)["finetune_dice"] for s in (FT_CV, FT_BAG, H1)),
    ),
    (RES_MD, "(Dice 0.387 → 0.442 on 37 images", "0.387", lambda: draw(FT_MED, 10, 0)["zero_shot_dice"]),
    (RES_MD, "(Dice 0.387 → 0.442 on 37 images", "0.442", lambda: draw(FT_MED, 10, 0)["finetune_dice"]),
    (RES_MD, "(Dice 0.387 → 0.442 on 37 images", "37", lambda: draw(FT_MED, 10, 0)["n_eval"]),
    # §3: the ceilings (benchmarks/finetune_ceiling.py, the k = 30 run)
    (
        RES_MD,
        "about 0.39 (the zero-shot Dice of the k = 5 draws below) to about 0.54",
        "0.39",
        lambda: val(CEIL, "calibrated/5/zero_shot_dice"),
    ),
    (
        RES_MD,
        "about 0.39 (the zero-shot Dice of the k = 5 draws below) to about 0.54",
        "0.54",
        lambda: val(CEIL, "calibrated/5/zero_shot_dice") + 0.15,
    ),
    (
        RES_MD,
        "| best single threshold (0.45), chosen",
        "0.45",
        lambda: float(max(load(CEIL)["dice_by_threshold"].items(), key=lambda kv: kv[1])[0]),
    ),
    *(  # the ceiling study's gains over its baseline rows (benchmarks/finetune_ceiling.py)
        (RES_MD, piece, figure, gap(CEIL, key, CEIL, base))
        for piece, figure, key, base in [
            ("themselves | 0.403 | +0.027 |", "0.027", "dice_by_threshold/0.45", AT_03),
            ("(200 draws) | 0.400 ± 0.025 | +0.014 |", "0.014", "calibrated/5/calibrated_dice", ZS_5),
            ("(200 draws) | 0.411 ± 0.031 | +0.024 |", "0.024", "calibrated/10/calibrated_dice", ZS_10),
            ("from its own mask | 0.464 | +0.088 |", "0.088", "oracle_per_image_threshold", AT_03),
            ("lung masks alone | 0.408 | +0.032 |", "0.032", "oracle_lungs_only", AT_03),
            ("inside the radiologists' lung masks | 0.456 | +0.080 |", "0.080", "oracle_heat_and_lungs/0.4", AT_03),
        ]
    ),
    (RES_MD, "13–21 evaluation images", "13", lambda: min(d["n_eval"] for d in load(FT_K30)["draws"])),
    (RES_MD, "13–21 evaluation images", "21", lambda: max(d["n_eval"] for d in load(FT_K30)["draws"])),
    (RES_MD, "| 0.460 ± 0.029 | **+0.113** over its zero-shot |", "0.113", lambda: gain(FT_K30, 0)),
    (RES_MD, "gets more than +0.09;", "0.09", gap(CEIL, "oracle_per_image_threshold", CEIL, "dice_by_threshold/0.3")),
    (RES_MD, "reaches +0.05 with 3 or 10 masks and\n+0.11 with 30", "0.05", lambda: gain(FT_MED, 0)),
    (RES_MD, "reaches +0.05 with 3 or 10 masks and\n+0.11 with 30", "0.11", lambda: gain(FT_K30, 0)),
    (RES_MD, "(more than half of the 56 dev masks)", "56", lambda: val(EVAL, GGO_N)),
    (RES_MD, "moved a 5-shot Dice from 0.44 to 0.03", "0.44", lambda: draw(FT_CV, 5, 0)["finetune_dice"]),
    (RES_MD, "moved a 5-shot Dice from 0.44 to 0.03", "0.03", lambda: draw(HNOCV, 5, 0)["finetune_dice"]),
    (RES_MD, "8 of the 15 H100 draws with k ≥ 3 keep the zero-shot map exactly", "8", kept_zero_shot),
    (
        RES_MD,
        "8 of the 15 H100 draws with k ≥ 3 keep the zero-shot map exactly",
        "15",
        lambda: len(load(H3)["draws"]) + len(load(H510)["draws"]),
    ),
    (
        RES_MD,
        "at k = 10 they add +0.03 over the weight alone, better on 4 of 5 draws",
        "0.03",
        gap(FT_MED, "summary/2/finetune_dice/0", FT_CV, "summary/3/finetune_dice/0"),
    ),
    (
        RES_MD,
        "at k = 10 they add +0.03 over the weight alone, better on 4 of 5 draws",
        "4",
        lambda: sum(
            a["finetune_dice"] > b["finetune_dice"]
            for a, b in zip(k_draws(FT_MED, 10), k_draws(FT_CV, 10), strict=True)
        ),
    ),
    # §4
    (RES_MD, "(the 11 findings with ≥ 3 outlines", "11", lambda: len(load(CXD)["specificity"]["counted"])),
    (
        RES_MD,
        "(`nih-cxr14-sample`, all 923 images:",
        "923",
        lambda: sum(val(NIH, f"dataset/counts/effusion/{n}_evaluated") for n in ("positive", "negative")),
    ),
    (
        RES_MD,
        "missed by about 0.2 each.",
        "0.2",
        lambda: 0.70 - val(NIH, "results/default/overall/simple/auroc/value"),
    ),
    (RES_MD, "(missed by 0.17; chance 0.077)", "0.17", lambda: 0.25 - val(CXD, f"{SPEC}/model/top1/mean")),
    (RES_MD, "mean rank 6.83 vs ≤ 4 (by\n  2.8)", "2.8", lambda: val(CXD, f"{SPEC}/model/mean_rank/mean") - 4),
    (RES_MD, "- Invariance r = 0.71 vs ≤ 0.4 (by 0.31)", "0.31", lambda: val(CXD, f"{SPEC}/invariance/mean") - 0.4),
    (
        RES_MD,
        "(below the fixed prior by 0.037 IoU and 0.30 CNR)",
        "0.037",
        gap(CXD, f"{kind('prior', CO, 'all')}/iou/mean", CXD, f"{kind('default', CO)}/iou/mean"),
    ),
    (
        RES_MD,
        "(below the fixed prior by 0.037 IoU and 0.30 CNR)",
        "0.30",
        gap(CXD, f"{kind('prior', CO, 'all')}/cnr/mean", CXD, f"{kind('default', CO)}/cnr/mean"),
    ),
    (
        RES_MD,
        "(below the lung-field estimate by 0.049 IoU and 0.18 CNR)",
        "0.049",
        lambda: (
            val(TBX, f"{kind('lung_field', 'tuberculosis', 'all')}/iou/mean")
            - val(TBX, f"{kind('default', 'tuberculosis')}/iou/mean")
        ),
    ),
    (
        RES_MD,
        "(below the lung-field estimate by 0.049 IoU and 0.18 CNR)",
        "0.18",
        lambda: (
            val(TBX, f"{kind('lung_field', 'tuberculosis', 'all')}/cnr/mean")
            - val(TBX, f"{kind('default', 'tuberculosis')}/cnr/mean")
        ),
    ),
    (RES_MD, "missed by 0.17–0.23 (0.47–0.53, chance)", "0.17", lambda: 0.70 - max(nih_aurocs())),
    (RES_MD, "missed by 0.17–0.23 (0.47–0.53, chance)", "0.23", lambda: 0.70 - min(nih_aurocs())),
    (RES_MD, "missed by 0.17–0.23 (0.47–0.53, chance)", "0.47", lambda: min(nih_aurocs())),
    (RES_MD, "missed by 0.17–0.23 (0.47–0.53, chance)", "0.53", lambda: max(nih_aurocs())),
    (RES_MD, "mean specificity 0.22–0.44 per prompt", "0.22", lambda: min(per_prompt("specificity_mean"))),
    (RES_MD, "mean specificity 0.22–0.44 per prompt", "0.44", lambda: max(per_prompt("specificity_mean"))),
    (
        RES_MD,
        "mean lung r 0.19 (nodule) to 0.61 (emphysema)",
        "0.19",
        lambda: lookup(load(CXD), f"{SPEC}/per_prompt/nodule/lung_correlation_mean"),
    ),
    (
        RES_MD,
        "mean lung r 0.19 (nodule) to 0.61 (emphysema)",
        "0.61",
        lambda: lookup(load(CXD), f"{SPEC}/per_prompt/emphysema/lung_correlation_mean"),
    ),
    (
        RES_MD,
        "the warning fires on\n81–98 % of images for 9 of the 13 prompts and on 30–45 %",
        "81",
        lambda: 100 * min(v for v in per_prompt("warned_fraction") if v > 0.5),
    ),
    (
        RES_MD,
        "the warning fires on\n81–98 % of images for 9 of the 13 prompts and on 30–45 %",
        "98",
        lambda: 100 * max(per_prompt("warned_fraction")),
    ),
    (
        RES_MD,
        "the warning fires on\n81–98 % of images for 9 of the 13 prompts and on 30–45 %",
        "9",
        lambda: sum(v > 0.5 for v in per_prompt("warned_fraction")),
    ),
    (
        RES_MD,
        "the warning fires on\n81–98 % of images for 9 of the 13 prompts and on 30–45 %",
        "13",
        lambda: len(per_prompt("warned_fraction")),
    ),
    (
        RES_MD,
        "the warning fires on\n81–98 % of images for 9 of the 13 prompts and on 30–45 %",
        "30",
        lambda: 100 * min(per_prompt("warned_fraction")),
    ),
    (
        RES_MD,
        "the warning fires on\n81–98 % of images for 9 of the 13 prompts and on 30–45 %",
        "45",
        lambda: 100 * max(v for v in per_prompt("warned_fraction") if v < 0.5),
    ),
    (
        RES_MD,
        "(`--split dev`, 308 images)",
        "308",
        lambda: sum(val(NIH_DEV, f"dataset/counts/effusion/{n}_evaluated") for n in ("positive", "negative")),
    ),
    (RES_MD, "held-out NIH patients up by\n0.04–0.06", "0.04", lambda: min(nih_dev_gains())),
    (RES_MD, "held-out NIH patients up by\n0.04–0.06", "0.06", lambda: max(nih_dev_gains())),
    (
        CONVERT_MD,
        "3 covid-cxr radiographs, 3 prompts",
        "3",
        lambda: len(load(PIECES)["images"]) if len(load(PIECES)["images"]) == len(load(PIECES)["prompts"]) else -1,
    ),
    (
        CONVERT_MD,
        "switching any one piece\nback to the engine's choice moves it by 0.0159",
        "0.0159",
        lambda: min(r["max_abs_diff"] for r in load(PIECES)["rows"][1:]),
    ),
    (
        CONVERT_MD,
        "to 1.26 (cosine instead of the dot\nproduct)",
        "1.26",
        lambda: max(r["max_abs_diff"] for r in load(PIECES)["rows"][1:]),
    ),
    (
        RES_MD,
        "at the shipped threshold 0.64,\n  +0.02 at k = 5",
        "0.02",
        lambda: gain(FT_K5, 0),
    ),
    (
        RES_MD,
        "the\n  0.64 re-run's median draw took 17.6 s)",
        "17.6",
        lambda: median_of(FT_K5, 5, "finetune_seconds"),
    ),
]


def v3_file(run: int, dataset: str) -> str:
    """The result file of column ``run`` (0: v2) of the attempt-2 table for one set."""
    return V3_RUNS[run][0][dataset]


def v3_val(run: int, dataset: str, key: Callable[[str], str]) -> float:
    return val(v3_file(run, dataset), key(V3_RUNS[run][1]))


def v3_finding(run: int, finding: str, measure: str) -> float:
    return v3_val(run, "chestx_det", lambda n: f"{_spec(n)}/model/per_finding/{finding}/{measure}")


V3_CONSOLIDATION_LOSS = [  # v2's covid-cxr dev consolidation IoU minus each variant's
    v3_val(0, "covid_dev", lambda n: f"{kind(n, CO)}/iou/mean")
    - v3_val(i, "covid_dev", lambda n: f"{kind(n, CO)}/iou/mean")
    for i in (1, 2, 3)
]
V3_NIH_GAIN = [
    v3_val(3, "nih_auroc_dev", lambda n, f=f: f"{kind(n, f)}/auroc/value")
    - v3_val(0, "nih_auroc_dev", lambda n, f=f: f"{kind(n, f)}/auroc/value")
    for f in ("effusion", "atelectasis", "edema")
]
LOSES = "each loses 0.034–0.058 IoU on covid-cxr dev"
DERIVED += [
    (RES_MD, LOSES, "0.034", lambda: min(V3_CONSOLIDATION_LOSS)),
    (RES_MD, LOSES, "0.058", lambda: max(V3_CONSOLIDATION_LOSS)),
    (RES_MD, "0.57, up 0.06–0.13)", "0.06", lambda: min(V3_NIH_GAIN)),
    (RES_MD, "0.57, up 0.06–0.13)", "0.13", lambda: max(V3_NIH_GAIN)),
    (RES_MD, "top-1 went from 0.00 to 0.67 (1 epoch)", "0.00", lambda: v3_finding(0, "cardiomegaly", "top1")),
    (RES_MD, "top-1 went from 0.00 to 0.67 (1 epoch)", "0.67", lambda: v3_finding(1, "cardiomegaly", "top1")),
    (RES_MD, "and 0.83 (3 epochs), emphysema's", "0.83", lambda: v3_finding(2, "cardiomegaly", "top1")),
    (RES_MD, "emphysema's from 0.33 to 0.50", "0.33", lambda: v3_finding(0, "emphysema", "top1")),
    (RES_MD, "emphysema's from 0.33 to 0.50", "0.50", lambda: v3_finding(1, "emphysema", "top1")),
    (RES_MD, "pneumothorax's mean rank from 7.5 to 4.0", "7.5", lambda: v3_finding(0, "pneumothorax", "mean_rank")),
    (RES_MD, "pneumothorax's mean rank from 7.5 to 4.0", "4.0", lambda: v3_finding(1, "pneumothorax", "mean_rank")),
    (
        RES_MD,
        "stayed at 0.05 or below",
        "0.05",
        lambda: max(v3_finding(i, "effusion", "top1") for i in range(4)),
    ),
]


def nih_aurocs() -> list[float]:
    """v2's zero-shot AUROCs on all NIH images, simple and precise prompts (edema has only the simple one)."""
    return [
        val(NIH, f"{kind('default', f, k)}/auroc/value")
        for f in ("effusion", "atelectasis", "edema")
        for k in ("simple", "precise")
        if k in lookup(load(NIH), f"results/default/findings/{f}/kinds")
    ]


def nih_dev_gains() -> list[float]:
    """Stage-3 try minus v2 AUROC on the held-out NIH patients, simple prompts."""
    return [
        val(NIH3, f"{kind('model', f)}/auroc/value") - val(NIH_DEV, f"{kind('default', f)}/auroc/value")
        for f in ("effusion", "atelectasis", "edema")
    ]


def images_of(source: str) -> int:
    """The images an evaluation.json classified (each image once, whatever its findings)."""
    return len({r["image_id"] for r in load(source)["per_image"]["default"]["classification"]})


# the model card: the NIH AUROC row's image count
DERIVED += [(CARD, "(simple prompts, 923 images)", "923", lambda: images_of(NIH))]

# README: the H100 run's CPU threads (engine_gpu.json names its machine in one string)
DERIVED += [
    (R, "16 CPU threads, torch 2.11)", "16", lambda: int(re.search(r"(\d+) threads", load(ENGINE_GPU)["machine"])[1])),
]

# docs/slicer.md: the warm second click's export and import, the later warm clicks' range
DERIVED += [
    (
        SLICER,
        "0.60 s; export and import 0.25 s)",
        "0.25",
        gap(WARM, "warm/second/seconds", WARM, "warm/second/engine_seconds"),
    ),
    (
        SLICER,
        "took 0.84 to 1.21 s (median 0.85 s)",
        "0.84",
        lambda: min(lookup(load(WARM), "warm/later_clicks_seconds")),
    ),
    (
        SLICER,
        "took 0.84 to 1.21 s (median 0.85 s)",
        "1.21",
        lambda: max(lookup(load(WARM), "warm/later_clicks_seconds")),
    ),
]


@pytest.mark.parametrize(
    ("page", "piece", "figure", "compute"),
    DERIVED,
    ids=[f"{p}:{fig}:{' '.join(piece.split())[:40]}" for p, piece, fig, _ in DERIVED],
)
def test_derived_figure_follows_from_its_result_files(page, piece, figure, compute):
    """A difference, range end, count or median the page quotes equals the one computed from the JSON."""
    text = (REPO / page).read_text()
    assert piece in text, f"{page} no longer says {piece!r}: update DERIVED with the page"
    assert figure in NUMBER.findall(piece), f"registry row: {figure!r} is not a number of {piece!r}"
    value = float(compute())
    assert matches(figure, value), f"{page} quotes {figure} in {piece!r}; the result files give {value}"
