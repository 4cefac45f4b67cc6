"""`afloc localize` end to end, as a user runs it (issue 13 item 6): a cold process, the real
radiograph RG1_UNCR.dcm (pydicom-data, 1841 x 1955), the 14 prompts of ``--preset cxr``.

Run by hand (the machine may be shared: each figure is the median of ``--runs`` runs)::

    .venv/bin/python benchmarks/localize_cli.py [--runs 5] [--old-tree /tmp/old] [--imports]
        [--new-prompt "Small left pleural effusion"] [--json OUT.json]

Measures per run the wall time of ``python -m afloc_engine localize RG1_UNCR.dcm --preset cxr``
in a fresh process, the bytes it wrote and its peak memory; then, in this process, the largest
difference between the heatmap files and ``model.localize(...)``'s heatmaps. With ``--old-tree``
(a worktree of an earlier commit: ``git worktree add /tmp/old COMMIT``) the same command is timed
with that tree's engine, alternating with the current one, so both see the same machine load.
Writes OUT.json (default ``benchmarks/results/localize_cli-<host>.json``) with the machine
(CPU model, cores; ``benchmarks/machine.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _sample() -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        raise SystemExit("pydicom-data is not installed (it holds RG1_UNCR.dcm)")
    return Path(path)


def _commit(tree: Path) -> str:
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def run_once(tree: Path, image: Path, extra: list[str]) -> dict[str, Any]:
    """One cold ``afloc localize`` with the engine of ``tree``: wall seconds, bytes written, peak MiB."""
    out = Path(tempfile.mkdtemp(prefix="afloc-bench-"))
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONWARNINGS": "ignore"}
    # /usr/bin/time: the child's own peak RSS (KiB) and CPU seconds (user + system), which other
    # processes on a shared machine inflate less than the wall time
    timer = ["/usr/bin/time", "-f", "PEAK_KB=%M CPU_S=%U+%S"] if Path("/usr/bin/time").exists() else []
    command = [*timer, sys.executable, "-m", "afloc_engine", "localize", str(image), "--preset", "cxr"]
    command += ["--out", str(out / "o"), "--progress", "none", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        raise SystemExit(f"afloc localize failed in {tree} (exit {done.returncode}):\n{done.stderr[-2000:]}")
    files = [p for p in (out / "o").rglob("*") if p.is_file()]
    timing = [line.split() for line in done.stderr.splitlines() if line.startswith("PEAK_KB=")]
    peak = [timing[-1][0]] if timing else []
    cpu = round(sum(float(v) for v in timing[-1][1].split("=")[1].split("+")), 2) if timing else None
    record = {
        "wall_s": round(wall, 3),
        "cpu_s": cpu,
        "output_bytes": sum(p.stat().st_size for p in files),
        "output_files": len(files),
        "peak_mib": round(int(peak[-1].split("=")[1]) / 1024, 1) if peak else None,
        "load_average_before": None,
        "folder": str(out),
    }
    return record


PHASES = r"""
import json, sys, tempfile, time, warnings
warnings.simplefilter("ignore")
t = [time.perf_counter()]
def lap():
    t.append(time.perf_counter())
    return round(t[-1] - t[-2], 3)
import gc
gc.set_threshold(10_000, 10, 10)  # as the console script
import torch
out = {"import_torch_s": lap()}
try:  # as the console script: MONAI without its optional BERT
    from afloc_engine.cli import import_monai_without_transformers
except ImportError:  # an engine from before it
    import monai
else:
    import_monai_without_transformers()
