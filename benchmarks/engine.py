"""Engine benchmarks (issue 2): batched local loss vs the reference loop; model load; localize; GPU batch.

Run by hand:  .venv/bin/python benchmarks/engine.py [--device cpu|cuda] [--json OUT.json]
Prints a table and writes OUT.json (default ``benchmarks/results/engine_<device>.json``) with the
machine it ran on (CPU model, cores, torch threads; ``benchmarks/machine.py``); the README quotes
its numbers from that file.

1. L_DS-sized local similarity (D=768, 19x19 deep regions, 12 sentences per report): the batched
   `local_similarity` vs the reference's Python loop over reports, forward + backward, B = 16, 64, 128.
2. Cold start: a fresh process that imports the engine and loads the default model (import and
   load timed apart), then localises the real radiograph RG1_UNCR.dcm with the 13 paper findings;
   peak RSS of that process.
3. With --device cuda: batched localisation throughput (radiographs/s), prepared 224 px inputs,
   ResNet-50 at 299 px internal, bf16, 13 prompts, heatmaps on the canvas.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import load_average, machine_info

from afloc_engine.losses import local_similarity

CHILD = r"""
import json, resource, sys, time, warnings
def peak_mb():
    # VmHWM: this process's own peak (ru_maxrss keeps the forking parent's high-water mark across exec)
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
import afloc_engine, afloc_engine.inference
t1 = time.perf_counter()
warnings.simplefilter("ignore")
model = afloc_engine.load_model(sys.argv[1], "cpu")
t2 = time.perf_counter()
from pydicom.data import get_testdata_file
from afloc_engine.io import read_image
from afloc_engine.prompts import preset_prompts
image = read_image(get_testdata_file("RG1_UNCR.dcm"))
prompts = preset_prompts("cxr")[:13]
model.localize(image, prompts)  # warm-up, fills the prompt cache
times = []
for _ in range(5):
    t = time.perf_counter(); model.localize(image, prompts); times.append(time.perf_counter() - t)
cold_prompts = [p + "." for p in prompts]
t = time.perf_counter(); model.localize(image, cold_prompts); cold = time.perf_counter() - t
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "localize_13_prompts_s": sorted(times)[2],
                  "localize_13_new_prompts_s": cold, "image_shape": list(image.array.shape),
                  "peak_rss_mb": peak_mb(),
                  "trained": model.info.trained, "model_id": model.model_id}))
"""


def reference_loop(regions, text, mask, tau1=4.0, tau2=5.0):
    """The reference's loop over reports (each against all images), as in GLoRIA/AFLoc."""
    cols = []
    for t in range(text.shape[0]):
        units = text[t][mask[t]]  # (n, D)
        s = torch.einsum("nd,bmd->bnm", units, regions)
        attn = torch.softmax(s, dim=1)
        attn = torch.softmax(attn * tau1, dim=2)
        context = torch.einsum("bnm,bmd->bnd", attn, regions)
        cos = torch.nn.functional.cosine_similarity(context, units.expand_as(context), dim=-1)
        cols.append(torch.logsumexp(cos * tau2, dim=1))
    return torch.stack(cols, dim=1)


