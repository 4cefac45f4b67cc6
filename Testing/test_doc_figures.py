"""Every figure the docs quote equals the number in the committed result file it came from.

``FIGURES`` is the registry: (page, a piece of the page's text holding the figure, the figure as written,
result file, key path, scale). The piece must occur in the page (so a figure edited in the text without
its file, or the other way round, fails here), and the figure must equal ``value * scale`` rounded to the
figure's own decimals. A page quoting a new figure adds a row; a re-run benchmark that moves a figure
fails this test until the page is updated.
"""

from __future__ import annotations

import json
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

# result files of timing benchmarks: they must say which machine they ran on
TIMED = [ENGINE_CPU, WARM]


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
    """Whether ``figure`` (as written) is ``value`` rounded to the figure's own precision."""
    if "e" in figure.lower():
        exponent = int(figure.lower().split("e")[1])
        return round(value / 10**exponent, decimals(figure)) == float(figure.lower().split("e")[0])
    return round(value, decimals(figure)) == float(figure)


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