out["import_monai_s"] = lap()
import afloc_engine
from afloc_engine.io import read_image
from afloc_engine.outputs import write_results
from afloc_engine.prompts import preset_prompts
out["import_engine_s"] = lap()
image = read_image(sys.argv[1])
out["read_image_s"] = lap()
model = afloc_engine.load_model("default", "cpu")
out["load_model_s"] = lap()
result = model.localize(image, preset_prompts("cxr"))
out["localize_s"] = lap()
write_results(result, __import__("pathlib").Path(tempfile.mkdtemp()) / "o")
out["write_results_s"] = lap()
out["total_s"] = round(t[-1] - t[0], 3)
print(json.dumps(out))
"""


def phases(tree: Path, image: Path) -> dict[str, Any]:
    """One cold process timing each phase in turn (imports, read, model load, localize, write_results)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", PHASES, str(image)], cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def import_profile(tree: Path, image: Path, top: int = 12) -> dict[str, Any]:
    """One more cold run under ``python -X importtime``: its wall time and the slowest top-level imports
    (cumulative seconds, nested imports included), to show what the cold start spends on imports."""
    out = Path(tempfile.mkdtemp(prefix="afloc-bench-imports-"))
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-X", "importtime", "-m", "afloc_engine", "localize", str(image), "--preset", "cxr"]
    start = time.perf_counter()
    done = subprocess.run(
        [*command, "--out", str(out / "o"), "--progress", "none"], cwd=tree, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    imports: dict[str, float] = {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        _, cumulative, name = line.split("|")
        if cumulative.strip().isdigit() and len(name) - len(name.lstrip()) <= 1:  # top level only
            imports[name.strip()] = imports.get(name.strip(), 0.0) + int(cumulative) / 1e6
    slowest = sorted(imports.items(), key=lambda kv: -kv[1])[:top]
    return {
        "wall_s": round(wall, 2),
        "imports_s": round(sum(imports.values()), 2),
        "slowest_top_level_imports_s": {k: round(v, 2) for k, v in slowest},
    }


def recoverability(folder: Path, image: Path) -> dict[str, Any]:
    """Largest |heatmap file - model.localize heatmap| over the 14 prompts (the files' value step)."""
    import numpy as np
    import SimpleITK as sitk

    import afloc_engine
    from afloc_engine.prompts import preset_prompts

    result = afloc_engine.load_model("default", "cpu").localize(str(image), preset_prompts("cxr"))
    data = json.loads((folder / "results.json").read_text())
    worst = 0.0
    for entry, heat in zip(data["prompts"], result.heatmaps):
        stored = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / entry["heatmap"])))
        worst = max(worst, float(np.abs(stored - heat).max()))
    return {"max_abs_error": round(worst, 6), "value_step": data.get("heatmap_value_step")}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "median_wall_s": round(statistics.median(r["wall_s"] for r in runs), 2),
        "min_wall_s": round(min(r["wall_s"] for r in runs), 2),
        "median_cpu_s": statistics.median(r["cpu_s"] for r in runs) if runs[0]["cpu_s"] is not None else None,
        "output_mb": round(statistics.median(r["output_bytes"] for r in runs) / 1e6, 2),
        "output_files": runs[-1]["output_files"],
        "median_peak_mib": statistics.median(r["peak_mib"] for r in runs) if runs[0]["peak_mib"] else None,
        "runs": [{k: v for k, v in r.items() if k != "folder"} for r in runs],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="cold runs per engine (the median is reported)")
    parser.add_argument("--old-tree", type=Path, default=None, help="worktree of an earlier commit to time alike")
    parser.add_argument("--old-args", default="", help="extra arguments the old tree's localize needs")
    parser.add_argument("--imports", action="store_true", help="also profile the imports of one cold run")
    parser.add_argument(
        "--new-prompt",
        default=None,
        help="also time the current engine with this prompt added, one outside the model's prompt table "
        "(its run loads the text model)",
    )
    parser.add_argument("--json", type=Path, default=None, help="output JSON (default benchmarks/results/...)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import load_average, machine_info

    image = _sample()
    engines = {"current": (REPO, [])}
    if args.old_tree is not None:
        engines["old"] = (args.old_tree.resolve(), args.old_args.split())
    if args.new_prompt:
        engines["current_with_new_prompt"] = (REPO, ["--prompt", args.new_prompt])
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    for i in range(args.runs):
        for name, (tree, extra) in engines.items():  # alternate, so both see the same load
            load = load_average()
            record = run_once(tree, image, extra)
            record["load_average_before"] = load
            results[name].append(record)
            print(
                f"run {i + 1}/{args.runs} {name}: {record['wall_s']:.2f} s wall, {record['cpu_s']} s CPU, "
                f"{record['output_bytes'] / 1e6:.1f} MB, load {load}"
            )
    last = Path(results["current"][-1]["folder"]) / "o" / "RG1_UNCR"
    report: dict[str, Any] = {
        "benchmark": "afloc localize RG1_UNCR.dcm --preset cxr (14 prompts), cold process",
        "image": {"file": "RG1_UNCR.dcm (pydicom-data)", "size": [1841, 1955]},
        "machine": machine_info("cpu"),
        "current": {"commit": _commit(REPO), **summary(results["current"]), **recoverability(last, image)},
    }
    if args.new_prompt:
        report["current_with_new_prompt"] = {"prompt": args.new_prompt, **summary(results["current_with_new_prompt"])}
    if args.imports:
        report["current"]["import_profile"] = {"load_average_before": load_average(), **import_profile(REPO, image)}
        for name in ("current", "old")[: 1 + ("old" in engines)]:
            report.setdefault(name, {})["phases"] = {
                "load_average_before": load_average(),
                **phases(engines[name][0], image),
            }
    if "old" in results:
        report["old"] = {"commit": _commit(engines["old"][0]), **summary(results["old"]), **report.get("old", {})}
        # runs alternate, so run i of each engine saw about the same load: the median of the paired
        # ratios is steadier than the ratio of the medians when the machine's load drifts
        pairs = list(zip(results["old"], results["current"]))
        report["speedup_median_of_pairs"] = round(statistics.median(o["wall_s"] / c["wall_s"] for o, c in pairs), 2)
        report["speedup_of_medians"] = round(report["old"]["median_wall_s"] / report["current"]["median_wall_s"], 2)
        if all(o["cpu_s"] and c["cpu_s"] for o, c in pairs):
            report["cpu_ratio_median_of_pairs"] = round(statistics.median(o["cpu_s"] / c["cpu_s"] for o, c in pairs), 2)
        report["size_ratio"] = round(report["old"]["output_mb"] / report["current"]["output_mb"], 1)
    for records in results.values():
        for r in records:
            shutil.rmtree(Path(r["folder"]), ignore_errors=True)
    path = args.json or REPO / "benchmarks" / "results" / f"localize_cli-{platform.node() or 'host'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=1)[:3000])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