def time_fn(fn, repeats=3):
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return sorted(out)[len(out) // 2]


def bench_loss(device, sizes=(16, 64, 128)):
    rows = []
    for b in sizes:
        g = torch.Generator().manual_seed(0)
        regions = torch.randn(b, 361, 768, generator=g).to(device).requires_grad_()
        text = torch.randn(b, 12, 768, generator=g).to(device).requires_grad_()
        mask = (torch.arange(12)[None] < torch.randint(3, 13, (b, 1), generator=g)).to(device)

        def step(fn, regions=regions, text=text, mask=mask):
            return lambda: fn(regions, text, mask).logsumexp(1).sum().backward()

        batched = time_fn(step(lambda r, t, m: local_similarity(r, t, m, chunk_size=32)))
        loop = time_fn(step(reference_loop), repeats=1 if b >= 64 else 3)
        err = (local_similarity(regions, text, mask) - reference_loop(regions, text, mask)).abs().max().item()
        rows.append({"batch": b, "batched_s": batched, "loop_s": loop, "speedup": loop / batched, "max_abs_diff": err})
    return rows


def bench_cold_start(model):
    out = subprocess.run([sys.executable, "-c", CHILD, model], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_gpu_batch(model_name, batch=256, steps=20):
    """Radiographs/s of batched localisation on the GPU (13 prompts, heatmaps at 224 px, bf16 encoder)
    for ``model_name`` and for the ResNet-50 architecture."""
    import warnings

    from volume_localize import build_model  # the ResNet-50 architecture with random weights

    import afloc_engine
    from afloc_engine.heatmap import gaussian_smooth, minmax_to_unit, similarity_maps
    from afloc_engine.prompts import preset_prompts

    warnings.simplefilter("ignore")
    rows = []
    for arch in (model_name, "resnet50"):
        model = build_model("cuda", "resnet50")[0] if arch == "resnet50" else afloc_engine.load_model(arch, "cuda")
        prompts = model.embed_prompts(preset_prompts("cxr")[:13])
        size = model.config.image_size
        images = torch.randn(batch, model.config.in_channels, size, size, device="cuda")

        def run(model=model, prompts=prompts, images=images, size=size):
            deep, _ = model.encode_images(images)
            grid = gaussian_smooth(similarity_maps(deep.float(), prompts.float()).flatten(0, 1), 1.5)
            up = torch.nn.functional.interpolate(grid[:, None], size=(size, size), mode="bilinear")
            return minmax_to_unit(up[:, 0])

        with torch.inference_mode():  # encode_images runs the encoder under bf16 autocast on CUDA
            for _ in range(3):
                run()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(steps):
                run()
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        rows.append(
            {
                "model": arch,
                "batch": batch,
                "radiographs_per_s": batch * steps / dt,
                "gpu": torch.cuda.get_device_name(),
            }
        )
        print(f"GPU batched localisation {arch}: {rows[-1]['radiographs_per_s']:.0f} radiographs/s", flush=True)
        del model
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="default")
    parser.add_argument("--json", help="write all numbers here (default: benchmarks/results/engine_DEVICE.json)")
    parser.add_argument("--skip-loss", action="store_true")
    args = parser.parse_args()
    report = {"machine": machine_info(args.device), "device": args.device}
    if not args.skip_loss:
        report["loss"] = bench_loss(args.device)
        speedups = [r["speedup"] for r in report["loss"]]
        report["loss_speedup_min"], report["loss_speedup_max"] = min(speedups), max(speedups)
        print("local similarity (L_DS size, forward+backward)   batched vs reference loop over reports")
        for r in report["loss"]:
            print(
                f"  B={r['batch']:4d}  batched {r['batched_s'] * 1e3:8.1f} ms  loop {r['loop_s'] * 1e3:8.1f} ms  "
                f"x{r['speedup']:.1f}  max|diff| {r['max_abs_diff']:.1e}"
            )
    if args.device == "cpu":
        report["cold_start"] = c = bench_cold_start(args.model)
        print(
            f"cold start: import {c['import_s']:.2f} s, load_model {c['load_s']:.2f} s; localize "
            f"{c['image_shape']} with 13 cached prompts {c['localize_13_prompts_s']:.2f} s "
            f"(13 new prompts {c['localize_13_new_prompts_s']:.2f} s); peak RSS {c['peak_rss_mb']:.0f} MB"
        )
    else:
        report["gpu_batch"] = bench_gpu_batch(args.model)
    report["machine"]["load_average_end"] = load_average()
    default = Path(__file__).parent / "results" / f"engine_{args.device.split(':')[0]}.json"
    out = Path(args.json) if args.json else default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
