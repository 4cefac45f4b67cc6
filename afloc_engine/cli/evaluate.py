"""``afloc evaluate``: the AFLoc paper's localisation protocol on a dataset with masks or boxes.

    afloc evaluate --model M [--model M2 ...] --data DIR --split dev
                   [--format covid|nih-bbox|rsna|tbx11k|chestx-det|nih-labels]
                   [--images DIR] [--prompts FILE] [--finding NAME ...] [--out DIR] [--specificity]
                   [--baselines constant,prior,lung_field] [--bootstrap 1000] [--seed 0] [--progress bar|json|none]

Models and baselines (a constant heatmap, a fixed lung-field prior and each image's own lung-field
estimate) run on the same images. ``--specificity`` adds prompt specificity and invariance
(:mod:`afloc_engine.evaluation.prompt_specificity`) on a set with outlines of several findings
(``chestx-det-nih``). An image-label set (``nih-cxr14-sample``) gives AUROC only.
Prints the markdown tables; with ``--out`` writes ``evaluation.md``, ``evaluation.json`` and
``cases_<finding>.png``. What was skipped and why goes to stderr and into both reports; exit
code 2 when nothing could be evaluated.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from afloc_engine.errors import AFLocError
from afloc_engine.progress import emit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="model name or folder to evaluate (repeatable); none: baselines only",
    )
    parser.add_argument("--data", type=Path, required=True, help="dataset folder (covid-cxr layout) or box CSV")
    parser.add_argument("--split", default=None, help="split to evaluate (covid-cxr: dev); default: every image")
    parser.add_argument(
        "--format",
        choices=("covid", "nih-bbox", "rsna", "tbx11k", "chestx-det", "nih-labels"),
        default=None,
        help="default: detected",
    )
    parser.add_argument("--images", type=Path, default=None, help="image folder of a box CSV (default: beside it)")
    parser.add_argument(
        "--box-frame",
        default="1024",
        help="pixel frame of box coordinates: N, WxH or 'image' (default 1024: NIH/RSNA originals)",
    )
    parser.add_argument("--prompts", type=Path, default=None, help="JSON/YAML file: finding -> prompts")
    parser.add_argument("--finding", action="append", default=[], help="finding to evaluate (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="output folder for evaluation.md/.json and PNGs")
    parser.add_argument(
        "--baselines",
        default="constant,prior,lung_field",
        help="comma list of constant, prior, lung_field; or 'none'",
    )
    parser.add_argument(
        "--specificity",
        action="store_true",
        help="also measure prompt specificity and invariance (a set with outlines of several findings)",
    )
    parser.add_argument("--shuffles", type=int, default=1000, help="shuffled-image null draws (--specificity)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument(
        "--thresholds",
        default="0.1,0.2,0.3,0.4,0.5",
        help="heatmap thresholds IoU/Dice are averaged over (comma list in (-1, 1))",
    )
    parser.add_argument("--similarity", choices=("cosine", "dot"), default=None, help="default: the model's")
    parser.add_argument("--batch-size", type=int, default=8, help="images per network batch")
    parser.add_argument("--cases", type=int, default=3, help="best and worst cases per finding in the PNGs")
    parser.add_argument(
        "--min-mask-pixels", type=int, default=1, help="skip (and report) ground-truth regions smaller than this"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (quick checks)")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda or cuda:N")
    from afloc_engine.cli.common import add_progress_argument

    add_progress_argument(parser)
    from afloc_engine.locks import add_wait_argument

    add_wait_argument(parser)


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise AFLocError(f"--thresholds must be numbers separated by commas, not {text!r}") from None
    if not values or not all(-1.0 < v < 1.0 for v in values):
        raise AFLocError(f"--thresholds must lie in (-1, 1): {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    """One writer per ``--out`` (the lock file sits beside it: the folder itself is replaced atomically)."""
    if args.out is None:
        return _run(args)
    from afloc_engine.locks import sibling_lock

    with sibling_lock(Path(args.out), "afloc evaluate", wait=args.wait):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import afloc_engine
    from afloc_engine.evaluation import (
        ModelPredictor,
        evaluate_localization,
        load_dataset,
        load_prompt_file,
        skip_report,
        to_markdown,
        write_evaluation,
    )
    from afloc_engine.evaluation.datasets import parse_frame
    from afloc_engine.evaluation.runner import NothingEvaluatedError

    if args.bootstrap < 1:
        raise AFLocError("--bootstrap must be at least 1")
    if args.batch_size < 1:
        raise AFLocError("--batch-size must be at least 1")
    thresholds = _thresholds(args.thresholds)
    baselines = [] if args.baselines.strip().lower() == "none" else [b for b in args.baselines.split(",") if b.strip()]
    from afloc_engine.evaluation.predictors import BASELINES

    unknown = [b for b in baselines if b.strip().lower() not in BASELINES]
    if unknown:
        raise AFLocError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)} or none")
    if not args.model and not baselines:
        raise AFLocError("nothing to evaluate: give --model and/or --baselines")
    # read everything a user can get wrong before loading any model
    dataset = load_dataset(args.data, args.format, args.images, args.split, parse_frame(args.box_frame))
    if args.limit is not None:
        dataset = dataset.subset(max(0, args.limit))
    prompts = load_prompt_file(args.prompts) if args.prompts else None
    models = []
    for spec in args.model:
        try:
            afloc = afloc_engine.load_model(spec, args.device)
        except ValueError as err:
            raise AFLocError(str(err)) from None
        name = Path(spec).name if Path(spec).is_dir() else spec
        models.append(ModelPredictor(afloc, name, args.batch_size, similarity=args.similarity))
    try:
        result = evaluate_localization(
            models,
            dataset,
            prompts,
            findings=args.finding or None,
            baselines=baselines,
            n_bootstrap=args.bootstrap,
            seed=args.seed,
            thresholds=thresholds,
            batch_size=args.batch_size,
            cases=max(0, args.cases),
            figures=args.out is not None and args.cases > 0,
            progress=args.progress,
            min_mask_pixels=max(1, args.min_mask_pixels),
        )
    except NothingEvaluatedError as err:
        # the error names the skip counts; list the items too
        report = skip_report(err.skipped)
        if report:
            print(f"afloc evaluate: {report}", file=sys.stderr)
        raise
    if args.specificity:
        from afloc_engine.evaluation.predictors import baseline_predictors
        from afloc_engine.evaluation.prompt_specificity import evaluate_specificity

        result["specificity"] = evaluate_specificity(
            [*models, *baseline_predictors(baselines)],
            dataset,
            prompts,
            n_bootstrap=args.bootstrap,
            n_shuffles=max(0, args.shuffles),
            seed=args.seed,
            batch_size=args.batch_size,
            progress=args.progress,
        )
    report = skip_report(result)
    if report:
        print(f"afloc evaluate: {report}", file=sys.stderr)
    for w in result["warnings"]:
        print(f"afloc evaluate: WARNING: {w}", file=sys.stderr)
    out = None
    if args.out is not None:
        out = write_evaluation(result, args.out)
    if args.progress == "json":
        emit(
            "done",
            output=None if out is None else str(out),
            methods=[m["name"] for m in result["methods"]],
            findings=result["findings"],
            skipped=len(result["skipped"]),
        )
    else:
        print(to_markdown(result))
        if out is not None:
            print(f"written: {out}")
    return 0
